"""Compression with distillation recovery on MNIST-1D and digits: quantization (torchao) and pruning
(torch-pruning) of the distilled student of the shipped recipe, recovered by fine-tuning alone or by KD.

Per data set and seed, the shipped recipe (`mnist1d/kd`, `digits/kd`; baseline off) distils its student
once; then each method compresses a copy of that student through the recipe flow's own stage
(`pipeline.compress_stage`: the exported file loaded back is what is measured). Recovery trains for
`--epochs` epochs (lr 3e-3, batch 128, cosine) with
  *_ft   cross-entropy on the labelled training split alone
  *_kd   the recipe's distillation terms from the recipe's teacher, on the recipe's distillation data
         (MNIST-1D: the 50,000-sample unlabelled transfer set, so 12x the steps; digits: the training split)
Methods: fp32 (the distilled student), ptq (torchao, no training), qat (fake-quantized fine-tuning),
qat_kd, at 8 / 4 / 2 weight bits (int8 dynamic activations, per-channel weights), and dq_kd (Polino et
al.'s differentiable quantization: learned points, buckets of 256, weight-only) and dq_alloc_kd (the same with
the paper's bit allocation: points shared among layers by gradient norm, the total kept); prune_ft and
prune_kd (magnitude, one shot) at 0.5 and 0.75 of the channels. Rows:
  {"method", "data", "bits" | "sparsity", "accuracy", "size_kb", "latency_ms", "latency_64_ms", "seeds"}
test accuracy % (mean, std, runs), size on disk of the exported file, CPU latency at 1 thread (batch 1 and
64; torchao's CPU kernels for these tensors are reference code).

    python benchmarks/compress_vision.py --seeds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from distillery import kinds, pipeline, recipes
from distillery.compress.prune import PruneConfig
from distillery.compress.quantize import QuantizeConfig
from distillery.config import CompressStage, TermConfig, TrainConfig

from _common import RESULTS, command, machine, update_markdown, write

DATA = {"mnist1d": "mnist1d/kd", "digits": "digits/kd"}
CE = [TermConfig("ce", teacher=None)]


def methods(epochs: int) -> list[tuple[str, dict, CompressStage | None, bool]]:
    """(method, key, stage, kd) for every row."""
    train = TrainConfig(epochs=epochs, batch_size=128, lr=3e-3, schedule="cosine")
    out: list[tuple[str, dict, CompressStage | None, bool]] = [("fp32", {"bits": 32}, None, False)]
    for bits in (8, 4, 2):
        q = QuantizeConfig(weights=bits, granularity="per_channel")
        out += [("ptq", {"bits": bits}, CompressStage(f"ptq{bits}", quantize=QuantizeConfig(
                    weights=bits, granularity="per_channel", method="ptq")), False),
                ("qat", {"bits": bits}, CompressStage(f"qat{bits}", quantize=q, terms=CE, train=train), False),
                ("qat_kd", {"bits": bits}, CompressStage(f"qatkd{bits}", quantize=q, train=train), True),
                ("dq_kd", {"bits": bits}, CompressStage(f"dqkd{bits}", quantize=QuantizeConfig(
                    weights=bits, method="dq", activations=None, group_size=256), train=train), True),
                ("dq_alloc_kd", {"bits": bits}, CompressStage(f"dqakd{bits}", quantize=QuantizeConfig(
                    weights=bits, method="dq", activations=None, group_size=256, allocate="gradient"), train=train),
                 True)]
    for ratio in (0.5, 0.75):
        p = PruneConfig(ratio=ratio)
        out += [("prune_ft", {"sparsity": ratio}, CompressStage(f"pft{round(100 * ratio)}", prune=p, terms=CE, train=train), False),
                ("prune_kd", {"sparsity": ratio}, CompressStage(f"pkd{round(100 * ratio)}", prune=p, train=train), True)]
    return out


@dataclass
class _Dir:
    """The part of a run directory a compress stage writes: its models and phases' checkpoints."""

    path: Path
    resume: bool = False

    @property
    def models(self) -> Path:
        return self.path / "models"


