"""Feature and relation distillation losses: RKD, PKT, CRD, VID, TRG, cosine Gram.

Every loss here is a registered pure function::

    fn(student_features: Tensor, teacher_features: Tensor, *, **params) -> Tensor  # scalar

- Inputs are already adapted by the caller (a projection head, where the method has one) unless
  the method's own learned part is needed: CRD's embedding heads and memory bank and VID's
  per-channel variance live in a small ``nn.Module`` attached as ``fn.state``. The objective
  builds it once as ``fn.state(student_shape, teacher_shape, **params)`` (shapes without the
  batch dimension), trains and checkpoints it with the student, and calls
  ``fn(s, t, state=module, **params)``. Buffers (memory bank, Z, sampling seed and step) are
  ``register_buffer``s, so a checkpoint restores them and a resumed run draws the same negatives.
- ``crd`` is keyed by sample id: it is registered with ``needs_ids=True`` and takes ``ids`` (int64 (N,)).
- The losses couple the rows of a batch (pairs, triplets, graphs, a bank), so there is no
  per-row reduction and no row mask; each returns a scalar.
- Computation runs in float32 or higher (half and bfloat16 are upcast, autocast is switched off
  inside), with the reference code's eps wherever a 0/0 could appear. Shape errors raise
  ``LossInputError`` naming the shapes and the fix.
- Gradients flow to both inputs; the teacher is not detached here (compute it under
  ``no_grad``), as for the logit losses.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import register
from .logits import LossInputError, _positive

# ---------------------------------------------------------------------------------------------
# validation


def _check_pair(
    loss: str,
    student: object,
    teacher: object,
    *,
    shapes: str,
    ranks: Sequence[int] | None = None,
    min_rank: int = 2,
    fix: str = "",
    same_shape: bool = False,
    same_dims: tuple[int, ...] = (0,),
) -> tuple[Tensor, Tensor]:
    """Validate student / teacher features and upcast both to one dtype >= float32.

    ``ranks``: the allowed numbers of dimensions (else any >= ``min_rank``); ``same_dims``: the
    axes that must agree (the batch axis at least); ``same_shape``: the whole shape must agree.
    """
    for name, x in (("student_features", student), ("teacher_features", teacher)):
        if not isinstance(x, Tensor):
            raise LossInputError(
                f"{loss}: {name} must be a torch.Tensor of shape {shapes}, got {type(x).__name__}."
            )
        if (ranks is not None and x.dim() not in ranks) or x.dim() < min_rank:
            raise LossInputError(
                f"{loss}: {name} must be {shapes}, got shape {tuple(x.shape)}. {fix}".rstrip()
            )
        if not x.is_floating_point():
            raise LossInputError(f"{loss}: {name} must be floating point, got {x.dtype}.")
        if x.shape[0] == 0:
            raise LossInputError(f"{loss}: {name} is an empty batch (shape {tuple(x.shape)}).")
    s_shape, t_shape = tuple(student.shape), tuple(teacher.shape)
    if same_shape and s_shape != t_shape:
        raise LossInputError(
            f"{loss}: student_features {s_shape} and teacher_features {t_shape} must have the same shape "
            f"{shapes}; map the student to the teacher's shape with an adapter first."
        )
    for axis in same_dims:
        if student.dim() <= axis or teacher.dim() <= axis or s_shape[axis] != t_shape[axis]:
            what = "batch size N" if axis == 0 else f"size of axis {axis}"
            raise LossInputError(
                f"{loss}: student_features {s_shape} and teacher_features {t_shape} must agree in the {what}."
            )
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    return student.to(dtype), teacher.to(dtype)




def _non_negative(loss: str, name: str, value: float) -> float:
    v = float(value)
    if not (math.isfinite(v) and v >= 0):
        raise LossInputError(f"{loss}: {name} must be a finite number >= 0, got {value!r}.")
    return v


def _count(loss: str, name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < minimum:
        raise LossInputError(f"{loss}: {name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _state(loss: str, state: object, cls: type) -> nn.Module:
    if state is None:
        raise LossInputError(
            f"{loss} has learned state: build it once as {cls.__name__}(student_shape, teacher_shape, **params) "
            f"(shapes without the batch dimension; `{loss}.state` is that class), train and checkpoint it with "
            f"the student, and pass it as state=..."
        )
    if not isinstance(state, cls):
        raise LossInputError(
            f"{loss}: state must be a {cls.__name__} (`{loss}.state`), got {type(state).__name__}."
        )
    return state


def _full_precision(x: Tensor):
    """Autocast off for the loss body, so matmuls run in the (>= float32) input dtype."""
    kind = x.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def _max_abs_scaled(x: Tensor, dim: int | None = None) -> Tensor:
    """x / max|x| (detached; per row for ``dim=-1``). For losses that are invariant to a positive
    scale of their input this changes nothing but keeps squares finite up to the dtype's max."""
    peak = x.detach().abs().amax() if dim is None else x.detach().abs().amax(dim, keepdim=True)
    return x / peak.clamp_min(torch.finfo(x.dtype).tiny)


