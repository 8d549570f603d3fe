"""The condense recipe: ``kind: condense`` at the top of a YAML file, checked key by key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ..errors import DistilleryError, unknown
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
    settings: Settings = field(default_factory=Settings)
    """The method's settings (``distillery.condense.Settings``): iterations, lr_img, syn_steps, sam, ..."""
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
        """The method's settings with the DSA strategy checked against the data (null: the data's default)."""
        if self.settings.flip or self.settings.learn_labels:
            raise DistilleryError("settings.flip and settings.learn_labels are set by the recipe's flip: and "
                                  "soft_labels: learned; set those instead.")
        if self.settings.strategy is None:
            return self.settings
        return dataclasses.replace(self.settings, strategy=check_strategy(list(self.settings.strategy),
                                                                          SHAPES[self.data]))
