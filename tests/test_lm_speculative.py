"""Speculative decoding (exactness in distribution and in greedy mode, cache rollback, metrics, errors)
and AdaSPEC's token filter against hand-computed examples.

The distribution tests use table models (logits a function of position, token and previous token,
read through a token cache with the transformers crop semantics): they run the real
``speculative_generate`` loop thousands of times in a few seconds and their exact distribution is
enumerable. The greedy tests use real transformers models, whose caches are cropped for real.
"""

import itertools
import math

import pytest
import torch
from torch import nn

from distillery.errors import DistilleryError
from distillery.lm import speculative as spec
from distillery.lm.adaspec import adaspec_mask
from distillery.lm.generate import sample, warp
from distillery.lm.models import llama
from distillery.lm.speculative import (
    expected_acceptance,
    expected_block_length,
    speculative_generate,
    token_acceptance,
    verify_block,
)
from distillery.losses.tokens import token_loss


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run many tiny ops one after another; on a shared CPU a second intra-op thread
    makes each of them wait for the other (milliseconds instead of microseconds)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# table models


class TokenCache:
    """The tokens a TableLM has read; ``crop(-n)`` drops the last n (a positive size is refused, as in
    transformers 5)."""

    def __init__(self):
        self.tokens: list[int] = []

    def get_seq_length(self) -> int:
        return len(self.tokens)

    def crop(self, n: int) -> None:
        if n > 0:
            raise ValueError("crop takes a negative count")
        if n:
            del self.tokens[n:]


class TableLM(nn.Module):
    """logits at position t = a[t, x_t] + b[x_{t-1}, x_t] (x_{-1} = 0): depends on the position, the
    token and the one before, so a stale or misplaced cache changes the distribution."""

    def __init__(self, vocab: int, seed: int, length: int = 12, scale: float = 1.5, like: "TableLM | None" = None,
                 noise: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(length, vocab, vocab, generator=g) * scale
        b = torch.randn(vocab, vocab, vocab, generator=g) * scale
        if like is not None:
            a, b = like.a + noise * a / scale, like.b + noise * b / scale
        self.a, self.b = a, b
        self.vocab_size, self.max_length = vocab, length

    def _logits(self, seq: list[int], start: int) -> torch.Tensor:
        rows = [self.a[t, seq[t]] + self.b[seq[t - 1] if t else 0, seq[t]] for t in range(start, len(seq))]
        return torch.stack(rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._logits(row.tolist(), 0) for row in ids])

    def step(self, ids: torch.Tensor, cache: TokenCache | None = None):
        assert ids.shape[0] == 1
        cache = TokenCache() if cache is None else cache
        start = len(cache.tokens)
        cache.tokens += ids[0].tolist()
        return self._logits(cache.tokens, start)[None], cache


def exact_joint(model: TableLM, prompt: list[int], n: int, temperature=1.0, top_p=1.0, top_k=0) -> torch.Tensor:
    """(V ** n,) probabilities of every continuation of n tokens under the warped model, by enumeration."""
    v = model.vocab_size
    conts = torch.tensor(list(itertools.product(range(v), repeat=n)))
    ids = torch.cat([torch.tensor(prompt).expand(len(conts), -1), conts], 1)
    logp = warp(model(ids)[:, len(prompt) - 1: -1], temperature, top_p, top_k).double()
    return logp.gather(-1, conts[..., None]).squeeze(-1).sum(-1).exp()


