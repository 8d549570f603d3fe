"""MLP, 1-D CNN (MNIST-1D) and small 2-D CNN (digits)."""

from __future__ import annotations

import math

import torch
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

    def __init__(self, length: int, num_classes: int, channels: int, layers: int, hidden: int, dropout: float,
                 batch_norm: bool = False):
        super().__init__()
        convs: list[nn.Module] = []
        c_in, size = 1, length
        for i in range(layers):
            stride = 1 if i == 0 else 2
            convs.append(nn.Conv1d(c_in, channels, 5 if i == 0 else 3, stride=stride, padding=2 if i == 0 else 1))
            convs += [nn.BatchNorm1d(channels), nn.ReLU()] if batch_norm else [nn.ReLU()]
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
          hidden: int = 64, dropout: float = 0.0, batch_norm: bool = False) -> nn.Module:
    """1-D CNN for MNIST-1D (in the spirit of Greydanus 2020's ConvBase), sized by arguments;
    ``batch_norm`` puts a BatchNorm1d after every conv (what data-free KD's BN prior matches)."""
    return CNN1d(input_shape[-1], num_classes, channels, layers, hidden, dropout, batch_norm)


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


class PatchTransformer(nn.Module):
    """A small transformer over non-overlapping patches of a 1-D signal: (N, L) -> tokens (N, T, D)
    in ``blocks.i`` (T = L / patch) -> mean over tokens -> ``head``. For token-level feature terms."""

    def __init__(self, length: int, num_classes: int, patch: int, dim: int, depth: int, heads: int):
        super().__init__()
        if length % patch:
            raise ValueError(f"patch_transformer: signal length {length} is not a multiple of patch {patch}")
        self.patch = patch
        self.embed = nn.Linear(patch, dim)
        self.pos = nn.Parameter(torch.zeros(1, length // patch, dim))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1, self.patch)  # (N, L) -> (N, T, patch)
        h = self.embed(x) + self.pos  # (N, T, D)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


@MODELS.register("patch_transformer")
def patch_transformer(input_shape: tuple[int, ...], num_classes: int, patch: int = 4, dim: int = 32,
                      depth: int = 2, heads: int = 4) -> nn.Module:
    """Transformer over MNIST-1D patches (40 samples / patch 4 = 10 tokens)."""
    return PatchTransformer(input_shape[-1], num_classes, patch, dim, depth, heads)
