"""Language-model distillation over the engine: every mode is a data set and a list of terms.

- ``train(model, data, cfg)``: next-token cross-entropy alone (the teacher, the undistilled student).
- ``distil(student, teacher, data, cfg, terms=[...])``: white-box token-level KD on the data
  (teacher-forced): logit terms (``kd`` = forward KL at temperature tau with tau^2, ``reverse_kl``,
  ``generalized_jsd``, ``skew_kl``, ``skew_reverse_kl``, ``tvd``) over every valid token, a ``ce``
  term on the data, and feature terms (hidden states through taps such as ``hf.model.layers.1``). The teacher is a ``CausalLM`` (frozen here), a store of
  its top-k log-probs (``CachedTeacher``; ``kd`` reads it sparsely), or any ``Teacher``.
- ``teacher_texts(teacher, prompts, ...)``: **sequence-level KD** (Kim & Rush, EMNLP 2016): the
  teacher continues each prompt (several samples per prompt with ``samples``); the student is
  then trained on that text (``train`` for word-level CE on teacher outputs, or ``distil`` to add
  token KD on them). The sampling settings are recorded in ``TokenData.settings``.
- ``OnPolicy``: **on-policy KD** (GKD, Agarwal et al., ICLR 2024): with probability ``lam`` a
  batch's continuation is sampled from the *current* student (prompt kept), otherwise it is the
  data's; the teacher then scores whatever the batch holds and the loss (GKD: generalized JSD)
  runs on the continuation tokens. The choice and the sampling are seeded by the batch's ids and
  the epoch, so a resumed run sees the same batches.
- ``perplexity(model, data)``: exp of the mean next-token cross-entropy over valid tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import engine
from ..config import TermConfig, TrainConfig
from ..errors import DistilleryError
from ..objective import Objective, Term
from ..teachers import ModuleTeacher, Teacher
from .corpus import TokenData
from .generate import left_pad, sample
from .models import CausalLM


def token_losses() -> list[str]:
    """The losses token-level KD can use: from the registry, the logit losses that are a sum over rows
    (chunkable over tokens) and read no class targets (also the user's, registered so by a plugin)."""
    from .. import losses

    return [n for n in losses.names() if (c := losses.capabilities(n)).reads_logits and c.row_wise
            and not c.needs_targets and not c.batch_keys and c.state is None]


def _as_teacher(teacher: CausalLM | Teacher, inputs: Sequence[str] | None = None) -> Teacher:
    return ModuleTeacher(teacher, inputs=inputs) if isinstance(teacher, torch.nn.Module) else teacher


def _with_inputs(cfg: TrainConfig, data: TokenData) -> TrainConfig:
    """``cfg`` whose model inputs are what the data's rows hold (``x``, and ``pos`` for packed rows)."""
    inputs = getattr(data, "inputs", None)
    return cfg if inputs is None or cfg.inputs else dataclasses.replace(cfg, inputs=inputs)


def train(model: CausalLM, data: TokenData, cfg: TrainConfig, *, run_dir: str | Path | None = None, seed: int = 0,
          chunk_size: int | None = None, progress: bool | None = None, eval_data: TokenData | None = None,
          phase: str = "lm", resume: bool = True) -> dict[str, Any]:
    """Next-token cross-entropy on ``data`` (its valid targets), through the engine; ``eval_data`` (a
    validation split) is scored every epoch: perplexity, token accuracy."""
    objective = Objective([Term("ce", teacher=None, targets="labels")], chunk_size=chunk_size)
    cfg = _with_inputs(cfg, data)
    return engine.fit(model, objective, data, cfg, run_dir=run_dir, phase=phase, seed=seed, progress=progress,
                      eval_data=eval_data, resume=resume)


def cross_losses() -> list[str]:
    """The losses that compare distributions over two vocabularies (``uld``, ``gold``): what a teacher with
    another tokenizer can teach through (``lm.cross``)."""
    from .. import losses

    return [n for n in losses.names() if (c := losses.capabilities(n)).reads_logits and c.different_widths]


def check_terms(terms: Sequence[Term]) -> None:
    """A term that compares logits with the teacher's must be a token loss (``token_losses``) or a
    cross-tokenizer loss (``cross_losses``)."""
    allowed = list(dict.fromkeys(token_losses() + cross_losses()))
    for t in terms:
        if t.is_feature or t.teacher is None:
            continue
        if not isinstance(t.loss, str) or t.loss not in allowed:
            raise DistilleryError(f"term {t.name!r}: {t.name if not isinstance(t.loss, str) else t.loss!r} is not a "
                                  f"token loss; use one of {', '.join(allowed)} (a sum over tokens reading no class "
                                  "targets), or a feature term on taps.")


def distil(student: CausalLM, teacher: CausalLM | Teacher | None, data: TokenData, cfg: TrainConfig, *,
           terms: Sequence[Term | TermConfig] | None = None, chunk_size: int | None = 512,
           run_dir: str | Path | None = None, seed: int = 0, progress: bool | None = None, task: Any = None,
           eval_data: TokenData | None = None, phase: str = "lm", resume: bool = True) -> dict[str, Any]:
    """Token-level KD of ``student`` from ``teacher`` on ``data`` (see the module docstring) with
    ``terms`` (default: one ``kd`` term; add ``Term("ce", teacher=None, targets="labels")`` for the data's
    cross-entropy, feature terms on taps such as ``hf.model.layers.1``); ``eval_data`` (a validation
    split) is scored every epoch: perplexity, token accuracy and agreement with the teacher."""
    terms = [t if isinstance(t, Term) else Term.from_config(t) for t in (terms or [Term("kd")])]
    check_terms(terms)
    if teacher is None and any(t.teacher is not None for t in terms):
        raise DistilleryError("a term reads the teacher, and no teacher was given; pass one, or use terms that read "
                              "none (Term('ce', teacher=None, targets='labels')).")
    if isinstance(teacher, CausalLM) and teacher.vocab_size != student.vocab_size:
        raise DistilleryError(f"the teacher predicts {teacher.vocab_size} tokens, the student {student.vocab_size}; "
                              "token-level KD needs one shared tokenizer (lm.models.check_same_tokenizer): build "
                              "the student with the teacher's.")
    objective = Objective(terms, chunk_size=chunk_size)
    cfg = _with_inputs(cfg, data)
    return engine.fit(student, objective, data, cfg,
                      teacher=None if teacher is None else _as_teacher(teacher, cfg.inputs),
                      run_dir=run_dir, phase=phase,
                      seed=seed, progress=progress, task=task, eval_data=eval_data, resume=resume)


@torch.no_grad()
def perplexity(model: CausalLM, data: TokenData, batch_size: int = 32) -> float:
    """exp(mean cross-entropy of the valid next-token targets of ``data``)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for lo in range(0, len(data), batch_size):
            b = data.batch(torch.arange(lo, min(lo + batch_size, len(data))))
            device = next(model.parameters()).device
            b = {k: v.to(device) for k, v in b.items()}
            logits = model(b["x"], pos=b.get("pos"))
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b["y"].reshape(-1),
                                 ignore_index=-100, reduction="sum")
            total += float(ce)
            count += int(b["mask"].sum())
    finally:
        model.train(was)
    if count == 0:
        raise DistilleryError(f"{data.name or 'the data'} has no valid target token; perplexity is undefined.")
    return float(torch.tensor(total / count).exp())


def prompts_of(data: TokenData, prompt: int) -> Tensor:
    """The first ``prompt`` tokens of every block, (N, prompt)."""
    if not 1 <= prompt <= data.x.shape[1]:
        raise DistilleryError(f"prompt length {prompt} must lie in [1, {data.x.shape[1]}] (the block length).")
    return data.x[:, :prompt]


def _rows(gen_ids: Tensor, done: Tensor, prompt: int, vocab: int, name: str, first_id: int,
          settings: dict) -> TokenData:
    data = TokenData.from_blocks(gen_ids, vocab, name, prompt=prompt, first_id=first_id)
    if done.numel():  # tokens after a row's end-of-text are padding: not trained
        data.y[:, prompt - 1:][done] = -100
    data.settings = settings
    return data


@torch.no_grad()
def teacher_texts(teacher: CausalLM, prompts: Tensor, new_tokens: int, *, samples: int = 1, temperature: float = 1.0,
                  top_p: float = 1.0, top_k: int = 0, seed: int = 0, batch_size: int = 64,
                  eos_id: int | None = None, name: str = "teacher-texts") -> TokenData:
    """Sequence-level KD data: ``samples`` continuations of ``new_tokens`` tokens per prompt, sampled
    from ``teacher`` (temperature 0: its greedy output, one sample). Rows are prompt + continuation;
    only the continuation is trained. ``settings`` records the sampling. The same ``seed`` and
    ``batch_size`` give the same text (one generator drawn batch after batch)."""
    if len(prompts) == 0:
        raise DistilleryError("no prompts: sequence-level KD needs at least one prompt row.")
    if samples < 1 or new_tokens < 1:
        raise DistilleryError(f"samples ({samples}) and new_tokens ({new_tokens}) must be at least 1.")
    if temperature == 0 and samples > 1:
        raise DistilleryError("greedy decoding (temperature 0) gives one output per prompt; use samples: 1.")
    g = torch.Generator().manual_seed(seed)
    ids, done = [], []
    rep = prompts.repeat_interleave(samples, 0)
    for lo in range(0, len(rep), batch_size):
        out = sample(teacher, rep[lo:lo + batch_size], new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                     generator=g, eos_id=eos_id)
        ids.append(out.ids)
        done.append(out.done)
    settings = {"samples": samples, "seed": seed, **out.settings}
    return _rows(torch.cat(ids), torch.cat(done), prompts.shape[1], teacher.vocab_size, name, 0, settings)


def remote_texts(remote, prompts: Tensor, new_tokens: int, *, samples: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = 0, name: str = "remote-texts") -> TokenData:
    """Sequence-level KD data from a teacher behind an API (``remote.RemoteTeacher.complete``): the
    same rows as ``teacher_texts``, ``samples`` continuations per prompt. With the client's request
    log a rerun after a crash pays for no request twice."""
    got = remote.complete(prompts.tolist(), new_tokens, temperature=temperature, top_p=top_p, n=samples, seed=seed)
    rows, done = [], []
    for prompt, outs in zip(prompts.tolist(), got):
        for c in outs:
            if len(c.ids) != new_tokens:
                raise DistilleryError(f"the API returned {len(c.ids)} tokens where {new_tokens} were asked "
                                      f"(finish_reason {c.finish_reason!r}); ask a server that ignores end-of-text.")
            rows.append(prompt + c.ids)
            done.append([False] * new_tokens)
    settings = {**remote.settings, "samples": samples}
    vocab = remote._vocab()
    return _rows(torch.tensor(rows), torch.tensor(done), prompts.shape[1], vocab, name, 0, settings)


class OnPolicy:
    """GKD's mixture as a step of the engine (``fit(..., task=OnPolicy(...))``): each micro-batch is, with
    probability ``lam``, the prompts of the data continued by the current ``student`` (sampled at
    ``temperature``), else the data itself (see the module docstring). ``prompt`` tokens of each block
    are the prompt (their targets are never trained); ``prompt=None`` (chat rows) takes each row's prompt
    as everything before its first trained target, left-pads the prompts, and ends each answer at
    ``eos_id`` (the rows then carry positions). The draw and the sampling are seeded by (seed, epoch, the
    batch's ids), so a resumed run sees the same batches."""

    def __init__(self, student: CausalLM, *, lam: float = 0.5, prompt: int | None = 32, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, pad_id: int = 0):
        if not 0.0 <= lam <= 1.0:
            raise DistilleryError(f"on-policy lambda must lie in [0, 1], got {lam}.")
        if prompt is not None and prompt < 1:
            raise DistilleryError(f"on-policy prompt must be at least 1 token, got {prompt}.")
        self.student, self.lam, self.prompt = student, float(lam), None if prompt is None else int(prompt)
        self.temperature, self.top_p, self.seed = float(temperature), float(top_p), int(seed)
        self.eos_id, self.pad_id = eos_id, int(pad_id)
        self.generated = 0

    def check(self, data: TokenData) -> None:
        if self.prompt is None:
            valid = data.y != -100
            last = torch.where(valid.any(1), data.x.shape[1] - 1 - valid.flip(1).float().argmax(1), 0)
            starts = (data.pos == 0).long().cumsum(1).gather(1, last[:, None]) if data.pos is not None else None
            if starts is None or bool((starts != 1).any()):
                raise DistilleryError("on-policy distillation on chat data needs one conversation per row; set "
                                      "pack: false.")
            return
        if not 1 <= self.prompt < data.x.shape[1]:
            raise DistilleryError(f"on-policy prompt must lie in [1, {data.x.shape[1]}) (the block length), "
                                  f"got {self.prompt}.")

    def signature(self) -> dict:
        return {"lam": self.lam, "prompt": self.prompt, "temperature": self.temperature, "top_p": self.top_p,
                "eos_id": self.eos_id}

    def prepare(self, batch: dict[str, Tensor], *, epoch: int) -> dict[str, Tensor]:
        out = dict(batch)
        x = out["x"]
        if self.prompt is not None and not 1 <= self.prompt < x.shape[1]:
            raise DistilleryError(f"on-policy prompt must lie in [1, {x.shape[1]}) (the block length), "
                                  f"got {self.prompt}.")
        out["y"] = out["y"].clone()
        if self.prompt is not None:
            out["y"][:, : self.prompt - 1] = -100
        key = hashlib.sha256(f"{self.seed}:{epoch}:{out['id'].tolist()}".encode()).digest()
        g = torch.Generator(device=x.device).manual_seed(int.from_bytes(key[:8], "little"))
        if float(torch.rand((), generator=g, device=x.device)) < self.lam:
            was = self.student.training
            try:
                if self.prompt is None:
                    out.update(self._continue_rows(out, g))
                else:
                    new = x.shape[1] + 1 - self.prompt  # continue to the block's full length
                    gen = sample(self.student, x[:, : self.prompt], new, temperature=self.temperature,
                                 top_p=self.top_p, generator=g)
                    out["x"], out["y"] = gen.ids[:, :-1], gen.ids[:, 1:].clone()
                    out["y"][:, : self.prompt - 1] = -100
            finally:
                self.student.train(was)
            self.generated += 1
        out["mask"] = out["y"] != -100
        return out

    def _continue_rows(self, batch: dict[str, Tensor], g: torch.Generator) -> dict[str, Tensor]:
        """Chat rows: each row's prompt (before its first trained target), left-padded, continued by the
        student to the row length or its end of turn; (x, y, pos) of the new rows."""
        x, y = batch["x"], batch["y"]
        b, t = x.shape
        valid = y != -100
        lengths = torch.where(valid.any(1), valid.float().argmax(1), torch.full((b,), t - 1, device=x.device)) + 1
        prompt, mask = left_pad([x[r, : int(lengths[r])] for r in range(b)], self.pad_id, x.device)
        width = prompt.shape[1]
        gen = sample(self.student, prompt, t + 1 - width, temperature=self.temperature, top_p=self.top_p,
                     generator=g, eos_id=self.eos_id, prompt_mask=mask)
        ids = gen.ids
        new_y = ids[:, 1:].clone()
        new_y[:, : width - 1] = -100
        if gen.done.numel():
            new_y[:, width - 1:][gen.done] = -100  # after the end of turn: padding
        pad = (width - lengths).unsqueeze(1)
        ar = torch.arange(t, device=x.device).unsqueeze(0)
        pos = torch.where(ar < pad, ar, ar - pad)  # the left padding is a sequence of its own
        return {"x": ids[:, :-1], "y": new_y, "pos": pos}
