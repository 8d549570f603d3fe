"""LLM distillation on the built-in reasoning task (arithmetic word problems with worked solutions):
test accuracy (%) of the final answer for a teacher and students a tenth of its size, one row per
method, all through the shipped recipes `lm/reasoning/*` (same problems, same epochs).

Rows {"method", "accuracy", "seeds", "tokens", "seconds"} (accuracy: mean over seeds; tokens: the
trained target tokens, problems x epochs; seconds: training time, mean over seeds; rows that start from
sft_gold's student include its tokens and seconds):
  teacher                    the "small" preset (about 2.5M parameters) on the gold solutions
  sft_gold                   the student (the "student" preset, about 0.25M) on the gold solutions
  sft_teacher                the student on the teacher's verified greedy answers (seq_kd, exact verifier)
  token_kd                   sft_gold's student, then CE + token KD (forward KL) on the teacher's verified answers,
                             teacher-forced (off-policy)
  on_policy                  sft_gold's student, then GKD: half the batches the student's own answers, generalized
                             JSD (beta 0.5) (GKD, like its supervised-KD baseline, starts from the SFT student)
  sft_alone_other_tokenizer  the student with its own tokenizer (no digit splitting, 384 tokens) on the gold
  cross_tokenizer_uld        that student, cross-entropy + ULD from the teacher
  cross_tokenizer_span       that student, cross-entropy + GOLD's span loss from the teacher
  lora                       LoRA adapters (r 16) on the teacher's first and last layers, CE + token KD
Goals (issue 22): sft_teacher > sft_gold; on_policy > token_kd; cross_tokenizer_* > sft_alone_other_tokenizer.

    python benchmarks/lm_reasoning.py            # the full run (see BENCHMARKS.md for its time)
    python benchmarks/lm_reasoning.py --quick    # a smoke run: tiny models, few problems
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from distillery import recipes
from distillery.lm import reasoning

from _common import RESULTS, command, finished_rows, machine, update_markdown, write

HERE = Path(__file__).parent
GOALS = [("sft_teacher", "sft_gold"), ("on_policy", "token_kd"), ("cross_tokenizer_uld", "sft_alone_other_tokenizer"),
         ("cross_tokenizer_span", "sft_alone_other_tokenizer")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--train", type=int, default=4000, help="problems the students train on (the first N of the "
                    "teacher's)")
    ap.add_argument("--epochs", type=int, default=6, help="the students' epochs")
    ap.add_argument("--teacher-train", type=int, default=8000)
    ap.add_argument("--teacher-epochs", type=int, default=6)
    ap.add_argument("--steps", type=int, default=2, help="at most this many events per problem (reasoning.steps)")
    ap.add_argument("--largest", type=int, default=60, help="every count below this (reasoning.largest)")
    args = ap.parse_args()
    task = [f"reasoning.steps={args.steps}", f"reasoning.largest={args.largest}"]
    root = HERE / "runs" / ("lm_reasoning_quick" if args.quick else "lm_reasoning")
    quick = ["reasoning.train=64", "reasoning.validation=8", "reasoning.test=16", "train.epochs=1",
             "model=tiny", "seq_kd.new_tokens=64", "verifier=none"]
    size = quick if args.quick else [f"reasoning.train={args.train}", f"train.epochs={args.epochs}"]
    common = [*size, *task, f"runs_dir={root / 'runs'}", "threads=2"]
    t_start = time.perf_counter()
    teacher_size = quick if args.quick else [f"reasoning.train={args.teacher_train}",
                                             f"train.epochs={args.teacher_epochs}"]
    teacher_rows = finished_rows("lm/reasoning/teacher", [*teacher_size, *task, f"runs_dir={root / 'runs'}", "threads=2"],
                       root / "teacher")
    teacher = str(root / "teacher" / "models" / "model")
    other = root / "other_tokenizer"
    if not (other / "tokenizer.json").is_file():
        r = recipes.load("lm/reasoning/teacher", common).reasoning
        reasoning.tokenizer(reasoning.splits(r.train, r.validation, r.test, r.seed, r.steps, r.largest)["train"], 384,
                            digits=False).save_pretrained(str(other))
    keep = "[0]" if args.quick else "[0, 5]"
    plans = {
        "sft_gold": ("lm/reasoning/sft", [f"tokenizer={teacher}"]),
        "sft_teacher": ("lm/reasoning/traces", [f"teacher={teacher}"]),
        # GKD's setting: both start from the student fine-tuned on the gold solutions (sft_gold)
        "token_kd": ("lm/reasoning/traces", [f"teacher={teacher}", "terms=[{loss: ce, teacher: null}, {loss: kd}]",
                                             "model={sft}"]),
        "on_policy": ("lm/reasoning/on_policy", [f"teacher={teacher}", "model={sft}"]),
        "sft_alone_other_tokenizer": ("lm/reasoning/sft", [f"tokenizer={other}"]),
        "cross_tokenizer_uld": ("lm/reasoning/cross", [f"teacher={teacher}", f"tokenizer={other}"]),
        "cross_tokenizer_span": ("lm/reasoning/cross", [f"teacher={teacher}", f"tokenizer={other}",
                                                        "terms=[{loss: ce, teacher: null}, {loss: gold, teacher: spans}]"]),
        "lora": ("lm/reasoning/lora", [f"teacher={teacher}", f"model={teacher}", f"prune.keep={keep}"]),
    }
    t = teacher_rows[-1]
    rows = [{"method": "teacher", "accuracy": t["accuracy"], "seeds": [0], "tokens": t["train_tokens"],
             "seconds": round(t["train_seconds"], 1), "params": t["params"]}]
    trained = t["train_seconds"]  # every run's own training time (cached runs keep theirs)
    for method, (name, extra) in plans.items():
        got = []
        for seed in range(args.seeds):
            quick = ["model=tiny"] if args.quick and name != "lm/reasoning/lora" else []
            sft = root / f"sft_gold-s{seed}" / "models" / "model"
            extra_s = [e.replace("{sft}", str(sft)) for e in extra]
            got.append(finished_rows(name, [*common, *quick, *extra_s, f"seed={seed}"], root / f"{method}-s{seed}")[-1])
            trained += got[-1]["train_seconds"]
        first = next((r for r in rows if r["method"] == "sft_gold"), None) if any("{sft}" in e for e in extra) else None
        before = {"tokens": 0, "seconds": 0.0} if first is None else first  # tokens and time of the SFT start
        rows.append({"method": method, "accuracy": round(statistics.mean(g["accuracy"] for g in got), 2),
                     "accuracy_per_seed": [g["accuracy"] for g in got], "seeds": list(range(args.seeds)),
                     **({"starts_from": "sft_gold"} if first is not None else {}),
                     "tokens": got[0]["train_tokens"] + before["tokens"],
                     "seconds": round(statistics.mean(g["train_seconds"] for g in got) + before["seconds"], 1),
                     "params": got[0]["params"], **({"trainable_params": got[0]["trainable_params"]}
                                                    if "trainable_params" in got[0] else {}),
                     **({"kept": got[0]["kept"], "answers": got[0]["answers"]} if "kept" in got[0] else {})})
    by = {r["method"]: r["accuracy"] for r in rows}
    goals = {f"{a} > {b}": by[a] > by[b] for a, b in GOALS}
    payload = {"rows": rows, "goals": goals, "quick": args.quick, "train_problems": args.train, "epochs": args.epochs,
               "task": {"steps": args.steps, "largest": args.largest},
               "teacher_train_problems": args.teacher_train, "teacher_epochs": args.teacher_epochs,
               "seconds_total": round(time.perf_counter() - t_start, 1), "train_seconds_total": round(trained, 1),
               "command": command(), "machine": machine()}
    if args.quick:
        print(json.dumps(payload, indent=1))
        return
    write(RESULTS / "lm_reasoning.json", payload)
    lines = ["## LLM distillation on the reasoning task (`lm_reasoning`)", "",
             f"`{command()}` (2 CPU cores; recipes `lm/reasoning/*`; the teacher on {args.teacher_train} problems for "
             f"{args.teacher_epochs} epochs, every student on the first {args.train} of them for {args.epochs} epochs, "
             f"seeds {list(range(args.seeds))}; {trained / 60:.0f} min of training in all, plus teacher answers and "
             "evaluation). Problems of at most "
             f"{args.steps} events, every count below {args.largest}. Test accuracy of the final answer on 500 held-out "
             "problems (greedy answers, exact match).", "",
             "| method | accuracy (%) | params | tokens | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        start = f" (from {r['starts_from']})" if r.get("starts_from") else ""
        lines.append(f"| {r['method']}{start} | {r['accuracy']:.1f} | {r['params']:,} | {r['tokens']:,} | "
                     f"{r['seconds']:.0f} |")
    lines.append("")
    lines.append("Goals: " + "; ".join(f"{k}: {'met' if v else 'missed'}" for k, v in goals.items()) + ".")
    update_markdown("lm_reasoning", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
