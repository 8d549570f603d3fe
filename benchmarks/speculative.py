"""Speculative decoding with the built-in teacher as the target and three 1.2M-parameter drafts:

- ``data_only``: the student trained on the data alone (recipe lm/student);
- ``kd``: the student distilled with token-level forward KL (recipe lm/kd);
- ``adaspec``: the student distilled on AdaSPEC's tokens (recipe lm/kd method=adaspec, keep 0.4),
  with the ``kd`` draft as its reference model (the paper's stage 1 is exactly that distillation).

Each draft proposes gamma tokens per block for ``--prompts`` validation prompts (the first 32
tokens of validation blocks), ``--new`` tokens each, sampled at temperature 1 (exact target
samples). ``acceptance`` = the per-token acceptance rate, accepted / judged draft tokens (a block
judges its proposals up to the first rejection; ``accepted_per_proposed`` counts every proposal),
``mean_accepted_length`` = tokens per
target forward, ``speedup`` = speculative / target-only tokens per second (batch 1, KV caches,
alternated per prompt, same process); ``expected_acceptance`` = mean over validation positions of
sum_x min(p, q) (1 - TVD), the analytic per-token acceptance; ``cost_ratio`` = target / draft
tokens per second, each sampling alone, and ``predicted_speedup`` = Leviathan et al.'s
E[tokens per block] / (gamma c + 1) at the measured acceptance. The drafts are reused from
``benchmarks/lm_kd.py``'s run folders (seed 0) when present, else trained.

    python benchmarks/speculative.py   ->  benchmarks/results/speculative.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from lm_kd import train

from distillery import recipes
from distillery.lm.corpus import builtin
from distillery.lm.generate import sample
from distillery.lm.models import load_lm
from distillery.lm.speculative import expected_acceptance, expected_block_length, measure_speed

from _common import RESULTS, command, machine, update_markdown, write


def draft(method: str, teacher: Path, work: Path) -> Path:
    """The folder of the draft model of ``method`` (trained unless lm_kd's seed-0 run has it)."""
    reuse = {"data_only": work / "seed0" / "alone", "kd": work / "seed0" / "forward_kl"}
    out = reuse.get(method, work / "seed0" / method)
    if (out / "models" / "model" / "config.json").is_file():
        return out / "models" / "model"
    if method == "data_only":
        recipe = recipes.load("lm/student", ["seed=0"])
    elif method == "kd":
        recipe = recipes.load("lm/kd", [f"teacher={teacher}", "seed=0"])
    else:
        recipe = recipes.load("lm/kd", [f"teacher={teacher}", "seed=0", "method=adaspec",
                                        f"reference={draft('kd', teacher, work)}", "keep=0.4"])
    print(f"training the {method} draft into {out}", flush=True)
    train(recipe, out)
    return out / "models" / "model"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", type=Path, default=Path("runs/lm/teacher/models/model"))
    ap.add_argument("--work", type=Path, default=Path("runs/bench-lm"))
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1, help="batch-1 decoding of small models: 1 thread is fastest here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if not (args.teacher / "config.json").is_file():
        raise SystemExit(f"no teacher at {args.teacher}; train it: distillery run lm/teacher --out {args.teacher.parent.parent}")
    target, _ = load_lm(args.teacher)
    splits, _ = builtin()
    val = splits["validation"]
    prompts = val.x[: args.prompts, : args.prompt_len]
    scored = val.batch(torch.arange(min(256, len(val))))
    rows = []
    for method in ("data_only", "kd", "adaspec"):
        folder = draft(method, args.teacher, args.work)
        model, _ = load_lm(folder)
        alpha = expected_acceptance(target, model, scored["x"], temperature=args.temperature, mask=scored["mask"])
        rep = measure_speed(target, model, prompts, args.new, gamma=args.gamma, temperature=args.temperature,
                            seed=args.seed)
        # the cost ratio c of one draft token to one target token (each alone, batch 1, cached), and
        # Leviathan et al.'s predicted speed-up E[tokens per block] / (gamma c + 1) at the measured alpha
        t0 = time.perf_counter()
        for i, row in enumerate(prompts):
            sample(model, row[None], args.new, temperature=args.temperature,
                   generator=torch.Generator().manual_seed(args.seed + i))
        draft_tps = len(prompts) * args.new / (time.perf_counter() - t0)
        c = rep.target_tokens_per_s / draft_tps
        predicted = expected_block_length(rep.token_acceptance_rate, args.gamma) / (args.gamma * c + 1)
        rows.append({"method": method, "acceptance": rep.token_acceptance_rate,
                     "accepted_per_proposed": rep.acceptance_rate,
                     "mean_accepted_length": rep.mean_accepted_length, "speedup": rep.speedup,
                     "expected_acceptance": alpha, "target_tokens_per_s": rep.target_tokens_per_s,
                     "speculative_tokens_per_s": rep.speculative_tokens_per_s, "draft_tokens_per_s": draft_tps,
                     "cost_ratio": c, "predicted_speedup": predicted, "draft": str(folder)})
        print(f"{method}: acceptance {rep.token_acceptance_rate:.3f} (analytic {alpha:.3f}), "
              f"{rep.mean_accepted_length:.2f} tokens/target call, speedup {rep.speedup:.2f}x "
              f"(cost ratio {c:.2f}, predicted {predicted:.2f}x)", flush=True)
    write(RESULTS / "speculative.json", {
        "benchmark": "speculative", "command": command(), "machine": machine(), "seeds": {"sampling": args.seed,
                                                                                           "drafts": 0},
        "setup": {"target": str(args.teacher), "target_parameters": target.num_parameters(), "prompts": args.prompts,
                  "prompt_len": args.prompt_len, "new_tokens": args.new, "gamma": args.gamma,
                  "temperature": args.temperature, "threads": args.threads, "batch": 1},
        "wall_s": time.perf_counter() - t_start, "rows": rows})
    lines = ["## Speculative decoding drafts (`speculative`)", "",
             f"`python benchmarks/speculative.py`: the built-in teacher ({target.num_parameters() / 1e6:.1f}M) as the "
             f"target, 1.2M drafts, gamma {args.gamma}, temperature {args.temperature}, {args.prompts} validation "
             f"prompts x {args.new} new tokens, batch 1, {args.threads} thread(s). Acceptance = accepted / judged "
             "draft tokens (per token); analytic = mean of sum_x min(p, q) over validation positions.", "",
             "| draft | acceptance | analytic | tokens per target call | speedup | cost ratio c | predicted |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['acceptance']:.3f} | {r['expected_acceptance']:.3f} | "
                     f"{r['mean_accepted_length']:.2f} | {r['speedup']:.2f}x | {r['cost_ratio']:.2f} | "
                     f"{r['predicted_speedup']:.2f}x |")
    update_markdown("speculative", "\n".join(lines))


if __name__ == "__main__":
    main()
