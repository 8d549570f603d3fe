"""``distillery ls | run | cache | validate | eval | report | runs``.

Every user error is printed as one line (``error: ...``) with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import DistilleryError


def _cmd_ls(args) -> int:
    from . import data, losses, models, recipes

    sections = {
        "recipes": sorted(recipes.available()),
        "losses": losses.names(),
        "models": models.names(),
        "data": data.names(),
    }
    for name, items in sections.items():
        if args.what in (None, name):
            print(f"{name}:")
            for it in items:
                print(f"  {it}")
    return 0


def _cmd_run(args) -> int:
    import os

    from . import distributed, pipeline, recipes

    if args.nproc > 1 and "RANK" in os.environ:
        raise DistilleryError("--nproc relaunches under torchrun; already under torchrun, leave --nproc out.")
    if args.nproc > 1:  # relaunch this command under torchrun, one process per rank
        import subprocess

        if not (args.out or args.resume):
            raise DistilleryError("--nproc needs --out DIR (every process writes to one run directory).")
        argv, skip = [], False
        for a in args.argv:
            if skip:
                skip = False
            elif a == "--nproc":
                skip = True
            elif not a.startswith("--nproc="):
                argv.append(a)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               "-m", "distillery", *argv]
        return subprocess.call(cmd)
    recipe = recipes.load(args.recipe, args.overrides)
    run_dir = args.resume or args.out
    joined = distributed.init_from_env()
    rank = distributed.world()[0]
    try:
        result = pipeline.run(recipe, run_dir=run_dir, resume=args.resume is not None,
                              progress=False if args.quiet else None)
    except BaseException:
        if joined:
            distributed.shutdown(ok=False)
        raise
    if joined:
        distributed.shutdown()
    if rank == 0:
        print(pipeline.format_rows(result.rows))
        print(f"run directory: {result.run_dir}")
        print(f"report: {result.report}")
    return 0


def _cmd_cache(args) -> int:
    from . import pipeline, recipes

    recipe = recipes.load(args.recipe, args.overrides)
    out = pipeline.write_teacher_store(recipe, args.data or recipe.distill.data, args.out, top_k=args.top_k, temperature=args.temperature,
                                       tail=args.tail, dtype=args.dtype, shard_size=args.shard_size,
                                       progress=False if args.quiet else None)
    from .store import TeacherStore

    st = TeacherStore(out, verify=False)
    print(f"store: {out} ({len(st)} samples, {st.bytes_per_sample():.0f} bytes per sample)")
    print(f"use it with: distillery run {' '.join([args.recipe, *args.overrides])} distill.teacher_store={out}")
    return 0


def _cmd_validate(args) -> int:
    from . import pipeline, recipes

    names = args.recipes or sorted(recipes.available())
    if not names:
        raise DistilleryError("no recipes found; pass recipe files or names.")
    failed = 0
    for name in names:
        try:
            pipeline.validate(recipes.load(name, args.overrides))
            print(f"ok      {name}")
        except DistilleryError as e:
            failed += 1
            print(f"invalid {name}: {e}")
    return 1 if failed else 0


def _cmd_eval(args) -> int:
    from . import config, pipeline

    run_dir = Path(args.run_dir)
    recipe = config.from_dict(config.Recipe, config.load_yaml(_need(run_dir / "config.yaml", "run config")))
    data = pipeline.load_data(recipe)
    trained = {}
    for name, spec in (("teacher", recipe.teacher.model), ("baseline", recipe.student.model),
                       ("distilled", recipe.student.model)):
        path = run_dir / "models" / f"{name}.safetensors"
        if name == "baseline" and not path.exists():
            continue
        model = pipeline.build_model(spec, data.train)
        pipeline.load_weights(model, _need(path, f"{name} weights"))
        trained[name] = model
    print(pipeline.format_rows(pipeline.measure(trained, data.test, None)))
    return 0


def _cmd_report(args) -> int:
    from .report import write_report

    print(write_report(Path(args.run_dir)))
    return 0


def _cmd_runs(args) -> int:
    from .report import RunIndex, format_table

    db = Path(args.runs_dir) / "index.sqlite"
    if not db.exists():
        print(f"no runs recorded under {args.runs_dir}")
        return 0
    print(format_table(RunIndex(db).list()))
    return 0


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DistilleryError(f"{what} {str(path)!r} is missing; is this a run directory written by `distillery run`?")
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distillery", description="Knowledge distillation for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("ls", help="list recipes, losses, models and data sets")
    s.add_argument("what", nargs="?", choices=["recipes", "losses", "models", "data"])
    s.set_defaults(fn=_cmd_ls)

    s = sub.add_parser("run", help="train or reuse the teacher, train the student alone, distil, report")
    s.add_argument("recipe", help="recipe name (see `distillery ls recipes`) or YAML file")
    s.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. distill.train.epochs=5")
    s.add_argument("--out", help="run directory (default: <runs_dir>/<recipe>/<time>)")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run in RUN_DIR")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.add_argument("--nproc", type=int, default=1, help="processes (torchrun, gloo)")
    s.set_defaults(fn=_cmd_run)

    s = sub.add_parser("cache", help="write what the recipe's teacher says about a data set to a store")
    s.add_argument("recipe", help="recipe name or YAML file (its teacher is trained or reused as `run` does)")
    s.add_argument("overrides", nargs="*", help="key.path=value overrides")
    s.add_argument("--data", default=None,
                   help="train, transfer, train+transfer or test (default: the recipe's distill.data)")
    s.add_argument("--out", required=True, help="store folder (an interrupted write continues there)")
    s.add_argument("--top-k", type=int, default=None, help="keep the k most likely classes (default: dense)")
    s.add_argument("--temperature", type=float, default=1.0, help="temperature of the stored log-probabilities")
    s.add_argument("--tail", choices=["bucket", "drop"], default="bucket", help="top-k: keep the rest as one bucket")
    s.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="value dtype (default: float32 dense, float16 top-k)")
    s.add_argument("--shard-size", type=int, default=4096)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_cmd_cache)

    s = sub.add_parser("validate", help="check recipes without training (default: every shipped recipe)")
    s.add_argument("recipes", nargs="*")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(fn=_cmd_validate)

    s = sub.add_parser("eval", help="evaluate the models of a run directory on the test split")
    s.add_argument("run_dir")
    s.set_defaults(fn=_cmd_eval)

    s = sub.add_parser("report", help="(re)write report.html of a run directory")
    s.add_argument("run_dir")
    s.set_defaults(fn=_cmd_report)

    s = sub.add_parser("runs", help="list recorded runs")
    s.add_argument("--runs-dir", default="runs")
    s.set_defaults(fn=_cmd_runs)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    # key=value overrides may stand after options (`run R --quiet a.b=c`); anything else is an error.
    bad = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.fn(args)
    except DistilleryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ""
        if getattr(args, "command", "") == "run":
            hint = " Continue with `distillery run RECIPE --resume RUN_DIR` (the run directory is printed above)."
        print(f"interrupted.{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
