"""Differentiable quantization (Polino, Pascanu & Alistarh, "Model compression via distillation and
quantization", ICLR 2018, Section 3.2): the quantization points themselves are learned by gradient
descent on the distillation loss.

Each weight tensor is cut into buckets of ``bucket`` consecutive values (the paper's bucketing); a
bucket is scaled to [0, 1] by sc(v) = (v - beta) / alpha with beta its minimum and alpha its range, and
every value maps to the nearest of the layer's quantization points p_1..p_s (s = 2^bits, initialised
uniformly on [0, 1]): Q(v) = p_i * alpha + beta. The full-precision weights stay fixed; the points are
the only parameters trained (the gradient of a point is the sum of the gradients of the weights
assigned to it, times their bucket's alpha: autograd through the indexing). Biases stay in float, as
in the paper. Linear and convolution layers are quantized (weight-only).

The exported model is what it claims to be: per layer the point index of every weight (uint8; int16 when a
layer holds more than 256 points, int32 past 32,768), the points, and each bucket's alpha and beta, in
safetensors; ``load`` rebuilds float weights from them.

Bit allocation (``allocate_points``; recipe ``quantize.allocate: gradient``): the paper's heuristic gives
layers whose weights matter more more points, the total kept. As the authors' code does
(``assign_bits_automatically`` with ``input_is_point``): the importance of a layer is the 2-norm of its
weight's gradient averaged over 5 calibration batches of the task loss; every layer first gets half of its
2^bits points, and the other half of the total is shared in proportion to the importances (rounded; the
rounding difference is taken from the largest or given to the smallest share).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DistilleryError

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


class DQWeight(nn.Module):
    """The learned-points quantization of one layer's weight (its buckets' alpha and beta fixed)."""

    def __init__(self, weight: Tensor, bits: int, bucket: int, points: int | None = None):
        super().__init__()
        flat = weight.detach().reshape(-1)
        pad = (-len(flat)) % bucket
        self.shape, self.numel, self.bucket = tuple(weight.shape), len(flat), bucket
        buckets = F.pad(flat, (0, pad), value=float(flat[-1])).reshape(-1, bucket)  # the pad repeats a real value
        beta = buckets.min(1, keepdim=True).values
        alpha = (buckets.max(1, keepdim=True).values - beta).clamp_min(1e-12)
        self.register_buffer("scaled", (buckets - beta) / alpha)
        self.register_buffer("alpha", alpha)
        self.register_buffer("beta", beta)
        n = points if points is not None else 2 ** bits
        self.points = nn.Parameter(torch.linspace(0, 1, n, dtype=weight.dtype, device=weight.device))

    def index(self) -> Tensor:
        """The nearest point of every (scaled) weight."""
        return (self.scaled.unsqueeze(-1) - self.points.detach()).abs().argmin(-1)

    def forward(self) -> Tensor:
        q = self.points[self.index()] * self.alpha + self.beta
        return q.reshape(-1)[: self.numel].reshape(self.shape)


class DQLayer(nn.Module):
    """A linear or convolution layer whose weight is ``DQWeight``'s (the float layer kept, frozen)."""

    def __init__(self, layer: nn.Module, bits: int, bucket: int, points: int | None = None):
        super().__init__()
        self.layer = layer
        self.dq = DQWeight(layer.weight, bits, bucket, points)
        for p in layer.parameters():
            p.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        w = self.dq()
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        return self.layer._conv_forward(x, w, self.layer.bias)


