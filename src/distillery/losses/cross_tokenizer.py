"""Cross-tokenizer distillation: a teacher with another vocabulary (and another tokenization) teaches.

Three small pieces, pure functions over tensors and offsets:

- ``uld_loss``: Universal Logit Distillation (Boizard et al. 2024), the L1 distance between the
  sorted probability vectors of two already paired rows; vocabularies may differ in size.
  Registered as ``uld`` (a row-wise logit loss that compares different widths itself).
- ``align_spans``: the minimal groups of consecutive tokens of two tokenizations of one text whose
  character spans coincide, from the offsets HF fast tokenizers return (``return_offsets_mapping``).
- ``gold_span_loss``: TRL's GOLD loss over one sequence: each side's probabilities are merged over
  its tokens of an aligned group by the chain rule, then compared with ULD (or, given a
  ``vocab_map``, a generalized JSD on the vocabulary both tokenizers share plus ULD on the rest).
  ``gold_span_loss_batch`` loops it over rows.

Same-tokenizer KD does not come here: the logit losses of ``losses.logits`` stay its fast path.
Gradients flow to both inputs, as in every loss of this package: compute the teacher under
``no_grad`` (data-free regimes need the teacher's path to the input).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import register
from .logits import REDUCTIONS, LossInputError, _check_logits, _check_mask, _positive, _reduce

IGNORE_INDEX = -100
LOG_EPS = math.log(1e-8)  # GOLD clamps merged token probabilities and JSD inputs at 1e-8
MERGES = ("bayesian", "observed")
Group = tuple[int, int, int, int]


# ---------------------------------------------------------------------------------------------
# ULD


def _sorted_l1(p: Tensor, q: Tensor) -> Tensor:
    """sum_i |sort(p)_i - sort(q)_i| per row, both sorted descending, the narrower zero-padded.

    Shapes: (N, A), (N, B) -> (N,). A zero-width side counts as all zeros."""
    p = p.sort(dim=-1, descending=True).values
    q = q.sort(dim=-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    p = F.pad(p, (0, width - p.shape[-1]))
    q = F.pad(q, (0, width - q.shape[-1]))
    return (p - q).abs().sum(-1)


@register("uld", reads_logits=True, row_wise=True, different_widths=True)
def uld_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    targets: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Universal Logit Distillation: Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the
    Universal Logit Distillation Loss for LLMs" (arXiv 2402.12030), as their code computes it
    (``llm-recipes/models/distillation_model.py``, ``DistillationLoss``).

    Per row: p_s = softmax(z_s / tau), p_t = softmax(z_t / tau), each sorted descending, the shorter
    vocabulary zero-padded to the longer, then ``sum_i |p_s,(i) - p_t,(i)|``. This is the paper's
    Wasserstein-1 distance in closed form: with a uniform transport cost between any two tokens
    (the vocabularies share no geometry), the optimal plan pairs the i-th largest probabilities.
    Rows are already paired: row n of the student and of the teacher predict the n-th answer token
    of each model (the paper pairs tokens by position; ``gold_span_loss`` pairs text spans).

    Follows the code where it differs from the paper: one temperature for both sides here (the code
    has one per side, both 1 by default); no cross-entropy term (add it as its own term); the
    reduction is over valid rows, where the code averages each sequence over its
    min(student, teacher) answer length and then averages sequences (equal when lengths are equal).

    ``mask`` (N,) bool, True where the row counts; ``targets`` -100 also masks (nothing else is read).
    Masked rows are zeroed before the softmax, so padding garbage reaches neither value nor gradient;
    no valid row gives an exact 0 with a grad path. ``reduction``: "mean" over valid rows, "sum",
    or "none" (N,). Shapes: (N, Vs), (N, Vt) -> scalar, or (N,); Vs and Vt may differ. Bounded in [0, 2].
    """
    tau = _positive("uld", "temperature", temperature)
    if reduction not in REDUCTIONS:
        raise LossInputError(f"uld: unknown reduction {reduction!r}; use one of {', '.join(map(repr, REDUCTIONS))}.")
    _check_logits("uld", "student_logits", student_logits)
    _check_logits("uld", "teacher_logits", teacher_logits)
    n = student_logits.shape[0]
    if teacher_logits.shape[0] != n:
        raise LossInputError(f"uld: student_logits has {n} rows but teacher_logits {teacher_logits.shape[0]}; "
                             "pair the rows (the i-th answer token of each model) before the loss.")
    valid = _check_mask("uld", mask, n)
    if targets is not None:
        if not isinstance(targets, Tensor) or tuple(targets.shape) != (n,):
            got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise LossInputError(f"uld: targets must be a tensor of shape ({n},) (-100 masks a row), got {got}.")
        labelled = targets != IGNORE_INDEX
        valid = labelled if valid is None else valid & labelled
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, torch.float32), teacher_logits.dtype)
    s, t = student_logits.to(dtype), teacher_logits.to(dtype)
    if valid is not None:  # padding rows may hold anything (inf, NaN): keep it out of forward and backward
        s = torch.where(valid.unsqueeze(-1), s, 0.0)
        t = torch.where(valid.unsqueeze(-1), t, 0.0)
    rows = _sorted_l1(F.softmax(s / tau, dim=-1), F.softmax(t / tau, dim=-1))
    return _reduce(rows, valid, reduction)


