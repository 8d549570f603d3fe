"""Differentiable Siamese augmentation (DSA; Zhao & Bilen, ICML 2021; VICO-UoE/DatasetCondensation
``utils.py``: ``DiffAugment``, ``ParamDiffAug``).

``dsa(x, seed)`` draws, from ``seed`` alone, one operation of the strategy (DSA's single mode
``aug_mode='S'``) and one set of its parameters shared by the whole batch (DSA's ``Siamese``
option), and applies it differentiably. Calling it with the same seed on the real and the
synthetic batch applies the same transform to both, whatever their sizes. Parameters are DSA's
``ParamDiffAug``: scale ratio 1.2, rotation 15 degrees, translation 1/8 of the side, cutout half
the side, brightness 1.0, saturation 2.0, contrast 0.5. The default strategy for digits leaves
out ``flip`` (a flipped digit is another glyph); DSA's own default includes it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DistilleryError

OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DIGITS = ("color", "crop", "cutout", "scale", "rotate")
SCALE, ROTATE, CROP, CUTOUT = 1.2, 15.0, 0.125, 0.5
BRIGHTNESS, SATURATION, CONTRAST = 1.0, 2.0, 0.5


def check_strategy(strategy: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    bad = [s for s in strategy if s not in OPS]
    if bad or not strategy:
        raise DistilleryError(f"unknown DSA operations {bad} (or none given); choose from {', '.join(OPS)}.")
    return tuple(strategy)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3).to(x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def dsa(x: Tensor, seed: int, strategy: tuple[str, ...] = DIGITS) -> Tensor:
    """One seeded, batch-shared, differentiable augmentation of ``x`` (N, C, H, W)."""
    g = torch.Generator().manual_seed(int(seed))
    op = strategy[int(torch.randint(len(strategy), (1,), generator=g))]
    r = torch.rand(4, generator=g, dtype=torch.float64).tolist()
    if op == "scale":
        sx, sy = (r[0] * (SCALE - 1 / SCALE) + 1 / SCALE), (r[1] * (SCALE - 1 / SCALE) + 1 / SCALE)
        return _affine(x, torch.tensor([[sx, 0.0, 0.0], [0.0, sy, 0.0]]))
    if op == "rotate":
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
        mask = torch.ones(h, w, dtype=x.dtype)
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
