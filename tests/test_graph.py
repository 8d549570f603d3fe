"""GNN-to-MLP distillation: graph data, models, the edge-wise losses, and the methods end to end."""

import math

import numpy as np
import pytest
import torch

from distillery import graph, losses
from distillery.config import TermConfig
from distillery.errors import DistilleryError
from distillery.graph import distill as D
from distillery.graph import models
from distillery.graph.data import Graph, NodeData, components, largest_component, undirected
from distillery.losses.graph import KRDState, entropy_shift, ffg2m_high, ffg2m_low, fit_power, krd
from distillery.objective import Objective


def tiny_graph(n=6, f=3, c=2, edges=((0, 1), (1, 2), (3, 4))):
    g = torch.Generator().manual_seed(0)
    e = undirected(torch.tensor(edges).T, n)
    return Graph(torch.randn(n, f, generator=g), torch.arange(n) % c, e, c, "tiny")


# --------------------------------------------------------------------------- data


def test_undirected_drops_self_loops_and_duplicates():
    e = undirected(torch.tensor([[0, 1, 1, 2, 2], [1, 0, 1, 0, 2]]), 3)
    assert e.tolist() == [[0, 0, 1, 2], [1, 2, 0, 0]]


def test_largest_component_on_a_hand_made_graph():
    # components {0, 1, 2}, {3, 4}, {5}: the largest is kept and renumbered in order
    g = tiny_graph()
    assert components(g.edge_index, 6).tolist() == [0, 0, 0, 3, 3, 5]
    lcc = largest_component(g)
    assert lcc.num_nodes == 3 and torch.equal(lcc.x, g.x[:3]) and lcc.y.tolist() == [0, 1, 0]
    assert lcc.edge_index.tolist() == [[0, 1, 1, 2], [1, 0, 2, 1]]
    chain = undirected(torch.tensor([[5, 4, 3, 2, 1], [4, 3, 2, 1, 0]]), 7)  # pointer jumping along a chain
    assert components(chain, 7).tolist() == [0, 0, 0, 0, 0, 0, 6]


def test_split_sizes_disjoint_and_deterministic():
    g = graph.csbm(num_nodes=300, num_classes=3, seed=1)
    a, b, c = graph.split(g.y, 4, 5, 7), graph.split(g.y, 4, 5, 7), graph.split(g.y, 5, 5, 7)
    assert all(torch.equal(x, y) for x, y in zip((a.train, a.val, a.test), (b.train, b.val, b.test)))
    assert not torch.equal(a.train, c.train)
    assert torch.bincount(g.y[a.train]).tolist() == [5, 5, 5] and torch.bincount(g.y[a.val]).tolist() == [7, 7, 7]
    allnodes = torch.cat([a.train, a.val, a.test])
    assert len(allnodes) == 300 and len(torch.unique(allnodes)) == 300


def test_split_with_an_empty_class_is_a_clear_error():
    y = torch.tensor([0] * 60 + [1] * 60 + [2] * 3)
    with pytest.raises(DistilleryError, match=r"class\(es\) \[2\] have \[3\] nodes"):
        graph.split(y, 0, 20, 30, num_classes=3)
    with pytest.raises(DistilleryError, match=r"class\(es\) \[2, 3\] have \[0, 0\]"):
        graph.split(y[:120], 0, 20, 30, num_classes=4)  # a class with no node at all


def test_inductive_hides_test_nodes_and_their_edges():
    g = graph.csbm(num_nodes=200, seed=2)
    s = graph.split(g.y, 0, 5, 5)
    obs_split, hidden = graph.inductive(s, 0, share=0.2)
    assert len(hidden) == round(0.2 * len(s.test))
    assert set(hidden.tolist()).isdisjoint(obs_split.test.tolist())
    observed = g.without_nodes(hidden)
    touched = torch.isin(observed.edge_index, hidden).any()
    assert not touched and observed.num_edges < g.num_edges


