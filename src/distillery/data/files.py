"""Data on disk that a recipe names directly.

``{name: jsonl, train: FILE, test: FILE, text: text, label: label, tokenizer: FOLDER}``: one JSON
object per line; ``text`` names the field holding the input text, ``label`` the class (integers
0..C-1, or strings, numbered in sorted order of the training labels). The text is tokenised with the
``tokenizer.json`` of ``tokenizer`` (a model folder), truncated to ``max_length``; items are
``input_ids``, ``attention_mask``, ``labels`` and batches are padded with the tokenizer's pad id. A
missing field, a label the training set does not have (or outside ``num_classes``), or an empty file
is a one-line error naming the line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import DistilleryError
from . import DATASETS
from .loader import ItemData


def _rows(path: str, what: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise DistilleryError(f"data jsonl: {what} file {path!r} does not exist.")
    rows = []
    with open(p, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DistilleryError(f"data jsonl: {path}:{number} is not JSON ({e.msg}).") from None
            if not isinstance(row, dict):
                raise DistilleryError(f"data jsonl: {path}:{number} is not a JSON object.")
            rows.append(row)
    if not rows:
        raise DistilleryError(f"data jsonl: {what} file {path!r} holds no rows.")
    return rows


class _Items(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


@DATASETS.register("jsonl")
def jsonl(train: str = "", test: str = "", text: str = "text", label: str = "label", tokenizer: str = "",
          max_length: int = 128, num_classes: int | None = None) -> dict:
    from ..lm.models import load_tokenizer

    if not train or not test:
        raise DistilleryError("data jsonl needs train: FILE and test: FILE.")
    if max_length < 2:
        raise DistilleryError(f"data jsonl: max_length must be >= 2, got {max_length}.")
    tok = load_tokenizer(tokenizer)
    tok.enable_truncation(max_length)
    pad = next((tok.token_to_id(t) for t in ("[PAD]", "<pad>", "<|pad|>") if tok.token_to_id(t) is not None), 0)
    raw = {"train": _rows(train, "train"), "test": _rows(test, "test")}
    for split, rows in raw.items():
        for number, row in enumerate(rows, 1):
            for key in (text, label):
                if key not in row:
                    raise DistilleryError(f"data jsonl: row {number} of {split} has no field {key!r} (it has "
                                          f"{sorted(row)[:6]}); name the fields with text: and label:.")
    labels = [r[label] for r in raw["train"]]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        classes = num_classes or max(labels) + 1
        index = {i: i for i in range(classes)}
    else:
        names = sorted({str(v) for v in labels})
        index = {n: i for i, n in enumerate(names)}
        classes = len(names)
    out = {}
    for split, rows in raw.items():
        items = []
        for number, row in enumerate(rows, 1):
            key = row[label] if isinstance(row[label], int) and not isinstance(row[label], bool) else str(row[label])
            if key not in index or (num_classes is not None and index[key] >= num_classes):
                raise DistilleryError(f"data jsonl: row {number} of {split} has label {row[label]!r}, which is not one "
                                      f"of the {classes} classes of the training set.")
            enc = tok.encode(str(row[text]))
            ids = torch.tensor(enc.ids, dtype=torch.long)
            items.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": index[key]})
        data = ItemData(_Items(items), name=f"jsonl/{split}", pad_values={"input_ids": pad}, num_classes=classes)
        out[split] = data
    return out
