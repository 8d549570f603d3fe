"""Regression losses of diffusion step distillation: the student's output against a target the method
computed for the batch (``batch["target"]``: a denoising target, a progressive-distillation target, an
EMA consistency target, a DMD / SDS / VSD regression point). Shapes: prediction and target (N, ...)
of equal shape -> scalar batch mean, or (N,) with ``reduction="none"``. Each sample's value is the
mean over its elements, so a loss does not grow with the image size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import register
from .logits import LossInputError


def _rows(pred: Tensor, target: Tensor, name: str) -> Tensor:
    if pred.shape != target.shape:
        raise LossInputError(f"{name}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape; "
                             "the method's target must match the student's output.")
    return (pred.float() - target.float()).flatten(1)


def _reduce(rows: Tensor, reduction: str, mask: Tensor | None) -> Tensor:
    if mask is not None:
        rows = rows[mask]
    if reduction == "none":
        return rows
    if reduction not in ("mean", "sum"):
        raise LossInputError(f"reduction must be mean, sum or none, got {reduction!r}.")
    if rows.numel() == 0:
        return rows.sum()  # every row masked: 0, with a gradient path
    return rows.mean() if reduction == "mean" else rows.sum()


@register("diffusion_l2", batch_keys=("target",))
def diffusion_l2(pred: Tensor, _teacher: Tensor | None = None, *, target: Tensor, mask: Tensor | None = None,
                 reduction: str = "mean") -> Tensor:
    """Mean squared error to the method's target (Ho et al. 2020's simple loss; progressive distillation,
    Salimans & Ho 2022; the DMD / SDS / VSD regression ``0.5 ||x - sg(x - grad)||^2`` up to the factor):

        L_i = mean_j (pred_ij - target_ij)^2
    """
    return _reduce((_rows(pred, target, "diffusion_l2") ** 2).mean(1), reduction, mask)


@register("pseudo_huber", batch_keys=("target",))
def pseudo_huber(pred: Tensor, _teacher: Tensor | None = None, *, target: Tensor, c: float = 0.001,
                 mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """The pseudo-Huber metric of improved consistency training (Song & Dhariwal 2023), per sample:

        L_i = sqrt(mean_j (pred_ij - target_ij)^2 + c^2) - c

    which is Song & Dhariwal's sqrt(||d||^2 + c'^2) - c' divided by sqrt(D) with c' = c sqrt(D) (they use
    c' = 0.00054 sqrt(D)). diffusers' LCM script applies the same function per element (then the mean);
    this follows the paper. ``c`` defaults to diffusers' ``huber_c`` (0.001)."""
    if c <= 0:
        raise LossInputError(f"pseudo_huber: c must be > 0, got {c}.")
    sq = (_rows(pred, target, "pseudo_huber") ** 2).mean(1)
    return _reduce(torch.sqrt(sq + c * c) - c, reduction, mask)


@register("fake_score_l2", batch_keys=("fake_target",))
def fake_score_l2(pred: Tensor, _teacher: Tensor | None = None, *, fake_target: Tensor, mask: Tensor | None = None,
                  reduction: str = "mean") -> Tensor:
    """The fake-score model's denoising loss on the generator's samples (DMD's mu_fake, VSD's epsilon_phi):
    ``diffusion_l2`` against ``batch["fake_target"]``."""
    return _reduce((_rows(pred, fake_target, "fake_score_l2") ** 2).mean(1), reduction, mask)
