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

What we follow: the official trainer (``AdaSPECTrainer.compute_loss`` in github.com/yuezhouhu/adaspec)
computes both KLs per valid token at temperature 1, keeps ``delta >= quantile(delta, 1 - k)`` over
all valid tokens of the batch, and trains forward KL on the kept tokens. We keep the
round-half-up(k n) largest (at least one when any token is valid; ties to the earlier position),
which is the quantile rule up to ties and interpolation; ``per_row=True`` selects within each
sequence instead. The trainer divides the kept tokens' sum by the batch's valid-token count when
transformers passes one (``num_items_in_batch``) and takes their mean otherwise; we take their mean
(the engine normalises by the kept count), which rescales the loss by 1 / k and changes nothing
else under Adam. ``keep = 0.4`` is the fraction of the paper's main experiments.

``AdaSPEC`` runs stage 2 through the engine (a step task): its batches carry the target's logits and a
mask reduced to AdaSPEC's tokens (computed with the current draft), and ``BatchTeacher`` answers
from them, so the target runs once per batch.
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


class AdaSPEC:
    """Stage 2 as a step of the engine (``fit(..., task=AdaSPEC(...))``): each micro-batch's ``mask`` (and
    targets) keep only the tokens ``adaspec_mask`` selects with the current ``draft``, the ``ref`` model
    and the ``target``, and its ``teacher_logits`` hold the target's logits (read by ``BatchTeacher``)."""

    def __init__(self, draft, ref, target, keep: float = 0.4, per_row: bool = False):
        if not 0.0 < keep <= 1.0:
            raise DistilleryError(f"AdaSPEC keep must lie in (0, 1], got {keep!r}; the paper uses 0.4.")
        self.draft, self.ref, self.target = draft, ref, target
        self.keep, self.per_row = float(keep), bool(per_row)
        self.kept = self.valid = 0

    @torch.no_grad()
    def prepare(self, batch: dict[str, Tensor], *, epoch: int = 0) -> dict[str, Tensor]:
        out = dict(batch)
        was = self.draft.training
        self.draft.eval()
        try:
            t, r, d = self.target(out["x"]), self.ref(out["x"]), self.draft(out["x"])
        finally:
            self.draft.train(was)
        sel = adaspec_mask(d, r, t, out["mask"], self.keep, per_row=self.per_row)
        self.kept += int(sel.sum())
        self.valid += int(out["mask"].sum())
        out["mask"], out["y"] = sel, torch.where(sel, out["y"], -100)
        out["teacher_logits"] = t
        return out


class BatchTeacher:
    """The teacher protocol answered from ``batch["teacher_logits"]`` (``AdaSPEC`` puts them there)."""

    answers_inputs = False  # it reads answers from training batches; it cannot score other inputs

    def __call__(self, batch: dict[str, Tensor], taps=()) -> dict[str, Tensor]:
        if "teacher_logits" not in batch:
            raise DistilleryError("BatchTeacher reads batch['teacher_logits']; train with task=AdaSPEC(...) (or a data set "
                                  "whose batches carry the teacher's logits).")
        if [t for t in taps if t != "logits"]:
            raise DistilleryError("BatchTeacher holds the target's logits only; feature terms need the target model.")
        return {"logits": batch["teacher_logits"]}
