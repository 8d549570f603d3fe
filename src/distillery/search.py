"""Recipe search: an Optuna study over a typed search space of a classify recipe (``distillery search``).

    distillery search mnist1d/kd --space recipes/search/mnist1d_kd.yaml --trials 40 [--workers 2]

The space (YAML next to the recipe) names recipe keys and their ranges:

    params:
      distill.terms.0.temperature: {float: [1.0, 8.0], log: true}
      distill.terms.0.loss: {choice: [kd, dkd, dist]}
      distill.train.lr: {float: [0.003, 0.1], log: true}
      distill.terms: {choice: [[{loss: kd}], [{loss: kd}, {loss: hint, student: features, teacher: features}]]}
    objectives: [accuracy]        # accuracy (maximised); with params or latency_ms (minimised): a Pareto front
    pruner: median                # median | hyperband | none (Optuna's pruners; single objective only)
    validation: 0.2               # share of the training split held out, seeded: trials are scored on it

Every key is checked as an override of the recipe would be (unknown keys name the close matches), and
every choice and both ends of every range load as a recipe before any trial runs. Trials train the
student on the training split without the validation share (never on the test split) and report
the validation accuracy after every epoch to the pruner (through an engine callback). The teacher is
trained once (cached in the study's folder) and answers from one teacher-output store per distinct
distillation set, written once and shared by every trial and worker. The study lives in SQLite in the
run directory (or ``--storage URL``); rerunning the command continues it, ``--workers K`` runs K
processes against the same storage, as Optuna does. At the end the best trial's student is scored
once on the test split, the best recipe is written as ``best.yaml`` (``distillery run`` takes it), and
the report shows the optimisation history, fANOVA parameter importances and the Pareto front.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .callbacks import Callback
from .config import Recipe, apply_overrides, from_dict, to_dict
from .errors import DistilleryError, NonFiniteLoss, close_matches
from .rundir import say

OBJECTIVES = {"accuracy": "maximize", "params": "minimize", "latency_ms": "minimize"}
SPACE_KEYS = ("params", "objectives", "pruner", "validation")


def _optuna():
    try:
        import optuna
    except ImportError:
        raise DistilleryError("distillery search needs Optuna: pip install 'distillery[search]'.") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, plots
    return optuna


# --------------------------------------------------------------------------- the space


@dataclass
class Param:
    """One searched key: a float or int range (``log``, ``step``), or a choice of YAML values."""

    key: str
    kind: Literal["float", "int", "choice"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] = field(default_factory=list)

    def values(self) -> list[Any]:
        """What loads as a recipe before any trial: both ends of a range, every choice."""
        return self.choices if self.kind == "choice" else [self.low, self.high]

    def encoded(self) -> list[Any]:
        """Choices as Optuna stores them: plain values as they are, lists and mappings as JSON text."""
        return [c if c is None or isinstance(c, (bool, int, float, str)) else json.dumps(c, sort_keys=True)
                for c in self.choices]

    def suggest(self, trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return self.decode(trial.suggest_categorical(self.key, self.encoded()))

    def decode(self, value: Any) -> Any:
        if self.kind != "choice":
            return value
        return self.choices[self.encoded().index(value)]


def _param(key: str, spec: Any) -> Param:
    where = f"space params.{key}"
    if not isinstance(spec, dict):
        raise DistilleryError(f"{where}: give {{float: [low, high]}}, {{int: [low, high]}} or {{choice: [...]}}, "
                              f"got {spec!r}.")
    kinds = [k for k in ("float", "int", "choice") if k in spec]
    extra = set(spec) - {"float", "int", "choice", "log", "step"}
    if len(kinds) != 1 or extra:
        bad = ", ".join(sorted(extra)) or "none or several of float, int, choice"
        raise DistilleryError(f"{where}: {bad}; give exactly one of float, int, choice (and log, step for ranges).")
    kind = kinds[0]
    if kind == "choice":
        choices = spec["choice"]
        if not isinstance(choices, list) or not choices:
            raise DistilleryError(f"{where}: choice is empty; list at least one value.")
        if "log" in spec or "step" in spec:
            raise DistilleryError(f"{where}: log and step belong to ranges, not to a choice.")
        return Param(key, "choice", choices=choices)
    bounds = spec[kind]
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, (int, float)) and
                                                                     not isinstance(b, bool) for b in bounds)):
        raise DistilleryError(f"{where}: {kind} takes [low, high] (two numbers), got {bounds!r}.")
    low, high = bounds
    if kind == "int" and not all(float(b).is_integer() for b in bounds):
        raise DistilleryError(f"{where}: int bounds must be whole numbers, got {bounds}.")
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise DistilleryError(f"{where}: low {low} is above high {high}; give [low, high] with low <= high.")
    log, step = bool(spec.get("log", False)), spec.get("step")
    if log and low <= 0:
        raise DistilleryError(f"{where}: a log range needs low > 0, got {low}.")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0 or log
                             or (kind == "int" and not float(step).is_integer())):
        raise DistilleryError(f"{where}: step must be a number > 0 (a whole one for int; not with log), got {step!r}.")
    return Param(key, kind, float(low), float(high), log, None if step is None else float(step))


@dataclass
class Space:
    params: list[Param]
    objectives: list[str] = field(default_factory=lambda: ["accuracy"])
    pruner: Literal["median", "hyperband", "none"] = "median"
    validation: float = 0.2

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.objectives]

    def first(self) -> dict[str, Any]:
        """Each key at its first value: the context in which every other value is checked (a key inside
        a searched section, ``distill.terms.2.loss`` beside ``distill.terms``, needs the section)."""
        return {p.key: p.values()[0] for p in self.params}

    def each_value(self):
        for p in self.params:
            for v in p.values():
                yield p, (int(v) if p.kind == "int" else v)


def parse_space(raw: Any, recipe_raw: dict) -> Space:
    """The space of ``raw`` (a mapping from YAML), each key and value checked against the recipe."""
    if not isinstance(raw, dict):
        raise DistilleryError(f"the search space must be a mapping with {', '.join(SPACE_KEYS)}; got {raw!r}.")
    for k in raw:
        if k not in SPACE_KEYS:
            near = close_matches(str(k), SPACE_KEYS)
            raise DistilleryError(f"unknown key {k!r} in the search space" + (f"; did you mean {near[0]!r}?" if near
                                                                              else "") + f". Keys: {', '.join(SPACE_KEYS)}.")
    params = raw.get("params") or {}
    if not isinstance(params, dict) or not params:
        raise DistilleryError("the search space has no params; name recipe keys to search, e.g. "
                              "params: {distill.terms.0.temperature: {float: [1, 8]}}.")
    objectives = raw.get("objectives", ["accuracy"])
    if not isinstance(objectives, list) or not objectives or objectives[0] != "accuracy" or \
            any(o not in OBJECTIVES for o in objectives) or len(set(objectives)) != len(objectives):
        raise DistilleryError(f"objectives must start with accuracy and add any of params, latency_ms (a Pareto "
                              f"front), got {objectives!r}.")
    pruner = raw.get("pruner", "median")
    if pruner not in ("median", "hyperband", "none"):
        raise DistilleryError(f"pruner must be median, hyperband or none, got {pruner!r}.")
    validation = raw.get("validation", 0.2)
    if isinstance(validation, bool) or not isinstance(validation, (int, float)) or not 0 < validation < 1:
        raise DistilleryError(f"validation is the share of the training split held out, in (0, 1); got {validation!r}.")
    space = Space([_param(str(k), v) for k, v in params.items()], list(objectives), pruner, float(validation))
    for p, v in space.each_value():  # every value loads as a recipe: unknown keys, bad losses, wrong types
        recipe_of(recipe_raw, {**space.first(), p.key: v})
    return space


def recipe_of(raw: dict, values: dict[str, Any]) -> Recipe:
    """The recipe ``raw`` with the searched ``values`` set (as ``key=value`` overrides would set them)."""
    out = copy.deepcopy(raw)
    for key, value in sorted(values.items(), key=lambda kv: kv[0].count(".")):  # a section before keys inside it
        out = apply_overrides(out, [f"{key}={json.dumps(value)}"])
    try:
        return from_dict(Recipe, out)
    except DistilleryError as e:
        raise DistilleryError(f"search space: {e}") from None


# --------------------------------------------------------------------------- the config (a recipe kind)


@dataclass
class SearchConfig:
    """``kind: search``: what ``distillery search`` runs (``rundir`` writes it as config.yaml)."""

    recipe: dict[str, Any]
    """The classify recipe searched (resolved mapping)."""
    space: dict[str, Any]
    trials: int = 20
    kind: Literal["search"] = "search"
    name: str = ""
    seed: int = 0
    threads: int = 2
    runs_dir: str = "runs"

    MUTABLE = ("threads", "trials")
    """Keys a continued study may change (more trials, other threads)."""
    storage = None  # (not a field: never written to config.yaml)
    """An Optuna storage URL (``postgresql://...``, ``sqlite:///...``; it may hold a password, so it is not
    written to config.yaml or the report); None: SQLite in the run directory. Set by ``distillery search``."""
    worker = 0  # (not a field)
    """This process's index among the workers of the study (its sampler's seed is ``seed + worker``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.recipe, dict):
            raise DistilleryError("recipe must be the searched recipe as a mapping (distillery search writes it).")
        if self.trials < 1:
            raise DistilleryError(f"--trials must be at least 1, got {self.trials}.")
        if self.recipe.get("kind", "classify") != "classify":
            raise DistilleryError(f"search runs classify recipes; this one is kind {self.recipe['kind']!r}.")
        from_dict(Recipe, self.recipe)
        self.parsed = parse_space(self.space, self.recipe)

    def signature(self) -> str:
        """What makes a study this study: the recipe, the space and the seed (not the trial count)."""
        key = {"recipe": self.recipe, "space": self.space, "seed": self.seed}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def study_name(cfg: SearchConfig) -> str:
    """One study per recipe, space and seed: searches of other spaces share a storage without colliding."""
    return f"distillery-{cfg.name}-{cfg.signature()[:8]}"


