"""Where and how a step runs: the device, the precision, moving batches, calling any model and
reading its logits. The engine uses these; nothing here knows a distillation method.

- ``resolve_device("auto" | "cpu" | "cuda" | "cuda:N" | "mps")``: ``auto`` is the process's CUDA
  device when there is one (``LOCAL_RANK`` under torchrun), else the CPU. A device that is not
  there is a one-line error naming the ones that are.
- ``Precision``: autocast on the device for ``bf16`` / ``fp16`` (``fp16`` with
  ``torch.amp.GradScaler``); ``fp32`` runs as written. Losses are always computed outside the
  autocast region, on float32 (or wider) tensors: every log-softmax and reduction is fp32.
- ``to_device``: tensors of a batch (nested dicts, lists, tuples) to the device, ``non_blocking``
  from pinned memory.
- ``call_model``: a batch's model inputs go in as they are: ``batch["x"]`` positionally (a tensor,
  or a dict as keyword arguments), or the named ``inputs`` keys of the batch as keyword arguments
  (``input_ids``, ``attention_mask`` of a Hugging Face batch).
- ``logits_of``: the logits of any output: a tensor, a tuple's or list's first item, a mapping's or
  a ``ModelOutput``'s ``logits``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import DistilleryError

# Batch keys that are never model inputs: sample ids, targets, loss masks, views, labels.
NOT_INPUTS = frozenset({"id", "y", "labels", "label", "mask", "view", "teacher_logits"})


# --------------------------------------------------------------------------- devices


def available_devices() -> list[str]:
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def resolve_device(spec: str | torch.device | None, where: str = "train.device") -> torch.device:
    """The ``torch.device`` for a recipe's device string (see the module docstring)."""
    spec = "auto" if spec is None else str(spec)
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise DistilleryError(f"{where}: {spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps "
                              f"(available here: {', '.join(available_devices())}).") from None
    there = available_devices()
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DistilleryError(f"{where}: {spec!r} asked, but this machine has no CUDA device; available: "
                                  f"{', '.join(there)}. Use device: auto or cpu.")
        index = dev.index if dev.index is not None else int(os.environ.get("LOCAL_RANK", 0))
        if index >= torch.cuda.device_count():
            raise DistilleryError(f"{where}: {spec!r} asked, but there are {torch.cuda.device_count()} CUDA devices; "
                                  f"available: {', '.join(there)}.")
        return torch.device("cuda", index)
    if dev.type == "mps" and "mps" not in there:
        raise DistilleryError(f"{where}: 'mps' asked, but MPS is not available here; available: {', '.join(there)}.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise DistilleryError(f"{where}: device type {dev.type!r} is not supported; use auto, cpu, cuda, cuda:N or mps.")
    return dev


def setup_device(device: torch.device) -> None:
    """Per-process device settings: the current CUDA device and TF32 matmuls (Ampere and later)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# --------------------------------------------------------------------------- precision

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_of(name: str, where: str) -> torch.dtype:
    if name not in _DTYPES:
        raise DistilleryError(f"{where}: {name!r} is not a precision; use one of {', '.join(_DTYPES)}.")
    return _DTYPES[name]


class Precision:
    """Autocast and loss scaling for one device: ``with p.autocast(): ...``; ``p.scaler`` for fp16."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.device = name, device
        self.dtype = dtype_of(name, "train.precision")
        if name != "fp32":
            check_precision(self.dtype, device)
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def check_precision(dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a half precision the device cannot run (one tiny matmul under autocast)."""
    label = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise DistilleryError(f"train.precision: {label} is not supported by {torch.cuda.get_device_name(device)}; "
                              "use fp16 or fp32.")
    try:
        with torch.autocast(device.type, dtype=dtype):
            a = torch.ones(2, 2, device=device)
            (a @ a).sum().item()
    except (RuntimeError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistilleryError(f"train.precision: {label} autocast does not run on {device} here ({first}); "
                              "use fp32 or another device.") from None


# --------------------------------------------------------------------------- batches


def to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Every tensor of a (nested) batch on ``device``; other values as they are."""
    if isinstance(obj, Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):
        out = {k: to_device(v, device, non_blocking) for k, v in obj.items()}
        return out if type(obj) is dict else type(obj)(out)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    return obj


def devices_in(batch: Mapping[str, Any]) -> set[torch.device]:
    out: set[torch.device] = set()
    for v in batch.values():
        if isinstance(v, Tensor):
            out.add(v.device)
        elif isinstance(v, Mapping):
            out |= devices_in(v)
    return out


def check_one_device(batch: Mapping[str, Any], where: str) -> None:
    """A batch whose tensors sit on several devices is an error (the engine moves whole batches)."""
    devs = devices_in(batch)
    if len(devs) > 1:
        raise DistilleryError(f"{where}: the batch's tensors sit on different devices ({', '.join(sorted(map(str, devs)))}); "
                              "return CPU tensors from the data set (the engine moves each batch to train.device).")


def as_bool_mask(mask: Tensor, where: str) -> Tensor:
    """A padding mask as bool: bool, or 0/1 of any integer dtype (HF's ``attention_mask``). Never read as
    row indices. Any other value is an error."""
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex():
        raise DistilleryError(f"{where}: a mask must be bool or 0/1 integers, got {mask.dtype}; "
                              "pass mask.bool() (True = the position counts).")
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)][:3].tolist()
        raise DistilleryError(f"{where}: a mask holds 0 or 1 only, found {bad}; pass a 0/1 or bool mask "
                              "(not row indices).")
    return mask != 0