def one_seed(name: str, seed: int, work: Path, epochs: int) -> list[dict]:
    recipe = recipes.load(DATA[name], [f"seed={seed}", "baseline.enabled=false", f"runs_dir={work}",
                                       f"cache_dir={work / 'cache'}"])
    out = work / f"{name}-seed{seed}"
    if not (out / "summary.json").is_file() or '"done"' not in (out / "summary.json").read_text():
        kinds.run(recipe, run_dir=out, resume=(out / "config.yaml").is_file(), progress=False)
    data = pipeline.load_data(recipe)
    teacher = pipeline.build_model(recipe.teacher.model, data.train)
    pipeline.load_weights(teacher, out / "models" / "teacher.safetensors")
    student = pipeline.build_model(recipe.student.model, data.train)
    pipeline.load_weights(student, out / "models" / "distilled.safetensors")
    rows = []
    answers = pipeline.distilling_teacher(recipe, teacher)
    if recipe.distill.precompute_teacher:
        from distillery.teachers import PrecomputedTeacher

        answers = PrecomputedTeacher(answers, pipeline.distill_set(recipe, data))
    for method, key, stage, kd in methods(epochs):
        if stage is None:
            model, size = student, (out / "models" / "distilled.safetensors").stat().st_size / 1024
        else:
            d = _Dir(work / f"{name}-seed{seed}-{stage.name}")
            if (d.path / "checkpoints").exists():
                d.resume = True
            on = pipeline.distill_set(recipe, data) if kd else data.train  # KD reads unlabelled data too
            model = pipeline.compress_stage(recipe, stage, student, answers, on, data, d, False)
            size = (d.models / f"{stage.name}.safetensors").stat().st_size / 1024
        (m,) = pipeline.measure({"teacher": teacher, method: model}, data.test, None, batch64=True)[1:]
        rows.append({"method": method, "data": name, **key, "accuracy": 100 * m["accuracy"], "size_kb": size,
                     "latency_ms": m["latency_ms"], "latency_64_ms": m.get("latency_64_ms"), "seed": seed})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10, help="recovery epochs of every trained method")
    ap.add_argument("--data", nargs="*", default=list(DATA))
    ap.add_argument("--work", type=Path, default=Path("runs/bench-compress"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    runs = [r for name in args.data for seed in range(args.seeds) for r in one_seed(name, seed, args.work, args.epochs)]
    rows = []
    for r0 in [r for r in runs if r["seed"] == 0]:
        same = [r for r in runs if all(r.get(k) == r0.get(k) for k in ("method", "data", "bits", "sparsity"))]
        accs = [r["accuracy"] for r in same]
        rows.append({k: r0[k] for k in ("method", "data", "bits", "sparsity") if k in r0} |
                    {"accuracy": {"mean": statistics.fmean(accs), "std": statistics.pstdev(accs), "runs": accs},
                     "size_kb": statistics.fmean(r["size_kb"] for r in same),
                     "latency_ms": statistics.median(r["latency_ms"] for r in same),
                     "latency_64_ms": statistics.median(r["latency_64_ms"] for r in same),
                     "seeds": sorted(r["seed"] for r in same)})
    write(RESULTS / "compress_vision.json", {"rows": rows, "epochs": args.epochs, "command": command(),
                                             "machine": machine(), "seconds": time.time() - t0})
    lines = ["## Compression with distillation recovery (`compress_vision`)", "",
             f"`python benchmarks/compress_vision.py --seeds {args.seeds} --epochs {args.epochs}`: the distilled "
             "student of the shipped recipe compressed by each method through the recipe flow's compress stage "
             "(the exported file, loaded back, is measured); recovery by fine-tuning on the labelled training "
             "split, or by KD on the recipe's distillation data (MNIST-1D: the transfer set). Test "
             "accuracy %, mean ± std over seeds; size of the exported file; latency at 1 thread (torchao's CPU "
             "kernels for quantized tensors are reference code, slower than float32 here).", "",
             "| data | method | bits / sparsity | accuracy | size KB | latency ms (b1) | latency ms (b64) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        level = f"{r['bits']} bits" if "bits" in r else f"{r['sparsity']:.0%}"
        lines.append(f"| {r['data']} | {r['method']} | {level} | {r['accuracy']['mean']:.2f} ± {r['accuracy']['std']:.2f}"
                     f" | {r['size_kb']:.1f} | {r['latency_ms']:.3f} | {r['latency_64_ms']:.3f} |")
    update_markdown("compress_vision", "\n".join(lines))


if __name__ == "__main__":
    main()