# ---------------------------------------------------------------------------------------------
# span alignment


def _offsets(side: str, offsets: object) -> list[tuple[int, int]]:
    if isinstance(offsets, Tensor):
        offsets = offsets.tolist()
    try:
        out = [(int(a), int(b)) for a, b in offsets]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise LossInputError(f"align_spans: {side} offsets must be a sequence of (start, end) character pairs "
                             "(a fast tokenizer's offset_mapping).") from None
    for k, (a, b) in enumerate(out):
        if a < 0 or b < a:
            raise LossInputError(f"align_spans: {side} token {k} has offsets ({a}, {b}); need 0 <= start <= end.")
    return out


def _fill(offsets: list[tuple[int, int]], text_len: int | None) -> list[tuple[int, int]]:
    """Give characters a side does not cover to the token after them (trimmed offsets and dropped
    whitespace: the byte-level BPE convention, whose tokens carry their leading space).

    An empty-span token at p inside the gap (a trimmed all-space token) takes the gap up to p; the
    next non-empty token takes the rest; empty-span tokens outside it (special tokens at (0, 0)) stay
    empty. The text starts at char 0; it ends at ``text_len`` when given (the last token takes what no
    empty-span token there does)."""
    out = list(offsets)
    if all(a == b for a, b in out):
        return out
    end, last, pending = 0, -1, []  # the text starts at char 0
    for k, (a, b) in enumerate(out):
        if a == b:
            pending.append(k)
            continue
        for z in pending:  # empty-span tokens between the last non-empty token and this one
            p = out[z][0]
            if end < p <= a:
                out[z], end = (end, p), p
        if a > end:
            out[k] = (end, b)
        pending, end, last = [], max(end, b), k
    stop = text_len if text_len is not None else max((out[z][0] for z in pending), default=end)
    for z in pending:
        p = out[z][0]
        if end < p <= stop:
            out[z], end, last = (end, p), p, z
    if text_len is not None and end < text_len:
        out[last] = (out[last][0], text_len)
    return out


