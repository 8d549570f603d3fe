"""Minitron on the built-in LM: the ~10M teacher pruned by width and by depth to about half its
parameters, then recovered, against the same small architecture trained from scratch, at equal tokens.

Rows (validation perplexity per epoch, on the recipe `lm/kd`'s data; every student reads the same
`--blocks` training blocks for `--epochs` epochs, so the same tokens):
  teacher            the unpruned teacher (recipe lm/teacher, trained first when missing)
  scratch_{width,depth}   the pruned architecture, random init, cross-entropy
  {width,depth}_ce   pruned, recovered by cross-entropy on the data
  {width,depth}_kd   pruned, recovered by token KD (forward KL) from the unpruned teacher
  {width,depth}_sdd  pruned, self-data distillation: the unpruned teacher rewrites the text (seq_kd), then CE
width: `prune: {mlp: 0.5, hidden: 0.4}` (about half the parameters); depth: `prune: {layers: 3}` (of 8: the
embeddings and output layer hold 42% of the teacher, so depth alone keeps about 70%; the rows give the counts). "tokens_fraction": the tokens
the pruned+KD model needs to reach the from-scratch model's final validation perplexity (the KD runs are
evaluated 8 times an epoch, ``train.eval_every_steps``, and once after pruning, before recovery;
log-linear between points), over the tokens the
from-scratch model used (Minitron's claim: at most 0.25); "tokens_fraction_vs_ce" the same against the final
perplexity of the pruned model recovered by cross-entropy; "pruned_perplexity" the pruned models before recovery.
Writes benchmarks/results/compress_lm.json, a plot benchmarks/results/compress_lm.png and its table.

    python benchmarks/compress_lm.py                 # ~35 min for the teacher when missing, then the students
    python benchmarks/compress_lm.py --quick         # a smoke run on a tiny teacher and corpus
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from distillery import recipes
from distillery.compress.lm_prune import LMPrune, prune
from distillery.lm.models import load_lm, save_lm

from _common import RESULTS, command, finished_rows, machine, update_markdown, write

PRUNE = {"width": "{mlp: 0.5, hidden: 0.4, calibration: 64}", "depth": "{layers: 3, calibration: 64}"}


def run(recipe_name: str, overrides: list[str], out: Path) -> dict:
    """A finished lm run in ``out`` (run or resumed): its rows and its validation perplexity per epoch."""
    rows = finished_rows(recipe_name, overrides, out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in records if r.get("event") == "eval" and "perplexity" in r]
    per_epoch = next((r["step"] / r["epoch"] for r in evals if not r.get("within_epoch")), 1.0)
    curve = [(r["step"] / per_epoch, r["perplexity"]) for r in evals]  # epochs seen (fractions within an epoch)
    start = [(0.0, r["validation_perplexity"]) for r in rows if r.get("model") == "pruned"]  # before recovery
    return {"rows": rows, "curve": start + curve}


def scratch_folder(teacher: Path, kind: str, data: list[str], out: Path) -> Path:
    """The pruned architecture of ``kind`` with fresh random weights, saved as a model folder."""
    from transformers import AutoModelForCausalLM

    from distillery.lm.models import CausalLM
    from distillery.lm.run import load_data

    folder = out / f"scratch-{kind}-init"
    if (folder / "config.json").is_file():
        return folder
    model, tok = load_lm(teacher)
    splits, _ = load_data(recipes.load("lm/kd", [*data, f"teacher={teacher}"]), tok)
    cfg = LMPrune(**json.loads(json.dumps(_yaml(PRUNE[kind]))))
    small = prune(model, cfg, splits["train"].x[: cfg.calibration])
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(small.config)
    save_lm(CausalLM(fresh, small.vocab_size), tok, folder)
    return folder


def _yaml(text: str) -> dict:
    from distillery.config import safe_load

    return safe_load(text)


def tokens_to_reach(curve: list[tuple[float, float]], target: float, tokens_per_epoch: float) -> float | None:
    """Tokens seen when ``curve`` (epochs, perplexity) first reaches ``target``: linear in log perplexity (the
    loss) between points; from the start when the curve has no point before it reaches the target."""
    prev = None
    for epoch, ppl in curve:
        if ppl <= target:
            if prev is None:
                return epoch * tokens_per_epoch
            e0, p0 = prev
            frac = math.log(p0 / target) / math.log(p0 / ppl)
            return (e0 + frac * (epoch - e0)) * tokens_per_epoch
        prev = (epoch, ppl)
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=4000, help="training blocks every student reads per epoch")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--teacher", type=Path, default=Path("runs/lm/teacher/models/model"))
    ap.add_argument("--work", type=Path, default=Path("runs/bench-compress-lm"))
    ap.add_argument("--quick", action="store_true", help="a tiny teacher and corpus (a smoke run)")
    args = ap.parse_args()
    t0 = time.time()
    data: list[str] = []
    if args.quick:
        corpus = args.work / "docs.jsonl"
        corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n"}) + "\n"
                                  for i in range(200)))
        data = [f"data={corpus}", "block=16", "vocab_size=300", "seq_kd.prompt=4", "seq_kd.new_tokens=12"]
        args.teacher = args.work / "teacher" / "models" / "model"
        args.blocks = min(args.blocks, 64)
        PRUNE["depth"] = "{layers: 1, calibration: 64}"  # the tiny teacher has 2 layers
    common = [*data, f"runs_dir={args.work}", f"max_train_blocks={args.blocks}", f"train.epochs={args.epochs}",
              "train.checkpoint_every_steps=null"]
    if not (args.teacher / "config.json").is_file():
        teacher_run = args.teacher.parent.parent
        print(f"training the teacher into {teacher_run} (recipe lm/teacher)", flush=True)
        run("lm/teacher", [*data, f"runs_dir={args.work}", *(["model=tiny"] if args.quick else [])], teacher_run)
    teacher = f"teacher={args.teacher}"
    results: dict[str, dict] = {}
    for kind in ("width", "depth"):
        init = scratch_folder(args.teacher, kind, data, args.work)
        results[f"scratch_{kind}"] = run("lm/student", [*common, f"model={init}", "verify=true"],
                                         args.work / f"scratch_{kind}")
        pruned = [f"model={args.teacher}", f"prune={PRUNE[kind]}", teacher]
        results[f"{kind}_ce"] = run("lm/kd", [*common, *pruned, "terms=[{loss: ce, teacher: null}]"],
                                    args.work / f"{kind}_ce")
        fine = f"train.eval_every_steps={max(1, args.blocks // 16 // 8)}"  # 8 points an epoch: tokens_fraction's resolution
        results[f"{kind}_kd"] = run("lm/kd", [*common, *pruned, "terms=[{loss: kd}]", fine], args.work / f"{kind}_kd")
        results[f"{kind}_sdd"] = run("lm/kd", [*common, *pruned, "method=seq_kd", "terms=[{loss: ce, teacher: null}]"],
                                     args.work / f"{kind}_sdd")
    tokens_per_epoch = args.blocks * (16 if args.quick else 128)
    rows = []
    teacher_ppl = next(r["validation_perplexity"] for r in results["width_kd"]["rows"] if r["model"] == "teacher")
    rows.append({"method": "teacher", "validation_perplexity": teacher_ppl})
    fractions = {}
    for name, res in results.items():
        model_row = res["rows"][-1]
        rows.append({"method": name, "params": model_row["params"], "validation_perplexity": model_row[
            "validation_perplexity"], "curve": res["curve"], "train_seconds": model_row.get("train_seconds")})
    vs_ce, before = {}, {}
    for kind in ("width", "depth"):
        for out, ref in ((fractions, f"scratch_{kind}"), (vs_ce, f"{kind}_ce")):
            target = results[ref]["rows"][-1]["validation_perplexity"]
            need = tokens_to_reach(results[f"{kind}_kd"]["curve"], target, tokens_per_epoch)
            out[kind] = None if need is None else need / (args.epochs * tokens_per_epoch)
        before[kind] = results[f"{kind}_kd"]["curve"][0][1]  # the pruned model, before any recovery
    _plot(rows, tokens_per_epoch)
    write(RESULTS / "compress_lm.json", {"rows": rows, "tokens_fraction": fractions, "tokens_fraction_vs_ce": vs_ce,
                                         "pruned_perplexity": before, "blocks": args.blocks,
                                         "epochs": args.epochs, "quick": args.quick, "command": command(),
                                         "machine": machine(), "train_seconds": sum(r.get("train_seconds") or 0
                                                                                    for r in rows),
                                         "seconds": time.time() - t0})  # this invocation (finished runs are reused)
    lines = ["## Minitron on the built-in LM (`compress_lm`)", "",
             f"`{command()}`: validation perplexity after {args.epochs} epochs of {args.blocks} blocks (equal "
             "tokens for every student); `tokens_fraction`: the tokens pruned+KD needs to reach the from-scratch "
             "model's final perplexity, over the from-scratch tokens.", "",
             "| method | params | validation perplexity |", "|---|---|---|"]
    lines += [f"| {r['method']} | {r.get('params', '-')} | {r['validation_perplexity']:.2f} |" for r in rows]
    def fmt(v: float | None) -> str:
        return "not reached" if v is None else f"{v:.4f}"

    lines += ["", f"tokens_fraction: width {fmt(fractions['width'])}, depth {fmt(fractions['depth'])}; against pruned "
              f"+ cross-entropy's final perplexity instead (`tokens_fraction_vs_ce`): width {fmt(vs_ce['width'])}, "
              f"depth {fmt(vs_ce['depth'])}. The pruned models before any recovery: perplexity "
              f"{before['width']:.1f} (width) and {before['depth']:.1f} (depth)."]
    update_markdown("compress_lm", "\n".join(lines))


def _plot(rows: list[dict], tokens_per_epoch: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r.get("curve"):
            ax.plot([e * tokens_per_epoch for e, _ in r["curve"]], [p for _, p in r["curve"]], marker="o",
                    label=r["method"])
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "compress_lm.png", dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
