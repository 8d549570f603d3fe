"""Tests for distillery.losses.features.

Every registered feature / relation loss is checked against a naive float64 reference written
with explicit loops and python floats, against hand-computed values, and on the edge cases
(identity, scale invariance, extreme and all-zero inputs, gradients to the student and to the
learned state, teachers without grad, half precision, autocast, bad shapes, missing state).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from distillery import losses
from distillery.errors import DistilleryError
from distillery.losses import features as Fe
from distillery.losses.logits import LossInputError

torch.set_num_threads(1)

EXPECTED = {"hint", "normalized_mse", "attention", "similarity", "nst", "acam", "mi_alpha"}
# every loss registered from the features module, so that a new one is picked up by the tests below
NAMES = sorted(n for n in losses.names() if getattr(losses.get(n), "__module__", None) == Fe.__name__)
STATE_CLASSES = {"acam": Fe.ACAMMaskGenerator, "mi_alpha": Fe.MIAlphaCritic}
WITH_STATE = sorted(STATE_CLASSES)
ZERO_AT_IDENTITY = ["hint", "normalized_mse", "attention", "similarity", "nst"]
DIFFERENT_WIDTHS = {"attention", "similarity", "nst", "mi_alpha"}
SCALE_INVARIANT = ["attention", "similarity", "nst"]  # normalised maps / Gram rows / channel vectors


def gen(seed):
    return torch.Generator().manual_seed(seed)


def inputs(name, seed=0, dtype=torch.float64, scale=1.0):
    """A typical (student, teacher) pair for each loss, small enough for the loop references."""
    g = gen(seed)
    shapes = {
        "hint": ((3, 4, 2), (3, 4, 2)),
        "normalized_mse": ((3, 2, 2, 2), (3, 2, 2, 2)),
        "attention": ((3, 2, 3, 2), (3, 4, 3, 2)),  # channel counts differ
        "similarity": ((4, 5), (4, 2, 3)),  # dims differ
        "nst": ((2, 3, 2, 2), (2, 2, 2, 2)),
        "acam": ((2, 3, 2, 2), (2, 3, 2, 2)),
        "mi_alpha": ((5, 3), (5, 4)),
    }
    s_shape, t_shape = shapes[name]
    s = torch.randn(s_shape, generator=g, dtype=dtype) * scale
    t = torch.randn(t_shape, generator=g, dtype=dtype) * scale
    return s, t


def make_state(name, s, t, dtype=torch.float64, seed=0, **params):
    torch.manual_seed(seed)
    return STATE_CLASSES[name](tuple(s.shape[1:]), tuple(t.shape[1:]), **params).to(dtype)


def call(name, s, t, state=None, **params):
    fn = losses.get(name)
    if name in STATE_CLASSES:
        if state is None:
            state = make_state(name, s, t, **params)
        return fn(s, t, state=state, **params)
    return fn(s, t, **params)


# ---------------------------------------------------------------------------------------------
# naive references: python floats and loops, no vectorised normalisation or log-space tricks


def flat(x):
    return [torch.as_tensor(r).reshape(-1).tolist() for r in x]


def norm(v):
    return math.sqrt(sum(a * a for a in v))


def naive_normalized_mse(s, t, eps=1e-12):
    rows = [sum((x - y) ** 2 for x, y in zip(a, b)) / max(sum(y * y for y in b), eps) for a, b in zip(flat(s), flat(t))]
    return sum(rows) / len(rows)


def naive_hint(s, t, metric="mse"):
    S, T = flat(s), flat(t)
    if metric == "cosine":
        rows = []
        for a, b in zip(S, T):
            dot = sum(x * y for x, y in zip(a, b))
            rows.append(1.0 - dot / (max(norm(a), 1e-8) * max(norm(b), 1e-8)))
        return sum(rows) / len(rows)
    total, count = 0.0, 0
    for a, b in zip(S, T):
        for x, y in zip(a, b):
            d = abs(x - y)
            if metric == "mse":
                total += d * d
            elif metric == "l1":
                total += d
            else:  # smooth_l1, beta = 1
                total += 0.5 * d * d if d < 1 else d - 0.5
            count += 1
    return total / count


def naive_at_map(f, p):
    # f: (C, positions...) one sample
    c = f.shape[0]
    cols = f.reshape(c, -1).tolist()
    a = [sum(abs(cols[k][j]) ** p for k in range(c)) for j in range(len(cols[0]))]  # the paper's sum
    n = norm(a)
    return [v / max(n, 1e-12) for v in a]


def naive_attention(s, t, p=2.0):
    total = 0.0
    for a, b in zip(s, t):
        qa, qb = naive_at_map(a, p), naive_at_map(b, p)
        total += sum((x - y) ** 2 for x, y in zip(qa, qb)) / len(qa)
    return total / s.shape[0]


def naive_gram_rows(x):
    rows = flat(x)
    n = len(rows)
    g = [[sum(a * b for a, b in zip(rows[i], rows[j])) for j in range(n)] for i in range(n)]
    return [[v / max(norm(r), 1e-12) for v in r] for r in g]


def naive_similarity(s, t):
    gs, gt = naive_gram_rows(s), naive_gram_rows(t)
    n = len(gs)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(n) for j in range(n)) / (n * n)


def naive_nst(s, t):
    total = 0.0
    for a, b in zip(s, t):
        va = [r for r in a.reshape(a.shape[0], -1).tolist()]
        vb = [r for r in b.reshape(b.shape[0], -1).tolist()]
        va = [[x / max(norm(r), 1e-12) for x in r] for r in va]
        vb = [[x / max(norm(r), 1e-12) for x in r] for r in vb]

        def kmean(u, w):
            return sum(sum(x * y for x, y in zip(ui, wj)) ** 2 for ui in u for wj in w) / (len(u) * len(w))

        total += kmean(va, va) + kmean(vb, vb) - 2 * kmean(va, vb)
    return total / s.shape[0]


def lin(layer, v):
    w = layer.weight.tolist()
    b = layer.bias.tolist() if layer.bias is not None else [0.0] * len(w)
    return [sum(wi * x for wi, x in zip(row, v)) + bi for row, bi in zip(w, b)]


def mlp(layers, v):
    """Linear / ReLU stack (or one Linear) on a python list."""
    if isinstance(layers, torch.nn.Linear):
        return lin(layers, v)
    for layer in layers:
        v = lin(layer, v) if isinstance(layer, torch.nn.Linear) else [max(0.0, x) for x in v]
    return v


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def naive_masks(state, s, t):
    """ACAM's masks for one sample: s, t (C, positions...) -> spatial [M][P], channel [M][C]."""
    c = t.shape[0]
    tt = t.reshape(c, -1).T.tolist()  # P tokens of C
    ss = s.reshape(c, -1).T.tolist()
    q = [lin(state.query, v) for v in tt]  # C -> C_q
    k = [lin(state.key, v) for v in ss]
    v = [lin(state.value, x) for x in ss]  # C -> C
    c_q = max(c // 2, 1)
    assert len(q[0]) == len(k[0]) == c_q and len(v[0]) == c
    fused = []
    for qp in q:
        logits = [sum(a * b for a, b in zip(qp, kp)) / math.sqrt(c_q) for kp in k]
        e = [math.exp(z - max(logits)) for z in logits]
        w = [x / sum(e) for x in e]
        fused.append([sum(w[j] * v[j][ch] for j in range(len(v))) for ch in range(c)])
    m = state.num_masks
    spatial = [[sigmoid(lin(state.spatial_unit, fp)[mi]) for fp in fused] for mi in range(m)]
    pooled = [sum(fp[ch] for fp in fused) / len(fused) for ch in range(c)]  # v (C,)
    scale = state.channel_scale.tolist()  # m_c (M,)
    channel = [[sigmoid(scale[mi] * pooled[ch]) for ch in range(c)] for mi in range(m)]
    return spatial, channel


def naive_dice(masks):
    m = len(masks)
    if m < 2:
        return 0.0
    vals = []
    for i in range(m):
        for j in range(m):
            if i != j:
                a, b = masks[i], masks[j]
                inner = sum(x * y for x, y in zip(a, b))
                vals.append(2 * inner / (sum(x * x for x in a) + 1e-12 + sum(y * y for y in b) + 1e-12))
    return sum(vals) / len(vals)


def naive_acam(s, t, state, num_masks=6, diversity_weight=1.0):
    total = 0.0
    for a, b in zip(s, t):
        spatial, channel = naive_masks(state, a, b)
        c = a.shape[0]
        d = ((a - b) ** 2).reshape(c, -1).tolist()  # [C][P]
        p = len(d[0])
        ls = sum(
            sum(ms[j] ** 2 * d[ch][j] for ch in range(c) for j in range(p)) / (c * (sum(ms) + 1e-5))
            for ms in spatial
        ) / len(spatial)
        lc = sum(
            sum(mc[ch] ** 2 * d[ch][j] for ch in range(c) for j in range(p)) / (p * (sum(mc) + 1e-5))
            for mc in channel
        ) / len(channel)
        total += ls + lc + diversity_weight * (naive_dice(spatial) + naive_dice(channel))
    return total / s.shape[0]


def naive_pool(x, pool):
    """(N, D) or (N, T, D) tensor -> N python lists of D: tokens mean-pooled or token 0."""
    if x.dim() == 2:
        return x.tolist()
    rows = x.tolist()
    if pool == "first":
        return [r[0] for r in rows]
    return [[sum(tok[d] for tok in r) / len(r) for d in range(len(r[0]))] for r in rows]


def naive_critic(state, S, T, critic, temperature):
    """Scores f[i][j] = f(s_i, t_j) and log-baselines a(t_j) from python lists."""
    n = len(S)
    g = [mlp(state.student_net, v) for v in S]
    h = [mlp(state.teacher_net, v) for v in T]
    if critic == "mlp":  # unnormalised dot product, no temperature; baseline on the raw teacher
        f = [[sum(a * b for a, b in zip(g[i], h[j])) for j in range(n)] for i in range(n)]
        return f, [mlp(state.baseline, v)[0] for v in T]

    def unit(v):
        return [x / max(norm(v), 1e-12) for x in v]

    g, h = [unit(v) for v in g], [unit(v) for v in h]
    f = [[sum(a * b for a, b in zip(g[i], h[j])) / temperature for j in range(n)] for i in range(n)]
    return f, [lin(state.baseline, v)[0] for v in h]


def naive_estimator(f, log_base, alpha):
    """-I_alpha from scores f[i][j] and log-baselines, with explicit sums and exps."""
    n = len(f)
    q = [math.exp(a) for a in log_base]  # q(t_j) = e^{a(t_j)}
    total = 0.0
    for j in range(n):
        m = sum(math.exp(f[i][j]) for i in range(n)) / n
        m_loo = sum(math.exp(f[i][j]) for i in range(n) if i != j) / (n - 1)
        joint = f[j][j] - math.log(alpha * m + (1 - alpha) * q[j])
        marg = sum(math.exp(f[i][j]) / (alpha * m_loo + (1 - alpha) * q[j]) for i in range(n) if i != j) / (
            n - 1
        )
        total += 1 + joint - marg
    return -total / n


def naive_mi_alpha(
    s, t, state, alpha=0.5, critic="mlp", hidden_dim=512, embed_dim=64, temperature=0.1, pool="mean"
):
    f, log_base = naive_critic(state, naive_pool(s, pool), naive_pool(t, pool), critic, temperature)
    return naive_estimator(f, log_base, alpha)


PARAMS = {
    "hint": [{}, {"metric": "l1"}, {"metric": "cosine"}, {"metric": "smooth_l1"}, {"metric": "mse"}],
    "attention": [{}, {"p": 3.0}, {"p": 1.0}],
    "normalized_mse": [{}, {"eps": 1e-6}],
    "similarity": [{}],
    "nst": [{}],
    "acam": [{}, {"num_masks": 1}, {"num_masks": 3, "diversity_weight": 0.25}],
    "mi_alpha": [
        {},
        {"alpha": 0.0},
        {"alpha": 1.0},
        {"alpha": 0.9, "hidden_dim": 7, "embed_dim": 5},
        {"alpha": 0.2, "critic": "cosine", "temperature": 0.5, "embed_dim": 6},
        {"alpha": 0.0, "critic": "cosine"},
    ],
}
CASES = [pytest.param(n, p, id=f"{n}-{i}") for n in NAMES for i, p in enumerate(PARAMS.get(n, [{}]))]


def naive(name, s, t, state, params):
    if name == "hint":
        return naive_hint(s, t, **params)
    if name == "normalized_mse":
        return naive_normalized_mse(s, t, **params)
    if name == "attention":
        return naive_attention(s, t, **params)
    if name == "similarity":
        return naive_similarity(s, t)
    if name == "nst":
        return naive_nst(s, t)
    if name == "acam":
        return naive_acam(s, t, state, **params)
    return naive_mi_alpha(s, t, state, **params)


# ---------------------------------------------------------------------------------------------
# registry and contract


def test_registry_holds_exactly_the_feature_losses():
    assert set(NAMES) == EXPECTED
    for name in NAMES:
        assert losses.get(name) is getattr(Fe, name)


def test_every_loss_has_params_and_a_hand_value():
    assert set(PARAMS) == set(NAMES)
    assert {case.values[0] for case in HAND} == set(NAMES)


def test_state_classes_are_attached_and_others_have_none():
    for name in NAMES:
        fn, caps = losses.get(name), losses.capabilities(name)
        if name in STATE_CLASSES:
            assert caps.state is STATE_CLASSES[name]
            assert issubclass(caps.state, torch.nn.Module)
            sig = inspect.signature(fn).parameters["state"]
            assert sig.kind is inspect.Parameter.KEYWORD_ONLY
        else:
            assert caps.state is None
        assert not caps.needs_ids  # no loss here is keyed by sample id
    # the objective's auto adapter leaves the student unprojected for these (different widths ok)
    assert {n for n in NAMES if losses.capabilities(n).different_widths} == DIFFERENT_WIDTHS


@pytest.mark.parametrize("name", NAMES)
def test_params_are_keyword_only_and_misspelt_ones_fail(name):
    fn = losses.get(name)
    params = list(inspect.signature(fn).parameters.values())
    assert [p.kind for p in params[:2]] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 2
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[2:])
    s, t = inputs(name)
    with pytest.raises(TypeError):
        call(name, s, t, temprature=2.0)


