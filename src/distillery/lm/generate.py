"""Sampling from a ``CausalLM`` with a key-value cache: the teacher's text for sequence-level KD,
the student's for on-policy KD, and the server's completions.

``sample(model, prompt (B, P), max_new_tokens, temperature=1, top_p=1, top_k=0, generator=...)``
returns ``Generation(ids (B, P + N), logprobs (B, N))``: every row gets exactly N new tokens (the
prompts are equal-length blocks, so no padding is needed); with ``eos_id`` a row that has produced
it continues with ``eos_id`` and ``done`` marks where, so the caller masks those positions.
``logprobs`` are the log-probabilities of the chosen tokens under the *sampling* distribution
(after temperature, top-k and top-p); temperature 0 is greedy decoding (argmax, ties to the lowest id).
Randomness comes only from ``generator`` (a ``torch.Generator``), so a seed reproduces a sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DistilleryError
from .models import CausalLM


@dataclass
class Generation:
    ids: Tensor
    """(B, P + N) prompt then generated tokens."""
    logprobs: Tensor
    """(B, N) log-probability of each generated token under the sampling distribution."""
    done: Tensor
    """(B, N) bool: True from the token after a row's first ``eos_id`` on (those tokens are padding)."""
    settings: dict


def check_settings(temperature: float, top_p: float, top_k: int) -> None:
    if not (temperature >= 0 and temperature == temperature):
        raise DistilleryError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}.")
    if not 0 < top_p <= 1:
        raise DistilleryError(f"top_p must lie in (0, 1], got {top_p!r}.")
    if int(top_k) != top_k or top_k < 0:
        raise DistilleryError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}.")


def warp(logits: Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> Tensor:
    """(..., V) logits -> (..., V) log-probabilities of the sampling distribution: divided by the
    temperature, the k most likely kept (``top_k``), then the smallest set whose probability
    reaches ``top_p`` (nucleus; the most likely token is always kept). Temperature 0: one-hot argmax."""
    logits = logits.float()
    if temperature == 0:
        out = torch.full_like(logits, float("-inf"))
        return out.scatter(-1, logits.argmax(-1, keepdim=True), 0.0)
    z = logits / temperature
    if top_k and top_k < z.shape[-1]:
        kth = z.topk(int(top_k), dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = z.sort(-1, descending=True)
        p = sorted_z.softmax(-1)
        before = p.cumsum(-1) - p  # mass of the tokens more likely than this one
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return F.log_softmax(z, dim=-1)


def draw(log_p: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token per row from (B, V) log-probabilities."""
    return torch.multinomial(log_p.exp(), 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Tensor | Sequence[int]], pad: int, device=None) -> tuple[Tensor, Tensor]:
    """(ids (B, P), prompt_mask (B, P)) of prompts of different lengths, right-aligned with ``pad`` before
    them: what ``sample(..., prompt_mask=)`` continues."""
    width = max(len(q) for q in prompts)
    ids = torch.full((len(prompts), width), int(pad), dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
    for r, q in enumerate(prompts):
        ids[r, width - len(q):] = torch.as_tensor(q, dtype=torch.long, device=device)
        mask[r, width - len(q):] = True
    return ids, mask


@torch.no_grad()
def sample(model: CausalLM, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_p: float = 1.0,
           top_k: int = 0, generator: torch.Generator | None = None, eos_id: int | Sequence[int] | None = None,
           prompt_mask: Tensor | None = None) -> Generation:
    """Continue every prompt row by ``max_new_tokens`` tokens (see the module docstring).
    ``prompt_mask`` (B, P) bool, False on left padding: prompts of different lengths in one batch
    (their padding is never attended to, and positions count from each prompt's first token)."""
    check_settings(temperature, top_p, top_k)
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise DistilleryError(f"prompt must be (B, P) token ids with P >= 1, got shape {tuple(prompt.shape)}.")
    total = prompt.shape[1] + max_new_tokens
    if total > model.max_length:
        raise DistilleryError(f"prompt of {prompt.shape[1]} tokens + {max_new_tokens} new ones exceeds the model's "
                              f"{model.max_length} positions; shorten one of them.")
    attn = pos = None
    if prompt_mask is not None:
        if prompt_mask.shape != prompt.shape or bool((prompt_mask[:, 1:].long() < prompt_mask[:, :-1].long()).any()) \
                or not bool(prompt_mask[:, -1].all()):
            raise DistilleryError("prompt_mask must have the prompt's shape and be left padding: False before each "
                                  "row's first prompt token, True from it on.")
        attn = prompt_mask.long()
        pos = (attn.cumsum(1) - 1).clamp(min=0)
    was_training = model.training
    model.eval()
    try:
        padded = {} if attn is None else {"attention_mask": attn, "pos": pos}  # models without padding support too
        logits, cache = model.step(prompt, **padded)
        last = logits[:, -1]
        new, lps = [], []
        done = torch.zeros(len(prompt), dtype=torch.bool, device=prompt.device)
        ends = None if eos_id is None else torch.as_tensor([eos_id] if isinstance(eos_id, int) else list(eos_id),
                                                           dtype=prompt.dtype, device=prompt.device)
        fill = None if ends is None else int(ends[0])
        dones = []
        for _ in range(max_new_tokens):
            log_p = warp(last, temperature, top_p, top_k)
            tok = log_p.argmax(-1) if temperature == 0 else draw(log_p, generator)
            lp = log_p.gather(-1, tok[:, None]).squeeze(-1)
            if ends is not None:
                tok = torch.where(done, torch.full_like(tok, fill), tok)
                lp = torch.where(done, torch.zeros_like(lp), lp)
            dones.append(done.clone())
            new.append(tok)
            lps.append(lp)
            if ends is not None:
                done = done | torch.isin(tok, ends)
                if bool(done.all()):  # every row has ended: the rest is padding, no more model calls
                    for _ in range(max_new_tokens - len(new)):
                        dones.append(done.clone())
                        new.append(torch.full_like(tok, fill))
                        lps.append(torch.zeros_like(lp))
                    break
            if len(new) == max_new_tokens:
                break
            if attn is not None:
                attn = torch.cat([attn, attn.new_ones(len(attn), 1)], 1)
                pos = pos[:, -1:] + 1
            padded = {} if attn is None else {"attention_mask": attn, "pos": pos}
            logits, cache = model.step(tok[:, None], cache, **padded)
            last = logits[:, -1]
    finally:
        model.train(was_training)
    ids = torch.cat([prompt, torch.stack(new, 1)], 1) if new else prompt.clone()
    lp = torch.stack(lps, 1) if lps else torch.zeros(len(prompt), 0)
    dn = torch.stack(dones, 1) if dones else torch.zeros(len(prompt), 0, dtype=torch.bool)
    return Generation(ids, lp, dn, {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature),
                                    "top_p": float(top_p), "top_k": int(top_k),
                                    "eos_id": eos_id if eos_id is None or isinstance(eos_id, int) else list(eos_id)})