def _write_cpf(path, n=4, labels=None, edges=((0, 1), (1, 2)), extra=None):
    rows, cols = zip(*edges)
    adj = np.zeros((n, n), np.float32)
    adj[list(rows), list(cols)] = 1
    ptr = np.concatenate([[0], np.cumsum((adj > 0).sum(1))]).astype(np.int32)
    idx = np.nonzero(adj)[1].astype(np.int32)
    feats = np.eye(n, 3, dtype=np.float32)
    fptr = np.concatenate([[0], np.cumsum((feats > 0).sum(1))]).astype(np.int32)
    arrays = dict(adj_data=np.ones(len(idx), np.float32), adj_indices=idx, adj_indptr=ptr, adj_shape=np.array([n, n]),
                  attr_data=feats[feats > 0], attr_indices=np.nonzero(feats)[1].astype(np.int32), attr_indptr=fptr,
                  attr_shape=np.array([n, 3]), labels=np.array(labels if labels is not None else [0, 1, 0, 1], np.int8))
    arrays.update(extra or {})
    np.savez(path, **arrays)


def test_read_npz_round_trip_and_standardize(tmp_path):
    _write_cpf(tmp_path / "g.npz", edges=((0, 1), (1, 2), (2, 2)))
    raw = graph.read_npz(tmp_path / "g.npz")
    assert raw.num_nodes == 4 and raw.edge_index.shape[1] == 3 and raw.x[1].tolist() == [0, 1, 0]
    g = graph.standardize(raw)  # undirected, no self-loop, node 3 (isolated) dropped
    assert g.num_nodes == 3 and g.edge_index.tolist() == [[0, 1, 1, 2], [1, 0, 2, 1]]


def test_bad_graph_files_are_clear_errors(tmp_path):
    _write_cpf(tmp_path / "p.npz", extra={"node_names": np.array([object(), object()], dtype=object)})
    with pytest.raises(DistilleryError, match="pickled objects"):  # even in an array we do not use
        graph.read_npz(tmp_path / "p.npz")
    _write_cpf(tmp_path / "l.npz", labels=[0, 1, 0])
    with pytest.raises(DistilleryError, match="3 labels for 4 nodes"):
        graph.read_npz(tmp_path / "l.npz")
    with pytest.raises(DistilleryError, match="edge index 9 is out of range for 3 nodes"):
        Graph(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), torch.tensor([[0, 9], [1, 0]]), 1)
    with pytest.raises(DistilleryError, match="BUPT-GAMMA/CPF"):
        graph.load("cora", root=tmp_path)
    with pytest.raises(DistilleryError, match="Did you mean 'cora'"):
        graph.load("coral")


def test_node_batches_carry_their_induced_edges_and_columns():
    g = tiny_graph()
    data = NodeData(g, torch.arange(6), g.y, columns={"reliability": torch.arange(6.0)})
    b = data.batch(torch.tensor([2, 0, 1, 4]))  # node ids 2, 0, 1, 4 at positions 0..3
    pairs = {(int(b["id"][i]), int(b["id"][j])) for i, j in b["edges"].T}
    assert pairs == {(0, 1), (1, 0), (1, 2), (2, 1)}  # 3-4 has only one end in the batch
    assert b["reliability"].tolist() == [2.0, 0.0, 1.0, 4.0]
    with pytest.raises(DistilleryError, match="column 'w' has 2 rows for 6 nodes"):
        NodeData(g, torch.arange(6), g.y, columns={"w": torch.zeros(2)})


@pytest.mark.skipif(not (graph.data.default_dir() / "cora.npz").is_file(), reason="shared/data/graphs/cora.npz is absent")
def test_real_graphs_follow_the_cpf_protocol():
    for name, n, c in (("cora", 2485, 7), ("citeseer", 2110, 6)):
        g = graph.load(name)
        assert (g.num_nodes, g.num_classes) == (n, c)
        assert components(g.edge_index, n).unique().numel() == 1
        assert not bool((g.edge_index[0] == g.edge_index[1]).any())
        s = graph.split(g.y, 0)
        assert (len(s.train), len(s.val)) == (20 * c, 30 * c)


# --------------------------------------------------------------------------- models


