"""The engine against a hand-written loop doing the same work, alternated in one process.

Both run KD of the MNIST-1D CNN teacher into the MLP 40-256-10 on the transfer set at the demo
recipe's batch size (512): teacher forward under no_grad, student forward and backward, the same
`distillery.losses.kd` (tau=4), AdamW step, constant rate. What differs is only the engine's own
work: batches with sample ids, the teacher protocol, the objective, the NaN check, the schedule,
logging and progress.
Per-step wall times are taken between consecutive optimiser steps; the figure is the ratio of
medians (engine / hand). Writes benchmarks/results/engine_overhead.json.

    python benchmarks/engine_overhead.py [--rounds 7] [--steps 100] [--batch-size 512] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from distillery import data as datasets
from distillery import models
from distillery.config import TermConfig, TrainConfig
from distillery.data.core import batches, epoch_order
from distillery.engine import fit
from distillery.losses.logits import kd
from distillery.objective import Objective
from distillery.teachers import ModuleTeacher

from _common import RESULTS, command, machine, update_markdown, write


def hand_loop(student, teacher, data, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    order = batches(epoch_order(len(data), seed, 0), batch_size)[:steps]
    student.train()
    stamps = [time.perf_counter()]
    for index in order:
        x = data.x[index]
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        loss = kd(s, t, temperature=4.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stamps.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(stamps)]


def engine_loop(student, teacher, data, steps: int, batch_size: int, lr: float, seed: int,
                workers: int = 0) -> list[float]:
    cfg = TrainConfig(epochs=1, batch_size=batch_size, lr=lr, schedule="constant", log_every=10, device="cpu",
                      num_workers=workers)
    sub = data.subset(torch.arange(steps * batch_size))
    stamps = [time.perf_counter()]
    fit(student, Objective([TermConfig(loss="kd", params={"temperature": 4.0})]), sub, cfg,
        teacher=ModuleTeacher(teacher), seed=seed, progress=False,
        on_step=lambda _: stamps.append(time.perf_counter()))
    return [b - a for a, b in itertools.pairwise(stamps)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the third loop")
    ap.add_argument("--out", default=str(RESULTS / "engine_overhead.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    splits = datasets.build("mnist1d")
    transfer = datasets.build("mnist1d_transfer", {"size": args.steps * args.batch_size, "seed": 1})["transfer"]
    teacher = models.build("cnn1d", (40,), 10, {"channels": 32}).eval().requires_grad_(False)
    del splits
    engine_ms, hand_ms, workers_ms = [], [], []

    def with_workers(*a, **kw):
        return engine_loop(*a, **kw, workers=args.workers)

    loops = (("engine", engine_loop, engine_ms), ("hand", hand_loop, hand_ms), ("workers", with_workers, workers_ms))
    for r in range(args.rounds):
        for name, loop, sink in loops[:: 1 if r % 2 == 0 else -1]:
            torch.manual_seed(r)
            student = models.build("mlp", (40,), 10, {"hidden": [256]})
            times = loop(student, teacher, transfer, args.steps, args.batch_size, 1e-3, seed=r)
            sink.extend(t * 1000 for t in times[5:])  # drop warm-up steps
            print(f"round {r} {name}: median {statistics.median(times) * 1000:.3f} ms/step", flush=True)
    e, h, w = statistics.median(engine_ms), statistics.median(hand_ms), statistics.median(workers_ms)
    write(args.out, {
        "benchmark": "engine_overhead", "command": command(), "machine": machine(),
        "ratio": e / h, "engine_ms": e, "hand_ms": h, "steps": len(engine_ms),
        "engine_workers_ms": w, "ratio_workers": w / h, "workers": args.workers,
        "rounds": args.rounds, "steps_per_round": args.steps, "batch_size": args.batch_size,
        "threads": args.threads, "seeds": list(range(args.rounds)),
    })
    print(f"engine {e:.3f} ms/step, hand {h:.3f} ms/step, ratio {e / h:.3f}")
    update_markdown("engine_overhead", "\n".join([
        "## Engine overhead (`benchmarks/engine_overhead.py`)", "",
        f"`{command()}` — KD step of the MNIST-1D CNN teacher into the MLP 40-256-10, batch "
        f"{args.batch_size}, {args.threads} torch threads; engine and hand-written loop alternated over "
        f"{args.rounds} rounds of {args.steps} steps (first 5 of each round dropped).", "",
        "| loop | median ms/step | ratio to hand |", "|---|---|---|",
        f"| engine (`distillery.fit`), in-memory batches through the DataLoader | {e:.3f} | {e / h:.3f} |",
        f"| engine, DataLoader with {args.workers} worker processes | {w:.3f} | {w / h:.3f} |",
        f"| hand-written (slicing tensors) | {h:.3f} | 1 |", "",
        f"Ratio engine / hand: **{e / h:.3f}** (goal: at most 1.03).",
    ]))


if __name__ == "__main__":
    main()
