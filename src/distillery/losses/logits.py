"""Logit (response) distillation losses: pure functions over (N, C) logits, registered by name.

Every loss here has the signature::

    fn(student_logits: Tensor[N, C], teacher_logits: Tensor[N, C], *,
       targets: Tensor[N] | None = None, mask: Tensor[N] | None = None,
       reduction: str = "mean", **params) -> Tensor

- Rows are samples (or tokens: flatten (B, T, V) to (B*T, V) first); columns are classes.
- ``targets``: int class indices (N,). Needed by ``dkd``, ``pld`` and ``ce``; on unlabelled data
  the objective can pass the teacher's argmax. In every loss a target of -100 (PyTorch's
  ``ignore_index``) marks the row as masked.
- ``mask``: bool (N,), True where the row counts. Masked rows are zeroed before the loss sees
  them, so padding garbage (even inf/NaN) reaches neither the value nor the gradient.
- ``reduction``: ``"mean"`` (sum over valid rows / number of valid rows; no valid row gives an
  exact 0 that still has a grad path), ``"sum"`` (sum over valid rows) or ``"none"`` (per-row
  (N,), masked rows 0). One helper, ``_reduce``, does this for every loss.
- ``params`` are the loss's own keyword-only parameters (temperature, alpha, beta, ...); a
  misspelt one raises TypeError, an out-of-range one ``LossInputError``.
- Computation runs in float32 (half and bfloat16 are upcast; float64 stays float64), in log
  space throughout, so logits of +-1e4 stay finite and no ``0 * log 0`` appears.
- Temperature: ``kd``, ``dkd``, ``dist`` and ``kd_standardized`` multiply by tau^2 as their
  reference code does; ``pld`` softens only the teacher's weights (as the paper does); the rest
  divide both logits by tau and do not rescale.
- Gradients flow to both inputs; the teacher is not detached here (compute it under
  ``no_grad``), so online regimes can choose for themselves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DistilleryError
from . import register
from .sparse import TopK, student_buckets

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum", "none")


class LossInputError(DistilleryError, ValueError):
    """A loss got input it cannot use (shapes, dtypes, missing targets, parameter range)."""


# ---------------------------------------------------------------------------------------------
# validation


def _check_logits(loss: str, name: str, x: object) -> None:
    if not isinstance(x, Tensor):
        raise LossInputError(
            f"{loss}: {name} must be a torch.Tensor of shape (N, C), got {type(x).__name__}."
        )
    if x.dim() != 2:
        raise LossInputError(
            f"{loss}: {name} must be 2-D (N, C), got shape {tuple(x.shape)}; "
            "flatten (B, T, V) logits to (B*T, V) first."
        )
    if not x.is_floating_point():
        raise LossInputError(f"{loss}: {name} must be floating point, got {x.dtype}.")


def _check_mask(loss: str, mask: object, n: int) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (n,):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise LossInputError(
            f"{loss}: mask must be a bool tensor of shape ({n},) (True = row counts), got {got}."
        )
    return mask


def _check_targets(loss: str, targets: object, n: int, c: int) -> Tensor:
    if not isinstance(targets, Tensor) or tuple(targets.shape) != (n,):
        got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise LossInputError(f"{loss}: targets must be class indices of shape ({n},), got {got}.")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise LossInputError(
            f"{loss}: targets must be an integer tensor of class indices, got {targets.dtype}."
        )
    bad = ((targets < 0) | (targets >= c)) & (targets != IGNORE_INDEX)
    if bool(bad.any()):
        raise LossInputError(
            f"{loss}: targets must lie in [0, {c}) or be {IGNORE_INDEX} (masked row); "
            f"got {targets[bad][:5].tolist()}."
        )
    return targets.long()


def _positive(loss: str, name: str, value: float) -> float:
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise LossInputError(f"{loss}: {name} must be a finite number > 0, got {value!r}.")
    return v


def _unit(loss: str, name: str, value: float) -> float:
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise LossInputError(f"{loss}: {name} must lie in [0, 1], got {value!r}.")
    return v


def _prepare(
    loss: str,
    student: Tensor,
    teacher: Tensor | None,
    *,
    targets: Tensor | None,
    mask: Tensor | None,
    reduction: str,
    needs_targets: bool = False,
    min_classes: int = 1,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Validate, upcast to float32, fold -100 targets into the mask, zero masked rows.

    Returns (student (N, C), teacher (N, C) or None, targets (N,) int64 or None, mask (N,) or None);
    masked rows of targets are set to 0 so they can index.
    """
    if reduction not in REDUCTIONS:
        raise LossInputError(
            f"{loss}: unknown reduction {reduction!r}; use one of {', '.join(map(repr, REDUCTIONS))}."
        )
    _check_logits(loss, "student_logits", student)
    if teacher is not None:
        _check_logits(loss, "teacher_logits", teacher)
        if teacher.shape != student.shape:
            raise LossInputError(
                f"{loss}: student_logits has shape {tuple(student.shape)} but teacher_logits has shape "
                f"{tuple(teacher.shape)}; both must be the same (N, C)."
            )
    n, c = student.shape
    if c < min_classes:
        raise LossInputError(f"{loss} needs at least {min_classes} classes, got C={c}.")
    valid = _check_mask(loss, mask, n)
    if targets is None and needs_targets:
        raise LossInputError(
            f"{loss} needs `targets` (class indices, shape ({n},)). On unlabelled data the objective "
            "can pass the teacher's argmax: targets=teacher_logits.argmax(-1)."
        )
    if targets is not None:
        targets = _check_targets(loss, targets, n, c)
        labelled = targets != IGNORE_INDEX
        valid = labelled if valid is None else valid & labelled
        targets = targets.masked_fill(~labelled, 0)
    dtype = torch.promote_types(student.dtype, torch.float32)
    if teacher is not None:
        dtype = torch.promote_types(dtype, teacher.dtype)
    s = student.to(dtype)
    t = teacher.to(dtype) if teacher is not None else None
    if valid is not None:  # padding rows may hold anything; keep it out of forward and backward
        keep = valid.unsqueeze(-1)
        s = torch.where(keep, s, 0.0)
        t = torch.where(keep, t, 0.0) if t is not None else None
    return s, t, targets, valid


