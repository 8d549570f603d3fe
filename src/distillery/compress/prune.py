"""Structured pruning of a student on torch-pruning (the ``compress`` extra): whole channels and neurons
removed along torch-pruning's dependency graph, so the pruned model is a smaller dense model of the same
classes; a compress stage then recovers its quality by distillation from the unpruned model or the teacher.

Importances (torch-pruning's): ``magnitude`` (L2 norm of each channel's weights), ``taylor``
(|weight x gradient| of the cross-entropy on a calibration batch, Molchanov et al. 2019) and
``activation`` (mean |input| of the next linear / Conv2d layer over a calibration batch). ``steps: N``
prunes iteratively: ``ratio`` reached in N equal steps, each followed by its share of the recovery
training (one shot with ``steps: 1``).

The pruned shapes travel with the weights: ``save`` writes safetensors with distillery's record holding
each module's sizes (torch-pruning's ``state_dict`` attributions, integers only), and ``load`` shrinks a
freshly built model of the recipe's architecture to them (``torch_pruning.load_state_dict``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..errors import DistilleryError


@dataclass
class PruneConfig:
    """How a compress stage prunes (``compress: [{name, prune: {...}}]``)."""

    ratio: float = 0.5
    """Share of each prunable layer's output channels / neurons removed (0 < ratio < 1)."""
    importance: Literal["magnitude", "taylor", "activation"] = "magnitude"
    steps: int = 1
    """1: one shot; N: iterative, ``ratio`` reached in N steps with recovery training after each."""
    ignore: list[str] | None = None
    """Module paths left whole (null: the last linear layer, the classifier's outputs)."""
    calibration: int = 256
    """Training samples the taylor and activation importances read."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ratio) and 0 < self.ratio < 1):
            raise DistilleryError(f"prune.ratio is the share of channels removed, in (0, 1); got {self.ratio} "
                                  "(1 would leave layers empty).")
        if self.steps < 1 or self.calibration < 1:
            raise DistilleryError("prune.steps and prune.calibration must be at least 1.")


def require_torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise DistilleryError("pruning needs torch-pruning: pip install 'distillery[compress]'.") from None
    import torch_pruning

    return torch_pruning


def _ignored(model: nn.Module, cfg: PruneConfig) -> list[nn.Module]:
    from ..taps import find_module

    if cfg.ignore is not None:
        return [find_module(model, p) for p in cfg.ignore]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise DistilleryError("prune: the model has no linear layer to keep as its classifier; name the modules to "
                              "leave whole in prune.ignore.")
    return [linears[-1]]


class Pruner:
    """torch-pruning's ``MetaPruner`` over ``model`` with the stage's importance; ``step(batch)`` removes the
    next share of channels (the batch feeds the taylor and activation importances)."""

    def __init__(self, model: nn.Module, cfg: PruneConfig, example: torch.Tensor):
        tp = require_torch_pruning()
        self.model, self.cfg = model, cfg
        self.importance = {"magnitude": lambda: tp.importance.MagnitudeImportance(p=2),
                           "taylor": tp.importance.TaylorImportance,
                           "activation": tp.importance.ActivationImportance}[cfg.importance]()
        before = _widths(model)
        self.pruner = tp.pruner.MetaPruner(model, example, importance=self.importance, pruning_ratio=cfg.ratio,
                                           iterative_steps=cfg.steps, ignored_layers=_ignored(model, cfg))
        self.before = before

    def step(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        self.model.eval()
        if self.cfg.importance == "taylor":
            if y is None:
                raise DistilleryError("prune.importance taylor needs labelled calibration data; use magnitude.")
            self.model.zero_grad()
            nn.functional.cross_entropy(self.model(x), y).backward()
        if self.cfg.importance == "activation":
            with self.importance.compute_importance(self.model), torch.no_grad():
                self.model(x)
        self.pruner.step()
        self.model.zero_grad(set_to_none=True)
        for name, width in _widths(self.model).items():
            if width == 0:
                raise DistilleryError(f"prune: layer {name!r} has no channel left; lower prune.ratio.")


def _widths(model: nn.Module) -> dict[str, int]:
    return {n: (m.out_features if isinstance(m, nn.Linear) else m.out_channels) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))}


def shapes(model: nn.Module) -> dict[str, dict[str, int | list[int]]]:
    """Each module's public integer sizes (in/out features and channels, groups, norm widths, ...): what
    ``load`` sets on a freshly built model before its pruned tensors go in."""
    out: dict[str, dict[str, int | list[int]]] = {}
    for name, m in model.named_modules():
        attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(m).items() if not k.startswith("_")
                 and ((isinstance(v, int) and not isinstance(v, bool))
                      or (isinstance(v, tuple) and v and all(isinstance(i, int) and not isinstance(i, bool) for i in v)))}
        if attrs:
            out[name] = attrs
    return out


def save(model: nn.Module, path: str | Path, meta: dict) -> Path:
    from ..io import save_with_record

    return save_with_record(path, {k: v.clone() for k, v in model.state_dict().items()}, {**meta, "shapes": shapes(model)})


def load(model: nn.Module, path: str | Path, *, verify: bool = True) -> nn.Module:
    """A freshly built ``model`` (the unpruned architecture) shrunk to the pruned shapes of ``path``: its
    modules' sizes set from the record, each parameter and buffer replaced by the saved tensor."""
    from ..pipeline import read_weights

    tensors, record = read_weights(Path(path), verify=verify)
    if "shapes" not in record:
        raise DistilleryError(f"{path} records no pruned shapes; it was not written by distillery's prune stage.")
    own = model.state_dict()
    if set(own) != set(tensors):
        raise DistilleryError(f"{path} does not fit the model: its tensors are not the model's "
                              f"({sorted(set(own) ^ set(tensors))[:3]} differ).")
    for name, attrs in record["shapes"].items():
        m = model.get_submodule(name)
        for k, v in attrs.items():
            setattr(m, k, tuple(v) if isinstance(v, list) else v)
    for key, t in tensors.items():
        owner, _, attr = key.rpartition(".")
        m = model.get_submodule(owner)
        if attr in m._parameters:
            m._parameters[attr] = nn.Parameter(t, requires_grad=m._parameters[attr].requires_grad)
        else:
            m._buffers[attr] = t
    return model


def sparsity(model: nn.Module, before: dict[str, int]) -> float:
    """Share of the prunable layers' output channels removed."""
    now = _widths(model)
    total = sum(before.values())
    return 1 - sum(now.get(k, 0) for k in before) / total if total else 0.0