def storage_url(cfg: SearchConfig, run_dir: Path) -> str:
    return cfg.storage or f"sqlite:///{(run_dir / 'study.sqlite').resolve()}"


def open_study(cfg: SearchConfig, run_dir: Path):
    """The study of ``cfg`` in its storage, created or continued; a study of another recipe is refused."""
    optuna = _optuna()
    url = storage_url(cfg, run_dir)
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}
                                             if url.startswith("sqlite") else {},
                                             heartbeat_interval=30, grace_period=120)
    except Exception as e:  # sqlalchemy's many error types: one line naming the URL
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DistilleryError(f"cannot open the study storage {url!r} ({first}); give a URL that Optuna opens, "
                              "e.g. sqlite:///path/study.sqlite or postgresql://user@host/db.") from None
    space = cfg.parsed
    pruner = {"median": optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1),
              "hyperband": optuna.pruners.HyperbandPruner(),
              "none": optuna.pruners.NopPruner()}[space.pruner if len(space.objectives) == 1 else "none"]
    name = study_name(cfg)
    # every worker's sampler draws its own start (one seed for all would repeat the first trials K times)
    sampler = optuna.samplers.TPESampler(seed=cfg.seed + cfg.worker if cfg.worker >= 0 else None)
    study = optuna.create_study(study_name=name, storage=storage, directions=space.directions, load_if_exists=True,
                                pruner=pruner, sampler=sampler)
    have = study.user_attrs.get("signature")
    if have is None:
        study.set_user_attr("signature", cfg.signature())
    elif have != cfg.signature():
        raise DistilleryError(f"the storage holds a study {name!r} created for another recipe or space; use another "
                              "--out (or --storage), or the recipe and space it was created with.")
    if cfg.worker == 0 and study.get_trials(deepcopy=False):
        # joining trials begun elsewhere (another machine, a rerun): a start of its own, not the seed's again
        study.sampler = optuna.samplers.TPESampler(seed=None)
    return study


