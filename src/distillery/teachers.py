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
        self._params = list(model.parameters())  # walked once: named_modules() on every call costs

    def check_frozen(self) -> None:
        if self.model.training:
            raise DistilleryError("the teacher module was switched to train mode; teachers must stay in eval mode.")
        if any(p.requires_grad for p in self._params):
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


@torch.no_grad()
def answer_all(teacher: Teacher, x: Tensor, taps: Sequence[str] = (), batch_size: int = 1024) -> dict[str, Tensor]:
    """The teacher's answers for every row of ``x``, in batches, concatenated: logits and ``taps``."""
    parts = [teacher({"x": x[i:i + batch_size]}, taps) for i in range(0, len(x), batch_size)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class PrecomputedTeacher:
    """A teacher's outputs (logits, and the tapped features named in ``taps``) for every sample of
    a fixed data set, computed once and looked up by sample id (``batch["id"]``), never by batch
    position.

    Right when the inputs do not change between epochs (no augmentation): the answers are those of
    the live teacher, without its forward pass at every step. Batches without ids (evaluation)
    go to the live teacher; an id outside the set, or a tap that was not stored, is an error."""

    def __init__(self, teacher: Teacher, data, taps: Sequence[str] = (), batch_size: int = 1024):
        self.live = teacher
        self.taps = [t for t in dict.fromkeys(taps) if t != "logits"]
        answers = answer_all(teacher, data.x, self.taps, batch_size)
        self.sorted_ids, order = torch.sort(data.ids)
        self.outputs = {k: v[order] for k, v in answers.items()}

    def check_taps(self, taps: Sequence[str]) -> None:
        extra = [t for t in taps if t != "logits" and t not in self.outputs]
        if extra:
            raise DistilleryError(f"the precomputed teacher outputs hold {sorted(self.outputs)}, not {extra}; "
                                  "precompute those taps too, or set distill.precompute_teacher=false.")

    def __call__(self, batch: dict[str, Tensor], taps: Sequence[str] = ()) -> dict[str, Tensor]:
        self.check_taps(taps)
        if "id" not in batch:
            return self.live(batch, taps)
        ids = batch["id"]
        pos = torch.searchsorted(self.sorted_ids, ids).clamp_(max=len(self.sorted_ids) - 1)
        if not torch.equal(self.sorted_ids[pos], ids):
            missing = ids[self.sorted_ids[pos] != ids][:5].tolist()
            raise DistilleryError(f"sample ids {missing} are not in the precomputed teacher outputs; "
                                  "precompute them for the data set being trained on.")
        return {k: self.outputs[k][pos] for k in ("logits", *taps) if k in self.outputs}
