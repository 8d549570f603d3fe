"""Teachers answer one question: what does the teacher say about this batch?

``teacher(batch, taps=()) -> {"logits": Tensor[N, C], <tap path>: Tensor, ...}``

The student side calls only this protocol, so a frozen module, an ensemble, a cache of stored
outputs keyed by sample id, or a remote service are interchangeable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .errors import DistilleryError
from .taps import Taps, check_paths


@runtime_checkable
class Teacher(Protocol):
    def __call__(self, batch: dict[str, Tensor], taps: Sequence[str] = ()) -> dict[str, Tensor]: ...


class ModuleTeacher:
    """A frozen ``nn.Module``: eval mode, ``requires_grad_(False)``, run under ``no_grad``.

    Freezing happens here, before any wrapping, and is asserted on every call: a teacher put back
    in train mode or given trainable parameters is an error, not a silent change of targets.
    A teacher is never wrapped in DDP (it has no gradients to synchronise)."""

    def __init__(self, model: nn.Module):
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            raise DistilleryError("the teacher is wrapped in DDP/DataParallel; pass the bare module (a frozen teacher needs no gradient sync).")
        self.model = model.eval().requires_grad_(False)

    def check_frozen(self) -> None:
        if self.model.training:
            raise DistilleryError("the teacher module was switched to train mode; teachers must stay in eval mode.")
        if any(p.requires_grad for p in self.model.parameters()):
            raise DistilleryError("the teacher has parameters with requires_grad=True; teachers must stay frozen.")

    def check_taps(self, taps: Sequence[str]) -> None:
        check_paths(self.model, [t for t in taps if t != "logits"])

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor], taps: Sequence[str] = ()) -> dict[str, Tensor]:
        self.check_frozen()
        paths = [t for t in taps if t != "logits"]
        if not paths:
            return {"logits": self.model(batch["x"])}
        with Taps(self.model, paths, detach=True) as t:
            logits = self.model(batch["x"])
            return {"logits": logits, **{p: t[p] for p in paths}}

    def to(self, device: torch.device | str) -> ModuleTeacher:
        self.model.to(device)
        return self