# --------------------------------------------------------------------------- trials


class Trials:
    """What every trial shares: the data (validation split off the training split), the teacher
    (trained once, cached in the run directory) and one store of its answers per distillation set."""

    def __init__(self, cfg: SearchConfig, run_dir: Path, progress: bool | None):
        self.cfg, self.run_dir, self.progress = cfg, run_dir, progress
        from .pipeline import teacher_taps

        self._data: dict[str, Any] = {}
        self.taps = sorted({t for v in [self.recipe({}), *self._variants()] for t in teacher_taps(v)})

    def _variants(self) -> list[Recipe]:
        """A recipe for every choice (in the context of the others' first values): their teacher taps."""
        space = self.cfg.parsed
        return [recipe_of(self.cfg.recipe, {**space.first(), p.key: v}) for p, v in space.each_value()
                if p.kind == "choice"]

    def recipe(self, values: dict[str, Any]) -> Recipe:
        r = recipe_of(self.cfg.recipe, values)
        r.cache_dir = str(self.run_dir / "cache")  # the study's teachers are trained without the validation share
        return r

    def data(self, recipe: Recipe):
        """(search data: train without the validation share, transfer; the validation set; the test split)."""
        from . import pipeline

        key = json.dumps([to_dict(recipe.data), to_dict(recipe.transfer)], sort_keys=True)
        if key not in self._data:
            import torch

            full = pipeline.load_data(recipe)
            n = len(full.train)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed))
            n_val = max(1, round(self.cfg.parsed.validation * n))
            val = full.train.subset(order[:n_val].sort().values, "validation")
            train = full.train.subset(order[n_val:].sort().values, "train-search")
            self._data[key] = (pipeline.Data(train, val, full.transfer), val, full.test)
        return self._data[key]

    def teacher(self, recipe: Recipe, data) -> Any:
        from . import pipeline

        model = pipeline.get_teacher(recipe, data, None, False, False)
        return model

    def answers(self, recipe: Recipe, teacher_model, distill_data):
        """The teacher's answers on ``distill_data`` from a store in the run directory, written by the first
        trial (or worker) that needs it, under a lock; every other reads it."""
        from .store import (
            CachedTeacher,
            TeacherStore,
            data_fingerprint,
            model_fingerprint,
            write_store_shared,
        )
        from .teachers import ModuleTeacher

        tfp = model_fingerprint(teacher_model, to_dict(recipe.teacher.model))
        dfp = data_fingerprint(distill_data)
        folder = self.run_dir / "stores" / f"{tfp[:12]}-{dfp[:12]}"
        write_store_shared(ModuleTeacher(teacher_model), distill_data, folder, teacher_fingerprint=tfp,
                           taps=self.taps)  # a complete store is left as it is; a partial one resumes
        return CachedTeacher(TeacherStore(folder, expect={"teacher_fingerprint": tfp, "data_fingerprint": dfp}))

    def train(self, values: dict[str, Any], report: _Report | None = None, phase: str = "trial"):
        """The student of the recipe with ``values``, distilled on the search data and scored on the
        validation set after every epoch (``report`` may stop it); (student, validation accuracy)."""
        from . import pipeline
        from .engine import fit, seed_everything
        from .objective import Objective

        recipe = self.recipe(values)
        data, val, _ = self.data(recipe)
        teacher_model = self.teacher(recipe, data)
        distill_data = pipeline.distill_set(recipe, data)
        answers = self.answers(recipe, teacher_model, distill_data)
        seed_everything(recipe.seed)
        student = pipeline.build_model(recipe.student.model, data.train)
        acc = None
        for stage in pipeline.stages(recipe):
            objective = Objective(stage.terms, normalize=recipe.distill.normalize_terms,
                                  balance=recipe.distill.balance_terms)
            with pipeline.train_only(student, stage.trainable):
                out = fit(student, objective, distill_data, stage.train or recipe.distill.train, teacher=answers,
                          eval_data=val, run_dir=None, phase=phase, seed=recipe.seed, progress=False,
                          callbacks=[] if report is None else [report])
            acc = out["final"].get("accuracy", acc)
            if report is not None and report.pruned:
                break
        return student, acc

    def __call__(self, trial) -> float | tuple[float, ...]:
        optuna = _optuna()
        from . import models, pipeline

        space = self.cfg.parsed
        values = {p.key: p.suggest(trial) for p in space.params}
        report = _Report(trial, len(space.objectives) == 1)
        student, acc = self.train(values, report, f"trial-{trial.number}")
        if report.pruned:
            raise optuna.TrialPruned(f"pruned at epoch {report.step} (validation accuracy {report.last:.4f})")
        params = models.num_params(student)
        trial.set_user_attr("params", params)
        self.save(student, trial.number, values)
        results = {"accuracy": float(acc), "params": float(params)}
        if "latency_ms" in space.objectives:
            _, val, _ = self.data(self.recipe(values))
            results["latency_ms"] = pipeline.latency(student, val.x if hasattr(val, "x") else val)["ms"]
        return tuple(results[o] for o in space.objectives) if len(space.objectives) > 1 else results["accuracy"]

    def weights(self, number: int) -> Path:
        return self.run_dir / "trials" / f"{number}.safetensors"

    def save(self, student, number: int, values: dict[str, Any]) -> None:
        from . import pipeline

        pipeline.save_weights(student, self.weights(number), {"trial": number, "values": values})


