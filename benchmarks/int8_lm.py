"""The built-in LM exported in int8: size on disk, CPU latency at batch 1 and 64, and validation
perplexity, against fp32, side by side in one process (the compression issue's goal: the exported
int8 model at least 3.5x smaller than fp32 and, at batch 64, faster).

Rows {"export", "size_mb", "size_ratio", "latency_b1_ms", "latency_b64_ms", "speedup_b64", "perplexity"}:
  fp32              the teacher's float weights (model.safetensors)
  torchao_int8      torchao's int8 per-channel weights + int8 dynamic activations (quantize.ptq; torchao's CPU
                    kernels are reference code)
  int8_dynamic      compress.int8: torch's x86 / fbgemm dynamic int8 GEMM on torchao's int8 weights
  int8_weight_only  compress.int8 with float activations (int8 weights dequantized at each call)
Latency: one forward of block-long sequences (128 tokens) at 1 thread: the median over 3 rounds (batch 1: of
each round's median of 10; batch 64: one forward a round, after one warm-up); the exports alternate
round by round. The model is the built-in ~10M teacher
(benchmarks/runs/lm/teacher, trained by recipe lm/teacher when missing).

    python benchmarks/int8_lm.py            # ~10 min with the teacher present
    python benchmarks/int8_lm.py --quick    # a smoke run on a tiny random model
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from distillery.compress import int8
from distillery.compress import quantize as Q
from distillery.lm import distill as D
from distillery.lm.models import llama, load_lm

from _common import RESULTS, command, machine, update_markdown, write

HERE = Path(__file__).parent


def timed(model, x: torch.Tensor, repeats: int, warmup: int = 2) -> float:
    """Median ms of ``repeats`` forwards at 1 thread, after ``warmup`` untimed ones."""
    torch.set_num_threads(1)
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.quick:
        model, val = llama("tiny", vocab_size=512, seed=0), None
        block, vocab = 32, 512
    else:
        folder = HERE / "runs" / "lm" / "teacher" / "models" / "model"
        if not (folder / "config.json").is_file():
            from distillery import kinds, recipes

            kinds.run(recipes.load("lm/teacher", [f"runs_dir={HERE / 'runs'}"]), run_dir=folder.parents[1], progress=False)
        model, tok = load_lm(folder)
        from distillery.lm.corpus import builtin

        val = builtin(128, 8192, tokenizer=tok)[0]["validation"]
        val = val.subset(torch.arange(min(64, len(val))))
        block, vocab = 128, model.vocab_size
    model.eval()
    work = Path(tempfile.mkdtemp())
    from distillery.pipeline import save_weights

    save_weights(model, work / "fp32.safetensors", {})
    converted = Q.ptq(copy.deepcopy(model), Q.QuantizeConfig(method="ptq", weights=8, granularity="per_channel",
                                                               activations=8))
    Q.save(converted, work / "torchao.safetensors", {})
    int8.export(converted, work / "int8_dynamic.safetensors", {}, activations="dynamic")
    int8.export(converted, work / "int8_weight_only.safetensors", {}, activations="none")
    fresh = lambda: copy.deepcopy(model)  # noqa: E731  (the float architecture the files load into)
    cfg = Q.QuantizeConfig(method="ptq", weights=8, granularity="per_channel", activations=8)
    models = {"fp32": model, "torchao_int8": Q.load(fresh(), work / "torchao.safetensors", cfg),
              "int8_dynamic": int8.load(fresh(), work / "int8_dynamic.safetensors"),
              "int8_weight_only": int8.load(fresh(), work / "int8_weight_only.safetensors")}
    files = {"fp32": "fp32", "torchao_int8": "torchao", "int8_dynamic": "int8_dynamic",
             "int8_weight_only": "int8_weight_only"}
    g = torch.Generator().manual_seed(0)
    x1, x64 = torch.randint(0, vocab, (1, block), generator=g), torch.randint(0, vocab, (64, block), generator=g)
    times = {k: {"b1": [], "b64": []} for k in models}
    threads = torch.get_num_threads()
    for i in range(args.rounds):  # alternate the exports round by round
        for name, m in models.items():
            times[name]["b1"].append(timed(m, x1, 10 if not args.quick else 5))
            times[name]["b64"].append(timed(m, x64, 1, warmup=0 if times[name]["b64"] else 1))
            print(f"round {i + 1}: {name} b1 {times[name]['b1'][-1]:.1f} ms, b64 {times[name]['b64'][-1]:.0f} ms",
                  flush=True)
    torch.set_num_threads(threads)
    size = {k: (work / f"{f}.safetensors").stat().st_size / 2**20 for k, f in files.items()}
    rows = []
    for name, m in models.items():
        b1, b64 = statistics.median(times[name]["b1"]), statistics.median(times[name]["b64"])
        rows.append({"export": name, "size_mb": round(size[name], 3), "size_ratio": round(size["fp32"] / size[name], 2),
                     "latency_b1_ms": round(b1, 2), "latency_b64_ms": round(b64, 1),
                     "speedup_b64": round(statistics.median(times["fp32"]["b64"]) / b64, 2),
                     "perplexity": None if val is None else round(D.perplexity(m, val, batch_size=16), 3)})
    for r in rows:
        print(r)
    if args.quick:
        return
    payload = {"rows": rows, "model": "benchmarks/runs/lm/teacher (lm/teacher)", "block": block,
               "validation_blocks": len(val), "threads": 1, "rounds": args.rounds, "command": command(),
               "machine": machine(), "engine": int8.engine()}
    write(RESULTS / "int8_lm.json", payload)
    lines = ["## The built-in LM exported in int8 (`int8_lm`)", "",
             f"`{command()}`: the ~10M teacher of `lm/teacher`, one forward of {block}-token sequences at 1 thread "
             f"(median of {args.rounds} alternating rounds), validation perplexity on {len(val)} blocks; quantized engine "
             f"{payload['engine']}.", "",
             "| export | size MB | smaller | latency b1 ms | latency b64 ms | b64 speed-up | perplexity |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['export']} | {r['size_mb']:.2f} | {r['size_ratio']:.2f}x | {r['latency_b1_ms']:.2f} | "
                     f"{r['latency_b64_ms']:.1f} | {r['speedup_b64']:.2f}x | {r['perplexity']:.2f} |")
    update_markdown("int8_lm", "\n".join(lines))


if __name__ == "__main__":
    main()
