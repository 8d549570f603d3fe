"""Token-level distillation: any logit loss over (B, T, V) sequences with a token mask, optionally
in chunks of tokens so that a long batch over a big vocabulary never holds the full-vocabulary
probabilities of teacher and student at once.

``token_loss(fn, student (B, T, V), teacher (B, T, V) | TopK (B, T, k) | None, mask=(B, T))``
flattens the sequences to (B*T, V) rows, applies the logit loss ``fn`` (``kd``, ``reverse_kl``,
``generalized_jsd``, ``skew_kl``, ``skew_reverse_kl``, ``tvd``, ``ce``, ... of
``distillery.losses.logits``, with ``reduction="sum"``) and divides by the number of valid tokens:

    L = (1 / n) * sum_{b, t: mask[b, t]} loss_row(student[b, t], teacher[b, t])

``n`` is the batch's count of valid tokens, or ``normalizer`` when the caller knows the global count
(over gradient-accumulation steps and ranks; the engine passes each micro-batch's share through
its term factors, so the step's loss is the mean over every valid token of the step). A batch with
no valid token gives an exact 0 that still has a grad path (no 0 / 0).

Chunking (``chunk_size`` tokens): the forward evaluates ``fn`` chunk by chunk under ``no_grad`` and
keeps only the inputs; the backward recomputes each chunk with grad, writes its gradient into one
(B*T, V) buffer (the gradient the logits need anyway), and frees the chunk's intermediates. So
the fp32 log-softmaxes, probabilities and mixtures that a divergence builds exist for
``chunk_size`` rows at a time, never for the whole batch. Values and gradients equal the
unchunked loss to float rounding (the sum is split, nothing is approximated); the price is a
second forward of the loss per chunk. Only losses that are a sum over rows (declared ``row_wise`` at registration: the
divergences, ``dkd``, ``kd_standardized``, ``pld``, ``ce``) can be chunked; one that couples rows
(``dist``'s batch correlations) or takes trainable inputs (a learned ``state``, parameters that
require grad: the recompute would not reach them) is refused with ``chunk_size`` set. Double
backward through a chunked loss is not supported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import get
from .logits import LossInputError
from .sparse import TopK


def _flat_teacher(teacher: Tensor | TopK | None, n: int, v: int, any_width: bool = False) -> Tensor | TopK | None:
    if teacher is None:
        return None
    if isinstance(teacher, TopK):
        flat = teacher.flat()
        if len(flat) != n or flat.num_classes != v:
            raise LossInputError(f"token loss: the sparse teacher covers {teacher.shape}, the student {n} tokens of {v} "
                                 "classes; store the teacher for the same sequences and vocabulary.")
        return flat
    if any_width and teacher.dim() == 3 and teacher.shape[0] * teacher.shape[1] == n:  # cross-tokenizer losses
        return teacher.reshape(n, teacher.shape[-1])
    if teacher.shape[-1] != v or teacher.numel() != n * v:
        raise LossInputError(f"token loss: teacher logits have shape {tuple(teacher.shape)}, the student's cover "
                             f"{n} tokens of {v} classes; both must be (B, T, V) over the same tokens and vocabulary "
                             "(a teacher with a padded vocabulary: slice it to the tokenizer's, as CausalLM does).")
    return teacher.reshape(n, v)


def token_loss(
    fn: str | Callable[..., Tensor],
    student_logits: Tensor,
    teacher_logits: Tensor | TopK | None,
    *,
    mask: Tensor,
    targets: Tensor | None = None,
    chunk_size: int | None = None,
    normalizer: float | Tensor | None = None,
    **params: Any,
) -> Tensor:
    """Mean of the logit loss ``fn`` over the valid tokens of (B, T, V) logits (see the module docstring).

    ``mask`` (B, T) bool, True where the token counts (not prompt, not padding); ``targets`` (B, T)
    next-token ids for losses that read them (-100 also masks); ``chunk_size`` tokens per chunk
    (None: one piece); ``normalizer`` the count to divide by (default: this batch's valid tokens).
    ``params`` go to ``fn`` (temperature, beta, ...). Returns a scalar."""
    fn = get(fn) if isinstance(fn, str) else fn
    if not isinstance(student_logits, Tensor) or student_logits.dim() != 3:
        got = tuple(student_logits.shape) if isinstance(student_logits, Tensor) else type(student_logits).__name__
        raise LossInputError(f"token loss: student_logits must be (B, T, V), got {got}.")
    b, t, v = student_logits.shape
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (b, t):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise LossInputError(f"token loss: mask must be a bool tensor of shape ({b}, {t}) (True = token counts), got {got}.")
    if targets is not None and tuple(targets.shape) != (b, t):
        raise LossInputError(f"token loss: targets must be (B, T) = ({b}, {t}) token ids, got {tuple(targets.shape)}.")
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise LossInputError(f"token loss: chunk_size must be a positive integer or None, got {chunk_size!r}.")
    n = b * t
    s = student_logits.reshape(n, v)
    from . import capabilities

    tv = _flat_teacher(teacher_logits, n, v, capabilities(fn).different_widths)
    m = mask.reshape(n)
    if targets is not None:
        y = targets.reshape(n)
        m = m & (y != -100)
        params = {**params, "targets": torch.where(m, y, 0)}
    if chunk_size is not None and chunk_size < n:
        name = getattr(fn, "__name__", getattr(getattr(fn, "func", None), "__name__", "the loss"))
        if not capabilities(fn).row_wise:  # declared at registration (a partial binds recipe parameters)
            raise LossInputError(f"token loss: {name} couples rows (batch statistics), so it cannot be computed in "
                                 "chunks of tokens; set chunk_size to null for it.")
        bound = {**getattr(fn, "keywords", {}), **params}
        if "state" in bound or any(isinstance(w, Tensor) and w.requires_grad for w in bound.values()):
            raise LossInputError(f"token loss: {name} takes trainable inputs (a learned state or parameters that "
                                 "require grad), which the chunked recompute cannot reach; set chunk_size to null.")
    if chunk_size is None or chunk_size >= n:
        total = fn(s, tv, mask=m, reduction="sum", **params)
    else:
        total = _ChunkedSum.apply(fn, int(chunk_size), params, s, tv, m)
    count = m.sum() if normalizer is None else torch.as_tensor(normalizer, dtype=torch.float32)
    return total / count.clamp(min=1)


def _piece(x: Any, lo: int, hi: int) -> Any:
    """Rows lo:hi of a tensor or a TopK (None stays None)."""
    return None if x is None else x[lo:hi]


def _chunk_params(params: dict, n: int, lo: int, hi: int) -> dict:
    """The loss parameters for rows lo:hi: per-row tensors (length n) sliced, the rest as they are."""
    return {k: (w[lo:hi] if isinstance(w, Tensor) and w.dim() and len(w) == n else w) for k, w in params.items()}


class _ChunkedSum(torch.autograd.Function):
    """sum over chunks of fn(rows, reduction="sum"); the backward recomputes chunk by chunk."""

    @staticmethod
    def forward(ctx, fn, chunk, params, s, t, m):
        ctx.fn, ctx.chunk, ctx.params = fn, chunk, params
        ctx.sparse = t if isinstance(t, TopK) else None
        ctx.save_for_backward(s, t if isinstance(t, Tensor) else None, m)
        total = s.new_zeros((), dtype=torch.float64 if s.dtype == torch.float64 else torch.float32)
        for lo in range(0, len(s), chunk):
            hi = min(lo + chunk, len(s))
            kw = _chunk_params(params, len(s), lo, hi)
            total = total + fn(s[lo:hi], _piece(t, lo, hi), mask=m[lo:hi], reduction="sum", **kw)
        return total

    @staticmethod
    def backward(ctx, grad):
        s, t_dense, m = ctx.saved_tensors
        t = ctx.sparse if ctx.sparse is not None else t_dense
        need_s, need_t = ctx.needs_input_grad[3], ctx.needs_input_grad[4] and t_dense is not None
        gs = torch.zeros_like(s) if need_s else None
        gt = torch.zeros_like(t_dense) if need_t else None
        n = len(s)
        for lo in range(0, n, ctx.chunk):
            hi = min(lo + ctx.chunk, n)
            if not bool(m[lo:hi].any()):
                continue  # masked rows have zero gradient
            kw = _chunk_params(ctx.params, n, lo, hi)
            with torch.enable_grad():
                sc = s[lo:hi].detach().requires_grad_(need_s)
                tc = t_dense[lo:hi].detach().requires_grad_(need_t) if t_dense is not None else _piece(t, lo, hi)
                value = ctx.fn(sc, tc, mask=m[lo:hi], reduction="sum", **kw)
                wrt = [x for x, need in ((sc, need_s), (tc, need_t)) if need]
                grads = torch.autograd.grad(value, wrt, grad_outputs=grad.to(value.dtype))
            grads = list(grads)
            if need_s:
                gs[lo:hi] = grads.pop(0)
            if need_t:
                gt[lo:hi] = grads.pop(0)
        return None, None, None, gs, gt, None
