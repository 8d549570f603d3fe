"""int8 export for fast CPU inference: the quantized model's int8 weights run on torch's own x86
kernels (fbgemm / x86 quantized engine) instead of torchao's reference CPU code.

- ``export(model, path, meta)``: every ``nn.Linear`` and ``nn.Embedding`` as int8 weights with one
  float32 scale per output channel (per row), symmetric: w = q * scale. A model converted by
  ``compress.quantize`` (8-bit weights, per channel) exports its own int8 values and scales exactly; a
  float layer is quantized here with scale = max|w| / 127 (round to nearest). Every other tensor of
  the state dict (biases, norms, convolutions) stays as it is. One safetensors file with
  ``<path>.qweight`` (int8), ``<path>.scale`` (float32) and the float tensors, with distillery's
  checksum record; no pickle.
- ``load(model, path)``: a fresh float model of the architecture with those layers replaced by
  ``Int8Linear`` and ``Int8Embedding``: with ``activations="dynamic"`` (the default) linear layers run
  torch.ao's dynamic int8 GEMM (the inputs quantized per batch, uint8 with fbgemm's reduced range;
  torchao's QAT quantizes them per token instead, so outputs differ by that rounding); with
  ``activations="none"``, float inputs times the int8 weights dequantized at each call (weight-only: the
  file's size, float32's speed; ``aten._weight_int8pack_mm`` measured ~30x slower on this CPU).
  Embedding rows are looked up in int8 and scaled.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DistilleryError

FORMAT = "distillery-int8"


def engine() -> str:
    """The quantized CPU engine torch offers here (x86, else fbgemm, else qnnpack), made current."""
    supported = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm", "qnnpack"):
        if name in supported:
            torch.backends.quantized.engine = name
            return name
    raise DistilleryError(f"this torch build has no quantized CPU engine ({supported}); export with torchao instead "
                          "(quantize.export: torchao).")


def int8_weights(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 values (N, K), float32 scales (N,)) of a weight: torchao's own when it is a converted 8-bit
    per-channel tensor, else symmetric per row with scale = max|w| / 127."""
    qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    if qdata is not None and scale is not None:
        zp = getattr(weight, "zero_point", None)
        block = tuple(getattr(weight, "block_size", ()))
        if qdata.dtype != torch.int8 or block != (1, qdata.shape[1]) or (zp is not None and bool((zp != 0).any())):
            raise DistilleryError(f"int8 export takes symmetric 8-bit weights with one scale per output channel; this "
                                  f"layer is quantized in blocks {block} to {qdata.dtype}: quantize with weights: 8, "
                                  "granularity: per_channel, or export with torchao.")
        return qdata.detach().clone(), scale.detach().reshape(-1).float().clone()
    if hasattr(weight, "dequantize") and type(weight) is not torch.Tensor and not isinstance(weight, nn.Parameter):
        weight = weight.dequantize()
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """y = x W^T + b with W = qweight * scale: dynamic int8 GEMM, or weight-only (module docstring)."""

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None, activations: str = "dynamic"):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.activations = activations
        self.qweight = nn.Parameter(qweight, requires_grad=False)  # a parameter: counted as the layer's weights
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self._packed = None

    def _pack(self):
        if self._packed is None:
            engine()
            zp = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():  # torch marks its quantized tensor type for removal; its kernels are the fast path
                warnings.simplefilter("ignore", UserWarning)
                q = torch._make_per_channel_quantized_tensor(self.qweight, self.scale.double(), zp, 0)
                self._packed = torch.ops.quantized.linear_prepack(q, self.bias)
        return self._packed

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        if self.activations == "dynamic":
            y = torch.ops.quantized.linear_dynamic(x2, self._pack(), True)
        else:  # torch's int8-weight GEMM (aten._weight_int8pack_mm) is ~30x slower than this on x86 CPUs
            y = F.linear(x2, self.qweight.float() * self.scale[:, None], self.bias)
        return y.reshape(*lead, self.out_features)


class Int8Embedding(nn.Module):
    """Rows looked up in int8 and scaled: E[i] = qweight[i] * scale[i]."""

    def __init__(self, qweight: Tensor, scale: Tensor, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.qweight = nn.Parameter(qweight, requires_grad=False)
        self.register_buffer("scale", scale)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.qweight).float() * self.scale[ids].unsqueeze(-1)


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding)) and n}