# ---------------------------------------------------------------------------------------------
# RKD


def _rkd_geometry(x: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Normalised pairwise distances (N, N) and triplet angle cosines (N, N, N) of (N, D) points.

    d_ij = sqrt(max(|x_i - x_j|^2, eps)) off the diagonal, 0 on it, divided by the mean over the
    N (N - 1) off-diagonal pairs; cos[i, j, k] = <e_ij, e_ik> with e_ij = (x_j - x_i) / |x_j - x_i|
    (a zero vector when j = i or x_j = x_i, with no gradient).
    """
    n = x.shape[0]
    diff = x.unsqueeze(0) - x.unsqueeze(1)  # (N, N, D), diff[i, j] = x_j - x_i
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    d = torch.where(off, diff.pow(2).sum(-1).clamp_min(eps).sqrt(), 0.0)
    d = d / (d.sum() / (n * (n - 1)))  # mean over off-diagonal pairs (>= sqrt(eps) > 0: no 0/0)
    # Unit edges; a degenerate edge (j = i, or two identical samples) is a zero vector with a zero
    # gradient: F.normalize would divide it by eps and send gradients of ~1/eps back.
    sq = diff.pow(2).sum(-1, keepdim=True)
    ok = sq > eps
    e = torch.where(ok, diff / torch.where(ok, sq, 1.0).sqrt(), 0.0)
    return d, e @ e.transpose(1, 2)


@register("rkd", different_widths=True)
def rkd(
    student_features: Tensor,
    teacher_features: Tensor,
    *,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> Tensor:
    """Relational KD (Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019).

    distance_weight * smoothL1(psi_D(s), psi_D(t)) + angle_weight * smoothL1(psi_A(s), psi_A(t)),
    psi_D = pairwise Euclidean distances / their mean over the off-diagonal pairs (N x N),
    psi_A[i, j, k] = cos of the angle at x_i between x_j and x_k (N x N x N), smooth L1 (Huber,
    beta = 1) averaged over all N^2 resp. N^3 entries. Defaults 25 / 50 are the paper's and
    RepDistiller ``RKDLoss``'s; RepDistiller's CIFAR-100 recipe weights the whole term by 1.
    Follows RepDistiller's code (eps = 1e-12 on squared distances, diagonal zeroed, degenerate
    triplets j = i or k = i giving cos 0 on both sides) with three numerical differences: an edge
    between two identical samples is degenerate too (cos 0, no gradient; RepDistiller's
    ``F.normalize`` sends back gradients of about 1e10 through it); distances
    come from the differences x_j - x_i (no |a|^2 + |b|^2 - 2ab cancellation), and each input is
    first divided by its detached largest magnitude, which changes nothing (both terms are
    invariant to a positive scale) except where eps binds, and keeps |x| up to float max finite.
    Student and teacher dims may differ. Memory O(N^2 D + N^3).
    Shapes: (N, ...), (N, ...) -> scalar; features of rank > 2 are flattened to (N, D); N >= 2.
    """
    dw = _non_negative("rkd", "distance_weight", distance_weight)
    aw = _non_negative("rkd", "angle_weight", angle_weight)
    s, t = _check_pair("rkd", student_features, teacher_features, shapes="(N, D) or (N, ...)")
    if s.shape[0] < 2:
        raise LossInputError(
            f"rkd compares pairs of samples and needs a batch of N >= 2, got N={s.shape[0]}."
        )
    with _full_precision(s):
        d_s, a_s = _rkd_geometry(_max_abs_scaled(s.flatten(1)))
        d_t, a_t = _rkd_geometry(_max_abs_scaled(t.flatten(1)))
        return dw * F.smooth_l1_loss(d_s, d_t) + aw * F.smooth_l1_loss(a_s, a_t)


# ---------------------------------------------------------------------------------------------
# PKT


def _pkt_conditionals(x: Tensor, eps: float) -> Tensor:
    """Row-conditional probabilities of the cosine kernel mapped to [0, 1], (N, D) -> (N, N)."""
    peak = x.detach().abs().amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    length = peak * torch.linalg.vector_norm(x / peak, dim=-1, keepdim=True)  # |x|, no overflow in the square
    x = x / (length + eps)  # zero rows stay zero
    k = ((x @ x.T + 1.0) / 2.0).clamp(0.0, 1.0)  # clamp: rounding can leave cos a hair past +-1
    return k / k.sum(-1, keepdim=True)  # each row sum >= N/2 (every kernel value >= 0, diag ~ 1)


@register("pkt", different_widths=True)
def pkt(student_features: Tensor, teacher_features: Tensor, *, eps: float = 1e-7) -> Tensor:
    """Probabilistic Knowledge Transfer (Passalis & Tefas, "Learning Deep Representations with
    Probabilistic Knowledge Transfer", ECCV 2018).

    K(a, b) = (cos(a, b) + 1) / 2;  p_{j|i} = K(t_i, t_j) / sum_k K(t_i, t_k), q likewise for the
    student;  loss = (1 / N^2) sum_i sum_j p_{j|i} log((p_{j|i} + eps) / (q_{j|i} + eps)),
    i.e. KL(teacher || student) of each row, summed over j, then averaged over the N x N entries.
    Follows RepDistiller ``PKT.cosine_similarity_loss`` (from the authors' code): rows divided by
    (|x| + eps), the diagonal j = i kept in the kernel, eps = 1e-7 inside the log, and
    ``torch.mean`` over the N x N matrix; the paper sums over pairs j != i, which differs by the
    factor N^2 and the diagonal. RepDistiller's CIFAR-100 weight 30000 is for this scale. One
    numerical difference: |x| is computed as m |x / m| with m the row's detached max |x| (the same
    number, but huge features do not overflow in the square). A zero row gets a uniform row, as
    in the reference (which maps its NaN to 0). Student and teacher dims may differ.
    Shapes: (N, D_s), (N, D_t) -> scalar.
    """
    e = _positive("pkt", "eps", eps)
    s, t = _check_pair(
        "pkt", student_features, teacher_features, shapes="(N, D)", ranks=(2,),
        fix="Pool or flatten the features to vectors first, e.g. x.flatten(1).",
    )  # fmt: skip
    with _full_precision(s):
        q, p = _pkt_conditionals(s, e), _pkt_conditionals(t, e)
        return (p * ((p + e).log() - (q + e).log())).mean()


# ---------------------------------------------------------------------------------------------
# CRD


def _seed_for_step(seed: int, step: int) -> int:
    """A 64-bit generator seed for one step: the stored seed plus a golden-ratio stride per step."""
    return (seed + step * 0x9E3779B97F4A7C15) % 2**64


class CRDState(nn.Module):
    """CRD's learned and stored parts: embedding heads, the two memory banks, Z, the sampler.

    ``embed_s`` / ``embed_t``: Linear(prod(shape) -> feat_dim), then L2 normalisation (RepDistiller
    ``Embed``). ``memory_s`` / ``memory_t``: (num_samples, feat_dim) banks of student / teacher
    embeddings keyed by sample id, initialised uniform in [-stdv, stdv], stdv = 1 / sqrt(feat_dim / 3)
    (RepDistiller ``ContrastMemory``). ``z``: the NCE normalisation constants (student anchor,
    teacher anchor), -1 until estimated on the first training batch. ``seed`` / ``step``: int64
    buffers from which the negatives are re-derived (see ``negatives``); ``seed`` is drawn from the
    global RNG at construction, so ``torch.manual_seed`` makes runs reproducible, and a checkpoint
    holds both, so a resumed run draws the same negatives as an uninterrupted one.
    """

    def __init__(
        self,
        student_shape: Sequence[int],
        teacher_shape: Sequence[int],
        *,
        num_samples: int,
        feat_dim: int = 128,
        **_: object,
    ):
        super().__init__()
        n = _count("crd", "num_samples", num_samples, minimum=2)
        dim = _count("crd", "feat_dim", feat_dim)
        self.num_samples, self.feat_dim = n, dim
        self.embed_s = nn.Linear(math.prod(student_shape), dim)
        self.embed_t = nn.Linear(math.prod(teacher_shape), dim)
        stdv = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory_s", torch.rand(n, dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("memory_t", torch.rand(n, dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("z", torch.full((2,), -1.0))
        self.register_buffer("seed", torch.randint(0, 2**62, (), dtype=torch.int64))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.generator: torch.Generator | None = None  # re-seeded every call; not itself state
        self.pending: list[tuple[Tensor, Tensor, Tensor, float]] = []  # this step's bank updates (DDP)

    def end_step(self) -> None:
        """Under torch.distributed, after every optimiser step (the engine calls it on every rank):
        the bank updates every other rank made this step, applied here in rank order. Each rank
        applied its own in the loss, so every bank then holds every sample's embeddings, as one
        process with the global batch would (updates of distinct ids commute), not rank 0's alone.
        A no-op in one process."""
        pending, self.pending = self.pending, []
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        size, rank, d = dist.get_world_size(), dist.get_rank(), self.feat_dim
        rows = torch.cat([torch.cat([ids.double().unsqueeze(1), torch.full((len(ids), 1), mom, dtype=torch.float64),
                                     vs.double().cpu(), vt.double().cpu()], 1) for ids, vs, vt, mom in pending]) \
            if pending else torch.zeros(0, 2 + 2 * d, dtype=torch.float64)
        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
        dist.all_gather(counts, torch.tensor([len(rows)]))
        most = max(int(c) for c in counts)
        padded = torch.cat([rows, rows.new_zeros(most - len(rows), rows.shape[1])])
        gathered = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(gathered, padded)
        with torch.no_grad():
            for r in range(size):
                if r == rank:
                    continue
                for row in gathered[r][: int(counts[r])]:  # in the order that rank applied them
                    i, mom = int(row[0]), float(row[1])
                    for bank, v in ((self.memory_s, row[2:2 + d]), (self.memory_t, row[2 + d:])):
                        new = bank[i] * mom + v.to(bank) * (1.0 - mom)
                        bank[i] = F.normalize(new, p=2, dim=0, eps=1e-12)

    def negatives(self, ids: Tensor, num_negatives: int) -> Tensor:
        """(N, K) negative ids: uniform with replacement over the bank minus each sample's own id.

        The generator is seeded from (seed, step), so this is a pure function of the buffers and
        the ids. Draws are assigned in the order of the sorted ids, not of batch positions, so a
        sample's negatives do not depend on where it sits in the batch (a permuted batch gives
        the permuted rows and the same loss).
        """
        device = self.memory_s.device
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
        self.generator.manual_seed(_seed_for_step(int(self.seed), int(self.step)))
        ids = ids.to(device)
        draws = torch.randint(
            0, self.num_samples - 1, (ids.numel(), num_negatives), generator=self.generator, device=device
        )
        neg = torch.empty_like(draws)
        neg[torch.argsort(ids, stable=True)] = draws  # row of the r-th smallest id gets draw r
        return neg + (neg >= ids.unsqueeze(1)).long()  # skip the positive: uniform over the others


def _embed(head: nn.Linear, x: Tensor) -> Tensor:
    """Linear head then L2 normalisation, (N, ...) -> (N, feat_dim), in x's dtype (>= float32)."""
    z = F.linear(x.flatten(1), head.weight.to(x.dtype), head.bias.to(x.dtype))
    return F.normalize(z, p=2, dim=1, eps=1e-12)  # eps: RepDistiller divides by the bare norm


