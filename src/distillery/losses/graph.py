"""Edge-wise GNN-to-MLP distillation losses: FF-G2M's low- and high-frequency terms and KRD's
reliable-neighbour KD. Pure functions over node logits and an edge list.

Signature::

    fn(student_logits: Tensor[N, C], teacher_logits: Tensor[N, C], *, edges: Tensor[2, E],
       mask: Tensor[N] | None = None, reduction: str = "mean", **params) -> Tensor

- Rows are the N nodes of a batch; ``edges`` (int64, (2, E)) holds pairs of row positions
  ``(i, j)``: ``edges[0]`` is the centre node i (the student side), ``edges[1]`` its neighbour j
  (the teacher side). An undirected graph lists both directions. ``NodeData`` batches carry it as
  ``batch["edges"]`` (the objective passes it: ``fn.batch_keys``).
- ``mask`` (bool (N,)) drops every edge with a masked end. ``reduction``: ``"mean"`` over the kept
  edges (no edge: an exact 0 with a grad path), ``"sum"``, or ``"none"`` (per edge, (E',)).
- The KL is summed over classes and not rescaled by tau^2, as the authors' code does (all three
  reference repositories use ``KLDivLoss(reduction="batchmean", log_target=True)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import register
from .logits import REDUCTIONS, LossInputError, _check_logits, _check_mask, _kl, _log_probs, _positive


def _edges(loss: str, edges: object, n: int) -> Tensor:
    if not isinstance(edges, Tensor) or edges.dim() != 2 or edges.shape[0] != 2:
        got = tuple(edges.shape) if isinstance(edges, Tensor) else type(edges).__name__
        raise LossInputError(f"{loss}: edges must be an int64 tensor of shape (2, E) (row positions), got {got}.")
    if edges.is_floating_point() or edges.dtype == torch.bool:
        raise LossInputError(f"{loss}: edges must be integer row positions, got {edges.dtype}.")
    if edges.numel() and (int(edges.min()) < 0 or int(edges.max()) >= n):
        raise LossInputError(f"{loss}: edge positions must lie in [0, {n}), got {int(edges.min())}..{int(edges.max())}.")
    return edges.long()


def _prepare(loss: str, s: Tensor, t: Tensor, edges: object, mask: object, reduction: str) -> tuple[Tensor, Tensor, Tensor]:
    if reduction not in REDUCTIONS:
        raise LossInputError(f"{loss}: unknown reduction {reduction!r}; use one of {', '.join(map(repr, REDUCTIONS))}.")
    _check_logits(loss, "student_logits", s)
    _check_logits(loss, "teacher_logits", t)
    if s.shape != t.shape:
        raise LossInputError(f"{loss}: student_logits {tuple(s.shape)} and teacher_logits {tuple(t.shape)} differ; "
                             "both must be (N, C) over the same nodes.")
    e = _edges(loss, edges, len(s))
    valid = _check_mask(loss, mask, len(s))
    if valid is not None:
        e = e[:, valid[e[0]] & valid[e[1]]]
    dtype = torch.promote_types(torch.promote_types(s.dtype, torch.float32), t.dtype)
    return s.to(dtype), t.to(dtype), e


def _reduce_edges(per_edge: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_edge
    total = per_edge.sum()
    return total if reduction == "sum" else total / max(per_edge.numel(), 1)


def _add_self_loops(e: Tensor, n: int, mask: Tensor | None) -> Tensor:
    nodes = torch.arange(n, device=e.device) if mask is None else mask.nonzero().squeeze(-1)
    return torch.cat([e, torch.stack([nodes, nodes])], dim=1)


def _neighbour_kl(s: Tensor, t: Tensor, e: Tensor, tau: float, reduction: str) -> Tensor:
    """KL(softmax(z_j / tau) || softmax(s_i / tau)) for every edge (i, j) of ``e``, reduced."""
    log_s, log_t = _log_probs(s, tau), _log_probs(t, tau)
    return _reduce_edges(_kl(log_t[e[1]], log_s[e[0]]), reduction)


@register("ffg2m_low", reads_logits=True, batch_keys=("edges",))
def ffg2m_low(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    edges: Tensor,
    mask: Tensor | None = None,
    reduction: str = "mean",
    temperature: float = 1.0,
    self_loops: bool = True,
) -> Tensor:
    """FF-G2M's low-frequency distillation (Wu et al., "Extracting Low-/High-Frequency Knowledge from
    Graph Neural Networks and Injecting it into MLPs", AAAI 2023):

        L_LFD = mean over (i, j) in E u {(i, i)} of KL(softmax(z_j / tau) || softmax(s_i / tau))

    the teacher at neighbour j pulls the student at centre i (the smoothing a GNN does). Self-loops
    are added, as the authors' code does (so the plain GLNN term KL(z_i || s_i) is inside); their
    code uses no temperature (tau = 1, the default). Shapes: (N, C), (N, C), edges (2, E) -> scalar,
    or (E + N,) with reduction="none" (edges first, then the self-loops).
    """
    tau = _positive("ffg2m_low", "temperature", temperature)
    s, t, e = _prepare("ffg2m_low", student_logits, teacher_logits, edges, mask, reduction)
    return _neighbour_kl(s, t, _add_self_loops(e, len(s), mask) if self_loops else e, tau, reduction)


@register("ffg2m_high", reads_logits=True, batch_keys=("edges",))
def ffg2m_high(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    edges: Tensor,
    mask: Tensor | None = None,
    reduction: str = "mean",
    temperature: float = 1.0,
) -> Tensor:
    """FF-G2M's high-frequency distillation (Wu et al., AAAI 2023): the difference of a node from its
    neighbour, as a distribution, matched per edge:

        L_HFD = mean over (i, j) in E of KL(softmax(|z_i - z_j| / tau) || softmax(|s_i - s_j| / tau))

    with the absolute differences of raw logits (as the authors' code; no self-loops, whose
    difference is 0). Their best settings use tau between 1.0 and 1.5. Shapes: (N, C), (N, C),
    edges (2, E) -> scalar, or (E,) with reduction="none".
    """
    tau = _positive("ffg2m_high", "temperature", temperature)
    s, t, e = _prepare("ffg2m_high", student_logits, teacher_logits, edges, mask, reduction)
    e = e[:, e[0] != e[1]]
    ds, dt = (s[e[0]] - s[e[1]]).abs(), (t[e[0]] - t[e[1]]).abs()
    return _reduce_edges(_kl(_log_probs(dt, tau), _log_probs(ds, tau)), reduction)




# ---------------------------------------------------------------------------------------------
# KRD


def entropy_shift(clean_logits: Tensor, noisy_logits: Tensor) -> Tensor:
    """KRD's knowledge reliability rho (Wu et al., "Quantifying the Knowledge in GNNs for Reliable
    Distillation into MLPs", ICML 2023): rho_i = |H(p~_i) - H(p_i)| / max_k |H(p~_k) - H(p_k)|, the
    change of the teacher's prediction entropy (natural log) when the node features are perturbed,
    scaled to [0, 1]. Small rho = reliable. (N, C), (N, C) -> (N,)."""
    def entropy(z: Tensor) -> Tensor:
        logp = torch.log_softmax(z.double(), -1)
        return -(logp.exp() * logp).sum(-1)

    delta = (entropy(noisy_logits) - entropy(clean_logits)).abs()
    return (delta / delta.max().clamp(min=1e-12)).float()


def fit_power(x: Tensor, y: Tensor, lo: float = 1e-3, hi: float = 1e3, iters: int = 80) -> float:
    """argmin_a sum_b (y_b - (1 - x_b^a))^2 for a in [lo, hi], by golden-section search on log a.
    (KRD fits the same curve with ``scipy.optimize.curve_fit`` from the current a; one minimum here.)"""
    x, y = x.double(), y.double()

    def err(log_a: float) -> float:
        return float(((y - (1 - x.pow(math.exp(log_a)))) ** 2).sum())

    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = err(c), err(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = err(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = err(d)
    return math.exp((a + b) / 2)


class KRDState(nn.Module):
    """KRD's sampling state: the power alpha of P_j = 1 - rho_j^alpha (init 1.0), and the training
    step counter. Buffers only (checkpointed, not trained)."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int] | None, *,
                 init_power: float = 1.0, **_: object):
        super().__init__()
        self.register_buffer("power", torch.tensor(float(_positive("krd", "init_power", init_power)), dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, rho: Tensor, agree: Tensor, bins: int, momentum: float) -> None:
        """alpha <- m * alpha + (1 - m) * a, with a fitted to the share of nodes per rho-bin on which
        student and teacher agree (min-max normalised), as KRD's ``updata``."""
        edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64, device=rho.device)
        idx = torch.bucketize(rho.double(), edges[1:-1], right=True)
        n_agree = torch.bincount(idx[agree], minlength=bins).double()
        n_all = torch.bincount(idx, minlength=bins).double()
        share = n_agree / (n_all + 1e-6)
        share = (share - share.min()) / (share.max() - share.min()).clamp(min=1e-12)
        x = edges[:-1] + 0.05  # as KRD's code: left bin edge + 0.05 (the bin centres only at 10 bins)
        a = fit_power(x, share)
        self.power.mul_(momentum).add_((1 - momentum) * a)


