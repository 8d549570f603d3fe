"""Text for language-model distillation, its tokenizer, and token blocks as a data set.

- ``stdlib_files()``: the Python standard library's own ``.py`` files (on every machine with
  Python), under ``sysconfig``'s stdlib path, without ``site-packages`` and the test suites
  (``test``, ``tests``, ``idle_test`` folders), sorted by relative path. ``split_files`` splits
  them *by file* into train / validation / test with ``random.Random(seed)`` (default 90 / 5 / 5 %),
  so no file's text is in two splits.
- ``read_texts(path)``: a ``.txt`` file (one document), a ``.jsonl`` file (one ``{"text": ...}``
  per line), or a folder saved by HF ``datasets`` (``save_to_disk``; a ``text`` column).
- ``train_tokenizer(texts, vocab_size)``: a byte-level BPE trained locally with ``tokenizers``
  (GPT-2's byte-level pre-tokenizer; ``<|endoftext|>`` is id 0 and separates documents).
- ``TokenData``: fixed-length blocks of token ids as a ``TensorData`` the engine trains on:
  ``x`` (N, T) inputs, ``y`` (N, T) next-token targets (-100 where not trained: the prompt, or
  padding), ``batch()`` adds ``mask = y != -100``. ``blocks(texts, tok, T)`` cuts the
  concatenated documents (each followed by ``<|endoftext|>``) into blocks of T + 1 tokens.
- ``builtin(block, vocab_size)``: the three splits of the stdlib corpus with its tokenizer,
  cached under ``cache_root()`` (tokenizing takes a while once).
"""

from __future__ import annotations

import hashlib
import random
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..data.core import TensorData
from ..errors import DistilleryError
from ..io import atomic_write_text, cache_root, cached_arrays

EOS = "<|endoftext|>"
SKIP_DIRS = ("site-packages", "test", "tests", "idle_test")


