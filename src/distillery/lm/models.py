"""Causal language models for distillation: Llama-style transformers models built from a config
or loaded from a local folder (never downloaded), wrapped so the engine sees ``model(ids) -> logits``.

- ``CausalLM(hf_model, vocab_size)``: ``forward(ids (B, T)) -> logits (B, T, V)`` with V the
  tokenizer's real vocabulary: a model whose embedding matrix is padded beyond it (to a multiple
  of 64, as many checkpoints are) is sliced to the shared real vocabulary, so teacher and student
  distributions live on the same tokens. The transformers model is ``.hf`` (taps read
  ``hf.model.layers.3`` and so on).
- ``llama(preset or sizes, vocab_size, seed)``: a seeded random-init model; presets ``teacher``
  (about 10M parameters at a vocabulary of 8192) and ``student`` (about 1M) and ``tiny`` (tests).
- ``save_lm`` / ``load_lm``: a folder with transformers' ``config.json`` + ``model.safetensors``
  (``AutoModelForCausalLM`` loads it without distillery), ``tokenizer.json`` and
  ``distillery_lm.json`` (real vocabulary, checksums verified on load), written atomically.
- ``check_same_tokenizer``: teacher and student must share a tokenizer; different ones are
  refused with the first differing token named.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DistilleryError, unknown
from ..io import atomic_folder, atomic_write_json, check_files, read_json, sha256_file

CONFIG = "distillery_lm.json"
FORMAT = 1

PRESETS: dict[str, dict[str, int]] = {
    # hidden, layers, heads, kv heads, MLP width; parameters at a vocabulary of 8192 (untied head)
    "teacher": {"hidden_size": 256, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
                "intermediate_size": 688},  # 9.8M
    "student": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                "intermediate_size": 176},  # 1.2M
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 64},
}


def require_transformers():
    from ..compress.quantize import quiet_torchao

    quiet_torchao()  # transformers imports torchao when it is installed
    try:
        import transformers
    except ImportError:
        raise DistilleryError("language-model distillation needs transformers and tokenizers; "
                              "install the extra: pip install 'distillery[lm]'.") from None
    return transformers


class CausalLM(nn.Module):
    """A transformers causal LM seen as ``ids (B, T) -> logits (B, T, vocab_size)``.

    ``vocab_size`` is the tokenizer's real vocabulary; logits beyond it (a padded embedding
    matrix) are dropped. ``attention_mask`` (B, T) is passed through for left-padded batches."""

    def __init__(self, hf: nn.Module, vocab_size: int | None = None):
        super().__init__()
        self.hf = hf
        rows = hf.get_output_embeddings().weight.shape[0]
        self.vocab_size = int(vocab_size or rows)
        if self.vocab_size > rows:
            raise DistilleryError(f"the model's output layer has {rows} rows but the tokenizer has {self.vocab_size} tokens; "
                                  "the model was built for a smaller vocabulary: rebuild it with this tokenizer.")

    @property
    def config(self):
        return self.hf.config

    @property
    def max_length(self) -> int:
        return int(self.hf.config.max_position_embeddings)

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        out = self.hf(input_ids=ids, attention_mask=attention_mask, use_cache=False)
        logits = out.logits
        return logits[..., : self.vocab_size] if logits.shape[-1] != self.vocab_size else logits

    def step(self, ids: Tensor, cache: Any = None) -> tuple[Tensor, Any]:
        """Incremental decoding: (logits (B, n, V) of the ``n`` new tokens ``ids`` after the cached
        prefix, the updated key-value cache). ``cache=None`` starts from an empty prefix. The cache
        is transformers' own (``DynamicCache``; ``.crop(-n)`` drops its last n tokens)."""
        kw = {} if cache is None else {self._cache_kw: cache}
        out = self.hf(input_ids=ids, use_cache=True, **kw)
        logits = out.logits
        if logits.shape[-1] != self.vocab_size:
            logits = logits[..., : self.vocab_size]
        return logits, getattr(out, self._cache_kw)

    @functools.cached_property
    def _cache_kw(self) -> str:  # transformers >= 5.2 calls it ``cache``, before ``past_key_values``
        return "cache" if "cache" in inspect.signature(self.hf.forward).parameters else "past_key_values"

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def llama(preset: str | dict[str, int] = "student", *, vocab_size: int, seed: int = 0, max_length: int = 512,
          pad_to: int = 1, **overrides: Any) -> CausalLM:
    """A seeded random-init Llama-style model (``preset`` a name of ``PRESETS`` or a dict of sizes;
    ``overrides`` any ``LlamaConfig`` field). ``pad_to`` > 1 rounds the embedding rows up to a
    multiple (the extra rows are sliced off by ``CausalLM``). The global RNG is left as it was."""
    transformers = require_transformers()
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise unknown("model preset", preset, PRESETS)
        sizes = dict(PRESETS[preset])
    else:
        sizes = dict(preset)
    sizes.update(overrides)
    rows = -(-int(vocab_size) // pad_to) * pad_to
    cfg = transformers.LlamaConfig(vocab_size=rows, max_position_embeddings=int(max_length), tie_word_embeddings=False,
                                   rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None, **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = transformers.LlamaForCausalLM(cfg)
    hf.eval()
    return CausalLM(hf, vocab_size)


def save_lm(model: CausalLM, tokenizer, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``path`` atomically: transformers' files, ``tokenizer.json`` and ``distillery_lm.json``
    with the real vocabulary and the sha256 of the config, weights and tokenizer. ``extra`` is
    recorded too."""

    require_transformers().utils.logging.disable_progress_bar()  # no bar on every checkpoint

    def write(tmp: Path) -> None:
        model.hf.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save(str(tmp / "tokenizer.json"))
        files = ["config.json", "model.safetensors", "tokenizer.json"]
        atomic_write_json(tmp / CONFIG, {"format": FORMAT, "vocab_size": model.vocab_size,
                                         "files": {f: sha256_file(tmp / f) for f in files}, **(extra or {})})

    return atomic_folder(path, write)


def load_tokenizer(path: str | Path):
    require_transformers()
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise DistilleryError(f"{file} does not exist; a model folder needs its tokenizer.json "
                              "(save_lm writes it; for a transformers folder, tokenizer.save_pretrained).")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises its own exception type for a garbled file
        raise DistilleryError(f"{file} is not a readable tokenizer file ({str(e).splitlines()[0][:120]}); save the "
                              "tokenizer again.") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def from_pretrained(cls, path: Path, **kwargs):
    """``cls.from_pretrained`` of a local folder, safetensors only, nothing downloaded; a garbled, pickle-only
    or truncated folder is a one-line error."""
    path = Path(path)
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.glob("*.bin")) or sorted(p.name for p in path.iterdir())[:5]
        raise DistilleryError(f"{path} holds no safetensors weights ({', '.join(found) or 'nothing'}); distillery loads "
                              "safetensors only (pickled .bin files can run code): convert it with "
                              "model.save_pretrained(path, safe_serialization=True).")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DistilleryError(f"{path} is not a readable model folder ({first}).") from None


def check_folder(path: str | Path) -> Path:
    """``path`` if it is a model folder (has config.json), else a one-line error saying what to pass."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise DistilleryError(f"{str(path)!r} is not a model folder (no config.json); pass a folder written by "
                              "distillery (save_lm, `distillery run` of an lm recipe) or by transformers' "
                              "save_pretrained.")
    return path


def load_lm(path: str | Path, *, verify: bool = True) -> tuple[CausalLM, Any]:
    """(model, tokenizer) from a folder written by ``save_lm`` (its checksums verified), or, with
    ``verify=False``, any local transformers causal-LM folder with ``config.json``, safetensors weights and
    ``tokenizer.json``. A folder without its checksum record is refused unless ``verify`` is off.
    Nothing is downloaded."""
    transformers = require_transformers()
    path = check_folder(path)
    tok = load_tokenizer(path)
    vocab = tok.get_vocab_size()
    meta = read_json(path / CONFIG, "language-model config") if (path / CONFIG).is_file() else None
    if meta is not None and meta.get("format") != FORMAT:
        raise DistilleryError(f"{path / CONFIG} is not a distillery language-model config of format {FORMAT}.")
    check_files(path, meta, f"model folder {str(path)!r} ({CONFIG})", verify=verify)
    if meta is not None:
        vocab = int(meta["vocab_size"])
    transformers.utils.logging.disable_progress_bar()
    hf = from_pretrained(transformers.AutoModelForCausalLM, path)
    hf.eval()
    return CausalLM(hf, vocab), tok


def check_same_tokenizer(teacher_tok, student_tok) -> None:
    """Refuse distillation across tokenizers: token-level losses compare distributions over the
    same token ids, which different vocabularies do not share."""
    a, b = teacher_tok.get_vocab(), student_tok.get_vocab()
    if a == b:
        return
    only_a = sorted(set(a) - set(b))[:3]
    moved = [t for t in a if t in b and a[t] != b[t]][:3]
    what = (f"tokens {only_a} are the teacher's only" if only_a else
            f"token {moved[0]!r} is id {a[moved[0]]} for the teacher and {b[moved[0]]} for the student" if moved else
            f"the student has {len(b) - len(a)} more tokens")
    raise DistilleryError(f"teacher and student use different tokenizers ({len(a)} vs {len(b)} tokens; {what}); "
                          "token-level distillation needs one shared tokenizer: build the student with the teacher's.")
