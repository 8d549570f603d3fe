"""Epoch time of KD with a live teacher vs the teacher-output store (dense and top-k), on MNIST-1D.

A 1-D CNN teacher about 10x the student's training cost per sample (measured here, printed), the
student a narrow 1-D CNN; one epoch of `kd` on a transfer set, live teacher / dense store / top-k
store alternated in one process, median of the repeats. The ideal speed-up of a store is
(t_teacher + t_student) / t_student, with t_teacher the teacher's forward time over the epoch and
t_student the epoch without any teacher (CE on dummy labels); efficiency = speedup / ideal for the
top-k store. The teacher's weights are its random initialisation: timing does not depend on them.

    python benchmarks/cache_speed.py
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
from distillery.engine import fit
from distillery.objective import Objective
from distillery.store import CachedTeacher, TeacherStore, model_fingerprint, write_store
from distillery.teachers import ModuleTeacher, answer_all

from _common import RESULTS, command, machine, update_markdown, write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--teacher-channels", type=int, default=96)
    ap.add_argument("--student-channels", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "cache_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    transfer = datasets.build("mnist1d_transfer", {"size": args.samples, "seed": 3})["transfer"]
    torch.manual_seed(0)
    teacher_model = models.build("cnn1d", transfer.input_shape, 10, {"channels": args.teacher_channels, "hidden": 256})
    teacher = ModuleTeacher(teacher_model)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.01, log_every=1 << 30)
    labelled = TensorData(transfer.x, torch.zeros(len(transfer), dtype=torch.long), transfer.ids, 10, "dummy-labels")

    def student():
        torch.manual_seed(1)
        return models.build("cnn1d", transfer.input_shape, 10, {"channels": args.student_channels, "hidden": 32})

    kd = Objective([TermConfig(loss="kd", params={"temperature": 4.0})])
    ce = Objective([TermConfig(loss="ce", teacher=None)])
    folder = Path(tempfile.mkdtemp(prefix="distillery-cache-speed-"))
    fp = model_fingerprint(teacher_model)
    layouts = {"dense_fp32": {}, "dense_fp16": {"dtype": "float16"}, **{
        f"top{k}_fp16": {"top_k": k} for k in (1, 2, 3, 5)}, f"top{args.top_k}_bf16": {"top_k": args.top_k, "dtype": "bfloat16"},
        f"top{args.top_k}_fp16_notail": {"top_k": args.top_k, "tail": "drop"}}
    write_s, sizes = {}, {}
    for name, kw in layouts.items():
        t = time.perf_counter()
        write_store(teacher, transfer, folder / name, teacher_fingerprint=fp, **kw)
        write_s[name] = time.perf_counter() - t
        sizes[name] = TeacherStore(folder / name).bytes_per_sample()
    answers = {"live": teacher, "dense": CachedTeacher(folder / "dense_fp32"),
               "topk": CachedTeacher(folder / f"top{args.top_k}_fp16")}

    def epoch(mode: str) -> float:
        s = student()
        t = time.perf_counter()
        if mode == "student":
            fit(s, ce, labelled, cfg, seed=0, progress=False)
        else:
            fit(s, kd, transfer, cfg, teacher=answers[mode], seed=0, progress=False)
        return time.perf_counter() - t

    def teacher_pass() -> float:
        t = time.perf_counter()
        answer_all(teacher, transfer.x, batch_size=args.batch_size)
        return time.perf_counter() - t

    times: dict[str, list[float]] = {m: [] for m in ("live", "dense", "topk", "student", "teacher")}
    epoch("live")  # warm-up
    for r in range(args.repeats):
        order = ["live", "dense", "topk", "student"]
        for mode in order[r % 4:] + order[:r % 4]:  # rotate the order between repeats
            times[mode].append(epoch(mode))
        times["teacher"].append(teacher_pass())
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ideal = (med["teacher"] + med["student"]) / med["student"]
    speedup = med["live"] / med["topk"]
    result = {"live_s": med["live"], "dense_s": med["dense"], "topk_s": med["topk"], "speedup": speedup,
              "ideal": ideal, "efficiency": speedup / ideal, "dense_speedup": med["live"] / med["dense"],
              "student_s": med["student"], "teacher_s": med["teacher"],
              "teacher_to_student_cost": med["teacher"] / med["student"], "top_k": args.top_k,
              "bytes_per_sample": sizes, "write_s": write_s, "runs": times, "samples": args.samples,
              "batch_size": args.batch_size, "repeats": args.repeats, "command": command(), "machine": machine(),
              "wall_s": time.time() - t0}
    write(args.out, result)
    lines = ["## Teacher-output store speed (`benchmarks/cache_speed.py`)", "",
             f"`{command()}`: one KD epoch over {args.samples} MNIST-1D samples, batch {args.batch_size}, "
             f"{args.threads} threads; teacher CNN ({args.teacher_channels} channels) / student CNN "
             f"({args.student_channels} channels); median of {args.repeats} alternated repeats.", "",
             "| | seconds per epoch |", "|---|---|",
             f"| live teacher | {med['live']:.2f} |", f"| dense store (float32) | {med['dense']:.2f} |",
             f"| top-{args.top_k} store (float16 + tail) | {med['topk']:.2f} |",
             f"| student alone (no teacher) | {med['student']:.2f} |",
             f"| teacher forward pass alone | {med['teacher']:.2f} |", "",
             f"Speed-up of the top-{args.top_k} store {speedup:.2f}x against the ideal {ideal:.2f}x: efficiency "
             f"**{speedup / ideal:.2f}** (goal 0.9); dense store {med['live'] / med['dense']:.2f}x.", "",
             "| store layout | bytes per sample |", "|---|---|",
             *[f"| {k} | {v:.0f} |" for k, v in sizes.items()]]
    update_markdown("cache_speed", "\n".join(lines))


if __name__ == "__main__":
    main()