def _cuts(side: str, offsets: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, float, float]], int]:
    """The places where one tokenization can be cut, over its tokens with a non-empty span.

    Returns (idx, cuts, end): idx[c] the original index of the c-th non-empty token; cuts sorted
    (c, lo, hi), a cut before non-empty token c that can sit anywhere in characters [lo, hi]: the
    first (-inf, start], the last [end, +inf), an inner one [max end so far, next start]. A token
    that starts before the running end (byte-level tokens of one multi-byte character all carry its
    offsets) leaves no cut before it; an inner interval wider than a point is text this side skips."""
    idx = [k for k, (a, b) in enumerate(offsets) if b > a]
    if not idx:
        return idx, [(0, -math.inf, math.inf)], -1
    cuts: list[tuple[int, float, float]] = [(0, -math.inf, offsets[idx[0]][0])]
    run_end = prev_start = -1
    for c, k in enumerate(idx):
        a, b = offsets[k]
        if a < prev_start:
            raise LossInputError(f"align_spans: {side} token {k} starts at char {a}, before token {idx[c - 1]} "
                                 f"(char {prev_start}); offsets must be in text order over one text.")
        if c > 0 and a >= run_end:
            cuts.append((c, run_end, a))
        prev_start, run_end = a, max(run_end, b)
    cuts.append((len(idx), run_end, math.inf))
    return idx, cuts, run_end


def align_spans(
    s_offsets: Sequence[tuple[int, int]] | Tensor,
    t_offsets: Sequence[tuple[int, int]] | Tensor,
    *,
    text: str | None = None,
) -> list[Group]:
    """Align two tokenizations of the SAME text: the minimal groups of consecutive tokens whose
    character spans coincide, as GOLD does (TRL ``ULDLoss._align_by_byte_offsets``), over the
    character offsets of HF fast tokenizers (``return_offsets_mapping=True``).

    Returns ``[(s_lo, s_hi, t_lo, t_hi), ...]``: half-open token ranges; the groups partition both
    token sequences in order (each starts where the previous ended). Plain Python, O(Ts + Tt).

    A group boundary is a place where both tokenizations have a token boundary:

    - tokens sharing a character (byte-level BPE splits a multi-byte character into tokens that all
      carry its offsets) never get a boundary between them. TRL's walk compares ends only and would
      cut there; it aligns on byte offsets, where this cannot happen;
    - characters a side does not cover (trimmed offsets, dropped whitespace) go to the token after
      them, the byte-level BPE convention (its tokens carry their leading space): an empty-span token
      inside the gap (a trimmed all-space token) takes the gap up to its position, the next token
      the rest. The text starts at char 0, and ends at ``len(text)`` when ``text`` is given;
    - other tokens with an empty span (special tokens: HF gives them (0, 0) wherever they sit, so a
      trimmed space token at (0, 0) looks the same) carry no position: a run of them goes with the
      boundary around it. At a matched boundary the two sides' runs form one group (BOS with BOS,
      EOS with EOS); inside a group they belong to it;
    - a group with one side empty (a lone special token) is merged with adjacent one-sided groups of
      the other side; one left alone keeps an empty range (``gold_span_loss`` skips it, as TRL does).

    ``text``: the text both tokenized; when given, offsets must lie inside it. Without it the two
    sides must end at the same character (their last non-empty token), which catches offsets over
    different texts; pass ``text`` when one tokenizer drops trailing characters.
    """
    s, t = _offsets("student", s_offsets), _offsets("teacher", t_offsets)
    n = None if text is None else len(text)
    if n is not None:
        for side, off in (("student", s), ("teacher", t)):
            over = [k for k, (_, b) in enumerate(off) if b > n]
            if over:
                raise LossInputError(f"align_spans: {side} token {over[0]} ends at char {off[over[0]][1]}, past the "
                                     f"end of the text ({n} chars); offsets are not over this text.")
    s_idx, s_cuts, s_end = _cuts("student", _fill(s, n))
    t_idx, t_cuts, t_end = _cuts("teacher", _fill(t, n))
    if s_idx and t_idx and s_end != t_end:
        raise LossInputError(f"align_spans: student offsets end at char {s_end} but teacher offsets at char {t_end}: "
                             "they are not over the same text (pass text= if a tokenizer drops trailing chars).")

    # 1. matched boundaries: both cut lists are sorted and disjoint; walk them like interval intersection
    pairs: list[tuple[int, int]] = []
    i = j = 0
    while i < len(s_cuts) and j < len(t_cuts):
        (_, a_lo, a_hi), (_, b_lo, b_hi) = s_cuts[i], t_cuts[j]
        if max(a_lo, b_lo) <= min(a_hi, b_hi):
            pairs.append((i, j))
        if a_hi < b_hi:
            i += 1
        elif b_hi < a_hi:
            j += 1
        else:
            i, j = i + 1, j + 1

    # 2. groups between matched boundaries, in original token indices. A cut before non-empty token c
    # has the empty-span run [after token c-1, token c) on its side.
    def run(idx: list[int], total: int, c: int) -> tuple[int, int]:
        return (idx[c - 1] + 1 if c > 0 else 0), (idx[c] if c < len(idx) else total)

    groups: list[Group] = []
    cs = ct = 0  # tokens consumed so far, per side
    for i, j in pairs:
        s_lo, s_hi = run(s_idx, len(s), s_cuts[i][0])
        t_lo, t_hi = run(t_idx, len(t), t_cuts[j][0])
        text_s, text_t = max(cs, s_lo), max(ct, t_lo)  # a cut matched twice: its run is consumed already
        if text_s > cs or text_t > ct:
            groups.append((cs, text_s, ct, text_t))
        cs, ct = text_s, text_t
        if s_hi > cs or t_hi > ct:
            groups.append((cs, max(cs, s_hi), ct, max(ct, t_hi)))
        cs, ct = max(cs, s_hi), max(ct, t_hi)

    # 3. merge runs of consecutive one-sided groups that hold both sides
    merged: list[Group] = []
    k = 0
    while k < len(groups):
        g = groups[k]
        if (g[0] == g[1]) == (g[2] == g[3]):  # both sides present
            merged.append(g)
            k += 1
            continue
        e = k
        while e + 1 < len(groups) and (groups[e + 1][0] == groups[e + 1][1]) != (groups[e + 1][2] == groups[e + 1][3]):
            e += 1
        chunk = groups[k:e + 1]
        if any(c[0] == c[1] for c in chunk) and any(c[2] == c[3] for c in chunk):
            merged.append((chunk[0][0], chunk[-1][1], chunk[0][2], chunk[-1][3]))
        else:
            merged.extend(chunk)
        k = e + 1
    return merged


