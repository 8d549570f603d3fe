"""Speculative decoding: a small draft model proposes tokens, the target model checks them all in one
forward, and the output is distributed exactly as sampling from the target alone.

Leviathan, Kalman & Matias, "Fast Inference from Transformers via Speculative Decoding", ICML 2023
(Algorithm 1), and Chen et al., "Accelerating Large Language Model Decoding with Speculative
Sampling", 2023. One *block* (one target forward) for a prefix x_<t:

1. the draft samples gamma tokens autoregressively, x_i ~ q_i = q(. | x_<t, x_1..x_{i-1});
2. the target scores the prefix and all gamma proposals in ONE forward (key-value cache), giving
   p_1 .. p_{gamma+1};
3. for i = 1..gamma, x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first
   rejection the block ends with a token from the residual norm(max(0, p_i - q_i)); if all gamma are
   accepted, a bonus token is drawn from p_{gamma+1}.

Every emitted token is then distributed as p given its prefix (the theorem of both papers), so the
text is an exact sample of the target. ``p`` and ``q`` are the *warped* distributions of
``generate.warp`` (temperature, top-k, top-p, the same settings for both): the guarantee is with
respect to the target's warped sampling distribution, i.e. what ``generate.sample`` would draw
with the same settings. Temperature 0 is greedy: a proposal is accepted while it equals the
target's argmax and the block ends with the target's argmax, so the output equals target-only
greedy decoding token for token (up to float ties between the one-token and the many-token forward).

Both models keep a key-value cache; after a rejection both are cropped back to the accepted prefix.
Speculative decoding is a per-sequence algorithm (each row accepts a different number of tokens), so
a (B, P) prompt is decoded row by row with the one ``generator``; batch size 1 is the intended use.
The last block drafts only ``min(gamma, tokens left - 1)`` tokens, so exactly ``max_new_tokens``
tokens come out and no forward runs past them (a prefix of an exact sample is an exact sample).

Metrics (``SpeculativeResult``): ``token_acceptance_rate`` = accepted / judged draft tokens (a block
judges its proposals up to the first rejection), the per-token acceptance that estimates alpha;
``acceptance_rate`` = accepted / proposed draft tokens;
``mean_accepted_length`` = tokens emitted per target forward = mean over blocks of (accepted + 1),
the "tau" / block efficiency of the papers (gamma + 1 when every proposal is accepted);
``expected_acceptance`` = Leviathan's analytic alpha = E_t[sum_x min(p_t(x), q_t(x))] = 1 - TVD(p, q)
over the positions of given text, a low-variance metric that needs no sampling; and
``expected_block_length(alpha, gamma)`` = (1 - alpha^(gamma+1)) / (1 - alpha) (their eq. 1).
``measure_speed`` times target-only sampling against speculative sampling, alternated per prompt.

AdaSPEC's selective distillation of the draft (``adaspec_mask``) lives in ``adaspec`` and is
re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import DistilleryError
from .adaspec import adaspec_mask
from .generate import check_settings, draw, sample, warp
from .models import CausalLM

__all__ = [
    "SpeculativeResult",
    "SpeedReport",
    "acceptance_rate",
    "adaspec_mask",
    "expected_acceptance",
    "expected_block_length",
    "mean_accepted_length",
    "measure_speed",
    "speculative_generate",
    "token_acceptance",
    "token_acceptance_rate",
    "verify_block",
]

ZERO_RESIDUAL = 1e-9
"""A residual max(0, p - q) with less total mass than this counts as zero (p == q numerically):
the token is drawn from p instead. A rejection there has probability sum(max(0, p - q)) < 1e-9."""


@dataclass
class SpeculativeResult:
    ids: Tensor
    """(B, P + N) prompt then the N generated tokens."""
    proposed: int
    """Draft tokens proposed (sum over blocks of the gamma used)."""
    accepted: int
    """Draft tokens accepted by the target."""
    target_calls: int
    """Target forwards (one per block; the first also reads the prompt)."""
    draft_calls: int
    """Draft forwards."""
    block_accepted: list[int] = field(default_factory=list)
    """Accepted tokens of each block, in order (rows one after another)."""
    block_proposed: list[int] = field(default_factory=list)
    """Proposed tokens of each block (gamma, less in a row's last block)."""
    settings: dict = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        return acceptance_rate(self)

    @property
    def token_acceptance_rate(self) -> float:
        return token_acceptance_rate(self)

    @property
    def mean_accepted_length(self) -> float:
        return mean_accepted_length(self)


def acceptance_rate(result: SpeculativeResult) -> float:
    """Accepted / proposed draft tokens, in [0, 1] (1.0 when nothing was proposed: no proposal was refused)."""
    return result.accepted / result.proposed if result.proposed else 1.0


def token_acceptance_rate(result: SpeculativeResult) -> float:
    """The per-token acceptance rate: accepted / *judged* draft tokens, where a block judges its
    proposals up to and including the first rejected one (the rest are never offered to the target):
    sum_b a_b / sum_b min(a_b + 1, g_b). This estimates Leviathan et al.'s alpha, the probability that
    the target accepts a proposal; ``acceptance_rate`` (accepted / proposed) is lower for gamma > 1,
    as it also counts the proposals a rejection threw away. 1.0 when nothing was judged."""
    judged = sum(min(a + 1, g) for a, g in zip(result.block_accepted, result.block_proposed))
    return sum(result.block_accepted) / judged if judged else 1.0


def mean_accepted_length(result: SpeculativeResult) -> float:
    """Tokens emitted per target forward: (1 / #blocks) * sum over blocks of (accepted_b + 1), the papers'
    tau (block efficiency, Leviathan et al.'s expected tokens per iteration). gamma + 1 when the target
    accepts everything, 1 when it accepts nothing; the speed-up's upper bound at a free draft."""
    blocks = len(result.block_accepted)
    return (sum(result.block_accepted) + blocks) / blocks if blocks else 0.0


def expected_block_length(alpha: float, gamma: int) -> float:
    """Leviathan et al. eq. (1): E[tokens per block] = (1 - alpha^(gamma+1)) / (1 - alpha) when each
    proposal is accepted independently with probability alpha (gamma + 1 at alpha = 1)."""
    if not 0.0 <= alpha <= 1.0:
        raise DistilleryError(f"alpha must lie in [0, 1], got {alpha!r}.")
    if alpha == 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


# ---------------------------------------------------------------------------------------------
# one verification block


def verify_block(p: Tensor, q: Tensor, drafted: Tensor, generator: torch.Generator | None = None,
                 greedy: bool = False) -> tuple[int, int]:
    """Accept or reject the draft's proposals of one block (Leviathan et al., Algorithm 1, steps 4-7).

    ``p`` (gamma + 1, V) target probabilities at each proposal and after the last one; ``q`` (gamma, V)
    draft probabilities the proposals ``drafted`` (gamma,) were drawn from. Returns (k, token): the first
    k proposals are accepted (x_i kept while u_i < p_i(x_i) / q_i(x_i), u_i ~ U[0, 1)) and ``token``
    follows them: from norm(max(0, p_{k+1} - q_{k+1})) after a rejection, from p_{gamma+1} when all were
    accepted; from p_{k+1} when the residual is numerically zero (``ZERO_RESIDUAL``).
    ``generator`` lives on the device of ``p`` (as for ``generate.sample``; None: the global RNG).
    ``greedy``: accept while x_i == argmax p_i, then emit argmax p_{k+1} (no randomness)."""
    g = len(drafted)
    if greedy:
        best = p.argmax(-1)
        k = int((drafted == best[:g]).long().cumprod(0).sum()) if g else 0
        return k, int(best[k])
    k = g
    if g:
        rows = torch.arange(g, device=p.device)
        px, qx = p[rows, drafted], q[rows, drafted]
        u = torch.rand(g, generator=generator, dtype=p.dtype, device=p.device)
        rejected = (u * qx >= px).nonzero()  # u < p/q  <=>  u q < p, as q(x) > 0 for a drawn x
        k = int(rejected[0, 0]) if len(rejected) else g
    if k == g:
        dist = p[g]
    else:
        residual = (p[k] - q[k]).clamp(min=0.0)
        total = residual.sum()
        dist = residual / total if total > ZERO_RESIDUAL else p[k]
    return k, int(torch.multinomial(dist, 1, generator=generator))


# ---------------------------------------------------------------------------------------------
# generation


def _rollback(cache: Any, keep: int) -> None:
    """Crop a key-value cache to its first ``keep`` tokens. ``crop(-n)`` removes n tokens in every
    transformers version (5.x refuses a positive size, which 4.x read as the length to keep)."""
    extra = cache.get_seq_length() - keep
    if extra > 0:
        cache.crop(-extra)


def _check(target: CausalLM, draft: CausalLM, prompt: Tensor, max_new_tokens: int, gamma: int) -> None:
    if isinstance(gamma, bool) or int(gamma) != gamma or gamma < 1:
        raise DistilleryError(f"gamma (draft tokens per block) must be an integer >= 1, got {gamma!r}; "
                              "4 or 5 is usual, fewer for a weak draft.")
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
        raise DistilleryError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}.")
    if target.vocab_size != draft.vocab_size:
        raise DistilleryError(f"the target has a vocabulary of {target.vocab_size} tokens but the draft has "
                              f"{draft.vocab_size}; speculative decoding compares their distributions token by "
                              "token: build the draft with the target's tokenizer.")
    if not isinstance(prompt, Tensor) or prompt.dim() != 2 or prompt.shape[1] < 1:
        got = tuple(prompt.shape) if isinstance(prompt, Tensor) else type(prompt).__name__
        raise DistilleryError(f"prompt must be (B, P) token ids with P >= 1, got {got}; "
                              "a single prompt is prompt[None].")
    if prompt.is_floating_point() or prompt.dtype == torch.bool:
        raise DistilleryError(f"prompt must hold integer token ids, got {prompt.dtype}.")
    limit = min(target.max_length, draft.max_length)
    if prompt.shape[1] + max_new_tokens > limit:
        which = "target" if target.max_length == limit else "draft"
        raise DistilleryError(f"prompt of {prompt.shape[1]} tokens + {max_new_tokens} new ones exceeds the "
                              f"{which}'s {limit} positions; shorten the prompt or ask for fewer tokens.")