# ---------------------------------------------------------------------------------------------
# shared pieces


def _reduce(rows: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    """Per-row losses (N,) -> masked mean / sum / per-row. No valid row: an exact 0 with grad path."""
    if mask is not None:
        rows = torch.where(mask, rows, 0.0)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    count = mask.sum().clamp(min=1) if mask is not None else max(rows.numel(), 1)
    return total / count


def _log_probs(z: Tensor, temperature: float) -> Tensor:
    """log softmax(z / tau) over classes, (N, C) -> (N, C)."""
    return F.log_softmax(z / temperature, dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row from log-probs, (N, C) -> (N,); classes with p = 0 add exactly 0."""
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, 0.0)  # where() before the product: no 0 * inf in backward
    return (p * diff).sum(-1)


def _log_mix(log_p: Tensor, log_q: Tensor, w: float) -> Tensor:
    """log(w * p + (1 - w) * q) in log space, w in [0, 1]. Classes where both are -inf (a padded
    vocabulary masked in both models) give -inf with a zero gradient: ``logaddexp``'s own backward is
    NaN at (-inf, -inf), and that NaN would reach every class through the softmax."""
    if w == 0.0:
        return log_q
    if w == 1.0:
        return log_p
    a, b = log_p + math.log(w), log_q + math.log1p(-w)
    both = torch.isneginf(a) & torch.isneginf(b)  # no host sync: the masked form always
    out = torch.logaddexp(torch.where(both, 0.0, a), torch.where(both, 0.0, b))
    return torch.where(both, float("-inf"), out)


def _non_target_index(targets: Tensor, c: int) -> Tensor:
    """Column indices of every class but the target, (N,) -> (N, C-1), in class order."""
    cols = torch.arange(c - 1, device=targets.device)
    return cols + (cols >= targets.unsqueeze(-1)).long()


# ---------------------------------------------------------------------------------------------
# divergences on softened distributions


@register("kd", reads_logits=True, row_wise=True, accepts_sparse=True)
def kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    targets: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
    temperature: float = 4.0,
) -> Tensor:
    """Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS DL workshop 2015.

    tau^2 * KL(softmax(t / tau) || softmax(s / tau)) per row, summed over classes (never averaged
    over them), then reduced over rows. tau^2 keeps gradient scale independent of tau (paper and
    mdistiller). Shapes: (N, C), (N, C) -> scalar, or (N,) with reduction="none".
    """
    tau = _positive("kd", "temperature", temperature)
    if isinstance(teacher_logits, TopK):
        return _kd_sparse(student_logits, teacher_logits, mask, reduction, tau)
    s, t, _, mask = _prepare(
        "kd", student_logits, teacher_logits, targets=targets, mask=mask, reduction=reduction
    )
    rows = tau**2 * _kl(_log_probs(t, tau), _log_probs(s, tau))
    return _reduce(rows, mask, reduction)




def _kd_sparse(student_logits: Tensor, teacher: TopK, mask: Tensor | None, reduction: str, tau: float) -> Tensor:
    """kd against a sparse teacher (``TopK``): tau^2 * sum over buckets b of p_t,b (log p_t,b - log p_s,b),
    the teacher re-tempered from its stored temperature to tau, the student's buckets from its full softmax."""
    if reduction not in REDUCTIONS:
        raise LossInputError(f"kd: unknown reduction {reduction!r}; use one of {', '.join(map(repr, REDUCTIONS))}.")
    _check_logits("kd", "student_logits", student_logits)
    if tuple(student_logits.shape) != teacher.shape:
        raise LossInputError(f"kd: student_logits has shape {tuple(student_logits.shape)} but the sparse teacher "
                             f"covers {teacher.shape}; both must be the same (N, C).")
    mask = _check_mask("kd", mask, len(teacher))
    s = student_logits if mask is None else torch.where(mask.unsqueeze(-1), student_logits, 0.0)
    log_t = teacher.retemper(tau).buckets()
    if mask is not None:  # masked rows may hold anything; keep them out of value and gradient
        log_t = torch.where(mask.unsqueeze(-1), log_t, -math.log(log_t.shape[1]))
    log_s = student_buckets(s, teacher, tau)
    rows = tau**2 * _kl(log_t, log_s)
    return _reduce(rows, mask, reduction)


@register("reverse_kl", reads_logits=True, row_wise=True)
def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    targets: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
    temperature: float = 1.0,
) -> Tensor:
    """Reverse KL, KL(p_s || p_t) with p = softmax(z / tau); no tau^2 rescaling.

    Mode-seeking objective of MiniLLM (Gu, Dong, Wei & Huang, ICLR 2024), here token/row-level
    (MiniLLM optimises the sequence-level version with policy gradients).
    Shapes: (N, C), (N, C) -> scalar, or (N,) with reduction="none".
    """
    tau = _positive("reverse_kl", "temperature", temperature)
    s, t, _, mask = _prepare(
        "reverse_kl", student_logits, teacher_logits, targets=targets, mask=mask, reduction=reduction
    )
    rows = _kl(_log_probs(s, tau), _log_probs(t, tau))
    return _reduce(rows, mask, reduction)


@register("generalized_jsd", reads_logits=True, row_wise=True)
def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    targets: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Generalised JSD of GKD (Agarwal et al., "On-Policy Distillation of Language Models", ICLR 2024).

    m = beta * p_t + (1 - beta) * p_s;  loss = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m),
    with p = softmax(z / tau) and no tau^2. The formula tends to 0 at both ends; like TRL's
    ``generalized_jsd_loss`` we take beta = 0 as KL(p_t || p_s) and beta = 1 as KL(p_s || p_t).
    log m is a logaddexp of log(beta) + log p_t and log(1 - beta) + log p_s.
    Shapes: (N, C), (N, C) -> scalar, or (N,) with reduction="none".
    """
    b = _unit("generalized_jsd", "beta", beta)
    tau = _positive("generalized_jsd", "temperature", temperature)
    s, t, _, mask = _prepare(
        "generalized_jsd", student_logits, teacher_logits, targets=targets, mask=mask, reduction=reduction
    )
    log_t, log_s = _log_probs(t, tau), _log_probs(s, tau)
    if b == 0.0:
        rows = _kl(log_t, log_s)
    elif b == 1.0:
        rows = _kl(log_s, log_t)
    else:
        log_m = _log_mix(log_t, log_s, b)
        rows = b * _kl(log_t, log_m) + (1.0 - b) * _kl(log_s, log_m)
    return _reduce(rows, mask, reduction)


@register("skew_kl", reads_logits=True, row_wise=True)
def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    targets: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """Skew KL of DistiLLM (Ko, Kim, Chen & Yun, ICML 2024): KL(p_t || alpha p_t + (1 - alpha) p_s).

    p = softmax(z / tau), no tau^2. We follow the paper's KL; DistiLLM's ``skewed_forward_kl``
    returns the cross-entropy -sum p_t log m, which differs by the teacher entropy (a constant
    for the student, so same gradients). alpha = 0 is forward KL, alpha = 1 gives 0.
    Shapes: (N, C), (N, C) -> scalar, or (N,) with reduction="none".
    """
    a = _unit("skew_kl", "alpha", alpha)
    tau = _positive("skew_kl", "temperature", temperature)
    s, t, _, mask = _prepare(
        "skew_kl", student_logits, teacher_logits, targets=targets, mask=mask, reduction=reduction
    )
    log_t = _log_probs(t, tau)
    rows = _kl(log_t, _log_mix(log_t, _log_probs(s, tau), a))
    return _reduce(rows, mask, reduction)


@register("skew_reverse_kl", reads_logits=True, row_wise=True)
def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    targets: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """Skew reverse KL of DistiLLM (Ko et al., ICML 2024): KL(p_s || alpha p_s + (1 - alpha) p_t).

    p = softmax(z / tau), no tau^2; matches DistiLLM's ``skewed_reverse_kl`` (which, unlike its
    forward variant, keeps the entropy term). alpha = 0 is reverse KL, alpha = 1 gives 0.
    Shapes: (N, C), (N, C) -> scalar, or (N,) with reduction="none".
    """
    a = _unit("skew_reverse_kl", "alpha", alpha)
    tau = _positive("skew_reverse_kl", "temperature", temperature)
    s, t, _, mask = _prepare(
        "skew_reverse_kl", student_logits, teacher_logits, targets=targets, mask=mask, reduction=reduction
    )
    log_s = _log_probs(s, tau)
    rows = _kl(log_s, _log_mix(log_s, _log_probs(t, tau), a))
    return _reduce(rows, mask, reduction)


@register("tvd", reads_logits=True, row_wise=True)
def tvd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    targets: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
    temperature: float = 1.0,
) -> Tensor:
    """Total variation distance 0.5 * sum_c |p_t - p_s|, p = softmax(z / tau), no tau^2.

    As DistiLLM's ``tv_distance`` (Ko et al., ICML 2024); 1 - TVD is the expected acceptance rate
    of speculative decoding (Leviathan et al., ICML 2023). Bounded in [0, 1].
    Shapes: (N, C), (N, C) -> scalar, or (N,) with reduction="none".
    """
    tau = _positive("tvd", "temperature", temperature)
    s, t, _, mask = _prepare(
        "tvd", student_logits, teacher_logits, targets=targets, mask=mask, reduction=reduction
    )
    rows = 0.5 * (_log_probs(t, tau).exp() - _log_probs(s, tau).exp()).abs().sum(-1)
    return _reduce(rows, mask, reduction)


# ---------------------------------------------------------------------------------------------
# methods from specific papers


def _binary_log_probs(log_p: Tensor, targets: Tensor) -> Tensor:
    """(log p_y, log(1 - p_y)) per row, (N, C) -> (N, 2); 1 - p_y as a logsumexp of the rest."""
    c = log_p.shape[-1]
    log_target = log_p.gather(-1, targets.unsqueeze(-1))
    log_rest = log_p.gather(-1, _non_target_index(targets, c)).logsumexp(-1, keepdim=True)
    return torch.cat([log_target, log_rest], dim=-1)


@register("dkd", reads_logits=True, row_wise=True, needs_targets=True)
def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    targets: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """Decoupled KD (Zhao, Cui, Song, Qiu & Liang, CVPR 2022): tau^2 * (alpha TCKD + beta NCKD).

    TCKD = KL(b_t || b_s) with b = (p_y, 1 - p_y); NCKD = KL between the distributions over the
    non-target classes, renormalised; p = softmax(z / tau). Needs ``targets``.
    Follows mdistiller's ``dkd_loss`` (both terms tau^2-scaled, summed over classes, batch mean)
    with two numerical differences: 1 - p_y is a logsumexp of the non-target log-probs (no
    ``log`` of a probability that can be 0), and NCKD drops the target column exactly where
    mdistiller subtracts 1000 from z_y / tau. The two agree to float precision unless
    |z / tau| spans ~1000, where the -1000 trick would leak target mass into NCKD.
    Shapes: (N, C), (N, C), targets (N,) -> scalar, or (N,) with reduction="none".
    """
    tau = _positive("dkd", "temperature", temperature)
    s, t, y, mask = _prepare(
        "dkd",
        student_logits,
        teacher_logits,
        targets=targets,
        mask=mask,
        reduction=reduction,
        needs_targets=True,
        min_classes=2,
    )
    tckd = _kl(_binary_log_probs(_log_probs(t, tau), y), _binary_log_probs(_log_probs(s, tau), y))
    rest = _non_target_index(y, s.shape[-1])  # (N, C-1)
    nckd = _kl(_log_probs(t.gather(-1, rest), tau), _log_probs(s.gather(-1, rest), tau))
    rows = tau**2 * (alpha * tckd + beta * nckd)
    return _reduce(rows, mask, reduction)


def _pearson(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of matching rows, (R, K), (R, K) -> (R,); eps as in DIST_KD."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
    return (a * b).sum(-1) / (norms + eps)


@register("dist", reads_logits=True)
def dist(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    targets: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    """DIST (Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

    y = softmax(z / tau); inter = mean_i [1 - Pearson(y_s[i, :], y_t[i, :])] (over classes),
    intra = mean_j [1 - Pearson(y_s[:, j], y_t[:, j])] (over the batch);
    loss = tau^2 * (beta * inter + gamma * intra). Follows hunto/DIST_KD: the tau^2 factor and
    Pearson = cov / (|a| |b| + 1e-8). The intra term couples rows, so ``reduction="none"`` raises;
    masked rows are dropped before both terms. "sum" returns (number of valid rows) x "mean", so
    sum / count is the mean as for the other losses. A batch of one row has intra = 1 (no
    variation over the batch), as in the reference.
    Shapes: (N, C), (N, C) -> scalar.
    """
    if reduction == "none":
        raise LossInputError(
            "dist: reduction='none' is not available because DIST's intra-class term correlates each "
            "class over the whole batch, so the loss does not split into per-row values; use 'mean' or 'sum'."
        )
    tau = _positive("dist", "temperature", temperature)
    s, t, _, mask = _prepare(
        "dist", student_logits, teacher_logits, targets=targets, mask=mask, reduction=reduction
    )
    if mask is not None:
        if not bool(mask.any()):
            return _reduce(s.sum(-1), mask, reduction)  # exact 0, with a grad path
        s, t = s[mask], t[mask]
    y_s, y_t = _log_probs(s, tau).exp(), _log_probs(t, tau).exp()
    inter = 1.0 - _pearson(y_s, y_t)  # (n,)
    intra = 1.0 - _pearson(y_s.T, y_t.T).mean()  # scalar
    rows = tau**2 * (beta * inter + gamma * intra)  # row mean = the DIST value
    return _reduce(rows, None, reduction)


def _standardize(z: Tensor, eps: float = 1e-7) -> Tensor:
    """(z - mean) / (std + eps) per row, unbiased std, as ``normalize`` in logit-standardization-KD."""
    centred = z - z.mean(-1, keepdim=True)
    var = centred.pow(2).sum(-1, keepdim=True) / (z.shape[-1] - 1)
    std = var.clamp_min(1e-30).sqrt()  # clamp: finite gradient on constant rows (torch.std gives NaN)
    return centred / (std + eps)


@register("kd_standardized", reads_logits=True, row_wise=True)
def kd_standardized(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    targets: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
    temperature: float = 2.0,
) -> Tensor:
    """KD after logit standardisation (Sun, Ren, Li, Wang & Cao, "Logit Standardization in KD", CVPR 2024).

    z -> (z - mean(z)) / (std(z) + 1e-7) per row for student and teacher, then
    tau^2 * KL(softmax(z_t' / tau) || softmax(z_s' / tau)) with the base temperature tau.
    Follows the authors' code (sunshangquan/logit-standardization-KD, ``KD.py``): unbiased
    ``torch.std`` (divides by C - 1), eps = 1e-7 added to the std, and the tau^2 factor. The
    loss is invariant to a per-row shift and positive scale of either input. Needs C >= 2.
    Shapes: (N, C), (N, C) -> scalar, or (N,) with reduction="none".
    """
    tau = _positive("kd_standardized", "temperature", temperature)
    s, t, _, mask = _prepare(
        "kd_standardized",
        student_logits,
        teacher_logits,
        targets=targets,
        mask=mask,
        reduction=reduction,
        min_classes=2,
    )
    rows = tau**2 * _kl(_log_probs(_standardize(t), tau), _log_probs(_standardize(s), tau))
    return _reduce(rows, mask, reduction)


@register("pld", reads_logits=True, row_wise=True, needs_targets=True)
def pld(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    targets: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
    temperature: float = 1.0,
) -> Tensor:
    """Plackett-Luce Distillation (Bassam, Zhu & Bian, "PLD: A Choice-Theoretic List-Wise KD", arXiv:2506.12542, 2025).

    Ranking pi* = (true label, then the other classes by descending teacher logit). Loss per row
        sum_k q_{pi*_k} * [logsumexp(s_{pi*_k}, ..., s_{pi*_C}) - s_{pi*_k}],
    q = softmax(t / tau): a PL negative log-likelihood of the *unsoftened* student logits along
    pi*, each selection step weighted by the teacher's probability of the class chosen there.
    Follows the paper (Sec. 4, Eq. for L_PLD) and its Appendix C code: the weights are the plain
    teacher softmax (they sum to 1, no further normalisation), tau softens only those weights
    (ranking and student are untouched, no tau^2), batch mean. PLD replaces CE; the paper's
    defaults are tau = 1 on ImageNet, 4 on CIFAR-100. Needs ``targets``.
    Shapes: (N, C), (N, C), targets (N,) -> scalar, or (N,) with reduction="none".
    """
    tau = _positive("pld", "temperature", temperature)
    s, t, y, mask = _prepare(
        "pld",
        student_logits,
        teacher_logits,
        targets=targets,
        mask=mask,
        reduction=reduction,
        needs_targets=True,
    )
    rest = _non_target_index(y, s.shape[-1])  # (N, C-1)
    order = t.gather(-1, rest).argsort(dim=-1, descending=True, stable=True)
    ranking = torch.cat([y.unsqueeze(-1), rest.gather(-1, order)], dim=-1)  # (N, C), pi*
    # PL is shift invariant; subtracting the (detached) row max keeps logcumsumexp's backward exact
    s_ranked = (s - s.amax(-1, keepdim=True).detach()).gather(-1, ranking)
    tail_lse = s_ranked.flip(-1).logcumsumexp(-1).flip(-1)  # logsumexp over positions k..C
    weights = _log_probs(t, tau).exp().gather(-1, ranking)
    rows = (weights * (tail_lse - s_ranked)).sum(-1)
    return _reduce(rows, mask, reduction)


@register("ce", reads_logits=True, row_wise=True, needs_targets=True)
def ce(
    student_logits: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    targets: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy of the student against hard ``targets``; the teacher is ignored (may be None).

    -(1 - eps) log p_y - (eps / C) sum_c log p_c, p = softmax(s), as ``F.cross_entropy`` with
    ``label_smoothing=eps`` (Szegedy et al., CVPR 2016). Targets of -100 are masked rows. Here so
    that an objective can list the task term beside the distillation terms.
    Soft targets (probabilities, float (N, C): learned or committee labels of dataset distillation)
    give -sum_c q_c log p_c with q = (1 - eps) y + eps / C, as ``F.cross_entropy`` with probability
    targets. Shapes: (N, C), targets (N,) or (N, C) float -> scalar, or (N,) with reduction="none".
    """
    eps = _unit("ce", "label_smoothing", label_smoothing)
    if targets is not None and targets.is_floating_point() and targets.dim() == student_logits.dim() > 1:
        s, _, _, mask = _prepare("ce", student_logits, None, targets=None, mask=mask, reduction=reduction)
        if targets.shape != s.shape or not torch.isfinite(targets).all() or (targets < 0).any():
            raise DistilleryError(f"ce: soft targets must be finite probabilities of the logits' shape {tuple(s.shape)}, "
                                  f"got shape {tuple(targets.shape)}; pass class indices (N,) or probabilities (N, C).")
        q = targets.float() * (1 - eps) + eps / s.shape[-1]
        rows = -(q * F.log_softmax(s, dim=-1)).sum(-1)
        return _reduce(rows, mask, reduction)
    s, _, y, mask = _prepare(
        "ce", student_logits, None, targets=targets, mask=mask, reduction=reduction, needs_targets=True
    )
    rows = F.cross_entropy(s, y, reduction="none", label_smoothing=eps)
    return _reduce(rows, mask, reduction)


