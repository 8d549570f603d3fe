"""Tests for distillery.losses.cross_tokenizer: ULD, span alignment, GOLD's span loss.

The losses are checked against naive references (python floats, explicit sort / pad / loops) and
hand-computed values; align_spans against hand examples and two real byte-level BPEs trained here.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from distillery import losses
from distillery.errors import DistilleryError
from distillery.losses import cross_tokenizer as X
from distillery.losses.tokens import token_loss


def one_line_error(fn, *args, match: str, **kw):
    with pytest.raises(DistilleryError, match=match) as info:
        fn(*args, **kw)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# naive references


def softmax(z, tau=1.0):
    e = [math.exp(v / tau) for v in z]
    return [v / sum(e) for v in e]


def sorted_l1(p, q):
    p, q = sorted(p, reverse=True), sorted(q, reverse=True)
    width = max(len(p), len(q))
    p, q = p + [0.0] * (width - len(p)), q + [0.0] * (width - len(q))
    return sum(abs(a - b) for a, b in zip(p, q))


def naive_uld(s, t, tau=1.0, mask=None):
    rows = [sorted_l1(softmax(a, tau), softmax(b, tau)) for a, b in zip(s.tolist(), t.tolist())]
    keep = [r for k, r in enumerate(rows) if mask is None or bool(mask[k])]
    return sum(keep) / max(len(keep), 1)


def logits(n, v, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * scale


# ---------------------------------------------------------------------------------------------
# ULD


@pytest.mark.parametrize("vs,vt", [(7, 4), (3, 9), (5, 5)])
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_uld_matches_naive_reference(vs, vt, tau):
    s, t = logits(6, vs, 0), logits(6, vt, 1)
    got = X.uld_loss(s, t, temperature=tau)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(naive_uld(s, t, tau), abs=1e-12)


def test_uld_hand_computed_three_tokens():
    # token 1: sorted s (.5 .3 .2) vs t (.6 .4 0): .1 + .1 + .2 = .4
    # token 2: s (1/3 1/3 1/3) vs t (.5 .5 0): 1/6 + 1/6 + 1/3 = 2/3
    # token 3: s (.7 .2 .1) vs t sorted (.9 .1 0): .2 + .1 + .1 = .4
    s = torch.tensor([[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3], [0.2, 0.7, 0.1]], dtype=torch.float64).log()
    t = torch.tensor([[0.4, 0.6], [0.5, 0.5], [0.1, 0.9]], dtype=torch.float64).log()
    rows = X.uld_loss(s, t, reduction="none")
    assert rows.tolist() == pytest.approx([0.4, 2 / 3, 0.4], abs=1e-12)
    assert X.uld_loss(s, t).item() == pytest.approx(22 / 45, abs=1e-12)
    assert X.uld_loss(s, t, reduction="sum").item() == pytest.approx(22 / 15, abs=1e-12)


def test_uld_zero_for_same_distribution_up_to_permutation_and_padding():
    s = logits(4, 6, 2)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    assert X.uld_loss(s, s[:, perm]).item() == pytest.approx(0.0, abs=1e-12)
    wider = torch.cat([s[:, perm], torch.full((4, 3), -math.inf, dtype=s.dtype)], dim=1)  # 3 tokens of prob. 0
    assert X.uld_loss(s, wider).item() == pytest.approx(0.0, abs=1e-12)
    assert X.uld_loss(s, logits(4, 6, 3)).item() > 0.05


def test_uld_mask_keeps_padding_garbage_out():
    s, t = logits(5, 6, 4).requires_grad_(), logits(5, 3, 5)
    mask = torch.tensor([True, False, True, True, False])
    with torch.no_grad():
        s_bad = s.clone()
        s_bad[1] = math.nan
        s_bad[4] = math.inf
    s_bad.requires_grad_()
    got = X.uld_loss(s_bad, t, mask)
    assert got.item() == pytest.approx(naive_uld(s.detach(), t, mask=mask), abs=1e-12)
    got.backward()
    assert torch.isfinite(s_bad.grad).all()
    assert s_bad.grad[~mask].abs().sum() == 0
    # targets of -100 mask rows as in every loss of the package
    y = torch.tensor([0, -100, 0, 0, -100])
    assert X.uld_loss(s, t, targets=y).item() == pytest.approx(got.item(), abs=1e-12)


def test_uld_all_masked_is_zero_with_grad():
    s = torch.full((3, 4), math.nan, dtype=torch.float64, requires_grad=True)
    t = logits(3, 5, 6)
    for reduction in ("mean", "sum"):
        out = X.uld_loss(s, t, torch.zeros(3, dtype=torch.bool), reduction=reduction)
        assert out.item() == 0.0 and out.requires_grad
        out.backward()
        assert torch.equal(s.grad, torch.zeros_like(s))
        s.grad = None
    assert X.uld_loss(s, t, torch.zeros(3, dtype=torch.bool), reduction="none").tolist() == [0.0, 0.0, 0.0]
    assert X.uld_loss(s[:0], t[:0]).item() == 0.0  # no rows at all


def test_uld_reductions():
    s, t = logits(6, 5, 7), logits(6, 8, 8)
    mask = torch.tensor([True, True, False, True, False, True])
    rows = X.uld_loss(s, t, mask, reduction="none")
    assert rows.shape == (6,) and rows[~mask].abs().sum() == 0
    assert X.uld_loss(s, t, mask, reduction="sum").item() == pytest.approx(rows.sum().item())
    assert X.uld_loss(s, t, mask).item() == pytest.approx(rows.sum().item() / 4)
    assert (rows >= 0).all() and (rows <= 2).all()


def test_uld_temperature_flattens():
    s, t = logits(4, 6, 9, scale=4.0), logits(4, 6, 10, scale=4.0)
    assert X.uld_loss(s, t, temperature=50.0) < 0.5 * X.uld_loss(s, t, temperature=1.0)
    # both uniform in the limit: 1/6 against 1/3 on three tokens, 1/6 against 0 on three: 1
    assert X.uld_loss(s, t[:, :3], temperature=1e9).item() == pytest.approx(1.0, abs=1e-6)
    one_line_error(X.uld_loss, s, t, temperature=0.0, match="temperature")


def test_uld_gradient_reaches_the_student_only_when_teacher_is_frozen():
    s = logits(4, 6, 11).requires_grad_()
    teacher = torch.nn.Linear(3, 9).double()
    with torch.no_grad():  # as the caller computes the teacher
        t = teacher(torch.randn(4, 3, dtype=torch.float64))
    X.uld_loss(s, t).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    # the loss itself does not detach the teacher (as every loss here: data-free regimes need that path)
    t2 = t.clone().requires_grad_()
    X.uld_loss(s, t2).backward()
    assert t2.grad is not None and t2.grad.abs().sum() > 0


def test_uld_half_precision_upcasts():
    s, t = logits(3, 6, 12).half(), logits(3, 4, 13).bfloat16()
    got = X.uld_loss(s, t)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(naive_uld(s.double(), t.double()), abs=1e-2)


def test_uld_registered_as_a_row_wise_logit_loss_of_any_width():
    assert losses.get("uld") is X.uld_loss
    caps = losses.capabilities("uld")
    assert caps.reads_logits and caps.row_wise and caps.different_widths and not caps.needs_targets
    # the token path (same tokenizer): chunked equals unchunked, mean over valid tokens
    s, t = logits(2 * 5, 7, 14).view(2, 5, 7), logits(2 * 5, 7, 15).view(2, 5, 7)
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(0)) > 0.3
    full = token_loss("uld", s, t, mask=mask)
    assert full.item() == pytest.approx(token_loss("uld", s, t, mask=mask, chunk_size=3).item(), abs=1e-12)
    assert full.item() == pytest.approx(naive_uld(s.view(10, 7), t.view(10, 7), mask=mask.view(10)), abs=1e-12)


def test_uld_bad_input():
    s, t = logits(4, 5, 16), logits(3, 6, 17)
    one_line_error(X.uld_loss, s, t, match="rows")
    one_line_error(X.uld_loss, s[0], t[0], match="2-D")
    one_line_error(X.uld_loss, s, logits(4, 6, 0), torch.ones(3, dtype=torch.bool), match="mask")
    one_line_error(X.uld_loss, s, logits(4, 6, 0), reduction="batchmean", match="reduction")
    one_line_error(X.uld_loss, s, logits(4, 6, 0), targets=torch.zeros(3, dtype=torch.long), match="targets")


# ---------------------------------------------------------------------------------------------
# align_spans: hand examples


def test_align_identical_offsets_are_singletons():
    off = [(0, 3), (3, 5), (5, 11)]
    assert X.align_spans(off, off) == [(0, 1, 0, 1), (1, 2, 1, 2), (2, 3, 2, 3)]
    assert X.align_spans([], []) == []


def test_align_hand_example():
    # "hello world": hel|lo|Ġworld vs hello|Ġwo|rld
    s = [(0, 3), (3, 5), (5, 11)]
    t = [(0, 5), (5, 8), (8, 11)]
    assert X.align_spans(s, t) == [(0, 2, 0, 1), (2, 3, 1, 3)]
    assert X.align_spans(t, s) == [(0, 1, 0, 2), (1, 3, 2, 3)]
    # as a tensor of offsets (what a tokenizer returns with return_tensors="pt")
    assert X.align_spans(torch.tensor(s), torch.tensor(t)) == [(0, 2, 0, 1), (2, 3, 1, 3)]


def test_align_byte_level_split_of_one_character():
    # "cé x": the student splits "é" into two byte tokens that both carry its offsets (1, 2)
    s = [(0, 1), (1, 2), (1, 2), (2, 4)]
    t = [(0, 2), (2, 4)]
    assert X.align_spans(s, t) == [(0, 3, 0, 1), (3, 4, 1, 2)]
    # teacher tokens overlapping on "é" ("c"+byte1, byte2+" x"): no boundary between them, even though
    # the student's token ends where the teacher's first one does (a walk over ends would cut there)
    t2 = [(0, 2), (1, 4)]
    assert X.align_spans(s, t2) == [(0, 4, 0, 2)]
    s2 = [(0, 1), (1, 2), (2, 4)]
    assert X.align_spans(s2, [(0, 1), (1, 2), (1, 2), (2, 4)]) == [(0, 1, 0, 1), (1, 2, 1, 3), (2, 3, 3, 4)]


def test_align_special_tokens_with_empty_spans():
    # HF gives special tokens (0, 0) wherever they sit
    s = [(0, 0), (0, 1), (1, 2), (0, 0)]  # BOS a b EOS
    t = [(0, 1), (1, 2), (0, 0)]  # a b EOS
    assert X.align_spans(s, t) == [(0, 1, 0, 0), (1, 2, 0, 1), (2, 3, 1, 2), (3, 4, 2, 3)]
    t_bos = [(0, 0), (0, 1), (1, 2), (0, 0)]
    assert X.align_spans(s, t_bos) == [(0, 1, 0, 1), (1, 2, 1, 2), (2, 3, 2, 3), (3, 4, 3, 4)]
    # a special token between two tokens: its own group at a shared boundary, inside a group otherwise
    mid = [(0, 1), (0, 0), (1, 2)]
    assert X.align_spans(mid, [(0, 1), (1, 2)]) == [(0, 1, 0, 1), (1, 2, 1, 1), (2, 3, 1, 2)]
    assert X.align_spans(mid, [(0, 2)]) == [(0, 3, 0, 1)]


def test_align_uncovered_characters():
    # a tokenizer that drops spaces ("hello world" -> hello, world) against one whose tokens carry them
    assert X.align_spans([(0, 5), (6, 11)], [(0, 5), (5, 11)]) == [(0, 1, 0, 1), (1, 2, 1, 2)]
    # trimmed offsets: a space token gets the empty span (2, 2) and pairs with the other's (1, 2)
    assert X.align_spans([(0, 1), (2, 2), (2, 3)], [(0, 1), (1, 2), (2, 3)]) == [
        (0, 1, 0, 1), (1, 2, 1, 2), (2, 3, 2, 3)]
    # a gap on each side at different places: each goes to the token after it ((2, 5) and (5, 8)),
    # so char 5 is the only boundary both sides share
    assert X.align_spans([(0, 2), (3, 5), (5, 8)], [(0, 3), (3, 5), (6, 8)]) == [(0, 2, 0, 2), (2, 3, 2, 3)]
    # leading characters one side skips go to its first token
    assert X.align_spans([(1, 6)], [(0, 1), (1, 6)]) == [(0, 1, 0, 2)]
    # trailing characters one side skips: only with the text, which says where it ends
    assert X.align_spans([(0, 2)], [(0, 2), (2, 3)], text="hi ") == [(0, 1, 0, 2)]
    one_line_error(X.align_spans, [(0, 2)], [(0, 2), (2, 3)], match="not over the same text")


def test_align_bad_offsets():
    one_line_error(X.align_spans, [(0, 5), (5, 11)], [(0, 5), (5, 20)], match="not over the same text")
    one_line_error(X.align_spans, [(0, 5), (5, 11)], [(0, 5), (5, 11)], text="hello", match="past the end")
    one_line_error(X.align_spans, [(0, 5), (5, 11), (0, 3)], [(0, 11)], match="text order")
    one_line_error(X.align_spans, [(3, 1)], [(0, 3)], match="start <= end")
    one_line_error(X.align_spans, [(0, 1, 2)], [(0, 3)], match="pairs")


def test_align_is_linear_in_length():
    n = 20000
    s = [(k, k + 1) for k in range(n)]
    t = [(2 * k, 2 * k + 2) for k in range(n // 2)]
    groups = X.align_spans(s, t)
    assert len(groups) == n // 2 and groups[-1] == (n - 2, n, n // 2 - 1, n // 2)


# ---------------------------------------------------------------------------------------------
# align_spans: two real byte-level BPEs of different vocabulary sizes

CORPUS = [
    "The café serves crème brûlée every day.",
    "Naïve students learn from wise teachers 🙂 and their notes.",
    "Distillation moves knowledge from a teacher to a student.",
    "日本語のテキストも少し。",
]
TEXTS = [
    "A naïve café teacher 🙂 says 日本語 brûlée!",
    "Students distill knowledge  from teachers.\nEvery day.",
    "  leading spaces, and a trailing one ",
    "ünïcödé 🙂🙂 everywhere",
]


def bpe(vocab_size: int, trim: bool = False):
    tk = pytest.importorskip("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    if trim:
        tok.post_processor = tk.processors.ByteLevel(trim_offsets=True)
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def span_text(text, offsets, lo, hi):
    spans = [offsets[k] for k in range(lo, hi) if offsets[k][1] > offsets[k][0]]
    return text[spans[0][0]:spans[-1][1]] if spans else ""


def check_partition(groups, ns, nt):
    assert groups[0][0] == 0 and groups[0][2] == 0
    assert groups[-1][1] == ns and groups[-1][3] == nt
    for a, b in itertools.pairwise(groups):
        assert a[1] == b[0] and a[3] == b[2]


@pytest.mark.parametrize("text", TEXTS)
def test_align_two_trained_byte_level_bpes(text):
    small, large = bpe(280), bpe(400)
    assert small.get_vocab_size() != large.get_vocab_size()
    es, et = small.encode(text), large.encode(text)
    assert es.offsets != et.offsets  # the two really tokenize differently
    groups = X.align_spans(es.offsets, et.offsets, text=text)
    check_partition(groups, len(es.ids), len(et.ids))
    texts = []
    for g in groups:
        assert g[1] > g[0] and g[3] > g[2]  # byte-level BPEs cover every character: no one-sided group
        a, b = span_text(text, es.offsets, g[0], g[1]), span_text(text, et.offsets, g[2], g[3])
        assert a == b
        # decoding each side's tokens of the group gives that text back (a split character is whole in it)
        assert small.decode(es.ids[g[0]:g[1]]) == large.decode(et.ids[g[2]:g[3]]) == a
        texts.append(a)
    assert "".join(texts) == text  # the groups cover the text
    assert any(g[1] - g[0] > 1 or g[3] - g[2] > 1 for g in groups)  # some multi-token spans


@pytest.mark.parametrize("text", TEXTS)
def test_align_trimmed_offsets_against_untrimmed(text):
    plain, trimmed = bpe(400), bpe(330, trim=True)
    es, et = plain.encode(text), trimmed.encode(text)
    groups = X.align_spans(es.offsets, et.offsets, text=text)
    check_partition(groups, len(es.ids), len(et.ids))
    for g in groups:
        if g[1] == g[0]:  # a leading trimmed space token at (0, 0) stays apart: it could be a BOS
            assert g == (0, 0, 0, 1) and et.offsets[0] == (0, 0)
            continue
        assert g[3] > g[2]
        # trimmed offsets leave spaces out of their text; the tokens still hold the same text
        assert span_text(text, es.offsets, g[0], g[1]).strip() == span_text(text, et.offsets, g[2], g[3]).strip()
        assert plain.decode(es.ids[g[0]:g[1]]).strip() == trimmed.decode(et.ids[g[2]:g[3]]).strip()


# ---------------------------------------------------------------------------------------------
# GOLD span loss


def test_vocab_map():
    student = {"a": 0, "b": 1, "c": 2}
    teacher = {"b": 0, "x": 1, "a": 2}
    assert X.vocab_map(student, teacher).tolist() == [1, -1, 0]
    assert X.vocab_map(student, teacher, size=5).tolist() == [1, -1, 0, -1, -1]
    assert X.vocab_map(student, teacher).dtype == torch.long
    one_line_error(X.vocab_map, student, teacher, size=2, match="outside")


def naive_merge(p, ids, lo, hi, merge):
    base = hi - 1 if merge == "bayesian" else lo
    factor = 1.0
    for k in range(lo, hi):
        if k != base:
            factor *= max(p[k][ids[k]], 1e-8)
    return [v * factor for v in p[base]]


def naive_jsd(ps, pt, beta):
    ls = [math.log(max(v, 1e-8)) for v in ps]
    lt = [math.log(max(v, 1e-8)) for v in pt]

    def kl(lp, lq):
        return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))

    if beta == 0:
        return kl(lt, ls)
    if beta == 1:
        return kl(ls, lt)
    lm = [math.log((1 - beta) * math.exp(a) + beta * math.exp(b)) for a, b in zip(ls, lt)]
    return beta * kl(lt, lm) + (1 - beta) * kl(ls, lm)


def naive_gold(ls, lt, groups, s_ids, t_ids, merge="bayesian", vmap=None, beta=0.5, weights=None):
    ps, pt = ls.exp().tolist(), lt.exp().tolist()
    s_ids, t_ids = s_ids.tolist(), t_ids.tolist()
    vals = []
    for s_lo, s_hi, t_lo, t_hi in groups:
        if s_hi == s_lo or t_hi == t_lo:
            continue
        a = naive_merge(ps, s_ids, s_lo, s_hi, merge)
        b = naive_merge(pt, t_ids, t_lo, t_hi, merge)
        if vmap is None:
            vals.append(sorted_l1(a, b))
            continue
        pairs = [(sid, tid) for tid, sid in enumerate(vmap) if sid >= 0]
        w_m, w_u = weights if weights else (len(pairs) / len(b), 1 - len(pairs) / len(b))
        jsd = naive_jsd([a[sid] for sid, _ in pairs], [b[tid] for _, tid in pairs], beta)
        matched_s = {sid for sid, _ in pairs}
        rest_s = [v for k, v in enumerate(a) if k not in matched_s]
        rest_t = [v for k, v in enumerate(b) if vmap[k] < 0]
        vals.append(w_m * jsd + w_u * (sorted_l1(rest_s, rest_t) if rest_s and rest_t else 0.0))
    return sum(vals) / max(len(vals), 1)


def tiny_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    ls = torch.log_softmax(torch.randn(4, 5, generator=g, dtype=torch.float64) * 2, -1)
    lt = torch.log_softmax(torch.randn(3, 6, generator=g, dtype=torch.float64) * 2, -1)
    s_ids = torch.tensor([1, 4, 0, 2])
    t_ids = torch.tensor([5, 3, 2])
    groups = [(0, 1, 0, 1), (1, 3, 1, 2), (3, 4, 2, 3), (4, 4, 3, 3)]  # last: one-sided, skipped
    vmap = torch.tensor([-1, 3, 0, -1, 2, -1])  # teacher 1->3, 2->0, 4->2
    return ls, lt, groups, s_ids, t_ids, vmap


@pytest.mark.parametrize("merge", ["bayesian", "observed"])
def test_gold_span_loss_matches_naive_uld(merge):
    ls, lt, groups, s_ids, t_ids, _ = tiny_case()
    got = X.gold_span_loss(ls, lt, groups, s_ids, t_ids, merge=merge)
    assert got.item() == pytest.approx(naive_gold(ls, lt, groups, s_ids, t_ids, merge), abs=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("weights", [None, (0.3, 2.0)])
def test_gold_span_loss_hybrid_matches_naive(beta, weights):
    ls, lt, groups, s_ids, t_ids, vmap = tiny_case(1)
    kw = {} if weights is None else {"matched_weight": weights[0], "unmatched_weight": weights[1]}
    got = X.gold_span_loss(ls, lt, groups, s_ids, t_ids, vocab_map=vmap, beta=beta, **kw)
    want = naive_gold(ls, lt, groups, s_ids, t_ids, vmap=vmap.tolist(), beta=beta, weights=weights)
    assert got.item() == pytest.approx(want, abs=1e-12)


def test_gold_bayesian_merge_is_the_chain_rule():
    # one group of the student's three tokens against one teacher token: the merged student row at the
    # last actual token is the joint probability of the span (checked through a one-hot teacher)
    ls, _, _, s_ids, _, _ = tiny_case(2)
    joint = sum(ls[k, s_ids[k]].item() for k in range(3))
    rows = X.gold_span_loss(ls, ls[:1], [(0, 3, 0, 1)], s_ids, s_ids[:1], reduction="none")
    merged = [math.exp(ls[2, v].item() + ls[0, s_ids[0]].item() + ls[1, s_ids[1]].item()) for v in range(5)]
    assert merged[s_ids[2]] == pytest.approx(math.exp(joint))
    assert rows.item() == pytest.approx(sorted_l1(merged, ls[0].exp().tolist()), abs=1e-12)


def test_gold_span_loss_zero_for_same_model_and_tokenizer():
    tok = bpe(300)
    text = TEXTS[0]
    enc = tok.encode(text)
    ids = torch.tensor(enc.ids)
    g = torch.Generator().manual_seed(3)
    lp = torch.log_softmax(torch.randn(len(ids), tok.get_vocab_size(), generator=g, dtype=torch.float64), -1)
    groups = X.align_spans(enc.offsets, enc.offsets)
    assert all(s_lo == t_lo and s_hi == t_hi for s_lo, s_hi, t_lo, t_hi in groups)
    assert any(s_hi - s_lo > 1 for s_lo, s_hi, _, _ in groups)  # tokens of one split character
    identity = X.vocab_map(tok.get_vocab(), tok.get_vocab())
    assert (identity == torch.arange(tok.get_vocab_size())).all()
    for kw in ({}, {"vocab_map": identity}, {"merge": "observed"}):
        assert X.gold_span_loss(lp, lp, groups, ids, ids, **kw).item() == pytest.approx(0.0, abs=1e-12)
    # coarser groups over the same tokens merge both sides alike: still 0
    coarse = [(0, 3, 0, 3), (3, len(ids), 3, len(ids))]
    assert X.gold_span_loss(lp, lp, coarse, ids, ids).item() == pytest.approx(0.0, abs=1e-12)
    assert X.gold_span_loss(lp, lp.roll(1, 0), groups, ids, ids).item() > 0.01


def test_gold_span_loss_between_two_tokenizers_end_to_end():
    small, large = bpe(280), bpe(400)
    text = TEXTS[1]
    es, et = small.encode(text), large.encode(text)
    groups = X.align_spans(es.offsets, et.offsets, text=text)
    g = torch.Generator().manual_seed(4)
    z_s = torch.randn(len(es.ids), small.get_vocab_size(), generator=g, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(len(et.ids), large.get_vocab_size(), generator=g, dtype=torch.float64)
    vmap = X.vocab_map(small.get_vocab(), large.get_vocab())
    assert 0 < (vmap >= 0).sum() < large.get_vocab_size()
    for kw in ({}, {"vocab_map": vmap}):
        loss = X.gold_span_loss(torch.log_softmax(z_s, -1), torch.log_softmax(z_t, -1), groups,
                                torch.tensor(es.ids), torch.tensor(et.ids), **kw)
        assert torch.isfinite(loss) and loss.item() > 0
        (grad,) = torch.autograd.grad(loss, z_s)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_gold_span_loss_reductions_and_empty():
    ls, lt, groups, s_ids, t_ids, _ = tiny_case(5)
    rows = X.gold_span_loss(ls, lt, groups, s_ids, t_ids, reduction="none")
    assert rows.shape == (4,) and rows[3].item() == 0.0  # the one-sided group
    assert X.gold_span_loss(ls, lt, groups, s_ids, t_ids, reduction="sum").item() == pytest.approx(rows.sum().item())
    assert X.gold_span_loss(ls, lt, groups, s_ids, t_ids).item() == pytest.approx(rows.sum().item() / 3)
    s = ls.clone().requires_grad_()
    out = X.gold_span_loss(s, lt, [(0, 1, 0, 0)], s_ids, t_ids)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    assert X.gold_span_loss(ls, lt, [], s_ids, t_ids, reduction="none").shape == (0,)


def test_gold_span_loss_batch():
    a, b = tiny_case(6), tiny_case(7)
    groups = [a[2], [(0, 2, 0, 1), (2, 4, 1, 3)]]
    ls, lt = torch.stack([a[0], b[0]]), torch.stack([a[1], b[1]])
    s_ids, t_ids = torch.stack([a[3], b[3]]), torch.stack([a[4], b[4]])
    total = sum(X.gold_span_loss(ls[i], lt[i], groups[i], s_ids[i], t_ids[i], reduction="sum") for i in range(2))
    got = X.gold_span_loss_batch(ls, lt, groups, s_ids, t_ids)
    assert got.item() == pytest.approx(total.item() / 5)  # 3 + 2 paired groups
    assert X.gold_span_loss_batch(ls, lt, groups, s_ids, t_ids, reduction="sum").item() == pytest.approx(total.item())
    kw = {"vocab_map": a[5], "beta": 0.2}
    total_h = sum(X.gold_span_loss(ls[i], lt[i], groups[i], s_ids[i], t_ids[i], reduction="sum", **kw)
                  for i in range(2))
    assert X.gold_span_loss_batch(ls, lt, groups, s_ids, t_ids, **kw).item() == pytest.approx(total_h.item() / 5)
    one_line_error(X.gold_span_loss_batch, ls, lt, groups[:1], s_ids, t_ids, match="groups has 1")
    one_line_error(X.gold_span_loss_batch, ls[0], lt, groups, s_ids, t_ids, match=r"\(B, T, V\)")


def test_gold_span_loss_bad_input():
    ls, lt, groups, s_ids, t_ids, _ = tiny_case()
    one_line_error(X.gold_span_loss, ls, lt, groups, s_ids[:3], t_ids, match="student_ids has 3 tokens")
    one_line_error(X.gold_span_loss, ls, lt, groups, s_ids, t_ids + 10, match="outside the vocabulary")
    one_line_error(X.gold_span_loss, ls, lt, groups, s_ids.float(), t_ids, match="integer")
    one_line_error(X.gold_span_loss, ls, lt, [(0, 5, 0, 1)], s_ids, t_ids, match="inside")
    one_line_error(X.gold_span_loss, ls[None], lt, groups, s_ids, t_ids, match="one sequence")
    one_line_error(X.gold_span_loss, ls, lt, groups, s_ids, t_ids, merge="mean", match="merge")
    one_line_error(X.gold_span_loss, ls, lt, groups, s_ids, t_ids, beta=2.0, match="beta")
    one_line_error(X.gold_span_loss, ls, lt, groups, s_ids, t_ids, matched_weight=0.5, match="together")
    one_line_error(X.gold_span_loss, ls, lt, groups, s_ids, t_ids, vocab_map=torch.full((7,), -1), match="entries")
    one_line_error(X.gold_span_loss, ls, lt, groups, s_ids, t_ids, vocab_map=torch.tensor([1, 1]), match="distinct")
    one_line_error(X.gold_span_loss, ls, lt, groups, s_ids, t_ids, vocab_map=torch.tensor([9]), match="distinct")
    one_line_error(X.gold_span_loss, ls, lt, groups, s_ids, t_ids, reduction="batchmean", match="reduction")
