"""Recipe search against the shipped hand-written recipes (`distillery search`, Optuna TPE).

Two settings, each searched twice with the same sampler seed, once with Optuna's median pruner and
once without, `--trials` trials each:
  mnist1d   the transfer setting: recipe mnist1d/kd, space recipes/mnist1d/kd.space.yaml (the logit
            loss, its temperature, the rate and batch size, the transfer set's size)
  digits    the feature setting: recipe digits/kd, space recipes/digits/kd.space.yaml (a relation term
            between the student's hidden layer and a teacher tap, its weight, the KD terms' settings)
Trials train on the training split without a seeded 20% validation share and are scored on it;
then the best recipe of the pruned study (`best.yaml`) and the shipped recipe are run on the full
training split over `--seeds` seeds and scored on the test split (their teachers are the same
models, cached). Both run at the same budget: mnist1d's distillation epochs are cut to 15
(`--set distill.train.epochs=15` unless given), the rest as shipped. Rows:
  {"method": "mnist1d" | "digits", "searched", "hand", "seeds", "trials", "seconds_pruned",
   "seconds_unpruned", "importance"}   test accuracy % (mean, std, runs), trial seconds, fANOVA importances
and "pruning_saving": the share of the trial time (summed over trials) that pruning saved.

    python benchmarks/search.py --trials 40 --seeds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from distillery import kinds, recipes
from distillery.config import load_yaml, to_dict
from distillery.search import SearchConfig, study_name

from _common import RESULTS, command, machine, update_markdown, write

SETTINGS = {
    "mnist1d": ("mnist1d/kd", "recipes/mnist1d/kd.space.yaml", ["distill.train.epochs=15"]),
    "digits": ("digits/kd", "recipes/digits/kd.space.yaml", []),
}
ROOT = Path(__file__).resolve().parents[1]


def study(name: str, pruner: str, trials: int, work: Path, budget: list[str]):
    """Run (or continue) one study; the finished study and its summed trial seconds."""
    import optuna

    recipe_name, space_file, _ = SETTINGS[name]
    recipe = recipes.load(recipe_name, [*budget, f"runs_dir={work}", "baseline.enabled=false"])
    space = load_yaml(ROOT / space_file)
    space["pruner"] = pruner
    cfg = SearchConfig(recipe=to_dict(recipe), space=space, trials=trials, name=f"{recipe.name}-search-{pruner}",
                       threads=recipe.threads, runs_dir=str(work))
    out = work / f"{name}-{pruner}"
    kinds.run(cfg, run_dir=out, resume=(out / "config.yaml").is_file(), progress=False)
    st = optuna.load_study(study_name=study_name(cfg), storage=f"sqlite:///{out / 'study.sqlite'}")
    seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in st.trials
                  if t.datetime_complete is not None and t.datetime_start is not None)
    return st, seconds, out


def test_accuracy(recipe_file: str | Path, seeds: int, work: Path, tag: str, budget: list[str]) -> list[float]:
    """The distilled student's test accuracy (%) of ``recipe_file`` over seeds 0..seeds-1."""
    accs = []
    for seed in range(seeds):
        out = work / "runs" / f"{tag}-seed{seed}"
        recipe = recipes.load(str(recipe_file), [*budget, f"seed={seed}", "baseline.enabled=false",
                                                 f"runs_dir={work}", f"cache_dir={work / 'cache'}"])
        summary = out / "summary.json"
        if not (summary.is_file() and json.loads(summary.read_text())["status"] == "done"):
            kinds.run(recipe, run_dir=out, resume=(out / "config.yaml").is_file(), progress=False)
        rows = json.loads(summary.read_text())["rows"]
        accs.append(100 * next(r["accuracy"] for r in rows if r["model"] == "distilled"))
    return accs


def _stats(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs) if len(xs) > 1 else 0.0, "runs": xs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS))
    ap.add_argument("--work", type=Path, default=Path("runs/bench-search"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import optuna
    from optuna.importance import FanovaImportanceEvaluator

    t0 = time.time()
    rows = []
    for name in args.settings:
        recipe_name, space_file, budget = SETTINGS[name]
        work = args.work / name
        pruned, s_pruned, out = study(name, "median", args.trials, work, budget)
        _, s_unpruned, _ = study(name, "none", args.trials, work, budget)
        importance = optuna.importance.get_param_importances(pruned, evaluator=FanovaImportanceEvaluator(seed=0))
        searched = test_accuracy(out / "best.yaml", args.seeds, work, "searched", budget)
        hand = test_accuracy(recipes.find(recipe_name), args.seeds, work, "hand", budget)
        states = {s: sum(1 for t in pruned.trials if t.state.name == s) for s in ("COMPLETE", "PRUNED", "FAIL")}
        rows.append({"method": name, "recipe": recipe_name, "space": space_file, "budget": budget,
                     "searched": _stats(searched), "hand": _stats(hand), "seeds": list(range(args.seeds)),
                     "trials": args.trials, "trial_states": states, "seconds_pruned": s_pruned,
                     "seconds_unpruned": s_unpruned, "pruning_saving": 1 - s_pruned / s_unpruned,
                     "importance": {k: round(v, 4) for k, v in importance.items()},
                     "best_trial": pruned.best_trial.number, "best_params": pruned.best_trial.params})
        print(json.dumps(rows[-1], default=str)[:600], flush=True)
    saving = 1 - sum(r["seconds_pruned"] for r in rows) / sum(r["seconds_unpruned"] for r in rows)
    write(RESULTS / "search.json", {"rows": rows, "pruning_saving": saving, "command": command(),
                                    "machine": machine(), "seconds": time.time() - t0, "sampler": "TPE seed 0",
                                    "pruner": "MedianPruner(n_startup_trials=4, n_warmup_steps=1)"})
    lines = ["## Recipe search (`search`)", "",
             f"`python benchmarks/search.py --trials {args.trials} --seeds {args.seeds}`: Optuna TPE over the shipped "
             "search spaces, trials scored on a seeded 20% validation share of the training split; the best "
             "recipe and the shipped one then trained on the full training split and scored on the test split "
             f"over {args.seeds} seeds (test accuracy %, mean ± std). Trial time is the sum over trials, with the "
             "median pruner and without it (the same sampler seed).", "",
             "| setting | searched | hand-written | trials (complete / pruned / failed) | trial s pruned | "
             "trial s unpruned | saved | most important |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(r["importance"].items())[:3])
        st = r["trial_states"]
        lines.append(f"| {r['method']} (`{r['recipe']}`) | {r['searched']['mean']:.2f} ± {r['searched']['std']:.2f} | "
                     f"{r['hand']['mean']:.2f} ± {r['hand']['std']:.2f} | {st['COMPLETE']} / {st['PRUNED']} / "
                     f"{st['FAIL']} | {r['seconds_pruned']:.0f} | {r['seconds_unpruned']:.0f} | "
                     f"{100 * r['pruning_saving']:.0f}% | {top} |")
    lines += ["", f"Pruning saved {100 * saving:.0f}% of the trial time over both settings."]
    update_markdown("search", "\n".join(lines))


if __name__ == "__main__":
    main()
