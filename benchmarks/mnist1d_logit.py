"""Every logit loss on MNIST-1D: CNN teacher -> MLP 40-256-10, 50 epochs, over seeds.

Rows (test accuracy %, mean ± std over seeds):
  teacher           the CNN teacher
  alone             the student trained alone on the 4000 labelled samples (cross-entropy)
  kd_labelled       the student distilled with `kd` on the 4000 labelled samples only
                    (kd alone, no label term; the same training settings as `alone`)
  LOSS_transfer     the student distilled with LOSS (default parameters) on the unlabelled
                    transfer set; losses that need targets get the teacher's argmax
All settings come from the recipe `mnist1d/kd` (model sizes, training, transfer set); each
seed retrains the teacher. Writes benchmarks/results/mnist1d_logit.json and its table in
BENCHMARKS.md.

    python benchmarks/mnist1d_logit.py --seeds 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distillery import losses, recipes
from distillery.config import TermConfig
from distillery.engine import evaluate, fit, seed_everything
from distillery.objective import Objective
from distillery.pipeline import CE, build_model, load_data
from distillery.teachers import ModuleTeacher, PrecomputedTeacher

from _common import RESULTS, command, machine, update_markdown, write

TRANSFER_LOSSES = [n for n in losses.names() if losses.get(n).__module__ == "distillery.losses.logits" and n != "ce"]


def accuracy(model, test) -> float:
    return 100 * evaluate(model, test)["accuracy"]


def one_seed(seed: int, methods: list[str], recipe_name: str) -> dict[str, float]:
    recipe = recipes.load(recipe_name, [f"seed={seed}"])
    data = DATA.get(recipe_name) or DATA.setdefault(recipe_name, load_data(recipe))
    out: dict[str, float] = {}

    def student():
        seed_everything(seed)
        return build_model(recipe.student.model, data.train)

    seed_everything(seed)
    t_model = build_model(recipe.teacher.model, data.train)
    fit(t_model, Objective(CE), data.train, recipe.teacher.train, seed=seed, progress=False)
    out["teacher"] = accuracy(t_model, data.test)
    teacher = ModuleTeacher(t_model)
    base_train = recipe.baseline.train or recipe.distill.train
    if "alone" in methods:
        s = student()
        fit(s, Objective(CE), data.train, base_train, seed=seed, progress=False)
        out["alone"] = accuracy(s, data.test)
    if "kd_labelled" in methods:
        s = student()
        fit(s, Objective([TermConfig(loss="kd")]), data.train, base_train, teacher=teacher, seed=seed, progress=False)
        out["kd_labelled"] = accuracy(s, data.test)
    answers = PrecomputedTeacher(teacher, data.transfer)  # as `distillery run` does
    for name in TRANSFER_LOSSES:
        if f"{name}_transfer" not in methods:
            continue
        s = student()
        fit(s, Objective([TermConfig(loss=name)]), data.transfer, recipe.distill.train, teacher=answers,
            seed=seed, progress=False)
        out[f"{name}_transfer"] = accuracy(s, data.test)
    return out


DATA: dict = {}


def main() -> None:
    all_methods = ["alone", "kd_labelled", "teacher", *[f"{n}_transfer" for n in TRANSFER_LOSSES]]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS / "mnist1d_logit.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipe", default="mnist1d/kd")
    ap.add_argument("--methods", nargs="*", default=all_methods, choices=all_methods)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs: dict[str, list[float]] = {m: [] for m in args.methods}
    t0 = time.time()
    for seed in range(args.seeds):
        res = one_seed(seed, args.methods, args.recipe)
        for m in args.methods:
            runs[m].append(res[m])
        print(f"seed {seed} ({time.time() - t0:.0f} s): " + ", ".join(f"{m} {v:.1f}" for m, v in res.items()), flush=True)
    rows = [{"method": m, "mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
             "n": len(v), "runs": v} for m, v in runs.items()]
    write(args.out, {"benchmark": "mnist1d_logit", "command": command(), "machine": machine(),
                     "recipe": args.recipe, "seeds": list(range(args.seeds)), "metric": "test accuracy %",
                     "wall_s": time.time() - t0, "rows": rows})
    ref = {"alone": "66.5 ± 1.7", "kd_labelled": "70.2 ± 1.5", "kd_transfer": "86.2 ± 0.7", "teacher": "95.1 ± 0.6"}
    lines = ["## MNIST-1D logit losses (`benchmarks/mnist1d_logit.py`)", "",
             f"`{command()}` — CNN teacher -> MLP 40-256-10, recipe `{args.recipe}`, "
             f"{args.seeds} seeds, {machine()['torch_threads']} torch threads, {time.time() - t0:.0f} s in all.", "",
             "| method | accuracy % (mean ± std) | n | plain PyTorch loop (REFERENCES.md, 10 seeds) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['mean']:.1f} ± {r['std']:.1f} | {r['n']} | {ref.get(r['method'], '')} |")
    update_markdown("mnist1d_logit", "\n".join(lines))


if __name__ == "__main__":
    main()