@pytest.mark.parametrize("name", WITH_STATE)
def test_state_is_built_the_way_the_integrator_builds_it(name):
    # ThatClass(student_shape, teacher_shape, **params), shapes without the batch dimension,
    # every loss param accepted (and ignored where unused); then fn(s, t, state=module, **params)
    s, t = inputs(name, dtype=torch.float32)
    fn = losses.get(name)
    params = {
        p: v.default
        for p, v in inspect.signature(fn).parameters.items()
        if p != "state" and v.kind is v.KEYWORD_ONLY
    }
    state = losses.capabilities(fn).state(tuple(s.shape[1:]), tuple(t.shape[1:]), **params)
    out = fn(s, t, state=state, **params)
    assert out.shape == () and torch.isfinite(out)
    assert len(list(state.parameters())) > 0
    restored = losses.capabilities(fn).state(tuple(s.shape[1:]), tuple(t.shape[1:]), **params)
    restored.load_state_dict(state.state_dict())  # checkpointed with the student
    torch.testing.assert_close(fn(s, t, state=restored, **params), out)


# ---------------------------------------------------------------------------------------------
# (1) naive references


@pytest.mark.parametrize(("name", "params"), CASES)
def test_matches_naive_reference_float64(name, params):
    s, t = inputs(name)
    state = make_state(name, s, t, **params) if name in STATE_CLASSES else None
    got = call(name, s, t, state=state, **params)
    assert got.dtype == torch.float64 and got.shape == ()
    want = naive(name, s, t, state, params)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("name", "params"), CASES)
