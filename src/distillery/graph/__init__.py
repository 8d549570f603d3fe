"""GNN-to-MLP distillation: graphs, GNN teachers in plain torch, MLP students, and the edge-wise
losses of FF-G2M and KRD. See ``distillery.graph.distill`` for the methods (GLNN, FF-G2M, KRD)."""

from .data import Graph, NodeData, Split, csbm, inductive, load, node_sets, read_npz, split, standardize

__all__ = ["Graph", "NodeData", "Split", "csbm", "inductive", "load", "node_sets", "read_npz", "split", "standardize"]