def allocate_points(importances: list[float], points: int) -> list[int]:
    """Polino et al.'s bit allocation (their code's ``assign_bits_automatically``, counting points): each of
    the layers gets ``points // 2``, the rest of the total ``len * points`` goes in proportion to
    ``importances`` (rounded); the rounding difference comes off the largest share or goes to the smallest.
    Every layer keeps at least 2 points."""
    if not importances:
        return []
    total = points * len(importances)
    base = [points // 2] * len(importances)
    rest = total - sum(base)
    norm = sum(importances)
    if not math.isfinite(norm) or norm <= 0:  # no gradient signal: the uniform allocation
        return [points] * len(importances)
    out = [b + round(x / norm * rest) for b, x in zip(base, importances)]
    diff = sum(out) - total
    if diff > 0:
        out[out.index(max(out))] -= diff
    elif diff < 0:
        out[out.index(min(out))] -= diff
    return [max(2, n) for n in out]


def gradient_importances(model: nn.Module, paths: list[str], batches, loss_fn) -> list[float]:
    """The 2-norm of each layer's weight gradient averaged over ``batches`` (Polino et al.'s code: 5 of them,
    the task loss); the model's gradients are left as they were (none)."""
    from ..taps import find_module

    weights = [find_module(model, p).weight for p in paths]
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    grads = [torch.zeros_like(w) for w in weights]
    n = 0
    for batch in batches:
        got = torch.autograd.grad(loss_fn(model, batch), weights, allow_unused=True)
        for g, x in zip(grads, got):
            if x is not None:
                g += x.detach()
        n += 1
    for w, f in zip(weights, flags):
        w.requires_grad_(f)
    return [float((g / max(n, 1)).norm()) for g in grads]


def layers(model: nn.Module, modules: list[str] | None = None) -> list[str]:
    """The paths of the linear and convolution layers ``prepare`` quantizes."""
    from ..taps import find_module

    roots = [(p, find_module(model, p)) for p in modules] if modules is not None else [("", model)]
    paths = []
    for root, module in roots:
        for name, m in list(module.named_modules()):
            if isinstance(m, LAYERS):
                paths.append(".".join(p for p in (root, name) if p))
    if not paths:
        raise DistilleryError("quantize method dq: no linear or convolution layer to quantize; name modules that "
                              "hold some (quantize.modules).")
    return paths


def prepare(model: nn.Module, bits: int, bucket: int, modules: list[str] | None = None,
            points: list[int] | None = None) -> list[str]:
    """Wrap every linear and convolution layer of ``model`` (under ``modules``) in place; their paths.
    ``points``: each layer's point count (``allocate_points``; default 2^bits each). Only the points train
    afterwards (every other parameter is frozen)."""
    paths = layers(model, modules)
    if points is not None and len(points) != len(paths):
        raise DistilleryError(f"dq: {len(points)} point counts for {len(paths)} layers.")
    for p in model.parameters():
        p.requires_grad_(False)
    for i, path in enumerate(paths):
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, attr, DQLayer(getattr(parent, attr), bits, bucket, None if points is None else points[i]))
    return paths


def save(model: nn.Module, path: str | Path, meta: dict) -> Path:
    """The quantized model: for each DQ layer its point indices (uint8, or wider past 256 points), points,
    alpha and beta; every other tensor as it is (biases, norms, float layers)."""
    from ..io import save_with_record

    tensors: dict[str, Tensor] = {}
    dq = {n: m for n, m in model.named_modules() if isinstance(m, DQLayer)}
    for name, m in dq.items():
        n = len(m.dq.points)
        kind = torch.uint8 if n <= 256 else torch.int16 if n <= 32768 else torch.int32
        tensors[f"{name}.weight.index"] = m.dq.index().to(kind)
        tensors[f"{name}.weight.points"] = m.dq.points.detach().clone()
        tensors[f"{name}.weight.alpha"] = m.dq.alpha.clone()
        tensors[f"{name}.weight.beta"] = m.dq.beta.clone()
    for key, t in model.state_dict().items():
        owner = next((n for n in dq if key.startswith(f"{n}.")), None)
        if owner is None:
            tensors[key] = t.clone()
        elif key == f"{owner}.layer.bias":
            tensors[f"{owner}.bias"] = t.clone()
    shapes = {n: list(m.dq.shape) for n, m in dq.items()}
    return save_with_record(path, tensors, {**meta, "dq_layers": shapes})


def load(model: nn.Module, path: str | Path, *, verify: bool = True) -> nn.Module:
    """A float ``model`` of the architecture with the weights the quantized file encodes (dequantized)."""
    from ..pipeline import read_weights

    tensors, record = read_weights(Path(path), verify=verify)
    shapes = record.get("dq_layers")
    if not shapes:
        raise DistilleryError(f"{path} holds no differentiably quantized layers (method dq).")
    state = {k: v for k, v in tensors.items() if ".weight." not in k}
    for name, shape in shapes.items():
        idx = tensors[f"{name}.weight.index"].long()
        q = tensors[f"{name}.weight.points"][idx] * tensors[f"{name}.weight.alpha"] + tensors[f"{name}.weight.beta"]
        n = int(torch.tensor(shape).prod())
        state[f"{name}.weight"] = q.reshape(-1)[:n].reshape(shape)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise DistilleryError(f"{path} does not fit the model: {str(e).splitlines()[0]}.") from None
    return model