def _decode_row(target: CausalLM, draft: CausalLM, row: Tensor, n_new: int, gamma: int, settings: dict,
                generator: torch.Generator | None, out: SpeculativeResult) -> list[int]:
    temperature, top_p, top_k = settings["temperature"], settings["top_p"], settings["top_k"]
    greedy = temperature == 0
    device = row.device
    seq = row.tolist()
    start = len(seq)
    t_cache = d_cache = None

    def feed(cache: Any) -> Tensor:  # the tokens of seq the cache has not seen yet, (1, n)
        seen = 0 if cache is None else cache.get_seq_length()
        return torch.tensor([seq[seen:]], dtype=torch.long, device=device)

    while len(seq) - start < n_new:
        base = len(seq)
        g = min(gamma, n_new - (base - start) - 1)
        q_rows, drafted = [], []
        for _ in range(g):
            logits, d_cache = draft.step(feed(d_cache), d_cache)
            out.draft_calls += 1
            log_q = warp(logits[0, -1], temperature, top_p, top_k)
            x = int(log_q.argmax()) if greedy else int(draw(log_q[None], generator))
            q_rows.append(log_q)
            drafted.append(x)
            seq.append(x)
        logits, t_cache = target.step(feed(t_cache), t_cache)
        out.target_calls += 1
        p = warp(logits[0, -(g + 1):], temperature, top_p, top_k).double().exp()
        q = torch.stack(q_rows).double().exp() if g else p.new_zeros(0, p.shape[-1])
        k, token = verify_block(p, q, torch.tensor(drafted, dtype=torch.long, device=p.device), generator, greedy)
        del seq[base + k:]
        seq.append(token)
        # both caches may keep only accepted tokens; ``token`` itself is fed at the next block
        _rollback(t_cache, base + k)
        if d_cache is not None:
            _rollback(d_cache, base + k)
        out.proposed += g
        out.accepted += k
        out.block_proposed.append(g)
        out.block_accepted.append(k)
    return seq


