"""Peak memory and time of chunked against naive token KD: forward KL (``kd``, temperature 1) over
V = 32,000 classes and B x T = 4 x 1024 tokens, forward + backward, in one run.

Naive is ``token_loss(..., chunk_size=None)``: the logit loss over all 4,096 rows at once.
Chunked is the same call with ``chunk_size`` rows per piece (default 256). Peak memory is the torch
profiler's peak of live tensors allocated during forward + backward (``_common.peak_live_mb``): the
logits of both models exist before the call and are not counted; the student logits' gradient
(one (4096, V) float32 tensor, 500 MiB, needed by any implementation) is. Times are medians of
``--reps`` alternated runs outside the profiler.

    python benchmarks/lm_loss_memory.py   ->  benchmarks/results/lm_loss_memory.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distillery.losses.tokens import token_loss

from _common import RESULTS, command, machine, peak_live_mb, update_markdown, write


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    b, t, v = args.batch, args.seq, args.vocab
    student = torch.randn(b, t, v, requires_grad=True)
    teacher = torch.randn(b, t, v)
    mask = torch.rand(b, t) > 0.1  # some padding / prompt tokens, as in real batches

    def step(chunk: int | None):
        def run() -> float:
            loss = token_loss("kd", student, teacher, mask=mask, chunk_size=chunk, temperature=1.0)
            loss.backward()
            student.grad = None
            return float(loss.detach())
        return run

    naive, chunked = step(None), step(args.chunk)
    values = {"naive": naive(), "chunked": chunked()}  # warm-up, and the two must agree
    peaks = {"naive": peak_live_mb(naive), "chunked": peak_live_mb(chunked)}
    times: dict[str, list[float]] = {"naive": [], "chunked": []}
    for _ in range(args.reps):
        for name, fn in (("naive", naive), ("chunked", chunked)):
            t0 = time.perf_counter()
            fn()
            times[name].append(1000 * (time.perf_counter() - t0))
    ms = {k: statistics.median(x) for k, x in times.items()}
    out = {"benchmark": "lm_loss_memory", "command": command(), "machine": machine(), "seed": args.seed,
           "setup": {"loss": "kd (forward KL), temperature 1", "vocab": v, "batch": b, "seq": t,
                     "chunk_size": args.chunk, "reps": args.reps, "dtype": "float32",
                     "peak": "torch profiler peak of live tensors during forward + backward (inputs excluded)"},
           "naive_peak_mb": peaks["naive"], "chunked_peak_mb": peaks["chunked"],
           "peak_ratio": peaks["chunked"] / peaks["naive"], "naive_ms": ms["naive"], "chunked_ms": ms["chunked"],
           "time_ratio": ms["chunked"] / ms["naive"], "times_ms": times,
           "loss_abs_diff": abs(values["naive"] - values["chunked"])}
    write(RESULTS / "lm_loss_memory.json", out)
    update_markdown("lm_loss_memory", "\n".join([
        "## Token KD memory: chunked against naive (`lm_loss_memory`)", "",
        f"`python benchmarks/lm_loss_memory.py`: forward KL over V = {v:,}, B x T = {b} x {t}, forward + backward, "
        f"float32, {args.threads} threads; chunks of {args.chunk} tokens. Peak = torch profiler's peak of live tensors "
        "during the step (the logits are inputs, not counted; the logits' gradient is).", "",
        "| | peak MiB | ms (median) |", "|---|---|---|",
        f"| naive | {peaks['naive']:.0f} | {ms['naive']:.0f} |",
        f"| chunked | {peaks['chunked']:.0f} | {ms['chunked']:.0f} |",
        f"| ratio | {out['peak_ratio']:.3f} | {out['time_ratio']:.3f} |"]))


if __name__ == "__main__":
    main()
