"""MLP, 1-D CNN (MNIST-1D) and small 2-D CNN (digits)."""

from __future__ import annotations

import math

from torch import Tensor, nn

from . import MODELS


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout] * len(hidden) -> Linear (``head``)."""

    def __init__(self, in_features: int, num_classes: int, hidden: list[int], dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (N, ...) -> (N, C)
        return self.head(self.body(x.flatten(1)))


@MODELS.register("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: list[int] | None = None, dropout: float = 0.0) -> nn.Module:
    """MLP on flattened inputs; ``hidden=[256]`` gives 40-256-10 on MNIST-1D."""
    return MLP(math.prod(input_shape), num_classes, [256] if hidden is None else list(hidden), dropout)


class CNN1d(nn.Module):
    """Conv1d stack over a (N, L) or (N, 1, L) signal, then ``head``. Layers: conv{i}, fc, head."""

    def __init__(self, length: int, num_classes: int, channels: int, layers: int, hidden: int, dropout: float):
        super().__init__()
        convs: list[nn.Module] = []
        c_in, size = 1, length
        for i in range(layers):
            stride = 1 if i == 0 else 2
            convs += [nn.Conv1d(c_in, channels, 5 if i == 0 else 3, stride=stride, padding=2 if i == 0 else 1), nn.ReLU()]
            c_in = channels
            size = size if i == 0 else (size + 2 - 3) // 2 + 1
        self.features = nn.Sequential(*convs)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(channels * size, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)  # (N, L) -> (N, 1, L)
        return self.head(self.fc(self.features(x)))


@MODELS.register("cnn1d")
def cnn1d(input_shape: tuple[int, ...], num_classes: int, channels: int = 32, layers: int = 3,
          hidden: int = 64, dropout: float = 0.0) -> nn.Module:
    """1-D CNN for MNIST-1D (in the spirit of Greydanus 2020's ConvBase), sized by arguments."""
    return CNN1d(input_shape[-1], num_classes, channels, layers, hidden, dropout)


class CNN2d(nn.Module):
    """Two 3x3 conv blocks (conv, BN, ReLU; max-pool after the first) and a linear ``head``."""

    def __init__(self, in_channels: int, num_classes: int, channels: int):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.BatchNorm2d(2 * channels), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, classes)
        return self.head(self.pool(self.block2(self.block1(x))).flatten(1))


@MODELS.register("cnn2d")
def cnn2d(input_shape: tuple[int, ...], num_classes: int, channels: int = 16) -> nn.Module:
    """Small 2-D CNN for 8x8 digits (input (N, C, H, W))."""
    if len(input_shape) != 3:
        raise ValueError(f"cnn2d needs (C, H, W) inputs, got shape {input_shape}")
    return CNN2d(input_shape[0], num_classes, channels)
