"""Networks of the dataset-distillation protocol.

``ConvNet``: DC's ConvNet (Zhao, Mopuri & Bilen, ICLR 2021; VICO-UoE/DatasetCondensation
``networks.py``): ``depth`` blocks of conv 3x3 (padding 1) -> instance norm (``GroupNorm`` with
one group per channel, affine) -> ReLU -> 2x2 average pooling, then one linear layer. ``MLP``
(two hidden layers of 128) and ``ConvNetBN`` (batch norm instead of instance norm) serve
cross-architecture evaluation. ``embed(x)`` is the flattened feature before the classifier.
On 1-D signals (height 1) the ConvNet's kernels are 1x3 and its pooling 1x2: DC's ConvNet along
the signal.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import unknown

ARCHS = ("convnet", "convnet_bn", "mlp")


class ConvNet(nn.Module):
    def __init__(self, shape: tuple[int, int, int], num_classes: int, width: int = 32, depth: int | None = None,
                 norm: str = "instance"):
        super().__init__()
        c, h, w = shape
        signal = h == 1
        if depth is None:
            depth = 2 if (w if signal else min(h, w)) <= 8 else 3
        kernel, pad, pool = ((1, 3), (0, 1), (1, 2)) if signal else (3, 1, 2)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, kernel, padding=pad),
                       nn.GroupNorm(width, width, affine=True) if norm == "instance" else nn.BatchNorm2d(width),
                       nn.ReLU(inplace=False), nn.AvgPool2d(pool)]
            c, h, w = width, h if signal else h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * h * w, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


class MLP(nn.Module):
    def __init__(self, shape: tuple[int, int, int], num_classes: int, width: int = 128):
        super().__init__()
        d = shape[0] * shape[1] * shape[2]
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(d, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.classifier = nn.Linear(width, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


def build(arch: str, shape: tuple[int, int, int], num_classes: int, width: int = 32, seed: int | None = None) -> nn.Module:
    """A freshly initialised network (seeded when ``seed`` is given, the global RNG left as it was)."""
    if arch not in ARCHS:
        raise unknown("network", arch, ARCHS)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        if arch == "mlp":
            return MLP(shape, num_classes)
        return ConvNet(shape, num_classes, width, norm="instance" if arch == "convnet" else "batch")
