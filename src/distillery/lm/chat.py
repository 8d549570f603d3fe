"""Chat and instruction data: conversations in, token rows with assistant-only targets out.

An **example** is a dict in one of the forms TRL and the OpenAI API use:

- ``{"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...]}``:
  rendered with the tokenizer's chat template; every assistant turn is trained (multi-turn).
- ``{"prompt": str, "completion": str}``: plain text, no template (TRL's "standard" prompt-completion):
  the prompt's tokens, the completion's, then the tokenizer's end-of-sequence token; the completion
  and that end token are trained.
- ``{"prompt": [messages], "completion": [messages]}``: TRL's conversational prompt-completion, the
  same as ``messages = prompt + completion``.

Other keys (``answer`` for a verifier, ``id``, ...) ride along untouched.

Assistant masks (``encode``): the template renders the conversation once; for assistant turn i the
characters from the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of
``render(messages[:i + 1])`` are the turn (its content and the template's end-of-turn text). The
whole text is tokenised once with offsets; a token is trained when its first character lies in an
assistant turn, up to and including the turn's end token (``models.end_ids``: ChatML's ``<|im_end|>``;
the newline the template writes after it is context, as in TRL). A template that does not render conversations prefix by prefix (a later turn changing
the text of an earlier one) is refused, as its turns have no fixed span.

Rows (``rows``): each sequence of L tokens gives L - 1 (input, target) pairs. Unpacked, one sequence
per row, padded to the longest; packed (``pack=True``), sequences are placed first-fit in order into
rows of ``block`` pairs. ``pos`` restarts at 0 where a sequence starts, so no token attends across
conversations (``CausalLM`` passes it as ``position_ids``; transformers masks packed sequences from
them). Padding is never trained.

Files (``read_examples``): JSONL (one example per line) or a folder saved by HF ``datasets``
(``save_to_disk``; a ``DatasetDict``'s ``train`` split, or the split named).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import DistilleryError
from .corpus import TokenData
from .models import end_ids, eos_id, pad_id

ROLES = ("system", "user", "assistant", "tool")


def is_chat_file(path: str | Path) -> bool:
    """Does ``path`` hold examples (``messages`` or ``prompt`` / ``completion``) rather than plain text?"""
    path = Path(path)
    if path.is_dir():
        info = path / "dataset_info.json"
        if not info.is_file():
            info = next(path.glob("*/dataset_info.json"), None)
        if info is None:
            return False
        feats = json.loads(info.read_text()).get("features", {})
        return "messages" in feats or {"prompt", "completion"} <= set(feats)
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(obj, dict) and ("messages" in obj or "prompt" in obj)
    return False


def read_examples(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Every example of a JSONL file or an HF ``datasets`` folder, checked (``check_example``)."""
    path = Path(path)
    where = str(path)
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise DistilleryError("reading an HF datasets folder needs the datasets package: pip install datasets.") from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            name = split or ("train" if "train" in ds else next(iter(ds)))
            if name not in ds:
                raise DistilleryError(f"{path} has splits {list(ds)}, not {name!r}; name one of them.")
            ds = ds[name]
        rows = [dict(r) for r in ds]
    elif path.is_file():
        from ..io import jsonl_rows

        rows = [obj for _, obj in jsonl_rows(path.read_text(encoding="utf-8").splitlines(), where)]
    else:
        raise DistilleryError(f"data {where!r} does not exist; pass a .jsonl file or an HF datasets folder.")
    if not rows:
        raise DistilleryError(f"{where} holds no examples.")
    for n, r in enumerate(rows, 1):
        check_example(r, f"{where}:{n}")
    return rows


def messages_of(example: dict[str, Any]) -> list[dict[str, str]] | None:
    """The example as one conversation (None for plain-text prompt / completion)."""
    if "messages" in example:
        return list(example["messages"])
    if isinstance(example.get("prompt"), list):
        return list(example["prompt"]) + list(example.get("completion") or [])
    return None


def check_example(example: Any, where: str = "example") -> None:
    """A one-line error for an example no template or mask can use."""
    if not isinstance(example, dict):
        raise DistilleryError(f"{where}: an example must be an object with messages, or prompt and completion.")
    if "messages" not in example and "prompt" not in example:
        raise DistilleryError(f"{where}: has neither 'messages' nor 'prompt' / 'completion' (keys: "
                              f"{sorted(example)[:6]}); give OpenAI-style messages or prompt and completion.")
    msgs = messages_of(example)
    if msgs is None:
        for key in ("prompt", "completion"):
            if not isinstance(example.get(key), str):
                raise DistilleryError(f"{where}: {key!r} must be a string (or both lists of messages).")
        if not example["completion"]:
            raise DistilleryError(f"{where}: the completion is empty; there is nothing to train on.")
        return
    if not isinstance(msgs, list) or not msgs:
        raise DistilleryError(f"{where}: messages must be a non-empty list of {{role, content}} objects.")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DistilleryError(f"{where}: message {i} must be an object with a string 'content'.")
        if m.get("role") not in ROLES:
            raise DistilleryError(f"{where}: message {i} has role {m.get('role')!r}; roles are {', '.join(ROLES)}.")
    if not any(m["role"] == "assistant" and m["content"] for m in msgs):
        raise DistilleryError(f"{where}: the conversation has no assistant turn with content; there is nothing to "
                              "train on (add the assistant's answer, or drop the example).")


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def texts(examples: Sequence[dict[str, Any]]) -> list[str]:
    """Every message's content, prompt and completion (a tokenizer's training text)."""
    out = []
    for e in examples:
        msgs = messages_of(e)
        out += [m["content"] for m in msgs] if msgs is not None else [e["prompt"], e["completion"]]
    return out


