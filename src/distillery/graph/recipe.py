"""The graph recipe (``kind: graph``): a GNN teacher distilled into an MLP over node features.

    distillery run graph/glnn
    distillery run graph/glnn method=krd lamb=0.3 teacher.model=gcn split.setting=inductive

One run: the graph and its CPF split (``data``, ``split``), the GNN teacher trained on the labelled
nodes (phase ``teacher``), the MLP student trained by ``method`` (phase ``distill``; see
``distill.method_terms``), both measured on the test nodes. The defaults are GLNN's (``distill.TeacherTrain``,
``TEACHER_MODELS``, ...), the same the Python API uses.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..config import TermConfig, check_kwargs, to_dict
from ..errors import DistilleryError, close_matches
from ..rundir import say
from . import models
from .data import SOURCES, Graph, csbm, inductive, load, split
from .distill import STUDENT_MODEL, TEACHER_MODELS, Method, StudentTrain, TeacherTrain

DATA_SETS = (*SOURCES, "csbm")


def _check_args(fn: Any, args: dict[str, Any], where: str, skip: int = 0) -> None:
    """``args`` against ``fn``'s keyword parameters: known names, and values of their defaults' types
    (counts >= 1, a seed >= 0, finite numbers, dropout in [0, 1))."""
    check_kwargs(fn, args, where, skip=skip)
    params = inspect.signature(fn).parameters
    for k, v in args.items():
        default = params[k].default
        if isinstance(default, bool):
            ok, need = isinstance(v, bool), "true or false"
        elif isinstance(default, int):
            low = 0 if k == "seed" else 1
            ok, need = isinstance(v, int) and not isinstance(v, bool) and v >= low, f"an integer >= {low}"
        elif isinstance(default, float):
            ok, need = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a finite number"
            if ok and "dropout" in k:
                ok, need = 0 <= v < 1, "a number in [0, 1)"
        elif isinstance(default, str):
            ok, need = isinstance(v, str), "a string"
        else:
            ok, need = True, ""
        if not ok:
            raise DistilleryError(f"{where}.{k} must be {need}, got {v!r}.")


@dataclass
class GraphData:
    name: str = "cora"
    """cora | citeseer (the CPF npz files under the CPF / GLNN protocol) | csbm (a synthetic graph)."""
    root: str | None = None
    """Folder holding ``<name>.npz``; null: ``$DISTILLERY_GRAPH_DIR``, else shared/data/graphs."""
    csbm: dict[str, Any] = field(default_factory=dict)
    """``graph.csbm``'s arguments (num_nodes, num_classes, num_features, avg_degree, homophily, signal, seed)."""

    def __post_init__(self) -> None:
        if self.name not in DATA_SETS:
            near = close_matches(self.name, DATA_SETS)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise DistilleryError(f"data.name: unknown graph data set {self.name!r}.{hint} Known: {', '.join(DATA_SETS)} "
                                  "(csbm: synthetic, its arguments under data.csbm).")
        if self.csbm and self.name != "csbm":
            raise DistilleryError(f"data.csbm sets the synthetic graph's arguments, but data.name is {self.name!r}; "
                                  "set data.name: csbm, or remove data.csbm.")
        _check_args(csbm, self.csbm, "data.csbm")

    def load(self) -> Graph:
        return csbm(**self.csbm) if self.name == "csbm" else load(self.name, self.root)


@dataclass
class GraphSplit:
    """CPF's split (``graph.split``), drawn with the recipe's seed; every other node is a test node."""

    train_per_class: int = 20
    val_per_class: int = 30
    setting: Literal["transductive", "inductive"] = "transductive"
    """inductive (GLNN): a share of the test nodes and their edges are unseen in training."""
    inductive_share: float = 0.2

    def __post_init__(self) -> None:
        if self.train_per_class < 1 or self.val_per_class < 1:
            raise DistilleryError(f"split.train_per_class and split.val_per_class must be >= 1, got "
                                  f"{self.train_per_class} and {self.val_per_class}.")
        if not 0 < self.inductive_share < 1:
            raise DistilleryError(f"split.inductive_share must lie in (0, 1), got {self.inductive_share}.")


@dataclass
class GraphTeacher:
    model: Literal["sage", "gcn", "gat", "appnp"] = "sage"
    args: dict[str, Any] = field(default_factory=dict)
    """The model's arguments over ``distill.TEACHER_MODELS[model]`` (hidden, layers, dropout, ...)."""
    train: TeacherTrain = field(default_factory=TeacherTrain)

    def __post_init__(self) -> None:
        self.args = {**TEACHER_MODELS[self.model], **self.args}  # resolved: config.yaml shows every value
        _check_args(models.CLASSES[self.model], self.args, "teacher.args", skip=1)


