"""Differentiable Siamese augmentation (DSA; Zhao & Bilen, ICML 2021; VICO-UoE/DatasetCondensation
``utils.py``: ``DiffAugment``, ``ParamDiffAug``).

``dsa(x, seed)`` draws, from ``seed`` alone, one operation of the strategy (DSA's single mode
``aug_mode='S'``) and one set of its parameters shared by the whole batch (DSA's ``Siamese``
option), and applies it differentiably. Calling it with the same seed on the real and the
synthetic batch applies the same transform to both, whatever their sizes. Parameters are DSA's
``ParamDiffAug``: scale ratio 1.2, rotation 15 degrees, translation 1/8 of the side, cutout half
the side, brightness 1.0, saturation 2.0, contrast 0.5. The default strategy for digits leaves
out ``flip`` (a flipped digit is another glyph); DSA's own default includes it.

1-D signals (MNIST-1D) are images of height 1, (N, C, 1, W). On them ``crop`` and ``cutout`` act
along the signal, ``scale`` stretches time only, ``color`` shifts and scales the amplitude (its
saturation step averages channels, a no-op for one channel), and ``rotate`` is refused: a signal
has no rotation. Their default strategy is ``SIGNALS``, which also leaves out ``cutout``: half of a
40-sample MNIST-1D signal erases most of its pattern (measured here: a ConvNet trained 20 epochs
on the whole set reached 37 % with cutout alone, 61 to 68 % with scale, crop and color or none).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DistilleryError

OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DIGITS = ("color", "crop", "cutout", "scale", "rotate")
SIGNALS = ("color", "crop", "scale")
SCALE, ROTATE, CROP, CUTOUT = 1.2, 15.0, 0.125, 0.5
BRIGHTNESS, SATURATION, CONTRAST = 1.0, 2.0, 0.5


def _no_rotation() -> DistilleryError:
    return DistilleryError(f"DSA 'rotate' is undefined on 1-D signals (height 1); leave it out of the strategy, "
                           f"e.g. {list(SIGNALS)}.")


def default_strategy(shape: tuple[int, ...]) -> tuple[str, ...]:
    """``SIGNALS`` for height-1 data (C, 1, W), else ``DIGITS``."""
    return SIGNALS if shape[-2] == 1 else DIGITS


def check_strategy(strategy: tuple[str, ...] | list[str] | None, shape: tuple[int, ...]) -> tuple[str, ...]:
    """The strategy for data of ``shape`` (C, H, W) as a tuple (None: ``default_strategy(shape)``);
    unknown operations, and ``rotate`` on 1-D signals, are refused."""
    if strategy is None:
        return default_strategy(shape)
    bad = [s for s in strategy if s not in OPS]
    if bad or not strategy:
        raise DistilleryError(f"unknown DSA operations {bad} (or none given); choose from {', '.join(OPS)}.")
    if shape[-2] == 1 and "rotate" in strategy:
        raise _no_rotation()
    return tuple(strategy)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    theta = theta.to(x.device, x.dtype)
    if x.shape[2] == 1:  # a signal: the grid along its one row, y = 0 (affine_grid warns on unit height)
        xs = torch.linspace(-1.0, 1.0, x.shape[3], dtype=x.dtype, device=x.device)
        grid = torch.stack([theta[0, 0] * xs + theta[0, 2], theta[1, 0] * xs + theta[1, 2]], -1)
        return F.grid_sample(x, grid.expand(x.shape[0], 1, -1, 2), align_corners=True)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def dsa(x: Tensor, seed: int, strategy: tuple[str, ...] | None = None) -> Tensor:
    """One seeded, batch-shared, differentiable augmentation of ``x`` (N, C, H, W); strategy None:
    ``default_strategy`` of ``x``'s shape."""
    if strategy is None:
        strategy = default_strategy(tuple(x.shape))
    g = torch.Generator().manual_seed(int(seed))
    op = strategy[int(torch.randint(len(strategy), (1,), generator=g))]
    r = torch.rand(4, generator=g, dtype=torch.float64).tolist()
    if op == "scale":
        sx, sy = (r[0] * (SCALE - 1 / SCALE) + 1 / SCALE), (r[1] * (SCALE - 1 / SCALE) + 1 / SCALE)
        if x.shape[2] == 1:  # a signal stretches in time only
            sy = 1.0
        return _affine(x, torch.tensor([[sx, 0.0, 0.0], [0.0, sy, 0.0]]))
    if op == "rotate":
        if x.shape[2] == 1:
            raise _no_rotation()
        a = (r[0] - 0.5) * 2 * ROTATE / 180 * math.pi
        return _affine(x, torch.tensor([[math.cos(a), math.sin(-a), 0.0], [math.sin(a), math.cos(a), 0.0]]))
    if op == "crop":  # translation by up to 1/8 of the side, zero padding (DSA's rand_crop)
        h, w = x.shape[2:]
        dx = round((r[0] * 2 - 1) * CROP * h)
        dy = round((r[1] * 2 - 1) * CROP * w)
        padded = F.pad(x, (abs(dy), abs(dy), abs(dx), abs(dx)))
        return padded[:, :, abs(dx) - dx: abs(dx) - dx + h, abs(dy) - dy: abs(dy) - dy + w]
    if op == "cutout":
        h, w = x.shape[2:]
        ch, cw = int(h * CUTOUT + 0.5), int(w * CUTOUT + 0.5)
        cy, cx = int(r[0] * (h + 1 - ch % 2)), int(r[1] * (w + 1 - cw % 2))
        mask = torch.ones(h, w, dtype=x.dtype, device=x.device)
        mask[max(0, cy - ch // 2): cy + ch // 2 + ch % 2, max(0, cx - cw // 2): cx + cw // 2 + cw % 2] = 0
        return x * mask
    if op == "flip":
        return x.flip(3) if r[0] < 0.5 else x
    # color: brightness, saturation, contrast in turn (DSA's 'color' group)
    x = x + (r[0] - 0.5) * BRIGHTNESS
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * (r[1] * SATURATION) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (r[2] + CONTRAST) + mean
