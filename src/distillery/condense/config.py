"""The condense recipe: ``kind: condense`` at the top of a YAML file, checked key by key."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import DistilleryError, close_matches, unknown
from .augment import check_strategy
from .data import NAMES, SHAPES
from .methods import METHODS, Settings
from .nets import ARCHS


@dataclass
class CondenseEval:
    nets: int = 5
    """Fresh networks trained on each synthetic set."""
    epochs: int = 500
    archs: list[str] = field(default_factory=lambda: ["convnet"])
    """The first is the distillation architecture; others give the cross-architecture rows."""
    enabled: bool = True
    """False: condense only (``distillery eval RUN_DIR`` evaluates later)."""


@dataclass
class CondenseRecipe:
    kind: Literal["condense"] = "condense"
    name: str = ""
    """Names the run directory (default: the recipe's name, such as ``condense/digits_dm``)."""
    runs_dir: str = "runs"
    data: str = "digits"
    method: str = "dm"
    ipc: int = 10
    flip: bool = False
    soft_labels: Literal["none", "learned", "committee"] = "none"
    seed: int = 0
    threads: int = 2
    """torch intra-op threads (set deliberately: speed, and on some kernels results, depend on it)."""
    sets: int = 1
    """Synthetic sets condensed with seeds seed, seed + 1, ... (the N of N sets x M nets)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Method settings (``distillery.condense.Settings``): iterations, lr_img, syn_steps, sam, ..."""
    eval: CondenseEval = field(default_factory=CondenseEval)

    def __post_init__(self) -> None:
        if self.data not in NAMES:
            raise unknown("image data set", self.data, NAMES)
        if self.method not in METHODS:
            raise unknown("condensation method", self.method, METHODS)
        for a in self.eval.archs:
            if a not in ARCHS:
                raise unknown("network", a, ARCHS)
        if self.ipc < 1 or self.sets < 1 or self.eval.nets < 1 or self.eval.epochs < 1 or self.threads < 1:
            raise DistilleryError("ipc, sets, threads, eval.nets and eval.epochs must be at least 1.")
        self.method_settings()

    def method_settings(self) -> Settings:
        names = {f.name for f in dataclasses.fields(Settings)} - {"flip", "learn_labels", "extra"}
        for k in self.settings:
            if k not in names:
                near = close_matches(k, names)
                hint = f" Did you mean {near[0]!r}?" if near else ""
                raise DistilleryError(f"unknown key 'settings.{k}'.{hint} Allowed: {', '.join(sorted(names))}.")
        values = dict(self.settings)
        if values.get("strategy") is not None:  # null: the data's default strategy
            values["strategy"] = check_strategy(list(values["strategy"]), SHAPES[self.data])
        for k, v in values.items():  # declared ranges: counts >= 1 (max_start_epoch >= 0), rates finite and > 0
            if k in ("strategy", "extra") or v is None or isinstance(v, bool):
                continue
            if not isinstance(v, (int, float)):
                raise DistilleryError(f"settings.{k} must be a number, got {v!r}.")
            if k.startswith("lr"):
                ok, need = math.isfinite(v) and v > 0, "a finite number > 0"
            else:
                low = 0 if k in ("max_start_epoch", "sam_rho") else 1
                ok, need = math.isfinite(v) and v >= low, f"at least {low}"
            if not ok:
                raise DistilleryError(f"settings.{k} must be {need}, got {v}.")
        return Settings(**values)