def test_gcn_and_sage_layers_match_dense_formulas():
    g = tiny_graph()
    n = g.num_nodes
    a = torch.zeros(n, n)
    a[g.edge_index[0], g.edge_index[1]] = 1
    gcn = models.GCN(g, hidden=4, layers=1, dropout=0.0).eval()
    with torch.no_grad():
        gcn.biases[0].fill_(0.5)
    a_hat = a + torch.eye(n)
    d = a_hat.sum(1).rsqrt()
    want = (d[:, None] * a_hat * d[None, :]) @ (g.x @ gcn.lins[0].weight.T) + 0.5  # the bias after propagation
    assert torch.allclose(gcn(torch.arange(n)), want, atol=1e-6)
    sage = models.SAGE(g, layers=1).eval()
    mean = (a @ g.x) / a.sum(1, keepdim=True).clamp(min=1)
    assert torch.allclose(sage(torch.arange(n)), sage.neigh[0](mean) + sage.self_[0](g.x), atol=1e-6)
    sg = models.SAGE(g, layers=1, aggregator="gcn").eval()
    assert torch.allclose(sg(torch.arange(n)), sg.neigh[0]((a @ g.x + g.x) / (a.sum(1, keepdim=True) + 1)), atol=1e-6)


def test_gat_attention_is_a_softmax_over_neighbours_and_self():
    g = tiny_graph()
    gat = models.GAT(g, hidden=2, heads=1, layers=1, dropout=0.0, attn_dropout=0.0).eval()
    z = gat.lins[0](g.x)
    el, er = z @ gat.att_l[0][0], z @ gat.att_r[0][0]
    out = torch.zeros(6, 2)
    for i in range(6):  # naive loop: in-neighbours of i plus i itself
        nb = [int(j) for j in g.edge_index[0][g.edge_index[1] == i]] + [i]
        w = torch.softmax(torch.nn.functional.leaky_relu(el[nb] + er[i], 0.2), 0)
        out[i] = (w[:, None] * z[nb]).sum(0) + gat.bias[0]
    assert torch.allclose(gat(torch.arange(6)), out, atol=1e-6)


@pytest.mark.parametrize("kind", models.KINDS)
def test_every_model_maps_ids_to_logits_and_trains(kind):
    g = graph.csbm(num_nodes=60, num_classes=3, seed=0)
    m = models.build(kind, g)
    out = m(torch.tensor([3, 1]))
    assert out.shape == (2, 3)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    assert "features" not in m.state_dict() and "edge_index" not in m.state_dict()  # weights only


def test_unknown_model_and_bad_argument():
    g = tiny_graph()
    with pytest.raises(DistilleryError, match="Did you mean 'sage'"):
        models.build("sag", g)
    with pytest.raises(DistilleryError, match="unknown parameter 'hiden'"):
        models.build("gcn", g, hiden=3)


# --------------------------------------------------------------------------- losses


def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def _softmax(v, tau=1.0):
    m = max(v)
    e = [math.exp((x - m) / tau) for x in v]
    return [x / sum(e) for x in e]


def _pair(n=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, c, generator=g, dtype=torch.float64)
    t = torch.randn(n, c, generator=g, dtype=torch.float64)
    e = undirected(torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]]), n)
    return s, t, e


def test_ffg2m_low_matches_a_per_edge_loop():
    s, t, e = _pair()
    pairs = [(int(i), int(j)) for i, j in e.T] + [(i, i) for i in range(5)]
    for tau in (1.0, 2.0):
        want = sum(_kl(_softmax(t[j].tolist(), tau), _softmax(s[i].tolist(), tau)) for i, j in pairs) / len(pairs)
        assert ffg2m_low(s, t, edges=e, temperature=tau).item() == pytest.approx(want, rel=1e-10)
    no_loops = [(int(i), int(j)) for i, j in e.T]
    want = sum(_kl(_softmax(t[j].tolist()), _softmax(s[i].tolist())) for i, j in no_loops)
    assert ffg2m_low(s, t, edges=e, self_loops=False, reduction="sum").item() == pytest.approx(want, rel=1e-10)
    assert ffg2m_low(s, t, edges=e, reduction="none").shape == (e.shape[1] + 5,)


def test_ffg2m_high_matches_a_per_edge_loop():
    s, t, e = _pair(seed=1)
    e_loops = torch.cat([e, torch.tensor([[0], [0]])], 1)  # a self-loop contributes nothing
    want = 0.0
    for i, j in e.T.tolist():
        dt = [abs(a - b) for a, b in zip(t[i].tolist(), t[j].tolist())]
        ds = [abs(a - b) for a, b in zip(s[i].tolist(), s[j].tolist())]
        want += _kl(_softmax(dt, 1.5), _softmax(ds, 1.5))
    got = ffg2m_high(s, t, edges=e_loops, temperature=1.5)
    assert got.item() == pytest.approx(want / e.shape[1], rel=1e-10)