def _nce(log_p: Tensor, num_samples: int, eps: float = 1e-7) -> Tensor:
    """RepDistiller ``ContrastLoss`` (CRD Eq. 18) from log P, (N, 1 + K) -> scalar.

    P = exp(<v, m> / T) / Z, column 0 the positive; with c = K Pn, Pn = 1 / num_samples:
    -(1 / N) [sum_i log(P_i0 / (P_i0 + c + eps)) + sum_{i, k} log(c / (P_ik + c + eps))],
    written with softplus / logaddexp, which is the same expression without overflow.
    """
    k = log_p.shape[1] - 1
    log_c = math.log(k / num_samples)
    log_c_eps = math.log(k / num_samples + eps)
    log_d1 = -F.softplus(log_c_eps - log_p[:, 0])  # log P / (P + c + eps)
    log_d0 = log_c - torch.logaddexp(log_p[:, 1:], log_p.new_tensor(log_c_eps))
    return -(log_d1.sum() + log_d0.sum()) / log_p.shape[0]


def _check_ids(ids: object, n: int, num_samples: int) -> Tensor:
    if ids is None:
        raise LossInputError(
            "crd keys its memory bank by sample id: the batch must carry sample ids (batch['id']) and the "
            "objective must pass them as ids=..., an int64 tensor of shape (N,)."
        )
    if not isinstance(ids, Tensor) or tuple(ids.shape) != (n,):
        got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise LossInputError(f"crd: ids must be sample ids of shape ({n},), got {got}.")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise LossInputError(f"crd: ids must be an integer tensor of sample ids, got {ids.dtype}.")
    bad = (ids < 0) | (ids >= num_samples)
    if bool(bad.any()):
        raise LossInputError(
            f"crd: sample ids must lie in [0, num_samples={num_samples}), got {ids[bad][:5].tolist()}; "
            "size the state's num_samples to the data set."
        )
    return ids.long()