def test_matches_naive_reference_float32(name, params):
    s, t = inputs(name, seed=1, dtype=torch.float32, scale=3.0)
    state = make_state(name, s, t, dtype=torch.float32, **params) if name in STATE_CLASSES else None
    got = call(name, s, t, state=state, **params)
    assert got.dtype == torch.float32
    want = naive(name, s.double(), t.double(), state.double() if state is not None else None, params)
    assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("critic", ["mlp", "cosine"])
def test_mi_alpha_end_points_are_infonce_and_tuba(critic):
    s, t = inputs("mi_alpha", seed=4)
    params = {"critic": critic, "hidden_dim": 9, "embed_dim": 6}
    state = make_state("mi_alpha", s, t, **params)
    scores, log_base = state(s, t, 0.1)
    n = s.shape[0]
    # alpha = 1: InfoNCE over each teacher column, log N - CE(S^T, diagonal)
    infonce = math.log(n) - torch.nn.functional.cross_entropy(scores.T, torch.arange(n))
    got = call("mi_alpha", s, t, state=state, alpha=1.0, **params)
    torch.testing.assert_close(-got, infonce)
    assert -got.item() <= math.log(n) + 1e-12  # InfoNCE never exceeds log N
    # alpha = 0: TUBA, 1 + E_joint[S - a] - E_marginal[e^{S - a}]
    off = ~torch.eye(n, dtype=torch.bool)
    tuba = 1 + (scores.diagonal() - log_base).mean() - (scores - log_base).exp()[off].mean()
    torch.testing.assert_close(-call("mi_alpha", s, t, state=state, alpha=0.0, **params), tuba)


