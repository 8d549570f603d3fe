"""Two more feature-distillation cases beside benchmarks/mnist1d_features.py:

  digits/*  a 2-D CNN teacher (32 channels) -> a smaller 2-D CNN (8 channels) on scikit-learn's
            8x8 digits, on the labelled training split (kd 0.9 + ce 0.1, as Hinton), with
            `attention`, `acam` and `hint` on the maps of `block2`;
  tokens/*  a patch transformer teacher (dim 64) -> a smaller one (dim 16) on MNIST-1D patches
            (10 tokens), on the unlabelled transfer set, with `trg` on the tokens of `blocks.1`.
Each LOSS row is kd + LOSS at weight 1.0 (no published weight fits these models). Writes
benchmarks/results/features_cases.json (rows as in the logit benchmark) and a BENCHMARKS.md table.

    python benchmarks/features_cases.py --seeds 3
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
from distillery.pipeline import CE
from distillery.teachers import ModuleTeacher, PrecomputedTeacher

from _common import RESULTS, command, machine, update_markdown, write

CASES = {
    "digits": dict(data=("digits", {}), transfer=None, teacher=("cnn2d", {"channels": 32}),
                   student=("cnn2d", {"channels": 8}), tap="block2", losses=["attention", "acam", "hint"],
                   train=TrainConfig(epochs=30, batch_size=64, lr=0.01), label_weight=0.1),
    "tokens": dict(data=("mnist1d", {}), transfer=("mnist1d_transfer", {"size": 10000, "seed": 1}),
                   teacher=("patch_transformer", {"dim": 64}), student=("patch_transformer", {"dim": 16, "heads": 2}),
                   tap="blocks.1", losses=["trg"], train=TrainConfig(epochs=15, batch_size=256, lr=0.003),
                   label_weight=0.0),
}


def run_case(name: str, case: dict, seed: int) -> dict[str, float]:
    splits = datasets.build(*case["data"])
    train, test = splits["train"], splits["test"]
    distil_on = datasets.build(*case["transfer"])["transfer"] if case["transfer"] else train
    build = lambda spec: models.build(spec[0], train.input_shape, train.num_classes, spec[1])  # noqa: E731
    seed_everything(seed)
    t = build(case["teacher"])
    fit(t, Objective(CE), train, case["train"], seed=seed, progress=False)
    out = {f"{name}/teacher": 100 * evaluate(t, test)["accuracy"]}
    teacher = PrecomputedTeacher(ModuleTeacher(t), distil_on, [case["tap"]])
    for method in ["alone", "kd", *[f"kd+{loss}" for loss in case["losses"]]]:
        seed_everything(seed)
        s = build(case["student"])
        if method == "alone":
            fit(s, Objective(CE), train, case["train"], seed=seed, progress=False)
        else:
            terms = [TermConfig(loss="kd", weight=1.0 - case["label_weight"])]
            if case["label_weight"]:
                terms.append(TermConfig(loss="ce", teacher=None, weight=case["label_weight"]))
            if "+" in method:
                terms.append(TermConfig(loss=method.split("+")[1], student=case["tap"], teacher=case["tap"]))
            fit(s, Objective(terms), distil_on, case["train"], teacher=teacher, seed=seed, progress=False)
        out[f"{name}/{method}"] = 100 * evaluate(s, test)["accuracy"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--out", default=str(RESULTS / "features_cases.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    runs: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        for name in args.cases:
            for m, v in run_case(name, CASES[name], seed).items():
                runs.setdefault(m, []).append(v)
        print(f"seed {seed} ({time.time() - t0:.0f} s): " + ", ".join(f"{m} {v[-1]:.1f}" for m, v in runs.items()), flush=True)
    rows = [{"method": m, "mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
             "n": len(v), "runs": v} for m, v in runs.items()]
    write(args.out, {"benchmark": "features_cases", "command": command(), "machine": machine(),
                     "seeds": list(range(args.seeds)), "metric": "test accuracy %", "wall_s": time.time() - t0,
                     "rows": rows})
    lines = ["## Feature losses on 2-D maps and tokens (`benchmarks/features_cases.py`)", "",
             f"`{command()}` — {args.seeds} seeds, {time.time() - t0:.0f} s in all; each LOSS row is kd + LOSS "
             "at weight 1.0.", "", "| method | accuracy % (mean ± std) | n |", "|---|---|---|"]
    lines += [f"| {r['method']} | {r['mean']:.1f} ± {r['std']:.1f} | {r['n']} |" for r in rows]
    update_markdown("features_cases", "\n".join(lines))


if __name__ == "__main__":
    main()