def cell_index(tokens: torch.Tensor, v: int) -> torch.Tensor:
    """(N, n) tokens -> (N,) index of the continuation in ``itertools.product`` order."""
    n = tokens.shape[1]
    return (tokens * (v ** torch.arange(n - 1, -1, -1))).sum(-1)


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square goodness of fit; cells expected below 5 are pooled. A count in a
    cell of probability 0 gives 0.0 (the sampler left the target's support)."""
    n = counts.sum().item()
    if bool((counts[probs == 0] > 0).any()):
        return 0.0
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big & (probs > 0)].double().sum()[None]])
    exp = torch.cat([expected[big], expected[~big & (probs > 0)].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


V, PROMPT, NEW, RUNS = 4, [1, 3], 3, 1500


def run_and_test(settings, gamma=2, seed=0):
    target = TableLM(V, seed=1)
    draft = TableLM(V, seed=2, like=target, noise=1.2)
    prompt = torch.tensor([PROMPT]).expand(RUNS, -1)
    g = torch.Generator().manual_seed(seed)
    out = speculative_generate(target, draft, prompt, NEW, gamma=gamma, generator=g, **settings)
    cells = cell_index(out.ids[:, len(PROMPT):], V)
    counts = torch.bincount(cells, minlength=V ** NEW)
    return chi_square_p(counts, exact_joint(target, PROMPT, NEW, **settings)), out


SETTINGS = [{"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.9, "top_k": 3}]


@pytest.mark.parametrize("settings", SETTINGS, ids=["plain", "warped"])
def test_speculative_samples_follow_the_exact_target_distribution(settings):
    # the joint distribution of all 3 new tokens (64 cells): blocks end mid-way (rejections), at the
    # bonus token, and at the truncated last block, so every path of the algorithm is in the sample
    p_value, out = run_and_test(settings)
    assert p_value > 1e-3, p_value
    assert 0.2 < out.acceptance_rate < 0.9  # the draft is neither useless nor the target
    assert any(k == 0 for k in out.block_accepted) and any(k == 2 for k in out.block_accepted)


def _accept_q_over_p(p, q, drafted, generator=None, greedy=False):
    g = len(drafted)
    rows = torch.arange(g)
    u = torch.rand(g, generator=generator, dtype=p.dtype)
    rejected = (u * p[rows, drafted] >= q[rows, drafted]).nonzero()  # wrong: min(1, q / p)
    k = int(rejected[0, 0]) if len(rejected) else g
    dist = p[g] if k == g else (p[k] - q[k]).clamp(min=0)
    return k, int(torch.multinomial(dist if dist.sum() > 0 else p[k], 1, generator=generator))


def _resample_from_p(p, q, drafted, generator=None, greedy=False):
    g = len(drafted)
    rows = torch.arange(g)
    u = torch.rand(g, generator=generator, dtype=p.dtype)
    rejected = (u * q[rows, drafted] >= p[rows, drafted]).nonzero()
    k = int(rejected[0, 0]) if len(rejected) else g
    return k, int(torch.multinomial(p[k], 1, generator=generator))  # wrong: p instead of the residual


@pytest.mark.parametrize("broken", [_accept_q_over_p, _resample_from_p], ids=["q_over_p", "resample_p"])
def test_the_statistic_rejects_a_wrong_verification_rule(monkeypatch, broken):
    monkeypatch.setattr(spec, "verify_block", broken)
    p_value, _ = run_and_test(SETTINGS[0])
    assert p_value < 1e-6, p_value


def test_verify_block_by_hand():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.75, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    # token 0 has p / q = 2: always accepted; token 1 of row 2 has p == q: accepted; bonus from p[2] = token 0
    assert verify_block(p, q, torch.tensor([0, 1]), torch.Generator().manual_seed(0)) == (2, 0)
    # token 1 has p / q = 2/3: rejected about 1 time in 3, then the residual max(0, p - q) = (0.25, 0, 0) -> token 0
    outcomes = [verify_block(p, q, torch.tensor([1, 1]), torch.Generator().manual_seed(s)) for s in range(300)]
    rejected = [o for o in outcomes if o[0] == 0]
    assert {o[1] for o in rejected} == {0}
    assert 60 < len(rejected) < 140  # 100 expected, sd 8
    # p == q everywhere and a rejection forced: the residual is zero, so the token comes from p
    flat = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    assert verify_block(flat.expand(2, -1), flat, torch.tensor([0]), torch.Generator().manual_seed(0)) == (0, 1)
    # greedy: accept while equal to the argmax, then the target's argmax
    assert verify_block(p, q, torch.tensor([0, 2]), greedy=True) == (2, 0)  # argmax tie in row 0 -> lowest id
    assert verify_block(p, q, torch.tensor([0, 1]), greedy=True) == (1, 2)
    assert verify_block(p, q, torch.tensor([1, 2]), greedy=True) == (0, 0)
    assert verify_block(p[:1], q[:0], torch.tensor([], dtype=torch.long), greedy=True) == (0, 0)


def test_acceptance_rate_matches_the_analytic_alpha():
    # 2 new tokens, gamma 1: each row makes exactly one proposal, at the prompt, accepted with
    # probability alpha = sum_x min(p, q) at that position (Leviathan et al., Corollary 3.6)
    target = TableLM(V, seed=1)
    draft = TableLM(V, seed=2, like=target, noise=1.2)
    runs = 2000
    out = speculative_generate(target, draft, torch.tensor([PROMPT]).expand(runs, -1), 2, gamma=1,
                               generator=torch.Generator().manual_seed(3))
    assert out.proposed == runs
    ids = torch.tensor([PROMPT])
    alpha = float(token_acceptance(target(ids)[0, -1], draft(ids)[0, -1]))
    assert abs(out.acceptance_rate - alpha) < 4.5 * math.sqrt(alpha * (1 - alpha) / runs), (out.acceptance_rate, alpha)


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7])
@pytest.mark.parametrize("gamma", [1, 3, 4])
def test_exactly_max_new_tokens_and_consistent_counts(n, gamma):
    target = TableLM(V, seed=1)
    draft = TableLM(V, seed=2, like=target, noise=1.0)
    prompt = torch.tensor([[2, 0, 1], [3, 3, 1]])
    out = speculative_generate(target, draft, prompt, n, gamma=gamma, generator=torch.Generator().manual_seed(n))
    assert out.ids.shape == (2, 3 + n)
    assert torch.equal(out.ids[:, :3], prompt)
    assert sum(k + 1 for k in out.block_accepted) == 2 * n  # every block emits accepted + 1 tokens
    assert out.target_calls == len(out.block_accepted) == len(out.block_proposed)
    assert out.accepted == sum(out.block_accepted) <= out.proposed == sum(out.block_proposed)
    assert all(0 <= k <= g <= gamma for k, g in zip(out.block_accepted, out.block_proposed))
    assert out.draft_calls == out.proposed
    assert 0.0 <= out.acceptance_rate <= 1.0
    if n:
        assert 1.0 <= out.mean_accepted_length <= gamma + 1


# ---------------------------------------------------------------------------------------------
# real models: greedy equality, identical draft


@pytest.fixture(scope="module")
def models():
    # initializer_range 0.5: a random-init model at the default 0.02 repeats one token forever
    kw = {"vocab_size": 8, "initializer_range": 0.5}
    target = llama("tiny", seed=11, **kw)
    noisy = llama("tiny", seed=11, **kw)  # the target with 20% noise on every weight: accepts some, not all
    noisy.load_state_dict(target.state_dict())
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for w in noisy.parameters():
            w.add_(torch.randn(w.shape, generator=g) * w.std() * 0.2)
    small = llama("tiny", seed=12, hidden_size=16, intermediate_size=32, **kw)
    return target, {"same": target, "noisy": noisy, "small": small}


PROMPTS = [[1, 2], [5, 0, 3, 3, 7]]


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_equals_target_only_greedy(models, gamma):
    target, drafts = models
    partial = 0
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        want = sample(target, ids, 10, temperature=0).ids
        assert len(set(want[0, len(prompt):].tolist())) > 2  # not one repeated token
        for name, draft in drafts.items():
            out = speculative_generate(target, draft, ids, 10, gamma=gamma, temperature=0)
            assert torch.equal(out.ids, want), (name, prompt, out.ids, want)
            if name == "same":
                assert out.acceptance_rate == 1.0
            partial += sum(0 < k < g for k, g in zip(out.block_accepted, out.block_proposed))
    if gamma > 1:
        assert partial > 0  # some blocks were cut mid-way, so the caches were cropped inside a block


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_identical_draft_accepts_everything(models, temperature):
    target, _ = models
    gamma = 3
    out = speculative_generate(target, target, torch.tensor([PROMPTS[1]]), 2 * (gamma + 1), gamma=gamma,
                               temperature=temperature, generator=torch.Generator().manual_seed(0))
    assert out.acceptance_rate == 1.0
    assert out.mean_accepted_length == gamma + 1
    assert out.target_calls == 2


def test_modes_are_restored(models):
    target, drafts = models
    target.train()
    drafts["small"].eval()
    try:
        speculative_generate(target, drafts["small"], torch.tensor([[1]]), 2, gamma=1, temperature=0)
        assert target.training and not drafts["small"].training
    finally:
        target.eval()


# ---------------------------------------------------------------------------------------------
# metrics


def test_token_acceptance_is_one_minus_tvd_by_hand():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    # sum min = 0.2 + 0.3 + 0.2 = 0.7; TVD = (0.3 + 0 + 0.3) / 2 = 0.3
    assert token_acceptance(p.log(), q.log()).item() == pytest.approx(0.7, abs=1e-6)
    # temperature 0: 1 when the argmaxes agree
    assert token_acceptance(p.log(), q.log(), temperature=0).item() == 0.0
    assert token_acceptance(p.log(), (p + 0.01).log(), temperature=0).item() == 1.0


def test_expected_acceptance_on_text():
    target = TableLM(V, seed=1)
    draft = TableLM(V, seed=2, like=target, noise=1.0)
    ids = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    p, q = target(ids).softmax(-1), draft(ids).softmax(-1)
    tvd = 0.5 * (p - q).abs().sum(-1)
    assert expected_acceptance(target, draft, ids) == pytest.approx(float(1 - tvd.mean()), abs=1e-6)
    mask = torch.tensor([[True, False, False, True], [False] * 4])
    want = 1 - (tvd[0, 0] + tvd[0, 3]) / 2
    assert expected_acceptance(target, draft, ids, mask=mask) == pytest.approx(float(want), abs=1e-6)
    assert expected_acceptance(target, target, ids) == pytest.approx(1.0, abs=1e-6)


def test_expected_block_length():
    assert expected_block_length(1.0, 4) == 5.0
    assert expected_block_length(0.0, 4) == 1.0
    assert expected_block_length(0.5, 2) == pytest.approx(1.75)  # 1 + 0.5 + 0.25


def test_measure_speed_reports_consistent_figures():
    target = TableLM(V, seed=1)
    draft = TableLM(V, seed=2, like=target, noise=1.0)
    prompts = torch.tensor([[0, 1], [2, 3], [1, 1]])
    rep = spec.measure_speed(target, draft, prompts, 5, gamma=2, temperature=1.0, seed=0)
    assert rep.tokens == 15 and rep.settings["prompts"] == 3
    assert rep.target_seconds > 0 and rep.speculative_seconds > 0
    assert rep.target_tokens_per_s == pytest.approx(15 / rep.target_seconds)
    assert rep.speedup == pytest.approx(rep.speculative_tokens_per_s / rep.target_tokens_per_s)
    assert 0 <= rep.acceptance_rate <= 1 and 1 <= rep.mean_accepted_length <= 3
    again = spec.measure_speed(target, draft, list(prompts), 5, gamma=2, temperature=1.0, seed=0, warmup=False)
    assert (again.acceptance_rate, again.mean_accepted_length) == (rep.acceptance_rate, rep.mean_accepted_length)


# ---------------------------------------------------------------------------------------------
# errors


def test_bad_gamma_vocab_and_length_are_refused():
    target = llama("tiny", vocab_size=8, seed=0, max_length=8)
    prompt = torch.tensor([[1, 2]])
    for gamma in (0, -1, 1.5):
        with pytest.raises(DistilleryError, match="gamma"):
            speculative_generate(target, target, prompt, 2, gamma=gamma)
    with pytest.raises(DistilleryError, match=r"vocabulary of 8 tokens but the draft has 6"):
        speculative_generate(target, llama("tiny", vocab_size=6, seed=0), prompt, 2)
    with pytest.raises(DistilleryError, match="exceeds the target's 8 positions"):
        speculative_generate(target, llama("tiny", vocab_size=8, seed=1), prompt, 7)
    with pytest.raises(DistilleryError, match=r"\(B, P\)"):
        speculative_generate(target, target, torch.tensor([1, 2]), 2)
    with pytest.raises(DistilleryError, match="temperature"):
        speculative_generate(target, target, prompt, 2, temperature=-1)


# ---------------------------------------------------------------------------------------------
# AdaSPEC


def _two_class(a):
    """(1, T, 2) logits [a_t, 0]."""
    a = torch.tensor(a, dtype=torch.float32)
    return torch.stack([a, torch.zeros_like(a)], -1)[None]


def _kl_uniform(a):
    """KL(uniform || softmax([a, 0])) for two classes."""
    q = 1 / (1 + math.exp(-a))
    return 0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q))