def test_edge_losses_hand_value_mask_and_no_edges():
    s = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    e = torch.tensor([[0, 1], [1, 0]])
    # low, self-loops: edges (0,1) (1,0) (0,0) (1,1); teacher p = (3/4, 1/4) at node 0, uniform at 1
    k = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert ffg2m_low(s, t, edges=e).item() == pytest.approx(2 * k / 4, rel=1e-6)
    # high: |t_0 - t_1| = (log 3, 0) -> (3/4, 1/4); |s_0 - s_1| = 0 -> uniform; both directions alike
    assert ffg2m_high(s, t, edges=e).item() == pytest.approx(k, rel=1e-6)
    # a mask drops every edge that touches a masked node; no edge left: an exact 0 with a grad path
    sg = s.clone().requires_grad_()
    out = ffg2m_high(sg, t, edges=e, mask=torch.tensor([True, False]))
    assert out.item() == 0.0
    out.backward()
    assert sg.grad is not None
    assert ffg2m_low(s, t, edges=torch.zeros(2, 0, dtype=torch.long), self_loops=False).item() == 0.0


def test_edge_losses_bad_input():
    s, t, e = _pair()
    with pytest.raises(DistilleryError, match=r"shape \(2, E\)"):
        ffg2m_low(s, t, edges=e.T)
    with pytest.raises(DistilleryError, match=r"lie in \[0, 5\)"):
        ffg2m_high(s, t, edges=e + 3)
    with pytest.raises(DistilleryError, match="differ"):
        ffg2m_low(s, t[:, :2], edges=e)
    with pytest.raises(DistilleryError, match="reduction"):
        ffg2m_low(s, t, edges=e, reduction="avg")


def test_entropy_shift_hand_value():
    clean = torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0]])
    noisy = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]])
    h_34 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    h_10 = -sum(p * math.log(p) for p in _softmax([10.0, 0.0]))
    d = [0.0, math.log(2) - h_34, math.log(2) - h_10]
    assert entropy_shift(clean, noisy).tolist() == pytest.approx([x / max(d) for x in d], rel=1e-6)


def test_fit_power_recovers_the_exponent():
    x = torch.linspace(0.05, 0.95, 19)
    for a in (0.3, 1.0, 4.0):
        assert fit_power(x, 1 - x**a) == pytest.approx(a, rel=1e-4)


def test_krd_keeps_every_edge_in_warmup_and_in_eval():
    s, t, e = _pair()
    rho = torch.rand(5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    state = KRDState((3,), (3,))
    full = ffg2m_low(s, t, edges=e, temperature=1.3)  # every edge and the self-loops, tau on both sides
    assert krd(s, t, edges=e, reliability=rho, state=state, temperature=1.3, warmup_steps=2).item() == pytest.approx(
        full.item(), rel=1e-12)
    assert int(state.step) == 1
    state.eval()
    assert krd(s, t, edges=e, reliability=rho, state=state, temperature=1.3, warmup_steps=0).item() == pytest.approx(
        full.item(), rel=1e-12)
    assert int(state.step) == 1 and float(state.power) == 1.0  # nothing sampled or updated in eval


def test_krd_samples_edges_by_the_reliability_of_the_teacher_side():
    n = 4
    s = torch.zeros(n, 2, dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0]] * n, dtype=torch.float64)
    e = torch.tensor([[0, 1, 2, 3, 0, 0], [1, 0, 3, 2, 2, 3]])
    rho = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)  # P_j = 1 - rho_j^a: nodes 2, 3 never kept
    state = KRDState((2,), (2,))
    per_edge = krd(s, t, edges=e, reliability=rho, state=state, warmup_steps=0, momentum=0.5, reduction="none")
    assert per_edge.shape == (2 + n,)  # edges (0,1) and (1,0), then the four self-loops
    # the power moved by the momentum rule toward the fitted value
    assert float(state.power) != 1.0


