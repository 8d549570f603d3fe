"""Distillation across tokenizers: a teacher with another vocabulary teaches a student through the
text they share (ULD, Boizard et al. 2024; GOLD's span alignment, TRL 2025).

Both tokenizers encode every chat example (``chat.encode_with_places``: each trained token's place in
its answer: characters of the turn's content, or the template's end-of-turn text after it). Then:

- **Token pairs** (``uld``): each trained student token is paired with the teacher token that covers
  its first character in the same answer (else the next teacher token, else the answer's last one);
  the k-th end-of-turn token of the student with the teacher's k-th (or its last); where the teacher's
  row was cut before the student token's text, the token has no partner and is not trained. The teacher's
  distribution over that token is the one ULD compares with the student's. The paper pairs answer
  tokens by index (the i-th of each); pairing by text keeps pairs on the same words when the two
  tokenizations drift apart, and gives every student token a partner.
- **Spans** (``gold``): ``losses.cross_tokenizer.align_spans`` over the answer's character offsets cuts
  each answer into the smallest runs of tokens whose text is the same on both sides (the end-of-turn
  tokens of both are one more span); at a span's last student token the batch holds the span's length,
  and the teacher's merged span distribution (chain rule, GOLD's "bayesian" merge) is built here.

``paired_data`` builds the student's rows (one example per row, ``TokenData`` with ``pos``) with the
teacher's rows beside them (``extra``: ``t_x``, ``t_pos``, ``t_y``, ``pair``, ``span_len``, ``t_first``,
``t_last``); ``CrossTokenizerTeacher`` runs the teacher on its rows and answers ``logits`` (B, T, Vt)
at the student's positions (for ``uld`` terms) and ``spans`` (for ``gold`` terms: ``teacher: spans``).
A student token whose partner was cut off the teacher's row is not trained (counted in ``settings``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DistilleryError
from ..losses.cross_tokenizer import LOG_EPS, align_spans
from . import chat
from .corpus import TokenData
from .models import CausalLM, pad_id

CROSS_LOSSES = ("uld", "gold")


def _by_turn(places: Sequence[chat.Place | None]) -> dict[int, tuple[list[int], list[int]]]:
    """turn -> (token indices of its content, of its end-of-turn text), in order."""
    out: dict[int, tuple[list[int], list[int]]] = {}
    for j, p in enumerate(places):
        if p is not None:
            out.setdefault(p[0], ([], []))[p[1]].append(j)
    return out


def pair(s_places: Sequence[chat.Place | None], t_places: Sequence[chat.Place | None]
         ) -> tuple[list[int | None], list[tuple[int, int, int, int]]]:
    """(the teacher token paired with each student token (None: untrained or no partner), the aligned spans
    as (student lo, hi, teacher lo, hi) token-index ranges); see the module docstring."""
    partner: list[int | None] = [None] * len(s_places)
    groups: list[tuple[int, int, int, int]] = []
    s_turns, t_turns = _by_turn(s_places), _by_turn(t_places)
    for turn, (s_text, s_end) in s_turns.items():
        t_text, t_end = t_turns.get(turn, ([], []))
        t_all = t_text + t_end
        if not t_all:
            continue
        whole = bool(t_end)  # the teacher's answer ends inside its row (not cut by its context)
        for j in s_text:
            a = s_places[j][2]
            covering = [i for i in t_text if t_places[i][2] <= a < t_places[i][3]]
            later = [i for i in t_text if t_places[i][2] >= a]
            partner[j] = covering[0] if covering else later[0] if later else t_all[-1] if whole else None
        for k, j in enumerate(s_end):
            partner[j] = t_end[min(k, len(t_end) - 1)] if whole else None
        if s_text and t_text:
            s_off = [(s_places[j][2], s_places[j][3]) for j in s_text]
            t_off = [(t_places[i][2], t_places[i][3]) for i in t_text]
            s_run = s_text[0] + len(s_text) == s_text[-1] + 1 and t_text[0] + len(t_text) == t_text[-1] + 1
            if s_run and s_off[-1][1] == t_off[-1][1]:  # the whole answer on both sides, in one piece
                for s_lo, s_hi, t_lo, t_hi in align_spans(s_off, t_off):
                    if s_hi > s_lo and t_hi > t_lo:
                        groups.append((s_text[s_lo], s_text[s_hi - 1] + 1, t_text[t_lo], t_text[t_hi - 1] + 1))
        if s_end and t_end:
            groups.append((s_end[0], s_end[-1] + 1, t_end[0], t_end[-1] + 1))
    return partner, groups


def paired_data(stok, ttok, examples: Sequence[dict[str, Any]], block: int, teacher_block: int, *,
                name: str = "cross", first_id: int = 0, where: str = "example") -> TokenData:
    """The student's rows of ``examples`` (one per row) with the teacher's beside them (module docstring)."""
    s_seqs, t_seqs, pairs, spans = [], [], [], []
    dropped = 0
    for n, e in enumerate(examples):
        s_ids, s_train, _, s_places = chat.encode_with_places(stok, e, block + 1, f"{where} {n + 1}")
        t_ids, _, _, t_places = chat.encode_with_places(ttok, e, teacher_block + 1, f"{where} {n + 1} (teacher)")
        msgs = chat.messages_of(e)
        if msgs is not None:
            for places, who in ((s_places, "student"), (t_places, "teacher")):
                if any(p is not None and p[1] == 1 for p in places) and not any(p is not None and p[1] == 0 for p in places):
                    raise DistilleryError(f"{where} {n + 1}: the {who}'s chat template changes the assistant's text, so "
                                          "its tokens cannot be lined up with the other tokenizer's; use a template "
                                          "that writes each message's content as it is.")
        partner, groups = pair(s_places, t_places)
        for j, trained in enumerate(s_train):
            if trained and j > 0 and (partner[j] is None or partner[j] < 1):
                dropped += 1
        s_seqs.append(s_ids)
        t_seqs.append(t_ids)
        pairs.append(partner)
        spans.append(groups)
    x, _, pos = chat.rows([(q, [False] * len(q)) for q in s_seqs], max(map(len, s_seqs)) - 1, pad_id(stok))
    tx, _, tpos = chat.rows([(q, [False] * len(q)) for q in t_seqs], max(map(len, t_seqs)) - 1, pad_id(ttok))
    shape, tshape = x.shape, tx.shape
    y = torch.full(shape, -100, dtype=torch.long)
    t_y = torch.full(tshape, -100, dtype=torch.long)
    pair_at = torch.full(shape, -1, dtype=torch.long)
    span_len = torch.zeros(shape, dtype=torch.long)
    t_first = torch.zeros(shape, dtype=torch.long)
    t_last = torch.zeros(shape, dtype=torch.long)
    for r, (s, t, partner, groups) in enumerate(zip(s_seqs, t_seqs, pairs, spans)):
        t_y[r, : len(t) - 1] = torch.tensor(t[1:])
        for j in range(1, len(s)):
            i = partner[j]
            if i is not None and i >= 1:
                y[r, j - 1] = s[j]
                pair_at[r, j - 1] = i - 1  # the teacher position whose logits predict token i
        for s_lo, s_hi, t_lo, t_hi in groups:
            if s_lo >= 1 and t_lo >= 1:
                span_len[r, s_hi - 2] = s_hi - s_lo
                t_first[r, s_hi - 2], t_last[r, s_hi - 2] = t_lo - 1, t_hi - 2
    span_len[y == -100] = 0
    extra = {"t_x": tx, "t_pos": tpos, "t_y": t_y, "pair": pair_at, "span_len": span_len, "t_first": t_first,
             "t_last": t_last}
    data = TokenData(x, y, torch.arange(first_id, first_id + len(x)), len(stok), name, pos, extra)
    data.settings = {"examples": len(examples), "unpaired_tokens": dropped, "spans": int((span_len > 0).sum())}
    return data


class CrossTokenizerTeacher:
    """A ``CausalLM`` teacher with its own tokenizer, answering batches of ``paired_data``: ``logits``
    (B, T, Vt), its raw logits over the token paired with each student position, and ``spans`` (B, T, Vt),
    the log of its merged distribution of the span that ends at each student position (0 elsewhere)."""

    answers_inputs = False  # it reads its own rows from the training batches
    device = None  # runs beside the student (the engine moves it)

    def __init__(self, model: CausalLM):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def to(self, device) -> CrossTokenizerTeacher:
        self.model.to(device)
        return self

    def fingerprint(self) -> str:
        from ..store import model_fingerprint

        return "cross:" + model_fingerprint(self.model.hf)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor], taps=()) -> dict[str, Tensor]:
        if "t_x" not in batch:
            raise DistilleryError("a cross-tokenizer teacher reads the teacher's rows of the batch (t_x, pair, ...); "
                                  "train on lm.cross.paired_data.")
        if [t for t in taps if t not in ("logits", "spans")]:
            raise DistilleryError("a cross-tokenizer teacher answers logits and spans only; feature terms need one "
                                  "tokenizer.")
        logits = self.model(batch["t_x"], pos=batch["t_pos"]).float()  # (B, Tt, Vt)
        v = logits.shape[-1]
        at = batch["pair"].clamp(min=0).unsqueeze(-1).expand(-1, -1, v)
        paired = logits.gather(1, at)
        lp = F.log_softmax(logits, dim=-1)
        t_y = batch["t_y"]
        act = lp.gather(-1, t_y.clamp(min=0).unsqueeze(-1)).squeeze(-1).clamp_min(LOG_EPS)
        act = torch.where(t_y == -100, 0.0, act)
        csum = torch.cat([act.new_zeros(len(act), 1), act.cumsum(1)], 1)  # csum[:, u] = sum of act[:, :u]
        first, last = batch["t_first"], batch["t_last"]
        prefix = csum.gather(1, last) - csum.gather(1, first)  # the span's earlier tokens: first .. last - 1
        spans = lp.gather(1, last.unsqueeze(-1).expand(-1, -1, v)) + prefix.unsqueeze(-1)
        spans = torch.where((batch["span_len"] > 0).unsqueeze(-1), spans, 0.0)
        return {"logits": paired, "spans": spans}
