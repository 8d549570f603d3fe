"""GNN-to-MLP distillation over the shared engine: train a GNN teacher, then an MLP student with
GLNN, FF-G2M or KRD terms, each an ``Objective`` trained by ``engine.fit`` against a
``PrecomputedTeacher`` (the GNN's outputs on every observed node, looked up by node id).

    g = graph.load("cora"); s = graph.split(g.y, seed=0)
    teacher = train_teacher(g, s, "sage", seed=0)
    student, result = distill(teacher, g, s, "glnn", seed=0)

Training is full-batch on these graph sizes (one step per epoch, as GLNN's 4096-node batches on
Cora and the FF-G2M / KRD code); the weights of the epoch with the best validation accuracy are
kept, with early stopping (``train.select=best``, ``train.patience``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from ..config import TermConfig, TrainConfig
from ..engine import evaluate, fit, seed_everything
from ..errors import DistilleryError
from ..losses.graph import entropy_shift
from ..objective import Objective
from ..teachers import ModuleTeacher, PrecomputedTeacher
from . import models
from .data import Graph, NodeData, Split, node_sets

Method = Literal["mlp", "glnn", "ffg2m", "krd"]
METHODS: tuple[str, ...] = get_args(Method)


# The defaults of the Python API and of the graph recipe (``graph.recipe``): GLNN's settings
# (train.conf.yaml of snap-research/graphless-neural-networks).
@dataclass
class TeacherTrain(TrainConfig):
    """GLNN's teacher training: full batch (one step per epoch), Adam with L2 weight decay, lr 0.01,
    at most 200 epochs, the best validation epoch kept, patience 50."""

    epochs: int = 200
    batch_size: int = 1 << 30
    """Clamped to the number of training nodes: full batch."""
    optimizer: Literal["adamw", "adam", "sgd"] = "adam"
    lr: float = 0.01
    weight_decay: float = 5e-4
    schedule: Literal["constant", "cosine", "step"] = "constant"
    select: Literal["last", "best"] = "best"
    patience: int | None = 50
    log_every: int = 1 << 30
    """Full batch: one record per epoch."""


@dataclass
class StudentTrain(TeacherTrain):
    """GLNN's MLP student: the teacher's training with weight decay 5e-3."""

    weight_decay: float = 5e-3


TEACHER_TRAIN = TeacherTrain()
TEACHER_MODELS: dict[str, dict[str, Any]] = {
    "sage": {"hidden": 128, "layers": 2, "dropout": 0.0},
    "gcn": {"hidden": 64, "layers": 2, "dropout": 0.5},
    "gat": {"hidden": 8, "heads": 8, "layers": 2, "dropout": 0.6, "attn_dropout": 0.6},
    "appnp": {"hidden": 64, "layers": 2, "dropout": 0.5, "k": 10, "alpha": 0.1},
}
STUDENT_TRAIN = StudentTrain()
STUDENT_MODEL: dict[str, Any] = {"hidden": 128, "layers": 2, "dropout": 0.6}


def _full_batch(cfg: TrainConfig, n: int) -> TrainConfig:
    return replace(cfg, batch_size=max(1, min(cfg.batch_size, n)))


def train_teacher(graph: Graph, split: Split, kind: str = "sage", *, seed: int = 0, train: TrainConfig | None = None,
                  run_dir: str | Path | None = None, resume: bool = False, progress: bool | None = False,
                  **model_args) -> nn.Module:
    """A GNN of ``kind`` trained with cross-entropy on the labelled training nodes, selected on validation.
    With ``run_dir`` the engine checkpoints and logs phase ``teacher`` there (``resume`` continues it)."""
    if kind == "mlp":
        raise DistilleryError("train_teacher trains a GNN (gcn, sage, gat, appnp); train the MLP with distill(..., 'mlp').")
    sets = node_sets(graph, split)
    seed_everything(seed)
    model = models.build(kind, graph, **{**TEACHER_MODELS.get(kind, {}), **model_args})
    cfg = _full_batch(train or TEACHER_TRAIN, len(sets["train"]))
    fit(model, Objective([TermConfig(loss="ce", teacher=None)]), sets["train"], cfg, eval_data=sets["val"],
        run_dir=run_dir, phase="teacher", seed=seed, resume=resume, progress=progress)
    return model.eval()


@torch.no_grad()
def reliability(teacher: nn.Module, noise: float = 1.0, seed: int = 0) -> Tensor:
    """KRD's knowledge reliability of every node (``losses.graph.entropy_shift``): the teacher on its
    graph, clean and with Gaussian noise of std ``noise`` added to every feature (one draw, seeded)."""
    if not isinstance(teacher, models.GraphModel):
        raise DistilleryError(f"reliability needs a GNN teacher (distillery.graph.models), got {type(teacher).__name__}.")
    was = teacher.training
    teacher.eval()
    try:
        x, e = teacher.features, teacher.edge_index
        g = torch.Generator().manual_seed(seed)
        clean = teacher.embed(x, e)
        noisy = teacher.embed(x + noise * torch.randn(x.shape, generator=g).to(x), e)
    finally:
        teacher.train(was)
    return entropy_shift(clean, noisy)


def method_terms(method: str, *, lamb: float, temperature: float = 1.0) -> list[TermConfig]:
    """The objective of each method: lamb * CE(labelled) + (1 - lamb) * its distillation terms.

    - ``mlp``: CE alone.
    - ``glnn`` (Zhang et al., ICLR 2022): KL(teacher || student) on every node, no temperature (tau^2 = 1).
      GLNN's code takes the CE and KL steps as two optimiser steps; we sum them in one, as its paper writes.
    - ``ffg2m`` (Wu et al., AAAI 2023): low-frequency (neighbour teacher -> centre student, self-loops
      included) plus high-frequency (|z_i - z_j|, tau) per edge.
    - ``krd`` (Wu et al., ICML 2023): KD from the teacher at each node and at its reliably sampled
      neighbours, tau on both sides."""
    if method not in METHODS:
        from ..errors import unknown

        raise unknown("graph distillation method", method, METHODS)
    if not 0 <= lamb <= 1:
        raise DistilleryError(f"lamb must lie in [0, 1], got {lamb}.")
    ce = TermConfig(loss="ce", teacher=None, weight=1.0 if method == "mlp" else lamb)
    if method == "mlp":
        return [ce]
    kd = {
        "glnn": [TermConfig(loss="kd", weight=1 - lamb, params={"temperature": 1.0})],
        "ffg2m": [TermConfig(loss="ffg2m_low", weight=1 - lamb),
                  TermConfig(loss="ffg2m_high", weight=1 - lamb, params={"temperature": temperature})],
        "krd": [TermConfig(loss="krd", weight=1 - lamb, params={"temperature": temperature})],
    }[method]
    return ([ce] if lamb > 0 else []) + kd


def distill(teacher: nn.Module | None, graph: Graph, split: Split, method: str = "glnn", *, seed: int = 0,
            lamb: float = 0.0, temperature: float = 1.0, train: TrainConfig | None = None,
            observed: Tensor | None = None, noise: float = 1.0, run_dir: str | Path | None = None,
            resume: bool = False, progress: bool | None = False, terms: list[TermConfig] | None = None,
            **model_args) -> tuple[nn.Module, dict[str, Any]]:
    """Train an MLP student by ``method`` (see ``terms``) and return it with ``fit``'s result.

    The student trains on every observed node (``observed``: all nodes when None; GLNN's inductive
    setting passes the observed ones): CE where the node is a training node, the teacher's terms
    everywhere. ``method="mlp"`` trains on the labelled nodes alone and needs no teacher. With ``run_dir``
    the engine checkpoints and logs phase ``distill`` there (``resume`` continues it). ``terms`` replaces
    the method's objective (the method still picks the nodes and krd's reliability column)."""
    sets = node_sets(graph, split, observed=observed)
    seed_everything(seed)
    student = models.build("mlp", graph, **{**STUDENT_MODEL, **model_args})
    objective = Objective(terms if terms is not None else method_terms(method, lamb=lamb, temperature=temperature))
    if method == "mlp":
        data, answers = sets["train"], None
    else:
        if teacher is None:
            raise DistilleryError(f"method {method!r} distils from a teacher; pass the trained GNN.")
        data = sets["all"]
        if method == "krd":
            data = data.with_columns(reliability=reliability(teacher, noise, seed))
        answers = PrecomputedTeacher(ModuleTeacher(teacher), data)
    cfg = _full_batch(train or STUDENT_TRAIN, len(data))
    result = fit(student, objective, data, cfg, teacher=answers, eval_data=sets["val"], run_dir=run_dir,
                 phase="distill", seed=seed, resume=resume, progress=progress)
    return student.eval(), result


def accuracy(model: nn.Module, graph: Graph, nodes: Tensor) -> float:
    """Accuracy (%) of ``model`` at ``nodes``."""
    return 100 * evaluate(model, NodeData(graph, nodes, graph.y[nodes]))["accuracy"]


# --------------------------------------------------------------------------- inference cost


def _csr(edge_index: Tensor, n: int) -> tuple[Tensor, Tensor]:
    order = torch.argsort(edge_index[1] * n + edge_index[0])
    src, dst = edge_index[0][order], edge_index[1][order]
    ptr = torch.zeros(n + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(torch.bincount(dst, minlength=n), 0)
    return ptr, src


def khop(ptr: Tensor, nbr: Tensor, node: int, hops: int) -> Tensor:
    """The node and every node within ``hops`` hops of it (the node first), from a CSR adjacency."""
    seen = [node]
    known = {node}
    frontier = [node]
    for _ in range(hops):
        nxt = []
        for v in frontier:
            for u in nbr[ptr[v]:ptr[v + 1]].tolist():
                if u not in known:
                    known.add(u)
                    nxt.append(u)
        seen += nxt
        frontier = nxt
    return torch.tensor(seen)


@torch.inference_mode()
def inference_ms(gnn: models.GraphModel, mlp: models.MLP, nodes: Tensor, hops: int | None = None,
                 repeats: int = 3) -> dict[str, float]:
    """Per-node inference time (ms) of the GNN, which must fetch the node's ``hops``-hop neighbourhood
    (its layer count) and propagate over it, and of the MLP, which reads the node's features alone;
    one node at a time, as GLNN measures it. Median of ``repeats`` passes over ``nodes``."""
    gnn.eval()
    mlp.eval()
    n = gnn.num_nodes
    if hops is None:
        hops = gnn.k if isinstance(gnn, models.APPNP) else len(getattr(gnn, "lins", getattr(gnn, "neigh", [])))
    ptr, nbr = _csr(gnn.edge_index, n)
    x = gnn.features
    pos = torch.full((n,), -1, dtype=torch.long)

    def gnn_one(v: int) -> Tensor:
        sub = khop(ptr, nbr, v, hops)  # fetch the neighbourhood, then its edges from the CSR rows
        pos[sub] = torch.arange(len(sub))
        src = torch.cat([nbr[ptr[u]:ptr[u + 1]] for u in sub.tolist()])
        dst = torch.repeat_interleave(torch.arange(len(sub)), ptr[sub + 1] - ptr[sub])
        s = pos[src]
        keep = s >= 0
        e = torch.stack([s[keep], dst[keep]])
        pos[sub] = -1
        return gnn.embed(x[sub], e)[0]

    def mlp_one(v: int) -> Tensor:
        return mlp.mlp(x[v:v + 1])[0]

    def timed(fn) -> float:
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for v in nodes.tolist():
                fn(v)
            runs.append((time.perf_counter() - t0) * 1000 / len(nodes))
        return sorted(runs)[len(runs) // 2]

    gnn_one(int(nodes[0]))  # warm-up
    mlp_one(int(nodes[0]))
    g_ms, m_ms = timed(gnn_one), timed(mlp_one)
    return {"gnn_ms_per_node": g_ms, "mlp_ms_per_node": m_ms, "speedup": g_ms / m_ms}