def test_krd_state_update_is_the_momentum_rule():
    st = KRDState((2,), (2,), init_power=2.0)
    rho = torch.linspace(0, 1, 200, dtype=torch.float64)
    agree = rho < 0.5
    edges = torch.linspace(0, 1, 11, dtype=torch.float64)
    idx = torch.bucketize(rho, edges[1:-1], right=True)
    share = torch.bincount(idx[agree], minlength=10).double() / (torch.bincount(idx, minlength=10).double() + 1e-6)
    share = (share - share.min()) / (share.max() - share.min())
    a = fit_power(edges[:-1] + 0.05, share)
    st.update(rho, agree, bins=10, momentum=0.9)
    assert float(st.power) == pytest.approx(0.9 * 2.0 + 0.1 * a, rel=1e-12)


def test_objective_passes_batch_keys_and_names_a_missing_one():
    g = tiny_graph()
    data = NodeData(g, torch.arange(6), g.y)
    obj = Objective([TermConfig(loss="ffg2m_low")])
    batch = data.batch(torch.arange(6))
    logits = torch.randn(6, 2)
    got = obj({"logits": logits}, {"logits": logits.flip(0)}, batch)["total"]
    assert torch.allclose(got, ffg2m_low(logits, logits.flip(0), edges=batch["edges"]))
    with pytest.raises(DistilleryError, match="reads 'edges' from the batch"):
        obj({"logits": logits}, {"logits": logits}, {"x": batch["x"], "id": batch["id"]})
    with pytest.raises(DistilleryError, match="unknown parameter 'edges'"):
        Objective([TermConfig(loss="ffg2m_low", params={"edges": 1})])
    assert {"ffg2m_low", "ffg2m_high", "krd"} <= set(losses.names())


# --------------------------------------------------------------------------- methods end to end


@pytest.fixture(scope="module")
def homophilous():
    torch.set_num_threads(2)
    g = graph.csbm(num_nodes=400, num_classes=4, num_features=16, avg_degree=8, homophily=0.9, signal=0.5, seed=3)
    s = graph.split(g.y, 0, 5, 10)
    return g, s, D.train_teacher(g, s, "gcn", seed=0)


def test_glnn_beats_the_plain_mlp_on_a_homophilous_graph(homophilous):
    g, s, teacher = homophilous
    mlp, _ = D.distill(None, g, s, "mlp", seed=0)
    glnn, out = D.distill(teacher, g, s, "glnn", seed=0)
    acc_t, acc_m, acc_g = (D.accuracy(m, g, s.test) for m in (teacher, mlp, glnn))
    assert acc_t > acc_m + 10
    assert acc_g > acc_m + 10
    assert out["best"]["epoch"] >= 1


@pytest.mark.parametrize("method,kw", [("ffg2m", {"lamb": 0.5, "temperature": 1.3}), ("krd", {"lamb": 0.3})])
def test_edge_methods_train_end_to_end(homophilous, method, kw):
    g, s, teacher = homophilous
    mlp, _ = D.distill(None, g, s, "mlp", seed=0)
    student, _ = D.distill(teacher, g, s, method, seed=0, train=D.STUDENT_TRAIN, **kw)
    assert D.accuracy(student, g, s.test) > D.accuracy(mlp, g, s.test) + 5


def test_methods_bad_input(homophilous):
    g, s, teacher = homophilous
    with pytest.raises(DistilleryError, match="Did you mean 'glnn'"):
        D.distill(teacher, g, s, "glnm")
    with pytest.raises(DistilleryError, match="pass the trained GNN"):
        D.distill(None, g, s, "glnn")
    with pytest.raises(DistilleryError, match="lamb"):
        D.method_terms("glnn", lamb=1.5)


def test_inference_timing_reports_both_models(homophilous):
    g, s, teacher = homophilous
    mlp, _ = D.distill(None, g, s, "mlp", seed=0)
    out = D.inference_ms(teacher, mlp, s.test[:5], repeats=1)
    assert set(out) == {"gnn_ms_per_node", "mlp_ms_per_node", "speedup"}
    assert out["speedup"] == pytest.approx(out["gnn_ms_per_node"] / out["mlp_ms_per_node"])
    sub = D.khop(*D._csr(g.edge_index, g.num_nodes), int(s.test[0]), 1)
    nb = set(g.edge_index[0][g.edge_index[1] == int(s.test[0])].tolist())
    assert sub[0] == s.test[0] and set(sub[1:].tolist()) == nb