def test_mi_alpha_estimator_matches_naive_sums_on_the_module_scores():
    # the critic's outputs from the module, the estimator by explicit float64 sums, over the grid
    s, t = inputs("mi_alpha", seed=6)
    state = make_state("mi_alpha", s, t)
    scores, log_base = state(s, t)
    for alpha in (0.0, 0.1, 0.5, 0.9, 1.0):
        want = naive_estimator(scores.tolist(), log_base.tolist(), alpha)
        assert Fe.mi_alpha(s, t, state=state, alpha=alpha).item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_mi_alpha_default_critic_is_distillers_separable_mlp():
    state = Fe.MIAlphaCritic((3,), (4,))
    assert (state.critic, state.hidden_dim, state.embed_dim) == ("mlp", 512, 64)
    shapes = [tuple(p.shape) for p in state.student_net.parameters()]
    assert shapes == [(512, 3), (512,), (512, 512), (512,), (64, 512), (64,)]
    assert tuple(state.teacher_net[0].weight.shape) == (512, 4)
    assert [tuple(p.shape) for p in state.baseline.parameters()] == [(512, 4), (512,), (1, 512), (1,)]
    s, t = torch.randn(3, 3), torch.randn(3, 4)
    scores, _ = state(s, t, 123.0)  # no temperature, no normalisation: a plain dot product
    torch.testing.assert_close(scores, state.student_net(s) @ state.teacher_net(t).T)


@pytest.mark.parametrize("pool", ["mean", "first"])
def test_mi_alpha_pools_tokens_to_one_score_per_sample_pair(pool):
    g = gen(5)
    s, t = (
        torch.randn(3, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 2, 5, generator=g, dtype=torch.float64),  # token counts may differ
    )
    params = {"hidden_dim": 8, "embed_dim": 6, "pool": pool}
    state = Fe.MIAlphaCritic((4, 4), (2, 5), **params).double()
    got = Fe.mi_alpha(s, t, state=state, **params)
    reduce = (lambda x: x.mean(1)) if pool == "mean" else (lambda x: x[:, 0])
    torch.testing.assert_close(got, Fe.mi_alpha(reduce(s), reduce(t), state=state, **params))
    assert got.item() == pytest.approx(naive_mi_alpha(s, t, state, **params), rel=1e-9)
    other = "first" if pool == "mean" else "mean"
    assert got.item() != pytest.approx(Fe.mi_alpha(s, t, state=state, **{**params, "pool": other}).item())


# ---------------------------------------------------------------------------------------------
# (2) hand-computed values


def zero_state(name, s, t, **params):
    state = make_state(name, s, t, **params)
    with torch.no_grad():
        for p in state.parameters():
            p.zero_()
    return state


def identity_critic(dim, critic="cosine", baseline_bias=0.0):
    """Cosine critic with W_g = W_h = I, or an MLP critic of width dim whose layers are all I."""
    state = Fe.MIAlphaCritic((dim,), (dim,), critic=critic, hidden_dim=dim, embed_dim=dim).double()
    with torch.no_grad():
        for p in state.parameters():
            p.zero_()
        for net in (state.student_net, state.teacher_net):
            for layer in [net] if isinstance(net, torch.nn.Linear) else net:
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.copy_(torch.eye(dim))
        last = state.baseline if critic == "cosine" else state.baseline[-1]
        last.bias.fill_(baseline_bias)
    return state


def acam_hand_state(s, t):
    """C = 1, M = 2: W_v = 0 with bias 1, so F_fused = 1 at every position (attention rows sum to 1)
    and v = 1; spatial unit 0 (masks 1/2); channel scales (ln 3, -ln 3): masks 3/4 and 1/4."""
    state = zero_state("acam", s, t, num_masks=2)
    with torch.no_grad():
        state.value.bias.fill_(1.0)
        state.channel_scale.copy_(torch.tensor([math.log(3.0), -math.log(3.0)]))
    return state


