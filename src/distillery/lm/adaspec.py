"""AdaSPEC's token filter: distil a speculative-decoding draft only on the tokens it can learn.

Hu et al., "AdaSPEC: Selective Knowledge Distillation for Efficient Speculative Decoders", 2025.
The method has two stages:

1. a *reference* model (initialised as the draft) is distilled from the target with plain
   token-level KD, forward KL(p_target || p_ref), on the training data;
2. the actual draft is then distilled on the same data, but each batch keeps only the tokens on
   which the draft lags the reference the most. Per valid token w,

       L_ref(w)   = KL(p_target(. | w_<) || p_ref(. | w_<))
       L_draft(w) = KL(p_target(. | w_<) || p_draft(. | w_<))
       dL(w)      = L_draft(w) - L_ref(w)

   and the top ``keep`` fraction of tokens by dL is trained on with forward KL; the rest are
   dropped. A large dL marks a token the reference (same capacity) fits but the draft does not yet
   fit: learnable, and worth the draft's capacity; tokens that even the reference cannot fit (both
   losses high, dL small) are filtered out, so the draft spends its capacity on the tokens that
   drive the acceptance rate.

``adaspec_mask(draft_logits, ref_logits, target_logits, mask, keep=0.4)`` is stage 2's selection
as a pure function; it composes with the token-level loss:

    sel = adaspec_mask(draft_logits, ref_logits, target_logits, mask)
    loss = token_loss("kd", draft_logits, target_logits, mask=sel, temperature=1.0)

i.e. L = (1 / |S|) sum_{w in S} KL(p_target(w) || p_draft(w)), S the kept tokens, which is the
paper's objective with its 1 / (k |y|) normaliser (|S| = round(k n)). Stage 1 is
``token_loss("kd", ref_logits, target_logits, mask=mask, temperature=1.0)`` on every valid token.

``keep = 0.4`` is the default because it is the fraction the paper uses in its main experiments
(it ablates other fractions); this is from my reading of the paper, check it against the paper or
its code if the exact default matters. Choices where my reading may differ from the paper's code:
the top-k is taken over all valid tokens of the batch (as Rho-1's selective language modelling,
which AdaSPEC builds on, does), ``per_row=True`` selects within each sequence instead; the count
is round-half-up of ``keep * n`` (at least 1 when any token is valid), the paper may floor it; the
KLs are at temperature 1 (``temperature`` changes both alike).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DistilleryError


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last axis from log-probs; classes with p = 0 add exactly 0."""
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)


def _count(keep: float, n: int) -> int:
    """round-half-up(keep * n), at least 1 and at most n (0 when n = 0)."""
    if n == 0:
        return 0
    return min(n, max(1, math.floor(keep * n + 0.5)))


def _top(delta: Tensor, valid: Tensor, keep: float) -> Tensor:
    """Bool mask of the round(keep * n) largest ``delta`` among ``valid`` (1-D); ties go to the earlier position."""
    k = _count(keep, int(valid.sum()))
    out = torch.zeros_like(valid)
    if k == 0:
        return out
    key = torch.where(valid, -delta, float("inf"))  # ascending key: largest delta first, invalid last
    order = torch.sort(key, stable=True).indices  # stable: equal keys keep their position order
    out[order[:k]] = True
    return out


@torch.no_grad()
def adaspec_mask(draft_logits: Tensor, ref_logits: Tensor, target_logits: Tensor, mask: Tensor, keep: float = 0.4, *,
                 per_row: bool = False, temperature: float = 1.0) -> Tensor:
    """AdaSPEC's selection of the tokens to distil the draft on (see the module docstring).

    ``draft_logits``, ``ref_logits``, ``target_logits`` (B, T, V) at the same next-token positions;
    ``mask`` (B, T) bool, True where a token counts. Returns a (B, T) bool mask, a subset of ``mask``:
    the round(keep * n) valid tokens (at least one when any is valid; none when none is) with the
    largest dL = KL(p_target || p_draft) - KL(p_target || p_ref), over the whole batch (``per_row``:
    within each row, n its valid count). Ties are broken towards the earlier (row-major) position.
    Computed without grad, in float32 (float64 stays float64)."""
    tensors = {"draft_logits": draft_logits, "ref_logits": ref_logits, "target_logits": target_logits}
    for name, x in tensors.items():
        if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise DistilleryError(f"adaspec_mask: {name} must be floating-point (B, T, V) logits, got {got}.")
    shapes = {name: tuple(x.shape) for name, x in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise DistilleryError(f"adaspec_mask: the logits must share one (B, T, V) shape, got {shapes}; "
                              "score the same tokens with all three models (sliced to the shared vocabulary).")
    b, t, _ = draft_logits.shape
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (b, t):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise DistilleryError(f"adaspec_mask: mask must be a bool tensor of shape ({b}, {t}) (True = token counts), "
                              f"got {got}.")
    if not (isinstance(keep, (int, float)) and 0.0 < keep <= 1.0):
        raise DistilleryError(f"adaspec_mask: keep (the fraction of tokens trained on) must lie in (0, 1], got {keep!r}; "
                              "the paper uses 0.4.")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise DistilleryError(f"adaspec_mask: temperature must be a finite number > 0, got {temperature!r}.")
    dtype = torch.promote_types(draft_logits.dtype, torch.float32)
    keep_rows = mask.unsqueeze(-1)

    def log_probs(x: Tensor) -> Tensor:  # masked positions may hold anything (even inf / nan)
        return F.log_softmax(torch.where(keep_rows, x.to(dtype), 0.0) / temperature, dim=-1)

    lt, ld, lr = log_probs(target_logits), log_probs(draft_logits), log_probs(ref_logits)
    delta = _kl_rows(lt, ld) - _kl_rows(lt, lr)  # (B, T)
    if per_row:
        return torch.stack([_top(delta[i], mask[i], keep) for i in range(b)]) if b else mask.clone()
    return _top(delta.reshape(-1), mask.reshape(-1), keep).reshape(b, t)
