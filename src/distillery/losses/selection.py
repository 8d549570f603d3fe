"""Losses that choose or reshape their targets per sample: LLKD's sample selection on unlabelled
transfer data and FerKD's calibration of soft labels. Pure functions over (N, C) logits.

``llkd`` keeps running thresholds in a small state module (``llkd.state``), checkpointed with the
student, and reports the share of the batch it kept (logged as ``<term>/kept``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import register
from .logits import (
    IGNORE_INDEX,
    LossInputError,
    _check_targets,
    _kl,
    _log_probs,
    _positive,
    _prepare,
    _reduce,
    _unit,
)


class LLKDState(nn.Module):
    """Running thresholds of ``llkd``: a global EMA of the batch-mean teacher confidence and of the
    batch-mean student uncertainty, and per-class EMAs of both (class = the teacher's argmax).
    Buffers only; ``kept`` is the share of the last training batch that was selected."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int] | None, **_: object):
        super().__init__()
        c = int(student_shape[-1])
        self.register_buffer("conf", torch.tensor(1.0 / c, dtype=torch.float64))
        self.register_buffer("unc", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("class_conf", torch.full((c,), 1.0 / c, dtype=torch.float64))
        self.register_buffer("class_unc", torch.ones(c, dtype=torch.float64))
        self.register_buffer("kept", torch.tensor(1.0))

    def metrics(self) -> dict[str, Tensor]:
        return {"kept": self.kept.clone()}


def _ema_update(buf: Tensor, value: Tensor, m: float) -> None:
    buf.mul_(m).add_((1 - m) * value)


@register("llkd", reads_logits=True, state=LLKDState)
def llkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    state: LLKDState | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
    temperature: float = 1.0,
    momentum: float = 0.99,
    hard: bool = False,
) -> Tensor:
    """Sample selection on unlabelled data after LLKD (Li et al., "Learning with Less: Knowledge
    Distillation from Large Language Models via Unlabeled Data", NAACL 2025 findings, arXiv 2411.08028).

    A row i is kept when the teacher is confident and the student is uncertain:
        conf_i = max_c p_t(c | x_i),  unc_i = H(p_s(. | x_i)) / log C   (normalised entropy),
        keep_i = conf_i >= tau_T(k_i) and unc_i >= tau_S(k_i),  k_i = argmax p_t,
    with adaptive per-class thresholds tau(k) = g * e_k / max_j e_j from a global EMA g of the batch
    mean and per-class EMAs e_k of the class means (momentum ``momentum``), updated in training
    before the selection. Kept rows get KL(p_t || p_s) at ``temperature`` (tau^2-scaled, as ``kd``),
    or with ``hard=True`` cross-entropy on the teacher's argmax (the paper trains on pseudo-labels).
    What we follow: the selection rule (teacher confidence above, student uncertainty above,
    class-wise adaptive thresholds from moving averages) as the paper describes it. What we could not
    read and chose: the threshold formula (FreeMatch's global x class-ratio form), the EMA momentum,
    and no per-sample weights (the paper weights kept samples by confidence and uncertainty).
    In eval mode the thresholds are used without updating. Shapes: (N, C), (N, C) -> scalar.
    """
    tau = _positive("llkd", "temperature", temperature)
    m = _unit("llkd", "momentum", momentum)
    if not isinstance(state, LLKDState):
        raise LossInputError("llkd keeps running thresholds: build LLKDState(student_shape, teacher_shape) and "
                             "pass state=... (the objective does this).")
    s, t, _, valid = _prepare("llkd", student_logits, teacher_logits, targets=None, mask=mask, reduction=reduction)
    c = s.shape[1]
    with torch.no_grad():
        p_t = t.softmax(-1)
        conf, k = p_t.max(-1)
        logp_s = s.detach().log_softmax(-1)
        unc = -(logp_s.exp() * logp_s).sum(-1) / math.log(c) if c > 1 else torch.zeros_like(conf)
        rows = torch.ones_like(conf, dtype=torch.bool) if valid is None else valid
        if state.training and bool(rows.any()):
            _ema_update(state.conf, conf[rows].double().mean(), m)
            _ema_update(state.unc, unc[rows].double().mean(), m)
            for buf, v in ((state.class_conf, conf), (state.class_unc, unc)):
                kk = k[rows]
                sums = torch.zeros(c, dtype=torch.float64).index_add_(0, kk, v[rows].double())
                counts = torch.bincount(kk, minlength=c).double()
                seen = counts > 0
                buf[seen] = m * buf[seen] + (1 - m) * sums[seen] / counts[seen]
        tau_t = (state.conf * state.class_conf / state.class_conf.max().clamp(min=1e-12))[k]
        tau_s = (state.unc * state.class_unc / state.class_unc.max().clamp(min=1e-12))[k]
        keep = rows & (conf.double() >= tau_t) & (unc.double() >= tau_s)
        if state.training:
            state.kept.fill_(float(keep.sum()) / max(int(rows.sum()), 1))
    if hard:
        per_row = F.cross_entropy(s, k, reduction="none")
    else:
        per_row = tau**2 * _kl(_log_probs(t, tau), _log_probs(s, tau))
    return _reduce(per_row, keep, reduction)




@register("ferkd", reads_logits=True, needs_targets=True, masks_unlabelled=False)
def ferkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    targets: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
    low: float = 0.0,
    mid: float = 0.2,
    high: float = 1.0,
    smoothing: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """FerKD's calibrated soft labels (Shen & Xing, "FerKD: Surgical Label Adaptation for Efficient
    Distillation", ICCV 2023), as one soft cross-entropy -sum_c y_c log p_s(c) per row, with the
    target chosen by the teacher's probability of the true class, y_s = p_t(y | x) (at ``temperature``):
        y_s <  low or y_s > high  -> the row is discarded (uninformative: extreme hard or easy),
        low <= y_s < mid          -> a smoothed hard label: 1 - eps on y, eps / (C - 1) elsewhere,
        otherwise                 -> the teacher's soft label p_t.
    Rows without a label (target -100) keep the teacher's soft label; give the term ``targets: labels``
    (with ``auto`` and a teacher, the objective fills those rows with the teacher's class first). What we follow: the three-way
    rule and the soft cross-entropy of FKD's code, which FerKD trains with. What we could not read
    and chose: the thresholds (low 0, mid 0.2, high 1: nothing discarded by default) and how eps is
    spread (over the other C - 1 classes). Shapes: (N, C), (N, C), targets (N,) -> scalar.
    """
    for name, v in (("low", low), ("mid", mid), ("high", high)):
        _unit("ferkd", name, v)
    if not low <= mid <= high:
        raise LossInputError(f"ferkd: need low <= mid <= high, got {low}, {mid}, {high}.")
    eps = _unit("ferkd", "smoothing", smoothing)
    tau = _positive("ferkd", "temperature", temperature)
    s, t, _, valid = _prepare("ferkd", student_logits, teacher_logits, targets=None, mask=mask, reduction=reduction)
    n, c = s.shape
    p_t = _log_probs(t, tau).exp()
    target = p_t
    keep = torch.ones(n, dtype=torch.bool, device=s.device) if valid is None else valid
    if targets is not None:  # rows labelled -100 keep the teacher's soft label
        y = _check_targets("ferkd", targets, n, c)
        lab = y != IGNORE_INDEX
        y = y.masked_fill(~lab, 0)
        ys = p_t.gather(1, y.unsqueeze(1)).squeeze(1)
        smooth = torch.full_like(p_t, eps / max(c - 1, 1)).scatter(1, y.unsqueeze(1), 1 - eps)
        target = torch.where((lab & (ys >= low) & (ys < mid)).unsqueeze(1), smooth, p_t)
        keep = keep & ~(lab & ((ys < low) | (ys > high)))
    per_row = -(target * F.log_softmax(s, -1)).sum(-1)
    return _reduce(per_row, keep, reduction)


