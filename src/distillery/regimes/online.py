"""Online (mutual) distillation: several students trained together in one engine run.

``Peers(members)`` is one module holding the students; its output is member 0's (the one a run
exports), and each member's logits are read by tap (``members.i``). A term whose teacher is
``student:members.j`` reads member j's output, detached: peer j teaches peer i through its
predictions only. One optimiser over all members equals one optimiser each for per-parameter
optimisers (SGD, Adam, AdamW) at a shared learning rate, and the members update simultaneously,
as DML's paper describes; global gradient clipping would couple them (leave it off, or accept it).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..config import TermConfig
from ..errors import DistilleryError


class Peers(nn.Module):
    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise DistilleryError("online distillation needs at least two members.")
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        outs = [m(x) for m in self.members]  # every member runs, so its tap holds this batch's output
        return outs[0]


def dml_terms(k: int, *, temperature: float = 1.0, label_weight: float = 1.0) -> list[TermConfig]:
    """Deep Mutual Learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018) for ``k`` members:
        L_i = CE(p_i, y) + 1 / (k - 1) * sum_{j != i} KL(p_j || p_i),
    p = softmax(z / tau) (tau = 1 in the paper; kd's tau^2 factor is 1 there), each member's peers
    detached. All members step together on the sum of the L_i."""
    if k < 2:
        raise DistilleryError("dml needs at least two members.")
    terms = []
    for i in range(k):
        terms.append(TermConfig(loss="ce", student=f"members.{i}", teacher=None, weight=label_weight,
                                name=f"ce_{i}", targets="labels"))
        for j in range(k):
            if j != i:
                terms.append(TermConfig(loss="kd", student=f"members.{i}", teacher=f"student:members.{j}",
                                        weight=1.0 / (k - 1), name=f"kl_{i}_from_{j}",
                                        params={"temperature": temperature}))
    return terms
