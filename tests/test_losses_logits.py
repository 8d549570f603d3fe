"""Tests for distillery.losses.logits.

Every registered logit loss is checked against a naive float64 reference written with explicit
loops and plain probability formulas, against hand-computed values, and on the edge cases
(masking, reductions, extreme logits, half precision, bad input).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from distillery import losses
from distillery.errors import DistilleryError
from distillery.losses import logits as L

EXPECTED = {
    "kd", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl", "tvd",
    "dkd", "dist", "kd_standardized", "pld", "ce",
}  # fmt: skip
# every loss registered from the logits module, so that a new one is picked up by the tests below
NAMES = sorted(n for n in losses.names() if getattr(losses.get(n), "__module__", None) == L.__name__)
NEEDS_TARGETS = {"dkd", "pld", "ce"}
BATCH_LEVEL = {"dist"}  # does not split into rows
ROW_WISE = [n for n in NAMES if n not in BATCH_LEVEL]
ZERO_AT_IDENTITY = [n for n in NAMES if n not in {"ce", "pld"}]
WITH_TEMPERATURE = [n for n in NAMES if "temperature" in inspect.signature(losses.get(n)).parameters]
LN2, LN3 = math.log(2.0), math.log(3.0)


def call(name, s, t, y=None, **kw):
    return losses.get(name)(s, t, targets=y, **kw)


def batch(n=6, c=5, seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, c, generator=g, dtype=dtype) * scale
    t = torch.randn(n, c, generator=g, dtype=dtype) * scale
    y = torch.randint(0, c, (n,), generator=g)
    return s, t, y


# ---------------------------------------------------------------------------------------------
# naive references: python floats, loops, p = exp(z) / sum exp(z), no log-space tricks


def softmax(z, tau=1.0):
    e = [math.exp(v / tau) for v in z]
    total = sum(e)
    return [v / total for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def naive_kd(s, t, y, temperature=4.0):
    return temperature**2 * kl(softmax(t, temperature), softmax(s, temperature))


def naive_reverse_kl(s, t, y, temperature=1.0):
    return kl(softmax(s, temperature), softmax(t, temperature))


def naive_generalized_jsd(s, t, y, beta=0.5, temperature=1.0):
    pt, ps = softmax(t, temperature), softmax(s, temperature)
    if beta == 0:
        return kl(pt, ps)
    if beta == 1:
        return kl(ps, pt)
    m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
    return beta * kl(pt, m) + (1 - beta) * kl(ps, m)


def naive_skew_kl(s, t, y, alpha=0.1, temperature=1.0):
    pt, ps = softmax(t, temperature), softmax(s, temperature)
    return kl(pt, [alpha * a + (1 - alpha) * b for a, b in zip(pt, ps)])


def naive_skew_reverse_kl(s, t, y, alpha=0.1, temperature=1.0):
    pt, ps = softmax(t, temperature), softmax(s, temperature)
    return kl(ps, [alpha * b + (1 - alpha) * a for a, b in zip(pt, ps)])


def naive_tvd(s, t, y, temperature=1.0):
    pt, ps = softmax(t, temperature), softmax(s, temperature)
    return 0.5 * sum(abs(a - b) for a, b in zip(pt, ps))


def naive_dkd(s, t, y, alpha=1.0, beta=8.0, temperature=4.0):
    # mdistiller's dkd_loss written out: binary (p_y, 1 - p_y), and z_y / tau - 1000 for NCKD
    tau = temperature
    ps, pt = softmax(s, tau), softmax(t, tau)
    tckd = kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
    push = [-1000.0 if c == y else 0.0 for c in range(len(s))]
    pt2 = softmax([v / tau + d for v, d in zip(t, push)])
    ps2 = softmax([v / tau + d for v, d in zip(s, push)])
    return tau**2 * (alpha * tckd + beta * kl(pt2, ps2))


def naive_kd_standardized(s, t, y, temperature=2.0):
    def standardize(z):
        mean = sum(z) / len(z)
        std = math.sqrt(sum((v - mean) ** 2 for v in z) / (len(z) - 1))
        return [(v - mean) / (std + 1e-7) for v in z]

    return naive_kd(standardize(s), standardize(t), y, temperature)


def naive_pld(s, t, y, temperature=1.0):
    ranking = [y, *sorted((c for c in range(len(s)) if c != y), key=lambda c: -t[c])]
    q = softmax(t, temperature)
    total = 0.0
    for k, c in enumerate(ranking):
        chosen = math.exp(s[c]) / sum(math.exp(s[j]) for j in ranking[k:])
        total += q[c] * -math.log(chosen)
    return total


def naive_ce(s, t, y, label_smoothing=0.0):
    p = softmax(s)
    eps = label_smoothing
    return -(1 - eps) * math.log(p[y]) - eps / len(s) * sum(math.log(v) for v in p)


def naive_dist(S, T, Y, beta=1.0, gamma=1.0, temperature=1.0):
    def pearson(a, b):
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        a, b = [v - ma for v in a], [v - mb for v in b]
        num = sum(x * z for x, z in zip(a, b))
        return num / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(z * z for z in b)) + 1e-8)

    ys = [softmax(r, temperature) for r in S]
    yt = [softmax(r, temperature) for r in T]
    n, c = len(ys), len(ys[0])
    inter = sum(1 - pearson(ys[i], yt[i]) for i in range(n)) / n
    intra = sum(1 - pearson([ys[i][j] for i in range(n)], [yt[i][j] for i in range(n)]) for j in range(c)) / c
    return temperature**2 * (beta * inter + gamma * intra)


NAIVE_ROW = {
    "kd": naive_kd,
    "reverse_kl": naive_reverse_kl,
    "generalized_jsd": naive_generalized_jsd,
    "skew_kl": naive_skew_kl,
    "skew_reverse_kl": naive_skew_reverse_kl,
    "tvd": naive_tvd,
    "dkd": naive_dkd,
    "kd_standardized": naive_kd_standardized,
    "pld": naive_pld,
    "ce": naive_ce,
}
NAIVE_BATCH = {"dist": naive_dist}

PARAMS = {
    "kd": [{}, {"temperature": 2.5}],
    "reverse_kl": [{}, {"temperature": 0.7}],
    "generalized_jsd": [{}, {"beta": 0.2, "temperature": 2.0}, {"beta": 0.0}, {"beta": 1.0}],
    "skew_kl": [{}, {"alpha": 0.4, "temperature": 3.0}, {"alpha": 0.0}],
    "skew_reverse_kl": [{}, {"alpha": 0.4, "temperature": 3.0}, {"alpha": 0.0}],
    "tvd": [{}, {"temperature": 2.0}],
    "dkd": [{}, {"alpha": 0.5, "beta": 2.0, "temperature": 1.5}],
    "dist": [{}, {"beta": 2.0, "gamma": 0.5, "temperature": 4.0}],
    "kd_standardized": [{}, {"temperature": 1.0}],
    "pld": [{}, {"temperature": 4.0}],
    "ce": [{}, {"label_smoothing": 0.1}],
}
CASES = [pytest.param(n, p, id=f"{n}-{i}") for n in NAMES for i, p in enumerate(PARAMS.get(n, [{}]))]


def naive_mean(name, s, t, y, params):
    S, T, Y = s.tolist(), t.tolist(), y.tolist()
    if name in NAIVE_BATCH:
        return NAIVE_BATCH[name](S, T, Y, **params)
    rows = [NAIVE_ROW[name](a, b, c, **params) for a, b, c in zip(S, T, Y)]
    return sum(rows) / len(rows)


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_holds_exactly_the_logit_losses():
    assert set(NAMES) == EXPECTED
    for name in NAMES:
        assert losses.get(name) is getattr(L, name)


def test_every_loss_has_a_reference_params_and_a_hand_value():
    assert set(NAIVE_ROW) | set(NAIVE_BATCH) == set(NAMES)
    assert set(PARAMS) == set(NAMES)
    assert {case.values[0] for case in HAND} == set(NAMES)


# ---------------------------------------------------------------------------------------------
# (1) naive references


@pytest.mark.parametrize(("name", "params"), CASES)
def test_matches_naive_reference_float64(name, params):
    s, t, y = batch()
    got = call(name, s, t, y, **params)
    assert got.dtype == torch.float64
    torch.testing.assert_close(
        got, torch.tensor(naive_mean(name, s, t, y, params), dtype=torch.float64), rtol=1e-9, atol=1e-12
    )
    if name in NAIVE_ROW:
        rows = call(name, s, t, y, reduction="none", **params)
        want = [NAIVE_ROW[name](a, b, c, **params) for a, b, c in zip(s.tolist(), t.tolist(), y.tolist())]
        torch.testing.assert_close(rows, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("name", "params"), CASES)
def test_matches_naive_reference_float32(name, params):
    s, t, y = batch(n=16, c=10, seed=1, dtype=torch.float32, scale=3.0)
    got = call(name, s, t, y, **params)
    assert got.dtype == torch.float32
    want = naive_mean(name, s.double(), t.double(), y, params)
    assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# (2) hand-computed values

HAND = [
    # p_t = softmax(0, ln3) = (1/4, 3/4), p_s = (1/2, 1/2):
    # KL(p_t||p_s) = 1/4 ln(1/2) + 3/4 ln(3/2) = -0.173287 + 0.304099 = 0.130812
    pytest.param("kd", [[0.0, 0.0]], [[0.0, LN3]], [0], {"temperature": 1.0}, 0.130812036, id="kd-T1"),
    # at T=2 the teacher (0, 2 ln3) softens to the same (1/4, 3/4): 2^2 * 0.130812 = 0.523248
    pytest.param("kd", [[0.0, 0.0]], [[0.0, 2 * LN3]], [0], {"temperature": 2.0}, 0.523248144, id="kd-T2"),
    # KL(p_s||p_t) = 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.143841
    pytest.param("reverse_kl", [[0.0, 0.0]], [[0.0, LN3]], [0], {}, 0.143841036, id="reverse_kl"),
    # m = (3/8, 5/8); 1/2 [1/4 ln(2/3) + 3/4 ln(6/5)] + 1/2 [1/2 ln(4/3) + 1/2 ln(4/5)]
    #   = 1/2 (0.035370) + 1/2 (0.032274) = 0.033822
    pytest.param("generalized_jsd", [[0.0, 0.0]], [[0.0, LN3]], [0], {}, 0.033822076, id="gjsd"),
    # m = 0.1 (1/4, 3/4) + 0.9 (1/2, 1/2) = (0.475, 0.525);
    # 1/4 ln(0.25/0.475) + 3/4 ln(0.75/0.525) = -0.160466 + 0.267509 = 0.107043
    pytest.param("skew_kl", [[0.0, 0.0]], [[0.0, LN3]], [0], {}, 0.107042736, id="skew_kl"),
    # m = 0.1 (1/2, 1/2) + 0.9 (1/4, 3/4) = (0.275, 0.725);
    # 1/2 ln(0.5/0.275) + 1/2 ln(0.5/0.725) = 0.298921 - 0.185784 = 0.113137
    pytest.param("skew_reverse_kl", [[0.0, 0.0]], [[0.0, LN3]], [0], {}, 0.113136722, id="skew_reverse_kl"),
    # 1/2 (|1/4 - 1/2| + |3/4 - 1/2|) = 1/4
    pytest.param("tvd", [[0.0, 0.0]], [[0.0, LN3]], [0], {}, 0.25, id="tvd"),
    # y = 0, T = 1: p_t = (1/4, 1/2, 1/4), p_s = (1/3, 1/3, 1/3).
    # TCKD = KL((1/4, 3/4) || (1/3, 2/3)) = 1/4 ln(3/4) + 3/4 ln(9/8) = 0.016417
    # NCKD = KL((2/3, 1/3) || (1/2, 1/2)) = 2/3 ln(4/3) + 1/3 ln(2/3) = 0.056633
    # 1 * 0.016417 + 8 * 0.056633 = 0.469481
    pytest.param(
        "dkd", [[0.0, 0.0, 0.0]], [[0.0, LN2, 0.0]], [0], {"temperature": 1.0}, 0.469480857, id="dkd"
    ),
    # p_s = ((3/4, 1/4), (1/4, 3/4)), p_t the mirror image: every Pearson (per row over classes,
    # per class over the batch) is -1, so inter = intra = 2 and the loss is 2 + 2 = 4 (less ~3e-7 from eps)
    pytest.param("dist", [[LN3, 0.0], [0.0, LN3]], [[0.0, LN3], [LN3, 0.0]], [0, 0], {}, 4.0, id="dist"),
    # any two distinct logits standardise to (-1/sqrt2, +1/sqrt2); /T=2 and mirrored teacher:
    # p_s = (sig(-x), sig(x)), p_t = (sig(x), sig(-x)) with x = 1/sqrt2;
    # KL = (p_t1 - p_s1) ln(p_t1/p_s1) = tanh(x/2) * x = 0.240079; * T^2 = 0.960316
    pytest.param("kd_standardized", [[0.0, 5.0]], [[3.0, 0.0]], [0], {}, 0.960316342, id="kd_standardized"),
    # y = 2, teacher prefers class 1: ranking = (2, 1, 0), q = softmax(0, ln2, 0) = (1/4, 1/2, 1/4)
    # exp(s) = (1, 2, 3): step 1 picks class 2 from {3, 2, 1}: -ln(3/6) = ln2, weight q_2 = 1/4;
    # step 2 picks class 1 from {2, 1}: -ln(2/3), weight q_1 = 1/2; step 3: 0.
    # 1/4 ln2 + 1/2 ln(3/2) = 0.173287 + 0.202733 = 0.376019
    pytest.param("pld", [[0.0, LN2, LN3]], [[0.0, LN2, 0.0]], [2], {}, 0.376019349, id="pld"),
    # two classes, uniform teacher: step 1 -ln(1/4) = ln4 with weight 1/2, step 2 is 0: ln 2
    pytest.param("pld", [[0.0, LN3]], [[0.0, 0.0]], [0], {}, LN2, id="pld-C2"),
    # -ln(3/4) = 0.287682
    pytest.param("ce", [[0.0, LN3]], [[9.0, 9.0]], [1], {}, 0.287682072, id="ce"),
    # 0.9 * 0.287682 + 0.1 * 1/2 (ln4 + ln(4/3)) = 0.258914 + 0.083699 = 0.342613
    pytest.param("ce", [[0.0, LN3]], None, [1], {"label_smoothing": 0.1}, 0.342612687, id="ce-ls"),
]


@pytest.mark.parametrize(("name", "s", "t", "y", "params", "expected"), HAND)
def test_hand_computed_value(name, s, t, y, params, expected):
    s = torch.tensor(s, dtype=torch.float64)
    t = torch.tensor(t, dtype=torch.float64) if t is not None else None
    got = call(name, s, t, torch.tensor(y), **params)
    assert got.item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# (3) edge cases


@pytest.mark.parametrize("name", ZERO_AT_IDENTITY)
def test_identical_logits_give_zero(name):
    s, _, y = batch(n=8, c=6, seed=2)
    assert abs(call(name, s, s.clone(), y).item()) < 1e-6


@pytest.mark.parametrize("name", ["ce", "pld"])
def test_ce_and_pld_stay_positive_at_identical_logits(name):
    s, _, y = batch(n=8, c=6, seed=2)
    assert call(name, s, s.clone(), y).item() > 0.1


def _standardize(z):
    return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-7)


TEMPERATURE_RULES = {
    # loss(s, t, tau) == tau^2 * loss(s / tau, t / tau, tau=1)
    "kd": "tau2", "dkd": "tau2", "dist": "tau2",
    # loss(s, t, tau) == loss(s / tau, t / tau, tau=1)
    "reverse_kl": "divide", "generalized_jsd": "divide", "skew_kl": "divide",
    "skew_reverse_kl": "divide", "tvd": "divide",
    "kd_standardized": "standardize_then_kd",
    "pld": "teacher_weights_only",
}  # fmt: skip


@pytest.mark.parametrize("name", WITH_TEMPERATURE)
def test_temperature_scaling(name):
    s, t, y = batch(n=8, c=6, seed=3)
    tau = 3.0
    f = losses.get(name)
    got = f(s, t, targets=y, temperature=tau)
    rule = TEMPERATURE_RULES[name]
    if rule == "tau2":
        want = tau**2 * f(s / tau, t / tau, targets=y, temperature=1.0)
    elif rule == "divide":
        want = f(s / tau, t / tau, targets=y, temperature=1.0)
    elif rule == "standardize_then_kd":
        want = L.kd(_standardize(s), _standardize(t), temperature=tau)
        # standardisation removes each row's shift and scale
        torch.testing.assert_close(f(3.0 * s + 1.0, 0.5 * t - 2.0, temperature=tau), got)
    else:  # pld: tau softens the teacher weights only; the student's PL likelihood is unsoftened
        want = f(s, t / tau, targets=y, temperature=1.0)
        assert abs(f(s / tau, t / tau, targets=y, temperature=1.0).item() - got.item()) > 1e-3
    torch.testing.assert_close(got, want)
    assert abs(got.item() - f(s, t, targets=y, temperature=1.0).item()) > 1e-4  # tau does something


def _extreme(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.sign(torch.randn(6, 5, generator=g)) * 1e4
    z[0] = torch.tensor([1e4, -1e4, 0.0, 1e4, -1e4])  # a huge gap within one row
    z[1] = torch.tensor([3e4, -3e4, 0.0, 0.0, 0.0])
    return z


@pytest.mark.parametrize("name", NAMES)
def test_extreme_logits_stay_finite_with_finite_grads(name):
    s = _extreme(4).requires_grad_(True)
    t = _extreme(5)
    y = torch.tensor([1, 0, 2, 3, 4, 0])
    loss = call(name, s, t, y)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_a_3e4_shift_changes_neither_value_nor_float32_gradient(name):
    # integer logits, so s + 3e4 is exact in float32 and every loss here is shift invariant;
    # catches float32 precision loss at large magnitudes (e.g. logcumsumexp's backward in pld)
    g = torch.Generator().manual_seed(23)
    s0 = torch.randint(-6, 7, (6, 8), generator=g).float()
    t0 = torch.randint(-6, 7, (6, 8), generator=g).float()
    y = torch.randint(0, 8, (6,), generator=g)
    out = []
    for offset in (0.0, 3e4):
        s = (s0 + offset).requires_grad_(True)
        loss = call(name, s, t0 + offset, y)
        loss.backward()
        out.append((loss, s.grad))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=0.0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_constant_rows_have_finite_gradients(name):
    s = torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0], [1.0, -1.0, 0.5]], requires_grad=True)
    t = torch.tensor([[1.0, 1.0, 1.0], [0.0, 3.0, 1.0], [5.0, 5.0, 5.0]])
    loss = call(name, s, t, torch.tensor([0, 1, 2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", ["kd", "generalized_jsd", "skew_kl", "skew_reverse_kl", "tvd", "dkd", "pld"])
def test_teacher_minus_inf_logits_are_finite(name):
    s, t, y = batch(n=4, c=5, seed=6)
    t[:, 3] = -math.inf  # e.g. a masked vocabulary entry
    y = torch.tensor([0, 1, 2, 4])
    s.requires_grad_(True)
    loss = call(name, s, t, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mask_equals_loss_on_the_subset(name, reduction):
    s, t, y = batch(n=8, c=5, seed=7)
    mask = torch.tensor([True, False, True, True, False, True, False, True])
    s[~mask] = torch.tensor([math.nan, math.inf, -math.inf, 1e30, 0.0], dtype=s.dtype)  # padding garbage
    t[~mask] = math.nan
    s.requires_grad_(True)
    got = call(name, s, t, y, mask=mask, reduction=reduction)
    want = call(name, s.detach()[mask], t[mask], y[mask], reduction=reduction)
    torch.testing.assert_close(got, want)
    got.backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad[~mask] == 0).all() and (s.grad[mask] != 0).any()


@pytest.mark.parametrize("name", NAMES)
def test_minus_100_targets_mask_rows(name):
    s, t, y = batch(n=6, c=5, seed=8)
    ignored = y.clone()
    ignored[[1, 4]] = -100
    mask = torch.tensor([True, False, True, True, False, True])
    torch.testing.assert_close(call(name, s, t, ignored), call(name, s, t, y, mask=mask))


def test_ce_matches_torch_cross_entropy_with_ignore_index():
    s, _, y = batch(n=8, c=5, seed=9)
    y[[0, 5]] = -100
    want = F.cross_entropy(s, y, ignore_index=-100, label_smoothing=0.1)
    torch.testing.assert_close(L.ce(s, None, targets=y, label_smoothing=0.1), want)


def test_ce_with_soft_targets_matches_torch_and_a_hand_value():
    s, t, y = batch(n=6, c=4, seed=11)
    q = t.softmax(-1)
    want = F.cross_entropy(s, q, label_smoothing=0.2)
    torch.testing.assert_close(L.ce(s, None, targets=q, label_smoothing=0.2), want)
    one_hot = F.one_hot(y, 4).float()  # one-hot probabilities are the hard labels
    torch.testing.assert_close(L.ce(s, None, targets=one_hot), L.ce(s, None, targets=y))
    mask = torch.tensor([True, False, True, True, False, True])
    torch.testing.assert_close(L.ce(s, None, targets=q, mask=mask, reduction="sum"),
                               F.cross_entropy(s[mask], q[mask], reduction="sum"))
    # by hand: logits (0, ln 3) -> p = (1/4, 3/4); q = (1/2, 1/2): -(ln(1/4) + ln(3/4)) / 2
    hand = L.ce(torch.tensor([[0.0, math.log(3.0)]]), None, targets=torch.tensor([[0.5, 0.5]]))
    assert hand.item() == pytest.approx(-(math.log(0.25) + math.log(0.75)) / 2, rel=1e-6)
    with pytest.raises(DistilleryError, match="soft targets"):
        L.ce(s, None, targets=q[:, :3])
    with pytest.raises(DistilleryError, match="soft targets"):
        L.ce(s, None, targets=-q)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_rows_masked_is_an_exact_finite_zero(name, reduction):
    s, t, y = batch(n=4, c=5, seed=10)
    s.requires_grad_(True)
    by_mask = {"y": y, "mask": torch.zeros(4, dtype=torch.bool)}
    by_targets = {"y": torch.full((4,), -100), "mask": None}
    for case in (by_mask, by_targets):
        loss = call(name, s, t, case["y"], mask=case["mask"], reduction=reduction)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.isfinite(s.grad).all() and (s.grad == 0).all()
        s.grad = None


@pytest.mark.parametrize("name", NAMES)
def test_reductions_are_consistent(name):
    s, t, y = batch(n=7, c=5, seed=11)
    mask = torch.tensor([True, True, False, True, True, False, True])
    mean = call(name, s, t, y, mask=mask)
    total = call(name, s, t, y, mask=mask, reduction="sum")
    torch.testing.assert_close(total, mean * mask.sum())
    if name in BATCH_LEVEL:
        with pytest.raises(ValueError, match=rf"{name}.*'none'"):
            call(name, s, t, y, reduction="none")
        return
    rows = call(name, s, t, y, mask=mask, reduction="none")
    assert rows.shape == (7,)
    assert (rows[~mask] == 0).all()
    torch.testing.assert_close(rows.sum(), total)
    torch.testing.assert_close(call(name, s, t, y), call(name, s, t, y, reduction="none").mean())


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch_gives_zero(name):
    s = torch.zeros(0, 5)
    assert call(name, s, s.clone(), torch.zeros(0, dtype=torch.long)).item() == 0.0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input(name, dtype):
    s, t, y = batch(n=8, c=6, seed=12, dtype=torch.float32)
    s16, t16 = s.to(dtype).requires_grad_(True), t.to(dtype)
    loss = call(name, s16, t16, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # upcast before any arithmetic: identical to the float32 loss of the same (rounded) values
    torch.testing.assert_close(loss, call(name, s16.detach().float(), t16.float(), y))
    loss.backward()
    assert s16.grad.dtype == dtype and torch.isfinite(s16.grad.float()).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_the_student_and_needs_no_teacher_grad(name):
    s, t, y = batch(n=6, c=5, seed=13, dtype=torch.float32)
    s.requires_grad_(True)
    with torch.no_grad():
        t = t * 1.0  # as an objective would compute it
    loss = call(name, s, t if name != "ce" else None, y)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert not t.requires_grad and t.grad is None


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_against_finite_differences(name):
    s, t, y = batch(n=3, c=4, seed=14)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: call(name, x, t, y), (s,))


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("name", [n for n in NAMES if n != "ce"])
def test_shape_mismatch_names_both_shapes(name):
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 6\)"):
        call(name, torch.randn(4, 5), torch.randn(4, 6), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(5,), (2, 3, 5)])
def test_not_2d_raises(name, shape):
    with pytest.raises(ValueError, match="2-D"):
        call(name, torch.randn(*shape), torch.randn(*shape), torch.zeros(shape[0], dtype=torch.long))


@pytest.mark.parametrize("name", NAMES)
def test_missing_targets(name):
    s, t, _ = batch(n=4, c=5, seed=15)
    if name in NEEDS_TARGETS:
        with pytest.raises(ValueError, match=rf"{name} needs `targets`.*argmax"):
            call(name, s, t)
    else:
        assert torch.isfinite(call(name, s, t))


@pytest.mark.parametrize("name", NAMES)
def test_bad_targets_mask_and_reduction(name):
    s, t, y = batch(n=4, c=5, seed=16)
    with pytest.raises(ValueError, match="reduction"):
        call(name, s, t, y, reduction="batchmean")
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        call(name, s, t, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="integer"):
        call(name, s, t, y.double())
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        call(name, s, t, y[:3])
    with pytest.raises(ValueError, match="bool"):
        call(name, s, t, y, mask=torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="bool"):
        call(name, s, t, y, mask=torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("name", WITH_TEMPERATURE)
@pytest.mark.parametrize("tau", [0.0, -1.0, math.inf, math.nan])
def test_non_positive_temperature_raises(name, tau):
    s, t, y = batch(n=2, c=3)
    with pytest.raises(ValueError, match="temperature"):
        call(name, s, t, y, temperature=tau)


@pytest.mark.parametrize(
    ("name", "param"),
    [
        ("generalized_jsd", "beta"),
        ("skew_kl", "alpha"),
        ("skew_reverse_kl", "alpha"),
        ("ce", "label_smoothing"),
    ],
)
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_unit_interval_parameters(name, param, value):
    s, t, y = batch(n=2, c=3)
    with pytest.raises(ValueError, match=rf"{param} must lie in \[0, 1\]"):
        call(name, s, t, y, **{param: value})


def test_errors_are_value_errors_and_distillery_errors():
    assert issubclass(L.LossInputError, ValueError) and issubclass(L.LossInputError, DistilleryError)


def test_misspelt_parameter_is_a_type_error():
    with pytest.raises(TypeError):
        L.kd(torch.randn(2, 3), torch.randn(2, 3), temprature=2.0)


# ---------------------------------------------------------------------------------------------
# loss-specific properties


def test_generalized_jsd_end_points_follow_the_kl_conventions():
    s, t, _ = batch(n=6, c=5, seed=17)
    forward = L.kd(s, t, temperature=1.0)  # KL(p_t || p_s)
    reverse = L.reverse_kl(s, t)  # KL(p_s || p_t)
    torch.testing.assert_close(L.generalized_jsd(s, t, beta=0.0), forward)
    torch.testing.assert_close(L.generalized_jsd(s, t, beta=1.0), reverse)
    assert abs(forward.item() - reverse.item()) > 1e-3
    # the formula itself goes to 0 at the end points: the conventions are a jump, as in TRL
    assert L.generalized_jsd(s, t, beta=1e-6).item() < 1e-4
    # swapping the models mirrors beta
    torch.testing.assert_close(L.generalized_jsd(s, t, beta=0.3), L.generalized_jsd(t, s, beta=0.7))


def test_skew_kl_end_points():
    s, t, _ = batch(n=6, c=5, seed=18)
    torch.testing.assert_close(L.skew_kl(s, t, alpha=0.0), L.kd(s, t, temperature=1.0))
    torch.testing.assert_close(L.skew_reverse_kl(s, t, alpha=0.0), L.reverse_kl(s, t))
    assert abs(L.skew_kl(s, t, alpha=1.0).item()) < 1e-12
    assert abs(L.skew_reverse_kl(s, t, alpha=1.0).item()) < 1e-12
    assert L.skew_kl(s, t, alpha=0.5) < L.skew_kl(s, t, alpha=0.1) < L.skew_kl(s, t, alpha=0.0)


def test_dkd_nckd_drops_the_target_column_exactly():
    s, t, y = batch(n=6, c=5, seed=19)
    rows = torch.arange(6)
    s2, t2 = s.clone(), t.clone()
    s2[rows, y] += 5000.0  # mdistiller's -1000 shift would let this leak into NCKD at tau = 4
    t2[rows, y] -= 3000.0
    torch.testing.assert_close(L.dkd(s2, t2, targets=y, alpha=0.0), L.dkd(s, t, targets=y, alpha=0.0))
    assert L.dkd(s2, t2, targets=y, beta=0.0).item() > L.dkd(s, t, targets=y, beta=0.0).item()


def test_pld_reduces_to_ce_for_a_one_hot_teacher_and_is_shift_invariant():
    s, _, y = batch(n=6, c=5, seed=20)
    t = torch.zeros(6, 5, dtype=torch.float64)
    t[torch.arange(6), y] = 1e4  # the teacher puts all its mass on the true label
    torch.testing.assert_close(L.pld(s, t, targets=y), L.ce(s, targets=y))
    _, t, _ = batch(n=6, c=5, seed=21)
    torch.testing.assert_close(L.pld(s + 7.0, t, targets=y), L.pld(s, t, targets=y))


def test_pld_puts_the_true_label_first_even_against_the_teacher():
    s = torch.tensor([[0.0, LN2, LN3]], dtype=torch.float64)
    t = torch.tensor([[0.0, 5.0, 0.0]], dtype=torch.float64)  # teacher prefers class 1
    a = L.pld(s, t, targets=torch.tensor([2])).item()
    b = L.pld(s, t, targets=torch.tensor([1])).item()
    assert a == pytest.approx(naive_pld(s[0].tolist(), t[0].tolist(), 2))
    assert abs(a - b) > 1e-3


def test_dist_one_valid_row_has_intra_one():
    s, t, _ = batch(n=3, c=5, seed=22)
    mask = torch.tensor([False, True, False])
    inter = L.dist(s, t, mask=mask, gamma=0.0).item()
    assert L.dist(s, t, mask=mask).item() == pytest.approx(inter + 1.0)


@pytest.mark.parametrize("name", ["generalized_jsd", "skew_kl", "skew_reverse_kl", "kd", "reverse_kl", "tvd"])
def test_classes_masked_with_minus_inf_in_both_models_give_finite_gradients(name):
    """A padded vocabulary: both models hold -inf on the same classes. logaddexp's backward is NaN at
    (-inf, -inf); the mixture losses must keep every gradient finite (and zero on those classes)."""
    from distillery.losses import get

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    s[:, 5:], t[:, 5:] = float("-inf"), float("-inf")
    s.requires_grad_(True)
    loss = get(name)(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad[:, :5]).all() and (s.grad[:, 5:] == 0).all()
    ref = get(name)(s.detach()[:, :5].clone().requires_grad_(True), t[:, :5])  # the same loss without them
    assert torch.allclose(loss.detach(), ref, atol=1e-6)


def test_sparse_kd_keeps_float64():
    from distillery.losses import get
    from distillery.losses.sparse import TopK

    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 6, generator=g, dtype=torch.float64)
    t = torch.randn(3, 6, generator=g, dtype=torch.float64)
    lp = torch.log_softmax(t, -1)
    top = TopK(lp, torch.arange(6).expand(3, 6).clone(), None, 6)  # every class kept: exact
    got = get("kd")(s, top, temperature=1.0)
    want = get("kd")(s, t, temperature=1.0)
    assert got.dtype == torch.float64 and abs(float(got - want)) < 1e-12
