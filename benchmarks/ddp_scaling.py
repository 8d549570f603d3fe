"""distillery on torch.distributed against a hand-written torch loop doing the same work, in one run:
one process, then two processes of distillery and two of the hand loop (DDP, or FSDP2 with
``--strategy fsdp``), gloo on the CPU.

KD of the MLP 40-256-10 from a CNN teacher on MNIST-1D (a transfer set of 16k samples), the
teacher's answers precomputed by sample id, AdamW with the cosine schedule. The hand loop is what a user
would write with torch alone: the same global batch order, each rank its strided share,
``DistributedDataParallel`` (or ``fully_shard``) around the student, ``kd`` over its rows, backward,
step. Step times are medians over the steps of each rank 0 (the first step dropped); the ratio is
distillery / hand. The largest weight difference is between distillery's 1- and 2-process students.

    python benchmarks/ddp_scaling.py [--strategy ddp|fsdp]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distillery import data as datasets
from distillery import distributed, models
from distillery.config import TermConfig, TrainConfig
from distillery.data.loader import plan
from distillery.engine import evaluate, fit, make_schedule
from distillery.losses.logits import kd
from distillery.objective import Objective
from distillery.teachers import ModuleTeacher, PrecomputedTeacher

from _common import RESULTS, command, machine, update_markdown, write


def setup(args, teacher_path: str | None = None):
    splits = datasets.build("mnist1d")
    transfer = datasets.build("mnist1d_transfer", {"size": args.samples, "seed": 2})["transfer"]
    torch.manual_seed(0)
    teacher = models.build("cnn1d", (40,), 10, {"channels": 32})
    if teacher_path:  # the one teacher trained by the parent, so every run distils the same weights
        teacher.load_state_dict(torch.load(teacher_path, weights_only=True))
    else:
        fit(teacher, Objective([TermConfig(loss="ce", teacher=None)]), splits["train"],
            TrainConfig(epochs=args.teacher_epochs, batch_size=64, lr=0.01), seed=0, progress=False)
    return splits, transfer, teacher


def hand(student, transfer, answers, args, rank, world, strategy) -> list[float]:
    """The torch-only loop: DDP or FSDP2 around the student, each rank its share of every global batch."""
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        model = fully_shard(student)
    else:
        model = torch.nn.parallel.DistributedDataParallel(student)
    opt = torch.optim.AdamW(model.parameters(), lr=0.03, weight_decay=0.0)
    steps = len(plan(transfer, 0, 0, args.batch_size, 1, rank, world))
    sched = make_schedule(opt, TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=0.03), steps)  # cosine
    logits, ids = answers.outputs["logits"], answers.sorted_ids  # by sample id
    stamps = [time.perf_counter()]
    for epoch in range(args.epochs):
        for st in plan(transfer, 0, epoch, args.batch_size, 1, rank, world):
            index = st.micro[0].index
            loss = kd(model(transfer.x[index]), logits[torch.searchsorted(ids, transfer.ids[index])], temperature=4.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            stamps.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(stamps)]


def train(rank: int, world: int, args, init: str, out: str, teacher_path: str, which: str) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        splits, transfer, teacher = setup(args, teacher_path)
        answers = PrecomputedTeacher(ModuleTeacher(teacher), transfer)
        torch.manual_seed(1)
        student = models.build("mlp", (40,), 10, {"hidden": [256]})
        strategy = args.strategy if world > 1 else "ddp"
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=0.03, log_every=1 << 30,
                          strategy=strategy, device="cpu")
        distributed.barrier()
        if which == "hand":
            times = hand(student, transfer, answers, args, rank, world, strategy)
        else:
            stamps = [time.perf_counter()]
            fit(student, Objective([TermConfig(loss="kd", params={"temperature": 4.0})]), transfer, cfg,
                teacher=answers, seed=0, progress=False, on_step=lambda _: stamps.append(time.perf_counter()))
            times = [b - a for a, b in itertools.pairwise(stamps)]
        distributed.barrier()
        weights = distributed.full_state_dict(student)
        if rank == 0:
            plain = models.build("mlp", (40,), 10, {"hidden": [256]})
            plain.load_state_dict(weights)
            acc = 100 * evaluate(plain, splits["test"])["accuracy"]
            torch.save({"weights": weights, "step_ms": 1000 * statistics.median(times[1:]), "accuracy": acc}, out)
    finally:
        if world > 1:
            distributed.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--samples", type=int, default=16000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--teacher-epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of hand and distillery 2-process runs")
    ap.add_argument("--out", default=str(RESULTS / "ddp_scaling.json"))
    args = ap.parse_args()
    t0 = time.time()
    got: dict[str, list[dict]] = {"one": [], "distillery": [], "hand": []}
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(args.threads)
        teacher_path = str(Path(tmp) / "teacher.pt")
        torch.save(setup(args)[2].state_dict(), teacher_path)
        out = str(Path(tmp) / "one.pt")
        train(0, 1, args, "", out, teacher_path, "distillery")
        got["one"].append(torch.load(out, weights_only=True))
        for r in range(args.rounds):  # alternate, so drift in the machine's load hits both alike
            for which in (("hand", "distillery") if r % 2 == 0 else ("distillery", "hand")):
                out = str(Path(tmp) / f"{which}{r}.pt")
                mp.spawn(train, args=(2, args, str(Path(tmp) / f"init-{which}{r}"), out, teacher_path, which),
                         nprocs=2, join=True)
                got[which].append(torch.load(out, weights_only=True))
    one, ours, theirs = got["one"][0], got["distillery"][0], got["hand"][0]
    diff = max(float((one["weights"][k] - ours["weights"][k]).abs().max()) for k in one["weights"])
    diff_torch = max(float((theirs["weights"][k] - ours["weights"][k]).abs().max()) for k in one["weights"])
    ours_ms = statistics.median(g["step_ms"] for g in got["distillery"])
    hand_ms = statistics.median(g["step_ms"] for g in got["hand"])
    part = {f"torch_{args.strategy}_ms": hand_ms, "distillery_ms": ours_ms, "ratio": ours_ms / hand_ms,
            "one_process_ms": one["step_ms"], "accuracy": {"one": one["accuracy"], "distillery_2": ours["accuracy"],
                                                           "torch_2": theirs["accuracy"]},
            "max_weight_diff_1_vs_2": diff, "max_weight_diff_distillery_vs_torch": diff_torch, "rounds": args.rounds, "global_batch": args.batch_size,
            "epochs": args.epochs, "samples": args.samples, "threads_total": args.threads, "backend": "gloo",
            "seeds": {"teacher": 0, "student": 1, "order": 0}, "command": command(), "machine": machine(),
            "wall_s": time.time() - t0}
    path = Path(args.out)
    payload = json.loads(path.read_text()) if path.is_file() else {}
    payload = {k: v for k, v in payload.items() if k in ("ddp", "fsdp")}
    payload[args.strategy] = part
    if "ddp" in payload:  # the contract: the DDP figures at the top level
        payload.update({k: payload["ddp"][k] for k in ("torch_ddp_ms", "distillery_ms", "ratio")})
    write(args.out, payload)
    rows = []
    for s in ("ddp", "fsdp"):
        if s in payload:
            p = payload[s]
            rows.append(f"| {s} | {p['one_process_ms']:.2f} | {p[f'torch_{s}_ms']:.2f} | {p['distillery_ms']:.2f} | "
                        f"{p['ratio']:.3f} | {p['max_weight_diff_1_vs_2']:.1e} | {p['accuracy']['distillery_2']:.2f} |")
    update_markdown("ddp_scaling", "\n".join([
        "## torch.distributed: distillery against a hand-written torch loop (`benchmarks/ddp_scaling.py`)", "",
        f"`python benchmarks/ddp_scaling.py --strategy ddp` and `--strategy fsdp`: KD of the MLP from a CNN teacher "
        f"on {args.samples} MNIST-1D samples, global batch {args.batch_size}, {args.epochs} epochs, 2 processes on "
        f"gloo sharing {args.threads} threads; median ms per step of rank 0.", "",
        "| strategy | 1 process | torch, 2 processes | distillery, 2 processes | ratio | weight diff 1 vs 2 | "
        "accuracy % |", "|---|---|---|---|---|---|---|", *rows]))


if __name__ == "__main__":
    main()