def stdlib_files() -> list[Path]:
    """Every ``.py`` file of this interpreter's standard library but the test suites, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py") if not any(p in SKIP_DIRS for p in f.relative_to(root).parts)]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def split_files(files: Sequence[Path], seed: int = 0, val: float = 0.05, test: float = 0.05) -> dict[str, list[Path]]:
    """Train / validation / test by file, shuffled with ``random.Random(seed)``."""
    files = list(files)
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    n_val, n_test = max(1, round(val * len(files))), max(1, round(test * len(files)))
    pick = lambda idx: [files[i] for i in sorted(idx)]  # noqa: E731
    return {"validation": pick(order[:n_val]), "test": pick(order[n_val:n_val + n_test]),
            "train": pick(order[n_val + n_test:])}


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """Documents from a text file, a JSONL file (``field`` of each object) or an HF ``datasets`` folder."""
    path = Path(path)
    if path.is_dir():
        if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
            raise DistilleryError(f"{path} is a folder but not one saved by HF datasets (no dataset_info.json); "
                                  "pass a .txt or .jsonl file, or a folder from Dataset.save_to_disk.")
        try:
            import datasets
        except ImportError:
            raise DistilleryError("reading an HF datasets folder needs the datasets package: pip install datasets.") from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        if field not in ds.column_names:
            raise DistilleryError(f"{path} has columns {ds.column_names}, not {field!r}; name the text column.")
        return [str(t) for t in ds[field]]
    if not path.is_file():
        raise DistilleryError(f"text file {str(path)!r} does not exist.")
    if path.suffix == ".jsonl":
        from ..io import jsonl_texts

        return jsonl_texts(_read(path).splitlines(), str(path), field)
    return [_read(path)]


def train_raw_tokenizer(texts: Sequence[str], vocab_size: int = 8192, special: Sequence[str] = (EOS,),
                        digits: bool = False):
    """A raw byte-level BPE (``tokenizers.Tokenizer``) of at most ``vocab_size`` tokens trained on ``texts``;
    ``special`` tokens take the first ids (``<|endoftext|>`` is id 0); ``digits`` splits numbers into
    single digits first (as Llama and Qwen do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
        if digits else byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=list(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_tokenizer(texts: Sequence[str], vocab_size: int = 8192):
    """A byte-level BPE of ``vocab_size`` tokens trained on ``texts`` (``<|endoftext|>`` is id 0, the
    end-of-sequence and padding token), as a transformers fast tokenizer."""
    from .models import as_tokenizer

    return as_tokenizer(train_raw_tokenizer(texts, vocab_size))


def encode_documents(texts: Sequence[str], tok) -> np.ndarray:
    """All documents as one int32 stream, each followed by the tokenizer's end-of-sequence token."""
    from .models import eos_id

    eos = eos_id(tok)
    parts = []
    for enc in tok.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False):
        parts.append(np.asarray(enc.ids, dtype=np.int32))
        parts.append(np.asarray([eos], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def blocks(stream: np.ndarray, block: int) -> np.ndarray:
    """(N, block + 1) int32 windows cut end to end from a token stream (the rest is dropped)."""
    n = (len(stream) - 1) // block
    if n < 1:
        raise DistilleryError(f"the text has {len(stream)} tokens, fewer than one block of {block + 1}; "
                              "give more text or a smaller block.")
    idx = np.arange(n)[:, None] * block + np.arange(block + 1)[None, :]
    return stream[idx]


@dataclass
class TokenData(TensorData):
    """Token blocks: ``x`` (N, T) inputs, ``y`` (N, T) next-token targets (-100: not trained), and
    optionally ``pos`` (N, T): each token's position in its own sequence, restarting at 0 where a new
    sequence begins in the row (packed conversations, left padding); batches then carry ``pos`` and
    the model gets it (no token attends across a restart)."""

    pos: Tensor | None = None
    extra: dict[str, Tensor] | None = None
    """Further per-row tensors (N, ...) that batches carry by name (a cross-tokenizer teacher's rows)."""
    tokens = True  # the engine normalises logit terms by valid tokens

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pos is not None and self.pos.shape != self.x.shape:
            raise ValueError(f"{self.name}: pos {tuple(self.pos.shape)} must have the shape of x {tuple(self.x.shape)}")
        if any(len(v) != len(self.x) for v in (self.extra or {}).values()):
            raise ValueError(f"{self.name}: every extra tensor needs one row per sample")

    @property
    def inputs(self) -> list[str] | None:
        """The batch keys the model reads: ``["x", "pos"]`` when rows hold positions, else None (``x`` alone)."""
        return None if self.pos is None else ["x", "pos"]

    def batch(self, index: Tensor) -> dict[str, Tensor]:
        out = super().batch(index)
        out["mask"] = out["y"] != -100
        if self.pos is not None:
            out["pos"] = self.pos[index]
        for k, v in (self.extra or {}).items():
            out[k] = v[index]
        return out

    @classmethod
    def from_blocks(cls, rows: np.ndarray | Tensor, vocab_size: int, name: str = "", prompt: int = 0,
                    first_id: int = 0) -> TokenData:
        """(N, T + 1) windows -> inputs ``rows[:, :-1]``, targets ``rows[:, 1:]`` with the first ``prompt``
        targets masked (a prompt is context, not training signal). Ids ``first_id + 0..N-1``."""
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].clone()
        if prompt:
            y[:, : prompt - 1] = -100  # target i is token i + 1: the prompt's own tokens are not predicted
        return cls(x, y, torch.arange(first_id, first_id + len(rows)), int(vocab_size), name)

    def subset(self, index: Tensor, name: str | None = None) -> TokenData:
        return TokenData(self.x[index], self.y[index], self.ids[index], self.num_classes, name or self.name,
                         None if self.pos is None else self.pos[index],
                         None if self.extra is None else {k: v[index] for k, v in self.extra.items()})


def _fingerprint(files: Sequence[Path]) -> str:
    h = hashlib.sha256(sys.version.encode())
    for f in files:
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


def builtin(block: int = 128, vocab_size: int = 8192, seed: int = 0, cache: bool = True, tokenizer=None):
    """(splits {"train", "validation", "test"}: TokenData, tokenizer) of the stdlib corpus.

    The tokenizer (unless ``tokenizer`` is given: the text is then encoded with it) is trained on the
    train split only; both it and the token streams are cached under ``cache_root()/lm`` by Python
    version, file list, vocabulary size (or the given tokenizer's content) and seed."""
    files = stdlib_files()
    if not files:
        raise DistilleryError(f"no standard-library sources under {sysconfig.get_paths()['stdlib']}; "
                              "this Python ships without them: pass your own text with --data.")
    split = split_files(files, seed)
    key = f"{_fingerprint(files)}-v{vocab_size}-s{seed}"
    folder = cache_root() / "lm"
    tok_file = folder / f"stdlib-{key}.tokenizer.json"
    from tokenizers import Tokenizer

    from .models import as_tokenizer

    if tokenizer is not None:
        tok = tokenizer
        key = f"{_fingerprint(files)}-t{hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16]}-s{seed}"
    elif cache and tok_file.is_file():
        tok = as_tokenizer(Tokenizer.from_file(str(tok_file)))
    else:
        raw = train_raw_tokenizer([_read(f) for f in split["train"]], vocab_size)
        if cache:
            atomic_write_text(tok_file, raw.to_str())
        tok = as_tokenizer(raw)

    def build() -> dict[str, np.ndarray]:
        return {name: encode_documents([_read(f) for f in fs], tok) for name, fs in split.items()}

    streams = cached_arrays(folder / f"stdlib-{key}.tokens.npz", build) if cache else build()
    out, first = {}, 0
    for name in ("train", "validation", "test"):
        rows = blocks(streams[name], block)
        out[name] = TokenData.from_blocks(rows, len(tok), f"stdlib/{name}", first_id=first)
        first += len(rows)
    return out, tok