class _Report(Callback):
    """The engine callback that reports each epoch's validation accuracy to the trial and stops the run
    when Optuna's pruner says so (epochs count on across stages)."""

    def __init__(self, trial, prunable: bool):
        self.trial, self.prunable = trial, prunable
        self.step, self.last, self.pruned = 0, float("nan"), False

    def on_eval(self, state, record: dict) -> None:
        acc = record.get("accuracy")
        if acc is None:
            return
        self.step += 1
        self.last = float(acc)
        if self.prunable:
            self.trial.report(self.last, self.step)
            if self.trial.should_prune():
                self.pruned = state.stop = True


# --------------------------------------------------------------------------- the study


def finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)))


def optimize(cfg: SearchConfig, run_dir: Path, progress: bool | None = None, trials: Trials | None = None) -> None:
    """Run trials of the study until it holds ``cfg.trials`` finished ones (every worker does this);
    ``trials``: this process's shared data and teacher, when it has them already."""
    study = open_study(cfg, run_dir)
    trials = trials or Trials(cfg, run_dir, progress)

    def stop_when_done(study, _trial) -> None:
        if finished(study) >= cfg.trials:
            study.stop()

    def report(study, trial) -> None:
        value = "" if trial.values is None else " ".join(f"{v:.4f}" for v in trial.values)
        say(progress, f"trial {trial.number}: {trial.state.name.lower()} {value}")

    while finished(study) < cfg.trials:
        study.optimize(trials, n_trials=cfg.trials - finished(study), catch=(NonFiniteLoss,),
                       callbacks=[stop_when_done, report])


