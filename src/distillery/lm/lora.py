"""LoRA students through PEFT (Hu et al. 2022): low-rank adapters on chosen linear layers train, the
base weights stay frozen.

- ``add_lora(model, cfg)``: the ``CausalLM`` with PEFT's LoRA on ``cfg.targets`` (rank ``r``, scale
  ``alpha / r``, dropout); only the adapters require gradients, so the engine trains and checkpoints
  them with the (frozen) base.
- ``save_lora(model, tokenizer, folder, extra)``: ``folder/adapter`` in PEFT's own format
  (``adapter_config.json`` + ``adapter_model.safetensors``: ``PeftModel.from_pretrained`` loads it on
  the base) with the tokenizer files, and, with ``cfg.merge``, ``folder/model``: the adapters merged
  into the base weights (``merge_and_unload``), a plain transformers folder written by ``save_lm``.
  Returns the merged model (the same function as the adapted one). A base pruned in the run is saved
  as ``folder/base`` and named by the adapter's config.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..errors import DistilleryError
from ..io import atomic_folder
from .models import CausalLM, save_lm


def require_peft():
    try:
        import peft
    except ImportError:
        raise DistilleryError("LoRA students need PEFT; install the extra: pip install 'distillery[lora]'.") from None
    return peft


def add_lora(model: CausalLM, cfg) -> CausalLM:
    """``model`` with LoRA adapters (``cfg``: ``config.LoRA``); the base is frozen."""
    peft = require_peft()
    names = {n.rsplit(".", 1)[-1] for n, _ in model.hf.named_modules()}
    missing = [t for t in cfg.targets if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.hf.named_modules() if type(m).__name__ == "Linear"})
        raise DistilleryError(f"lora.targets {missing} name no module of {type(model.hf).__name__}; its linear layers "
                              f"are {linear}.")
    config = peft.LoraConfig(r=int(cfg.r), lora_alpha=float(cfg.alpha), lora_dropout=float(cfg.dropout),
                             target_modules=list(cfg.targets), task_type="CAUSAL_LM", bias="none")
    return CausalLM(peft.get_peft_model(model.hf, config), model.vocab_size)


def is_lora(model: CausalLM) -> bool:
    return hasattr(model.hf, "merge_and_unload")


def merged(model: CausalLM) -> CausalLM:
    """A copy of ``model`` with its adapters merged into the base weights (plain transformers)."""
    hf = copy.deepcopy(model.hf).merge_and_unload()
    hf.eval()
    return CausalLM(hf, model.vocab_size)


def save_lora(model: CausalLM, tokenizer, folder: str | Path, extra: dict | None = None, merge: bool = True,
              base: bool = False) -> CausalLM:
    """Write ``folder/adapter`` (PEFT format) and, with ``merge``, ``folder/model`` (merged); with ``base``,
    also ``folder/base``: the frozen base the adapters belong to (a base made here, by pruning, exists
    nowhere else), which the adapter's config then names. Each folder is written atomically."""
    if not is_lora(model):
        raise DistilleryError("save_lora: the model has no LoRA adapters; save it with save_lm.")
    folder = Path(folder)
    config = next(iter(model.hf.peft_config.values()))
    if base:
        plain = copy.deepcopy(model.hf).unload()  # the base weights without the adapters
        save_lm(CausalLM(plain, model.vocab_size), tokenizer, folder / "base", extra={**(extra or {}), "lora_base": True})
        config.base_model_name_or_path = str((folder / "base").resolve())

    def write(tmp: Path) -> None:
        model.hf.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    atomic_folder(folder / "adapter", write)
    out = merged(model)
    if merge:
        save_lm(out, tokenizer, folder / "model", extra={**(extra or {}), "merged_from": "adapter"})
    return out
