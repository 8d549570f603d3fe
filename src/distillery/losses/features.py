"""Feature and relation distillation losses: pure functions over intermediate tensors, by name.

Every loss here has the signature::

    fn(student_features: Tensor, teacher_features: Tensor, *, **params) -> Tensor  # scalar

- Shapes (the batch dimension N first, always): vectors (N, D), tokens (N, T, D), 1-D maps
  (N, C, L) or 2-D maps (N, C, H, W), as each docstring states. Anything else raises
  ``LossInputError`` naming the shapes it got and the fix. Student and teacher must have the
  same batch size N.
- Inputs are already adapted: where a method has a projection head (FitNets' regressor, the
  1x1 conv in front of ACAM-KD's masks) the caller applied it, so the shapes can be compared.
  Spatial sizes are never resized here; the integrator pools (``F.adaptive_avg_pool2d``).
- Learned parts of a method live in a small ``nn.Module`` attached as ``fn.state``; the
  integrator builds it once as ``fn.state(student_shape, teacher_shape, **params)`` (shapes
  without N), trains and checkpoints it with the student, and calls ``fn(s, t, state=module,
  **params)``. Here: ``acam`` (``ACAMMaskGenerator``) and ``mi_alpha`` (``MIAlphaCritic``).
- Computation runs in float32 or higher (half and bfloat16 are upcast, float64 stays float64,
  and autocast is switched off inside every loss, so an AMP region does not run the Gram
  matrices or the attention in half precision), and every division that can meet 0 / 0
  carries the eps of the reference code (named in each docstring).
- One reduction for all: each loss forms one value per sample (N,) and ``_reduce`` takes the
  batch mean, which equals the reference codes' mean over all elements.
- Gradients flow to both inputs; the teacher is not detached here (compute it under
  ``no_grad``), so online regimes can choose for themselves.
- ``different_widths=True`` at registration marks the losses that compare student and teacher of different
  widths themselves (attention, nst: channel counts; similarity, mi_alpha: feature dims), so the
  objective's ``auto`` adapter leaves their student unprojected.
- Weights RepDistiller used on CIFAR-100 (``scripts/run_cifar_distill.sh``, KD off): FitNet 100,
  AT 1000, SP 3000, NST 50.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import register
from .logits import LossInputError, _positive

VECTORS = "vectors (N, D)"
TOKENS = "tokens (N, T, D)"
MAPS_1D = "1-D maps (N, C, L)"
MAPS_2D = "2-D maps (N, C, H, W)"
# The arguments of `_prepare` for map losses whose channel counts may differ (attention, nst).
_MAPS_SAME_SPATIAL = dict(
    ndims=(3, 4),
    accepted=f"{MAPS_1D} or {MAPS_2D}",
    fix="Reshape vectors or tokens into maps, e.g. tokens (N, T, D) -> (N, D, T).",
    same_spatial=True,
)
ANY = "features (N, ...) with at least 2 dimensions"
HINT_METRICS = ("mse", "l1", "cosine", "smooth_l1")
NORMALIZE_EPS = 1e-12  # F.normalize's default, as RepDistiller's AT / SP / NST
COSINE_EPS = 1e-8  # F.cosine_similarity's default
MASK_EPS = 1e-5  # MasKD's mask-sum eps (hunto/MasKD ``MasKDLoss``)
DICE_EPS = 1e-12  # MasKD's ``dice_coeff`` eps


# ---------------------------------------------------------------------------------------------
# validation


def _prepare(
    loss: str,
    student: Tensor,
    teacher: Tensor,
    *,
    ndims: Sequence[int] | None,
    accepted: str,
    fix: str,
    same_shape: bool = False,
    same_spatial: bool = False,
    min_batch: int = 1,
) -> tuple[Tensor, Tensor]:
    """Check both inputs, then upcast to one float dtype of at least float32.

    ``ndims``: allowed numbers of dimensions (None: any >= 2); ``accepted`` names the shapes and
    ``fix`` says what to do when the dimensions are wrong. ``same_shape``: student and teacher
    shapes must be equal; ``same_spatial``: equal beyond the channel dimension (maps).
    """
    for name, x in (("student_features", student), ("teacher_features", teacher)):
        if not isinstance(x, Tensor):
            raise LossInputError(
                f"{loss}: {name} must be a torch.Tensor of {accepted}, got {type(x).__name__}."
            )
        if (x.dim() not in ndims) if ndims is not None else (x.dim() < 2):
            raise LossInputError(f"{loss}: {name} must be {accepted}; got shape {tuple(x.shape)}. {fix}")
        if not x.is_floating_point():
            raise LossInputError(f"{loss}: {name} must be floating point, got {x.dtype}.")
    s_shape, t_shape = tuple(student.shape), tuple(teacher.shape)
    if s_shape[0] != t_shape[0]:
        raise LossInputError(
            f"{loss}: student_features {s_shape} and teacher_features {t_shape} have different batch "
            "sizes; both must hold the same N samples in the same order."
        )
    if s_shape[0] < min_batch:
        raise LossInputError(f"{loss} needs a batch of at least {min_batch} samples, got N={s_shape[0]}.")
    if same_shape and s_shape != t_shape:
        raise LossInputError(
            f"{loss}: student_features {s_shape} and teacher_features {t_shape} must have the same shape; "
            "give the term an adapter (a projection head such as a 1x1 conv or a linear layer) that maps "
            "the student to the teacher's shape, and pool maps to one spatial size."
        )
    if same_spatial and (student.dim() != teacher.dim() or s_shape[2:] != t_shape[2:]):
        raise LossInputError(
            f"{loss}: student_features {s_shape} and teacher_features {t_shape} must have the same spatial "
            f"size (channel counts may differ); resize the larger one with F.adaptive_avg_pool2d(x, "
            f"{tuple(t_shape[2:])}) (adaptive_avg_pool1d for (N, C, L) maps) before this loss."
        )
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    return student.to(dtype), teacher.to(dtype)


def _check_state(loss: str, state: object, cls: type, fn_name: str) -> nn.Module:
    if state is None:
        raise LossInputError(
            f"{loss} has learned parameters and needs `state`: build {cls.__name__}(student_shape, "
            f"teacher_shape, **params) once (shapes without the batch dimension), train and checkpoint it "
            f"with the student, and call {fn_name}(s, t, state=module, **params)."
        )
    if not isinstance(state, cls):
        raise LossInputError(f"{loss}: state must be a {cls.__name__}, got {type(state).__name__}.")
    return state


def _state_shapes(loss: str, student_shape: object, teacher_shape: object) -> tuple[tuple, tuple]:
    if student_shape is None or teacher_shape is None:
        raise LossInputError(
            f"{loss} compares the student with the teacher; its state needs both shapes, got student "
            f"{student_shape}, teacher {teacher_shape}. Give the term a teacher tap."
        )
    return tuple(student_shape), tuple(teacher_shape)




# ---------------------------------------------------------------------------------------------
# shared pieces


def _reduce(per_sample: Tensor) -> Tensor:
    """Per-sample losses (N,) -> batch mean, the one reduction every loss here uses."""
    return per_sample.mean()


def _flat(x: Tensor) -> Tensor:
    """(N, ...) -> (N, D)."""
    return x.reshape(x.shape[0], -1)


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` computed in x's dtype (float32 or float64), whatever the layer's dtype."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.weight.to(x.dtype), bias)


def _flat_pair(loss: str, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Student and teacher features of one shape (N, ...), checked and upcast, as (N, D) rows."""
    s, t = _prepare(loss, student, teacher, ndims=None, accepted=ANY,
                    fix="Add the batch dimension first: (D,) -> (1, D).", same_shape=True)
    return _flat(s), _flat(t)