# ---------------------------------------------------------------------------------------------
# GOLD span loss


def vocab_map(student_vocab: dict[str, int], teacher_vocab: dict[str, int], size: int | None = None) -> Tensor:
    """Teacher id -> student id for the tokens whose strings are equal in both vocabularies, -1 elsewhere.

    As GOLD's ``ULDLoss._initialize_vocabulary_mapping``: ``tokenizer.get_vocab()`` strings compared
    as they are (so byte-level BPEs, whose strings use the same byte alphabet, share many; a
    SentencePiece '▁x' never equals a byte-level 'Ġx'). ``size``: length of the map (the teacher's
    logit width, which may exceed its vocabulary); default max teacher id + 1. Returns (size,) int64.
    """
    n = max(teacher_vocab.values(), default=-1) + 1 if size is None else int(size)
    t_ids, s_ids = [], []
    for token, tid in teacher_vocab.items():
        sid = student_vocab.get(token)
        if sid is not None:
            if not 0 <= tid < n:
                raise LossInputError(f"vocab_map: teacher id {tid} of {token!r} lies outside size {n}.")
            t_ids.append(tid)
            s_ids.append(sid)
    out = torch.full((n,), -1, dtype=torch.long)
    out[torch.tensor(t_ids, dtype=torch.long)] = torch.tensor(s_ids, dtype=torch.long)
    return out


