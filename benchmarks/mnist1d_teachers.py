"""Teachers on MNIST-1D: the store (dense, top-k) against the live teacher, ensembles, transfer-set
sizes, and LLKD's sample selection. Student: the MLP 40-256-10 of the recipe `mnist1d/kd`.

Rows (test accuracy %, mean ± std over seeds; each seed retrains the teachers):
  live              kd (tau 4) from the live CNN teacher on a 16k transfer set
  dense             the same from a dense float32 store (must agree with live within noise)
  topkK             the same from a top-K store (float16 values, tail bucket), K = 1, 2, 3, 5
  best_single       kd from the best (on test) of three teachers (CNN 32 / 48 channels, a patch transformer)
  ensemble_mean     kd from the mean of their probabilities
  ensemble_balanced the same after entropy balancing on the transfer set
  transfer_N        kd on N transfer samples (0 = the 4000 labelled samples, their labels unused)
  llkd_off          kd on 16k transfer samples (the live row's setting)
  llkd_on           the same with LLKD's selection (teacher confident and student uncertain)
live, transfer_16k and llkd_off are one configuration, trained once per seed.

    python benchmarks/mnist1d_teachers.py --seeds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from distillery import data as datasets
from distillery import models
from distillery.config import TermConfig, TrainConfig
from distillery.data.core import TensorData
from distillery.engine import evaluate, fit, seed_everything
from distillery.objective import Objective
from distillery.pipeline import CE
from distillery.store import CachedTeacher, TeacherStore, model_fingerprint, write_store
from distillery.teachers import EnsembleTeacher, ModuleTeacher, PrecomputedTeacher

from _common import RESULTS, command, machine, update_markdown, write

TEACHERS = [("cnn1d", {"channels": 32}), ("cnn1d", {"channels": 48}), ("patch_transformer", {})]
KS = (1, 2, 3, 5)
SIZES = (0, 4000, 16000, 64000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "mnist1d_teachers.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    splits = datasets.build("mnist1d")
    train, test = splits["train"], splits["test"]
    pool = datasets.build("mnist1d_transfer", {"size": max(SIZES), "seed": 1})["transfer"]
    transfers = {n: pool.subset(torch.arange(n), f"transfer{n}") for n in SIZES if n}
    t_cfg = TrainConfig(epochs=args.teacher_epochs, batch_size=64, lr=0.01)
    s_cfg = TrainConfig(epochs=args.epochs, batch_size=512, lr=0.03)
    kd = [TermConfig(loss="kd", params={"temperature": 4.0})]
    llkd = [TermConfig(loss="llkd", params={"temperature": 4.0})]
    runs: dict[str, list[float]] = {}
    sizes_bytes: dict[str, float] = {}

    def acc(m) -> float:
        return 100 * evaluate(m, test)["accuracy"]

    def student(seed: int, terms, data: TensorData, answers) -> float:
        seed_everything(seed)
        s = models.build("mlp", train.input_shape, 10, {"hidden": [256]})
        fit(s, Objective(terms), data, s_cfg, teacher=answers, seed=seed, progress=False)
        return acc(s)

    def add(name: str, value: float) -> None:
        runs.setdefault(name, []).append(value)

    for seed in range(args.seeds):
        teachers, t_acc = [], []
        for i, (name, kw) in enumerate(TEACHERS):
            seed_everything(seed * 10 + i)
            m = models.build(name, train.input_shape, 10, kw)
            fit(m, Objective(CE), train, t_cfg, seed=seed * 10 + i, progress=False)
            teachers.append(m)
            t_acc.append(acc(m))
        main_t = ModuleTeacher(teachers[0])
        data16 = transfers[16000]
        live = student(seed, kd, data16, main_t)
        for row in ("live", "transfer_16k", "llkd_off"):
            add(row, live)
        with tempfile.TemporaryDirectory() as tmp:
            fp = model_fingerprint(teachers[0])
            write_store(main_t, data16, Path(tmp) / "dense", teacher_fingerprint=fp)
            add("dense", student(seed, kd, data16, CachedTeacher(Path(tmp) / "dense")))
            sizes_bytes["dense"] = TeacherStore(Path(tmp) / "dense").bytes_per_sample()
            for k in KS:
                write_store(main_t, data16, Path(tmp) / f"top{k}", teacher_fingerprint=fp, top_k=k)
                add(f"topk{k}", student(seed, kd, data16, CachedTeacher(Path(tmp) / f"top{k}")))
                sizes_bytes[f"topk{k}"] = TeacherStore(Path(tmp) / f"top{k}").bytes_per_sample()
        best = max(range(len(teachers)), key=lambda i: t_acc[i])
        add("best_single", live if best == 0 else student(seed, kd, data16, ModuleTeacher(teachers[best])))
        ens = EnsembleTeacher([ModuleTeacher(m) for m in teachers])
        add("ensemble_mean", student(seed, kd, data16, PrecomputedTeacher(ens, data16)))
        ens.balance(data16.x)
        add("ensemble_balanced", student(seed, kd, data16, PrecomputedTeacher(ens, data16)))
        add("transfer_0", student(seed, kd, train.unlabelled(), main_t))
        for n in (4000, 64000):
            add(f"transfer_{n // 1000}k", student(seed, kd, transfers[n], PrecomputedTeacher(main_t, transfers[n])))
        add("llkd_on", student(seed, llkd, data16, PrecomputedTeacher(main_t, data16)))
        for i, a in enumerate(t_acc):
            add(f"teacher{i}", a)
        print(f"seed {seed} ({time.time() - t0:.0f} s): " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()),
              flush=True)

    rows = [{"method": m, "mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
             "n": len(v), "runs": v} for m, v in runs.items()]
    write(args.out, {"benchmark": "mnist1d_teachers", "command": command(), "machine": machine(),
                     "seeds": list(range(args.seeds)), "metric": "test accuracy %", "epochs": args.epochs,
                     "teachers": [f"{n} {kw}" for n, kw in TEACHERS], "bytes_per_sample": sizes_bytes,
                     "wall_s": time.time() - t0, "rows": rows})
    by = {r["method"]: r for r in rows}
    lines = ["## Teachers: store, ensembles, transfer sets, selection (`benchmarks/mnist1d_teachers.py`)", "",
             f"`{command()}`: MLP 40-256-10 student, kd tau 4, {args.epochs} epochs, {args.seeds} seeds, "
             f"{time.time() - t0:.0f} s in all. Teachers: " + ", ".join(
                 f"{n} {kw or ''} {by[f'teacher{i}']['mean']:.1f}%".replace(" {}", "") for i, (n, kw) in enumerate(TEACHERS))
             + ".", "", "| method | accuracy % | vs live | bytes per sample |", "|---|---|---|---|"]
    live_mean = by["live"]["mean"]
    for r in rows:
        if r["method"].startswith("teacher"):
            continue
        size = sizes_bytes.get(r["method"], "")
        size = f"{size:.0f}" if size != "" else ""
        lines.append(f"| {r['method']} | {r['mean']:.1f} ± {r['std']:.1f} | {r['mean'] - live_mean:+.1f} | {size} |")
    update_markdown("mnist1d_teachers", "\n".join(lines))


if __name__ == "__main__":
    main()
