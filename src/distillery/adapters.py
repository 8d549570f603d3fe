"""Projection heads between a student tensor and a teacher tensor, sized by probing one batch.

Shapes here exclude the batch dimension:
  vectors (D,)        -> ``linear``  : Linear(D_s, D_t)
  tokens  (T, D)      -> ``linear``  : Linear(D_s, D_t) on the last dimension (T must match)
  maps    (C, L) / (C, H, W) -> ``conv1x1``: 1x1 convolution C_s -> C_t, then the spatial size is
                         resized to the teacher's (adaptive average pooling when the student's is
                         larger, bilinear / linear interpolation when smaller)
  ``mlp``             : two layers with a ReLU (Linear or 1x1 conv, hidden width = teacher's)
  ``none``            : identity (the shapes must already agree, unless the loss compares
                         different widths itself, e.g. ``similarity`` or ``rkd``)
``auto`` picks ``none`` when the shapes agree (or the loss takes different widths), else
``linear`` for vectors and tokens and ``conv1x1`` for maps.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .errors import DistilleryError

KINDS = ("auto", "none", "linear", "conv1x1", "mlp")


class Resize(nn.Module):
    """Bring a (N, C, *spatial) map to the teacher's spatial size."""

    def __init__(self, size: tuple[int, ...]):
        super().__init__()
        self.size = tuple(size)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[2:]) == self.size:
            return x
        if all(a >= b for a, b in zip(x.shape[2:], self.size)):
            pool = F.adaptive_avg_pool1d if len(self.size) == 1 else F.adaptive_avg_pool2d
            return pool(x, self.size)
        mode = "linear" if len(self.size) == 1 else "bilinear"
        return F.interpolate(x, size=self.size, mode=mode, align_corners=False)


def resolve(kind: str, s: tuple[int, ...], t: tuple[int, ...], different_widths_ok: bool = False) -> str:
    """The concrete adapter ``auto`` stands for. A 2-D shape is ambiguous: (T, D) tokens when the
    first dimension agrees (project the last), else a (C, L) map (project the channels)."""
    if kind != "auto":
        return kind
    if s == t or different_widths_ok:
        return "none"
    if len(s) == 1 or (len(s) == 2 and len(t) == 2 and s[0] == t[0]):
        return "linear"
    return "conv1x1"


def build(kind: str, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], *, where: str,
          different_widths_ok: bool = False) -> nn.Module:
    """The adapter of ``kind`` from ``student_shape`` to ``teacher_shape`` (batch dimension excluded).

    ``linear`` and ``mlp`` on 2-D shapes treat them as (T, D) tokens; ``conv1x1`` as (C, L) maps."""
    s, t = tuple(student_shape), tuple(teacher_shape)
    if kind not in KINDS:
        raise DistilleryError(f"{where}: adapter {kind!r} is not known; use one of {', '.join(KINDS)}.")
    kind = resolve(kind, s, t, different_widths_ok)
    if kind == "none":
        if s != t and not different_widths_ok:
            raise DistilleryError(f"{where}: adapter none, but student {s} and teacher {t} differ in shape; "
                                  "use adapter: auto (or linear / conv1x1) to project the student.")
        return nn.Identity()
    if len(s) != len(t) or len(s) > 3:
        raise DistilleryError(f"{where}: no adapter maps student {s} to teacher {t}; tap modules whose outputs "
                              "have the same layout: vectors (D,), tokens (T, D) or maps (C, L) / (C, H, W).")
    if kind in ("linear", "mlp") and len(s) <= 2:
        if len(s) == 2 and s[0] != t[0]:
            raise DistilleryError(f"{where}: student has {s[0]} tokens, teacher {t[0]}; a linear adapter maps "
                                  "widths only: tap layers with the same token count, or use conv1x1 for (C, L) maps.")
        if kind == "linear":
            return nn.Linear(s[-1], t[-1])
        return nn.Sequential(nn.Linear(s[-1], t[-1]), nn.ReLU(), nn.Linear(t[-1], t[-1]))
    if len(s) == 1:
        raise DistilleryError(f"{where}: adapter {kind} needs feature maps (C, L) or (C, H, W), got vectors {s}; use linear.")
    if kind == "linear":
        raise DistilleryError(f"{where}: adapter linear on (C, H, W) maps; use conv1x1 (or mlp).")
    conv = nn.Conv1d if len(s) == 2 else nn.Conv2d
    if kind == "conv1x1":
        proj: nn.Module = conv(s[0], t[0], 1)
    else:  # mlp on maps
        proj = nn.Sequential(conv(s[0], t[0], 1), nn.ReLU(), conv(t[0], t[0], 1))
    return nn.Sequential(proj, Resize(t[1:])) if s[1:] != t[1:] else proj