def _check_ids(side: str, ids: object, t: int, v: int) -> Tensor:
    if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.dtype == torch.bool or ids.is_floating_point():
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
        raise LossInputError(f"gold_span_loss: {side}_ids must be a 1-D integer tensor of token ids, got {got}.")
    if ids.shape[0] != t:
        raise LossInputError(f"gold_span_loss: {side}_ids has {ids.shape[0]} tokens but {side}_log_probs has {t} rows; "
                             "row k must be the distribution of token k (shift the logits first).")
    if t and (int(ids.min()) < 0 or int(ids.max()) >= v):
        raise LossInputError(f"gold_span_loss: {side}_ids hold ids outside the vocabulary [0, {v}).")
    return ids.long()


def _merged(log_probs: Tensor, ids: Tensor, spans: list[tuple[int, int]], merge: str) -> Tensor:
    """log of each span's merged (unnormalised) distribution, (T, V) -> (G, V).

    "bayesian": log p(.| x_<hi-1) + sum_{lo <= k < hi-1} log p(x_k | x_<k) (the last position's full
    distribution times the probabilities of the span's earlier tokens); "observed": log p(.| x_<lo) +
    sum_{lo < k < hi} log p(x_k | x_<k). Each token's log-prob is clamped at log 1e-8 as GOLD does."""
    token_lp = log_probs.gather(1, ids.unsqueeze(1)).squeeze(1).clamp_min(LOG_EPS)  # (T,)
    base, seg, pos = [], [], []
    for g, (lo, hi) in enumerate(spans):
        b = hi - 1 if merge == "bayesian" else lo
        base.append(b)
        for k in range(lo, hi):
            if k != b:
                seg.append(g)
                pos.append(k)
    dev = log_probs.device
    scal = torch.zeros(len(spans), dtype=log_probs.dtype, device=dev)
    if pos:
        scal = scal.index_add(0, torch.tensor(seg, device=dev), token_lp[torch.tensor(pos, device=dev)])
    return log_probs[torch.tensor(base, dtype=torch.long, device=dev)] + scal.unsqueeze(1)


def _jsd(ls: Tensor, lt: Tensor, beta: float) -> Tensor:
    """TRL's generalized JSD per row from log-probs (G, M) -> (G,), as ``GOLDTrainer.generalized_jsd_loss``:
    m = beta p_t + (1 - beta) p_s; beta KL(p_t || m) + (1 - beta) KL(p_s || m); beta = 0 is KL(p_t || p_s),
    beta = 1 KL(p_s || p_t). Inputs need not sum to 1 (GOLD feeds the matched columns unnormalised)."""
    def kl(lp: Tensor, lq: Tensor) -> Tensor:
        return (lp.exp() * (lp - lq)).sum(-1)

    if beta == 0.0:
        return kl(lt, ls)
    if beta == 1.0:
        return kl(ls, lt)
    lm = torch.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))
    return beta * kl(lt, lm) + (1 - beta) * kl(ls, lm)


