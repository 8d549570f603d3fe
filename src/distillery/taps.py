"""Read intermediate tensors by module path with forward hooks; no model surgery.

    with Taps(model, ["layer3", "blocks.7.mlp"]) as taps:
        model(x)
        feats = taps["layer3"]
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .errors import unknown


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / DataParallel / ``torch.compile`` wrapper (hooks go on the inner one)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def find_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path`` ("" is the model itself). ``module.`` prefixes of wrappers are accepted.

    A wrong path raises ``DistilleryError`` naming the close matches from ``named_modules()``."""
    inner = unwrap(model)
    modules = dict(inner.named_modules())
    for candidate in (path, path.removeprefix("module."), path.removeprefix("_orig_mod.")):
        if candidate in modules:
            return modules[candidate]
    raise unknown("module path", path, [n for n in modules if n] or ["(the model has no submodules)"])


def check_paths(model: nn.Module, paths: Iterable[str]) -> None:
    for p in paths:
        find_module(model, p)


def _first_tensor(output):
    """Forward outputs may be tuples (e.g. attention blocks); the tap keeps the first tensor."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for o in output:
            if isinstance(o, Tensor):
                return o
    if isinstance(output, dict):
        for o in output.values():
            if isinstance(o, Tensor):
                return o
    raise TypeError(f"tapped module returned {type(output).__name__}, which holds no tensor")


class Taps:
    """Forward hooks on ``paths`` of ``model`` for the duration of a ``with`` block.

    ``taps[path]`` is the output of that module in the last forward call. Hooks are removed
    on exit, also when the block raises. ``detach=True`` stores detached outputs (for teachers)."""

    def __init__(self, model: nn.Module, paths: Iterable[str], *, detach: bool = False):
        self.model = model
        self.paths = list(dict.fromkeys(paths))
        self.detach = detach
        self._modules = {p: find_module(model, p) for p in self.paths}  # fails now, not mid-run
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.outputs: dict[str, Tensor] = {}

    def __enter__(self) -> Taps:
        for path, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._hook(path)))
        return self

    def _hook(self, path: str):
        def hook(_module, _inputs, output):
            t = _first_tensor(output)
            self.outputs[path] = t.detach() if self.detach else t

        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.outputs.clear()

    def __getitem__(self, path: str) -> Tensor:
        try:
            return self.outputs[path]
        except KeyError:
            if path not in self._modules:
                raise unknown("tap", path, self._modules) from None
            raise KeyError(f"tap {path!r} has no output yet: the module did not run in the last forward") from None

    def __contains__(self, path: object) -> bool:
        return path in self.outputs
