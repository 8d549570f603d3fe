"""Augmented views of a data set, reproducible by (sample id, view), so that a teacher-output store
can hold the teacher's answer for each view and the student sees exactly the input the teacher saw
(the offline preprocessing of NNI, FKD's stored region labels).

An augmentation is a callable ``augment(x, seeds) -> x'`` over a batch, drawing everything from
its per-sample int64 ``seeds``; ``view_seeds(ids, view)`` gives those seeds. ``ViewData`` serves view
``epoch % views`` in each epoch and puts the view number in the batch (``batch["view"]``), which
``store.CachedTeacher`` uses to pick the stored answer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import DistilleryError
from .core import TensorData, epoch_order


def view_seeds(ids: Tensor, view: int | Tensor) -> Tensor:
    """Per-sample seeds of one view: a fixed function of (sample id, view)."""
    return ids.long() * 1_000_003 + torch.as_tensor(view, dtype=torch.long) * 7_919 + 1


class ShiftNoise:
    """MNIST-1D style augmentation of (N, L) or (N, C, L) signals: a circular shift by up to
    ``max_shift`` positions and Gaussian noise of std ``noise``, both drawn from each sample's seed."""

    def __init__(self, max_shift: int = 3, noise: float = 0.05):
        if max_shift < 0 or noise < 0:
            raise DistilleryError(f"ShiftNoise needs max_shift >= 0 and noise >= 0, got {max_shift}, {noise}.")
        self.max_shift, self.noise = int(max_shift), float(noise)

    def describe(self) -> dict:
        return {"name": "shift_noise", "max_shift": self.max_shift, "noise": self.noise}

    def __call__(self, x: Tensor, seeds: Tensor) -> Tensor:
        out = torch.empty_like(x)
        for i, s in enumerate(seeds.tolist()):
            g = torch.Generator().manual_seed(int(s) % (2**63 - 1))
            shift = int(torch.randint(-self.max_shift, self.max_shift + 1, (1,), generator=g))
            row = torch.roll(x[i], shift, dims=-1)
            out[i] = row + self.noise * torch.randn(row.shape, generator=g)
        return out


class ViewData(TensorData):
    """``data`` seen through ``views`` augmented views; view ``epoch % views`` in each epoch."""

    def __init__(self, data: TensorData, augment, views: int):
        if views < 1:
            raise DistilleryError(f"views must be >= 1, got {views}.")
        super().__init__(data.x, data.y, data.ids, data.num_classes, f"{data.name}/views{views}")
        self.augment, self.views, self.view = augment, int(views), 0

    def order(self, seed: int, epoch: int) -> Tensor:
        self.view = epoch % self.views
        return epoch_order(len(self), seed, epoch)

    def batch(self, index: Tensor) -> dict[str, Tensor]:
        out = super().batch(index)
        out["x"] = self.augment(out["x"], view_seeds(out["id"], self.view))
        out["view"] = torch.full((len(index),), self.view, dtype=torch.long)
        return out