def gold_span_loss(
    student_log_probs: Tensor,
    teacher_log_probs: Tensor,
    groups: Sequence[Group],
    student_ids: Tensor,
    teacher_ids: Tensor,
    *,
    vocab_map: Tensor | None = None,
    merge: str = "bayesian",
    beta: float = 0.5,
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
    reduction: str = "mean",
) -> Tensor:
    """GOLD's cross-tokenizer loss over one sequence, as TRL computes it (``trl/experimental/gold/
    gold_trainer.py``, ``ULDLoss._compute_distillation_loss`` with ``use_extended_uld=True``; the GOLD
    docs: "Unlocking On-Policy Distillation for Any Model Family", HF 2025).

    Inputs: ``student_log_probs`` (Ts, Vs) and ``teacher_log_probs`` (Tt, Vt), each row k the
    (tempered) log-distribution of that model's token k, i.e. logits already shifted by one;
    ``student_ids`` (Ts,), ``teacher_ids`` (Tt,) the tokens actually there; ``groups`` from
    ``align_spans`` over the same text. Groups with an empty side are skipped (as TRL drops them).

    1. Merge (GOLD's ``_merge_probabilities_with_alignment_groups``): a group of tokens x_lo..x_hi-1
       becomes one unnormalised distribution by the chain rule. "bayesian" (default):
       p(. | x_<hi-1) * prod_{lo <= k < hi-1} p(x_k | x_<k), the last position's distribution times the
       earlier tokens' probabilities, whose entry at x_hi-1 is the joint probability of the span;
       "observed": p(. | x_<lo) * prod_{lo < k < hi} p(x_k | x_<k). Each factor is clamped at 1e-8.
       TRL's default is "observed" on unshifted logits (row k predicts token k+1 there); with the
       shifted rows taken here, "bayesian" is its chain-rule form (TRL PR 5905).
    2. Compare, per group, the merged student row P_s (Vs,) and teacher row P_t (Vt,):
       - without ``vocab_map``: ULD, sum_i |sort(P_s)_i - sort(P_t)_i| (zero-padded);
       - with ``vocab_map`` (teacher id -> student id, -1 where no string matches; ``vocab_map()``), GOLD's
         hybrid loss (``_compute_hybrid_uld_loss``): on the M matched pairs, TRL's generalized JSD(beta)
         of the matched columns, unnormalised, each clamped at 1e-8 before the log; on the rest, ULD
         between the unmatched columns of each side (0 if a side has none). Weighted
         w_m * JSD + w_u * ULD, by default w_m = M / Vt and w_u = 1 - w_m (TRL's adaptive weights);
         ``matched_weight`` and ``unmatched_weight`` set them (both or neither).
    3. ``reduction``: "mean" over the paired groups (TRL divides by the group count, then averages
       sequences), "sum", or "none" (one value per input group, skipped groups 0). No paired group
       gives an exact 0 with a grad path.

    Shapes: (Ts, Vs), (Tt, Vt), G groups, (Ts,), (Tt,) -> scalar, or (G,).
    """
    for side, x in (("student_log_probs", student_log_probs), ("teacher_log_probs", teacher_log_probs)):
        if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise LossInputError(f"gold_span_loss: {side} must be a floating (T, V) tensor for one sequence, got {got}.")
    if merge not in MERGES:
        raise LossInputError(f"gold_span_loss: unknown merge {merge!r}; use one of {', '.join(map(repr, MERGES))}.")
    if reduction not in REDUCTIONS:
        raise LossInputError(f"gold_span_loss: unknown reduction {reduction!r}; "
                             f"use one of {', '.join(map(repr, REDUCTIONS))}.")
    if not 0.0 <= float(beta) <= 1.0:
        raise LossInputError(f"gold_span_loss: beta must lie in [0, 1], got {beta!r}.")
    if (matched_weight is None) != (unmatched_weight is None):
        raise LossInputError("gold_span_loss: set matched_weight and unmatched_weight together (or neither).")
    (ts, vs), (tt, vt) = student_log_probs.shape, teacher_log_probs.shape
    s_ids = _check_ids("student", student_ids, ts, vs)
    t_ids = _check_ids("teacher", teacher_ids, tt, vt)
    groups = [tuple(int(x) for x in g) for g in groups]
    for g in groups:
        if len(g) != 4 or not (0 <= g[0] <= g[1] <= ts and 0 <= g[2] <= g[3] <= tt):
            raise LossInputError(f"gold_span_loss: group {g} is not (s_lo, s_hi, t_lo, t_hi) inside "
                                 f"{ts} student and {tt} teacher tokens; build groups with align_spans.")
    keep = [k for k, g in enumerate(groups) if g[1] > g[0] and g[3] > g[2]]
    dtype = torch.promote_types(torch.promote_types(student_log_probs.dtype, torch.float32), teacher_log_probs.dtype)
    zero = (student_log_probs.sum() + teacher_log_probs.sum()).to(dtype) * 0.0
    if not keep:
        return zero.expand(len(groups)).clone() if reduction == "none" else zero
    ls = _merged(student_log_probs.to(dtype), s_ids, [groups[k][:2] for k in keep], merge)  # (G, Vs)
    lt = _merged(teacher_log_probs.to(dtype), t_ids, [groups[k][2:] for k in keep], merge)  # (G, Vt)

    if vocab_map is None:
        rows = _sorted_l1(ls.exp(), lt.exp())
    else:
        if not isinstance(vocab_map, Tensor) or vocab_map.dim() != 1 or vocab_map.is_floating_point():
            raise LossInputError("gold_span_loss: vocab_map must be a 1-D integer tensor (teacher id -> student id, -1).")
        if vocab_map.shape[0] > vt:
            raise LossInputError(f"gold_span_loss: vocab_map has {vocab_map.shape[0]} entries but the teacher only "
                                 f"{vt} classes.")
        vmap = F.pad(vocab_map.long().to(ls.device), (0, vt - vocab_map.shape[0]), value=-1)
        t_match = (vmap >= 0).nonzero().squeeze(1)
        s_match = vmap[t_match]
        if len(s_match) and (int(s_match.max()) >= vs or len(s_match.unique()) != len(s_match)):
            raise LossInputError(f"gold_span_loss: vocab_map must send teacher ids to distinct student ids in [0, {vs}).")
        m = len(t_match)
        if matched_weight is None:
            w_m = m / max(1, vt)
            w_u = 1.0 - w_m
        else:
            w_m, w_u = float(matched_weight), float(unmatched_weight)  # type: ignore[arg-type]
        rows = ls.new_zeros(len(keep))
        if m:
            rows = rows + w_m * _jsd(ls[:, s_match].clamp_min(LOG_EPS), lt[:, t_match].clamp_min(LOG_EPS), float(beta))
        s_rest = torch.ones(vs, dtype=torch.bool, device=ls.device)
        s_rest[s_match] = False
        t_rest = vmap < 0
        if s_rest.any() and t_rest.any():
            rows = rows + w_u * _sorted_l1(ls[:, s_rest].exp(), lt[:, t_rest].exp())
    if reduction == "none":
        out = zero.expand(len(groups)).clone()
        return out.index_put((torch.tensor(keep, device=out.device),), rows)
    return _reduce(rows, None, reduction)