def _example():
    target = _two_class([0.0, 0.0, 0.0, 0.0])
    draft = _two_class([0.5, 3.0, 1.0, 2.0])
    ref = _two_class([0.0, 3.0, 0.0, 0.0])  # token 1 is hard for the reference too: dL = 0
    return draft, ref, target


def test_adaspec_mask_by_hand():
    draft, ref, target = _example()
    delta = [_kl_uniform(0.5), 0.0, _kl_uniform(1.0), _kl_uniform(2.0)]
    assert sorted(range(4), key=lambda i: -delta[i]) == [3, 2, 0, 1]
    full = torch.ones(1, 4, dtype=torch.bool)
    cases = {1.0: [3, 2, 0, 1], 0.75: [3, 2, 0], 0.5: [3, 2], 0.4: [3, 2], 0.25: [3], 0.1: [3]}  # round(keep * 4)
    for keep, want in cases.items():
        got = adaspec_mask(draft, ref, target, full, keep=keep)
        assert got[0].nonzero().flatten().tolist() == sorted(want), keep
    assert adaspec_mask(draft, ref, target, full).sum() == 2  # default keep 0.4: round(1.6) = 2


def test_adaspec_mask_respects_the_mask_and_edges():
    draft, ref, target = _example()
    mask = torch.tensor([[True, True, True, False]])
    draft = draft.clone()
    draft[0, 3] = float("nan")  # masked positions may hold garbage
    assert adaspec_mask(draft, ref, target, mask)[0].tolist() == [False, False, True, False]  # round(1.2) = 1
    none = torch.zeros(1, 4, dtype=torch.bool)
    assert not adaspec_mask(draft, ref, target, none).any()
    one = torch.tensor([[False, True, False, False]])
    assert adaspec_mask(draft, ref, target, one, keep=0.1)[0].tolist() == [False, True, False, False]


