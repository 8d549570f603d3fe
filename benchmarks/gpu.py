"""One short script for a CUDA machine (a benchmark, never a test): run it whenever a GPU is lent.

1. The engine against a hand-written loop on CUDA in bf16 (KD of an MLP from a CNN teacher on
   MNIST-1D): median ms per step and the ratio engine / hand.
2. LM token KD at a 32k vocabulary (Llama-style teacher and student built from a config, random
   tokens): tokens/s and peak CUDA memory with the chunked loss against the naive (unchunked) one.
3. DDP on one GPU: 2 processes (gloo, both on cuda:0) against 1 process at the same global batch:
   the largest weight difference and ms per step.
4. Step distillation of a class-conditional diffusion teacher on 32x32 images (digits upscaled,
   ``data=digits32``): a UNet2DModel v-prediction teacher trained on the GPU, consistency-distilled
   at guidance w = 2; FID (digits classifier), class accuracy of the samples and seconds per model.

Writes benchmarks/results/gpu.json naming the device. About 3 minutes on an H100.

    python benchmarks/gpu.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distillery import distributed, models
from distillery.config import TermConfig, TrainConfig
from distillery.data import TensorData
from distillery.data.core import batches, epoch_order
from distillery.engine import fit
from distillery.losses.logits import kd
from distillery.objective import Objective
from distillery.teachers import ModuleTeacher

from _common import RESULTS, command, machine, write

KD = [TermConfig(loss="kd", params={"temperature": 4.0})]


def _mnist_like(n: int, seed: int = 0) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 40, generator=g)
    return TensorData(x, None, torch.arange(n), 10, "random-40")


def engine_vs_hand(steps: int, batch: int, rounds: int) -> dict:
    dev = torch.device("cuda")
    data = _mnist_like(steps * batch)
    torch.manual_seed(0)
    teacher = models.build("cnn1d", (40,), 10, {"channels": 64}).to(dev).eval().requires_grad_(False)

    def hand(student) -> list[float]:
        opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
        stamps = [time.perf_counter()]
        for index in batches(epoch_order(len(data), 0, 0), batch):
            x = data.x[index].to(dev, non_blocking=True)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                t = teacher(x)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                s = student(x)
            loss = kd(s.float(), t.float(), temperature=4.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()  # the engine reads the loss every step (NaN check): the same sync here
            stamps.append(time.perf_counter())
        return [b - a for a, b in itertools.pairwise(stamps)]

    def engine(student) -> list[float]:
        stamps = [time.perf_counter()]
        cfg = TrainConfig(epochs=1, batch_size=batch, lr=1e-3, schedule="constant", device="cuda", precision="bf16",
                          log_every=50)
        fit(student, Objective(KD), data, cfg, teacher=ModuleTeacher(teacher, device=dev, dtype=torch.bfloat16),
            progress=False, on_step=lambda _: stamps.append(time.perf_counter()))
        return [b - a for a, b in itertools.pairwise(stamps)]

    got: dict[str, list[float]] = {"engine": [], "hand": []}
    for r in range(rounds):
        for name, loop in (("engine", engine), ("hand", hand))[:: 1 if r % 2 == 0 else -1]:
            torch.manual_seed(r)
            student = models.build("mlp", (40,), 10, {"hidden": [1024, 1024]}).to(dev)
            got[name] += [t * 1000 for t in loop(student)[5:]]
    e, h = statistics.median(got["engine"]), statistics.median(got["hand"])
    return {"engine_ms": e, "hand_ms": h, "ratio": e / h, "batch_size": batch, "steps": steps, "rounds": rounds,
            "precision": "bf16"}


def lm_kd(vocab: int, seq: int, batch: int, steps: int) -> dict:
    from distillery.lm.corpus import TokenData
    from distillery.lm.distill import distil
    from distillery.lm.models import llama

    out = {}
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, vocab, (steps * batch, seq + 1), generator=g)
    data = TokenData.from_blocks(rows, vocab, "random")
    for name, chunk in (("chunked", 1024), ("naive", None)):
        teacher = llama("teacher", vocab_size=vocab, seed=0).cuda()
        student = llama("student", vocab_size=vocab, seed=1)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cfg = TrainConfig(epochs=1, batch_size=batch, lr=1e-3, schedule="constant", device="cuda", precision="bf16",
                          log_every=50)
        stamps = [time.perf_counter()]
        distil(student, teacher, data, cfg, chunk_size=chunk, progress=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - stamps[0]
        out[name] = {"tokens_per_s": steps * batch * seq / seconds, "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
                     "chunk_size": chunk}
        del teacher, student
        torch.cuda.empty_cache()
    out.update(vocab=vocab, seq=seq, batch=batch, steps=steps,
               memory_ratio=out["naive"]["peak_mib"] / out["chunked"]["peak_mib"])
    return out


def _ddp_worker(rank: int, world: int, init: str, out: str, steps: int, batch: int) -> None:
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        data = _mnist_like(steps * batch, seed=1)
        torch.manual_seed(0)
        teacher = models.build("cnn1d", (40,), 10, {"channels": 32})
        torch.manual_seed(1)
        student = models.build("mlp", (40,), 10, {"hidden": [256]})
        cfg = TrainConfig(epochs=2, batch_size=batch, lr=1e-3, schedule="constant", device="cuda:0", log_every=50)
        stamps = [time.perf_counter()]
        fit(student, Objective(KD), data, cfg, teacher=ModuleTeacher(teacher), progress=False,
            on_step=lambda _: stamps.append(time.perf_counter()))
        if rank == 0:
            torch.save({"weights": {k: v.cpu() for k, v in student.state_dict().items()},
                        "ms": 1000 * statistics.median(b - a for a, b in itertools.pairwise(stamps))}, out)
    finally:
        if world > 1:
            distributed.shutdown()


def ddp_one_gpu(steps: int, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        one, two = str(Path(tmp) / "1.pt"), str(Path(tmp) / "2.pt")
        _ddp_worker(0, 1, "", one, steps, batch)
        mp.spawn(_ddp_worker, args=(2, str(Path(tmp) / "init"), two, steps, batch), nprocs=2, join=True)
        a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    diff = max(float((a["weights"][k] - b["weights"][k]).abs().max()) for k in a["weights"])
    return {"one_process_ms": a["ms"], "two_processes_ms": b["ms"], "max_weight_diff": diff, "backend": "gloo",
            "steps_per_epoch": steps, "batch_size": batch}


def diffusion_cond32(quick: bool) -> dict:
    """The diffusion recipe on CUDA: class-conditional teacher on 32x32 digits, then CD at w = 2."""
    from distillery import kinds, recipes

    over = ["data=digits32", "teacher.class_conditional=true", "teacher.net={widths: [64, 128, 128], layers: 1}",
            f"teacher.train={{epochs: {10 if quick else 200}, batch_size: 128, lr: 0.0005}}",
            f"student.train={{epochs: {4 if quick else 80}, batch_size: 128, lr: 0.0001}}", "settings.w=2.0",
            "eval.samples=1000", "eval.teacher_steps=[1, 4, 50]"]
    with tempfile.TemporaryDirectory() as d:
        recipe = recipes.load("diffusion/cd", [*over, f"runs_dir={d}"])
        result = kinds.run(recipe, run_dir=Path(d) / "run", progress=False)
    keep = ("method", "steps", "fid", "class_accuracy", "confidence", "samples_per_s", "seconds")
    return {"rows": [{k: r.get(k) for k in keep} for r in result.rows], "overrides": over}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    ap.add_argument("--out", default=str(RESULTS / "gpu.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device; this machine has none.")
    q = args.quick
    t0 = time.time()
    payload = {"device": torch.cuda.get_device_name(0), "command": command(), "machine": machine(),
               "cuda": torch.version.cuda, "seeds": [0, 1]}
    for name, fn in (("engine_vs_hand_bf16", lambda: engine_vs_hand(40 if q else 200, 4096, 2 if q else 4)),
                     ("lm_token_kd_v32k", lambda: lm_kd(32000, 256, 16, 4 if q else 20)),
                     ("ddp_one_gpu", lambda: ddp_one_gpu(10 if q else 40, 512)),
                     ("diffusion_cd_digits32", lambda: diffusion_cond32(q))):
        t = time.time()
        try:
            payload[name] = fn()
        except Exception as e:  # one part failing still reports the others, and names the failure
            payload[name] = {"error": f"{type(e).__name__}: {e}"}
        payload[name]["seconds"] = time.time() - t
        print(name, payload[name], flush=True)
    payload["wall_s"] = time.time() - t0
    write(args.out, payload)


if __name__ == "__main__":
    main()
