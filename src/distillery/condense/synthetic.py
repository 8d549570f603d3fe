"""A synthetic set on disk: safetensors with the images, their labels (hard (M,) int64 or soft
(M, C) probabilities) and a JSON metadata entry (method, settings, source fingerprint), written
atomically and checked on load."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import DistilleryError
from ..io import atomic_save_safetensors

FORMAT = 1


@dataclass
class SyntheticSet:
    x: Tensor
    """(M, C, H, W) images in the standardised space of the source data."""
    y: Tensor
    """(M,) int64 class labels, or (M, num_classes) soft labels (rows summing to 1)."""
    num_classes: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.x.dim() != 4:
            raise DistilleryError(f"synthetic images must be (M, C, H, W), got shape {tuple(self.x.shape)}.")
        m = self.x.shape[0]
        if self.y.dim() == 1:
            if self.y.dtype != torch.int64 or len(self.y) != m:
                raise DistilleryError(f"hard labels must be int64 of shape ({m},), got {self.y.dtype} {tuple(self.y.shape)}.")
            if m and (int(self.y.min()) < 0 or int(self.y.max()) >= self.num_classes):
                raise DistilleryError(f"hard labels must lie in 0..{self.num_classes - 1}.")
        elif self.y.dim() == 2:
            if tuple(self.y.shape) != (m, self.num_classes) or not self.y.is_floating_point():
                raise DistilleryError(f"soft labels must be float of shape ({m}, {self.num_classes}) (one row of class "
                                      f"probabilities per image), got {self.y.dtype} {tuple(self.y.shape)}.")
            if bool((self.y < 0).any()) or not torch.allclose(self.y.sum(1), torch.ones(m), atol=1e-4):
                raise DistilleryError("soft labels must be probabilities: non-negative rows that sum to 1.")
        else:
            raise DistilleryError(f"labels must be (M,) or (M, num_classes), got shape {tuple(self.y.shape)}.")

    @property
    def soft(self) -> bool:
        return self.y.dim() == 2

    @property
    def hard_labels(self) -> Tensor:
        return self.y.argmax(1) if self.soft else self.y

    def save(self, path: str | Path) -> Path:
        meta = {"format": FORMAT, "num_classes": self.num_classes, **self.meta}
        return atomic_save_safetensors(path, {"x": self.x, "y": self.y}, {"distillery": json.dumps(meta, default=str)})

    @classmethod
    def load(cls, path: str | Path) -> SyntheticSet:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise DistilleryError(f"synthetic set {str(path)!r} does not exist; write one with `distillery run condense/digits_dm` (any condense recipe).")
        try:
            with safe_open(str(path), "pt") as f:
                raw = (f.metadata() or {}).get("distillery")
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise DistilleryError(f"{path} is not a readable safetensors file ({e}); write it again.") from None
        if raw is None or set(tensors) != {"x", "y"}:
            raise DistilleryError(f"{path} is not a distillery synthetic set (no 'distillery' metadata or x / y).")
        meta = json.loads(raw)
        if meta.get("format") != FORMAT:
            raise DistilleryError(f"{path}: synthetic set format {meta.get('format')} is not {FORMAT}.")
        n = int(meta.pop("num_classes"))
        meta.pop("format")
        return cls(tensors["x"], tensors["y"], n, meta)
