"""An objective is a list of terms; one call returns every named term and their weighted total.

    total = sum_i weight_i * loss_i(student[tap_i], teacher[tap_i], **params_i)

Terms read ``logits`` or a tapped module output of either model. A loss never sees where its
tensors came from: the objective looks them up and passes plain tensors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import losses
from .config import TermConfig, check_kwargs
from .errors import DistilleryError

_RESERVED = ("targets", "mask", "reduction")


@dataclass
class Term:
    """One named loss term. ``fn`` is the loss function (looked up from ``loss`` when it is a name)."""

    loss: str | Callable[..., Tensor]
    weight: float = 1.0
    name: str = ""
    student: str = "logits"
    teacher: str | None = "logits"
    targets: str = "auto"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fn = losses.get(self.loss) if isinstance(self.loss, str) else self.loss
        loss_name = self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__", "loss")
        self.name = self.name or loss_name
        check_kwargs(self.fn, self.params, f"term {self.name!r} (loss {loss_name!r})", skip=2, reserved=_RESERVED)
        if self.targets not in ("auto", "labels", "teacher"):
            raise DistilleryError(f"term {self.name!r}: targets must be auto, labels or teacher, got {self.targets!r}.")
        self.call = functools.partial(self.fn, **self.params)  # recipe parameters bound once
        self.needs_targets = bool(getattr(self.fn, "needs_targets", False))

    @classmethod
    def from_config(cls, cfg: TermConfig) -> Term:
        return cls(cfg.loss, cfg.weight, cfg.name or "", cfg.student, cfg.teacher, cfg.targets, dict(cfg.params))


class Objective:
    """Terms -> ``{"total": Tensor, "terms": {name: Tensor}}`` for one batch."""

    def __init__(self, terms: Sequence[Term | TermConfig]):
        self.terms = [t if isinstance(t, Term) else Term.from_config(t) for t in terms]
        if not self.terms:
            raise DistilleryError("an objective needs at least one term.")
        seen: dict[str, int] = {}
        for t in self.terms:  # two kd terms become kd and kd_2
            seen[t.name] = seen.get(t.name, 0) + 1
            if seen[t.name] > 1:
                t.name = f"{t.name}_{seen[t.name]}"

    @property
    def needs_teacher(self) -> bool:
        return any(t.teacher is not None for t in self.terms)

    @property
    def student_taps(self) -> list[str]:
        return list(dict.fromkeys(t.student for t in self.terms if t.student != "logits"))

    @property
    def teacher_taps(self) -> list[str]:
        return list(dict.fromkeys(t.teacher for t in self.terms if t.teacher not in (None, "logits")))

    @property
    def needs_labels(self) -> bool:
        return any(t.needs_targets and (t.targets == "labels" or (t.teacher is None and t.targets == "auto"))
                   for t in self.terms)

    def __call__(self, student: dict[str, Tensor], teacher: dict[str, Tensor] | None,
                 batch: dict[str, Tensor]) -> dict[str, Any]:
        terms: dict[str, Tensor] = {}
        total: Tensor | None = None
        for t in self.terms:
            s = student[t.student]
            if t.teacher is None:
                tv = None
            else:
                if teacher is None:
                    raise DistilleryError(f"term {t.name!r} reads the teacher, but no teacher was given.")
                tv = teacher[t.teacher]
                if t.student == "logits" and t.teacher == "logits" and s.shape[-1] != tv.shape[-1]:
                    raise DistilleryError(
                        f"teacher and student disagree on the class count: teacher logits have {tv.shape[-1]} classes, "
                        f"student logits {s.shape[-1]}; build both for the same data set (num_classes)."
                    )
            if t.needs_targets:
                value = t.call(s, tv, targets=self._targets(t, batch, teacher))
            else:
                value = t.call(s, tv)
            terms[t.name] = value
            total = t.weight * value if total is None else total + t.weight * value
        return {"total": total, "terms": terms}

    def _targets(self, t: Term, batch: dict[str, Tensor], teacher: dict[str, Tensor] | None) -> Tensor | None:
        mode = t.targets
        if mode == "labels" or (mode == "auto" and "y" in batch):
            if "y" not in batch:
                raise DistilleryError(f"term {t.name!r} needs labels but the batch has none (an unlabelled set); "
                                      "use targets: teacher, or train this term on a labelled set.")
            return batch["y"]
        if teacher is not None and "logits" in teacher:
            return teacher["logits"].argmax(-1)
        if t.teacher is None:
            raise DistilleryError(f"term {t.name!r} needs labels but the batch has none and there is no teacher.")
        return None


def check_finite(result: dict[str, Any], where: str) -> None:
    """Stop with a message naming the non-finite terms (NaN or inf), never a silent divergence."""
    total = result["total"]
    total = total.detach()
    finite = math.isfinite(float(total)) if total.numel() == 1 else bool(torch.isfinite(total).all())
    if finite:  # a scalar costs one sync and no extra kernels
        return
    bad = {k: float(v.detach()) for k, v in result["terms"].items() if not bool(torch.isfinite(v).all())}
    detail = ", ".join(f"{k} = {v}" for k, v in bad.items()) or f"total = {float(total)}"
    raise DistilleryError(
        f"non-finite loss at {where}: {detail}. The run stopped; lower the learning rate, set "
        "train.clip_grad_norm, or check the inputs and teacher outputs for NaN/inf."
    )