@torch.no_grad()
def speculative_generate(target: CausalLM, draft: CausalLM, prompt: Tensor, max_new_tokens: int, *, gamma: int = 4,
                         temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                         generator: torch.Generator | None = None) -> SpeculativeResult:
    """Continue each row of ``prompt`` (B, P) by exactly ``max_new_tokens`` tokens sampled from the
    target's warped distribution, with ``draft`` proposing ``gamma`` tokens per target forward (see the
    module docstring). Rows are decoded one after another. Randomness comes only from ``generator``.

    Returns ``SpeculativeResult(ids (B, P + N), proposed, accepted, target_calls, draft_calls,
    block_accepted, block_proposed)``; its counts cover all rows."""
    check_settings(temperature, top_p, top_k)
    _check(target, draft, prompt, max_new_tokens, gamma)
    settings = {"max_new_tokens": int(max_new_tokens), "gamma": int(gamma), "temperature": float(temperature),
                "top_p": float(top_p), "top_k": int(top_k)}
    out = SpeculativeResult(prompt, 0, 0, 0, 0, settings=settings)
    modes = (target.training, draft.training)
    target.eval()
    draft.eval()
    try:
        rows = [_decode_row(target, draft, row, int(max_new_tokens), int(gamma), settings, generator, out)
                for row in prompt]
    finally:
        target.train(modes[0])
        draft.train(modes[1])
    out.ids = torch.tensor(rows, dtype=torch.long, device=prompt.device).reshape(len(prompt), -1)
    return out


