"""LAPTOP-Diff on distillery's denoisers: layers removed by a one-shot criterion, then recovered by distillation.

For each data set a v-prediction teacher is trained (cached), then the recipe ``diffusion/prune`` removes a
share (``--ratio``; default 0.1 of the U-Net, 0.25 of the MLP) of its parameters in whole layers and retrains
the pruned network from it. Rows
``{"data", "ratio", "criterion", "features", "output_weight", "params", "removed", "output_loss",
"sum_of_layer_losses", "before", "after", "steps"}`` where ``before`` / ``after`` hold the quality of the
pruned network before and after recovery (FID on digits, sliced Wasserstein and exact log-likelihood on the
64-D mixture) at the teacher's sampler and ``steps``:
  criterion  output_loss (LAPTOP-Diff) | magnitude (mean |weight|) | random, each recovered the same way
  features   normalized (LAPTOP-Diff) | plain (BK-SDM's unnormalised feature MSE) | none, with output KD;
             and ``task`` alone (no distillation: output_weight 0, features none)
``additivity``: the paper's property measured on random layer sets (2 to 4 layers): the Pearson correlation
of the sum of the single-layer output losses with the set's own output loss, and their mean ratio.

    python benchmarks/compress_diffusion.py             # digits (U-Net) and mixture64d (MLP), ~40 min on 2 cores
    python benchmarks/compress_diffusion.py --quick     # a smoke run
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from distillery import recipes

from _common import RESULTS, command, finished_rows, machine, update_markdown, write

DATA = {  # the ratio: digits' U-Net has 6 removable layers (33% of it), mixture64d's MLP 6 blocks (86%)
    "digits": ["data=digits", "teacher.prediction=v_prediction", "prune.ratio=0.1",
               "teacher.net={widths: [32, 64], layers: 2}",
               "teacher.train={epochs: 150, batch_size: 128, lr: 0.001}",
               "student.train={epochs: 20, batch_size: 128, lr: 0.0005}"],
    "mixture64d": ["data=mixture64d", "teacher.prediction=v_prediction", "prune.ratio=0.25",
                   "teacher.net={hidden: 256, depth: 6}",
                   "teacher.train={epochs: 30, batch_size: 256, lr: 0.002}",
                   "student.train={epochs: 10, batch_size: 256, lr: 0.0005}"],
}
VARIANTS = [  # (criterion, features, output_weight)
    ("output_loss", "normalized", 1.0),
    ("magnitude", "normalized", 1.0),
    ("random", "normalized", 1.0),
    ("output_loss", "plain", 1.0),
    ("output_loss", "none", 1.0),
    ("output_loss", "none", 0.0),
]


def quality(row: dict) -> dict:
    keys = ("fid", "confidence") if "fid" in row else ("swd", "loglik", "coverage")
    return {k: row[k] for k in keys if k in row}


def additivity(overrides: list[str], subsets: int, seed: int = 0) -> dict:
    """Sum of single-layer output losses against the set's own output loss, on random sets of 2 to 4 layers of
    the runs' (cached) teacher, on the recipe's calibration batch."""
    from distillery.diffusion import prune as P
    from distillery.diffusion.nets import load_folder
    from distillery.diffusion.recipe import _fingerprint, load_data

    recipe = recipes.load("diffusion/prune", overrides)
    teacher = load_folder(Path(recipe.runs_dir) / "cache" / "diffusion-teachers" / _fingerprint(recipe)[:16])
    data, _, _ = load_data(recipe)
    batch = P.calibration_batch(teacher, data, recipe.prune.calibration, seed)
    ref = P._predict(teacher, batch)
    layers = P.candidates(teacher.net)
    single = {p: P.output_loss(teacher, batch, [p], ref) for p in layers}
    rng = random.Random(seed)
    pairs = []
    for _ in range(subsets):
        s = rng.sample(layers, rng.randint(2, min(4, len(layers))))
        pairs.append((sum(single[p] for p in s), P.output_loss(teacher, batch, s, ref)))
    x, y = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    r = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
    return {"layers": len(layers), "subsets": subsets, "pearson": r, "mean_ratio": float((y / x).mean()),
            "single": single}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", nargs="*", default=list(DATA))
    ap.add_argument("--ratio", type=float, default=None, help="share of the teacher's parameters removed (default: "
                    "0.1 of the U-Net, 0.25 of the MLP)")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps of the reported quality")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-compress-diffusion"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    rows, adds = [], {}
    for name in args.data:
        base = [*DATA[name], *([f"prune.ratio={args.ratio}"] if args.ratio else []),
                f"eval.teacher_steps=[{args.steps}]", f"runs_dir={args.work}"]
        if args.quick:
            base += ["teacher.train.epochs=1", "student.train.epochs=1", "eval.samples=100", "samples=1000",
                     "prune.calibration=32"]
        teacher_row = None
        for criterion, features, w in VARIANTS[:2] if args.quick else VARIANTS:
            tag = f"{name}-{criterion}-{features}-{w:g}"
            got = finished_rows("diffusion/prune", [*base, f"prune.criterion={criterion}", f"prune.features={features}",
                                                    f"prune.output_weight={w}"], args.work / tag)
            by = {r["method"]: r for r in got}
            teacher_row = by["teacher"]
            ratio = recipes.load("diffusion/prune", base).prune.ratio
            rows.append({"data": name, "ratio": ratio, "criterion": criterion, "features": "task" if not w and features == "none"
                         else features, "output_weight": w, "params": by["prune"]["params"],
                         "teacher_params": teacher_row["params"], "removed": by["prune"]["removed"],
                         "output_loss": by["prune"]["output_loss"],
                         "sum_of_layer_losses": by["prune"]["sum_of_layer_losses"], "steps": args.steps,
                         "before": quality(by["pruned"]), "after": quality(by["prune"]),
                         "seconds": by["prune"]["seconds"], "seeds": [0]})
        rows.append({"data": name, "criterion": "teacher", "params": teacher_row["params"], "steps": args.steps,
                     "after": quality(teacher_row), "seeds": [0]})
        adds[name] = additivity(base, 8 if args.quick else 40)
    write(RESULTS / "compress_diffusion.json", {"rows": rows, "additivity": adds,
                                                "quick": args.quick, "command": command(), "machine": machine(),
                                                "seconds": time.time() - t0})
    lines = ["## LAPTOP-Diff layer pruning of denoisers (`compress_diffusion`)", "",
             f"`{command()}`: a share of the teacher's parameters (`ratio`) removed in whole layers, then recovered; "
             f"quality at {args.steps} sampling steps before and after recovery (digits: FID, lower is better; "
             "mixture64d: sliced Wasserstein, lower is better, and exact log-likelihood). One seed.", "",
             "| data | ratio | criterion | recovery | params | removed | output loss (sum of layers') | before | after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key = "fid" if "fid" in r["after"] else "swd"
        after = r["after"][key]
        if r["criterion"] == "teacher":
            lines.append(f"| {r['data']} | - | teacher | - | {r['params']:,} | - | - | - | {key} {after:.4g} |")
            continue
        lines.append(f"| {r['data']} | {r['ratio']} | {r['criterion']} | {r['features']} | {r['params']:,} | "
                     f"{', '.join(r['removed'])} | {r['output_loss']:.4g} ({r['sum_of_layer_losses']:.4g}) | "
                     f"{r['before'][key]:.4g} | {after:.4g} |")
    lines += ["", "Additivity (random sets of 2 to 4 layers: sum of single-layer output losses against the set's own):"]
    lines += [f"- {k}: Pearson {v['pearson']:.3f}, mean ratio own / sum {v['mean_ratio']:.2f} over {v['subsets']} sets "
              f"of {v['layers']} layers" for k, v in adds.items()]
    update_markdown("compress_diffusion", "\n".join(lines))


if __name__ == "__main__":
    main()
