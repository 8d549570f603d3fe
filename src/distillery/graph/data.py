"""Node-classification graphs: the CPF npz files (Cora, Citeseer), the CPF / GLNN protocol, and a
contextual stochastic block model for fast tests.

A ``Graph`` holds dense node features ``x`` (N, F), labels ``y`` (N,) and an undirected edge list
``edge_index`` (2, E) with both directions of every edge and no self-loops. Models and data sets
address nodes by id (0..N-1): ``NodeData`` is a ``TensorData`` whose inputs are node ids, so the
engine, objectives and teachers work unchanged, and each batch also carries ``edges``, the edges
among the batch's nodes in batch positions (what the edge-wise losses of FF-G2M and KRD read).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..data.core import TensorData
from ..errors import DistilleryError

SOURCES = {
    "cora": "Cora (Planetoid, Sen et al. 2008)",
    "citeseer": "Citeseer (Planetoid, Sen et al. 2008)",
}
ENV_DIR = "DISTILLERY_GRAPH_DIR"


@dataclass
class Graph:
    x: Tensor
    """Node features (N, F), float32."""
    y: Tensor
    """Labels (N,), int64, 0..C-1."""
    edge_index: Tensor
    """(2, E) int64: both directions of every undirected edge, no self-loops, sorted."""
    num_classes: int
    name: str = ""
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_graph(self.x, self.y, self.edge_index, self.name)

    @property
    def num_nodes(self) -> int:
        return len(self.x)

    @property
    def num_edges(self) -> int:
        """Undirected edges (each stored in both directions)."""
        return self.edge_index.shape[1] // 2

    def without_nodes(self, hidden: Tensor) -> Graph:
        """The same nodes with every edge that touches a node in ``hidden`` removed (GLNN's inductive
        setting: those nodes and their edges are not observed in training). Node ids do not change."""
        mask = torch.zeros(self.num_nodes, dtype=torch.bool)
        mask[hidden] = True
        keep = ~(mask[self.edge_index[0]] | mask[self.edge_index[1]])
        return Graph(self.x, self.y, self.edge_index[:, keep], self.num_classes, f"{self.name}/observed", self.class_names)


def check_graph(x: Tensor, y: Tensor, edge_index: Tensor, name: str) -> None:
    where = name or "graph"
    if x.dim() != 2:
        raise DistilleryError(f"{where}: node features must be (N, F), got shape {tuple(x.shape)}.")
    n = len(x)
    if y.shape != (n,):
        raise DistilleryError(f"{where}: {len(y)} labels for {n} nodes; give one label per node (shape (N,)).")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise DistilleryError(f"{where}: edge_index must be (2, E), got shape {tuple(edge_index.shape)}.")
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= n):
        bad = int(edge_index.max()) if int(edge_index.max()) >= n else int(edge_index.min())
        raise DistilleryError(f"{where}: edge index {bad} is out of range for {n} nodes (valid: 0..{n - 1}).")


def undirected(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Both directions of every edge, self-loops and duplicates removed, sorted by (source, target)."""
    src, dst = edge_index
    src, dst = torch.cat([src, dst]), torch.cat([dst, src])
    keep = src != dst
    key = torch.unique(src[keep] * num_nodes + dst[keep])
    return torch.stack([key // num_nodes, key % num_nodes])


def components(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Connected-component label of every node (N,), by label propagation to the minimum id."""
    label = torch.arange(num_nodes)
    src, dst = edge_index
    while True:
        new = label.clone().scatter_reduce_(0, dst, label[src], reduce="amin")
        new = new[new]  # pointer jumping: follow labels to their own labels
        if torch.equal(new, label):
            return label
        label = new


def largest_component(g: Graph) -> Graph:
    """The subgraph on the largest connected component, nodes renumbered in their old order
    (as CPF's ``largest_connected_components``; ties go to the component with the smallest id)."""
    comp = components(g.edge_index, g.num_nodes)
    counts = torch.bincount(comp, minlength=g.num_nodes)
    keep = comp == int(torch.argmax(counts))
    new_id = torch.full((g.num_nodes,), -1, dtype=torch.long)
    new_id[keep] = torch.arange(int(keep.sum()))
    e = new_id[g.edge_index]
    e = e[:, (e >= 0).all(0)]
    return Graph(g.x[keep], g.y[keep], e, g.num_classes, g.name, g.class_names)


class _Arrays(dict):
    @property
    def files(self) -> list[str]:
        return list(self)


def _csr(d, prefix: str, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    need = [f"{prefix}_{k}" for k in ("data", "indices", "indptr", "shape")]
    missing = [k for k in need if k not in d.files]
    if missing:
        raise DistilleryError(f"{path}: not a CPF graph file; it lacks {missing} (it has {sorted(d.files)}).")
    data, indices, indptr, shape = (d[k] for k in need)
    rows, cols = (int(s) for s in shape)
    if len(indptr) != rows + 1 or indptr[-1] != len(indices):
        raise DistilleryError(f"{path}: {prefix} is not a valid CSR matrix (indptr/indices lengths disagree).")
    return data, indices, indptr, (rows, cols)


def read_npz(path: str | Path, name: str | None = None) -> Graph:
    """A graph from a CPF npz file (CSR ``adj_*`` and ``attr_*``, ``labels``), as given: directed
    edges, self-loops and every component kept. ``standardize`` applies the CPF protocol.
    Read with ``allow_pickle=False``: a file with pickled objects is refused."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            d = _Arrays({k: npz[k] for k in npz.files})  # every array read: any pickled one is refused
            _, a_idx, a_ptr, a_shape = _csr(d, "adj", path)
            f_data, f_idx, f_ptr, f_shape = _csr(d, "attr", path)
            if "labels" not in d.files:
                raise DistilleryError(f"{path}: the file has no 'labels' array.")
            labels = d["labels"]
            class_names = [str(c) for c in d["class_names"]] if "class_names" in d.files else []
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise DistilleryError(f"{path}: the file holds pickled objects, which distillery never loads "
                                  "(they can run code); store plain numeric arrays and strings instead.") from e
        raise
    n = a_shape[0]
    if a_shape != (n, n) or f_shape[0] != n:
        raise DistilleryError(f"{path}: the adjacency is {a_shape} and the features {f_shape}; both need N rows "
                              "and the adjacency must be N x N.")
    if labels.ndim != 1 or len(labels) != n:
        raise DistilleryError(f"{path}: {len(labels)} labels for {n} nodes; the file needs one label per node.")
    rows = np.repeat(np.arange(n), np.diff(a_ptr))
    edges = torch.from_numpy(np.stack([rows, a_idx.astype(np.int64)]))
    x = np.zeros(f_shape, dtype=np.float32)
    x[np.repeat(np.arange(n), np.diff(f_ptr)), f_idx] = f_data
    y = torch.from_numpy(labels.astype(np.int64))
    if int(y.min()) < 0:
        raise DistilleryError(f"{path}: labels must be 0..C-1, found {int(y.min())}.")
    num_classes = max(int(y.max()) + 1, len(class_names))
    return Graph(torch.from_numpy(x), y, edges, num_classes, name or path.stem, class_names)


def standardize(g: Graph) -> Graph:
    """CPF / GLNN protocol: undirected, self-loops removed, largest connected component kept."""
    und = Graph(g.x, g.y, undirected(g.edge_index, g.num_nodes), g.num_classes, g.name, g.class_names)
    return largest_component(und)


def default_dir() -> Path:
    """``$DISTILLERY_GRAPH_DIR``, else ``shared/data/graphs`` beside or inside the repository."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    root = Path(__file__).resolve().parents[3]
    for cand in (root.parent / "shared" / "data" / "graphs", root / "shared" / "data" / "graphs"):
        if cand.is_dir():
            return cand
    return root.parent / "shared" / "data" / "graphs"


def load(name: str, root: str | Path | None = None) -> Graph:
    """Cora or Citeseer under the CPF / GLNN protocol (Cora: 2485 nodes, Citeseer: 2110)."""
    if name not in SOURCES:
        from ..errors import unknown

        raise unknown("graph", name, list(SOURCES))
    folder = Path(root) if root is not None else default_dir()
    path = folder / f"{name}.npz"
    if not path.is_file():
        raise DistilleryError(
            f"{SOURCES[name]} is not at {path}. It is the npz file of the CPF repository (BUPT-GAMMA/CPF, "
            f"data/npz/{name}.npz), the one GLNN (snap-research/graphless-neural-networks) reads; put it there, "
            f"pass root=FOLDER, or set ${ENV_DIR}.")
    return standardize(read_npz(path, name))


@dataclass
class Split:
    train: Tensor
    val: Tensor
    test: Tensor


def split(y: Tensor, seed: int, train_per_class: int = 20, val_per_class: int = 30, num_classes: int | None = None) -> Split:
    """CPF's split (``get_train_val_test_split``): per class, ``train_per_class`` nodes drawn with
    ``numpy.random.RandomState(seed)`` for training, then ``val_per_class`` of the rest for validation;
    every other node is test. Sorted node ids."""
    labels = y.numpy()
    c = num_classes or int(labels.max()) + 1
    rng = np.random.RandomState(seed)
    need = train_per_class + val_per_class
    counts = np.bincount(labels, minlength=c)
    short = [k for k in range(c) if counts[k] < need]
    if short:
        raise DistilleryError(f"class(es) {short} have {[int(counts[k]) for k in short]} nodes, fewer than the "
                              f"{need} a split of {train_per_class} train + {val_per_class} validation per class needs; "
                              "lower train_per_class / val_per_class.")

    def draw(per_class: int, forbidden: np.ndarray) -> np.ndarray:
        out = []
        for k in range(c):
            pool = np.setdiff1d(np.flatnonzero(labels == k), forbidden)
            out.append(rng.choice(pool, per_class, replace=False))
        return np.sort(np.concatenate(out))

    train = draw(train_per_class, np.array([], dtype=np.int64))
    val = draw(val_per_class, train)
    test = np.setdiff1d(np.arange(len(labels)), np.concatenate([train, val]))
    return Split(*(torch.from_numpy(a.astype(np.int64)) for a in (train, val, test)))


def inductive(s: Split, seed: int, share: float = 0.2) -> tuple[Split, Tensor]:
    """GLNN's inductive setting: a ``share`` of the test nodes (drawn with ``seed``) is held out with
    its edges. Returns the split whose test set is the observed test nodes, and the held-out ids."""
    if not 0 < share < 1:
        raise DistilleryError(f"inductive share must be in (0, 1), got {share}.")
    g = torch.Generator().manual_seed(seed)
    perm = s.test[torch.randperm(len(s.test), generator=g)]
    n_ind = round(share * len(perm))
    hidden = torch.sort(perm[:n_ind]).values
    return Split(s.train, s.val, torch.sort(perm[n_ind:]).values), hidden


def csbm(num_nodes: int = 600, num_classes: int = 3, num_features: int = 32, avg_degree: float = 6.0,
         homophily: float = 0.8, signal: float = 1.0, seed: int = 0) -> Graph:
    """A contextual stochastic block model (Deshpande et al. 2018): balanced classes; each node has
    ``avg_degree`` expected neighbours, a share ``homophily`` of them in its own class; features are
    the class mean (a random unit direction scaled by ``signal``) plus standard Gaussian noise."""
    if not 0 <= homophily <= 1:
        raise DistilleryError(f"csbm: homophily must be in [0, 1], got {homophily}.")
    if num_classes < 2 or num_nodes < 2 * num_classes:
        raise DistilleryError(f"csbm: need num_classes >= 2 and at least 2 nodes per class, got {num_nodes} nodes "
                              f"and {num_classes} classes.")
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_nodes) % num_classes
    y = y[torch.randperm(num_nodes, generator=g)]
    same = (y[:, None] == y[None, :]).float()
    n_same = num_nodes / num_classes
    p_in = homophily * avg_degree / n_same
    p_out = (1 - homophily) * avg_degree / (num_nodes - n_same)
    prob = same * p_in + (1 - same) * p_out
    upper = torch.triu(torch.rand(num_nodes, num_nodes, generator=g) < prob, diagonal=1)
    edges = undirected(upper.nonzero().T, num_nodes)
    means = torch.randn(num_classes, num_features, generator=g)
    means = signal * means / means.norm(dim=1, keepdim=True)
    x = means[y] + torch.randn(num_nodes, num_features, generator=g)
    return Graph(x, y, edges, num_classes, f"csbm-h{homophily}-s{signal}-seed{seed}")


class NodeData(TensorData):
    """Nodes of one graph as a data set: ``x`` and ``ids`` are the node ids, ``y`` the labels
    (-100 for nodes whose label is not used: the loss masks them). ``batch`` adds ``edges`` (2, E_b),
    the graph's edges among the batch's nodes, indexed by position in the batch, and every entry of
    ``columns`` (per-node tensors of length N, such as KRD's ``reliability``) at the batch's nodes."""

    def __init__(self, graph: Graph, nodes: Tensor, y: Tensor | None, name: str = "",
                 columns: dict[str, Tensor] | None = None):
        nodes = nodes.long()
        super().__init__(nodes, y, nodes, graph.num_classes, name or graph.name)
        self.graph = graph
        self.columns = dict(columns or {})
        for k, v in self.columns.items():
            if len(v) != graph.num_nodes:
                raise DistilleryError(f"{self.name}: column {k!r} has {len(v)} rows for {graph.num_nodes} nodes; "
                                      "give one value per node of the graph.")
        self._pos = torch.full((graph.num_nodes,), -1, dtype=torch.long)

    def batch(self, index: Tensor) -> dict[str, Tensor]:
        out = super().batch(index)
        pos = self._pos
        pos[out["id"]] = torch.arange(len(index))
        e = pos[self.graph.edge_index]
        out["edges"] = e[:, (e >= 0).all(0)]
        pos[out["id"]] = -1
        for k, v in self.columns.items():
            out[k] = v[out["id"]]
        return out

    def with_columns(self, **columns: Tensor) -> NodeData:
        return NodeData(self.graph, self.ids, self.y, self.name, {**self.columns, **columns})

    def unlabelled(self, name: str | None = None) -> NodeData:
        return NodeData(self.graph, self.ids, None, name or self.name, self.columns)

    def subset(self, index: Tensor, name: str | None = None) -> NodeData:
        return NodeData(self.graph, self.ids[index], None if self.y is None else self.y[index], name or self.name,
                        self.columns)


def node_sets(graph: Graph, s: Split, *, observed: Tensor | None = None) -> dict[str, NodeData]:
    """The data sets of one split: ``train`` (labelled training nodes), ``val``, ``test``, and
    ``all``: every observed node, labelled only at the training nodes (-100 elsewhere), the set the
    student of GLNN trains on (labels where known, the teacher everywhere)."""
    nodes = torch.arange(graph.num_nodes) if observed is None else torch.sort(observed).values
    masked = torch.full((graph.num_nodes,), -100, dtype=torch.long)
    masked[s.train] = graph.y[s.train]
    return {
        "train": NodeData(graph, s.train, graph.y[s.train], f"{graph.name}/train"),
        "val": NodeData(graph, s.val, graph.y[s.val], f"{graph.name}/val"),
        "test": NodeData(graph, s.test, graph.y[s.test], f"{graph.name}/test"),
        "all": NodeData(graph, nodes, masked[nodes], f"{graph.name}/all"),
    }