def run(cfg: SearchConfig, rd, *, progress: bool | None = None) -> list[dict]:
    """The search kind's run: workers (``cfg``'s ``workers`` processes besides this one, spawned by the
    CLI), this process's trials, then the best trial scored on the test split and the report."""
    run_dir = rd.path
    trials = Trials(cfg, run_dir, progress)
    base = trials.recipe({})
    data, _, _ = trials.data(base)
    trials.teacher(base, data)  # trained once, before any worker starts
    open_study(cfg, run_dir)  # created once, before any worker opens it
    workers = _spawn(cfg, run_dir, getattr(cfg, "workers", 1))
    try:
        optimize(cfg, run_dir, progress, trials)
    finally:
        for w in workers:
            w.wait()
    if any(w.returncode for w in workers):
        raise DistilleryError(f"{sum(1 for w in workers if w.returncode)} worker process(es) failed; their errors "
                              "are above. Rerun the command to continue the study.")
    return _finish(cfg, rd, trials)


def _spawn(cfg: SearchConfig, run_dir: Path, workers: int) -> list:
    import subprocess
    import sys

    argv = getattr(cfg, "worker_argv", None)
    if workers <= 1 or not argv:
        return []
    cmd = [sys.executable, "-m", "distillery", *argv, "--out", str(run_dir)]
    return [subprocess.Popen([*cmd, f"--worker={k}"]) for k in range(1, workers)]


