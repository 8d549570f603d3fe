"""Regimes on MNIST-1D: offline KD, mutual learning, EMA self-distillation, born-again generations,
a teacher-assistant chain, and data-free KD, beside the student alone.

Student: the MLP 40-256-10. Rows (test accuracy %, mean ± std over seeds):
  alone       the MLP on the 4000 labelled samples (cross-entropy)
  kd          offline kd (tau 4) from a CNN (32 channels) on 16k unlabelled transfer samples
  dml         two MLPs taught each other on the labelled samples (DML, CE + KL to the peer); member 0
  ema         the MLP with CE + kd from its own EMA copy (mean teacher, momentum 0.99), labelled samples
  born_again  3 generations of the MLP, each distilled (kd + CE) from the one before, generation 0 = alone
  chain       CNN 32 -> CNN 8 channels -> MLP, each link by kd on the transfer set
  data_free   kd from a batch-norm CNN teacher through a generator, no data at all
BD-KD is not here: its loss could not be read from the paper (see the issue's note).

    python benchmarks/mnist1d_regimes.py --seeds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distillery import data as datasets
from distillery import models
from distillery.config import TermConfig, TrainConfig
from distillery.engine import evaluate, fit, seed_everything
from distillery.objective import Objective
from distillery.regimes import EMATeacher, Peers, born_again, chain, data_free, dml_terms
from distillery.teachers import ModuleTeacher, PrecomputedTeacher

from _common import RESULTS, command, machine, update_markdown, write

CE = [TermConfig(loss="ce", teacher=None)]
KD = [TermConfig(loss="kd", params={"temperature": 4.0})]
KD_CE = [TermConfig(loss="kd", params={"temperature": 4.0}, weight=0.5), TermConfig(loss="ce", teacher=None, weight=0.5)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=30, help="data-free rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "mnist1d_regimes.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    splits = datasets.build("mnist1d")
    train, test = splits["train"], splits["test"]
    transfer = datasets.build("mnist1d_transfer", {"size": 16000, "seed": 1})["transfer"]
    labelled = TrainConfig(epochs=args.epochs * 2, batch_size=64, lr=0.01)
    distil = TrainConfig(epochs=args.epochs, batch_size=512, lr=0.03)
    runs: dict[str, list[float]] = {}

    def acc(m) -> float:
        return 100 * evaluate(m, test)["accuracy"]

    def mlp(seed: int):
        seed_everything(seed)
        return models.build("mlp", (40,), 10, {"hidden": [256]})

    def cnn(seed: int, channels: int, bn: bool = False):
        seed_everything(seed)
        return models.build("cnn1d", (40,), 10, {"channels": channels, "batch_norm": bn})

    for seed in range(args.seeds):
        out: dict[str, float] = {}
        teacher = cnn(seed, 32)
        fit(teacher, Objective(CE), train, labelled, seed=seed, progress=False)
        out["teacher"] = acc(teacher)
        alone = mlp(seed)
        fit(alone, Objective(CE), train, labelled, seed=seed, progress=False)
        out["alone"] = acc(alone)
        s = mlp(seed)
        fit(s, Objective(KD), transfer, distil, teacher=PrecomputedTeacher(ModuleTeacher(teacher), transfer), seed=seed,
            progress=False)
        out["kd"] = acc(s)
        peers = Peers([mlp(seed), mlp(seed + 100)])
        fit(peers, Objective(dml_terms(2)), train, labelled, seed=seed, progress=False)
        out["dml"] = acc(peers.members[0])
        s = mlp(seed)
        ema = EMATeacher(s, momentum=0.99)
        fit(s, Objective(KD_CE), train, labelled, teacher=ema, modules={"ema": ema.model}, seed=seed, progress=False,
            on_step=ema.update)
        out["ema"] = acc(s)
        gens = born_again(lambda s=seed: mlp(s), alone, train, labelled, generations=3, terms=KD_CE, seed=seed)
        out["born_again"] = acc(gens[-1]["model"])
        links = chain(teacher, [lambda s=seed: cnn(s, 8), lambda s=seed: mlp(s)], transfer, distil, terms=KD, seed=seed)
        out["chain"] = acc(links[-1]["model"])
        bn_teacher = cnn(seed, 32, bn=True)
        fit(bn_teacher, Objective(CE), train, labelled, seed=seed, progress=False)
        out["teacher_bn"] = acc(bn_teacher)
        s = mlp(seed)
        data_free(bn_teacher, s, (40,), rounds=args.rounds, seed=seed)
        out["data_free"] = acc(s)
        for k, v in out.items():
            runs.setdefault(k, []).append(v)
        print(f"seed {seed} ({time.time() - t0:.0f} s): " + ", ".join(f"{k} {v:.1f}" for k, v in out.items()), flush=True)

    rows = [{"method": m, "mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
             "n": len(v), "runs": v} for m, v in runs.items()]
    write(args.out, {"benchmark": "mnist1d_regimes", "command": command(), "machine": machine(),
                     "seeds": list(range(args.seeds)), "metric": "test accuracy %", "epochs": args.epochs,
                     "data_free_rounds": args.rounds, "wall_s": time.time() - t0, "rows": rows})
    lines = ["## Regimes on MNIST-1D (`benchmarks/mnist1d_regimes.py`)", "",
             f"`{command()}`: MLP 40-256-10 student, {args.seeds} seeds, {time.time() - t0:.0f} s in all. "
             "Test accuracy %, mean ± std (chance is 10%).", "",
             "| method | accuracy % |", "|---|---|", *[f"| {r['method']} | {r['mean']:.1f} ± {r['std']:.1f} |" for r in rows]]
    update_markdown("mnist1d_regimes", "\n".join(lines))


if __name__ == "__main__":
    main()
