"""Quantization of a student on torchao (the ``compress`` extra): quantization-aware training, then a
real quantized model, exported to safetensors and loaded back.

- ``prepare(model, cfg)``: torchao's QAT (``QATConfig(step="prepare")`` with ``IntxFakeQuantizeConfig``)
  on the student's ``nn.Linear`` and ``nn.Embedding`` layers: weights fake-quantized to ``cfg.weights``
  bits (2 to 8, symmetric, per output channel or per group of ``group_size`` inputs), linear inputs to
  int8 per token (asymmetric, dynamic) unless ``activations: null``. The prepared model trains with any
  distillery objective (quantization-aware distillation: Polino et al. 2018's "quantized distillation"
  with torchao's fake quantization in place of theirs).
- ``convert(model, cfg)``: the same layers as torchao quantized tensors (``QATConfig(step="convert")``
  with ``Int8DynamicActivationIntxWeightConfig`` / ``IntxWeightOnlyConfig``): what was trained is
  what runs (the converted outputs equal the fake-quantized ones).
- ``ptq(model, cfg)``: post-training quantization, the same conversion without training.
- ``save`` / ``load``: torchao's safetensors flattening (an allow-list of tensor classes; no pickle),
  with distillery's checksum record.

torchao quantizes linear and embedding layers only; convolutions stay in float32 and are named in
``float_layers`` (torch.ao's PT2E QAT would quantize them through an exported graph, which student
models with taps and hooks do not survive; see the closing note of the compression issue).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..errors import DistilleryError

BITS = (2, 3, 4, 5, 6, 7, 8)


@dataclass
class QuantizeConfig:
    """How a compress stage quantizes (``compress: [{name, quantize: {...}}]``)."""

    method: Literal["qat", "ptq", "dq"] = "qat"
    """qat: fake-quantized training (with the stage's terms), then converted; ptq: converted as it is; dq:
    Polino et al.'s differentiable quantization (learned quantization points; ``compress.dq``)."""
    weights: int = 4
    """Weight bits (2 to 8: torch.int2 ... torch.int8)."""
    activations: int | None = 8
    """8: int8 dynamic per-token inputs of linear layers; null: weight-only."""
    granularity: Literal["per_channel", "per_group"] = "per_group"
    group_size: int = 32
    """per_group: weights share a scale per this many inputs (the input width must be a multiple)."""
    modules: list[str] | None = None
    """Module paths whose linear and embedding layers are quantized (null: all of them)."""
    allocate: Literal["none", "gradient"] = "none"
    """method dq: ``gradient`` shares the points among layers by their weight-gradient norm (Polino et al.'s
    bit allocation; the total stays ``2^weights`` per layer); none: every layer gets ``2^weights``."""
    export: Literal["torchao", "int8"] = "torchao"
    """The exported file: torchao's tensors (any bits; torchao's CPU kernels are reference code), or ``int8``
    (8-bit per-channel weights on torch's x86 / fbgemm kernels: ``compress.int8``; the fast CPU path)."""

    def __post_init__(self) -> None:
        if self.weights not in BITS:
            raise DistilleryError(f"quantize.weights: torchao quantizes weights to 2 to 8 bits, got {self.weights}; "
                                  "give 2, 3, 4, 5, 6, 7 or 8.")
        if self.export == "int8" and (self.method == "dq" or self.weights != 8 or self.granularity != "per_channel"):
            raise DistilleryError("quantize.export: int8 runs 8-bit weights with one scale per output channel; set "
                                  "weights: 8 and granularity: per_channel (method qat or ptq), or export: torchao.")
        if self.activations not in (8, None):
            raise DistilleryError(f"quantize.activations: torchao's QAT quantizes activations to int8 (8) or not at "
                                  f"all (null), got {self.activations}.")
        if self.group_size < 1:
            raise DistilleryError(f"quantize.group_size must be at least 1, got {self.group_size}.")
        if self.allocate != "none" and self.method != "dq":
            raise DistilleryError(f"quantize.allocate shares learned quantization points among layers (method dq); "
                                  f"method {self.method} has fixed bit widths: remove allocate, or use method dq.")
        if self.method == "dq" and (self.activations is not None or self.granularity != "per_group"):
            raise DistilleryError("quantize method dq learns weight quantization points per layer over buckets of "
                                  "group_size weights: set activations: null and granularity: per_group.")


def quiet_torchao() -> None:
    """torchao's import warns about GPU kernels a CPU build lacks, and torch about its pytree registrations:
    noise on every run once torchao is installed (transformers imports it too)."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def require_torchao():
    quiet_torchao()
    try:
        import torchao  # noqa: F401
        from torchao.quantization import quantize_  # noqa: F401
    except ImportError:
        raise DistilleryError("quantization needs torchao: pip install 'distillery[compress]'.") from None


def targets(model: nn.Module, cfg: QuantizeConfig) -> dict[str, nn.Module]:
    """The linear and embedding layers to quantize, by path (checked: paths exist, group sizes divide)."""
    from ..taps import find_module

    roots = [(p, find_module(model, p)) for p in cfg.modules] if cfg.modules is not None else [("", model)]
    found: dict[str, nn.Module] = {}
    for root, module in roots:
        for name, m in module.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                found[".".join(p for p in (root, name) if p)] = m
    if not found:
        where = ", ".join(cfg.modules or []) or type(model).__name__
        raise DistilleryError(f"quantize: {where} holds no linear or embedding layer, the layers torchao quantizes; "
                              "name modules that do (quantize.modules), or leave this stage out.")
    if cfg.granularity == "per_group":
        for name, m in found.items():
            width = m.in_features if isinstance(m, nn.Linear) else m.embedding_dim
            if width % cfg.group_size:
                raise DistilleryError(f"quantize: layer {name!r} has {width} inputs, not a multiple of group_size "
                                      f"{cfg.group_size}; give a group_size that divides it, or granularity: "
                                      "per_channel.")
    return found


def float_layers(model: nn.Module, quantized: dict[str, nn.Module]) -> list[str]:
    """Layers with weights that stay in float32 (convolutions, norms): named in the stage's row."""
    keep = set(quantized)
    return [n for n, m in model.named_modules() if n and n not in keep and any(True for _ in m.parameters(recurse=False))
            and not isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm))]


