"""GNN teachers (GCN, GraphSAGE, GAT, APPNP) and the MLP student, in plain torch.

Every model takes node ids and returns their logits: ``model(ids) -> (len(ids), C)``. A GNN holds
its graph (features and edges) as non-persistent buffers and propagates over the whole graph,
then indexes the requested nodes; the MLP holds only a feature table and never reads edges. So
the engine, objectives and teachers treat both like any other model over ``x = ids``, and the
saved weights are the learned parameters alone. Aggregation is a scatter-add over the edge list
(``index_add_``), the sparse product A @ H without a sparse-tensor dependency.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DistilleryError
from .data import Graph

KINDS = ("gcn", "sage", "gat", "appnp", "mlp")


def _norm(kind: str, width: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm1d(width)
    if kind == "layer":
        return nn.LayerNorm(width)
    raise DistilleryError(f"norm must be none, batch or layer, got {kind!r}.")


def with_self_loops(edge_index: Tensor, n: int) -> Tensor:
    loops = torch.arange(n, device=edge_index.device)
    return torch.cat([edge_index, torch.stack([loops, loops])], dim=1)


def gcn_weights(edge_index: Tensor, n: int) -> Tensor:
    """Symmetric normalisation D^-1/2 (A + I) D^-1/2 as one weight per edge of ``edge_index`` (which
    must already hold the self-loops)."""
    deg = torch.zeros(n, device=edge_index.device).index_add_(
        0, edge_index[1], torch.ones(edge_index.shape[1], device=edge_index.device))
    inv = deg.clamp(min=1).rsqrt()
    return inv[edge_index[0]] * inv[edge_index[1]]


def propagate(h: Tensor, edge_index: Tensor, weight: Tensor | None = None) -> Tensor:
    """out_i = sum over edges (j -> i) of weight_ji * h_j."""
    src, dst = edge_index
    msg = h[src] if weight is None else h[src] * weight.unsqueeze(-1)
    return torch.zeros_like(h).index_add_(0, dst, msg)


class GraphModel(nn.Module):
    """Base of the GNNs: graph buffers, ``forward(ids)`` = ``embed()[ids]``."""

    def __init__(self, graph: Graph):
        super().__init__()
        self.num_nodes = graph.num_nodes
        self.register_buffer("features", graph.x, persistent=False)
        self.register_buffer("edge_index", graph.edge_index, persistent=False)

    def use_graph(self, graph: Graph) -> GraphModel:
        """Propagate over another graph on the same nodes (GLNN's inductive evaluation: the model
        trained on the observed graph is evaluated on the full one)."""
        if graph.num_nodes != self.num_nodes or graph.x.shape != self.features.shape:
            raise DistilleryError(f"use_graph: the model was built for {self.num_nodes} nodes with features "
                                  f"{tuple(self.features.shape)}, the graph has {tuple(graph.x.shape)}.")
        self.features, self.edge_index = graph.x.to(self.features.device), graph.edge_index.to(self.features.device)
        return self

    def forward(self, ids: Tensor) -> Tensor:
        return self.embed(self.features, self.edge_index)[ids]

    def embed(self, x: Tensor, edge_index: Tensor) -> Tensor:  # (N, F), (2, E) -> (N, C)
        raise NotImplementedError


class GCN(GraphModel):
    """Kipf & Welling, ICLR 2017: H' = act(D^-1/2 (A + I) D^-1/2 H W + b), the bias after propagation
    (as the paper and DGL's GraphConv)."""

    def __init__(self, graph: Graph, hidden: int = 64, layers: int = 2, dropout: float = 0.5, norm: str = "none"):
        super().__init__(graph)
        dims = [graph.x.shape[1], *[hidden] * (layers - 1), graph.num_classes]
        self.lins = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in pairwise(dims))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(b)) for b in dims[1:])
        self.norms = nn.ModuleList(_norm(norm, hidden) for _ in range(layers - 1))
        self.dropout = dropout

    def embed(self, x: Tensor, edge_index: Tensor) -> Tensor:
        e = with_self_loops(edge_index, len(x))
        w = gcn_weights(e, len(x))
        h = x
        for i, lin in enumerate(self.lins):
            h = propagate(lin(F.dropout(h, self.dropout, self.training)), e, w) + self.biases[i]
            if i < len(self.lins) - 1:
                h = F.relu(self.norms[i](h))
        return h


