"""Dataset distillation on digits (8x8) and MNIST-5k (28x28): every method at IPC 1 and 10, with
and without flip, a width-32 ConvNet, 5 evaluation networks (DC's protocol, ``condense.evaluate``),
plus the whole-set row. Rows ``DATA/ipcK/METHOD`` (``+flip``, ``+learned``, ``+committee``) with
mean, std, runs (test accuracy %) and ``seconds`` (distillation wall time) go to
benchmarks/results/condense.json; rows already there from other ``--data`` / ``--ipc`` runs are kept.
MTT's rows share one set of expert trajectories per data set: their ``seconds`` count the matching,
and ``expert_seconds`` (``--time-experts``) the experts' training. Committee labels are computed after
the condensation, so a ``+committee`` row takes the images its plain row saved (runs/bench-condense/
DATA/sets) when they are there, and its ``seconds`` add the two.

    python benchmarks/condense.py                         # everything
    python benchmarks/condense.py --data digits --ipc 1   # a part (merged into the file)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

from distillery import condense as C
from distillery.condense import methods as M

from _common import RESULTS, command, machine, update_markdown, write

LEARNED = ["dc", "dsa", "dm", "mtt"]


def whole_row(images: C.Images, nets: int, epochs: int) -> dict:
    """The whole training set, the same networks and optimiser, ``epochs`` epochs (batch 256)."""
    res = C.evaluate([(images.x, images.y)], images, nets_per_set=nets, epochs=epochs)
    return {"runs": res["accuracies"], "seconds": 0.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", nargs="*", default=["digits", "mnist5k"])
    ap.add_argument("--ipc", nargs="*", type=int, default=[1, 10])
    ap.add_argument("--methods", nargs="*", default=[*M.CORESETS, *LEARNED, "mtt+learned", "dm+committee"])
    flip = ap.add_mutually_exclusive_group()
    flip.add_argument("--no-flip", action="store_true", help="leave out the +flip rows")
    flip.add_argument("--only-flip", action="store_true",
                      help="only the +flip rows of the learned methods (no coreset or whole-set rows)")
    ap.add_argument("--nets", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=500, help="evaluation epochs on a synthetic set")
    ap.add_argument("--whole-epochs", type=int, default=200)
    ap.add_argument("--dc-iterations", type=int, default=None, help="override dc/dsa iterations (default 200; IPC 10: 50)")
    ap.add_argument("--no-whole", action="store_true", help="leave out (keep) the whole-set rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-experts", action="store_true",
                    help="only time the training of MTT's 5 expert trajectories per --data, in a fresh folder")
    ap.add_argument("--out", type=Path, default=RESULTS / "condense.json")
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="result files of parts run apart (--out elsewhere): their rows join this file's, nothing runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    rows = {r["method"]: r for r in old.get("rows", [])}
    t_start = time.perf_counter()
    experts = dict(old.get("expert_seconds", {}))
    if args.merge:
        for f in args.merge:
            part = json.loads(f.read_text())
            threads = re.search(r"--threads (\d+)", part.get("command", ""))
            for r in part["rows"]:  # parts written before rows recorded threads: their command says
                if "threads" not in r and threads and r["seconds"] > 0:
                    r["threads"] = int(threads.group(1))
                rows[r["method"]] = r
            experts.update(part.get("expert_seconds", {}))
        _save(args, rows, t_start, experts)
        return
    if args.time_experts:
        for data in args.data:
            images = C.load(data)
            with tempfile.TemporaryDirectory(prefix="experts-") as tmp:
                t0 = time.perf_counter()
                M.train_experts(images, M.defaults("mtt", C.Settings(), images.shape), Path(tmp), seed=0)
                experts[data] = {"seconds": time.perf_counter() - t0, "threads": args.threads}
            print(f"{data}: experts {experts[data]['seconds']:.0f} s", flush=True)
        _save(args, rows, t_start, experts)
        return
    for data in args.data:
        images = C.load(data)
        work = Path("runs/bench-condense") / data
        if not (args.no_whole or args.only_flip):
            name = f"{data}/whole"
            rows[name] = {"method": name, **_stats(whole_row(images, args.nets, args.whole_epochs)["runs"]),
                          "seconds": 0.0, "epochs": args.whole_epochs}
            print(name, round(rows[name]["mean"], 2), flush=True)
        for ipc in args.ipc:
            for spec in args.methods:
                method, _, soft = spec.partition("+")
                if args.only_flip and method in M.CORESETS:
                    continue
                flips = [False] if method in M.CORESETS or args.no_flip else [True] if args.only_flip else [False, True]
                for flip in flips:
                    name = f"{data}/ipc{ipc}/{spec}{'+flip' if flip else ''}"
                    s = C.Settings(checkpoint_every=10**9)
                    if method in ("dc", "dsa"):
                        s.iterations = args.dc_iterations or (200 if ipc == 1 else 50)
                    run_dir = work / "experts-shared" if method == "mtt" else None  # experts reused across mtt rows
                    if run_dir is not None:  # trained (once) before the clock starts: expert_seconds times them
                        M.train_experts(images, M.defaults("mtt", C.Settings(), images.shape), run_dir / "experts", 0)
                    plain = work / "sets" / (f"ipc{ipc}-{method}{'-flip' if flip else ''}.safetensors")
                    base = _same_condensation(plain, images, method, ipc, flip, s) if soft == "committee" else None
                    t0 = time.perf_counter()
                    if base is not None:  # committee labels come after the condensation: the plain row's images
                        syn = C.SyntheticSet(base.x, C.committee_labels(base.x, images, 0), base.num_classes,
                                             {**base.meta, "soft_labels": "committee"})
                    else:
                        syn = C.condense(images, method, ipc, flip=flip, soft_labels=soft or None, settings=s,
                                         run_dir=run_dir, seed=0)
                    if run_dir is not None:
                        (run_dir / "checkpoint.json").unlink(missing_ok=True)  # experts stay, the images do not
                        (run_dir / "checkpoint.safetensors").unlink(missing_ok=True)
                    seconds = time.perf_counter() - t0
                    if base is not None:
                        seconds += base.meta["seconds"]  # the full cost: the condensation, then the committee
                    elif method in M.LEARNED and not soft:
                        syn.save(plain)
                    res = C.evaluate([(syn.x, syn.y)], images, nets_per_set=args.nets, epochs=args.epochs)
                    rows[name] = {"method": name, **_stats(res["accuracies"]), "seconds": seconds,
                                  "threads": args.threads, "settings": syn.meta.get("settings", {}),
                                  **({"images_of": name.replace("+committee", "")} if base is not None else {})}
                    print(f"{name}: {rows[name]['mean']:.2f} +- {rows[name]['std']:.2f} ({seconds:.0f} s)", flush=True)
                    _save(args, rows, t_start, experts)
    _save(args, rows, t_start, experts)


def _same_condensation(path: Path, images: C.Images, method: str, ipc: int, flip: bool,
                       s: C.Settings) -> C.SyntheticSet | None:
    """The images an earlier plain row of this condensation saved (same data, method, ipc, flip,
    seed 0 and settings), or None."""
    if not path.is_file():
        return None
    syn = C.SyntheticSet.load(path)
    want = dataclasses.asdict(M.defaults(method, dataclasses.replace(s, flip=flip), images.shape))
    same = (syn.meta.get("source_fingerprint") == images.fingerprint() and syn.meta.get("method") == method
            and syn.meta.get("ipc") == ipc and syn.meta.get("flip") == flip and syn.meta.get("seed") == 0
            and json.dumps(syn.meta.get("settings"), sort_keys=True) == json.dumps(want, sort_keys=True, default=list))
    return syn if same else None


def _pivot(rows: list[dict]) -> list[str]:
    """The same accuracies as one line per method, one column per data set and IPC."""
    cols = sorted({r["method"].rsplit("/", 1)[0] for r in rows if "/ipc" in r["method"]},
                  key=lambda c: (c.split("/")[0], int(c.split("ipc")[1])))
    methods = sorted({r["method"].rsplit("/", 1)[1] for r in rows if "/ipc" in r["method"]},
                     key=lambda m: (m.endswith("+flip"), m.split("+")[0] not in M.CORESETS, m))
    by = {r["method"]: r for r in rows}
    out = ["| method | " + " | ".join(c.replace("/", " ") for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in methods:
        out.append(f"| {m} | " + " | ".join(f"{by[f'{c}/{m}']['mean']:.1f}" if f"{c}/{m}" in by else "-"
                                            for c in cols) + " |")
    whole = [f"{d} {by[f'{d}/whole']['mean']:.1f} ({by[f'{d}/whole'].get('epochs', '?')} epochs)"
             for d in sorted({c.split('/')[0] for c in cols}) if f"{d}/whole" in by]
    return out + (["", "The whole training set, the same networks and optimiser: " + ", ".join(whole) + "."]
                  if whole else [])


def _stats(runs: list[float]) -> dict:
    return {"mean": statistics.fmean(runs), "std": statistics.pstdev(runs), "n": len(runs), "runs": runs}


def _save(args, rows: dict, t_start: float, experts: dict) -> None:
    ordered = sorted(rows.values(), key=lambda r: r["method"])
    write(args.out, {"benchmark": "condense", "command": command(), "machine": machine(), "metric": "test accuracy %",
                     "expert_seconds": experts,
                     "protocol": {"nets": args.nets, "epochs": args.epochs, "whole_epochs": args.whole_epochs,
                                  "arch": "convnet width 32", "augment": "DSA on every batch"},
                     "seeds": {"condense": 0, "eval_nets": list(range(args.nets))},
                     "wall_s": time.perf_counter() - t_start, "rows": ordered})
    if args.out != RESULTS / "condense.json":
        return
    lines = ["## Dataset distillation (`condense`)", "",
             "`python benchmarks/condense.py` (parts: `--data D --ipc K`). Test accuracy %, mean ± std of 5 fresh "
             "width-32 ConvNets trained only on the synthetic set (SGD 0.01, momentum 0.9, 500 epochs, DSA "
             "augmentation); `seconds` is the condensation's wall time with `threads` torch threads on the 2-core "
             "machine (parts ran side by side; - where not recorded). MTT rows count the matching; the experts "
             "they share are timed apart (`--time-experts`, below).", "",
             "| row | accuracy % | seconds | threads |", "|---|---|---|---|"]
    for r in ordered:
        lines.append(f"| {r['method']} | {r['mean']:.1f} ± {r['std']:.1f} | {r['seconds']:.0f} | {r.get('threads', '-')} |")
    lines += ["", *_pivot(ordered)]
    if experts:
        lines += ["", "MTT's 5 expert trajectories (15 epochs each): " + ", ".join(
            f"{d} {e['seconds']:.0f} s ({e['threads']} thread{'s' * (e['threads'] > 1)})"
            for d, e in sorted(experts.items())) + "."]
    update_markdown("condense", "\n".join(lines))


if __name__ == "__main__":
    main()