def gold_span_loss_batch(
    student_log_probs: Tensor,
    teacher_log_probs: Tensor,
    groups: Sequence[Sequence[Group]],
    student_ids: Tensor,
    teacher_ids: Tensor,
    *,
    reduction: str = "mean",
    **params,
) -> Tensor:
    """``gold_span_loss`` over the rows of a batch: (B, Ts, Vs), (B, Tt, Vt), B lists of groups,
    (B, Ts), (B, Tt) -> scalar. Positions no group names (padding, prompt) are never read.

    "mean" divides the sum over all paired groups of the batch by their count (one normaliser for the
    batch, like token losses here); TRL averages each sequence over its groups and then the sequences,
    which weights short sequences more. "sum" returns the plain sum (to normalise by a global count).
    ``params`` go to ``gold_span_loss`` (vocab_map, merge, beta, weights)."""
    if reduction not in ("mean", "sum"):
        raise LossInputError(f"gold_span_loss_batch: unknown reduction {reduction!r}; use 'mean' or 'sum'.")
    for name, x in (("student_log_probs", student_log_probs), ("teacher_log_probs", teacher_log_probs)):
        if not isinstance(x, Tensor) or x.dim() != 3:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise LossInputError(f"gold_span_loss_batch: {name} must be (B, T, V), got {got}.")
    b = student_log_probs.shape[0]
    sizes = {"teacher_log_probs": teacher_log_probs.shape[0], "groups": len(groups),
             "student_ids": len(student_ids), "teacher_ids": len(teacher_ids)}
    bad = {k: v for k, v in sizes.items() if v != b}
    if bad:
        k, v = next(iter(bad.items()))
        raise LossInputError(f"gold_span_loss_batch: student_log_probs has {b} rows but {k} has {v}.")
    total = (student_log_probs.sum() + teacher_log_probs.sum()) * 0.0
    count = 0
    for i in range(b):
        total = total + gold_span_loss(student_log_probs[i], teacher_log_probs[i], groups[i], student_ids[i],
                                       teacher_ids[i], reduction="sum", **params)
        count += sum(1 for g in groups[i] if g[1] > g[0] and g[3] > g[2])
    return total if reduction == "sum" else total / max(count, 1)