def test_inductive_setting_end_to_end():
    g = graph.csbm(num_nodes=400, num_classes=4, num_features=16, avg_degree=8, homophily=0.9, signal=0.5, seed=4)
    s = graph.split(g.y, 0, 5, 10)
    obs_split, hidden = graph.inductive(s, 0, share=0.2)
    observed = g.without_nodes(hidden)
    teacher = D.train_teacher(observed, obs_split, "gcn", seed=0)  # trained without the hidden nodes' edges
    nodes = torch.tensor(sorted(set(range(g.num_nodes)) - set(hidden.tolist())))
    student, _ = D.distill(teacher, observed, obs_split, "glnn", seed=0, observed=nodes)
    mlp, _ = D.distill(None, observed, obs_split, "mlp", seed=0)
    acc_s, acc_m = D.accuracy(student, g, hidden), D.accuracy(mlp, g, hidden)  # features only: no edges needed
    assert acc_s > acc_m + 5
    teacher.use_graph(g)  # the GNN sees the hidden nodes' edges at inference, as GLNN evaluates it
    assert D.accuracy(teacher, g, hidden) > acc_m


# --------------------------------------------------------------------------- the graph recipe (distillery run)

CSBM = ["data.name=csbm", "data.csbm.num_nodes=240", "data.csbm.num_classes=3", "data.csbm.num_features=16",
        "data.csbm.homophily=0.9", "data.csbm.signal=0.5", "split.train_per_class=5", "split.val_per_class=10"]


def _tiny(tmp_path, *more):
    """The shipped GLNN recipe on a small synthetic graph, a few epochs, runs indexed under tmp_path."""
    return ["teacher.train.epochs=6", "student.train.epochs=6", "latency_nodes=3", f"runs_dir={tmp_path}", *CSBM,
            *more]


@pytest.mark.parametrize("more", [[], ["split.setting=inductive", "method=krd", "lamb=0.3"]])
def test_graph_recipe_runs_from_the_cli(tmp_path, more):
    import json

    from distillery.cli import main
    from distillery.graph.recipe import GraphData
    from distillery.pipeline import load_weights

    out = tmp_path / "run"
    assert main(["run", "graph/glnn", *_tiny(tmp_path, *more), "--out", str(out), "--quiet"]) == 0
    assert "csbm" in (out / "config.yaml").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done" and summary["kind"] == "graph"
    teacher, student = summary["rows"]
    assert (teacher["model"], teacher["phase"], student["model"], student["phase"]) == \
        ("teacher", "teacher", "student", "distill")
    assert student["method"] == ("krd" if more else "glnn") and student["arch"] == "mlp"
    for r in (teacher, student):
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["val_accuracy"] <= 1 and r["params"] > 0 and r["latency_ms"] > 0
        assert ("accuracy_inductive" in r) == bool(more)
    assert 0 <= student["agreement"] <= 1 and student["speedup"] > 0
    # the saved student is the measured one: reloaded, it has the row's test accuracy
    g = GraphData(**{"name": "csbm", "csbm": {"num_nodes": 240, "num_classes": 3, "num_features": 16,
                                              "homophily": 0.9, "signal": 0.5}}).load()
    s = graph.split(g.y, 0, 5, 10)
    mlp = models.build("mlp", g, **D.STUDENT_MODEL)
    load_weights(mlp, out / "models" / "student.safetensors")
    assert D.accuracy(mlp, g, s.test) / 100 == pytest.approx(student["accuracy"], abs=1e-6)
    assert (out / "models" / "teacher.safetensors").is_file()
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"teacher", "distill"}
    assert summary["figures"][0]["file"] == "accuracy_by_degree.png"
    assert (out / "report" / "accuracy_by_degree.png").stat().st_size > 1000
    assert "accuracy_by_degree.png" in (out / "report" / "report.html").read_text()