R2 = 1 / math.sqrt(2)
HAND = [
    # ((1-0)^2 + (2-0)^2) / 2 = 2.5
    pytest.param("hint", [[1.0, 2.0]], [[0.0, 0.0]], {}, 2.5, id="hint-mse"),
    # (1 + 2) / 2 = 1.5
    pytest.param("hint", [[1.0, 2.0]], [[0.0, 0.0]], {"metric": "l1"}, 1.5, id="hint-l1"),
    # Huber(1) = 0.5 * 1^2 = 0.5, Huber(2) = 2 - 0.5 = 1.5; mean 1.0
    pytest.param("hint", [[1.0, 2.0]], [[0.0, 0.0]], {"metric": "smooth_l1"}, 1.0, id="hint-smooth_l1"),
    # cos((1, 0), (1, 1)) = 1/sqrt2: 1 - 0.707107 = 0.292893
    pytest.param("hint", [[1.0, 0.0]], [[1.0, 1.0]], {"metric": "cosine"}, 1 - R2, id="hint-cosine"),
    # ||(1, 2) - (1, 0)||^2 / ||(1, 0)||^2 = 4 and ||(0, 0) - (3, 4)||^2 / 25 = 1: mean 2.5
    pytest.param("normalized_mse", [[1.0, 2.0], [0.0, 0.0]], [[1.0, 0.0], [3.0, 4.0]], {}, 2.5, id="normalized_mse"),
    # an all-zero teacher map divides by eps: 1 / 1e-6
    pytest.param("normalized_mse", [[1.0, 0.0]], [[0.0, 0.0]], {"eps": 1e-6}, 1e6, id="normalized_mse-zero-teacher"),
    # student channels (1, 0), (0, 1): sum_c F^2 = (1, 1) -> (1/sqrt2, 1/sqrt2); teacher (1, 0) -> (1, 0);
    # differences (1/sqrt2 - 1, 1/sqrt2), squares 0.085786 + 0.5, mean over 2 positions = 0.292893
    pytest.param("attention", [[[1.0, 0.0], [0.0, 1.0]]], [[[1.0, 0.0]]], {}, 1 - R2, id="attention"),
    # p = 1: |(-3, 4)| -> (3, 4) / 5 = (0.6, 0.8); teacher (4, 3) / 5 = (0.8, 0.6): (0.04 + 0.04) / 2 = 0.04
    pytest.param("attention", [[[-3.0, 4.0]]], [[[4.0, 3.0]]], {"p": 1.0}, 0.04, id="attention-p1"),
    # G_s = I; G_t = all ones, rows (1/sqrt2, 1/sqrt2); ||G_s - G_t||^2 = 2 (1 - 1/sqrt2)^2 + 2 (1/2)
    #   = 0.171573 + 1 = 1.171573; / N^2 = 4 -> 0.292893
    pytest.param("similarity", [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]], {}, 1 - R2, id="similarity"),
    # one student channel (1, 0), teacher channels (1, 0), (0, 1): k(s,s) = 1; mean k(t,t) = (1+0+0+1)/4
    # = 0.5; mean k(s,t) = (1 + 0)/2 = 0.5: 1 + 0.5 - 2 * 0.5 = 0.5
    pytest.param("nst", [[[1.0, 0.0]]], [[[1.0, 0.0], [0.0, 1.0]]], {}, 0.5, id="nst"),
    # orthogonal single channels: 1 + 1 - 2 * 0 = 2
    pytest.param("nst", [[[1.0, 0.0]]], [[[0.0, 1.0]]], {}, 2.0, id="nst-orthogonal"),
    # all-zero state: every mask is sigmoid(0) = 1/2. s = (1, 0), t = (0, 0) on C = 1, P = 2: D = (1, 0).
    # spatial: (1/2)^2 * 1 / (1 * (0.5 * 2 + 1e-5)) = 0.25 / 1.00001 = 0.2499975
    # channel: (1/2)^2 * 1 / (2 * (0.5 + 1e-5)) = 0.25 / 1.00002 = 0.2499950
    # Dice of two equal masks = 1 for both mask sets (less ~2e-12): 0.2499975 + 0.2499950 + 2 = 2.4999925
    pytest.param("acam", [[[1.0, 0.0]]], [[[0.0, 0.0]]], {"num_masks": 2}, 0.25 / 1.00001 + 0.25 / 1.00002 + 2.0, id="acam"),
    # ``acam_hand_state``: spatial masks 1/2 as above (0.25 / 1.00001); channel masks 3/4 and 1/4:
    # 1/2 [(9/16) / (2 (3/4 + 1e-5)) + (1/16) / (2 (1/4 + 1e-5))] = 1/2 (0.3749950 + 0.1249950) = 0.2499950
    # (the unsquared mask would give 0.5); Dice: spatial 1, channel 2 (3/16) / (9/16 + 1/16) = 0.6.
    # total 0.2499975 + 0.2499950 + 1 + 0.6 = 2.0999925
    pytest.param(
        "acam", [[[1.0, 0.0]]], [[[0.0, 0.0]]], {"num_masks": 2, "hand_state": "scaled"},
        0.25 / 1.00001 + 0.5 * (0.5625 / 1.50002 + 0.0625 / 0.50002) + 1.6, id="acam-channel-scales",
    ),
    # identity critic, tau = 1, s = t = I_2: S = I. alpha = 1 is InfoNCE:
    # 1 - log((e + 1) / 2) = 1 - 0.620115 = 0.379885 (the marginal term is exactly 1): loss -0.379885
    pytest.param(
        "mi_alpha", [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]],
        {"alpha": 1.0, "critic": "cosine", "temperature": 1.0, "embed_dim": 2}, -(1 - math.log((math.e + 1) / 2)),
        id="mi_alpha-nce",
    ),
    # alpha = 0 with the constant baseline a = 1 is NWJ: mean S_jj - mean_{i!=j} e^{S_ij - 1}
    # = 1 - e^{-1} = 0.632121: loss -0.632121
    pytest.param(
        "mi_alpha", [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]],
        {"alpha": 0.0, "critic": "cosine", "temperature": 1.0, "embed_dim": 2}, -(1 - math.exp(-1)), id="mi_alpha-nwj",
    ),
    # identity cosine critic, tau = 1/2, alpha = 1/2, baseline a = 0 (q = 1), s = t = I_2: S = 2 I.
    # m_j = (e^2 + 1) / 2 = 4.194528, m_j^loo = 1: b_j = log((4.194528 + 1) / 2) = 0.954459,
    # b_j^loo = log((1 + 1) / 2) = 0; I = 1 + (2 - 0.954459) - e^0 = 1.045541: loss -1.045541
    pytest.param(
        "mi_alpha", [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]],
        {"alpha": 0.5, "critic": "cosine", "temperature": 0.5, "embed_dim": 2},
        -(2 - math.log((math.exp(2) + 3) / 4)), id="mi_alpha-half",
    ),
    # MLP critic whose layers are all the identity (biases 0), s = t = (1, 0), (0, 0): ReLU keeps
    # them, S[i, j] = <s_i, t_j> = [[1, 0], [0, 0]] (no temperature). alpha = 1 (InfoNCE):
    # column 0: 1 - log((e + 1) / 2) = 0.379885; column 1: 0 - log((1 + 1) / 2) = 0; the marginal
    # term is 1, so I = 0.379885 / 2 = 0.189943: loss -0.189943
    pytest.param(
        "mi_alpha", [[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]],
        {"alpha": 1.0, "hidden_dim": 2, "embed_dim": 2}, -(1 - math.log((math.e + 1) / 2)) / 2, id="mi_alpha-mlp",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("name", "s", "t", "params", "expected"), HAND)
