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
  (``AutoModelForCausalLM`` loads it without distillery), every tokenizer file (``AutoTokenizer``
  loads them: special tokens, chat template) and ``distillery_lm.json`` (real vocabulary, checksums
  verified on load), written atomically.
- Tokenizers are transformers fast tokenizers everywhere (``load_tokenizer``, ``as_tokenizer`` for
  a raw ``tokenizers.Tokenizer``); end-of-sequence and padding come from the tokenizer (``eos_id``,
  ``pad_id``).
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
    "small": {"hidden_size": 192, "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 2,
              "intermediate_size": 512},  # 2.5M at a vocabulary of 400 (the reasoning task's teacher)
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

    def forward(self, x: Tensor, attention_mask: Tensor | None = None, pos: Tensor | None = None) -> Tensor:
        """``x`` (B, T) token ids -> (B, T, V) logits. ``pos`` (B, T): each token's position in its own
        sequence; where it restarts at 0 a new sequence begins, and no token attends across that boundary
        (packed rows, left padding: transformers' packed-sequence masking from ``position_ids``)."""
        out = self.hf(input_ids=x, attention_mask=attention_mask, position_ids=pos, use_cache=False)
        logits = out.logits
        return logits[..., : self.vocab_size] if logits.shape[-1] != self.vocab_size else logits

    def step(self, ids: Tensor, cache: Any = None, attention_mask: Tensor | None = None,
             pos: Tensor | None = None) -> tuple[Tensor, Any]:
        """Incremental decoding: (logits (B, n, V) of the ``n`` new tokens ``ids`` after the cached
        prefix, the updated key-value cache). ``cache=None`` starts from an empty prefix. The cache
        is transformers' own (``DynamicCache``; ``.crop(-n)`` drops its last n tokens). Left-padded
        batches pass ``attention_mask`` (B, prefix + n; 0 on padding) and ``pos`` (B, n) positions."""
        kw = {} if cache is None else {self._cache_kw: cache}
        out = self.hf(input_ids=ids, attention_mask=attention_mask, position_ids=pos, use_cache=True, **kw)
        logits = out.logits
        if logits.shape[-1] != self.vocab_size:
            logits = logits[..., : self.vocab_size]
        return logits, getattr(out, self._cache_kw)

    @functools.cached_property
    def _cache_kw(self) -> str:  # transformers >= 5.2 calls it ``cache``, before ``past_key_values``
        base = self.hf.get_base_model() if hasattr(self.hf, "get_base_model") else self.hf  # a PEFT model's base
        return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

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
    """Write ``path`` atomically: transformers' files, every file of the tokenizer (``save_pretrained``:
    ``tokenizer.json``, ``tokenizer_config.json`` with its special tokens, the chat template) and
    ``distillery_lm.json`` with the real vocabulary and the sha256 of every file. ``extra`` is recorded too."""

    require_transformers().utils.logging.disable_progress_bar()  # no bar on every checkpoint
    if not hasattr(tokenizer, "save_pretrained"):  # a raw tokenizers.Tokenizer
        tokenizer = as_tokenizer(tokenizer)

    def write(tmp: Path) -> None:
        model.hf.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        files = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != CONFIG)
        atomic_write_json(tmp / CONFIG, {"format": FORMAT, "vocab_size": model.vocab_size,
                                         "files": {f: sha256_file(tmp / f) for f in files}, **(extra or {})})

    return atomic_folder(path, write)


def as_tokenizer(raw, eos: str | None = None):
    """A raw ``tokenizers.Tokenizer`` as a transformers fast tokenizer (one type everywhere: chat
    templates, special tokens, ``save_pretrained``). ``eos`` (default ``<|endoftext|>`` when the
    vocabulary has it) is also the padding token."""
    transformers = require_transformers()
    raw.no_padding()
    raw.no_truncation()
    if eos is None and raw.token_to_id("<|endoftext|>") is not None:
        eos = "<|endoftext|>"
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos, pad_token=eos)