def test_graph_recipe_resumes_after_a_failure(tmp_path, monkeypatch):
    import json

    from distillery import kinds, recipes
    from distillery.cli import main

    args = _tiny(tmp_path)
    fresh, broken = tmp_path / "fresh", tmp_path / "broken"
    assert main(["run", "graph/glnn", *args, "--out", str(fresh), "--quiet"]) == 0

    def fail(*a, **k):
        raise RuntimeError("killed during distillation")

    with monkeypatch.context() as m:
        m.setattr(D, "distill", fail)
        with pytest.raises(RuntimeError, match="killed"):
            kinds.run(recipes.load("graph/glnn", args), run_dir=broken, progress=False)
    assert json.loads((broken / "summary.json").read_text())["status"] == "failed"
    trained = (broken / "metrics.jsonl").read_text().count('"phase": "teacher"')
    assert main(["run", "graph/glnn", *args, "--resume", str(broken), "--quiet"]) == 0
    assert (broken / "metrics.jsonl").read_text().count('"phase": "teacher"') == trained  # the teacher was restored
    rows = [json.loads((d / "summary.json").read_text())["rows"] for d in (fresh, broken)]
    for a, b in zip(*rows):
        assert (a["accuracy"], a["val_accuracy"]) == (b["accuracy"], b["val_accuracy"])


def test_graph_recipe_defaults_are_the_python_apis():
    from distillery import recipes
    from distillery.config import from_dict, to_dict
    from distillery.graph.recipe import GraphRecipe

    r = GraphRecipe()
    assert r.teacher.train == D.TEACHER_TRAIN and r.student.train == D.STUDENT_TRAIN
    assert r.teacher.args == D.TEACHER_MODELS["sage"] and r.student.args == D.STUDENT_MODEL
    shipped = recipes.load("graph/glnn")
    assert (shipped.data.name, shipped.method, shipped.lamb) == ("cora", "glnn", 0.0)
    assert from_dict(GraphRecipe, to_dict(shipped)) == shipped
    r = recipes.load("graph/glnn", ["teacher.model=gat", "teacher.args.heads=4", "teacher.train.epochs=3"])
    assert r.teacher.args == {**D.TEACHER_MODELS["gat"], "heads": 4}
    t = r.teacher.train  # one key set: the others stay GLNN's, not TrainConfig's
    assert (t.epochs, t.optimizer, t.lr, t.select, t.patience) == (3, "adam", 0.01, "best", 50)


@pytest.mark.parametrize("override, fragment", [
    ("method=glm", "method: 'glm' is not allowed (did you mean 'glnn'?)"),
    ("lamb=-0.5", "lamb must lie in [0, 1]"),
    ("temperature=0", "temperature must be a finite number > 0"),
    ("teacher.model=gin", "teacher.model: 'gin' is not allowed"),
    ("teacher.args.hiden=8", "teacher.args: unknown parameter 'hiden'. Did you mean 'hidden'?"),
    ("student.args.dropout=1.5", "student.args.dropout must be a number in [0, 1)"),
    ("data.name=corra", "data.name: unknown graph data set 'corra'. Did you mean 'cora'?"),
    ("data.csbm.num_nodes=50", "data.csbm sets the synthetic graph's arguments, but data.name is 'cora'"),
    ("split.inductive_share=1.5", "split.inductive_share must lie in (0, 1)"),
    ("split.setting=semi", "split.setting: 'semi' is not allowed"),
])
def test_graph_recipe_bad_values_exit_2_with_one_line(tmp_path, capsys, override, fragment):
    from distillery.cli import main

    assert main(["run", "graph/glnn", override, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_graph_recipe_takes_terms_instead_of_the_methods(tmp_path):
    import json

    from distillery.cli import main

    out = tmp_path / "run"
    terms = "terms=[{loss: ce, teacher: null, weight: 0.5}, {loss: kd, temperature: 2.0, weight: 0.5}]"
    assert main(["run", "graph/glnn", *_tiny(tmp_path, terms), "--out", str(out), "--quiet"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {k for r in records if r.get("phase") == "distill" and "terms" in r for k in r["terms"]}
    assert logged == {"ce", "kd"}
    assert main(["run", "graph/glnn", *_tiny(tmp_path, "terms=[{loss: kdd}]"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()  # refused when the recipe loads: nothing trained, nothing written
