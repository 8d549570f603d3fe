"""``distillery run``: teacher (trained or reused), student alone, distilled student, report.

Each stage is one call of the engine; this module only wires recipe sections to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from . import data as datasets
from . import distributed, models
from .config import Recipe, StageConfig, TermConfig, check_kwargs, to_dict
from .data.core import TensorData, concat
from .engine import MetricsLog, evaluate, fit, seed_everything
from .errors import DistilleryError
from .io import atomic_save_safetensors, atomic_write_json, read_json, sha256_file
from .objective import Objective
from .rundir import say, writer
from .taps import check_paths, find_module
from .teachers import ModuleTeacher, PrecomputedTeacher

CE = [TermConfig(loss="ce", teacher=None)]


# --------------------------------------------------------------------------- validation


def _check_selection(recipe: Recipe) -> None:
    trains = {"teacher.train": recipe.teacher.train, "baseline.train": recipe.baseline.train,
              "distill.train": recipe.distill.train,
              **{f"stage {st.name!r} train": st.train for st in recipe.distill.stages}}
    for where, cfg in trains.items():
        if cfg is not None and (cfg.select == "best" or cfg.patience is not None):
            raise DistilleryError(f"{where}: select=best and patience choose epochs on the evaluation set, and a run "
                                  "evaluates on the test split, so they would tune on test. Leave them unset here; "
                                  "in Python pass a validation set: fit(..., eval_data=val).")


def validate(recipe: Recipe) -> None:
    """Check everything knowable before training: names and parameters of every component, the data
    sets (loaded: they are generated once and cached) and their sizes, both models (built: their
    arguments and every module path a term or stage names), and each logit term's parameters (one call
    on a tiny batch). Nothing is written."""
    _check_selection(recipe)
    check_kwargs(datasets.get(recipe.data.name), recipe.data.args, f"data {recipe.data.name!r}")
    if recipe.transfer is not None:
        check_kwargs(datasets.get(recipe.transfer.name), recipe.transfer.args, f"transfer {recipe.transfer.name!r}")
        if recipe.transfer.args.get("seed", object()) == recipe.data.args.get("seed", object()) \
                and recipe.transfer.name.startswith(recipe.data.name):
            raise DistilleryError(f"transfer.seed equals data.seed ({recipe.transfer.args['seed']}): the transfer set "
                                  "would repeat the labelled samples; give it another seed.")
    for where, spec in (("teacher.model", recipe.teacher.model), ("student.model", recipe.student.model)):
        check_kwargs(models.get(spec.name), spec.args, f"{where} {spec.name!r}", skip=2)
    objectives = [Objective(stage.terms) for stage in stages(recipe)]
    data = load_data(recipe)
    for name, part in (("train", data.train), ("test", data.test), ("transfer", data.transfer)):
        if part is not None and len(part) == 0:
            raise DistilleryError(f"the {name} split of {recipe.data.name if name != 'transfer' else recipe.transfer.name!r}"
                                  " is empty; give the data set more samples.")
    check_module_paths(recipe, build_model(recipe.student.model, data.train), build_model(recipe.teacher.model, data.train))
    for objective in objectives:
        objective.check(data.train.num_classes)


# --------------------------------------------------------------------------- weights on disk


def save_weights(model: nn.Module, path: Path, meta: dict) -> None:
    """``path``: safetensors whose header holds the checksum record and ``meta`` (one atomic write: the
    weights and their record cannot disagree after a crash); then ``path``.json, the same record for
    people and tools (its sha256 is the whole file's)."""
    if not writer():
        return
    from .io import save_with_record

    save_with_record(path, {k: v.clone() for k, v in model.state_dict().items()}, meta)
    atomic_write_json(path.with_suffix(".json"), {**meta, "sha256": sha256_file(path)})


def read_weights(path: Path, *, verify: bool = True) -> tuple[dict, dict]:
    """(tensors, record) of a safetensors file, verified against its checksum record: the one in the file's
    header (``save_weights``), else ``path``.json beside it. A file with neither is an error unless ``verify``
    is off (files from elsewhere, loaded knowingly)."""
    from .io import UNVERIFIED_HINT, read_record

    path = Path(path)
    if not path.is_file():
        raise DistilleryError(f"weights file {str(path)!r} does not exist.")
    meta: dict = {}
    side = path.with_suffix(".json")
    if verify:
        record = read_record(path)
        if record is not None:
            meta = record
        elif not side.is_file():
            raise DistilleryError(f"weights file {str(path)!r} has no checksum record (in its header or {side.name}), "
                                  f"so it cannot be verified; {UNVERIFIED_HINT}.")
        else:
            meta = read_json(side, "weights metadata")
            if meta.get("sha256") != sha256_file(path):
                raise DistilleryError(f"weights file {str(path)!r} is corrupted (checksum mismatch); delete it and "
                                      "rerun.")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise DistilleryError(f"weights file {str(path)!r} is not a readable safetensors file ({e}).") from None
    return tensors, meta


def load_weights(model: nn.Module, path: Path, *, verify: bool = True) -> dict:
    """Load safetensors weights into ``model`` (``read_weights``: verified); their record."""
    tensors, meta = read_weights(path, verify=verify)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise DistilleryError(f"weights {str(path)!r} do not fit the model: {first}.") from None
    return meta


# --------------------------------------------------------------------------- measurements


@torch.no_grad()
def latency(model: nn.Module, example: torch.Tensor, repeats: int = 50, rounds: int = 5,
            batch: int = 1) -> dict[str, float]:
    """Wall time of one forward pass on ``batch`` samples (one by default) at one CPU thread: ``rounds`` rounds of ``repeats``
    timed calls after a warm-up; ``ms`` is the median of the round medians, ``spread_ms`` their range
    (max - min). One thread and medians keep the figure stable on a shared machine, where a single
    timing at several threads varied a hundredfold between identical runs."""
    from .runtime import call_model

    model.eval()
    batch = {"x": example[:batch]} if isinstance(example, torch.Tensor) else example  # a tensor, or one batch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(5):
            call_model(model, batch)
        medians = []
        for _ in range(rounds):
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                call_model(model, batch)
                times.append(time.perf_counter() - t)
            medians.append(1000 * statistics.median(times))
    finally:
        torch.set_num_threads(threads)
    return {"ms": statistics.median(medians), "spread_ms": max(medians) - min(medians), "threads": 1}


def _ece(probs: torch.Tensor, targets: torch.Tensor) -> float:
    from .report import ece

    return float(ece(probs, targets))


# --------------------------------------------------------------------------- the run


@dataclass
class Data:
    train: TensorData
    test: TensorData
    transfer: TensorData | None = None

    def for_distill(self, which: str) -> TensorData:
        if which == "train":
            return self.train
        if which == "transfer":
            assert self.transfer is not None
            return self.transfer
        assert self.transfer is not None
        return concat([self.train.unlabelled(), _offset_ids(self.transfer, self.train)], "train+transfer")


def _offset_ids(t: TensorData, after: TensorData) -> TensorData:
    """Shift transfer ids past the labelled ids so that joined sets keep unique sample ids."""
    return TensorData(t.x, t.y, t.ids + int(after.ids.max()) + 1, t.num_classes, t.name)


def load_data(recipe: Recipe) -> Data:
    splits = datasets.build(recipe.data.name, recipe.data.args)
    for need in ("train", "test"):
        if need not in splits:
            raise DistilleryError(f"data set {recipe.data.name!r} has no {need!r} split; it gives {sorted(splits)}.")
    transfer = None
    if recipe.transfer is not None:
        t = datasets.build(recipe.transfer.name, recipe.transfer.args)
        transfer = (t.get("transfer") or t["train"]).unlabelled()
        if transfer.input_shape != splits["train"].input_shape:
            raise DistilleryError(f"transfer set inputs {transfer.input_shape} differ from the data set's {splits['train'].input_shape}.")
    return Data(splits["train"], splits["test"], transfer)


def build_model(spec, d: TensorData) -> nn.Module:
    return models.build(spec.name, d.input_shape, d.num_classes, spec.args)


def model_structure(model: nn.Module) -> str:
    """A hash of what a built model is: its classes' source code (or names, where the source cannot be read)
    and its parameter and buffer names and shapes. A user who edits their model class (another activation,
    same name) gets another hash."""
    import inspect

    h = hashlib.sha256()
    for cls in sorted({type(m) for m in model.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        h.update(f"{cls.__module__}.{cls.__qualname__}".encode())
        if not cls.__module__.startswith("torch."):
            with contextlib.suppress(OSError, TypeError):
                h.update(inspect.getsource(cls).encode())
    for k, v in model.state_dict().items():
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype}".encode())
    return h.hexdigest()


def teacher_fingerprint(recipe: Recipe, model: nn.Module | None = None) -> str:
    """What decides the trained teacher: its model (the recipe's spec and, given the built ``model``, its
    structure and source), training settings, data set and seed."""
    from .config import RUNTIME_KEYS

    train = {k: v for k, v in (to_dict(recipe.teacher.train) or {}).items() if k not in RUNTIME_KEYS}
    key = {"model": to_dict(recipe.teacher.model), "structure": None if model is None else model_structure(model),
           "train": train,
           "data": to_dict(recipe.data), "seed": recipe.seed, "version": 1}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@dataclass
class RunResult:
    run_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    report: Path | None = None


def run(recipe: Recipe, *, run_dir: str | Path | None = None, resume: bool = False,
        progress: bool | None = None) -> RunResult:
    """Train or reuse the teacher, train the student alone (when asked), distil, evaluate, report
    (``kinds.run`` for a classify recipe)."""
    from . import kinds

    out = kinds.run(recipe, run_dir=run_dir, resume=resume, progress=progress)
    return RunResult(out.run_dir, out.rows, out.report)


def run_classify(recipe: Recipe, rd, *, progress: bool | None = None) -> list[dict]:
    """The classify kind's run (see ``kinds``): teacher, baseline, distilled student, measured."""
    run_dir, resume = rd.path, rd.resume
    data = load_data(recipe)
    seed = recipe.seed

    # 1. Teacher: given weights, the cache, or trained now (and put in the cache).
    teacher_model = get_teacher(recipe, data, run_dir, resume, progress)
    teacher = distilling_teacher(recipe, teacher_model)
    models_dir = rd.models
    save_weights(teacher_model, models_dir / "teacher.safetensors", {"model": to_dict(recipe.teacher.model)})
    trained: dict[str, nn.Module] = {"teacher": teacher_model}

    # 2. The student alone on the labelled set, from the same initial weights as the distilled one.
    if recipe.baseline.enabled:
        seed_everything(seed)
        baseline = build_model(recipe.student.model, data.train)
        fit(baseline, Objective(CE), data.train, recipe.baseline.train or recipe.distill.train, eval_data=data.test,
            run_dir=run_dir, phase="baseline", seed=seed, resume=resume, progress=progress)
        baseline = unsharded(baseline, recipe.student.model, data)
        save_weights(baseline, models_dir / "baseline.safetensors", {"model": to_dict(recipe.student.model)})
        trained["baseline"] = baseline

    # 3. Distillation, in one stage or several (each its own resumable phase), on one student.
    seed_everything(seed)
    student = build_model(recipe.student.model, data.train)
    distill_data = distill_set(recipe, data)
    answers: Any = teacher
    if recipe.distill.teacher_store:  # what the teacher said, written once by `distillery cache`
        from .store import CachedTeacher, TeacherStore, data_fingerprint, model_fingerprint

        answers = CachedTeacher(TeacherStore(recipe.distill.teacher_store, expect={
            "teacher_fingerprint": model_fingerprint(teacher_model, to_dict(recipe.teacher.model)),
            "data_fingerprint": data_fingerprint(distill_data)}))
        say(progress, f"teacher: answers from the store {recipe.distill.teacher_store}")
    elif recipe.distill.precompute_teacher:  # logits and every tap any stage reads, once per sample
        answers = PrecomputedTeacher(teacher, distill_data, teacher_taps(recipe))
    for stage in stages(recipe):
        objective = Objective(stage.terms, normalize=recipe.distill.normalize_terms,
                              balance=recipe.distill.balance_terms)
        phase = "distill" if not recipe.distill.stages else f"distill-{stage.name}"
        say(progress, f"{phase}: {', '.join(t.name for t in objective.terms)}")
        with train_only(student, stage.trainable):
            fit(student, objective, distill_data, stage.train or recipe.distill.train, teacher=answers,
                eval_data=data.test, run_dir=run_dir, phase=phase, seed=seed, resume=resume, progress=progress)
    student = unsharded(student, recipe.student.model, data)
    save_weights(student, models_dir / "distilled.safetensors", {"model": to_dict(recipe.student.model)})
    trained["distilled"] = student
    current = student
    for st in recipe.compress:  # each on the previous stage's model, each its own resumable phase
        current = trained[st.name] = compress_stage(recipe, st, current, answers, distill_data, data, rd, progress)
    rows = measure(trained, data.test, run_dir if writer() else None, batch64=bool(recipe.compress))
    if recipe.compress:
        for r in rows:
            f = models_dir / f"{r['model']}.safetensors"
            r["size_kb"] = f.stat().st_size / 1024 if f.is_file() else None
        if writer():
            from .report.plots import plot_size_accuracy

            plot_size_accuracy(rows, rd.figure("compress.png", "Test accuracy against the model's size on disk"))
    return rows


def compress_stage(recipe: Recipe, st, student: nn.Module, answers, distill_data, data: Data, rd,
                   progress: bool | None) -> nn.Module:
    """One compress stage on a copy of ``student``: pruned (torch-pruning) and recovered by training, or
    quantized (torchao; trained first when QAT) and converted; exported to ``models/<name>.safetensors``
    and returned as loaded back from that file (what is measured is what was exported). Each training is
    its own resumable phase (``compress-<name>``, ``compress-<name>-<step>`` when pruning iteratively)."""
    import copy

    model = copy.deepcopy(student)
    teacher = answers if st.teacher == "teacher" else ModuleTeacher(copy.deepcopy(student))
    terms = st.terms or stages(recipe)[-1].terms
    cfg = st.train or recipe.distill.train
    path = rd.models / f"{st.name}.safetensors"

    def train(phase: str, train_cfg) -> None:
        seed_everything(recipe.seed)
        fit(model, Objective(terms), distill_data, train_cfg, teacher=teacher, eval_data=data.test, run_dir=rd.path,
            phase=phase, seed=recipe.seed, resume=rd.resume, progress=progress)

    meta = {"model": to_dict(recipe.student.model)}
    if st.prune is not None:
        from .compress import prune as P

        p = st.prune
        x, y = _calibration(data.train, p.calibration)
        pruner = P.Pruner(model, p, x[:2])
        say(progress, f"compress-{st.name}: prune {p.ratio:.0%} of channels by {p.importance}, {p.steps} step(s)")
        for k in range(p.steps):  # each step: prune, then its share of the recovery
            pruner.step(x, y)
            epochs = max(1, round(cfg.epochs / p.steps))
            train(f"compress-{st.name}" + (f"-{k + 1}" if p.steps > 1 else ""),
                  dataclasses.replace(cfg, epochs=epochs, warmup_epochs=min(cfg.warmup_epochs, epochs)))
        meta.update(prune=to_dict(p), sparsity=P.sparsity(model, pruner.before))
        save, load = P.save, P.load
    else:
        from .compress import quantize as Q

        q = st.quantize
        meta["quantize"] = to_dict(q)
        say(progress, f"compress-{st.name}: {q.method}, {Q.describe(q)}")
        if q.method == "dq":  # Polino et al.: the points learn, the float weights stay
            from .compress import dq

            points = None
            if q.allocate == "gradient":  # Polino et al.'s bit allocation, kept for a resumed stage
                points = _dq_points(model, q, cfg, data.train, Path(rd.path) / f"dq-points-{st.name}.json")
                meta["dq_points"] = dict(zip(dq.layers(model, q.modules), points))
            dq.prepare(model, q.weights, q.group_size, q.modules, points)
            train(f"compress-{st.name}", cfg)
            save, load = dq.save, dq.load
        else:
            if q.method == "qat":
                Q.prepare(model, q)
                train(f"compress-{st.name}", cfg)
                Q.convert(model, q)
            else:
                Q.ptq(model, q)
            meta["float_layers"] = Q.float_layers(student, Q.targets(student, q))
            if q.export == "int8":  # torch's x86 / fbgemm int8 kernels: the fast CPU path
                from .compress import int8

                save = functools.partial(int8.export, activations="dynamic" if q.activations else "none",
                                         only=set(Q.targets(student, q)))
                load = int8.load
            else:
                save, load = Q.save, functools.partial(Q.load, cfg=q)
    if writer():
        save(model.cpu(), path, meta)
    distributed.barrier()
    return load(copy.deepcopy(student).cpu().eval(), path)


def _dq_points(model: nn.Module, q, cfg, train, record: Path) -> list[int]:
    """Each quantized layer's point count by Polino et al.'s allocation: gradient norms over 5 batches of the
    task loss (cross-entropy), read back from ``record`` when a resumed stage wrote it."""
    from .compress import dq
    from .data.loader import iter_batches
    from .runtime import call_model, logits_of, to_device

    if record.is_file():
        return json.loads(record.read_text())["points"]

    def task_loss(m: nn.Module, b: dict) -> torch.Tensor:
        b = to_device(b, next(m.parameters()).device)
        return torch.nn.functional.cross_entropy(logits_of(call_model(m, b, cfg.inputs)), b["y"])

    batches = [b for b, _ in zip(iter_batches(train, cfg.batch_size), range(5))]
    norms = dq.gradient_importances(model, dq.layers(model, q.modules), batches, task_loss)
    points = dq.allocate_points(norms, 2 ** q.weights)
    if writer():
        atomic_write_json(record, {"points": points, "gradient_norms": norms})
    return points


def _calibration(train: TensorData, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``n`` training samples as one batch: what the taylor and activation importances read."""
    from .data.loader import iter_batches

    batch = next(iter(iter_batches(train, min(n, len(train)))))
    return batch["x"], batch.get("y")


def distilling_teacher(recipe: Recipe, model: nn.Module) -> ModuleTeacher:
    """The frozen teacher as distillation reads it: on ``teacher.device`` (default: the student's), in
    ``teacher.dtype`` (a copy, so the measured teacher stays as trained), sharded under FSDP when asked."""
    import copy

    from .runtime import dtype_of, resolve_device

    dtype = dtype_of(recipe.teacher.dtype, "teacher.dtype")
    device = None if recipe.teacher.device is None else resolve_device(recipe.teacher.device, "teacher.device")
    if recipe.teacher.shard and recipe.distill.train.strategy != "fsdp":
        raise DistilleryError("teacher.shard shards the teacher with FSDP2; set distill.train.strategy: fsdp, or "
                              "teacher.shard: false.")
    teacher = ModuleTeacher(copy.deepcopy(model) if dtype != torch.float32 else model, device=device, dtype=dtype)
    teacher.shard = recipe.teacher.shard
    return teacher


def unsharded(model: nn.Module, spec, data: Data) -> nn.Module:
    """A model trained with FSDP as one plain module on every rank (all ranks gather); others as they are."""
    if not distributed.is_sharded(model):
        return model
    full = distributed.full_state_dict(model)
    fresh = build_model(spec, data.train)
    fresh.load_state_dict(full)
    return fresh


def distill_set(recipe: Recipe, data: Data) -> TensorData:
    """The samples distillation reads (``distill.data``), at ``distill.labelled_share`` when set."""
    share = recipe.distill.labelled_share
    if share is None:
        return data.for_distill(recipe.distill.data)
    if recipe.distill.data != "train+transfer" or data.transfer is None:
        raise DistilleryError("distill.labelled_share mixes the labelled and the transfer set in every batch; "
                              "set distill.data: train+transfer and give a transfer set.")
    from .data.mixing import LabelledShare

    batch_sizes = {(st.train or recipe.distill.train).batch_size for st in stages(recipe)}
    if len(batch_sizes) != 1:
        raise DistilleryError("distill.labelled_share needs one batch size across the stages.")
    return LabelledShare(data.train, _offset_ids(data.transfer, data.train), share, batch_sizes.pop())


def get_teacher(recipe: Recipe, data: Data, run_dir: Path | None, resume: bool, progress: bool | None) -> nn.Module:
    """The recipe's teacher: its given weights, the trained-teacher cache, or trained now (and cached)."""
    seed = recipe.seed
    seed_everything(seed)
    teacher_model = build_model(recipe.teacher.model, data.train)
    check_module_paths(recipe, build_model(recipe.student.model, data.train), teacher_model)
    if recipe.teacher.checkpoint:
        load_weights(teacher_model, Path(recipe.teacher.checkpoint), verify=recipe.teacher.verify)
        say(progress, f"teacher: loaded {recipe.teacher.checkpoint}")
    elif recipe.teacher.train is None:
        say(progress, f"teacher: {recipe.teacher.model.name} as built (teacher.train is null)")
    else:
        fingerprint = teacher_fingerprint(recipe, teacher_model)
        cache = Path(recipe.cache_dir or Path(recipe.runs_dir) / "cache") / "teachers" / fingerprint[:16]
        weights = cache / "teacher.safetensors"
        meta = _cached(weights)
        if meta is not None:
            load_weights(teacher_model, weights, verify=False)  # verified by _cached just now
            say(progress, f"teacher: reused from the cache {cache}")
            if run_dir is not None and writer():
                _log_reused_history(run_dir, meta.get("history", []), str(cache))
        else:
            say(progress, "teacher: training")
            out = fit(teacher_model, Objective(CE), data.train, recipe.teacher.train, eval_data=data.test,
                      run_dir=run_dir, phase="teacher", seed=seed, resume=resume, progress=progress)
            save_weights(teacher_model, weights, {"model": to_dict(recipe.teacher.model),
                                                  "fingerprint": fingerprint, "history": out["history"]})
    return teacher_model


def _cached(weights: Path) -> dict | None:
    """The verified checksum record of a cached teacher, or None: a missing, unrecorded or damaged file is
    trained again, never loaded unchecked."""
    from .io import read_record

    if not weights.is_file():
        return None
    try:
        return read_record(weights)
    except DistilleryError:
        return None


def write_teacher_store(recipe: Recipe, which: str, out: str | Path, *, top_k: int | None = None,
                        temperature: float = 1.0, tail: str = "bucket", dtype: str | None = None,
                        shard_size: int = 4096, progress: bool | None = None) -> Path:
    """``distillery cache``: the recipe's teacher (trained or reused as ``run`` would) answers every
    sample of ``which`` (train, transfer, train+transfer, test), with the taps the recipe's terms read."""
    from .store import model_fingerprint, write_store

    validate(recipe)
    torch.set_num_threads(recipe.threads)
    data = load_data(recipe)
    choices = ("train", "transfer", "train+transfer", "test")
    if which not in choices:
        raise DistilleryError(f"--data must be one of {', '.join(choices)}, got {which!r}.")
    if "transfer" in which and data.transfer is None:
        raise DistilleryError(f"recipe {recipe.name!r} has no transfer set; cache --data train or test.")
    subset = data.test if which == "test" else data.for_distill(which)
    if which == "train+transfer" and recipe.distill.labelled_share is not None:
        subset = distill_set(recipe, data)  # the same ids (and inputs) as the run will read
    model = get_teacher(recipe, data, None, False, progress)
    return write_store(ModuleTeacher(model), subset, out,
                       teacher_fingerprint=model_fingerprint(model, to_dict(recipe.teacher.model)), top_k=top_k,
                       temperature=temperature, tail=tail, dtype=dtype, taps=teacher_taps(recipe), shard_size=shard_size,
                       progress=progress is not False)


def _log_reused_history(run_dir: Path, history: list[dict], source: str) -> None:
    """A reused teacher's per-epoch evaluation, copied into this run's metrics for the report."""
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and any('"phase": "teacher"' in line for line in metrics.read_text().splitlines()):
        return  # already there (a resumed run)
    log = MetricsLog(metrics)
    for h in history:
        log.write({"event": "eval", "phase": "teacher", "split": "test", "reused_from": source, **h})
    log.flush()


def check_module_paths(recipe: Recipe, student: nn.Module, teacher: nn.Module) -> None:
    """Every module path of every stage (and compress stage), checked before anything trains (close matches
    named); a compress stage's library (torchao, torch-pruning) checked importable."""
    for stage in stages(recipe):
        objective = Objective(stage.terms)
        check_paths(student, [*objective.student_taps, *(stage.trainable or [])])
        check_paths(teacher, objective.teacher_taps)
    for st in recipe.compress:
        if st.terms is not None:
            objective = Objective(st.terms)
            check_paths(student, objective.student_taps)
            check_paths(teacher, objective.teacher_taps)
        if st.prune is not None:
            from .compress.prune import require_torch_pruning

            require_torch_pruning()
            check_paths(student, st.prune.ignore or [])
        if st.quantize is not None:
            from .compress.quantize import require_torchao

            if st.quantize.method != "dq":  # dq is distillery's own (no torchao)
                require_torchao()
            check_paths(student, st.quantize.modules or [])


def teacher_taps(recipe: Recipe) -> list[str]:
    """Every teacher tap any stage's terms read (what a precomputed teacher or a store must hold)."""
    return list(dict.fromkeys(p for st in stages(recipe) for p in Objective(st.terms).teacher_taps))


def stages(recipe: Recipe) -> list[StageConfig]:
    """The recipe's stages; a recipe with plain ``distill.terms`` is one stage."""
    return recipe.distill.stages or [StageConfig(name="distill", terms=recipe.distill.terms)]


@contextlib.contextmanager
def train_only(model: nn.Module, paths: list[str] | None):
    """Freeze every parameter of ``model`` outside the modules at ``paths`` (all trainable when None);
    the previous ``requires_grad`` flags come back on exit."""
    if paths is None:
        yield
        return
    keep = {id(p) for path in paths for p in find_module(model, path).parameters()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


PHASE = {"teacher": "teacher", "baseline": "baseline", "distilled": "distill"}


def measure(trained: dict[str, nn.Module], test: TensorData, run_dir: Path | None, batch64: bool = False) -> list[dict]:
    """Accuracy, parameters, batch-1 CPU latency (and batch-64 with ``batch64``), agreement with the teacher and
    ECE on the test split; writes ``predictions/<phase>.safetensors`` for the report."""
    from .data.loader import iter_batches

    targets = test.y if isinstance(getattr(test, "y", None), torch.Tensor) else \
        torch.cat([b["y"] for b in iter_batches(test, 256)])
    example = test.x if isinstance(getattr(test, "x", None), torch.Tensor) else \
        {k: v for k, v in test.batch([0]).items() if k not in ("id", "y")}
    teacher_pred = evaluate(trained["teacher"], test)["logits"].argmax(-1)
    rows = []
    for name, model in trained.items():
        ev = evaluate(model, test, None if name == "teacher" else teacher_pred)
        probs = ev["logits"].softmax(-1).contiguous()
        if run_dir is not None:
            atomic_save_safetensors(run_dir / "predictions" / f"{PHASE.get(name, name)}.safetensors",
                                    {"probs": probs, "targets": targets})
        lat = latency(model, example)
        rows.append({"model": name, "phase": PHASE.get(name, f"compress-{name}"), "accuracy": ev["accuracy"],
                     "params": models.num_params(model), "latency_ms": lat["ms"], "latency_spread_ms": lat["spread_ms"],
                     "agreement": ev["agreement"], "ece": _ece(probs, targets)})
        if batch64 and isinstance(example, torch.Tensor):
            rows[-1]["latency_64_ms"] = latency(model, example[:64], batch=64)["ms"]
    return rows


def remeasure(run_dir: Path, config: dict, *, verify: bool = True, **_) -> list[dict]:
    """``distillery eval`` of a classify run: its saved models measured again on the test split."""
    from .config import from_dict

    recipe = from_dict(Recipe, config)
    data = load_data(recipe)
    trained = {}
    for name, spec in (("teacher", recipe.teacher.model), ("baseline", recipe.student.model),
                       ("distilled", recipe.student.model)):
        path = run_dir / "models" / f"{name}.safetensors"
        if name == "baseline" and not path.exists():
            continue
        if not path.exists():
            raise DistilleryError(f"{name} weights {str(path)!r} are missing; is this a finished run directory?")
        model = build_model(spec, data.train)
        load_weights(model, path, verify=verify)
        trained[name] = model
    return measure(trained, data.test, None)


def format_rows(rows: list[dict]) -> str:
    """The table printed at the end of a run (size and batch-64 latency when compress stages measured them)."""
    extra = any("size_kb" in r for r in rows)
    head = f"{'model':<10} {'accuracy':>9} {'params':>9} {'latency/sample (1 thread)':>26} {'agreement':>10}"
    head += f" {'size KB':>9} {'batch 64 ms':>11}" if extra else ""
    lines = [head, "-" * len(head)]
    for r in rows:
        agree = "-" if r["agreement"] is None else f"{100 * r['agreement']:.1f}%"
        spread = r.get("latency_spread_ms")
        lat = f"{r['latency_ms']:.3f} ms" + ("" if spread is None else f" ± {spread / 2:.3f}")
        line = f"{r['model']:<10} {100 * r['accuracy']:>8.2f}% {r['params']:>9,} {lat:>26} {agree:>10}"
        if extra:
            size, b64 = r.get("size_kb"), r.get("latency_64_ms")
            line += f" {'-' if size is None else f'{size:.1f}':>9} {'-' if b64 is None else f'{b64:.3f}':>11}"
        lines.append(line)
    return "\n".join(lines)