def export(model: nn.Module, path: str | Path, meta: dict, activations: str = "dynamic",
           only: set[str] | None = None) -> Path:
    """Write the int8 file of ``model`` (see the module docstring); ``only``: the paths of the layers to
    quantize (default: every linear and embedding layer), the others stay float."""
    from ..io import save_with_record

    if activations not in ("dynamic", "none"):
        raise DistilleryError(f"int8 activations must be dynamic or none, got {activations!r}.")
    if any(type(m).__name__ in ("FakeQuantizedLinear", "FakeQuantizedEmbedding") for m in model.modules()):
        raise DistilleryError("int8 export: this model is still fake-quantized (prepared for QAT, not converted); "
                              "convert it first (quantize.convert).")
    layers = {n: m for n, m in _layers(model).items() if only is None or n in only}
    if not layers:
        raise DistilleryError(f"int8 export: {type(model).__name__} has no linear or embedding layer to quantize.")
    tensors: dict[str, Tensor] = {}
    kinds: dict[str, str] = {}
    for name, m in layers.items():
        q, s = int8_weights(m.weight)
        tensors[f"{name}.qweight"], tensors[f"{name}.scale"] = q.contiguous(), s.contiguous()
        kinds[name] = "linear" if isinstance(m, nn.Linear) else "embedding"
    skip = {f"{n}.weight" for n in layers}
    seen: set[int] = set()
    for key, v in model.state_dict().items():
        if key not in skip:
            t = v.detach() if type(v) is torch.Tensor else v.dequantize()
            ptr = t.untyped_storage().data_ptr() if t.numel() else -1
            t = t.clone() if ptr in seen else t  # tied weights: safetensors stores each tensor on its own
            seen.add(ptr)
            tensors[key] = t.contiguous()
    header = {"format": FORMAT, "layers": json.dumps(kinds), "activations": activations}
    return save_with_record(path, tensors, {**meta, "int8": True}, header=header)


def load(model: nn.Module, path: str | Path, *, verify: bool = True) -> nn.Module:
    """``model`` (a fresh float model of the architecture) running the int8 file ``path`` (module docstring)."""
    import safetensors

    from ..io import read_record

    path = Path(path)
    if verify and read_record(path) is None:
        raise DistilleryError(f"{path} has no checksum record; it was not written by distillery's int8 export.")
    with safetensors.safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
        data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    if header.get("format") != FORMAT:
        raise DistilleryError(f"{path} is not an int8 export (format {header.get('format')!r}); load it with the loader "
                              "of its own format.")
    kinds = json.loads(header["layers"])
    layers = _layers(model)
    missing = [n for n in kinds if n not in layers]
    if missing:
        raise DistilleryError(f"{path} does not fit the model: it has no layer {missing[0]!r}.")
    for name, kind in kinds.items():
        old = layers[name]
        q, s = data.pop(f"{name}.qweight"), data.pop(f"{name}.scale")
        if tuple(q.shape) != tuple(old.weight.shape):
            raise DistilleryError(f"{path} does not fit the model: {name} is {tuple(q.shape)} there, "
                                  f"{tuple(old.weight.shape)} here.")
        if kind == "linear":
            new: nn.Module = Int8Linear(q, s, data.pop(f"{name}.bias", None), header.get("activations", "dynamic"))
        else:
            new = Int8Embedding(q, s, getattr(old, "padding_idx", None))
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(owner, name.rsplit(".", 1)[-1], new)
    try:
        missing_keys, unexpected = model.load_state_dict(data, strict=False)
    except RuntimeError as e:
        raise DistilleryError(f"{path} does not fit the model: {str(e).splitlines()[0]}.") from None
    missing_keys = [k for k in missing_keys if not k.endswith((".qweight", ".scale")) and
                    not any(k.startswith(f"{n}.") for n in kinds)]
    if missing_keys or unexpected:
        raise DistilleryError(f"{path} does not fit the model: missing {missing_keys[:3]}, unexpected {unexpected[:3]}.")
    return model.eval()