# --------------------------------------------------------------------------- models


def model_inputs(batch: Mapping[str, Any], inputs: Sequence[str] | None = None) -> tuple[tuple, dict]:
    """(args, kwargs) for the model: ``inputs`` names the batch keys passed as keyword arguments;
    without it ``batch["x"]`` is the input (a dict of it becomes keyword arguments), and a batch with
    no ``x`` passes every key that is not an id, target or loss mask."""
    if inputs:
        missing = [k for k in inputs if k not in batch]
        if missing:
            raise DistilleryError(f"the batch has no input key(s) {missing} (it has {sorted(batch)}); fix the data "
                                  "set's items or the recipe's train.inputs.")
        return (), {k: batch[k] for k in inputs}
    if "x" in batch:
        x = batch["x"]
        return ((), dict(x)) if isinstance(x, Mapping) else ((x,), {})
    kw = {k: v for k, v in batch.items() if k not in NOT_INPUTS}
    if not kw:
        raise DistilleryError(f"the batch has no model input: no 'x' and no other key than {sorted(batch)}; give "
                              "items an 'x' (or input_ids, ...) or name the inputs with train.inputs.")
    return (), kw


def call_model(model: nn.Module, batch: Mapping[str, Any], inputs: Sequence[str] | None = None) -> Any:
    args, kwargs = model_inputs(batch, inputs)
    return model(*args, **kwargs)


def logits_of(output: Any, where: str = "the model") -> Tensor:
    """The logits of a model's output, whatever its form (see the module docstring)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)  # transformers' ModelOutput (also a Mapping)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    kind = type(output).__name__
    keys = f" with keys {sorted(output)}" if isinstance(output, Mapping) else ""
    raise DistilleryError(f"{where} returned no logits ({kind}{keys}); return a tensor, a tuple whose first item is "
                          "the logits, or an output with a .logits field.")


def as_float(out: dict[str, Any] | None) -> dict[str, Any] | None:
    """Half-precision tensors of a model's outputs as float32, for adapters and losses that run outside
    autocast. Token logits (B, T, V) stay as they are: the token losses upcast them chunk by chunk, so
    the whole (B, T, V) block never exists in fp32."""
    if out is None:
        return None
    half = (torch.float16, torch.bfloat16)
    return {k: v.float() if isinstance(v, Tensor) and v.dtype in half and not (k.endswith("logits") and v.dim() == 3)
            else v for k, v in out.items()}
