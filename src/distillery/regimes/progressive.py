"""Progressive distillation through teacher assistants (TAKD, Mirzadeh et al., AAAI 2020): a chain
teacher -> assistant_1 -> ... -> student, each link distilled from the one before it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..config import TermConfig, TrainConfig
from ..data.core import TensorData
from ..engine import fit, seed_everything
from ..errors import DistilleryError
from ..models import num_params
from ..objective import Objective
from ..teachers import ModuleTeacher, PrecomputedTeacher


def chain(teacher: nn.Module, links: Sequence[Callable[[], nn.Module]], data: TensorData, train: TrainConfig, *,
          terms: list[TermConfig] | None = None, eval_data: TensorData | None = None,
          run_dir: str | Path | None = None, seed: int = 0, progress: bool | None = False) -> list[dict[str, Any]]:
    """Distil ``teacher`` into ``links[0]()``, that into ``links[1]()``, and so on; each link is its own
    resumable phase (``link1``, ...). Returns one record per link (model, parameters, fit result)
    for an accuracy-against-parameters plot along the chain."""
    if not links:
        raise DistilleryError("a chain needs at least one link after the teacher.")
    steps = distil_in_turn(teacher, links, data, train, terms=terms, eval_data=eval_data, run_dir=run_dir,
                           seed=seed, progress=progress, phase="link")
    return [{"link": i, "model": m, "params": num_params(m), "result": r} for i, (m, r) in enumerate(steps, 1)]


def distil_in_turn(teacher: nn.Module, makers: Sequence[Callable[[], nn.Module]], data: TensorData,
                   train: TrainConfig, *, terms: list[TermConfig] | None, eval_data: TensorData | None,
                   run_dir: str | Path | None, seed: int, progress: bool | None, phase: str) -> list[tuple]:
    """Model k (from ``makers[k - 1]``, seeded ``seed + k``) distilled from model k - 1, model 0 being
    ``teacher``; phase ``<phase>k`` each, resumable. ``terms`` default to kd (tau 4). (model, result) each."""
    terms = terms or [TermConfig(loss="kd", params={"temperature": 4.0})]
    out: list[tuple] = []
    prev = teacher
    for k, make in enumerate(makers, 1):
        seed_everything(seed + k)
        model = make()
        answers = PrecomputedTeacher(ModuleTeacher(prev), data, Objective(terms).teacher_taps)
        result = fit(model, Objective(terms), data, train, teacher=answers, eval_data=eval_data, run_dir=run_dir,
                     phase=f"{phase}{k}", seed=seed + k, progress=progress)
        out.append((model, result))
        prev = model
    return out