class SAGE(GraphModel):
    """Hamilton, Ying & Leskovec, NeurIPS 2017, full neighbourhoods (no sampling).

    ``aggregator="mean"``: h_i' = W_self h_i + W_neigh mean_{j in N(i)} h_j (the paper's mean
    aggregator with DGL's separate self weight). ``aggregator="gcn"``: h_i' = W (h_i + sum_j h_j) /
    (deg_i + 1), DGL's ``gcn`` aggregator, which GLNN's SAGE teacher uses. GLNN trains with sampled
    neighbourhoods (fan-out 5, 5); we train on full ones, as it infers."""

    def __init__(self, graph: Graph, hidden: int = 128, layers: int = 2, dropout: float = 0.0, norm: str = "none",
                 aggregator: str = "mean"):
        super().__init__(graph)
        if aggregator not in ("mean", "gcn"):
            raise DistilleryError(f"sage: aggregator must be mean or gcn, got {aggregator!r}.")
        dims = [graph.x.shape[1], *[hidden] * (layers - 1), graph.num_classes]
        self.aggregator = aggregator
        self.neigh = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(dims))
        self.self_ = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in pairwise(dims)) \
            if aggregator == "mean" else None
        self.norms = nn.ModuleList(_norm(norm, hidden) for _ in range(layers - 1))
        self.dropout = dropout

    def embed(self, x: Tensor, edge_index: Tensor) -> Tensor:
        n = len(x)
        deg = torch.zeros(n, device=x.device).index_add_(
            0, edge_index[1], torch.ones(edge_index.shape[1], device=x.device)).unsqueeze(-1)
        h = x
        for i, lin in enumerate(self.neigh):
            h = F.dropout(h, self.dropout, self.training)
            agg = propagate(h, edge_index)
            if self.aggregator == "mean":
                h = lin(agg / deg.clamp(min=1)) + self.self_[i](h)
            else:
                h = lin((agg + h) / (deg + 1))
            if i < len(self.neigh) - 1:
                h = F.relu(self.norms[i](h))
        return h


class GAT(GraphModel):
    """Velickovic et al., ICLR 2018: per head, alpha_ij = softmax_j(LeakyReLU(a_l . W h_j + a_r . W h_i))
    over j in N(i) and i itself (self-loops added); heads concatenated in hidden layers and averaged
    at the output (as DGL's GATConv examples)."""

    def __init__(self, graph: Graph, hidden: int = 8, layers: int = 2, heads: int = 8, dropout: float = 0.6,
                 attn_dropout: float = 0.6, negative_slope: float = 0.2):
        super().__init__(graph)
        self.heads, self.dropout, self.attn_dropout, self.slope = heads, dropout, attn_dropout, negative_slope
        dims_in = [graph.x.shape[1], *[hidden * heads] * (layers - 1)]
        dims_out = [*[hidden] * (layers - 1), graph.num_classes]
        self.lins = nn.ModuleList(nn.Linear(a, b * heads, bias=False) for a, b in zip(dims_in, dims_out))
        self.att_l = nn.ParameterList(nn.Parameter(torch.empty(heads, b)) for b in dims_out)
        self.att_r = nn.ParameterList(nn.Parameter(torch.empty(heads, b)) for b in dims_out)
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(b * heads if i < layers - 1 else b))
                                     for i, b in enumerate(dims_out))
        for p in [*self.att_l, *self.att_r]:
            nn.init.xavier_normal_(p)
        for lin in self.lins:
            nn.init.xavier_normal_(lin.weight, gain=nn.init.calculate_gain("relu"))

    def embed(self, x: Tensor, edge_index: Tensor) -> Tensor:
        n = len(x)
        src, dst = with_self_loops(edge_index, n)
        h = x
        last = len(self.lins) - 1
        for i, lin in enumerate(self.lins):
            h = F.dropout(h, self.dropout, self.training)
            z = lin(h).view(n, self.heads, -1)  # (N, H, D)
            el, er = (z * self.att_l[i]).sum(-1), (z * self.att_r[i]).sum(-1)  # (N, H)
            e = F.leaky_relu(el[src] + er[dst], self.slope)  # (E, H)
            e_max = torch.full((n, self.heads), float("-inf"), device=x.device).scatter_reduce(
                0, dst.unsqueeze(-1).expand_as(e), e, reduce="amax")
            w = torch.exp(e - e_max[dst])
            denom = torch.zeros(n, self.heads, device=x.device).index_add_(0, dst, w)
            alpha = F.dropout(w / denom[dst], self.attn_dropout, self.training)
            out = torch.zeros_like(z).index_add_(0, dst, z[src] * alpha.unsqueeze(-1))  # (N, H, D)
            if i < last:
                h = F.elu(out.reshape(n, -1) + self.bias[i])
            else:
                h = out.mean(1) + self.bias[i]
        return h