def test_adaspec_mask_ties_rounding_and_rows():
    z = torch.zeros(2, 5, 3)
    full = torch.ones(2, 5, dtype=torch.bool)
    # every dL is 0: the earliest positions win, row-major
    assert adaspec_mask(z, z, z, full, keep=0.3).flatten().nonzero().flatten().tolist() == [0, 1, 2]
    assert adaspec_mask(z, z, z, full, keep=0.3, per_row=True).sum(1).tolist() == [2, 2]  # round(1.5) = 2 per row
    # keep * n not exactly representable: 0.7 * 10 = 7.000000000000001 keeps 7, not 8
    assert adaspec_mask(z, z, z, full, keep=0.7).sum() == 7
    # per_row selects within each row: row 1 has the larger gaps, but row 0 still keeps its best
    draft = torch.cat([_two_class([1.0, 0.1, 0.2, 0.3, 0.4]), _two_class([3.0, 4.0, 5.0, 6.0, 7.0])])
    tz = torch.zeros(2, 5, 2)
    batch = adaspec_mask(draft, tz, tz, full, keep=0.2)
    assert batch.nonzero().tolist() == [[1, 3], [1, 4]]
    rows = adaspec_mask(draft, tz, tz, full, keep=0.2, per_row=True)
    assert rows.nonzero().tolist() == [[0, 0], [1, 4]]