def test_hand_computed_value(name, s, t, params, expected):
    s = torch.tensor(s, dtype=torch.float64)
    t = torch.tensor(t, dtype=torch.float64)
    state, params = None, dict(params)
    if name == "acam":
        scaled = params.pop("hand_state", None) == "scaled"
        state = acam_hand_state(s, t) if scaled else zero_state(name, s, t, **params)
    elif name == "mi_alpha":
        kind = params.get("critic", "mlp")
        state = identity_critic(2, critic=kind, baseline_bias=1.0 if params["alpha"] == 0.0 else 0.0)
    got = call(name, s, t, state=state, **params)
    assert got.item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# (3) edge cases


@pytest.mark.parametrize("name", ZERO_AT_IDENTITY)
def test_identical_features_give_zero(name):
    s, _ = inputs(name, seed=2)
    for params in PARAMS[name]:
        assert abs(call(name, s, s.clone(), **params).item()) < 1e-12


@pytest.mark.parametrize("diversity_weight", [0.0, 0.5])
def test_acam_identical_features_leave_only_the_diversity_term(diversity_weight):
    s, _ = inputs("acam", seed=2)
    state = make_state("acam", s, s)
    got = Fe.acam(s, s.clone(), state=state, diversity_weight=diversity_weight)
    spatial, channel = state(s, s)
    div = (Fe._dice_diversity(spatial) + Fe._dice_diversity(channel)).mean()
    torch.testing.assert_close(got, diversity_weight * div)
    if diversity_weight == 0.0:
        assert got.item() == 0.0


@pytest.mark.parametrize("name", SCALE_INVARIANT)
def test_normalised_losses_ignore_a_positive_scale_of_either_input(name):
    s, t = inputs(name, seed=3)
    base = call(name, s, t)
    assert base.item() > 1e-4  # the check below is not 0 == 0
    for a, b in [(7.5, 1.0), (1.0, 0.02), (3.0, 3.0)]:
        torch.testing.assert_close(call(name, a * s, b * t), base, rtol=1e-10, atol=1e-12)


def test_hint_scale_behaviour():
    s, t = inputs("hint", seed=3)
    c = 3.0
    torch.testing.assert_close(Fe.hint(c * s, c * t), c**2 * Fe.hint(s, t))  # mse: quadratic
    torch.testing.assert_close(Fe.hint(c * s, c * t, metric="l1"), c * Fe.hint(s, t, metric="l1"))
    torch.testing.assert_close(Fe.hint(c * s, 0.5 * t, metric="cosine"), Fe.hint(s, t, metric="cosine"))