def train_tokenizer(examples: Sequence[dict[str, Any]], vocab_size: int = 512, digits: bool = True):
    """A chat tokenizer trained on the examples: a byte-level BPE (digits split one by one with
    ``digits``, as Llama and Qwen do), the special tokens ``<|endoftext|>`` (padding), ``<|im_start|>``
    and ``<|im_end|>`` (the end of a turn and of the sequence), and the ChatML template."""
    from .corpus import train_raw_tokenizer
    from .models import require_transformers

    raw = train_raw_tokenizer([*texts(examples), "system", "user", "assistant"], vocab_size, SPECIAL, digits=digits)
    raw.no_padding()
    raw.no_truncation()
    return require_transformers().PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>",
                                                          pad_token="<|endoftext|>", chat_template=CHATML)


def _render(tok, messages: list[dict], generation: bool = False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def require_template(tok) -> None:
    if not getattr(tok, "chat_template", None):
        raise DistilleryError("the tokenizer has no chat template, which messages need; give a tokenizer folder whose "
                              "tokenizer_config.json (or chat_template.jinja) holds one, or use prompt / completion "
                              "strings (no template).")


def prompt_text(tok, example: dict[str, Any]) -> str:
    """The text a model continues to answer the example's last assistant turn: the conversation before it
    with the template's generation prompt, or the plain prompt."""
    msgs = messages_of(example)
    if msgs is None:
        return example["prompt"]
    require_template(tok)
    return _render(tok, msgs[: last_answer(msgs)], generation=True)


def last_answer(messages: list[dict]) -> int:
    """The index of the conversation's last assistant turn (the answer a teacher or student writes anew)."""
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def encode(tok, example: dict[str, Any], max_tokens: int | None = None, where: str = "example"
           ) -> tuple[list[int], list[bool], bool]:
    """(token ids, trained flags, whether it was cut) of one example (see the module docstring).
    ``max_tokens``: the sequence is cut there; a prompt (the tokens before the first trained one) that
    does not fit is an error."""
    ids, train, cut, _ = encode_with_places(tok, example, max_tokens, where)
    return ids, train, cut


Place = tuple[int, int, int, int]
"""Where a trained token sits in its answer: (turn, kind, a, b); kind 0: answer text, characters [a, b)
of the turn's content; kind 1: the template's end-of-turn text after it, a = its order there (b = a)."""


def encode_with_places(tok, example: dict[str, Any], max_tokens: int | None = None, where: str = "example"
                       ) -> tuple[list[int], list[bool], bool, list[Place | None]]:
    """``encode`` plus each token's ``Place`` in its answer (None for untrained tokens): what lines up the
    tokens of two tokenizers over the same answers (``lm.cross``)."""
    check_example(example, where)
    msgs = messages_of(example)
    places: list[Place | None]
    if msgs is None:
        p = tok(example["prompt"], add_special_tokens=False)["input_ids"]
        enc = tok(example["completion"], add_special_tokens=False, return_offsets_mapping=True)
        c = [*enc["input_ids"], eos_id(tok)]
        ids, train = list(p) + c, [False] * len(p) + [True] * len(c)
        places = [None] * len(p) + [(0, 0, a, b) for a, b in enc["offset_mapping"]] + [(0, 1, 0, 0)]
    else:
        require_template(tok)
        text = _render(tok, msgs)
        spans = []  # (turn start, content start or -1, content end, turn end)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before, upto = _render(tok, msgs[:i], generation=True), _render(tok, msgs[: i + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise DistilleryError(f"{where}: the chat template does not render this conversation prefix by prefix "
                                      f"(turn {i} changes earlier text), so its assistant tokens cannot be found; use a "
                                      "template that appends each turn.")
            at = upto.find(m["content"], len(before))
            spans.append((len(before), at, at + len(m["content"]), len(upto)))
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        train, places, after, ended = [], [], {}, set()
        ends = set(end_ids(tok))
        for token, (a, b) in zip(ids, enc["offset_mapping"]):
            turn = next((k for k, (lo, _, _, hi) in enumerate(spans) if lo <= a < hi), None)
            if turn in ended:  # after the turn's end token (ChatML's newline): context, not trained
                turn = None
            train.append(turn is not None)
            if turn is None:
                places.append(None)
                continue
            if token in ends:
                ended.add(turn)
            _, c0, c1, _ = spans[turn]
            if c0 >= 0 and a < c1:
                places.append((turn, 0, a - c0, min(b, c1) - c0))
            else:
                places.append((turn, 1, after.get(turn, 0), after.get(turn, 0)))
                after[turn] = after.get(turn, 0) + 1
    cut = max_tokens is not None and len(ids) > max_tokens
    if cut:
        first = train.index(True) if True in train else len(train)
        if first > max_tokens - 1:
            raise DistilleryError(f"{where}: the prompt has {first} tokens, the context {max_tokens}; no answer token "
                                  "fits: raise block (and the model's positions) or shorten the prompt.")
        ids, train, places = ids[:max_tokens], train[:max_tokens], places[:max_tokens]
    if not any(train[1:]):
        raise DistilleryError(f"{where}: no assistant token after the first; there is nothing to train on.")
    return ids, train, cut, places


