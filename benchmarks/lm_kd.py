"""Language-model KD on the stdlib corpus: the built-in teacher (recipe lm/teacher, about 10M
parameters) into the 1M student, every mode, over seeds. Validation perplexity, mean ± std.

Rows (methods): ``teacher``; ``alone`` (lm/student: cross-entropy on the data); ``forward_kl``
(``kd`` at temperature 1), ``reverse_kl``, ``generalized_jsd`` (beta 0.5), ``skew_kl`` (alpha 0.1):
token-level KD on the data; ``seq_kd`` (the teacher continues 32-token prompts by 96 sampled
tokens, the student learns that text); ``on_policy`` (GKD: generalized JSD, beta 0.5, half the
batches continued by the student); ``topk8`` / ``topk32`` (forward KL from a store of the
teacher's top-k log-probs per token with a tail bucket). Every student trains on the same
first ``max_train_blocks`` blocks (lm/kd: 4,000 blocks of 128 tokens, 1 epoch, batch 16).
The teacher's answers on those blocks are computed once into stores that every seed reads by
sample id (``store=``): dense float16 logits for the four token-KD rows, top-k stores for
``topk8`` / ``topk32``; ``seq_kd`` and ``on_policy`` run the teacher live (it scores new text).
Seed 0's ``forward_kl`` and ``reverse_kl`` ran before the dense store existed, with the live
teacher (float32 logits instead of float16; the same targets up to rounding).
The teacher is trained once (or reused from ``--teacher``); each row's run folder resumes.

    python benchmarks/lm_kd.py --seeds 3   ->  benchmarks/results/lm_kd.json

Two processes can share the work (``--reverse`` in the second walks the runs backwards and skips
the one the first is training); ``--collect`` then writes the table of every finished run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from distillery import kinds, recipes

from _common import RESULTS, command, machine, update_markdown, write

DENSE = "store=runs/bench-lm/store-dense"  # the teacher's float16 logits on the 4,000 blocks, written once
METHODS: dict[str, list[str]] = {
    "alone": [],
    "forward_kl": ["terms.0.loss=kd", DENSE],  # lm/kd sets temperature 1.0 in its one term, for every loss
    "reverse_kl": ["terms.0.loss=reverse_kl", DENSE],
    "generalized_jsd": ["terms.0.loss=generalized_jsd", "terms.0.beta=0.5", DENSE],
    "skew_kl": ["terms.0.loss=skew_kl", "terms.0.alpha=0.1", DENSE],
    "seq_kd": ["method=seq_kd", "terms=[{loss: ce, teacher: null}]"],  # Kim & Rush: cross-entropy on its text
    "on_policy": ["method=on_policy", "terms.0.loss=generalized_jsd", "terms.0.beta=0.5", "on_policy.lam=0.5"],
    "topk8": ["method=topk", "top_k=8", "store=runs/bench-lm/store-top8"],
    "topk32": ["method=topk", "top_k=32", "store=runs/bench-lm/store-top32"],
}


def _claimed(out: Path) -> bool:
    """Another live process of this benchmark is training ``out`` (its ``.claim`` holds that pid)."""
    claim = out / ".claim"
    try:
        pid = int(claim.read_text())
        os.kill(pid, 0)
        return pid != os.getpid()
    except (OSError, ValueError):
        return False


def train(recipe, out: Path) -> dict:
    """The model's row of a finished ``lm`` run in ``out`` (run, or resumed, through ``kinds.run`` first)."""
    summary = out / "summary.json"
    if not (summary.is_file() and json.loads(summary.read_text())["status"] == "done"):
        kinds.run(recipe, run_dir=out, resume=(out / "config.yaml").is_file(), progress=False)
    return train_row(out, recipe.seed)


def train_row(out: Path, seed: int) -> dict:
    return {**json.loads((out / "summary.json").read_text())["rows"][-1], "seed": seed}