class APPNP(GraphModel):
    """Gasteiger, Bojchevski & Guennemann, ICLR 2019: H = MLP(X); Z^0 = H;
    Z^{k+1} = (1 - alpha) D^-1/2 (A + I) D^-1/2 Z^k + alpha H, K steps."""

    def __init__(self, graph: Graph, hidden: int = 64, layers: int = 2, dropout: float = 0.5, k: int = 10,
                 alpha: float = 0.1):
        super().__init__(graph)
        dims = [graph.x.shape[1], *[hidden] * (layers - 1), graph.num_classes]
        self.lins = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(dims))
        self.dropout, self.k, self.alpha = dropout, k, alpha

    def embed(self, x: Tensor, edge_index: Tensor) -> Tensor:
        h = x
        for i, lin in enumerate(self.lins):
            h = lin(F.dropout(h, self.dropout, self.training))
            if i < len(self.lins) - 1:
                h = F.relu(h)
        e = with_self_loops(edge_index, len(x))
        w = gcn_weights(e, len(x))
        z = h
        for _ in range(self.k):
            z = (1 - self.alpha) * propagate(z, e, w) + self.alpha * h
        return z


class MLP(nn.Module):
    """The graph-free student: logits from node features alone. ``mlp`` is the network that is
    served (``mlp(features)``); ``forward(ids)`` looks the features up in a non-persistent table."""

    def __init__(self, graph: Graph, hidden: int = 128, layers: int = 2, dropout: float = 0.0, norm: str = "none"):
        super().__init__()
        self.register_buffer("features", graph.x, persistent=False)
        dims = [graph.x.shape[1], *[hidden] * (layers - 1), graph.num_classes]
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(pairwise(dims)):  # GLNN's MLP: dropout after hidden layers only
            mods.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                mods += [_norm(norm, b), nn.ReLU(), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*mods)

    def forward(self, ids: Tensor) -> Tensor:
        return self.mlp(self.features[ids])


def build(kind: str, graph: Graph, **kwargs) -> nn.Module:
    """A model of ``kind`` (gcn, sage, gat, appnp, mlp) for ``graph``; kwargs are the class's."""
    if kind not in CLASSES:
        from ..errors import unknown

        raise unknown("graph model", kind, list(CLASSES))
    from ..config import check_kwargs

    check_kwargs(CLASSES[kind], kwargs, f"graph model {kind!r}", skip=1)
    return CLASSES[kind](graph, **kwargs)


CLASSES: dict[str, type[nn.Module]] = {"gcn": GCN, "sage": SAGE, "gat": GAT, "appnp": APPNP, "mlp": MLP}
