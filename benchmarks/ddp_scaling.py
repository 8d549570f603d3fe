"""One process against two (gloo; the engine computes on the CPU) at the same global batch: step time,
final accuracy, and the largest weight difference between the two runs' students.

KD of the MLP 40-256-10 from a CNN teacher on MNIST-1D (transfer set of 16k samples), the teacher's
answers precomputed by sample id. On 2 CPU cores the point is correctness (the weights agree to float
tolerance); each process gets cores / processes threads.

    python benchmarks/ddp_scaling.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distillery import data as datasets
from distillery import distributed, models
from distillery.config import TermConfig, TrainConfig
from distillery.engine import evaluate, fit
from distillery.objective import Objective
from distillery.teachers import ModuleTeacher, PrecomputedTeacher

from _common import RESULTS, command, machine, update_markdown, write


def setup(args, teacher_path: str | None = None):
    splits = datasets.build("mnist1d")
    transfer = datasets.build("mnist1d_transfer", {"size": args.samples, "seed": 2})["transfer"]
    torch.manual_seed(0)
    teacher = models.build("cnn1d", (40,), 10, {"channels": 32})
    if teacher_path:  # the one teacher trained by the parent, so both runs distil the same weights
        teacher.load_state_dict(torch.load(teacher_path, weights_only=True))
    else:
        fit(teacher, Objective([TermConfig(loss="ce", teacher=None)]), splits["train"],
            TrainConfig(epochs=args.teacher_epochs, batch_size=64, lr=0.01), seed=0, progress=False)
    return splits, transfer, teacher


def train(rank: int, world: int, args, init: str, out: str, teacher_path: str) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        splits, transfer, teacher = setup(args, teacher_path)
        answers = PrecomputedTeacher(ModuleTeacher(teacher), transfer)
        torch.manual_seed(1)
        student = models.build("mlp", (40,), 10, {"hidden": [256]})
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=0.03, log_every=1 << 30)
        distributed.barrier()
        steps = args.epochs * -(-len(transfer) // args.batch_size)
        t0 = time.perf_counter()
        fit(student, Objective([TermConfig(loss="kd", params={"temperature": 4.0})]), transfer, cfg,
            teacher=answers, seed=0, progress=False)
        distributed.barrier()
        ms = (time.perf_counter() - t0) * 1000 / steps
        if rank == 0:
            acc = 100 * evaluate(student, splits["test"])["accuracy"]
            torch.save({"weights": student.state_dict(), "step_ms": ms, "accuracy": acc}, out)
    finally:
        if world > 1:
            distributed.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--teacher-epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", default=str(RESULTS / "ddp_scaling.json"))
    args = ap.parse_args()
    t0 = time.time()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(args.threads)
        teacher_path = str(Path(tmp) / "teacher.pt")
        torch.save(setup(args)[2].state_dict(), teacher_path)
        for world in (1, 2):
            out = str(Path(tmp) / f"w{world}.pt")
            if world == 1:
                train(0, 1, args, "", out, teacher_path)
            else:
                mp.spawn(train, args=(world, args, str(Path(tmp) / "init"), out, teacher_path), nprocs=world, join=True)
            results.append(torch.load(out, weights_only=True))
    diff = max(float((results[0]["weights"][k] - results[1]["weights"][k]).abs().max()) for k in results[0]["weights"])
    payload = {"processes": [1, 2], "step_ms": [r["step_ms"] for r in results],
               "accuracy": [r["accuracy"] for r in results], "max_weight_diff": diff,
               "global_batch": args.batch_size, "epochs": args.epochs, "samples": args.samples,
               "threads_total": args.threads, "backend": "gloo", "command": command(), "machine": machine(),
               "wall_s": time.time() - t0}
    write(args.out, payload)
    update_markdown("ddp_scaling", "\n".join([
        "## One process against two (`benchmarks/ddp_scaling.py`)", "",
        f"`{command()}`: KD of the MLP from a CNN teacher on {args.samples} MNIST-1D samples, global batch "
        f"{args.batch_size}, {args.epochs} epochs, gloo, {args.threads} threads shared by the processes.", "",
        "| processes | ms per step | test accuracy % |", "|---|---|---|",
        *[f"| {p} | {m:.1f} | {a:.2f} |" for p, m, a in zip(payload["processes"], payload["step_ms"], payload["accuracy"])],
        "", f"Largest weight difference between the two runs' students: {diff:.2e}."]))


if __name__ == "__main__":
    main()