@register("gold", reads_logits=True, needs_targets=True, batch_keys=("span_len",), different_widths=True)
def gold_loss(
    student_logits: Tensor,
    teacher_spans: Tensor,
    mask: Tensor | None = None,
    *,
    targets: Tensor,
    span_len: Tensor,
    reduction: str = "mean",
) -> Tensor:
    """GOLD's span loss over a token batch (the engine's form of ``gold_span_loss``, "bayesian" merge,
    without a vocabulary map): the student's tokens of each aligned span merged by the chain rule and
    compared with the teacher's merged span by ULD's sorted L1.

    Rows are the flattened (B*T) positions of token sequences: row r's logits predict ``targets[r]``.
    ``span_len`` (B, T) or (N,): at the row of a span's last token, the number L of the student's
    tokens in the span (0 elsewhere). The merged student row there is
    log p(. | x_<r) + sum_{r-L < k < r} log p(x_k | x_<k) (each token's log-prob clamped at log 1e-8, as
    GOLD), exponentiated; ``teacher_spans`` (N, Vt) holds the teacher's merged span (log, unnormalised) at
    the same rows, built by ``lm.cross.CrossTokenizerTeacher``. Spans never cross a sequence (the teacher
    builds them per row), so prefix sums over the flattened rows are exact.

    ``mask`` (N,) and ``targets`` -100 drop rows; the loss is summed over valid span rows; "mean" divides by
    their count, "sum" returns the sum, "none" one value per row (0 off span ends). The token engine
    divides the sum by the batch's valid tokens. Not row-wise (a span couples its rows): run it with
    ``chunk_size: null``."""
    if reduction not in REDUCTIONS:
        raise LossInputError(f"gold: unknown reduction {reduction!r}; use one of {', '.join(map(repr, REDUCTIONS))}.")
    _check_logits("gold", "student_logits", student_logits)
    _check_logits("gold", "teacher_spans", teacher_spans)
    n = student_logits.shape[0]
    lengths = span_len.reshape(-1).long().to(student_logits.device)
    if teacher_spans.shape[0] != n or len(lengths) != n or tuple(targets.shape) != (n,):
        raise LossInputError(f"gold: student ({n} rows), teacher spans ({teacher_spans.shape[0]}), span_len "
                             f"({len(lengths)}) and targets ({tuple(targets.shape)}) must cover the same rows.")
    valid = _check_mask("gold", mask, n)
    ends = (lengths > 0) & (targets != IGNORE_INDEX)
    if valid is not None:
        ends = ends & valid
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    lp = F.log_softmax(student_logits.to(dtype), dim=-1)
    safe = torch.where(targets == IGNORE_INDEX, 0, targets).long()
    tok = lp.gather(1, safe.unsqueeze(1)).squeeze(1).clamp_min(LOG_EPS)
    csum = torch.cat([tok.new_zeros(1), tok.cumsum(0)])  # csum[i] = sum of tok[:i]
    idx = torch.arange(n, device=lp.device)
    lo = (idx - lengths + 1).clamp(min=0)
    prefix = torch.where(ends, csum[idx] - csum[lo], 0.0)  # tokens lo .. r-1 of the span
    rows = torch.zeros(n, dtype=dtype, device=lp.device)
    if bool(ends.any()):
        e = ends.nonzero().squeeze(1)
        merged_s = (lp[e] + prefix[e].unsqueeze(1)).exp()
        merged_t = teacher_spans[e].to(dtype).exp()
        rows = rows.index_put((e,), _sorted_l1(merged_s, merged_t))
    return _reduce(rows, ends, reduction)