def test_channel_counts_may_differ_for_attention_and_nst_but_spatial_sizes_may_not():
    g = gen(6)
    s, t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 7, 4, 4, generator=g)
    assert torch.isfinite(Fe.attention(s, t)) and torch.isfinite(Fe.nst(s, t))
    for fn in (Fe.attention, Fe.nst):
        with pytest.raises(LossInputError, match="adaptive_avg_pool2d"):
            fn(s, torch.randn(2, 7, 8, 8, generator=g))
        with pytest.raises(LossInputError, match="spatial"):
            fn(torch.randn(2, 3, 16, generator=g), t)  # 1-D vs 2-D maps


def extreme(name, seed, dtype=torch.float32):
    s, t = inputs(name, seed=seed, dtype=dtype)
    g = gen(seed + 100)
    for x in (s, t):
        flat_x = x.view(-1)
        flat_x.copy_(torch.sign(torch.randn(flat_x.shape, generator=g, dtype=dtype)) * 1e4)
        flat_x[: flat_x.numel() // 3] = 1e-30  # tiny values next to huge ones
    return s, t


@pytest.mark.parametrize(("name", "params"), CASES)
def test_extreme_features_stay_finite_with_finite_grads(name, params):
    s, t = extreme(name, seed=7)
    s.requires_grad_(True)
    state = make_state(name, s, t, dtype=torch.float32, **params) if name in STATE_CLASSES else None
    loss = call(name, s, t, state=state, **params)
    if name == "mi_alpha" and params.get("alpha") == 0.0 and params.get("critic", "mlp") == "mlp":
        # documented: TUBA (alpha = 0) with the unbounded MLP critic has e^{S - a} unbounded, so
        # huge features overflow to +inf (never NaN); alpha > 0 or the cosine critic stays finite
        assert loss.item() == math.inf
        return
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    if state is not None:
        assert all(torch.isfinite(p.grad).all() for p in state.parameters() if p.grad is not None)


@pytest.mark.parametrize(("name", "params"), CASES)
def test_all_zero_features_give_no_nan(name, params):
    # 0 / 0 in every normalisation: the eps of the reference code keeps value and gradient finite
    s, t = inputs(name, seed=8, dtype=torch.float32)
    s = torch.zeros_like(s, requires_grad=True)
    t = torch.zeros_like(t)
    state = make_state(name, s, t, dtype=torch.float32, **params) if name in STATE_CLASSES else None
    loss = call(name, s, t, state=state, **params)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize(("name", "params"), CASES)
def test_gradient_reaches_the_student_and_the_state_not_the_teacher(name, params):
    s, t = inputs(name, seed=9, dtype=torch.float32)
    s.requires_grad_(True)
    assert not t.requires_grad  # a teacher computed under no_grad is fine
    state = make_state(name, s, t, dtype=torch.float32, **params) if name in STATE_CLASSES else None
    call(name, s, t, state=state, **params).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None
    if state is not None:
        for pname, p in state.named_parameters():
            if name == "mi_alpha" and params.get("alpha") == 1.0 and pname.startswith("baseline."):
                continue  # InfoNCE has no learned baseline
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
            assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", NAMES)
def test_teacher_is_not_detached(name):
    # gradients flow to both inputs; online regimes choose for themselves
    s, t = inputs(name, seed=10, dtype=torch.float32)
    t.requires_grad_(True)
    call(name, s, t).backward()
    assert t.grad is not None and t.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_inputs_are_upcast(name, dtype):
    s, t = inputs(name, seed=11, dtype=torch.float32)
    s16, t16 = s.to(dtype).requires_grad_(True), t.to(dtype)
    state = make_state(name, s, t, dtype=torch.float32) if name in STATE_CLASSES else None
    got = call(name, s16, t16, state=state)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, call(name, s16.detach().float(), t16.float(), state=state))
    got.backward()
    assert s16.grad.dtype == dtype and torch.isfinite(s16.grad.float()).all()