# ---------------------------------------------------------------------------------------------
# analytic acceptance


def token_acceptance(target_logits: Tensor, draft_logits: Tensor, temperature: float = 1.0, top_p: float = 1.0,
                     top_k: int = 0) -> Tensor:
    """Probability that a draft token drawn from q is accepted: alpha = sum_x min(p(x), q(x))
    = 1 - TVD(p, q) (Leviathan et al., Definition 3.1 and Corollary 3.6), p and q the warped
    distributions. (..., V), (..., V) -> (...). At temperature 0 it is 1 where the argmaxes agree, else 0."""
    if target_logits.shape != draft_logits.shape:
        raise DistilleryError(f"target logits {tuple(target_logits.shape)} and draft logits "
                              f"{tuple(draft_logits.shape)} must have the same shape (..., V).")
    p = warp(target_logits, temperature, top_p, top_k).exp()
    q = warp(draft_logits, temperature, top_p, top_k).exp()
    return torch.minimum(p, q).sum(-1)


@torch.no_grad()
def expected_acceptance(target: CausalLM, draft: CausalLM, ids: Tensor, temperature: float = 1.0, top_p: float = 1.0,
                        top_k: int = 0, mask: Tensor | None = None) -> float:
    """Mean analytic acceptance alpha over the next-token positions of ``ids`` (B, T): the mean over
    positions t (where ``mask`` (B, T) is True; default all) of sum_x min(p(x | ids_<=t), q(x | ids_<=t)).

    On text drawn from the target this estimates Leviathan et al.'s alpha = E[beta] without the
    variance of sampled accept/reject decisions; on other text it is alpha along that text."""
    check_settings(temperature, top_p, top_k)
    if target.vocab_size != draft.vocab_size:
        raise DistilleryError(f"the target has a vocabulary of {target.vocab_size} tokens but the draft has "
                              f"{draft.vocab_size}; build the draft with the target's tokenizer.")
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[1] < 1:
        got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise DistilleryError(f"ids must be (B, T) token ids, got {got}.")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != ids.shape):
        raise DistilleryError(f"mask must be a bool tensor of the shape of ids {tuple(ids.shape)}, "
                              f"got {mask.dtype} {tuple(mask.shape)}.")
    modes = (target.training, draft.training)
    target.eval()
    draft.eval()
    try:
        alpha = token_acceptance(target(ids), draft(ids), temperature, top_p, top_k)
    finally:
        target.train(modes[0])
        draft.train(modes[1])
    if mask is not None:
        if not bool(mask.any()):
            raise DistilleryError("mask selects no position; expected_acceptance needs at least one.")
        alpha = alpha[mask]
    return float(alpha.double().mean())


