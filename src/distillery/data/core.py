"""An in-memory data set of tensors with sample ids, and a seeded batch order that can resume."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TensorData:
    """Inputs ``x`` (N, ...), labels ``y`` (N,) or None for unlabelled sets, ``ids`` (N,) int64."""

    x: Tensor
    y: Tensor | None
    ids: Tensor
    num_classes: int
    name: str = ""

    def __post_init__(self) -> None:
        n = len(self.x)
        if len(self.ids) != n or (self.y is not None and len(self.y) != n):
            raise ValueError(f"{self.name}: x, y and ids differ in length")
        if len(torch.unique(self.ids)) != n:
            raise ValueError(f"{self.name}: sample ids are not unique")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def labelled(self) -> bool:
        return self.y is not None

    def batch(self, index: Tensor) -> dict[str, Tensor]:
        """The samples at positions ``index``: ``{"x", "id"}`` and ``"y"`` when labelled."""
        out = {"x": self.x[index], "id": self.ids[index]}
        if self.y is not None:
            out["y"] = self.y[index]
        return out

    def __getitems__(self, index: list[int] | Tensor) -> dict[str, Tensor]:
        """A whole batch in one call (the DataLoader's fetch): no per-item collation."""
        return self.batch(index if isinstance(index, Tensor) else torch.as_tensor(index, dtype=torch.long))

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[0] for k, v in self.batch(torch.tensor([int(i)])).items() if isinstance(v, Tensor)}

    def unlabelled(self, name: str | None = None) -> TensorData:
        return TensorData(self.x, None, self.ids, self.num_classes, name or self.name)

    def subset(self, index: Tensor, name: str | None = None) -> TensorData:
        y = None if self.y is None else self.y[index]
        return TensorData(self.x[index], y, self.ids[index], self.num_classes, name or self.name)


def concat(parts: list[TensorData], name: str) -> TensorData:
    """Join data sets (labels dropped unless every part has them). Ids must stay unique across parts."""
    y = torch.cat([p.y for p in parts]) if all(p.y is not None for p in parts) else None
    return TensorData(torch.cat([p.x for p in parts]), y, torch.cat([p.ids for p in parts]), parts[0].num_classes, name)


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The permutation of epoch ``epoch``: a function of (seed, epoch) only, so a resumed run
    sees exactly the batches an uninterrupted one would."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


def batches(order: Tensor, batch_size: int) -> list[Tensor]:
    return list(order.split(batch_size))