@dataclass
class GraphStudent:
    """The MLP over node features (``graph.models.MLP``)."""

    args: dict[str, Any] = field(default_factory=dict)
    """The MLP's arguments over ``distill.STUDENT_MODEL`` (hidden, layers, dropout, norm)."""
    train: StudentTrain = field(default_factory=StudentTrain)

    def __post_init__(self) -> None:
        self.args = {**STUDENT_MODEL, **self.args}
        _check_args(models.MLP, self.args, "student.args", skip=1)


@dataclass
class GraphRecipe:
    kind: Literal["graph"] = "graph"
    name: str = ""
    data: GraphData = field(default_factory=GraphData)
    split: GraphSplit = field(default_factory=GraphSplit)
    teacher: GraphTeacher = field(default_factory=GraphTeacher)
    student: GraphStudent = field(default_factory=GraphStudent)
    method: Method = "glnn"
    """mlp (the student alone) | glnn | ffg2m | krd (``distill.method_terms``)."""
    lamb: float = 0.0
    """Weight of the labelled CE; the teacher's terms weigh 1 - lamb (GLNN: 0)."""
    terms: list[TermConfig] | None = None
    """The objective instead of the method's (``distill.method_terms`` of method, lamb, temperature), e.g.
    ``[{loss: ce, teacher: null, weight: 0.3}, {loss: kd, temperature: 2.0, weight: 0.7}]``; the method
    still chooses the nodes (mlp: the labelled ones) and krd's reliability column."""
    temperature: float = 1.0
    """ffg2m and krd (GLNN's KL has none)."""
    noise: float = 1.0
    """krd: std of the feature noise that measures the teacher's reliability."""
    latency_nodes: int = 100
    """Test nodes timed one at a time on the CPU (``distill.inference_ms``); 0: no timing."""
    seed: int = 0
    threads: int = 2
    runs_dir: str = "runs"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lamb) and 0 <= self.lamb <= 1):
            raise DistilleryError(f"lamb must lie in [0, 1] (the labelled CE's weight; the teacher's terms get "
                                  f"1 - lamb), got {self.lamb}; GLNN uses lamb: 0.")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise DistilleryError(f"temperature must be a finite number > 0, got {self.temperature}.")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise DistilleryError(f"noise must be a finite number >= 0, got {self.noise}.")
        if self.latency_nodes < 0:
            raise DistilleryError(f"latency_nodes must be >= 0 (0: no timing), got {self.latency_nodes}.")
        if self.threads < 1:
            raise DistilleryError(f"threads must be >= 1, got {self.threads}.")
        if self.terms is not None:  # losses and their parameters checked now, not after the teacher trained
            from ..objective import Term

            if not self.terms:
                raise DistilleryError("terms is empty; give at least one term, or null for the method's.")
            [Term.from_config(t) for t in self.terms]


# --------------------------------------------------------------------------- the run


@torch.no_grad()
def _predict(model: nn.Module, n: int) -> Tensor:
    """The class of every node (N,), on the CPU."""
    device = next(model.parameters()).device
    return model.eval()(torch.arange(n, device=device)).argmax(-1).cpu()


def _acc(pred: Tensor, y: Tensor, nodes: Tensor) -> float:
    return float((pred[nodes] == y[nodes]).float().mean())


DEGREE_BINS = ((0, 0), (1, 1), (2, 2), (3, 4), (5, 8), (9, None))


def degree_buckets(g: Graph, nodes: Tensor) -> list[tuple[str, Tensor]]:
    """``nodes`` grouped by their degree in ``g``: (label, node ids) per non-empty bucket."""
    deg = torch.bincount(g.edge_index[1], minlength=g.num_nodes)[nodes]
    out = []
    for lo, hi in DEGREE_BINS:
        keep = (deg >= lo) & (deg <= hi if hi is not None else True)
        if bool(keep.any()):
            out.append((str(lo) if lo == hi else f"{lo}+" if hi is None else f"{lo}-{hi}", nodes[keep]))
    return out