def load_tokenizer(path: str | Path):
    """The tokenizer of a model folder (``tokenizer.json`` with ``tokenizer_config.json``: its special
    tokens and chat template, as transformers saves them) or of a ``tokenizer.json`` file, as a
    transformers fast tokenizer. Nothing is downloaded."""
    transformers = require_transformers()
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DistilleryError(f"{file} does not exist; a model folder needs its tokenizer.json "
                              "(save_lm writes it; for a transformers folder, tokenizer.save_pretrained).")
    try:
        if path.is_dir() and (path / "tokenizer_config.json").is_file():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            if not getattr(tok, "is_fast", False):
                raise ValueError("not a fast tokenizer")
        else:
            tok = as_tokenizer(Tokenizer.from_file(str(file)))
    except Exception as e:  # the tokenizers library raises its own exception type for a garbled file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise DistilleryError(f"{file} is not a readable tokenizer ({first}); save the tokenizer again "
                              "(tokenizer.save_pretrained).") from None
    return tok


END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>", "</s>")
"""End-of-turn / end-of-text markers of common chat formats (ChatML, Llama 3, Phi, Gemma, SentencePiece)."""


def end_ids(tok) -> list[int]:
    """The ids that end a generated answer: the tokenizer's end-of-sequence token, and the end-of-turn
    markers of common chat formats its vocabulary holds (a base model's eos is often not its template's
    end of turn: Qwen's ``<|endoftext|>`` and ``<|im_end|>``, Llama 3's ``<|end_of_text|>`` and ``<|eot_id|>``)."""
    vocab = tok.get_vocab()
    ids = [eos_id(tok), *(vocab[t] for t in END_TOKENS if t in vocab)]
    return list(dict.fromkeys(ids))


def eos_id(tok) -> int:
    """The tokenizer's end-of-sequence id (from its own special tokens, never a fixed string)."""
    if tok.eos_token_id is None:
        raise DistilleryError("the tokenizer names no end-of-sequence token; set eos_token in its "
                              "tokenizer_config.json (or pass eos= to distillery.lm.models.as_tokenizer).")
    return int(tok.eos_token_id)


def pad_id(tok) -> int:
    """The padding id: the tokenizer's pad token, else its end-of-sequence token (padding is never trained)."""
    return int(tok.pad_token_id) if tok.pad_token_id is not None else eos_id(tok)


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


def from_config(folder: str | Path, vocab_size: int, seed: int = 0) -> CausalLM:
    """A seeded random-init model of ``folder/config.json`` (any causal LM architecture transformers
    knows): a student built from a config. ``vocab_size`` is the tokenizer's; the config must have room."""
    transformers = require_transformers()
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise DistilleryError(f"{folder}/config.json is not a readable transformers config "
                              f"({(str(e).strip().splitlines() or [type(e).__name__])[0][:160]}).") from None
    if getattr(cfg, "vocab_size", vocab_size) < vocab_size:
        raise DistilleryError(f"{folder}/config.json has vocab_size {cfg.vocab_size}, fewer than the tokenizer's "
                              f"{vocab_size} tokens; raise it in the config.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            hf = transformers.AutoModelForCausalLM.from_config(cfg)
        except ValueError as e:
            raise DistilleryError(f"{folder}/config.json does not describe a causal LM transformers can build "
                                  f"({str(e).splitlines()[0][:160]}).") from None
    hf.eval()
    return CausalLM(hf, vocab_size)


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
    vocab = len(tok)
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


def same_tokenizer(a, b) -> bool:
    """Do two tokenizers map the same strings to the same ids?"""
    return a.get_vocab() == b.get_vocab()


def check_same_tokenizer(teacher_tok, student_tok) -> None:
    """Refuse distillation across tokenizers with same-vocabulary losses: token-level losses compare
    distributions over the same token ids, which different vocabularies do not share."""
    a, b = teacher_tok.get_vocab(), student_tok.get_vocab()
    if a == b:
        return
    only_a = sorted(set(a) - set(b))[:3]
    moved = [t for t in a if t in b and a[t] != b[t]][:3]
    what = (f"tokens {only_a} are the teacher's only" if only_a else
            f"token {moved[0]!r} is id {a[moved[0]]} for the teacher and {b[moved[0]]} for the student" if moved else
            f"the student has {len(b) - len(a)} more tokens")
    raise DistilleryError(f"teacher and student use different tokenizers ({len(a)} vs {len(b)} tokens; {what}); "
                          "token-level KD needs one shared tokenizer: build the student with the teacher's, or distil across "
                          "tokenizers on chat data with terms: [{loss: uld}] or [{loss: gold, teacher: spans}].")
