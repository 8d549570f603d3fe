"""Recipe kinds: each a typed config (a dataclass) and a run function, behind one ``distillery run``.

A recipe names its kind at the top (``kind: lm``; no ``kind`` is ``classify``). Every kind's config
has ``name``, ``kind``, ``seed``, ``threads`` and ``runs_dir``; its run function is

    run(recipe, rd: rundir.RunDir, *, progress: bool | None) -> list[dict]   # the result rows

It trains through the engine into ``rd.path`` (checkpoints, metrics), writes what it produces under
``rd.models`` and its own plots through ``rd.figure``; ``rundir`` writes everything else. A plugin
adds a kind of its own with ``kinds.register("mykind", MyConfig, my_run)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .registry import Registry


@dataclass(frozen=True)
class Kind:
    name: str
    config: type | str
    """The recipe dataclass, or ``"module:attribute"`` imported when first used."""
    run: Callable | str
    validate: Callable | str | None = None
    """Checks beyond loading (data, models built); ``None``: loading checks everything."""
    help: str = ""
    table: Callable | str | None = None
    """The rows as printed at the end of a run; ``None``: ``format_rows``."""
    evaluate: Callable | str | None = None
    """``distillery eval RUN_DIR``: ``fn(run_dir, config: dict, **options) -> rows`` measuring what the run
    produced again; ``None``: the kind's rows are in summary.json."""

    def _get(self, ref):
        if not isinstance(ref, str):
            return ref
        module, attr = ref.split(":")
        return getattr(importlib.import_module(module), attr)

    def config_class(self) -> type:
        return self._get(self.config)

    def run_fn(self) -> Callable:
        return self._get(self.run)

    def validate_fn(self) -> Callable | None:
        return None if self.validate is None else self._get(self.validate)

    def evaluate_fn(self) -> Callable:
        if self.evaluate is None:
            from .errors import DistilleryError

            def refuse(run_dir, *_, **__):
                raise DistilleryError(f"{run_dir} is a {self.name} run; its measurements are in summary.json and "
                                      "report/report.html (eval re-measures classify runs and synthetic sets).")
            return refuse
        return self._get(self.evaluate)

    def format(self, rows: list[dict]) -> str:
        return (format_rows if self.table is None else self._get(self.table))(rows)


KINDS: Registry[Kind] = Registry("recipe kind")


def register(name: str, config: type | str, run: Callable | str, validate: Callable | str | None = None,
             help: str = "", table: Callable | str | None = None, evaluate: Callable | str | None = None) -> Kind:
    return KINDS.add(name, Kind(name, config, run, validate, help, table, evaluate))


def format_rows(rows: list[dict]) -> str:
    """Any kind's result rows as a plain table: one column per key (in first-seen order), numbers to
    four significant digits."""
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    table = [keys, *[[cell(r.get(k)) for k in keys] for r in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(keys))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


register("classify", "distillery.config:Recipe", "distillery.pipeline:run_classify", "distillery.pipeline:validate",
         "a classifier: teacher (trained, cached or given), the student alone, the distilled student",
         "distillery.pipeline:format_rows", "distillery.pipeline:remeasure")
register("lm", "distillery.lm.config:LMRecipe", "distillery.lm.run:run", "distillery.lm.run:validate",
         "a causal language model trained alone or distilled (token KD, sequence KD, on-policy, top-k, AdaSPEC)")
register("condense", "distillery.condense.config:CondenseRecipe", "distillery.condense.run:run", None,
         "a data set condensed into a few synthetic samples per class, then evaluated",
         evaluate="distillery.condense.run:remeasure")
register("embed", "distillery.embed.recipe:EmbedRecipe", "distillery.embed.recipe:run", None,
         "a sentence encoder distilled into fewer layers or a static embedding table")
register("search", "distillery.search:SearchConfig", "distillery.search:run", None,
         "an Optuna study over a classify recipe's search space (written by `distillery search`)")
register("graph", "distillery.graph.recipe:GraphRecipe", "distillery.graph.recipe:run", None,
         "a graph neural network teacher distilled into an MLP over node features (GLNN and kin)")
register("diffusion", "distillery.diffusion.recipe:DiffusionRecipe", "distillery.diffusion.recipe:run",
         "distillery.diffusion.recipe:validate",
         "a many-step diffusion or flow teacher distilled into a few-step student (PD, CD, reflow, DMD, SDS/VSD, Hyper-SD)")


def of(recipe: Any) -> Kind:
    return KINDS.get(getattr(recipe, "kind", "classify"))


def validate(recipe: Any) -> None:
    fn = of(recipe).validate_fn()
    if fn is not None:
        fn(recipe)


@dataclass
class Result:
    run_dir: Path
    rows: list[dict[str, Any]]
    report: Path | None


def run(recipe: Any, *, run_dir: str | Path | None = None, resume: bool = False,
        progress: bool | None = None) -> Result:
    """Run ``recipe`` of any kind into its run directory (new, or ``run_dir``; ``resume`` continues it)."""
    import torch

    from . import distributed
    from .rundir import open_run

    kind = of(recipe)
    validate(recipe)
    torch.set_num_threads(recipe.threads)
    if distributed.world()[0] != 0:
        progress = False
    rd = open_run(recipe, run_dir, resume, progress)
    try:
        rows = kind.run_fn()(recipe, rd, progress=progress)
    except BaseException as e:  # an interrupt too: the summary never stays "running"
        rd.failed(interrupted=isinstance(e, KeyboardInterrupt))
        raise
    return Result(rd.path, rows, rd.finish(rows))
