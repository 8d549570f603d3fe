"""Token-level losses over (B, T, V): naive references, hand values, chunking, masks, normalisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillery.losses import get
from distillery.losses.logits import LossInputError
from distillery.losses.sparse import TopK
from distillery.losses.tokens import token_loss
from distillery.objective import Objective, Term

LOSSES = [("kd", {"temperature": 2.0}), ("reverse_kl", {"temperature": 1.5}), ("generalized_jsd", {"beta": 0.3}),
          ("skew_kl", {"alpha": 0.2}), ("skew_reverse_kl", {"alpha": 0.4}), ("tvd", {}), ("ce", {})]


def _inputs(b=3, t=5, v=7, seed=0, p_mask=0.3):
    g = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(b, t, v, generator=g)).requires_grad_()
    te = 3 * torch.randn(b, t, v, generator=g)
    mask = torch.rand(b, t, generator=g) > p_mask
    y = torch.randint(0, v, (b, t), generator=g)
    return s, te, mask, y


def _call(name, s, te, mask, y, **kw):
    params = dict(dict(LOSSES)[name])
    if name == "ce":
        return token_loss(name, s, None, mask=mask, targets=y, **params, **kw)
    return token_loss(name, s, te, mask=mask, **params, **kw)


@pytest.mark.parametrize("name", [n for n, _ in LOSSES])
def test_matches_naive_per_token_loop(name):
    s, te, mask, y = _inputs()
    fn, params = get(name), dict(LOSSES)[name]
    rows = []
    for b in range(s.shape[0]):
        for t in range(s.shape[1]):
            if mask[b, t]:
                kw = {"targets": y[b, t:t + 1]} if name == "ce" else {}
                rows.append(fn(s[b, t:t + 1], None if name == "ce" else te[b, t:t + 1], **kw, **params))
    want = torch.stack(rows).mean()
    got = _call(name, s, te, mask, y)
    assert torch.allclose(got, want, atol=1e-6)


def test_forward_kl_hand_value_and_masked_garbage():
    # teacher p = (1/4, 3/4), student q = (1/2, 1/2): KL(p || q) = 1/4 ln(1/2) + 3/4 ln(3/2)
    s = torch.tensor([[[0.0, 0.0], [float("nan"), float("inf")]]], requires_grad=True)
    te = torch.tensor([[[0.0, math.log(3.0)], [float("inf"), 0.0]]])
    mask = torch.tensor([[True, False]])
    got = token_loss("kd", s, te, mask=mask, temperature=1.0)
    assert got.item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)
    got.backward()
    assert torch.isfinite(s.grad).all() and (s.grad[0, 1] == 0).all()


def test_temperature_scaling_of_kd():
    s, te, mask, _ = _inputs()
    tau = 2.0
    got = token_loss("kd", s, te, mask=mask, temperature=tau)
    p = F.softmax(te[mask] / tau, -1)
    want = tau**2 * (p * (p.log() - F.log_softmax(s[mask] / tau, -1))).sum(-1).mean()
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("name", [n for n, _ in LOSSES])
@pytest.mark.parametrize("chunk", [1, 4, 14])
def test_chunked_equals_unchunked_values_and_gradients(name, chunk):
    s, te, mask, y = _inputs()
    te = te.clone().requires_grad_(name != "ce")
    ref = _call(name, s, te, mask, y)
    grads_ref = torch.autograd.grad(ref, [s] + ([te] if name != "ce" else []))
    got = _call(name, s, te, mask, y, chunk_size=chunk)
    grads = torch.autograd.grad(got, [s] + ([te] if name != "ce" else []))
    assert torch.allclose(got, ref, atol=1e-6)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-6)


def test_chunked_sparse_teacher_equals_unchunked():
    s, te, mask, _ = _inputs(v=9)
    logp = F.log_softmax(te, -1)
    vals, idx = logp.topk(3, dim=-1)
    tail = logp.scatter(-1, idx, float("-inf")).logsumexp(-1)
    sparse = TopK(vals, idx, tail, 9)
    ref = token_loss("kd", s, sparse, mask=mask, temperature=1.0)
    g_ref, = torch.autograd.grad(ref, s)
    got = token_loss("kd", s, sparse, mask=mask, temperature=1.0, chunk_size=4)
    g, = torch.autograd.grad(got, s)
    assert torch.allclose(got, ref, atol=1e-6) and torch.allclose(g, g_ref, atol=1e-6)
    # k = V keeps everything: the sparse loss is the dense one
    vals, idx = logp.topk(9, dim=-1)
    full = token_loss("kd", s, TopK(vals, idx, None, 9), mask=mask, temperature=1.0)
    assert torch.allclose(full, token_loss("kd", s, te, mask=mask, temperature=1.0), atol=1e-5)


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("name", [n for n, _ in LOSSES])
def test_all_masked_batch_is_a_finite_zero(name, chunk):
    s, te, _, y = _inputs()
    mask = torch.zeros(s.shape[:2], dtype=torch.bool)
    got = _call(name, s, te, mask, y, chunk_size=chunk)
    assert got.item() == 0.0
    g, = torch.autograd.grad(got, s)
    assert torch.isfinite(g).all() and (g == 0).all()


def test_normaliser_over_uneven_micro_batches():
    """Two micro-batches with 3 and 9 valid tokens: each divided by the global count sums to the
    mean over all 12, not to the mean of the two means."""
    s, te, _, _ = _inputs(b=2, t=8)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, :] = torch.tensor([True] * 8)
    mask[1, 0] = False
    mask[0, 7] = True  # 4 and 7 valid tokens
    whole = token_loss("kd", s, te, mask=mask, temperature=1.0)
    n = int(mask.sum())
    parts = sum(token_loss("kd", s[i:i + 1], te[i:i + 1], mask=mask[i:i + 1], temperature=1.0, normalizer=n)
                for i in range(2))
    assert torch.allclose(parts, whole, atol=1e-6)
    mean_of_means = sum(token_loss("kd", s[i:i + 1], te[i:i + 1], mask=mask[i:i + 1], temperature=1.0)
                        for i in range(2)) / 2
    assert not torch.allclose(mean_of_means, whole, atol=1e-4)


def test_objective_weights_micro_batches_by_their_valid_tokens():
    """The engine's factors (count / global count) turn per-micro-batch token means into the step's mean."""
    s, te, _, _ = _inputs(b=4, t=6)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(3)) > 0.5
    mask[0] = False  # one sequence with no valid token
    obj = Objective([Term("kd", params={"temperature": 1.0})], chunk_size=5)
    masked = obj.label_masked(True, True, tokens=True)
    assert masked == [True]
    halves = [{"x": torch.zeros(2, 6), "mask": mask[i:i + 2], "y": torch.zeros(2, 6, dtype=torch.long)} for i in (0, 2)]
    counts = [obj.valid_counts(b, masked)[0] for b in halves]
    total = sum(counts)
    step = sum(obj({"logits": s[i:i + 2]}, {"logits": te[i:i + 2]}, b, [c / total])["total"]
               for i, b, c in zip((0, 2), halves, counts))
    assert torch.allclose(step, token_loss("kd", s, te, mask=mask, temperature=1.0), atol=1e-6)


def test_bad_inputs_are_named():
    s, te, mask, _ = _inputs()
    with pytest.raises(LossInputError, match=r"\(B, T, V\)"):
        token_loss("kd", s[0], te[0], mask=mask[0])
    with pytest.raises(LossInputError, match="mask must be a bool tensor"):
        token_loss("kd", s, te, mask=mask.float())
    with pytest.raises(LossInputError, match="padded vocabulary"):
        token_loss("kd", s, torch.randn(3, 5, 9), mask=mask)
    with pytest.raises(LossInputError, match="chunk_size"):
        token_loss("kd", s, te, mask=mask, chunk_size=0)


def test_losses_that_couple_rows_or_learn_refuse_chunks():
    s, te, mask, _ = _inputs()
    with pytest.raises(LossInputError, match="couples rows"):
        token_loss("dist", s, te, mask=mask, chunk_size=4)
    token_loss("dist", s, te, mask=mask)  # unchunked it runs
    from distillery.losses import capable

    @capable(row_wise=True)
    def weighted(a, b, *, mask, reduction, weight):
        return (a * weight).sum()
    w = torch.ones(7, requires_grad=True)
    with pytest.raises(LossInputError, match="trainable inputs"):
        token_loss(weighted, s, te, mask=mask, chunk_size=4, weight=w)


def test_hidden_state_terms_average_over_valid_tokens_only():
    g = torch.Generator().manual_seed(1)
    hs, ht = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[True, True, False, False, False], [True, True, True, True, False]])
    hs[~mask] = 1e6  # padding garbage never reaches the value
    obj = Objective([Term("hint", student="h", teacher="h", adapter="none")])
    obj.built = True
    batch = {"x": torch.zeros(2, 5), "mask": mask, "y": torch.zeros(2, 5, dtype=torch.long)}
    got = obj({"logits": torch.zeros(2, 5, 3), "h": hs}, {"logits": torch.zeros(2, 5, 3), "h": ht}, batch)["terms"]["hint"]
    assert torch.allclose(got, get("hint")(hs[mask], ht[mask]))
    assert obj.valid_counts(batch, obj.label_masked(False, True, tokens=True)) == [6]