def _dtype(bits: int) -> torch.dtype:
    return getattr(torch, f"int{bits}")


def _filter(paths: set[str], kind: type):
    return lambda m, fqn: isinstance(m, kind) and fqn in paths


def _fake(cfg: QuantizeConfig):
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    gran = {"granularity": "per_channel"} if cfg.granularity == "per_channel" else {"group_size": cfg.group_size}
    weight = IntxFakeQuantizeConfig(_dtype(cfg.weights), **gran)
    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False) if cfg.activations else None
    return act, weight


def _base(cfg: QuantizeConfig, linear: bool):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    gran = PerAxis(0) if cfg.granularity == "per_channel" else PerGroup(cfg.group_size)
    if linear and cfg.activations:
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=_dtype(cfg.weights), weight_granularity=gran)
    return IntxWeightOnlyConfig(weight_dtype=_dtype(cfg.weights), granularity=gran)


def prepare(model: nn.Module, cfg: QuantizeConfig) -> nn.Module:
    """``model`` (in place) with fake-quantized linear and embedding layers, ready to train."""
    require_torchao()
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    paths = set(targets(model, cfg))
    act, weight = _fake(cfg)
    quantize_(model, QATConfig(activation_config=act, weight_config=weight, step="prepare"), _filter(paths, nn.Linear))
    quantize_(model, QATConfig(weight_config=weight, step="prepare"), _filter(paths, nn.Embedding))
    return model


def convert(model: nn.Module, cfg: QuantizeConfig) -> nn.Module:
    """A prepared (QAT) model, in place, as torchao quantized layers."""
    require_torchao()
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig
    from torchao.quantization.qat.embedding import FakeQuantizedEmbedding
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    fq = {n for n, m in model.named_modules() if isinstance(m, (FakeQuantizedLinear, FakeQuantizedEmbedding))}
    if not fq:
        raise DistilleryError("quantize: the model holds no fake-quantized layer to convert; prepare it first "
                              "(method qat), or quantize it as it is (method ptq).")
    quantize_(model, QATConfig(_base(cfg, True), step="convert"), lambda m, f: isinstance(m, FakeQuantizedLinear))
    quantize_(model, QATConfig(_base(cfg, False), step="convert"), lambda m, f: isinstance(m, FakeQuantizedEmbedding))
    return model


def ptq(model: nn.Module, cfg: QuantizeConfig) -> nn.Module:
    """Post-training quantization of ``model`` (in place): the layers converted without training."""
    require_torchao()
    from torchao.quantization import quantize_

    paths = set(targets(model, cfg))
    quantize_(model, _base(cfg, True), _filter(paths, nn.Linear))
    quantize_(model, _base(cfg, False), _filter(paths, nn.Embedding))
    return model


def is_prepared(model: nn.Module) -> bool:
    return any(type(m).__name__ in ("FakeQuantizedLinear", "FakeQuantizedEmbedding") for m in model.modules())


def save(model: nn.Module, path: str | Path, meta: dict) -> Path:
    """The converted model as safetensors (torchao's flattening; distillery's checksum record)."""
    require_torchao()
    if is_prepared(model):
        raise DistilleryError("quantize: this model is still fake-quantized (prepared for QAT, not converted); "
                              "convert it before export (quantize.convert), or the file would hold float weights.")
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    from ..io import save_with_record

    tensors, header = flatten_tensor_state_dict(model.state_dict())
    return save_with_record(path, tensors, {**meta, "quantized": True}, header=header)


def load(model: nn.Module, path: str | Path, cfg: QuantizeConfig, *, verify: bool = True) -> nn.Module:
    """``model`` (a fresh float model of the architecture) with the quantized weights of ``path``."""
    require_torchao()
    import safetensors
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    from ..io import read_record

    path = Path(path)
    record = read_record(path) if verify else None
    if verify and record is None:
        raise DistilleryError(f"{path} has no checksum record; it was not written by distillery's quantize export.")
    with safetensors.safe_open(str(path), "pt") as f:
        header = {k: v for k, v in (f.metadata() or {}).items() if not k.startswith("distillery_")}
        data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    if "tensor_names" not in header:
        raise DistilleryError(f"{path} holds no torchao quantized tensors; load float weights with load_weights.")
    state, left = unflatten_tensor_state_dict(data, header)
    if left:
        raise DistilleryError(f"{path}: {len(left)} entries are not part of the quantized model ({sorted(left)[:3]}).")
    ptq(model, cfg)  # the quantized structure, then the saved tensors in it
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise DistilleryError(f"{path} does not fit the model: {str(e).splitlines()[0]}.") from None
    return model


def describe(cfg: QuantizeConfig) -> str:
    if cfg.method == "dq":
        return f"{2 ** cfg.weights} learned points per layer ({cfg.weights} bits), buckets of {cfg.group_size}"
    act = "int8 activations" if cfg.activations else "weight-only"
    gran = "per channel" if cfg.granularity == "per_channel" else f"groups of {cfg.group_size}"
    return json.dumps(f"int{cfg.weights} weights ({gran}), {act}")[1:-1]