def _first_occurrence(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Unique ids and the batch row of each one's first occurrence (deterministic bank updates)."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    rows = torch.arange(ids.numel(), device=ids.device)
    first = torch.full_like(uniq, ids.numel()).scatter_reduce(0, inverse, rows, "amin")
    return uniq, first


@register("crd", different_widths=True, state=CRDState, needs_ids=True)
def crd(
    student_features: Tensor,
    teacher_features: Tensor,
    *,
    state: CRDState | None = None,
    ids: Tensor | None = None,
    num_samples: int,
    feat_dim: int = 128,
    num_negatives: int = 16384,
    temperature: float = 0.07,
    momentum: float = 0.5,
) -> Tensor:
    """Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020), NCE form.

    v_s = l2norm(W_s s + b_s), v_t = l2norm(W_t t + b_t) (``state.embed_s`` / ``embed_t``). For
    each sample i with id y_i take K negative ids; P(m, v) = exp(<m, v> / T) / Z. Student
    anchor: m from the teacher bank at (y_i, negatives); teacher anchor: m from the student bank.
    loss = NCE(student anchor) + NCE(teacher anchor), NCE as ``_nce`` (paper Eq. 18).
    Follows RepDistiller's ``CRDLoss`` / ``ContrastMemory`` / ``ContrastLoss`` closely: Z is set
    once, on the first training batch, to mean(exp(<m, v> / T)) * num_samples over all 1 + K
    columns, separately for each direction, and then kept; the scores use the banks as they were
    before this batch; after the loss, each bank row at the batch's ids becomes
    l2norm(momentum * row + (1 - momentum) * v) (momentum 0.5); eps = 1e-7 in the NCE ratios.
    Differences: negatives are drawn uniformly (with replacement) from all ids but the positive,
    like ContrastMemory's own fallback sampler; RepDistiller's CIFAR-100 run instead passes
    negatives drawn without replacement from the other classes (``CIFAR100InstanceSample``). They
    come from a generator re-seeded from the state's (seed, step) buffers, assigned in sorted-id
    order, so they depend on the ids and the step, never on batch positions; the NCE ratios are
    evaluated in log space (same values, no overflow); the L2 norms have eps 1e-12; a repeated id
    updates the bank once, from its first occurrence. Bank, Z and step change only in training
    mode (``state.train()``), so evaluation batches leave the state as it was. Under
    torch.distributed each rank updates the rows of its own samples and ``CRDState.end_step``
    applies the other ranks' at the end of the step; Z is estimated from rank 0's share of the
    first batch (its buffers are broadcast).
    Defaults are the paper's (feat_dim 128, K = 16384, T = 0.07, momentum 0.5); RepDistiller's
    CIFAR-100 weight is 0.8 (with the KD term on it is 0.8 CRD + 1 KD for "CRD+KD"). Needs
    ``state`` (``crd.state``, built with the same params) and ``ids``. Memory O(N * num_samples).
    Shapes: (N, ...), (N, ...) with the per-sample shapes given to the state; ids (N,) -> scalar.
    """
    st = _state("crd", state, CRDState)
    k = _count("crd", "num_negatives", num_negatives)
    tau = _positive("crd", "temperature", temperature)
    mom = float(momentum)
    if not 0.0 <= mom < 1.0:
        raise LossInputError(f"crd: momentum must lie in [0, 1), got {momentum!r}.")
    if (int(num_samples), int(feat_dim)) != (st.num_samples, st.feat_dim):
        raise LossInputError(
            f"crd: the state was built for num_samples={st.num_samples}, feat_dim={st.feat_dim} but the loss got "
            f"num_samples={num_samples}, feat_dim={feat_dim}; build the state with the loss's params."
        )
    s, t = _check_pair("crd", student_features, teacher_features, shapes="(N, D) or (N, ...)")
    for name, x, head in (("student", s, st.embed_s), ("teacher", t, st.embed_t)):
        if x[0].numel() != head.in_features:
            raise LossInputError(
                f"crd: {name}_features has {x[0].numel()} values per sample (shape {tuple(x.shape)}) but the "
                f"state's {name} head expects {head.in_features}; build the state with the per-sample shapes "
                "of the tensors the loss receives."
            )
    y = _check_ids(ids, s.shape[0], st.num_samples).to(st.memory_s.device)
    with _full_precision(s):
        v_s, v_t = _embed(st.embed_s, s), _embed(st.embed_t, t)  # (N, F)
        idx = torch.cat([y.unsqueeze(1), st.negatives(y, k)], dim=1)  # (N, 1 + K), column 0 positive
        # scores against the whole bank (N x num_samples), then pick the N x (1 + K) used: the same
        # numbers as RepDistiller's bmm over N (1 + K) gathered bank rows, in less memory whenever
        # num_samples < (1 + K) * feat_dim (CIFAR-100: 5e4 < 2.1e6). Copies of the banks, because
        # they are updated in place below, after autograd has saved them.
        logit_s = (v_s @ st.memory_t.to(v_s.dtype, copy=True).T).gather(1, idx) / tau  # student anchor
        logit_t = (v_t @ st.memory_s.to(v_t.dtype, copy=True).T).gather(1, idx) / tau  # teacher anchor
        total = s.new_zeros(())
        for col, logit in enumerate((logit_s, logit_t)):
            log_z = math.log(float(st.z[col])) if float(st.z[col]) > 0 else None
            if log_z is None:  # first batch: Z = mean(exp(logit)) * num_samples, as RepDistiller
                log_z = (
                    float(logit.detach().logsumexp((0, 1)))
                    - math.log(logit.numel())
                    + math.log(st.num_samples)
                )
                if st.training:
                    st.z[col] = math.exp(log_z)
            total = total + _nce(logit - log_z, st.num_samples)
        if st.training:
            with torch.no_grad():
                uniq, first = _first_occurrence(y)
                for bank, v in ((st.memory_s, v_s), (st.memory_t, v_t)):
                    row = bank[uniq] * mom + v[first].to(bank.dtype) * (1.0 - mom)
                    bank.index_copy_(0, uniq, F.normalize(row, p=2, dim=1, eps=1e-12))
                if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                    st.pending.append((uniq.cpu(), v_s[first].detach(), v_t[first].detach(), mom))  # end_step
                st.step += 1
        return total




# ---------------------------------------------------------------------------------------------
# VID


class VIDState(nn.Module):
    """VID's learned per-channel variance: ``log_scale`` (C,), var = softplus(log_scale) + eps.

    C is the teacher's channel count (``teacher_shape[0]``: channels of a map, dims of a vector).
    Initialised as RepDistiller ``VIDLoss``: log_scale = log(exp(init_pred_var - eps) - 1), so
    every variance starts at init_pred_var (5.0).
    """

    def __init__(
        self,
        student_shape: Sequence[int],
        teacher_shape: Sequence[int],
        *,
        init_pred_var: float = 5.0,
        eps: float = 1e-5,
        **_: object,
    ):
        super().__init__()
        e = _positive("vid", "eps", eps)
        v = _positive("vid", "init_pred_var", init_pred_var)
        if v <= e:
            raise LossInputError(f"vid: init_pred_var must exceed eps={e}, got {init_pred_var!r}.")
        channels = int(teacher_shape[0])
        self.log_scale = nn.Parameter(torch.full((channels,), math.log(math.expm1(v - e))))


@register("vid", state=VIDState)
def vid(
    student_features: Tensor,
    teacher_features: Tensor,
    *,
    state: VIDState | None = None,
    init_pred_var: float = 5.0,
    eps: float = 1e-5,
) -> Tensor:
    """Variational Information Distillation (Ahn, Hu, Damianou, Lawrence & Dai, CVPR 2019).

    Gaussian q(t | s) = N(t; mu(s), sigma_c^2) with sigma_c^2 = softplus(alpha_c) + eps per channel;
    loss = mean over all elements of 0.5 * (log sigma_c^2 + (t - mu)^2 / sigma_c^2), i.e. the
    negative log-likelihood up to 0.5 log(2 pi), the variational bound on -I(t; s) up to constants.
    ``student_features`` is mu: RepDistiller's ``VIDLoss`` computes mu with its own 3-layer 1x1-conv
    regressor and pools the larger map to the smaller size; here the caller's adapter plays that
    part (map the student to the teacher's shape), and the loss holds only alpha
    (``state.log_scale``, ``vid.state``). Otherwise as RepDistiller: init_pred_var 5.0, eps 1e-5,
    ``torch.mean`` over all N x C x ... elements. Not zero at t = mu (the log-variance term).
    ``init_pred_var`` is used by the state at construction only. RepDistiller's CIFAR-100 weight: 1.
    Shapes: (N, C), (N, C, L) or (N, C, H, W) for both, equal shapes -> scalar.
    """
    st = _state("vid", state, VIDState)
    e = _positive("vid", "eps", eps)
    mu, t = _check_pair(
        "vid", student_features, teacher_features, shapes="(N, C), (N, C, L) or (N, C, H, W)",
        ranks=(2, 3, 4), same_shape=True,
    )  # fmt: skip
    c = t.shape[1]
    if st.log_scale.numel() != c:
        raise LossInputError(
            f"vid: the state holds {st.log_scale.numel()} variances but the features have C={c} channels "
            f"(shape {tuple(t.shape)}); build the state with the teacher's per-sample shape."
        )
    with _full_precision(t):
        var = (F.softplus(st.log_scale.to(t.dtype)) + e).view(1, c, *([1] * (t.dim() - 2)))
        return (0.5 * (var.log() + (t - mu).pow(2) / var)).mean()




# ---------------------------------------------------------------------------------------------
# TRG


def _contextual_similarity(x: Tensor) -> Tensor:
    """Intra-sample token graph softmax(F F^T / sqrt(D)) over each row, (N, T, D) -> (N, T, T)."""
    return torch.softmax(x @ x.transpose(1, 2) / math.sqrt(x.shape[-1]), dim=-1)


def _teacher_knn(v_t: Tensor, k: int) -> Tensor:
    """(M, D) teacher nodes -> (M, k') indices of each node's k' = min(k, M - 1) nearest other
    nodes (squared Euclidean distance, self excluded), from the detached teacher features."""
    x = v_t.detach()
    m = x.shape[0]
    sq = x.pow(2).sum(-1)
    d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * x @ x.T  # ranking only; no gradient
    eye = torch.eye(m, dtype=torch.bool, device=x.device)
    return d2.masked_fill(eye, math.inf).topk(min(k, m - 1), dim=1, largest=False).indices


def _knn_log_graph(x: Tensor, near: Tensor, sigma: float) -> Tensor:
    """Log softmax of the Gaussian adjacency over each node's given neighbours, (M, D), (M, k) -> (M, k).

    A_ij = exp(-|x_i - x_j|^2 / (2 sigma)) for j = near[i, :]; row i is log_softmax_j(A_ij) over
    those k entries only (non-neighbours take no part). Distances come from the differences
    x_i - x_j (no |a|^2 + |b|^2 - 2ab cancellation), memory O(M k D).
    """
    d2 = (x.unsqueeze(1) - x[near]).pow(2).sum(-1)  # (M, k)
    return torch.log_softmax(torch.exp(-d2 / (2.0 * sigma)), dim=-1)


@register("trg")
def trg(
    student_features: Tensor,
    teacher_features: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    tau_g: float = 0.1,
    sigma: float = 1.0,
    k: int = 5,
    num_tokens: int | None = None,
) -> Tensor:
    """Token-level Relationship Graph KD (Zhang, Liu & He, "Knowledge Distillation via Token-level
    Relationship Graph", arXiv:2306.12442, 2023).

    alpha * L_inner + beta * L_local + gamma * L_global (the paper adds L_logit, a separate term):
    - L_inner (contextual loss, intra-sample graph): CS = softmax(F F^T / sqrt(D)) per sample over
      its T tokens; MSE(CS_t, CS_s), mean over the N x T x T entries. Uses all tokens.
    - nodes: ``num_tokens`` tokens drawn at random (global torch RNG, same positions for student
      and teacher) from each sample, or all T when None; M = N * num_tokens nodes over the batch.
    - L_local (inter-sample k-NN graph, LSP's local structure): the neighbour set N(i) of each
      node is its k nearest other nodes (k capped at M - 1), found ONCE from the detached teacher
      features and used for both models; A_ij = exp(-|v_i - v_j|^2 / (2 sigma)) for j in N(i);
      p_i = softmax_{j in N(i)} A^S_ij, q_i = softmax_{j in N(i)} A^T_ij (over the k neighbours
      only); L_local = mean_i KL(p_i || q_i). The softmax logits are the kernel values A in
      (0, 1], so a row's probabilities differ by at most a factor e, and when the neighbour
      distances are far above 2 sigma every A is ~0 and the rows are ~uniform: set sigma to the
      scale of the squared nearest-neighbour distances (they grow with D).
    - L_global (graph topology, InfoNCE): -mean_i log softmax_j(cos(v^S_i, v^T_j) / tau_g)[i],
      the same token in the teacher being the positive and every other node a negative.
    What we could and could not verify: the arXiv page gave us only the abstract (three losses
    plus contextual loss, tokens as nodes). The formulas above come from a third-party summary of
    the paper: the total L_logit + alpha L_inner + beta L_local + gamma L_global; per-image random
    token sampling; the k-NN Gaussian-kernel adjacency; the local loss as KL between row softmaxes
    of the adjacencies in the order KL(S || T) as written there; the global loss as InfoNCE between
    same-position student / teacher tokens after a linear projection; CS = softmax(F F'/sqrt(D))
    with MSE; and a dynamic (decreasing) tau_g schedule. We did not see the paper's equations or
    code, nor its defaults (alpha, beta, gamma, k, sigma, tau_g, tokens per image); ours are
    placeholders (all weights 1, k 5, sigma 1, tau_g 0.1, all tokens), not the paper's.
    L_local follows LSP (Yang et al., "Distilling Knowledge from Graph Convolutional Networks",
    CVPR 2020; chaitjo/efficient-gnns ``lpw_criterion``, whose rbf kernel is our sigma = 1), which
    TRG's local term builds on: one graph for both models, a softmax of the kernel values over
    each node's neighbours only. Differences: LSP's graph is the given edge set, ours TRG's
    kNN graph (from the teacher); LSP's code computes KL(T || S) (``F.kl_div(log p_S, p_T)``, mean over
    edges), we keep TRG's stated KL(S || T), summed over the k neighbours and averaged over nodes.
    Our choices where the summary is silent or ambiguous: neighbours by row (j in kNN(i)), the
    teacher's kNN for both (detached: the neighbour choice carries no gradient), self excluded,
    cosine for SIM, means over nodes where the summary writes sums (a factor M folded into beta,
    gamma), contextual loss over all tokens.
    The linear projection is the caller's adapter: L_global needs equal dims (the other terms do
    not); the tau_g schedule belongs to the recipe (a pure loss has no notion of the epoch).
    Identical inputs give L_inner = L_local = 0 (L_global is an InfoNCE, never 0).
    For CNN maps (N, C, H, W) pass x.flatten(2).transpose(1, 2), (N, H*W, C) (1 x 1 patches).
    Memory O(N T^2 + M^2): set ``num_tokens`` for large batches.
    Shapes: (N, T, D_s), (N, T, D_t) -> scalar (D_s = D_t when gamma > 0); N * tokens >= 2.
    """
    a = _non_negative("trg", "alpha", alpha)
    b = _non_negative("trg", "beta", beta)
    g = _non_negative("trg", "gamma", gamma)
    tau = _positive("trg", "tau_g", tau_g)
    sig = _positive("trg", "sigma", sigma)
    kk = _count("trg", "k", k)
    s, t = _check_pair(
        "trg", student_features, teacher_features, shapes="(N, T, D)", ranks=(3,), same_dims=(0, 1),
        fix="For CNN maps (N, C, H, W) pass x.flatten(2).transpose(1, 2), i.e. (N, H*W, C).",
    )  # fmt: skip
    n, tokens = s.shape[0], s.shape[1]
    per_sample = tokens if num_tokens is None else min(_count("trg", "num_tokens", num_tokens), tokens)
    if g > 0 and s.shape[2] != t.shape[2]:
        raise LossInputError(
            f"trg: the global (InfoNCE) term compares student and teacher tokens, so their dims must agree; got "
            f"D_s={s.shape[2]}, D_t={t.shape[2]}. Put a linear adapter on the student tap (the paper's "
            "projection), or set gamma=0."
        )
    if (b > 0 or g > 0) and n * per_sample < 2:
        raise LossInputError(
            f"trg: the token graph needs at least 2 nodes, got N * tokens = {n * per_sample}."
        )
    with _full_precision(s):
        terms = []
        if a > 0:
            terms.append(a * (_contextual_similarity(s) - _contextual_similarity(t)).pow(2).mean())
        if b > 0 or g > 0:
            if per_sample < tokens:  # per-sample random tokens, the same positions on both sides
                pick = torch.rand(n, tokens, device=s.device).argsort(dim=1)[:, :per_sample]
                s = s.gather(1, pick.unsqueeze(-1).expand(-1, -1, s.shape[2]))
                t = t.gather(1, pick.unsqueeze(-1).expand(-1, -1, t.shape[2]))
            v_s, v_t = s.reshape(-1, s.shape[2]), t.reshape(-1, t.shape[2])  # (M, D)
            if b > 0:
                near = _teacher_knn(v_t, kk)  # (M, k), shared by student and teacher
                log_p, log_q = _knn_log_graph(v_s, near, sig), _knn_log_graph(v_t, near, sig)
                kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # KL(S || T) per node; softmax > 0
                terms.append(b * kl.mean())
            if g > 0:
                cos = F.normalize(v_s, dim=-1, eps=1e-12) @ F.normalize(v_t, dim=-1, eps=1e-12).T
                target = torch.arange(cos.shape[0], device=cos.device)
                terms.append(g * F.cross_entropy(cos / tau, target))
        return sum(terms) if terms else s.sum() * 0.0  # all weights 0: an exact 0 with a grad path

# ---------------------------------------------------------------------------------------------
# cosine Gram (embedding models)


@register("cosine_gram", different_widths=True)
def cosine_gram(student_features: Tensor, teacher_features: Tensor, *, eps: float = 1e-12) -> Tensor:
    """Pairwise-cosine distillation for embedding models: with u_i = s_i / ||s_i|| and
    v_i = t_i / ||t_i|| (norms clamped at ``eps``, as ``F.normalize``),

        loss = 1 / (N (N - 1)) * sum_{i != j} (u_i . u_j - v_i . v_j)^2

    the mean squared difference of the batch's cosine-similarity matrices off the diagonal: the
    quantity that retrieval and semantic similarity read from an embedding model. It is SP
    (Tung & Mori, ICCV 2019; ``similarity``) on unit-normalised features without SP's row
    normalisation of the Gram, and with the constant diagonal (1 on both sides) left out; our
    relation term for sentence-embedding students, not a published loss of its own.
    A relation loss: student and teacher dims may differ. A batch of one sample has no pair and
    gives an exact 0 (with a gradient path). Shapes: (N, D_s) and (N, D_t) -> scalar.
    """
    s, t = _check_pair("cosine_gram", student_features, teacher_features, shapes="vectors (N, D)", ranks=(2,),
                       fix="Pool tokens to one vector per sample first.")
    e = _non_negative("cosine_gram", "eps", eps)
    n = s.shape[0]
    with _full_precision(s):
        if n < 2:
            return s.sum() * 0.0
        cs = F.normalize(s, dim=1, eps=e) @ F.normalize(s, dim=1, eps=e).T
        ct = F.normalize(t, dim=1, eps=e) @ F.normalize(t, dim=1, eps=e).T
        off = ~torch.eye(n, dtype=torch.bool, device=s.device)
        return (cs - ct)[off].pow(2).mean()


