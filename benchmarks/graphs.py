"""GNN-to-MLP distillation on Cora and Citeseer (CPF / GLNN protocol, transductive).

Per data set and seed (split = CPF's 20 / 30 per class, test = the rest of the largest component):
teachers `sage`, `gcn`, `gat`, `appnp` (cross-entropy on the labelled nodes, best validation
epoch, patience 50); `mlp` alone; `glnn_sage`, `glnn_gcn`, `ffg2m_sage`, `krd_sage` (MLP students
of the seed's teacher). Test accuracy %, mean ± std over seeds. Settings are the authors':
GLNN's SAGE (2 x 128, dropout 0, lr 0.01, wd 5e-4) and MLP (2 x 128; Cora dropout 0.6 wd 5e-3,
Citeseer 0.1 / 1e-3), GLNN lamb 0; FF-G2M's and KRD's best (lamb, tau) for the SAGE teacher from
their param/best_parameters.json (Cora 0.5 / 1.3 and 0.3 / 1.1; Citeseer 0.1 / 1.2 and 0.0 / 0.8),
with GLNN's student, not their 3-layer ones. Also per-node inference time on Cora, one node at a
time: the SAGE teacher fetching its 2-hop neighbourhood vs the GLNN MLP.

    python benchmarks/graphs.py --seeds 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from distillery import graph
from distillery.graph import distill as D

from _common import RESULTS, command, machine, update_markdown, write

STUDENT = {"cora": ({"dropout": 0.6}, 5e-3), "citeseer": ({"dropout": 0.1}, 1e-3)}
SETTINGS = {  # method -> data set -> (lamb, tau)
    "ffg2m": {"cora": (0.5, 1.3), "citeseer": (0.1, 1.2)},
    "krd": {"cora": (0.3, 1.1), "citeseer": (0.0, 0.8)},
}
PUBLISHED = {  # GLNN README, transductive, CPF splits (SAGE / MLP / GLNN)
    "cora": {"sage": 78.78, "mlp": 58.95, "glnn_sage": 79.39},
    "citeseer": {"sage": 68.04, "mlp": 59.75, "glnn_sage": 69.28},
}
ROWS = ["sage", "gcn", "gat", "appnp", "mlp", "glnn_sage", "glnn_gcn", "ffg2m_sage", "krd_sage"]


def one_seed(name: str, g, seed: int) -> tuple[dict[str, float], dict]:
    s = graph.split(g.y, seed)
    args, wd = STUDENT[name]
    train = replace(D.STUDENT_TRAIN, weight_decay=wd)
    acc: dict[str, float] = {}
    teachers = {}
    for kind in ("sage", "gcn", "gat", "appnp"):
        teachers[kind] = D.train_teacher(g, s, kind, seed=seed)
        acc[kind] = D.accuracy(teachers[kind], g, s.test)
    students = {}
    for row in ("mlp", "glnn_sage", "glnn_gcn", "ffg2m_sage", "krd_sage"):
        method, _, teacher = row.partition("_")
        lamb, tau = SETTINGS.get(method, {}).get(name, (0.0, 1.0))
        students[row], _ = D.distill(teachers.get(teacher), g, s, method, seed=seed, lamb=lamb, temperature=tau,
                                     train=train, **args)
        acc[row] = D.accuracy(students[row], g, s.test)
    return acc, {"teacher": teachers["sage"], "student": students["glnn_sage"], "test": s.test}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--datasets", nargs="*", default=["cora", "citeseer"], choices=["cora", "citeseer"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--inference-nodes", type=int, default=200)
    ap.add_argument("--out", default=str(RESULTS / "graphs.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    runs: dict[str, list[float]] = {}
    inference = None
    for name in args.datasets:
        g = graph.load(name)
        for seed in range(args.seeds):
            acc, models = one_seed(name, g, seed)
            for k, v in acc.items():
                runs.setdefault(f"{name}/{k}", []).append(v)
            print(f"{name} seed {seed} ({time.time() - t0:.0f} s): " + ", ".join(f"{k} {v:.1f}" for k, v in acc.items()),
                  flush=True)
            if name == "cora" and seed == 0:
                gen = torch.Generator().manual_seed(0)
                nodes = models["test"][torch.randperm(len(models["test"]), generator=gen)[:args.inference_nodes]]
                inference = D.inference_ms(models["teacher"], models["student"], nodes)
                ptr, nbr = D._csr(g.edge_index, g.num_nodes)
                inference["mean_2hop_nodes"] = statistics.mean(len(D.khop(ptr, nbr, int(v), 2)) for v in nodes)
                inference["nodes"] = len(nodes)
                print(f"inference: {inference}", flush=True)
    rows = [{"method": m, "mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
             "n": len(v), "runs": v} for m, v in runs.items()]
    payload = {"benchmark": "graphs", "command": command(), "machine": machine(), "seeds": list(range(args.seeds)),
               "metric": "test accuracy %", "protocol": "CPF splits 20/30 per class, largest component, transductive",
               "settings": {"student": STUDENT, "lamb_tau": SETTINGS}, "published_glnn": PUBLISHED,
               "wall_s": time.time() - t0, "rows": rows}
    if inference is not None:
        payload["inference"] = inference
    write(args.out, payload)

    by = {r["method"]: r for r in rows}
    lines = ["## GNN-to-MLP on Cora and Citeseer (`benchmarks/graphs.py`)", "",
             f"`{command()}`: CPF splits (20 / 30 labelled nodes per class, largest component), transductive, "
             f"{args.seeds} seeds, {time.time() - t0:.0f} s in all. Test accuracy %, mean ± std; GLNN's published "
             "figures (its README, same protocol) beside ours.", "",
             "| row | " + " | ".join(args.datasets) + " | GLNN published |", "|---|" + "---|" * (len(args.datasets) + 1)]
    for row in ROWS:
        cells = [f"{by[f'{d}/{row}']['mean']:.2f} ± {by[f'{d}/{row}']['std']:.2f}" if f"{d}/{row}" in by else "-"
                 for d in args.datasets]
        pub = " / ".join(f"{PUBLISHED[d][row]:.2f}" for d in args.datasets if row in PUBLISHED[d]) or ""
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {pub} |")
    if inference is not None:
        lines += ["", f"Per-node inference on Cora ({inference['nodes']} test nodes, one at a time, "
                  f"{machine()['torch_threads']} threads): SAGE with its 2-hop neighbourhood "
                  f"({inference['mean_2hop_nodes']:.0f} nodes on average) {inference['gnn_ms_per_node']:.3f} ms, "
                  f"MLP {inference['mlp_ms_per_node']:.3f} ms: {inference['speedup']:.1f}x."]
    update_markdown("graphs", "\n".join(lines))


if __name__ == "__main__":
    main()
