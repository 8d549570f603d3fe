"""``distillery ls | run | cache | validate | eval | report | runs | cp | embed | serve`` (and the old ``lm``, ``condense``).

Every user error is printed as one line (``error: ...``) with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import DistilleryError


def _cmd_ls(args) -> int:
    from . import data, kinds, losses, models, recipes

    sections = {
        "kinds": [f"{k:9s} {kinds.KINDS.get(k).help}" for k in kinds.KINDS],
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

    from . import distributed, kinds, recipes

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
    if args.resume and args.out:
        raise DistilleryError("give --out or --resume, not both (--resume DIR continues the run in DIR).")
    recipe = recipes.load(args.recipe, args.overrides)
    run_dir = args.resume or args.out
    joined = distributed.init_from_env()
    rank = distributed.world()[0]
    try:
        result = kinds.run(recipe, run_dir=run_dir, resume=args.resume is not None,
                           progress=False if args.quiet else None)
    except BaseException:
        if joined:
            distributed.shutdown(ok=False)
        raise
    if joined:
        distributed.shutdown()
    if rank == 0:
        print(kinds.of(recipe).format(result.rows))
        print(f"run directory: {result.run_dir}")
        print(f"report: {result.report}")
    return 0


def _cmd_cache(args) -> int:
    from . import pipeline, recipes

    _positive_flags(args, "top_k", "temperature", "shard_size")
    if args.temperature != args.temperature or args.temperature == float("inf"):
        raise DistilleryError(f"--temperature must be a finite number > 0, got {args.temperature}.")
    choices = ("train", "transfer", "train+transfer", "test")
    if args.data is not None and args.data not in choices:
        raise DistilleryError(f"--data must be one of {', '.join(choices)}, got {args.data!r}.")
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
    from . import kinds, recipes

    names = args.recipes or sorted(recipes.available())
    if not names:
        raise DistilleryError("no recipes found; pass recipe files or names.")
    failed = 0
    for name in names:
        try:
            kinds.validate(recipes.load(name, args.overrides))
            print(f"ok      {name}")
        except DistilleryError as e:
            failed += 1
            print(f"invalid {name}: {e}", file=sys.stderr)
    return 2 if failed else 0


def _cmd_eval(args) -> int:
    from . import config, kinds

    run_dir = Path(args.run_dir)
    if run_dir.suffix == ".safetensors" or (not (run_dir / "config.yaml").exists()
                                            and any(run_dir.glob("synthetic_*.safetensors"))):
        raw = {"kind": "condense"}  # one synthetic set, or a folder of them
    else:
        raw = config.load_yaml(_need(run_dir / "config.yaml", "run config"))
    kind = kinds.KINDS.get(raw.get("kind", "classify"))
    rows = kind.evaluate_fn()(run_dir, raw, archs=args.archs.split(",") if args.archs else None, nets=args.nets,
                              epochs=args.epochs, verify=not args.unverified)
    print(kind.format(rows))
    return 0


def _cmd_search(args) -> int:
    """``distillery search RECIPE --space SPACE.yaml --trials N``: an Optuna study (``distillery.search``)."""
    from . import config, kinds, recipes, search
    from .rundir import slug

    if args.workers < 1:
        raise DistilleryError(f"--workers must be at least 1, got {args.workers}.")
    recipe = recipes.load(args.recipe, args.overrides)
    if recipe.kind != "classify":
        raise DistilleryError(f"search runs classify recipes; {args.recipe} is kind {recipe.kind!r}.")
    space = Path(args.space)
    if not space.is_file():
        raise DistilleryError(f"search space {args.space!r} does not exist; write one (see `distillery search --help`).")
    cfg = search.SearchConfig(recipe=config.to_dict(recipe), space=config.load_yaml(space), trials=args.trials,
                              name=f"{recipe.name}-search", seed=args.seed, threads=recipe.threads,
                              runs_dir=recipe.runs_dir)
    cfg.storage, cfg.worker = args.storage, args.worker
    out = Path(args.out or Path(recipe.runs_dir) / "search" / slug(f"{recipe.name}-{space.stem}"))
    progress = False if args.quiet else None
    if args.worker:  # one of --workers K: trials only, against the study's storage
        import torch

        torch.set_num_threads(recipe.threads)
        search.optimize(cfg, out, progress)
        return 0
    cfg.workers = args.workers
    cfg.worker_argv = ["search", args.recipe, *args.overrides, "--space", str(space.resolve()), "--trials",
                       str(args.trials), "--seed", str(args.seed), "--quiet",
                       *(["--storage", args.storage] if args.storage else []),
                       *[f"--plugins={p}" for p in args.plugins]]
    result = kinds.run(cfg, run_dir=out, resume=(out / "config.yaml").is_file(), progress=progress)
    print(kinds.of(cfg).format(result.rows))
    print(f"best recipe: {out / 'best.yaml'} (distillery run {out / 'best.yaml'})")
    print(f"report: {result.report}")
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


def _cmd_embed(args) -> int:
    import numpy as np

    from .embed import Embedder, read_sentences
    from .io import atomic_write_bytes

    out = Path(args.output) if args.output else Path(args.input).with_suffix(".npy")
    _positive_flags(args, "batch_size")
    _output_path(out, [Path(args.input), Path(args.model_dir)], "--output")
    if out.is_dir():
        raise DistilleryError(f"--output {str(out)!r} is a folder; name a .npy file.")
    model = Embedder.load(args.model_dir, verify=not args.unverified)
    sentences = read_sentences(args.input)
    emb = model.encode(sentences, batch_size=args.batch_size).numpy()
    import io as _io

    buf = _io.BytesIO()
    np.save(buf, emb, allow_pickle=False)
    atomic_write_bytes(out, buf.getvalue())
    print(f"{len(sentences)} sentences -> {out} ({emb.shape[0]} x {emb.shape[1]} float32, unit vectors)")
    return 0


def _cmd_alias(args) -> int:
    """``distillery lm|condense RECIPE ...``: the ``run`` form, printed and then run; ``embed-distill``
    (whose flags became the keys of an embed recipe) prints the form to use."""
    if args.command == "embed-distill" or args.recipe is None:
        raise DistilleryError(f"`distillery {args.command}` is now `distillery run RECIPE` with a kind: {args.kind} "
                              f"recipe (`distillery ls recipes` lists them, e.g. embed/layers; `distillery cp` copies "
                              "one to edit).")
    if getattr(args, "no_eval", False):
        args.overrides = [*args.overrides, "eval.enabled=false"]
    if args.out and not args.resume and (Path(args.out) / "config.yaml").is_file():
        args.resume, args.out = args.out, None  # the old commands continued a run in their --out folder
    where = [f"--out {args.out}"] if args.out else [f"--resume {args.resume}"] if args.resume else []
    print(f"note: `distillery {args.command}` is `distillery run {' '.join([args.recipe, *args.overrides, *where])}`",
          file=sys.stderr)
    args.nproc = 1
    return _cmd_run(args)


def _positive_flags(args, *names: str) -> None:
    """Numeric flags that must be > 0 when given (a negative batch size once wrote uninitialised memory)."""
    for n in names:
        v = getattr(args, n, None)
        if v is not None and not v > 0:
            raise DistilleryError(f"--{n.replace('_', '-')} must be > 0, got {v}.")


def _output_path(out: Path, inputs: list[Path], flag: str) -> None:
    """An output may not be one of the inputs, nor inside a model folder it reads."""
    for p in inputs:
        if p.exists() and out.resolve() == p.resolve():
            raise DistilleryError(f"{flag} {str(out)!r} is an input of this command; write somewhere else.")


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DistilleryError(f"{what} {str(path)!r} is missing; is this a run directory written by `distillery run`?")
    return path


def _plugin_flag(s: argparse.ArgumentParser) -> None:
    s.add_argument("--plugins", action="append", default=[], metavar="MODULE[,MODULE]",
                   help="import these modules first: they register your models, data sets and losses")


def _cmd_cp(args) -> int:
    """``distillery cp RECIPE DEST``: a shipped (or found) recipe copied to start from."""
    import shutil

    from . import recipes

    src = recipes.find(args.recipe)
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists():
        raise DistilleryError(f"{str(dest)!r} exists; choose another destination (cp never overwrites).")
    if dest.suffix not in (".yaml", ".yml"):
        raise DistilleryError(f"{str(dest)!r}: a recipe file ends in .yaml.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    print(f"{src} -> {dest}\nrun it with: distillery run {dest}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage stays in --help)."""

    def error(self, message: str):
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="distillery", description="Knowledge distillation for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("ls", help="list recipes, losses, models and data sets")
    _plugin_flag(s)
    s.add_argument("what", nargs="?", choices=["kinds", "recipes", "losses", "models", "data"])
    s.set_defaults(fn=_cmd_ls)

    s = sub.add_parser("run", help="train or reuse the teacher, train the student alone, distil, report")
    _plugin_flag(s)
    s.add_argument("recipe", help="recipe name (see `distillery ls recipes`) or YAML file")
    s.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. distill.train.epochs=5")
    s.add_argument("--out", help="run directory (default: <runs_dir>/<recipe>/<time>)")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run in RUN_DIR")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.add_argument("--nproc", type=int, default=1, help="processes (torchrun, gloo)")
    s.set_defaults(fn=_cmd_run)

    s = sub.add_parser("cache", help="write what the recipe's teacher says about a data set to a store")
    _plugin_flag(s)
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
    _plugin_flag(s)
    s.add_argument("recipes", nargs="*")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(fn=_cmd_validate)

    s = sub.add_parser("eval", help="evaluate the models of a run directory, or a synthetic set, on the test split")
    _plugin_flag(s)
    s.add_argument("run_dir", help="run directory, synthetic_K.safetensors or a condense output folder")
    s.add_argument("--archs", default=None, help="synthetic sets: networks to train, e.g. convnet,mlp")
    s.add_argument("--nets", type=int, default=5, help="synthetic sets: networks per set")
    s.add_argument("--epochs", type=int, default=500, help="synthetic sets: training epochs per network")
    s.add_argument("--unverified", action="store_true",
                   help="load model files that have no distillery checksum record (from elsewhere), knowingly")
    s.set_defaults(fn=_cmd_eval)

    s = sub.add_parser("search", help="an Optuna study over a recipe's search space; the best recipe written out")
    _plugin_flag(s)
    s.add_argument("recipe", help="a classify recipe (name or YAML file)")
    s.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    s.add_argument("--space", required=True, help="the search space (YAML: params, objectives, pruner, validation)")
    s.add_argument("--trials", type=int, default=20, help="finished trials the study holds (a rerun continues it)")
    s.add_argument("--storage", default=None, help="an Optuna storage URL (default: SQLite in the run directory)")
    s.add_argument("--workers", type=int, default=1, help="processes running trials against one storage")
    s.add_argument("--seed", type=int, default=0, help="the sampler's seed and the validation split's")
    s.add_argument("--out", default=None, help="run directory (default: <runs_dir>/search/<recipe>-<space>)")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)  # the index of a spawned worker
    s.set_defaults(fn=_cmd_search)

    s = sub.add_parser("report", help="(re)write report.html of a run directory")
    _plugin_flag(s)
    s.add_argument("run_dir")
    s.set_defaults(fn=_cmd_report)

    s = sub.add_parser("embed", help="encode a file of sentences (one per line, or JSONL) with an embedding model folder")
    s.add_argument("model_dir")
    s.add_argument("--input", required=True, help="text file, one sentence per line, or .jsonl with a 'text' field")
    s.add_argument("--output", default=None, help="output .npy (default: the input path with .npy)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--unverified", action="store_true",
                   help="load model files that have no distillery checksum record (from elsewhere), knowingly")
    s.set_defaults(fn=_cmd_embed)
    for name, kind in (("lm", "lm"), ("condense", "condense")):
        s = sub.add_parser(name, help=f"old form of `distillery run RECIPE` for kind: {kind} recipes")
        _plugin_flag(s)
        s.add_argument("recipe")
        s.add_argument("overrides", nargs="*")
        s.add_argument("--out", default=None)
        s.add_argument("--resume", default=None, metavar="RUN_DIR")
        s.add_argument("--quiet", action="store_true")
        if kind == "condense":
            s.add_argument("--no-eval", action="store_true", help="condense only (eval.enabled=false)")
        s.set_defaults(fn=_cmd_alias, kind=kind)
    s = sub.add_parser("embed-distill", help="old form of `distillery run RECIPE` for kind: embed recipes")
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(fn=_cmd_alias, kind="embed", recipe=None)
    from .lm import serve

    serve.add_parser(sub)
    s = sub.add_parser("cp", help="copy a recipe (shipped, or by path) to a file of yours to start from")
    s.add_argument("recipe")
    s.add_argument("dest", help="a .yaml file, or a folder")
    s.set_defaults(fn=_cmd_cp)
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
        from . import plugins

        plugins.load(getattr(args, "plugins", None) or [])
        return args.fn(args)
    except DistilleryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception:  # not the user's input: show where, and say so
        import traceback

        traceback.print_exc()
        print("error: an unexpected failure (a bug in distillery, not in your input); please report it with the "
              "traceback above.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = ""
        if getattr(args, "command", "") == "run":
            hint = " Continue with `distillery run RECIPE --resume RUN_DIR` (the run directory is printed above)."
        print(f"interrupted.{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