def test_adaspec_mask_composes_with_token_loss():
    g = torch.Generator().manual_seed(0)
    target, ref = torch.randn(2, 6, 5, generator=g), torch.randn(2, 6, 5, generator=g)
    draft = torch.randn(2, 6, 5, generator=g).requires_grad_(True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    sel = adaspec_mask(draft, ref, target, mask)
    assert not sel.requires_grad and sel.sum() == 4  # round(0.4 * 10)
    assert not (sel & ~mask).any()
    loss = token_loss("kd", draft, target, mask=sel, temperature=1.0)
    kl = (target.softmax(-1) * (target.log_softmax(-1) - draft.log_softmax(-1))).sum(-1)
    assert loss.item() == pytest.approx(kl[sel].mean().item(), rel=1e-5)
    # the kept tokens are the largest gaps among the valid ones
    kl_ref = (target.softmax(-1) * (target.log_softmax(-1) - ref.log_softmax(-1))).sum(-1)
    gap = (kl - kl_ref).detach()
    assert gap[sel].min() >= gap[mask & ~sel].max()
    loss.backward()
    assert draft.grad[~sel].abs().max() == 0 and draft.grad[sel].abs().sum() > 0


def test_adaspec_mask_errors():
    draft, ref, target = _example()
    full = torch.ones(1, 4, dtype=torch.bool)
    for keep in (0, 1.5, -0.1):
        with pytest.raises(DistilleryError, match="keep"):
            adaspec_mask(draft, ref, target, full, keep=keep)
    with pytest.raises(DistilleryError, match="share one"):
        adaspec_mask(draft, ref[:, :3], target, full)
    with pytest.raises(DistilleryError, match="mask must be a bool"):
        adaspec_mask(draft, ref, target, full.long())
    assert spec.adaspec_mask is adaspec_mask  # re-exported next to the decoder it trains for


def test_token_acceptance_counts_judged_proposals_only():
    from distillery.lm.speculative import SpeculativeResult, token_acceptance_rate

    # blocks of gamma 4: 2 accepted then a rejection (3 judged), all 4 accepted (4 judged), 0 (1 judged)
    r = SpeculativeResult(torch.empty(0), 12, 6, 3, 12, block_accepted=[2, 4, 0], block_proposed=[4, 4, 4])
    assert token_acceptance_rate(r) == pytest.approx(6 / 8)
    assert r.acceptance_rate == pytest.approx(6 / 12)
    assert token_acceptance_rate(SpeculativeResult(torch.empty(0), 0, 0, 0, 0)) == 1.0