def layout(pairs: Sequence[int], block: int, pack: bool = False) -> tuple[int, list[tuple[int, int]]]:
    """(row width, (row, offset) of each sequence) for sequences of ``pairs`` (input, target) pairs each:
    first-fit in order into rows of ``block`` when packed, else one per row as wide as the longest."""
    longest = max(pairs)
    if longest > block:
        raise DistilleryError(f"a sequence of {longest + 1} tokens does not fit a row of {block} pairs; encode with "
                              f"max_tokens={block + 1}.")
    width = block if pack else max(longest, 1)
    room: list[int] = []
    where = []
    for need in pairs:
        r = next((j for j, free in enumerate(room) if free >= need), None) if pack else None
        if r is None:
            room.append(width)
            r = len(room) - 1
        where.append((r, width - room[r]))
        room[r] -= need
    return width, where


def rows(seqs: Sequence[tuple[list[int], list[bool]]], block: int, pad: int, *, pack: bool = False,
         placed: tuple[int, list[tuple[int, int]]] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, pos), each (N, T) long, from encoded sequences (module docstring). Unpacked, T is the longest
    sequence's length - 1 (at most ``block``); packed, T = ``block``. ``placed``: their ``layout`` when the
    caller has it already (to place more per-token arrays the same way)."""
    if not seqs:
        raise DistilleryError("no sequences to put into rows.")
    width, where = placed or layout([len(ids) - 1 for ids, _ in seqs], block, pack)
    n_rows = max(r for r, _ in where) + 1
    x = torch.full((n_rows, width), int(pad), dtype=torch.long)
    y = torch.full_like(x, -100)
    pos = torch.arange(width).repeat(n_rows, 1)  # padding: a sequence of its own, never trained
    ends = [0] * n_rows
    for (ids, train), (r, at) in zip(seqs, where):
        n = len(ids) - 1
        t = torch.tensor(ids, dtype=torch.long)
        keep = torch.tensor(train[1:], dtype=torch.bool)
        x[r, at:at + n] = t[:-1]
        y[r, at:at + n] = torch.where(keep, t[1:], torch.full_like(t[1:], -100))
        pos[r, at:at + n] = torch.arange(n)
        ends[r] = max(ends[r], at + n)
    for r, end in enumerate(ends):
        pos[r, end:] = torch.arange(width - end)
    return x, y, pos


def token_data(tok, examples: Sequence[dict[str, Any]], block: int, *, pack: bool = False, name: str = "chat",
               first_id: int = 0, where: str = "example") -> TokenData:
    """Examples -> ``TokenData`` with ``pos`` (assistant-only targets; packed or one example per row)."""
    encoded = [encode(tok, e, block + 1, f"{where} {i + 1}") for i, e in enumerate(examples)]
    x, y, pos = rows([(ids, train) for ids, train, _ in encoded], block, pad_id(tok), pack=pack)
    data = TokenData(x, y, torch.arange(first_id, first_id + len(x)), len(tok), name, pos)
    data.settings = {"examples": len(examples), "pack": bool(pack), "block": int(block),
                     "truncated": sum(cut for *_, cut in encoded)}
    return data


@torch.no_grad()
def check_packing(model, data: TokenData) -> None:
    """Refuse packed rows for a model that lets tokens attend across their sequences: the second sequence of
    the first packed row must give the same logits inside the row as alone (one short forward of each)."""
    if data.pos is None:
        return
    for r in range(min(len(data), 8)):
        starts = (data.pos[r] == 0).nonzero().flatten().tolist()
        if len(starts) < 3 or not bool((data.y[r, starts[1]:starts[2]] != -100).any()):
            continue  # one sequence (and padding) only
        lo, hi = starts[1], starts[2]
        was = model.training
        model.eval()
        try:
            inside = model(data.x[r:r + 1, :hi], pos=data.pos[r:r + 1, :hi])[0, lo:hi]
            alone = model(data.x[r:r + 1, lo:hi])[0]
        finally:
            model.train(was)
        if not torch.allclose(inside.float(), alone.float(), atol=1e-3, rtol=1e-3):
            raise DistilleryError(f"{type(getattr(model, 'hf', model)).__name__} lets packed conversations attend to each "
                                  "other (it does not restart attention where positions restart); set pack: false.")
        return
