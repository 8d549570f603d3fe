"""Sequence-level and reasoning distillation on chat data: a teacher answers the prompts, a verifier
keeps the right answers, the student learns them (Kim & Rush 2016; the O1-replication recipe of SFT on
a stronger model's verified chains of thought).

- ``respond(model, tok, examples, ...)``: a local ``CausalLM`` answers every example's prompt (the
  conversation before its last assistant turn, with the template's generation prompt): ``samples``
  answers each, batched with left padding, stopping at the tokenizer's end of turn.
- ``respond_remote(client, examples, ...)``: the same from an OpenAI-compatible chat-completions
  endpoint (``remote.RemoteTeacher.chat``: concurrent requests, retries, a resumable request log). A
  request that fails after its retries stops the run with a one-line error (a rerun pays only for
  the failed ones), so no prompt silently drops out of the data.
- ``keep(examples, answers, verifier, tok, max_tokens)``: the answers that pass ``verifier`` and fit
  ``max_tokens`` tokens, as new examples whose last assistant turn is the teacher's answer; the counts
  of what was dropped and why.
- ``VERIFIERS``: ``exact`` (the final answer, the number after the last ``answer is``, equals the
  example's ``answer``), ``none`` (every answer), and any a plugin registers
  (``@traces.VERIFIERS.register("mine") def mine(example, response) -> bool``).
- ``accuracy(model, tok, examples)``: the share (%) of greedy answers the verifier accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import DistilleryError
from ..registry import Registry
from . import chat, reasoning
from .corpus import TokenData
from .generate import left_pad, sample
from .models import CausalLM, end_ids, pad_id

VERIFIERS: Registry[Callable[[dict, str], bool]] = Registry("verifier")
VERIFIERS.add("exact", reasoning.verify)
VERIFIERS.add("none", lambda example, response: True)


def verifier(name: str) -> Callable[[dict, str], bool]:
    return VERIFIERS.get(name)


def _prompts(tok, examples: Sequence[dict]) -> list[list[int]]:
    return [tok(chat.prompt_text(tok, e), add_special_tokens=False)["input_ids"] for e in examples]


@torch.no_grad()
def respond(model: CausalLM, tok, examples: Sequence[dict], max_new_tokens: int, *, samples: int = 1,
            temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 32) -> list[list[str]]:
    """``samples`` answers of ``model`` to every example's prompt (see the module docstring); the same seed
    and batch size give the same answers."""
    if temperature == 0 and samples > 1:
        raise DistilleryError("greedy answers (temperature 0) are one per prompt; use samples: 1.")
    prompts = _prompts(tok, examples)
    limit = model.max_length - max_new_tokens
    long = [i for i, p in enumerate(prompts) if len(p) > limit]
    if long:
        raise DistilleryError(f"example {long[0] + 1}'s prompt has {len(prompts[long[0]])} tokens; with {max_new_tokens} "
                              f"new ones it exceeds the model's {model.max_length} positions: lower max_new_tokens.")
    ends, pad = end_ids(tok), pad_id(tok)
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    order = [i for i in range(len(prompts)) for _ in range(samples)]
    texts: list[list[str]] = [[] for _ in prompts]
    for lo in range(0, len(order), batch_size):
        part = order[lo:lo + batch_size]
        ids, mask = left_pad([prompts[i] for i in part], pad, device)
        out = sample(model, ids, max_new_tokens, temperature=temperature, top_p=top_p, generator=g, eos_id=ends,
                     prompt_mask=mask)
        new = out.ids[:, ids.shape[1]:].cpu()
        for r, i in enumerate(part):
            row = new[r].tolist()
            row = row[: min(row.index(e) for e in ends if e in row)] if any(e in row for e in ends) else row
            texts[i].append(tok.decode(row, skip_special_tokens=True))
    return texts


def respond_remote(client, examples: Sequence[dict], max_new_tokens: int, *, samples: int = 1,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int | None = 0, concurrency: int = 8,
                   top_logprobs: int = 0) -> list[list[str | dict]]:
    """The answers of a chat-completions endpoint (``remote.RemoteTeacher``) to every example's prompt: texts,
    or with ``top_logprobs`` dicts ``{"text", "ids", "top"}``: the answer's token ids (the server's, with the
    end-of-turn token that ended it) and per token the ``top_logprobs`` most likely [id, log-prob] pairs."""
    convs = []
    for e in examples:
        msgs = chat.messages_of(e)
        if msgs is None and top_logprobs:
            raise DistilleryError("top-k KD from a chat endpoint needs chat examples (messages): the server renders its "
                                  "template around a plain prompt, which the student's rows would not hold.")
        if msgs is None:
            convs.append([{"role": "user", "content": e["prompt"]}])
        else:
            convs.append(msgs[: chat.last_answer(msgs)])
    got = client.chat(convs, max_new_tokens, temperature=temperature, top_p=top_p, n=samples, seed=seed,
                      concurrency=concurrency, top_logprobs=top_logprobs)
    if not top_logprobs:
        return [[c.text for c in outs] for outs in got]
    out: list[list[str | dict]] = []
    for outs in got:
        row: list[str | dict] = []
        for c in outs:
            if c.ids is None or any(not isinstance(k, int) for d in c.top for k in d):
                raise DistilleryError("the server returned tokens as text, not ids; top-k KD needs the teacher's token "
                                      "ids: serve it with vLLM or distillery serve (return_tokens_as_token_ids).")
            row.append({"text": c.text, "ids": list(c.ids), "top": [sorted(d.items(), key=lambda kv: -kv[1]) for d in c.top]})
        out.append(row)
    return out


def with_answer(example: dict, answer: str) -> dict:
    """The example with its last assistant turn (or completion) replaced by ``answer``."""
    msgs = chat.messages_of(example)
    if msgs is None:
        return {**example, "completion": answer}
    rest = {k: v for k, v in example.items() if k not in ("messages", "prompt", "completion")}
    return {**rest, "messages": [*msgs[: chat.last_answer(msgs)], {"role": "assistant", "content": answer}]}


def keep(examples: Sequence[dict], answers: Sequence[Sequence[str]], check: Callable[[dict, str], bool], tok,
         max_tokens: int) -> tuple[list[dict], dict[str, int]]:
    """(kept examples, counts): every answer that passes ``check`` and whose example fits ``max_tokens``."""
    kept: list[dict] = []
    counts = {"answers": 0, "kept": 0, "wrong": 0, "too_long": 0, "empty": 0}
    for e, outs in zip(examples, answers):
        for a in outs:
            counts["answers"] += 1
            text = a if isinstance(a, str) else a["text"]
            if not text.strip():
                counts["empty"] += 1
                continue
            if not check(e, text):
                counts["wrong"] += 1
                continue
            new = with_answer(e, text)
            if isinstance(a, dict):  # the teacher's own tokens and top-k, trained as they are
                new["teacher_ids"], new["teacher_top"] = a["ids"], a["top"]
                length = len(_prompts(tok, [e])[0]) + len(a["ids"])
            else:
                length = len(chat.encode(tok, new)[0])
            if length > max_tokens:
                counts["too_long"] += 1
                continue
            kept.append(new)
            counts["kept"] += 1
    return kept, counts


def answer_data(tok, kept: Sequence[dict], block: int, *, pack: bool = False, name: str = "traces",
                first_id: int = 0) -> TokenData:
    """Rows of the kept answers. Answers that carry the teacher's tokens (``teacher_ids``) are trained on
    those tokens after the locally rendered prompt, and their top-k log-probabilities ride along as
    ``top_values`` / ``top_indices`` / ``top_tail`` (N, T, k) for ``AnswerTopK``; the others are encoded
    by ``chat.token_data``."""
    if not kept or "teacher_ids" not in kept[0]:
        return chat.token_data(tok, kept, block, pack=pack, name=name, first_id=first_id)
    prompts = _prompts(tok, kept)
    seqs = [(p + e["teacher_ids"], [False] * len(p) + [True] * len(e["teacher_ids"])) for p, e in zip(prompts, kept)]
    placed = chat.layout([len(s) - 1 for s, _ in seqs], block, pack)
    x, y, pos = chat.rows(seqs, block, pad_id(tok), pack=pack, placed=placed)
    where = placed[1]
    k = max((len(d) for e in kept for d in e["teacher_top"]), default=1)
    values = torch.full((*x.shape, k), -1e4)  # "never": exp(-1e4) is 0 in every precision
    indices = torch.zeros(*x.shape, k, dtype=torch.long)
    for e, p, (r, at) in zip(kept, prompts, where):
        for j, top in enumerate(e["teacher_top"]):
            if not top:
                continue
            t = at + len(p) + j - 1  # the position whose target is answer token j
            values[r, t, : len(top)] = torch.tensor([float(lp) for _, lp in top])
            indices[r, t, : len(top)] = torch.tensor([int(i) for i, _ in top])
    bad = int(indices.max()) if indices.numel() else 0
    if bad >= len(tok):
        raise DistilleryError(f"the teacher's top-k holds token id {bad}, outside this tokenizer's {len(tok)} tokens; "
                              "give the served model's tokenizer (tokenizer: its folder).")
    mass = values.exp().sum(-1).clamp(max=1 - 1e-6)
    tail = torch.log1p(-mass)
    data = TokenData(x, y, torch.arange(first_id, first_id + len(x)), len(tok), name, pos,
                     {"top_values": values, "top_indices": indices, "top_tail": tail})
    return data


class AnswerTopK:
    """The teacher protocol answered from the remote teacher's top-k log-probabilities that ``answer_data``
    put into the batch (a sparse teacher: ``kd`` reads it; the tail bucket holds the rest of the mass)."""

    answers_inputs = False  # it reads answers from training batches; it cannot score other inputs

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)

    def fingerprint(self) -> str:
        return f"answer-top-k:{self.vocab_size}"

    def __call__(self, batch: dict[str, Tensor], taps=()) -> dict[str, Any]:
        from ..losses.sparse import TopK

        if "top_values" not in batch:
            raise DistilleryError("the remote teacher's log-probabilities are not in the batch; build the data with "
                                  "traces.answer_data from answers asked with top_logprobs.")
        if [t for t in taps if t != "logits"]:
            raise DistilleryError("a remote teacher gives log-probabilities only; feature terms need a local teacher.")
        return {"logits": TopK(batch["top_values"], batch["top_indices"], batch["top_tail"], self.vocab_size)}


def accuracy(model: CausalLM, tok, examples: Sequence[dict], *, check: Callable[[dict, str], bool] = reasoning.verify,
             max_new_tokens: int = 96, batch_size: int = 64) -> float:
    """The share (%) of ``model``'s greedy answers that ``check`` accepts."""
    answers = respond(model, tok, examples, max_new_tokens, batch_size=batch_size)
    return 100.0 * sum(check(e, a[0]) for e, a in zip(examples, answers)) / max(1, len(examples))


def describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def examples_fingerprint(examples: Sequence[dict[str, Any]]) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(list(examples), sort_keys=True).encode()).hexdigest()[:16]
