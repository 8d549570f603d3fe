"""Calibration of a classifier's softmax: expected calibration error and reliability bins.

Guo et al. 2017, "On Calibration of Modern Neural Networks", eq. 3 and fig. 1. With M
equal-width bins B_m = ((m-1)/M, m/M] over the confidence conf_i = max_c p_ic::

    ECE = sum_m |B_m| / N * |acc(B_m) - conf(B_m)|

where acc(B_m) is the fraction of samples in the bin whose argmax is the target and conf(B_m)
their mean confidence. Bins are closed on the right as in the paper (a confidence of exactly
0.6 with M=5 falls in (0.4, 0.6]); a confidence of 0 (impossible for a softmax) goes in the
first bin. Pure functions; numpy arrays or torch tensors of any float dtype are accepted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import DistilleryError


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, possibly on GPU or in bf16
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()
        x = x.numpy()
    return np.asarray(x)


def _check(probs: Any, targets: Any, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    p = _as_numpy(probs).astype(np.float64, copy=False)
    t = _as_numpy(targets)
    if p.ndim != 2:
        raise DistilleryError(
            f"probs must have shape (N, C), got {p.shape}; pass softmax probabilities, one row per sample."
        )
    if t.shape != (p.shape[0],):
        raise DistilleryError(
            f"targets must have shape ({p.shape[0]},) to match probs {p.shape}, got {t.shape}; pass one class index per row."
        )
    if p.shape[0] == 0:
        raise DistilleryError("calibration needs at least one sample; got empty probs and targets.")
    if not (isinstance(n_bins, (int, np.integer)) and n_bins >= 1):
        raise DistilleryError(f"n_bins must be a positive integer, got {n_bins!r}.")
    return p, t.astype(np.int64, copy=False)


def reliability(probs: Any, targets: Any, n_bins: int = 15) -> dict[str, Any]:
    """Per-bin accuracy, mean confidence and count over equal-width confidence bins.

    Shapes: probs (N, C), targets (N,). Returns numpy arrays::

        {"edges": (n_bins + 1,) float, "accuracy": (n_bins,) float, "confidence": (n_bins,) float,
         "count": (n_bins,) int64, "ece": float}

    ``accuracy`` and ``confidence`` are NaN in empty bins; ``count`` sums to N.
    """
    p, t = _check(probs, targets, n_bins)
    conf = p.max(axis=1)  # (N,)
    correct = (p.argmax(axis=1) == t).astype(np.float64)  # (N,)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted(side="left") gives the first edge >= conf, so edges[k-1] < conf <= edges[k] -> bin k-1.
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)  # (N,)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(count > 0, acc_sum / count, np.nan)
        confidence = np.where(count > 0, conf_sum / count, np.nan)
    nonempty = count > 0
    gap = np.abs(accuracy[nonempty] - confidence[nonempty])
    ece_value = float(np.sum(count[nonempty] / p.shape[0] * gap))
    return {"edges": edges, "accuracy": accuracy, "confidence": confidence, "count": count, "ece": ece_value}


def ece(probs: Any, targets: Any, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017), a fraction in [0, 1]. Shapes: (N, C), (N,) -> float."""
    return reliability(probs, targets, n_bins)["ece"]