def _finish(cfg: SearchConfig, rd, trials: Trials) -> list[dict]:
    import torch

    from . import pipeline
    from .engine import evaluate
    from .rundir import writer

    study = open_study(cfg, rd.path)
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        raise DistilleryError("no trial of the study completed (all pruned or failed); widen the space or lower "
                              "the learning rates, and rerun with more --trials.")
    space = cfg.parsed
    front = study.best_trials if len(space.objectives) > 1 else [study.best_trial]
    best = max(front, key=lambda t: t.values[0])
    values = {p.key: p.decode(best.params[p.key]) for p in space.params}
    recipe = trials.recipe(values)
    _, _, test = trials.data(recipe)
    if trials.weights(best.number).is_file():
        student = pipeline.build_model(recipe.student.model, test)
        pipeline.load_weights(student, trials.weights(best.number))
    else:  # the best trial ran on another machine of the study: trained again here, as it was (seeded)
        student, _ = trials.train(values, phase=f"trial-{best.number}")
        trials.save(student, best.number, values)
    with torch.no_grad():
        test_acc = evaluate(student, test)["accuracy"]
    best_raw = to_dict(recipe_of(cfg.recipe, values))
    best_raw.update(name=f"{best_raw['name']}-searched")
    best_raw.pop("cache_dir", None)
    if writer():
        import yaml

        from .io import atomic_write_text

        head = (f"# The best of {len(study.trials)} trials of `distillery search` ({cfg.name}): trial {best.number}, "
                f"validation accuracy {best.values[0]:.4f}, test accuracy {test_acc:.4f}.\n"
                f"#   distillery run {rd.path / 'best.yaml'}\n")
        atomic_write_text(rd.path / "best.yaml", head + yaml.safe_dump(best_raw, sort_keys=False))
        _plots(study, space, rd)
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    rows = [{"model": f"trial {best.number} (best)", "val_accuracy": best.values[0], "accuracy": test_acc,
             "params": best.user_attrs.get("params"),
             **{p.key: _plain(values[p.key]) for p in space.params if len(p.values()) > 1 or p.kind != "choice"}}]
    for t in front:
        if t is not best:
            rows.append({"model": f"trial {t.number} (front)", "val_accuracy": t.values[0],
                         **{o: v for o, v in zip(space.objectives[1:], t.values[1:])}})
    rd.summary.update(trials=counts, best_recipe=str(rd.path / "best.yaml"))
    return rows


def _plain(v: Any) -> Any:
    return v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v)


def _plots(study, space: Space, rd) -> None:
    """Optuna's matplotlib plots as PNGs in the report: history, fANOVA importances, the Pareto front."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis
    from optuna.importance import FanovaImportanceEvaluator

    from .report.plots import save_png

    target = (lambda t: t.values[0]) if len(space.objectives) > 1 else None
    plots = [("history.png", "Optimisation history (validation accuracy per trial)",
              lambda: vis.plot_optimization_history(study, target=target, target_name="validation accuracy"))]
    if len(space.params) > 1:
        plots.append(("importance.png", "Parameter importances (fANOVA)",
                      lambda: vis.plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0),
                                                         target=target, target_name="validation accuracy")))
    if len(space.objectives) > 1:
        plots.append(("pareto.png", f"Pareto front: {' against '.join(space.objectives)}",
                      lambda: vis.plot_pareto_front(study, target_names=space.objectives)))
    for filename, caption, draw in plots:
        try:
            ax = draw()
        except (ValueError, RuntimeError):  # too few completed trials for this plot
            continue
        fig = ax.figure if hasattr(ax, "figure") else plt.gcf()
        fig.set_size_inches(7, 4)
        fig.tight_layout()
        save_png(fig, rd.figure(filename, caption), dpi=90)
        plt.close(fig)