# ---------------------------------------------------------------------------------------------
# speed


@dataclass
class SpeedReport:
    target_tokens_per_s: float
    speculative_tokens_per_s: float
    speedup: float
    """speculative / target-only tokens per second."""
    acceptance_rate: float
    """Accepted / proposed draft tokens."""
    token_acceptance_rate: float
    """Accepted / judged draft tokens (``token_acceptance_rate``): the per-token acceptance."""
    mean_accepted_length: float
    tokens: int
    """New tokens per method (prompts x max_new_tokens)."""
    target_seconds: float
    speculative_seconds: float
    settings: dict


def _prompt_list(prompts: Tensor | Sequence[Tensor]) -> list[Tensor]:
    if isinstance(prompts, Tensor):
        if prompts.dim() == 1:
            return [prompts[None]]
        if prompts.dim() == 2:
            return [row[None] for row in prompts]
    elif len(prompts):
        return [p[None] if p.dim() == 1 else p for p in prompts]
    raise DistilleryError("prompts must be a (B, P) tensor of token ids or a non-empty list of (P,) / (1, P) ones.")


def measure_speed(target: CausalLM, draft: CausalLM, prompts: Tensor | Sequence[Tensor], max_new_tokens: int,
                  gamma: int = 4, temperature: float = 1.0, seed: int = 0, *, top_p: float = 1.0, top_k: int = 0,
                  warmup: bool = True) -> SpeedReport:
    """Tokens per second of target-only sampling (``generate.sample``, key-value cache, batch 1) and of
    ``speculative_generate``, same settings, one prompt at a time. The two methods alternate which
    runs first from prompt to prompt, so drifting machine load hits both alike; prompt i seeds a
    generator with ``seed + i`` for each. ``warmup`` runs each once untimed on the first prompt.
    Wall-clock figures: compare them only on one machine, at one load."""
    rows = _prompt_list(prompts)
    for row in rows:
        _check(target, draft, row, max_new_tokens, gamma)
    check_settings(temperature, top_p, top_k)
    kw = {"temperature": temperature, "top_p": top_p, "top_k": top_k}

    def plain(row: Tensor, g: torch.Generator) -> None:
        sample(target, row, max_new_tokens, generator=g, **kw)

    stats = SpeculativeResult(torch.empty(0), 0, 0, 0, 0)

    def spec(row: Tensor, g: torch.Generator) -> None:
        r = speculative_generate(target, draft, row, max_new_tokens, gamma=gamma, generator=g, **kw)
        for name in ("proposed", "accepted", "target_calls", "draft_calls"):
            setattr(stats, name, getattr(stats, name) + getattr(r, name))
        stats.block_accepted += r.block_accepted
        stats.block_proposed += r.block_proposed

    if warmup:
        warm = min(int(max_new_tokens), 2 * int(gamma) + 2)
        sample(target, rows[0], warm, generator=torch.Generator().manual_seed(seed), **kw)
        speculative_generate(target, draft, rows[0], warm, gamma=gamma, generator=torch.Generator().manual_seed(seed),
                             **kw)
    seconds = {"plain": 0.0, "spec": 0.0}
    for i, row in enumerate(rows):
        order = (("plain", plain), ("spec", spec)) if i % 2 == 0 else (("spec", spec), ("plain", plain))
        for name, fn in order:
            g = torch.Generator().manual_seed(seed + i)
            t0 = time.perf_counter()
            fn(row, g)
            seconds[name] += time.perf_counter() - t0
    tokens = len(rows) * int(max_new_tokens)
    plain_tps = tokens / seconds["plain"] if seconds["plain"] > 0 else float("nan")
    spec_tps = tokens / seconds["spec"] if seconds["spec"] > 0 else float("nan")
    speedup = spec_tps / plain_tps if plain_tps > 0 else float("nan")
    return SpeedReport(plain_tps, spec_tps, speedup,
                       stats.acceptance_rate, stats.token_acceptance_rate, stats.mean_accepted_length, tokens,
                       seconds["plain"], seconds["spec"],
                       {"prompts": len(rows), "max_new_tokens": int(max_new_tokens), "gamma": int(gamma),
                        "seed": int(seed), **kw})