def plot_by_degree(path, g: Graph, nodes: Tensor, preds: dict[str, Tensor], title: str) -> None:
    """Grouped bars: test accuracy of each model per degree bucket (node counts under the labels)."""

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..report.plots import phase_color, save_png

    buckets = degree_buckets(g, nodes)
    fig = Figure(figsize=(6.4, 3.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(preds)
    for i, (label, pred) in enumerate(preds.items()):
        accs = [100 * _acc(pred, g.y, b) for _, b in buckets]
        xs = [j + (i - (len(preds) - 1) / 2) * width for j in range(len(buckets))]
        ax.bar(xs, accs, width, label=f"{label} ({100 * _acc(pred, g.y, nodes):.1f}% overall)",
               color=phase_color("teacher" if label.startswith("teacher") else "distill"))
    ax.set_xticks(range(len(buckets)), [f"{name}\n(n={len(b)})" for name, b in buckets])
    ax.set_xlabel("node degree")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 118)  # headroom for the legend above the bars
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper center", ncols=len(preds), fontsize=8, frameon=False)
    save_png(fig, path, dpi=110)


def run(recipe: GraphRecipe, rd, *, progress: bool | None = None) -> list[dict]:
    """The graph kind's run (see ``kinds``): teacher, student, both measured on the test nodes.

    Rows: model (teacher | student), phase, arch, method, accuracy (test, 0..1), val_accuracy, agreement
    (the student's test predictions with the teacher's), params, latency_ms (per node, one at a time on
    the CPU; the GNN fetches its neighbourhood), speedup; inductive runs add accuracy_observed and
    accuracy_inductive (the test nodes seen in training, and the held-out ones)."""
    import copy

    from ..models import num_params
    from ..pipeline import save_weights
    from ..rundir import writer
    from . import distill as D

    seed = recipe.seed
    g = recipe.data.load()
    s = split(g.y, seed, recipe.split.train_per_class, recipe.split.val_per_class, g.num_classes)
    train_graph, train_split, observed, hidden = g, s, None, None
    if recipe.split.setting == "inductive":  # the held-out test nodes and their edges are unseen until test time
        train_split, hidden = inductive(s, seed, recipe.split.inductive_share)
        train_graph = g.without_nodes(hidden)
        keep = torch.ones(g.num_nodes, dtype=torch.bool)
        keep[hidden] = False
        observed = keep.nonzero().squeeze(1)
    say(progress, f"graph: {g.name}, {g.num_nodes} nodes, {g.num_edges} edges, {g.num_classes} classes; "
                   f"{len(s.train)} train / {len(s.val)} val / {len(s.test)} test nodes ({recipe.split.setting})")

    teacher = D.train_teacher(train_graph, train_split, recipe.teacher.model, seed=seed, train=recipe.teacher.train,
                              run_dir=rd.path, resume=rd.resume, progress=progress, **recipe.teacher.args)
    save_weights(teacher, rd.models / "teacher.safetensors",
                 {"model": recipe.teacher.model, "args": recipe.teacher.args, "graph": g.name})
    student, _ = D.distill(teacher, train_graph, train_split, recipe.method, seed=seed, lamb=recipe.lamb,
                           temperature=recipe.temperature, terms=recipe.terms, train=recipe.student.train, observed=observed,
                           noise=recipe.noise, run_dir=rd.path, resume=rd.resume, progress=progress,
                           **recipe.student.args)
    save_weights(student, rd.models / "student.safetensors",
                 {"model": "mlp", "args": recipe.student.args, "method": recipe.method, "graph": g.name,
                  "train": to_dict(recipe.student.train)})

    if hidden is not None:
        teacher.use_graph(g)  # at test time the GNN sees every edge (GLNN's inductive evaluation)
    preds = {"teacher": _predict(teacher, g.num_nodes), "student": _predict(student, g.num_nodes)}
    timing: dict[str, float | None] = {"gnn_ms_per_node": None, "mlp_ms_per_node": None, "speedup": None}
    if recipe.latency_nodes:
        timing.update(D.inference_ms(copy.deepcopy(teacher).cpu(), copy.deepcopy(student).cpu(),
                                     s.test[:recipe.latency_nodes]))
    rows = []
    for name, model in (("teacher", teacher), ("student", student)):
        pred = preds[name]
        row: dict[str, Any] = {
            "model": name, "phase": "teacher" if name == "teacher" else "distill",
            "arch": recipe.teacher.model if name == "teacher" else "mlp",
            "method": None if name == "teacher" else recipe.method,
            "accuracy": _acc(pred, g.y, s.test), "val_accuracy": _acc(pred, g.y, s.val),
            "agreement": None if name == "teacher" else float((pred[s.test] == preds["teacher"][s.test]).float().mean()),
            "params": num_params(model),
            "latency_ms": timing["gnn_ms_per_node" if name == "teacher" else "mlp_ms_per_node"],
            "speedup": None if name == "teacher" else timing["speedup"],
        }
        if hidden is not None:
            row.update(accuracy_observed=_acc(pred, g.y, train_split.test), accuracy_inductive=_acc(pred, g.y, hidden))
        rows.append(row)

    if writer():
        plot_by_degree(rd.figure("accuracy_by_degree.png", "Test accuracy by node degree: the GNN teacher and "
                                 "the MLP student (degrees in the full graph)"),
                       g, s.test, {f"teacher ({recipe.teacher.model})": preds["teacher"],
                                   f"student ({recipe.method})": preds["student"]},
                       f"{g.name}: {recipe.teacher.model} -> MLP by {recipe.method}")
    return rows