@pytest.mark.parametrize("name", NAMES)
def test_autocast_does_not_lower_the_precision(name):
    s, t = inputs(name, seed=12, dtype=torch.float32, scale=2.0)
    state = make_state(name, s, t, dtype=torch.float32) if name in STATE_CLASSES else None
    want = call(name, s, t, state=state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = call(name, s, t, state=state)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# bad input

BAD = [
    # (name, student shape, teacher shape, words the message must contain)
    ("hint", (4,), (4,), ["hint", "(N, ...)", "batch dimension"]),
    ("hint", (2, 4), (2, 5), ["same shape", "adapter"]),
    ("hint", (2, 4), (3, 4), ["batch sizes"]),
    ("normalized_mse", (2, 4), (2, 5), ["same shape", "adapter"]),
    ("attention", (2, 8), (2, 8), ["(N, C, L)", "(N, C, H, W)", "(2, 8)"]),
    ("attention", (2, 3, 4, 4), (2, 3, 2, 2), ["spatial", "adaptive_avg_pool2d"]),
    ("similarity", (5,), (5,), ["similarity", "batch dimension"]),
    ("similarity", (2, 4), (3, 4), ["batch sizes"]),
    ("nst", (2, 3, 4), (2, 3, 5), ["spatial", "adaptive_avg_pool"]),
    ("nst", (2, 3), (2, 3), ["(N, C, L)"]),
    ("acam", (2, 3, 4, 4), (2, 5, 4, 4), ["same shape", "adapter"]),
    ("acam", (2, 3), (2, 3), ["(N, C, H, W)"]),
    ("mi_alpha", (2, 3, 4, 4), (2, 3, 4, 4), ["(N, D)", "(N, T, D)", "Pool"]),
    ("mi_alpha", (1, 3), (1, 4), ["at least 2 samples"]),
    ("mi_alpha", (2, 3, 4), (3, 5, 4), ["batch sizes"]),
]


@pytest.mark.parametrize(("name", "s_shape", "t_shape", "words"), BAD)
def test_bad_shapes_raise_a_helpful_loss_input_error(name, s_shape, t_shape, words):
    s, t = torch.randn(s_shape), torch.randn(t_shape)
    state = None
    if name == "acam":
        state = Fe.ACAMMaskGenerator((3, 4, 4), (3, 4, 4))
    elif name == "mi_alpha":
        state = Fe.MIAlphaCritic((3,), (4,))
    kw = {"state": state} if state is not None else {}
    with pytest.raises(LossInputError) as info:
        losses.get(name)(s, t, **kw)
    assert isinstance(info.value, DistilleryError) and isinstance(info.value, ValueError)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize("name", NAMES)
def test_non_tensor_and_integer_inputs_are_rejected(name):
    s, t = inputs(name, dtype=torch.float32)
    with pytest.raises(LossInputError, match=r"torch\.Tensor"):
        call(
            name,
            s.tolist(),
            t,
            state=make_state(name, s, t, torch.float32) if name in STATE_CLASSES else None,
        )
    with pytest.raises(LossInputError, match="floating point"):
        call(
            name, s.long(), t, state=make_state(name, s, t, torch.float32) if name in STATE_CLASSES else None
        )


@pytest.mark.parametrize("name", WITH_STATE)
def test_missing_or_wrong_state_is_a_loss_input_error(name):
    s, t = inputs(name, dtype=torch.float32)
    fn = losses.get(name)
    with pytest.raises(LossInputError, match=STATE_CLASSES[name].__name__):
        fn(s, t)
    with pytest.raises(LossInputError, match="state must be"):
        fn(s, t, state=torch.nn.Linear(2, 2))


def test_state_built_with_other_params_is_refused():
    s, t = inputs("acam", dtype=torch.float32)
    with pytest.raises(LossInputError, match="num_masks"):
        Fe.acam(s, t, state=Fe.ACAMMaskGenerator(s.shape[1:], t.shape[1:], num_masks=2), num_masks=4)
    s, t = inputs("mi_alpha", dtype=torch.float32)
    with pytest.raises(LossInputError, match="embed_dim"):
        Fe.mi_alpha(s, t, state=Fe.MIAlphaCritic(s.shape[1:], t.shape[1:], embed_dim=8))
    with pytest.raises(LossInputError, match="Ds="):
        Fe.mi_alpha(s, t, state=Fe.MIAlphaCritic((7,), t.shape[1:]))
    with pytest.raises(LossInputError, match="hidden_dim"):
        Fe.mi_alpha(s, t, state=Fe.MIAlphaCritic(s.shape[1:], t.shape[1:], hidden_dim=8))
    with pytest.raises(LossInputError, match="critic='cosine'"):
        Fe.mi_alpha(s, t, state=Fe.MIAlphaCritic(s.shape[1:], t.shape[1:], critic="cosine"))
    # the cosine critic has no hidden layer: hidden_dim does not matter for it
    cos = Fe.MIAlphaCritic(s.shape[1:], t.shape[1:], critic="cosine", hidden_dim=8)
    assert torch.isfinite(Fe.mi_alpha(s, t, state=cos, critic="cosine"))


def test_state_constructors_check_shapes_and_params():
    with pytest.raises(LossInputError, match="adapter"):
        Fe.ACAMMaskGenerator((3, 4, 4), (5, 4, 4))
    with pytest.raises(LossInputError, match="num_masks"):
        Fe.ACAMMaskGenerator((3, 4, 4), (3, 4, 4), num_masks=0)
    with pytest.raises(LossInputError, match="Pool or flatten"):
        Fe.MIAlphaCritic((3, 4, 4), (3,))
    with pytest.raises(LossInputError, match="embed_dim"):
        Fe.MIAlphaCritic((3,), (3,), embed_dim=0)
    with pytest.raises(LossInputError, match="hidden_dim"):
        Fe.MIAlphaCritic((3,), (3,), hidden_dim=2.5)
    with pytest.raises(LossInputError, match="critic"):
        Fe.MIAlphaCritic((3,), (3,), critic="transformer")
    for cls in (Fe.ACAMMaskGenerator, Fe.MIAlphaCritic):  # the objective passes None without a teacher tap
        with pytest.raises(LossInputError, match="teacher tap"):
            cls((3, 4), None)


@pytest.mark.parametrize(
    ("name", "params", "word"),
    [
        ("hint", {"metric": "l2"}, "metric"),
        ("attention", {"p": 0.5}, "p must"),
        ("attention", {"p": -1.0}, "p must"),
        ("acam", {"diversity_weight": -1.0}, "diversity_weight"),
        ("mi_alpha", {"alpha": 1.5}, "alpha"),
        ("mi_alpha", {"temperature": 0.0}, "temperature"),
        ("mi_alpha", {"pool": "max"}, "pool"),
    ],
)
def test_out_of_range_params_are_refused(name, params, word):
    s, t = inputs(name, dtype=torch.float32)
    state = make_state(name, s, t, torch.float32) if name in STATE_CLASSES else None
    with pytest.raises(LossInputError, match=word):
        call(name, s, t, state=state, **params)
