"""Step distillation of diffusion and flow models: each method's few-step student against its
many-step teacher, on the exact 2-D and 64-D Gaussian mixtures and on scikit-learn's 8x8 digits.

Rows ``{"method", "data", "steps", "swd", "energy", "loglik" | "fid", "coverage", "samples_per_s",
"seconds"}``: ``teacher`` at 1, 2, 4, 8, 50 steps (DDIM for the v-prediction DDPM teacher; Euler for
the flow-matching teacher, rows with ``"teacher": "flow"``, the reflow teacher), then ``pd``, ``cd``,
``hyper_sd`` and ``reflow`` (the 2-rectified flow) at 1, 2, 4 steps, ``reflow_distill`` (InstaFlow's
one-step student of the 2-rectified flow) at 1, the one-step generators ``dmd``, ``vsd``, ``sds`` at 1
and DMD2's multi-step generator (``settings.generator_steps=4``, backward simulation) as ``dmd`` at 2
and 4 (mixtures add ``sds_points`` / ``vsd_points``: score distillation into a set of points, where
SDS's mode seeking shows). ``seconds``: the distillation's wall time (the teacher's training for
teacher rows). Mixtures: metrics against 2,000 held-out samples, exact log-likelihood, mode coverage;
digits: FID on a digits classifier's features (``diffusion.metrics``) against the 1,797 digits, and
that classifier's confidence. Each run is a ``distillery run`` of the shipped recipes with the
overrides below, in ``--work`` (a finished run is reused).

    python benchmarks/diffusion.py                    # all three data sets (about an hour on 2 cores)
    python benchmarks/diffusion.py --data mixture2d   # one data set
    python benchmarks/diffusion.py --quick            # a smoke run with tiny budgets
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import RESULTS, command, finished_rows, machine, update_markdown, write

# (row name, recipe, overrides) per data set; budgets keep every distillation under 10 minutes on 2 cores
MIXTURE = [
    ("cd", "diffusion/cd", []),
    ("pd", "diffusion/pd", []),
    ("hyper_sd", "diffusion/hyper_sd", []),
    ("reflow", "diffusion/reflow", []),
    ("dmd", "diffusion/dmd", []),
    ("dmd", "diffusion/dmd", ["settings.generator_steps=4"]),
    ("vsd", "diffusion/dmd", ["method=vsd"]),
    ("sds", "diffusion/dmd", ["method=sds", "settings.ratio=1", "student.train.lr=0.0001"]),
    ("sds_points", "diffusion/sds_points", []),
    ("vsd_points", "diffusion/sds_points", ["method=vsd", "student.init=teacher", "teacher.source=train",
                                            "teacher.net={hidden: 256, depth: 3}",
                                            "teacher.train={epochs: 30, batch_size: 256, lr: 0.002}"]),
]
UNET = ["teacher.net={widths: [32, 64], layers: 1}", "teacher.train={epochs: 150, batch_size: 128, lr: 0.001}"]
DIGITS = [
    ("cd", "diffusion/cd", [*UNET, "student.train={epochs: 160, batch_size: 128, lr: 0.0002}"]),
    ("pd", "diffusion/pd", [*UNET, "student.train={epochs: 24, batch_size: 128, lr: 0.0002}"]),
    ("hyper_sd", "diffusion/hyper_sd", [*UNET, "student.train={epochs: 20, batch_size: 128, lr: 0.0002}"]),
    ("reflow", "diffusion/reflow", [*UNET, "settings.pairs=4000", "student.train={epochs: 40, batch_size: 128, lr: 0.0005}",
                                    "settings.one_step={epochs: 20, batch_size: 128, lr: 0.0002}"]),
    ("dmd", "diffusion/dmd", [*UNET, "student.train={epochs: 40, batch_size: 128, lr: 0.0002, schedule: constant}"]),
    ("dmd", "diffusion/dmd", [*UNET, "settings.generator_steps=4",
                              "student.train={epochs: 40, batch_size: 128, lr: 0.0002, schedule: constant}"]),
    ("vsd", "diffusion/dmd", [*UNET, "method=vsd", "student.train={epochs: 40, batch_size: 128, lr: 0.0002, "
                              "schedule: constant}"]),
    ("sds", "diffusion/dmd", [*UNET, "method=sds", "settings.ratio=1",
                              "student.train={epochs: 20, batch_size: 128, lr: 0.00002, schedule: constant}"]),
]
QUICK = ["samples=1024", "teacher.train.epochs=2", "student.train.epochs=1", "eval.samples=300", "settings.pd_start=4",
         "settings.pairs=256", "settings.pair_steps=8", "settings.one_step.epochs=1", "settings.segments=[2,1]",
         "settings.solver_steps=8", "settings.points=200"]


def run_one(recipe_name: str, overrides: list[str], out: Path) -> list[dict]:
    return finished_rows(recipe_name, overrides, out, progress=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", nargs="*", default=["mixture2d", "mixture64d", "digits"])
    ap.add_argument("--work", type=Path, default=Path("runs/bench-diffusion"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()
    path = args.work / "diffusion.json" if args.quick else RESULTS / "diffusion.json"  # a smoke run keeps out of results/
    old = json.loads(path.read_text()) if path.is_file() and not args.quick else {"rows": []}
    rows = [r for r in old["rows"] if r["data"] not in args.data]
    for data in args.data:
        plan = DIGITS if data == "digits" else MIXTURE
        teachers: set[str] = set()
        for name, recipe_name, extra in plan:
            over = [f"data={data}", f"seed={args.seed}", f"runs_dir={args.work}", *extra, *(QUICK if args.quick else [])]
            if name == "sds_points" or name == "vsd_points":
                over.append("eval.teacher_steps=[50]")
            multi = any(o.startswith("settings.generator_steps=") for o in extra)
            folder = f"{data}-{name}" + ("-multistep" if multi else "")
            print(f"== {data} {folder}", flush=True)
            for r in run_one(recipe_name, over, args.work / folder):
                if r["method"] != "teacher" and name in ("dmd", "vsd", "sds") and (r["steps"] > 1) != multi:
                    continue  # 1 step: the one-step generator; 2 and 4: DMD2's multi-step generator (4-step schedule)
                if r["method"] == "teacher":
                    key = "flow" if name == "reflow" else "vp"
                    if key in teachers or name.endswith("_points"):
                        continue
                    r = {**r, "teacher": key}
                elif r["method"] != "reflow_distill":  # InstaFlow's one-step student keeps its own name
                    r = {**r, "method": name}
                rows.append(r)
            teachers.add("flow" if name == "reflow" else "vp")
    order = {"mixture2d": 0, "mixture64d": 1, "digits": 2}
    rows.sort(key=lambda r: (order[r["data"]], r["method"] != "teacher", r.get("teacher", ""), r["method"], r["steps"]))
    write(path, {"rows": rows, "seeds": [args.seed], "quick": args.quick, "command": command(), "machine": machine(),
                 "seconds": time.time() - t0 + old.get("seconds", 0) if not args.quick else time.time() - t0})
    if not args.quick:
        update_markdown("diffusion", markdown(rows))


def markdown(rows: list[dict]) -> str:
    lines = ["## Step distillation of diffusion and flow models (`diffusion`)", "",
             "`python benchmarks/diffusion.py` (2 CPU cores; recipes `diffusion/*` with the script's budgets). "
             "Mixtures: sliced Wasserstein (swd) and energy distance to held-out samples, exact log-likelihood "
             "(the data's own: -1.12 for mixture2d, -16.5 for mixture64d), share of the 8 / 16 components covered; digits: FID on a "
             "digits classifier's features. `seconds`: the distillation (the teacher's training on teacher rows).", ""]
    for data in dict.fromkeys(r["data"] for r in rows):
        sub = [r for r in rows if r["data"] == data]
        q = "fid" if data == "digits" else "loglik"
        lines += [f"**{data}**", "", f"| method | steps | swd | energy | {q} | coverage | samples/s | seconds |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sub:
            name = r["method"] + (f" ({r['teacher']})" if r["method"] == "teacher" and r.get("teacher") else "")

            def f(v, spec):
                return "-" if v is None else format(v, spec)

            lines.append(f"| {name} | {r['steps']} | {f(r['swd'], '.4f')} | {f(r['energy'], '.4f')} | "
                         f"{f(r.get(q), '.3f' if q == 'fid' else '.2f')} | {f(r.get('coverage'), '.2f')} | "
                         f"{f(r['samples_per_s'], '.0f')} | {f(r.get('seconds'), '.0f')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