def run_one(method: str, seed: int, teacher: Path, work: Path, extra: list[str], train: bool = True) -> dict | None:
    """The report of one row's run: read when it exists, else trained (resuming its checkpoints),
    unless another process of this benchmark has claimed it or ``train`` is off (then None)."""
    out = work / f"seed{seed}" / method
    if (out / "summary.json").is_file() and json.loads((out / "summary.json").read_text())["status"] == "done":
        return train_row(out, seed)
    if not train or _claimed(out):
        return None
    out.mkdir(parents=True, exist_ok=True)
    (out / ".claim").write_text(str(os.getpid()))  # beside the run's files: a run directory may hold others
    if method == "alone":
        recipe = recipes.load("lm/student", [f"seed={seed}", *extra])
    else:
        recipe = recipes.load("lm/kd", [f"teacher={teacher}", f"seed={seed}", *METHODS[method], *extra])
    t0 = time.perf_counter()
    report = train(recipe, out)
    report["wall_s"] = time.perf_counter() - t0
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--teacher", type=Path, default=Path("runs/lm/teacher/models/model"),
                    help="teacher folder (trained with recipe lm/teacher into its run directory when missing)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-lm"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reverse", action="store_true",
                    help="walk seeds and methods backwards (a second process shares the work; rows in progress "
                         "elsewhere are skipped)")
    ap.add_argument("--collect", action="store_true", help="train nothing: the table of the runs already done")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every student recipe (e.g. max_train_blocks=2000)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    teacher_run = args.teacher.parent.parent  # <run dir>/models/model
    if not (args.teacher / "config.json").is_file():
        print(f"training the teacher into {teacher_run} (recipe lm/teacher)", flush=True)
    teacher_report = train(recipes.load("lm/teacher"), teacher_run)
    rows: dict[str, dict] = {"teacher": {"method": "teacher", "runs": [teacher_report["validation_perplexity"]]}}
    reports: dict[str, list[dict]] = {}
    jobs = [(seed, method) for seed in range(args.seeds) for method in args.methods]
    for seed, method in reversed(jobs) if args.reverse else jobs:
        r = run_one(method, seed, args.teacher, args.work, args.extra, train=not args.collect)
        if r is None:
            continue
        reports.setdefault(method, []).append(r)
        print(f"seed {seed} {method}: validation perplexity {r['validation_perplexity']:.2f} "
              f"({r.get('train_seconds', 0):.0f} s)", flush=True)
        rows[method] = {"method": method, "runs": [x["validation_perplexity"] for x in reports[method]],
                        "seeds": [x["seed"] for x in reports[method]],
                        "train_seconds": [x["train_seconds"] for x in reports[method]]}
        if not args.reverse:  # the forward pass writes the table; --collect merges everything at the end
            _save(args, rows, teacher_report, t_start)
    if not args.reverse:
        _save(args, rows, teacher_report, t_start)


def _save(args, rows: dict, teacher_report: dict, t_start: float) -> None:
    out_rows = []
    for r in rows.values():
        runs = r["runs"]
        out_rows.append({**r, "mean": statistics.fmean(runs), "std": statistics.pstdev(runs), "n": len(runs)})
    write(RESULTS / "lm_kd.json", {
        "benchmark": "lm_kd", "command": command(), "machine": machine(), "metric": "validation perplexity",
        "seeds": list(range(args.seeds)),
        "teacher": {"parameters": teacher_report["params"], "train_seconds": teacher_report["train_seconds"]},
        "setup": {"teacher_recipe": "lm/teacher", "student_recipe": "lm/kd (lm/student for alone)",
                  "overrides": args.extra, "data": "stdlib sources, blocks of 128 tokens, vocabulary 8192"},
        "wall_s": time.perf_counter() - t_start, "rows": out_rows})
    lines = ["## Language-model KD (`lm_kd`)", "",
             f"`python benchmarks/lm_kd.py --seeds {args.seeds}`: the built-in teacher "
             f"({teacher_report['params'] / 1e6:.1f}M parameters, recipe `lm/teacher`) into the 1.2M student "
             "(recipe `lm/kd`: 4,000 blocks of 128 tokens, 1 epoch, batch 16) on the stdlib corpus. Validation "
             "perplexity (lower is better), mean ± std over seeds.", "",
             "| method | perplexity | runs |", "|---|---|---|"]
    for r in out_rows:
        lines.append(f"| {r['method']} | {r['mean']:.2f} ± {r['std']:.2f} | {r['n']} |")
    update_markdown("lm_kd", "\n".join(lines))


if __name__ == "__main__":
    main()