@register("krd", reads_logits=True, batch_keys=("edges", "reliability"), state=KRDState)
def krd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    edges: Tensor,
    reliability: Tensor,
    state: KRDState | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
    temperature: float = 1.0,
    warmup_steps: int = 50,
    momentum: float = 0.99,
    bins: int = 50,
    init_power: float = 1.0,
) -> Tensor:
    """KRD: reliable-neighbour KD (Wu et al., ICML 2023), as the authors' code (LirongWu/KRD) computes it.

        L = mean over (i, j) in E_t u {(i, i)} of KL(softmax(z_j / tau) || softmax(s_i / tau))

    E_t keeps each edge (i, j) with probability P_j = 1 - rho_j^alpha, where rho (``reliability``, (N,),
    from ``entropy_shift``: small = the teacher's knowledge at j is reliable) and alpha is fitted
    every training step (momentum ``momentum``) so that P tracks how often student and teacher agree
    at each reliability level. For the first ``warmup_steps`` training steps every edge is kept; the
    self-loops always are. Sampling draws from the global torch RNG (seeded and checkpointed by the
    engine). Deviation: the code fits alpha from the previous epoch's eval-mode student logits; here
    the current batch's (train mode, detached) are used, so the loss needs nothing from outside.
    In eval mode (``state.eval()``) nothing is sampled or updated: every edge counts.
    Shapes: (N, C), (N, C), edges (2, E), reliability (N,) -> scalar, or per kept edge with "none".
    """
    tau = _positive("krd", "temperature", temperature)
    if not 0 <= momentum < 1:
        raise LossInputError(f"krd: momentum must lie in [0, 1), got {momentum!r}.")
    if state is None or not isinstance(state, KRDState):
        raise LossInputError("krd has state (the sampling power alpha): build KRDState(student_shape, teacher_shape, "
                             "**params), checkpoint it with the student, and pass state=... (the objective does this).")
    s, t, e = _prepare("krd", student_logits, teacher_logits, edges, mask, reduction)
    if not isinstance(reliability, Tensor) or reliability.shape != (len(s),):
        got = tuple(reliability.shape) if isinstance(reliability, Tensor) else type(reliability).__name__
        raise LossInputError(f"krd: reliability must be a float tensor of shape ({len(s)},) in [0, 1], got {got}; "
                             "compute it with distillery.graph.reliability(teacher, graph).")
    e = e[:, e[0] != e[1]]
    if state.training:
        if int(state.step) >= warmup_steps:
            agree = s.detach().argmax(-1) == t.argmax(-1)
            state.update(reliability if mask is None else reliability[mask], agree if mask is None else agree[mask],
                         bins, momentum)
            p = 1 - reliability.double().clamp(0, 1).pow(float(state.power))
            e = e[:, torch.rand(e.shape[1], dtype=torch.float64, device=e.device) < p[e[1]]]
        state.step.add_(1)
    return _neighbour_kl(s, t, _add_self_loops(e, len(s), mask), tau, reduction)


