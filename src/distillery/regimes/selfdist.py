"""Self-distillation: an EMA copy of the student as its teacher, and born-again generations."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import TermConfig, TrainConfig
from ..data.core import TensorData
from ..errors import DistilleryError
from ..taps import Taps
from ..teachers import ModuleTeacher
from .progressive import distil_in_turn


class EMATeacher:
    """Mean teacher (Tarvainen & Valpola, NeurIPS 2017): theta' <- m theta' + (1 - m) theta after every
    optimiser step, buffers (batch-norm statistics) copied, with the warm-up schedule
    m_t = min(1 - 1 / (t + 1), momentum) of the paper's code. Pass ``modules={"ema": ema.model}`` to
    ``fit`` so the EMA weights are checkpointed and restored, and ``on_step=ema.update``.
    The copy answers in eval mode, without gradients."""

    def __init__(self, student: nn.Module, momentum: float = 0.999):
        if not 0 <= momentum < 1:
            raise DistilleryError(f"EMA momentum must lie in [0, 1), got {momentum}.")
        self.student, self.momentum = student, float(momentum)
        self.model = copy.deepcopy(student).requires_grad_(False)
        self.model.register_buffer("ema_step", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, step: int | None = None) -> float:
        t = int(self.model.ema_step)
        m = min(1 - 1 / (t + 1), self.momentum)
        for p_t, p_s in zip(self.model.parameters(), self.student.parameters()):
            p_t.mul_(m).add_(p_s.detach(), alpha=1 - m)
        source = dict(self.student.named_buffers())
        for name, b_t in self.model.named_buffers():
            if name in source:
                b_t.copy_(source[name])
        self.model.ema_step.add_(1)
        return m

    def check_taps(self, taps: Sequence[str]) -> None:
        ModuleTeacher(self.model).check_taps(taps)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor], taps: Sequence[str] = ()) -> dict[str, Tensor]:
        was = self.model.training
        self.model.eval()
        try:
            paths = [t for t in taps if t != "logits"]
            with Taps(self.model, paths, detach=True) as tp:
                logits = self.model(batch["x"])
                return {"logits": logits, **{p: tp[p] for p in paths}}
        finally:
            self.model.train(was)


def born_again(make_student: Callable[[], nn.Module], teacher: nn.Module, data: TensorData, train: TrainConfig, *,
               generations: int, terms: list[TermConfig] | None = None, eval_data: TensorData | None = None,
               run_dir: str | Path | None = None, seed: int = 0, progress: bool | None = False) -> list[dict[str, Any]]:
    """Born-again networks (Furlanello et al., ICML 2018): generation g + 1, a fresh student of the
    same architecture, is distilled from generation g; generation 0 is ``teacher``. Every generation
    is its own resumable phase (``gen1``, ``gen2``, ...) and is kept: returns one record per generation
    with its model and ``fit``'s result. ``terms`` default to kd (tau 4) alone."""
    if generations < 1:
        raise DistilleryError(f"born_again needs generations >= 1, got {generations}.")
    steps = distil_in_turn(teacher, [make_student] * generations, data, train, terms=terms, eval_data=eval_data,
                           run_dir=run_dir, seed=seed, progress=progress, phase="gen")
    return [{"generation": g, "model": m, "result": r} for g, (m, r) in enumerate(steps, 1)]