def _no_autocast(x: Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


# ---------------------------------------------------------------------------------------------
# FitNets


@register("hint")
def hint(student_features: Tensor, teacher_features: Tensor, *, metric: str = "mse") -> Tensor:
    """FitNets hint loss (Romero, Ballas, Kahou, Chassang, Gatta & Bengio, ICLR 2015).

    Distance between the (regressor-adapted) student features and the teacher's hint features:
    - ``"mse"``: mean over all elements of (s - t)^2, as RepDistiller's ``HintLoss``
      (``nn.MSELoss()``). The paper writes 1/2 ||t - r(s)||^2 (a sum with a 1/2); we follow the
      code, so the paper's value is 0.5 * numel * ours.
    - ``"l1"``: mean |s - t|; ``"smooth_l1"``: mean Huber with beta = 1 (``nn.SmoothL1Loss``).
    - ``"cosine"``: 1 - cos(s_i, t_i) over each sample's flattened features, batch mean, with
      each norm clamped at 1e-8 (``F.cosine_similarity``), so an all-zero sample gives 1, not NaN.
    The regressor is the caller's adapter. RepDistiller weight: 100 (KD off).
    Shapes: any (N, ...) with at least 2 dimensions, equal for student and teacher -> scalar.
    """
    if metric not in HINT_METRICS:
        raise LossInputError(
            f"hint: unknown metric {metric!r}; use one of {', '.join(map(repr, HINT_METRICS))}."
        )
    s, t = _flat_pair("hint", student_features, teacher_features)
    with _no_autocast(s):
        if metric == "cosine":
            s_unit = s / torch.linalg.vector_norm(s, dim=1, keepdim=True).clamp_min(COSINE_EPS)
            t_unit = t / torch.linalg.vector_norm(t, dim=1, keepdim=True).clamp_min(COSINE_EPS)
            rows = 1.0 - (s_unit * t_unit).sum(1)
        elif metric == "mse":
            rows = (s - t).pow(2).mean(1)
        elif metric == "l1":
            rows = (s - t).abs().mean(1)
        else:
            rows = F.smooth_l1_loss(s, t, reduction="none", beta=1.0).mean(1)
        return _reduce(rows)


@register("normalized_mse")
def normalized_mse(student_features: Tensor, teacher_features: Tensor, *, eps: float = NORMALIZE_EPS) -> Tensor:
    """LAPTOP-Diff's normalised feature distillation term (Zhang et al., arXiv 2404.11098): the squared
    distance to the teacher's feature map over that map's squared L2 norm, per sample,

        L_i = ||s_i - t_i||_2^2 / max(||t_i||_2^2, eps),

    batch mean. Each term is thus a relative error (1 for a student that outputs zeros), whatever its layer's
    magnitude, so no numerically large feature map dominates a sum over layers (the imbalance the paper
    names). The paper reweights each feature term by the L2 norm of the teacher's feature map; the per-sample norm (each sample
    weighs the same at every noise level) is ours. An all-zero teacher map divides by eps (1e-12).
    Shapes: any (N, ...) with at least 2 dimensions, equal for student and teacher -> scalar.
    """
    s, t = _flat_pair("normalized_mse", student_features, teacher_features)
    with _no_autocast(s):
        return _reduce((s - t).pow(2).sum(1) / t.pow(2).sum(1).clamp_min(eps))


# ---------------------------------------------------------------------------------------------
# attention transfer


def _attention_map(f: Tensor, p: float) -> Tensor:
    """(N, C, *spatial) -> (N, prod(spatial)): mean_c |F_c|^p, flattened, L2-normalised (eps 1e-12)."""
    a = f.abs().pow(p).mean(1).reshape(f.shape[0], -1)
    return F.normalize(a, dim=1, eps=NORMALIZE_EPS)


@register("attention", different_widths=True)
def attention(student_features: Tensor, teacher_features: Tensor, *, p: float = 2.0) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

    Q = vec(sum_c |F_c|^p) / ||vec(sum_c |F_c|^p)||_2 per sample (we take the mean over channels,
    as RepDistiller's ``at``; the normalisation makes sum and mean the same map);
    loss = mean over batch and positions of (Q_s - Q_t)^2, as RepDistiller's ``Attention``
    (``(at(s) - at(t)).pow(2).mean()``, F.normalize eps 1e-12, so an all-zero map is 0, not NaN).
    Paper vs code: the paper uses beta/2 * sum_j ||Q_s - Q_t||_p (a p-norm per layer, not
    squared, beta = 1000 / (number of elements of the map)); we follow the code, which squares
    and averages; RepDistiller's weight is 1000 (KD off). We use |F|^p as the paper does
    (RepDistiller writes F^p, the same for the default p = 2).
    Invariant to scaling either input by a positive constant. Channel counts may differ (the map
    sums over channels); spatial sizes must match (the integrator resizes).
    Shapes: (N, Cs, L), (N, Ct, L) or (N, Cs, H, W), (N, Ct, H, W) -> scalar.
    """
    p = _positive("attention", "p", p)
    if p < 1:
        raise LossInputError(
            f"attention: p must be >= 1 (|F|^p has an infinite gradient at 0 below 1), got {p}."
        )
    s, t = _prepare("attention", student_features, teacher_features, **_MAPS_SAME_SPATIAL)
    with _no_autocast(s):
        rows = (_attention_map(s, p) - _attention_map(t, p)).pow(2).mean(1)
        return _reduce(rows)


# ---------------------------------------------------------------------------------------------
# similarity-preserving KD


def _row_normalised_gram(f: Tensor) -> Tensor:
    """(N, ...) -> (N, N): G = F F^T over flattened samples, each row L2-normalised (eps 1e-12)."""
    flat = _flat(f)
    return F.normalize(flat @ flat.T, dim=1, eps=NORMALIZE_EPS)


@register("similarity", different_widths=True)
def similarity(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019).

    G = F F^T with F the (N, D) flattened per-sample features, every row L2-normalised;
    loss = ||G_s - G_t||_F^2 / N^2. Follows the paper (Eq. 3-4) and RepDistiller's ``Similarity``
    ("verified by original author"), with F.normalize's eps 1e-12 so an all-zero sample gives a
    zero row, not NaN. RepDistiller weight: 3000 (KD off); the paper uses gamma = 3000 on CIFAR.
    A relation loss: student and teacher dims may differ, only the N x N Gram is compared.
    Invariant to scaling either input by a positive constant.
    Shapes: (N, ...) and (N, ...) with at least 2 dimensions each (vectors, tokens, maps) -> scalar.
    """
    s, t = _prepare(
        "similarity",
        student_features,
        teacher_features,
        ndims=None,
        accepted=ANY,
        fix="Add the batch dimension first: (D,) -> (1, D).",
    )
    n = s.shape[0]
    with _no_autocast(s):
        rows = (_row_normalised_gram(s) - _row_normalised_gram(t)).pow(2).sum(1) / n  # mean -> / N^2
        return _reduce(rows)


# ---------------------------------------------------------------------------------------------
# neuron selectivity transfer


def _poly2_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """mean_{i,j} (a_i . b_j)^2 per sample: (N, Ca, P), (N, Cb, P) -> (N,)."""
    return (a @ b.transpose(1, 2)).pow(2).mean((1, 2))


@register("nst", different_widths=True)
def nst(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Neuron selectivity transfer (Huang & Wang, "Like What You Like: KD via NST", arXiv 2017).

    Each channel's spatial activation vector is L2-normalised (F.normalize over positions, eps
    1e-12); the loss is the squared MMD with the polynomial kernel k(x, y) = (x . y)^2 (d = 2,
    c = 0) between the sets of student and teacher channel vectors:
        mean_{i,i'} k(s_i, s_i') + mean_{j,j'} k(t_j, t_j') - 2 mean_{i,j} k(s_i, t_j),
    per sample, batch mean. Follows RepDistiller's ``NSTLoss`` (full loss); the paper writes the
    same with a beta/2 weight (RepDistiller uses 50, KD off). RepDistiller detaches the
    teacher-only term; we do not (same value; compute the teacher under no_grad).
    Channel counts may differ; spatial sizes must match (the integrator resizes). Invariant to
    scaling either input by a positive constant.
    Shapes: (N, Cs, L), (N, Ct, L) or (N, Cs, H, W), (N, Ct, H, W) -> scalar.
    """
    s, t = _prepare("nst", student_features, teacher_features, **_MAPS_SAME_SPATIAL)
    with _no_autocast(s):
        s = F.normalize(s.flatten(2), dim=2, eps=NORMALIZE_EPS)  # (N, Cs, P)
        t = F.normalize(t.flatten(2), dim=2, eps=NORMALIZE_EPS)  # (N, Ct, P)
        rows = _poly2_kernel_mean(s, s) + _poly2_kernel_mean(t, t) - 2.0 * _poly2_kernel_mean(s, t)
        return _reduce(rows)


# ---------------------------------------------------------------------------------------------
# ACAM-KD


def _dice_diversity(masks: Tensor) -> Tensor:
    """Mean pairwise Dice coefficient between different masks, (N, M, K) -> (N,); 0 when M = 1.

    2 <m_i, m_j> / (|m_i|^2 + |m_j|^2) over the pairs i != j, as MasKD's ``dice_coeff`` (eps 1e-12).
    """
    m = masks.shape[1]
    if m < 2:
        return masks.sum((1, 2)) * 0.0
    inner = masks @ masks.transpose(1, 2)  # (N, M, M)
    sq = torch.diagonal(inner, dim1=1, dim2=2) + DICE_EPS  # (N, M)
    dice = 2.0 * inner / (sq.unsqueeze(1) + sq.unsqueeze(2))
    off = ~torch.eye(m, dtype=torch.bool, device=masks.device)
    return dice[:, off].mean(1)


class ACAMMaskGenerator(nn.Module):
    """ACAM-KD's learned parts: the STCA-FF cross-attention and the ASCM mask selection units.

    ``ACAMMaskGenerator(student_shape, teacher_shape, *, num_masks=6, **_)`` with shapes without
    the batch dimension, (C, L) or (C, H, W), equal for student and teacher (the student is
    adapted first). For teacher tokens t_p and student tokens s_p (positions p of the map, C
    channels each), with C_q = max(C // 2, 1):
        Q = W_q t + b_q (C -> C_q), K = W_k s (C -> C_q), V = W_v s + b_v (C -> C)   (1x1 convs),
        F_fused = softmax_p'(Q K^T / sqrt(C_q)) V     (P x P attention over positions, no residual),
        spatial masks M^s_{m,p} = sigmoid(m_s[m] . F_fused[p])  -> (N, M, P),  m_s in R^{M x C},
        channel masks M^c_{m,k} = sigmoid(m_c[m] * v_k)         -> (N, M, C),  m_c in R^M,
    where v = mean_p F_fused (N, C) is the spatially average-pooled fused map. Parameters:
    ``query``, ``key``, ``value`` (Linear), ``spatial_unit`` (Linear(C, M, bias=False)) and
    ``channel_scale`` (M,), initialised U(-1, 1) (as ``nn.Linear(1, M)``'s weight), so that the
    masks start different. Neither selection unit has a bias (the paper's notes show none); K
    has none either (it would add q . b_k to a whole attention row, which the softmax removes).
    With one scalar per mask, every channel mask is a monotone function of the same v: the
    channel masks can only rank channels by v_k in the same or the reverse order, differing in
    sharpness; that is the unit as the notes describe it. Memory grows as P^2 per sample.
    """

    def __init__(
        self, student_shape: Sequence[int], teacher_shape: Sequence[int], *, num_masks: int = 6, **_
    ):
        super().__init__()
        student_shape, teacher_shape = _state_shapes("acam", student_shape, teacher_shape)
        if len(teacher_shape) not in (2, 3) or student_shape != teacher_shape:
            raise LossInputError(
                f"acam: the mask generator needs equal student and teacher map shapes without the batch "
                f"dimension, (C, L) or (C, H, W); got student {student_shape}, teacher {teacher_shape}. "
                "Give the term an adapter (1x1 conv) that maps the student to the teacher's channels."
            )
        if isinstance(num_masks, bool) or int(num_masks) != num_masks or num_masks < 1:
            raise LossInputError(f"acam: num_masks must be an integer >= 1, got {num_masks!r}.")
        c, m = teacher_shape[0], int(num_masks)
        self.channels, self.num_masks, self.attn_dim = c, m, max(c // 2, 1)
        self.query = nn.Linear(c, self.attn_dim)  # teacher -> query
        self.key = nn.Linear(c, self.attn_dim, bias=False)  # student -> key (a bias cancels in the softmax)
        self.value = nn.Linear(c, c)  # student -> value
        self.spatial_unit = nn.Linear(c, m, bias=False)  # m_s
        self.channel_scale = nn.Parameter(torch.empty(m).uniform_(-1.0, 1.0))  # m_c

    def forward(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C, *spatial) twice -> spatial masks (N, M, P) and channel masks (N, M, C), in [0, 1]."""
        t_tok = teacher.flatten(2).transpose(1, 2)  # (N, P, C)
        s_tok = student.flatten(2).transpose(1, 2)
        q, k, v = _linear(self.query, t_tok), _linear(self.key, s_tok), _linear(self.value, s_tok)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.attn_dim), dim=-1)  # (N, P, P)
        fused = attn @ v  # (N, P, C)
        spatial = torch.sigmoid(_linear(self.spatial_unit, fused)).transpose(1, 2)  # (N, M, P)
        pooled = fused.mean(1)  # (N, C)
        scale = self.channel_scale.to(pooled.dtype)
        channel = torch.sigmoid(scale.view(1, -1, 1) * pooled.unsqueeze(1))  # (N, M, C)
        return spatial, channel


@register("acam", state=ACAMMaskGenerator)
def acam(
    student_features: Tensor,
    teacher_features: Tensor,
    *,
    state: ACAMMaskGenerator | None = None,
    num_masks: int = 6,
    diversity_weight: float = 1.0,
) -> Tensor:
    """ACAM-KD (Lan & Tian, "ACAM-KD: Adaptive and Cooperative Attention Masking for KD", ICCV 2025, arXiv 2503.06307).

    With the masks of ``state`` (``ACAMMaskGenerator``: STCA-FF cross-attention with the teacher
    as query and the student as key / value, then the ASCM spatial and channel selection units)
    and D = (s - t)^2 of the adapted student s and the teacher t, per sample:
        L_spatial = 1/M sum_m  sum_{c,p} (M^s_{m,p})^2 D_{c,p} / (C (sum_p M^s_{m,p} + 1e-5)),
        L_channel = 1/M sum_m  sum_{c,p} (M^c_{m,c})^2 D_{c,p} / (P (sum_c M^c_{m,c} + 1e-5)),
        L_div     = Dice(M^s) + Dice(M^c)  (mean over the pairs i != j of 2<m_i, m_j> / (|m_i|^2 + |m_j|^2)),
        loss      = L_spatial + L_channel + diversity_weight * L_div,   batch mean.
    Sources: notes on the paper (no official code exists) and MasKD (Huang et al. 2022;
    hunto/MasKD, mmrazor ``maskd.py``), which ACAM-KD builds on. Following them: the mask sits
    inside the norm, ||M_m (F_T - F_S)||^2 (MasKD: (M s - M t)^2), hence the squared mask; the
    channel term's normalisation 1/(P sum_k M^c_{m,k}) (the spatial term is its mirror, as
    MasKD's 1/sum_p M); M = 6 (the paper's detection setting, MasKD's num_tokens = 6); the
    diversity loss in MasKD's Dice form with weight 1 (the paper's lambda = 1, alpha = 1); the
    mask-sum eps 1e-5 and Dice eps 1e-12 (MasKD); the units' forms (see ``ACAMMaskGenerator``:
    attention dim C // 2, value C -> C, teacher as query, which the paper's ablation finds
    best). Our choices: biases on Q and V (1x1 convs), no residual around the attention, the
    U(-1, 1) init of m_c, no bias in either unit, and the mean over masks and batch.
    Training of the masks: the paper gives only the joint objective and does not say how the
    mask units are trained; here they are trained by this loss itself, with the student. Risk:
    sum (M^2 D) / sum M scales with the mask scale, so the masked terms fall as all masks
    shrink towards 0 (the Dice term is scale-free and does not stop it); masks trained by this
    loss alone can collapse, weakening the feature terms. Watch the mask means, or train the
    units with a separate objective if they do.
    Identical inputs give exactly diversity_weight * L_div (the masked feature terms are 0).
    Shapes: (N, C, L), (N, C, L) or (N, C, H, W), (N, C, H, W), equal -> scalar.
    """
    gen = _check_state("acam", state, ACAMMaskGenerator, "acam")
    w_div = float(diversity_weight)
    if not (math.isfinite(w_div) and w_div >= 0):
        raise LossInputError(
            f"acam: diversity_weight must be a finite number >= 0, got {diversity_weight!r}."
        )
    s, t = _prepare(
        "acam",
        student_features,
        teacher_features,
        ndims=(3, 4),
        accepted=f"{MAPS_1D} or {MAPS_2D}",
        fix="ACAM-KD masks dense maps; reshape tokens (N, T, D) -> (N, D, T).",
        same_shape=True,
    )
    if gen.channels != s.shape[1] or gen.num_masks != num_masks:
        raise LossInputError(
            f"acam: state was built for C={gen.channels}, num_masks={gen.num_masks} but got C={s.shape[1]}, "
            f"num_masks={num_masks}; build it with the same shapes and params as the loss."
        )
    with _no_autocast(s):
        spatial, channel = gen(s, t)  # (N, M, P), (N, M, C)
        diff2 = (s - t).pow(2).flatten(2)  # (N, C, P)
        c, p = diff2.shape[1:]
        per_pos = diff2.sum(1)  # (N, P): sum over channels
        per_ch = diff2.sum(2)  # (N, C): sum over positions
        # (N, M): mask squared (it sits inside the norm), normalised by the mask sum
        l_spatial = (spatial.pow(2) * per_pos.unsqueeze(1)).sum(2) / (c * (spatial.sum(2) + MASK_EPS))
        l_channel = (channel.pow(2) * per_ch.unsqueeze(1)).sum(2) / (p * (channel.sum(2) + MASK_EPS))
        rows = l_spatial.mean(1) + l_channel.mean(1)
        if w_div > 0:
            rows = rows + w_div * (_dice_diversity(spatial) + _dice_diversity(channel))
        return _reduce(rows)




# ---------------------------------------------------------------------------------------------
# MI-alpha (Distiller)


MI_CRITICS = ("mlp", "cosine")
MI_POOLS = ("mean", "first")


def _mlp(layers: nn.Module, x: Tensor) -> Tensor:
    """A stack of Linear / ReLU layers (or one Linear) applied in x's dtype."""
    if isinstance(layers, nn.Linear):
        return _linear(layers, x)
    for layer in layers:
        x = _linear(layer, x) if isinstance(layer, nn.Linear) else torch.relu(x)
    return x


def _three_layer_mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """Linear(d_in, hidden) ReLU Linear(hidden, hidden) ReLU Linear(hidden, d_out), as Distiller's 'mlp'."""
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out)
    )


def _choice(loss: str, name: str, value: object, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise LossInputError(f"{loss}: unknown {name} {value!r}; use one of {', '.join(map(repr, allowed))}.")
    return str(value)


def _size(loss: str, name: str, value: object) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise LossInputError(f"{loss}: {name} must be an integer >= 1, got {value!r}.")
    return int(value)


class MIAlphaCritic(nn.Module):
    """The learned critic and log-baseline of ``mi_alpha``.

    ``MIAlphaCritic(student_shape, teacher_shape, *, critic="mlp", hidden_dim=512, embed_dim=64, **_)``
    with shapes without the batch dimension, (D,) for vectors or (T, D) for tokens (student and
    teacher D may differ; tokens are pooled by the loss, so only D is used).
    - ``critic="mlp"`` (Distiller's 'mlp' critic): separable f(s, t) = <g(s), h(t)>, g and h each
      Linear(D, hidden) ReLU Linear(hidden, hidden) ReLU Linear(hidden, embed_dim)
      (``student_net``, ``teacher_net``), no normalisation, no temperature; log-baseline
      a(t) = Linear(hidden, 1)(ReLU(Linear(D_t, hidden)(t))) (``baseline``, teacher only).
    - ``critic="cosine"`` (our option, bounded scores |f| <= 1 / tau): f(s, t) = <g(s), h(t)> / tau
      on L2-normalised g(s) = W_g s, h(t) = W_h t of size embed_dim; a(t) = w_a . h(t)/|h(t)| + b_a.
    """

    def __init__(
        self,
        student_shape: Sequence[int],
        teacher_shape: Sequence[int],
        *,
        critic: str = "mlp",
        hidden_dim: int = 512,
        embed_dim: int = 64,
        **_,
    ):
        super().__init__()
        student_shape, teacher_shape = _state_shapes("mi_alpha", student_shape, teacher_shape)
        if len(student_shape) not in (1, 2) or len(teacher_shape) not in (1, 2):
            raise LossInputError(
                f"mi_alpha: the critic needs vector (D,) or token (T, D) shapes without the batch "
                f"dimension; got student {student_shape}, teacher {teacher_shape}. Pool or flatten maps first."
            )
        self.critic = _choice("mi_alpha", "critic", critic, MI_CRITICS)
        self.hidden_dim = _size("mi_alpha", "hidden_dim", hidden_dim)
        self.embed_dim = _size("mi_alpha", "embed_dim", embed_dim)
        self.student_dim, self.teacher_dim = int(student_shape[-1]), int(teacher_shape[-1])
        h, e = self.hidden_dim, self.embed_dim
        if self.critic == "mlp":
            self.student_net = _three_layer_mlp(self.student_dim, h, e)
            self.teacher_net = _three_layer_mlp(self.teacher_dim, h, e)
            self.baseline = nn.Sequential(nn.Linear(self.teacher_dim, h), nn.ReLU(), nn.Linear(h, 1))
        else:
            self.student_net = nn.Linear(self.student_dim, e)
            self.teacher_net = nn.Linear(self.teacher_dim, e)
            self.baseline = nn.Linear(e, 1)

    def forward(self, student: Tensor, teacher: Tensor, temperature: float = 0.1) -> tuple[Tensor, Tensor]:
        """(B, Ds), (B, Dt) -> scores S[i, j] = f(s_i, t_j) (B, B) and log-baselines a(t_j) (B,).

        ``temperature`` is used by the cosine critic only.
        """
        g, h = _mlp(self.student_net, student), _mlp(self.teacher_net, teacher)
        if self.critic == "mlp":
            return g @ h.T, _mlp(self.baseline, teacher).squeeze(1)
        g = F.normalize(g, dim=1, eps=NORMALIZE_EPS)
        h = F.normalize(h, dim=1, eps=NORMALIZE_EPS)
        return g @ h.T / temperature, _linear(self.baseline, h).squeeze(1)


@register("mi_alpha", state=MIAlphaCritic, different_widths=True)
def mi_alpha(
    student_features: Tensor,
    teacher_features: Tensor,
    *,
    state: MIAlphaCritic | None = None,
    alpha: float = 0.5,
    critic: str = "mlp",
    hidden_dim: int = 512,
    embed_dim: int = 64,
    temperature: float = 0.1,
    pool: str = "mean",
) -> Tensor:
    """MI-alpha intermediate objective of Distiller (He, Shi, Mueller, Zha, Li & Karypis, "Distiller:
    A Systematic Study of Model Distillation Methods in NLP", SustaiNLP workshop at EMNLP 2021).

    loss = -I_alpha, the interpolated MI lower bound of Poole et al. (ICML 2019) between student
    x = s and teacher y = t, with critic scores S[i, j] = f(s_i, t_j) and log-baseline a_j = a(t_j):
        b_j     = log(alpha * m_j     + (1 - alpha) * e^{a_j}),  m_j     = 1/N     sum_i      e^{S[i,j]}
        b_j^loo = log(alpha * m_j^loo + (1 - alpha) * e^{a_j}),  m_j^loo = 1/(N-1) sum_{i!=j} e^{S[i,j]}
        I_alpha = 1 + mean_j (S[j,j] - b_j) - mean_j mean_{i!=j} e^{S[i,j] - b_j^loo}.
    Source: Distiller's code (a TextBrewer fork). Its ``mi_loss`` returns
    -interpolated_lower_bound(scores, log_baseline, alpha_logit) of Poole et al.'s code; its
    ``Critic`` is 'mlp' (3 linear layers with ReLU, hidden 512, out 64, one per side, separable
    dot-product critic without normalisation or temperature) or 'transformer'; the baseline is a
    teacher-only network with out_dim 1; the CLI default is --alpha 0.5, its search grid
    {0, 0.1, 0.5, 0.9, 1.0}, and the active search favours 0.9 (try ``alpha=0.9``). It scores
    whole sequences (a B x B matrix), not tokens.
    What follows Distiller: the bound, the default separable MLP critic (``critic="mlp"``,
    hidden_dim 512, embed_dim 64, see ``MIAlphaCritic``), a learned teacher-only log-baseline,
    alpha = 0.5, one score per sample pair. Our choices: the baseline's layers
    (D_t -> hidden -> 1); the optional bounded ``critic="cosine"`` (tau = ``temperature``, 0.1,
    used by that critic only); no 'transformer' critic; token inputs (N, T, D) reduced to (N, D)
    per side before the critic by ``pool="mean"`` (mean over T, our default) or ``"first"``
    (token 0, e.g. [CLS]), so T may differ between the sides; alpha is the mixture weight
    itself in [0, 1] (Poole's function takes its logit). The estimator is ours in layout: the
    marginal term is Poole's (the N - 1 samples independent of t_j, leave one out); the joint
    term uses the full N-sample mean m_j, where Poole's code averages N - 1 leave-one-out means,
    so here alpha = 1 is exactly InfoNCE (marginal term 1) and alpha = 0 is TUBA with the learned
    baseline (NWJ when a = 1). Everything runs in log space (logsumexp, logaddexp).
    Range: for alpha > 0 the marginal term is at most 1/alpha; at alpha = 0 with the unbounded
    MLP critic e^{S - a} is unbounded and can overflow for large scores (use alpha > 0 or the
    cosine critic). Needs ``state`` (``mi_alpha.state``) built with the same critic params.
    Shapes: (N, Ds) or (N, Ts, Ds), and (N, Dt) or (N, Tt, Dt) -> scalar; needs N >= 2.
    """
    net = _check_state("mi_alpha", state, MIAlphaCritic, "mi_alpha")
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise LossInputError(f"mi_alpha: alpha must lie in [0, 1], got {alpha!r}.")
    tau = _positive("mi_alpha", "temperature", temperature)
    kind = _choice("mi_alpha", "critic", critic, MI_CRITICS)
    how = _choice("mi_alpha", "pool", pool, MI_POOLS)
    s, t = _prepare(
        "mi_alpha",
        student_features,
        teacher_features,
        ndims=(2, 3),
        accepted=f"{VECTORS} or {TOKENS}",
        fix="Pool or flatten maps first: (N, C, H, W) -> (N, C) with x.mean((2, 3)).",
    )
    s, t = (x if x.dim() == 2 else (x.mean(1) if how == "mean" else x[:, 0]) for x in (s, t))
    b = s.shape[0]
    if b < 2:
        raise LossInputError("mi_alpha needs at least 2 samples: the other samples are the negatives.")
    built = (net.critic, net.student_dim, net.teacher_dim, net.embed_dim)
    if built != (kind, s.shape[1], t.shape[1], int(embed_dim)) or (
        kind == "mlp" and net.hidden_dim != int(hidden_dim)
    ):
        raise LossInputError(
            f"mi_alpha: state was built for critic={net.critic!r}, Ds={net.student_dim}, Dt={net.teacher_dim}, "
            f"hidden_dim={net.hidden_dim}, embed_dim={net.embed_dim} but got critic={kind!r}, Ds={s.shape[1]}, "
            f"Dt={t.shape[1]}, hidden_dim={hidden_dim}, embed_dim={embed_dim}; build it with the same shapes "
            "and params as the loss."
        )
    with _no_autocast(s):
        scores, log_base = net(s, t, tau)  # (B, B), (B,)
        off = ~torch.eye(b, dtype=torch.bool, device=scores.device)
        log_m = scores.logsumexp(0) - math.log(b)  # (B,) per teacher column j
        log_m_loo = scores.masked_fill(~off, -math.inf).logsumexp(0) - math.log(b - 1)
        if a == 1.0:
            b_joint, b_marg = log_m, log_m_loo
        elif a == 0.0:
            b_joint = b_marg = log_base
        else:
            la, l1a = math.log(a), math.log1p(-a)
            b_joint = torch.logaddexp(log_m + la, log_base + l1a)
            b_marg = torch.logaddexp(log_m_loo + la, log_base + l1a)
        joint = torch.diagonal(scores) - b_joint  # (B,)
        shifted = (scores - b_marg.unsqueeze(0)).masked_fill(~off, -math.inf)  # S[i, j] - b_j^loo
        marginal = (shifted.logsumexp(0) - math.log(b - 1)).exp()  # (B,) mean over i != j
        return _reduce(-(1.0 + joint - marginal))


