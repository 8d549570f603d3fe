"""The loop and nothing else: devices and precision, DDP or FSDP2, a DataLoader over any data set,
optimiser and schedule, accumulation, clipping, evaluation every epoch, atomic checkpoints with
exact resume, loggers, callbacks and progress.

The engine knows no distillation method: it calls the teacher protocol, the objective, and an
optional ``task`` that owns per-step work other than "forward a batch" (on-policy generation,
token selection): ``task.prepare(batch, epoch=...) -> batch`` runs on the device before the
teacher is asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import checkpoint, distributed, runtime
from .callbacks import Callback, FunctionCallback, MetricsLog, State, make_trackers
from .checkpoint import load_module_tensors, module_tensors
from .config import RUNTIME_KEYS, TrainConfig, to_dict
from .data.loader import Loader, as_dataset, iter_batches, num_samples, plan
from .errors import DistilleryError, NonFiniteLoss
from .objective import Objective, check_finite
from .taps import Taps
from .teachers import Teacher, teacher_fingerprint

load_checkpoint = checkpoint.read  # (meta, tensors) of a run's checkpoint, verified

__all__ = ["MetricsLog", "evaluate", "fit", "load_checkpoint", "make_optimizer", "make_schedule", "predict", "seed_everything"]

# --------------------------------------------------------------------------- set-up


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-optimiser-step LambdaLR: linear warm-up, then constant, cosine (to ``min_lr``) or step."""
    total = cfg.epochs * steps_per_epoch
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "step":
            return cfg.gamma ** (step // (cfg.step_epochs * steps_per_epoch))
        progress = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# --------------------------------------------------------------------------- evaluation


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        return torch.device("cpu")
    from torch.distributed.tensor import DTensor

    return p.device if not isinstance(p, DTensor) else p.to_local().device


@torch.no_grad()
def predict(model: nn.Module, data, batch_size: int = 1024, inputs: Sequence[str] | None = None) -> Tensor:
    """Logits for every sample in order, on the CPU; the model's train/eval mode is restored after.
    ``data`` is a data set (any kind ``fit`` takes) or a tensor of inputs."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    try:
        if isinstance(data, Tensor):
            chunks = ({"x": data[i:i + batch_size]} for i in range(0, len(data), batch_size))
        else:
            chunks = iter_batches(as_dataset(data), batch_size)
        out = [runtime.logits_of(runtime.call_model(model, runtime.to_device(b, device), inputs)).float().cpu()
               for b in chunks]
    finally:
        model.train(was_training)
    return torch.cat(out)


EVAL_BATCH = 1024


def evaluate(model: nn.Module, data, teacher_pred: Tensor | list[Tensor] | None = None, *, batch_size: int = EVAL_BATCH,
             inputs: Sequence[str] | None = None) -> dict[str, Any]:
    """Per family, streamed over batches. Classifiers ((N, C) logits): ``accuracy`` (fraction), mean CE
    ``loss`` and ``agreement`` with the teacher's argmax; token models ((N, T, V) logits): the same over
    the valid target tokens, with ``perplexity``. ``logits`` (N, C) is returned for classifiers.
    ``teacher_pred`` is the teacher's argmax for every sample, or a list of it per batch of ``batch_size``
    (batches of sequences are padded each to its own length)."""
    data = as_dataset(data)
    was_training = model.training
    model.eval()
    device = _device_of(model)
    correct = agree = count = 0
    loss_sum = 0.0
    keep: list[Tensor] = []
    tokens = False
    pos = 0
    try:
        with torch.no_grad():
            for i, b in enumerate(iter_batches(data, batch_size)):
                b = runtime.to_device(b, device)
                logits = runtime.logits_of(runtime.call_model(model, b, inputs)).float()
                n = len(logits)
                pred = logits.argmax(-1)
                tp = None if teacher_pred is None else (teacher_pred[i] if isinstance(teacher_pred, list)
                                                        else teacher_pred[pos:pos + n]).to(device)
                pos += n
                tokens = logits.dim() == 3
                if not tokens:
                    keep.append(logits.cpu())
                y = b.get("y")
                valid = torch.ones_like(pred, dtype=torch.bool) if y is None else y != -100
                if "mask" in b and tokens:
                    valid = valid & runtime.as_bool_mask(b["mask"], "batch 'mask'")
                if y is not None:
                    yv = torch.where(valid, y, 0)
                    correct += int(((pred == yv) & valid).sum())
                    ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), yv.reshape(-1),
                                                     reduction="none")
                    loss_sum += float((ce * valid.reshape(-1)).sum())
                if tp is not None:
                    agree += int(((pred == tp) & valid).sum())
                count += int(valid.sum())
    finally:
        model.train(was_training)
    out: dict[str, Any] = {}
    if keep:
        out["logits"] = torch.cat(keep)
    labelled = bool(getattr(data, "labelled", False))
    if labelled and count:
        out["accuracy"] = correct / count
        out["loss"] = loss_sum / count
        if tokens:
            out["perplexity"] = math.exp(min(out["loss"], 50.0))
    out["agreement"] = None if teacher_pred is None or not count else agree / count
    return out


# --------------------------------------------------------------------------- one step


class _Step(nn.Module):
    """What DDP wraps: the student's forward (under autocast, taps recording) and the objective (in fp32),
    so the gradients of adapters and learned loss parts are reduced with the student's."""

    def __init__(self, student: nn.Module, extra: dict[str, nn.Module], objective: Objective, taps: Taps,
                 precision: runtime.Precision, inputs: Sequence[str] | None, forward: Callable | None = None):
        super().__init__()
        self.student = student
        self.extra = nn.ModuleDict({k.replace(".", "__"): m for k, m in extra.items()})
        self.objective, self.taps, self.precision, self.inputs = objective, taps, precision, inputs
        self._forward = (forward or student,)  # a tuple: not registered twice as a submodule
        self.flag: nn.Parameter | None = None

    def add_flag(self) -> None:
        """Under DDP: a scalar parameter (never stepped) whose gradient is 1 on a rank whose loss is not
        finite. DDP averages it with the other gradients, so after backward every rank knows whether any
        rank failed, with no collective of its own."""
        p = next(self.student.parameters())
        self.flag = nn.Parameter(torch.zeros((), device=p.device))

    def failed(self) -> bool:
        return self.flag is not None and self.flag.grad is not None and bool(self.flag.grad > 0)

    def forward(self, batch: dict[str, Any], t_out: dict[str, Any] | None, factors: list[float]) -> dict[str, Any]:
        self.taps.clear()
        with self.precision.autocast():
            out = runtime.call_model(self._forward[0], batch, self.inputs)
        s_out = runtime.as_float({"logits": runtime.logits_of(out, "the student"), **self.taps.outputs})
        result = self.objective(s_out, runtime.as_float(t_out), batch, factors)
        if self.flag is not None:  # no sync: the flag's gradient is (total is not finite)
            bad = (~torch.isfinite(result["total"].detach())).to(self.flag.dtype)
            result["total"] = result["total"] + self.flag * bad
        return result


def _signature(cfg: TrainConfig, objective: Objective, trainable: dict[str, nn.Module], data, teacher,
               seed: int, phase: str, task: Any = None) -> dict[str, Any]:
    """What makes a run this run: resuming against another signature is refused (``_check_signature``). A
    task with a ``signature()`` (its settings, the teacher it asks) adds it."""
    train = {k: v for k, v in to_dict(cfg).items() if k not in RUNTIME_KEYS}
    structure = {name: hashlib.sha256(json.dumps([(k, list(v.shape), str(v.dtype)) for k, v in m.state_dict().items()])
                                      .encode()).hexdigest()[:16] for name, m in trainable.items()}
    out = {"phase": phase, "seed": seed, "train": train, "objective": objective.describe(),
           "modules": structure, "data": data_fingerprint(data), "teacher": teacher_fingerprint(teacher)}
    if callable(getattr(task, "signature", None)):
        out["task"] = json.loads(json.dumps(task.signature()))  # as a checkpoint stores it (tuples as lists)
    return out


def data_fingerprint(data) -> str:
    fp = getattr(data, "fingerprint", None)
    if callable(fp):
        return str(fp())
    n = num_samples(data)
    h = hashlib.sha256(f"{type(data).__name__}:{getattr(data, 'name', '')}:{len(data)}:{n}".encode())
    for i in sorted({0, n // 2, n - 1}):  # a few samples' contents, not the whole set
        b = data.batch(torch.tensor([i]))
        for k in sorted(b):
            v = b[k]
            if isinstance(v, Tensor):
                h.update(f"{k}:{tuple(v.shape)}:{float(v.double().sum()) if v.numel() else 0:.10e}".encode())
    return h.hexdigest()[:16]


def _diff(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
        return out
    return [] if a == b else [f"{where} ({a!r} then, {b!r} now)"]


def _check_signature(saved: dict | None, now: dict, ckpt: Path) -> None:
    if saved is None:
        return
    diff = _diff(saved, now)
    if diff:
        what = "; ".join(d if len(d) < 160 else d[:157] + "..." for d in diff[:4])
        raise DistilleryError(f"{ckpt.parent} holds a run with other settings: {what}. Resume it with the same "
                              "recipe, or start a new run directory.")


# --------------------------------------------------------------------------- the loop


class _Progress:
    """A rich progress bar on a terminal (terms, throughput, ETA); one line per epoch otherwise."""

    def __init__(self, enabled: bool | None, phase: str, total: int, done: int, epochs: int = 1):
        self.phase, self.total, self.last = phase, total, ""
        self.every = max(1, epochs // 10)  # without a terminal: about ten lines per phase
        tty = sys.stderr.isatty()
        self.enabled = True if enabled is None else enabled
        self.bar = None
        if self.enabled and tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task(phase, total=total, completed=done, info="")
            self.bar.start()

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def info(self, text: str) -> None:
        self.last = text
        if self.bar is not None:
            self.bar.update(self.task, info=text)

    def epoch(self, epoch: int, epochs: int, text: str) -> None:
        if self.enabled and self.bar is None and (epoch % self.every == 0 or epoch == epochs):
            print(f"[{self.phase}] epoch {epoch}/{epochs} {text}  {self.last}", file=sys.stderr, flush=True)
        elif self.bar is not None:
            self.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _fmt_terms(terms: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in terms.items())


def fit(
    student: nn.Module,
    objective: Objective,
    data,
    cfg: TrainConfig,
    *,
    teacher: Teacher | None = None,
    eval_data=None,
    modules: dict[str, nn.Module] | None = None,
    run_dir: str | Path | None = None,
    phase: str = "distill",
    seed: int = 0,
    resume: bool = True,
    progress: bool | None = None,
    on_step: Callable[[int], None] | None = None,
    on_epoch: Callable[[int], None] | None = None,
    task: Any = None,
    callbacks: Sequence[Callback] = (),
    evaluator: Callable[[nn.Module], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train ``student`` (and the trainable ``modules``, e.g. adapters) on ``data`` with ``objective``.

    ``data`` is a ``TensorData``, any map-style ``torch.utils.data.Dataset`` (items: dicts of tensors or
    (x, y) tuples) or a ``datasets.Dataset`` (``data.loader.as_dataset``). The student, adapters and
    learned loss parts move to ``cfg.device``; under torch.distributed the step is wrapped in DDP, or
    the student sharded with FSDP2 (``cfg.strategy``). Checkpoints go to ``run_dir/checkpoints/<phase>``
    every epoch (and every ``cfg.checkpoint_every_steps``); with ``resume`` a run continues from the
    last one and ends with the same weights as an uninterrupted run, and a run directory of another
    run (other terms, data, teacher, models or settings) is refused; ``resume=False`` refuses a
    directory that already holds this phase. ``callbacks`` (``distillery.callbacks.Callback``) run on
    step, evaluation, epoch and checkpoint and may stop the run; ``evaluator(student) -> metrics`` replaces the
    per-family ``evaluate`` on ``eval_data`` (embedding agreement, ...); ``on_step(global_step)`` and
    ``on_epoch(epoch)`` are shorthands. Under FSDP the student stays sharded after the run
    (``distributed.full_state_dict`` gathers it). Returns the last evaluation and the history.
    """
    run_dir = Path(run_dir) if run_dir is not None else None
    data = as_dataset(data)
    eval_data = as_dataset(eval_data) if eval_data is not None else None
    for what, d in (("training", data), ("evaluation", eval_data)):
        if d is not None and (len(d) == 0 or num_samples(d) == 0):
            raise DistilleryError(f"phase {phase!r}: the {what} set {getattr(d, 'name', '') or ''} is empty; give it "
                                  "samples.".replace("set  is", "set is"))
    if isinstance(teacher, nn.Module):  # a bare module: frozen here, visibly (ModuleTeacher asserts it stays so)
        from .teachers import ModuleTeacher

        teacher = ModuleTeacher(teacher, inputs=cfg.inputs)
    rank, size = distributed.world()
    device = runtime.resolve_device(cfg.device)
    runtime.setup_device(device)
    precision = runtime.Precision(cfg.precision, device)
    sharded = cfg.strategy == "fsdp"
    if sharded and size < 2:
        raise DistilleryError("train.strategy=fsdp shards over processes, but this is one process; launch with "
                              "torchrun --nproc-per-node N (or --nproc N), or use strategy ddp.")
    if sharded and cfg.select == "best":
        raise DistilleryError("train.select=best keeps a copy of the best weights, which a sharded (fsdp) run does not "
                              "hold; use select: last, or strategy ddp.")
    if (cfg.select == "best" or cfg.patience is not None) and (eval_data is None or not eval_data.labelled):
        raise DistilleryError(f"phase {phase!r}: train.select=best and train.patience pick epochs by evaluation "
                              "accuracy; pass a labelled validation set as eval_data.")
    if objective.needs_teacher and teacher is None:
        raise DistilleryError(f"phase {phase!r}: the objective reads the teacher, but none was given.")
    if objective.needs_labels and not getattr(data, "labelled", False):
        raise DistilleryError(f"phase {phase!r}: a term needs labels but {getattr(data, 'name', '') or 'the training set'} "
                              "is unlabelled; set that term's targets to teacher or train on a labelled set.")
    if teacher is not None and hasattr(teacher, "check_taps"):
        teacher.check_taps(objective.teacher_taps)
    _place(teacher, device)
    Taps(student, objective.student_taps)  # wrong paths fail now, before any step
    student.to(device)
    if not objective.built:
        probe(student, objective, teacher, data, seed, inputs=cfg.inputs, task=task)
    modules = {**objective.modules(), **(modules or {})}
    for m in modules.values():
        m.to(device)
    trainable = {"student": student, **modules}
    signature = _signature(cfg, objective, trainable, data, teacher, seed, phase, task)

    s_taps = Taps(student, objective.student_taps)
    forward = torch.compile(student) if cfg.compile else None
    step_module = _Step(student, modules, objective, s_taps, precision, cfg.inputs, forward)
    if size > 1 and sharded:
        roots = [distributed.shard_fsdp(student)]
        for m in modules.values():
            if any(p.requires_grad for p in m.parameters()):
                roots.append(distributed.shard_fsdp(m))
        if getattr(teacher, "shard", False) and hasattr(teacher, "model"):
            distributed.shard_fsdp(teacher.model)
        wrapped: nn.Module = step_module
    elif size > 1:
        roots = []
        step_module.add_flag()
        wrapped = distributed.wrap_ddp(step_module, device, cfg.find_unused_parameters)
    else:
        roots, wrapped = [], step_module

    params = [p for m in trainable.values() for p in m.parameters() if p.requires_grad]
    if not params:
        raise DistilleryError(f"phase {phase!r}: nothing to train (no parameter with requires_grad=True).")
    opt = make_optimizer(params, cfg)
    n_batches = math.ceil(len(data) / cfg.batch_size)
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    sched = make_schedule(opt, cfg, steps_per_epoch)
    scaler = precision.scaler
    if scaler is not None and sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler(device.type)
    ckpt = run_dir / "checkpoints" / phase / "last" if run_dir is not None else None
    label_masked = objective.label_masked(getattr(data, "labelled", False),
                                          objective.needs_teacher and teacher is not None,
                                          tokens=getattr(data, "tokens", False))
    log = MetricsLog(run_dir / "metrics.jsonl" if run_dir is not None and rank == 0 else None)
    trackers = make_trackers(cfg.loggers, run_dir, phase) if rank == 0 and cfg.loggers else []
    hooks: list[Callback] = [*callbacks, FunctionCallback(on_step, on_epoch)]
    state = State(phase)

    start_epoch, start_step, global_step, saves = 0, 0, 0, 0
    history: list[dict] = []
    best: dict[str, Any] = {"accuracy": None, "epoch": 0, "tensors": None}
    if ckpt is not None and checkpoint.exists(ckpt):
        meta = checkpoint.read_meta(ckpt)
        if not resume:
            raise DistilleryError(f"{ckpt.parent} already holds a checkpoint of phase {phase!r}; resume it, or use a new "
                                  "run directory.")
        _check_signature(meta.get("signature"), signature, ckpt)
        if meta.get("strategy", "ddp") != cfg.strategy and "signature" not in meta:
            raise DistilleryError(f"{ckpt} was written with strategy {meta.get('strategy')}; resume with that strategy.")
        tensors = checkpoint.load(ckpt, meta, trainable, opt, device)
        sched.load_state_dict(meta["scheduler"])
        if scaler is not None and "scaler" in meta:
            scaler.load_state_dict(meta["scaler"])
        start_epoch, start_step, global_step = meta["epoch"], meta["step_in_epoch"], meta["global_step"]
        history = meta.get("history", [])
        log.drop_after(phase, global_step)
        if "best" in meta:
            best.update(accuracy=meta["best"]["accuracy"], epoch=meta["best"]["epoch"],
                        tensors={k[5:]: v for k, v in tensors.items() if k.startswith("best/")} or None)
        saves = int(meta.get("seq", 0))
        if meta.get("done"):
            for t in trackers:
                t.close()
            if size > 1:  # this fit's DDP reducer must not reach a later fit's backward
                del wrapped
                import gc

                gc.collect()
            return _result(history, best, cfg, resumed=True)
    else:
        seed_everything(seed)
        if ckpt is not None and rank == 0:
            checkpoint.clean(ckpt.parent, None)  # leftovers of an interrupted first save

    teacher_pred = None
    live = not getattr(teacher, "needs_ids", False) and getattr(teacher, "answers_inputs", True)
    if eval_data is not None and teacher is not None and live:
        with torch.no_grad():  # the teacher's class per sample (per token), batch by batch as evaluate reads them
            teacher_pred = [runtime.logits_of(teacher({k: v for k, v in b.items() if k != "id"})["logits"])
                            .argmax(-1).cpu() for b in iter_batches(eval_data, EVAL_BATCH)]

    pin = cfg.pin_memory if cfg.pin_memory is not None else device.type == "cuda"
    loader = Loader(data, num_workers=cfg.num_workers, pin_memory=pin and device.type == "cuda",
                    persistent_workers=cfg.persistent_workers, prefetch_factor=cfg.prefetch_factor, seed=seed)
    bar = _Progress(progress if rank == 0 else False, phase, cfg.epochs * steps_per_epoch, global_step, cfg.epochs)
    t_taps = objective.teacher_taps
    ask_teacher = teacher if objective.needs_teacher else None
    non_blocking = pin and device.type == "cuda"

    def save(epoch: int, step_in_epoch: int, done: bool = False) -> None:
        nonlocal saves
        if ckpt is None:
            return
        saves += 1
        log.flush()
        extra = {} if best["tensors"] is None else {f"best/{k}": v for k, v in best["tensors"].items()}
        meta = {"phase": phase, "seq": saves, "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                "done": done, "config": to_dict(cfg), "history": history, "signature": signature,
                "strategy": cfg.strategy, "world_size": size, "scheduler": sched.state_dict(),
                **({"scaler": scaler.state_dict()} if scaler is not None else {}),
                **({"best": {"accuracy": best["accuracy"], "epoch": best["epoch"]}} if best["accuracy"] is not None
                   else {})}
        checkpoint.save(ckpt, trainable, opt, meta, extra=extra, sharded=sharded)
        if rank == 0:
            for h in hooks:
                h.on_checkpoint(state, ckpt.with_suffix(".json"))

    def emit(record: dict) -> None:
        log.log(record)
        for t in trackers:
            t.log(record)

    def evaluate_now() -> dict[str, Any]:
        return evaluator(student) if evaluator is not None else \
            evaluate(student, eval_data, teacher_pred, inputs=cfg.inputs)

    def sync(on: bool):
        if size > 1 and not sharded and not on:
            return wrapped.no_sync()
        if sharded:
            distributed.set_gradient_sync(roots, on)
        return contextlib.nullcontext()

    try:
        with s_taps:
            for epoch in range(start_epoch, cfg.epochs):
                state.epoch = epoch
                student.train()
                for m in modules.values():
                    m.train()
                # The order is a function of (seed, epoch) (and of state checkpointed with the modules, for
                # data sets that order themselves), so resume stays exact.
                steps = plan(data, seed, epoch, cfg.batch_size, cfg.grad_accum, rank, size)
                first = start_step if epoch == start_epoch else 0
                batches = loader.epoch(steps, first, epoch)
                window_t, window_n = time.perf_counter(), 0
                for step_in_epoch in range(first, len(steps)):
                    st = steps[step_in_epoch]
                    opt.zero_grad(set_to_none=True)
                    loaded = [next(batches) for _ in st.micro]
                    micro = [runtime.to_device(b, device, non_blocking) for b in loaded]
                    if task is not None:
                        micro = [task.prepare(b, epoch=epoch) for b in micro]
                    for b in micro:
                        if "mask" in b and isinstance(b["mask"], Tensor) and b["mask"].dtype != torch.bool:
                            b["mask"] = runtime.as_bool_mask(b["mask"], "the batch's 'mask'")
                    counts = [objective.valid_counts(b, label_masked) for b in micro]
                    # Each term is normalised by its count of valid rows over the whole step (every
                    # micro-batch of every rank): one all-reduce of the per-term counts first. Terms over
                    # every row need no communication: their total is the step's item count.
                    totals = [st.items] * len(objective.terms)
                    masked = [i for i, m in enumerate(label_masked) if m]
                    if masked:
                        summed = distributed.sum_counts([sum(c[i] for c, mb in zip(counts, st.micro) if not mb.dummy)
                                                         for i in masked])
                        for i, v in zip(masked, summed):
                            totals[i] = v
                    bad, where = None, f"{phase} epoch {epoch + 1} step {global_step + 1}"
                    n_local, loss_sum = 0, 0.0
                    shown: dict[str, Any] = {}
                    for j, (mb, batch, count) in enumerate(zip(st.micro, micro, counts)):
                        # The factors weight each term by this micro-batch's share of the step's valid rows
                        # (over all ranks and micro-batches), times the world size, which the gradient
                        # average of DDP / FSDP divides out. A stand-in micro-batch weighs 0.
                        factors = [0.0 if mb.dummy or not t else c * size / t for c, t in zip(count, totals)]
                        t_out = None
                        if ask_teacher is not None:  # a teacher moves what it reads to its own device
                            t_out = runtime.to_device(ask_teacher(batch, t_taps), device)
                        with sync(j == len(st.micro) - 1):
                            result = wrapped(batch, t_out, factors)
                            if size == 1:
                                check_finite(result, where)
                            elif bad is None and not mb.dummy and not bool(torch.isfinite(result["total"].detach()).all()):
                                bad = result  # told to every rank below, then raised everywhere
                            if sharded and j == len(st.micro) - 1:  # FSDP: the flag's all-reduce overlaps backward
                                any_failed = distributed.any_failed(bad is not None)
                            loss = result["total"]
                            (scaler.scale(loss) if scaler is not None else loss).backward()
                        if not mb.dummy:
                            shown = result
                            n_local += len(mb.index)
                            loss_sum += float(result["batch_total"]) * len(mb.index)
                        del t_out
                    if step_module.flag is not None:  # DDP: read from the averaged gradients (no collective)
                        failed = bad is not None or step_module.failed()
                        step_module.flag.grad = None
                    else:
                        failed = any_failed() if sharded else bad is not None
                    if failed:
                        if bad is not None:
                            check_finite(bad, where)
                        raise NonFiniteLoss(f"non-finite loss at {where} on another rank; the run stopped.")
                    if scaler is not None:
                        scaler.unscale_(opt)
                    if cfg.clip_grad_norm is not None:
                        distributed.clip_grad_norm(params, cfg.clip_grad_norm)
                    if scaler is not None:
                        scaler.step(opt)
                        scaler.update()
                    else:
                        opt.step()
                    sched.step()
                    objective.end_step()
                    distributed.broadcast_buffers(trainable.values())
                    global_step += 1
                    state.global_step = global_step
                    window_n += st.items
                    bar.step()
                    record = None
                    if global_step % cfg.log_every == 0 or step_in_epoch == len(steps) - 1:
                        now = time.perf_counter()
                        terms = {k: float(v.detach()) for k, v in shown["terms"].items()} if shown else {}
                        rate = window_n / max(now - window_t, 1e-9)
                        step_loss = distributed.weighted_mean(loss_sum / max(n_local, 1), n_local)
                        record = {"event": "train", "phase": phase, "epoch": epoch + 1, "step": global_step,
                                  "lr": sched.get_last_lr()[0], "loss": step_loss, "terms": terms,
                                  "samples_per_s": rate, **({"world_size": size} if size > 1 else {})}
                        emit(record)
                        bar.info(f"{_fmt_terms(terms)}  {rate:,.0f}/s")
                        window_t, window_n = now, 0
                    for h in hooks:
                        h.on_step(state, record)
                    if cfg.eval_every_steps and global_step % cfg.eval_every_steps == 0 and \
                            step_in_epoch < len(steps) - 1 and (eval_data is not None or evaluator is not None):
                        ev = evaluate_now()
                        emit({"event": "eval", "phase": phase, "epoch": epoch + 1, "step": global_step, "split": "test",
                              "within_epoch": True, **{k: v for k, v in ev.items() if k != "logits"}})
                    if callbacks and size > 1:  # a callback's decision (a time budget, rank-local terms) is agreed
                        state.stop = distributed.any_failed(state.stop)()
                    if state.stop:
                        break
                    if cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0:
                        save(epoch, step_in_epoch + 1)
                del batches
                record = {"event": "eval", "phase": phase, "epoch": epoch + 1, "step": global_step, "split": "test"}
                if eval_data is not None or evaluator is not None:
                    ev = evaluate_now()
                    record.update({k: v for k, v in ev.items() if k != "logits"})
                    emit(record)
                    shown = (f"test acc {100 * ev['accuracy']:.2f}%" if "perplexity" not in ev
                             else f"test ppl {ev['perplexity']:.3g}") if ev.get("accuracy") is not None else \
                        " ".join(f"{k} {v:.4g}" for k, v in ev.items() if isinstance(v, float))
                    bar.epoch(epoch + 1, cfg.epochs, shown)
                    for h in hooks:
                        h.on_eval(state, record)
                history.append({k: record.get(k) for k in ("epoch", "step", "accuracy", "loss", "agreement")})
                if "perplexity" in record:
                    history[-1]["perplexity"] = record["perplexity"]
                state.epoch = epoch + 1
                for h in hooks:  # before the checkpoint: what it changes is saved with this epoch
                    h.on_epoch(state)
                if callbacks and size > 1:
                    state.stop = distributed.any_failed(state.stop)()
                stop = state.stop
                if cfg.select == "best" or cfg.patience is not None:
                    acc = record["accuracy"]
                    if best["accuracy"] is None or acc >= best["accuracy"]:  # ties: the later epoch (as GLNN)
                        best.update(accuracy=acc, epoch=epoch + 1,
                                    tensors=module_tensors(trainable) if cfg.select == "best" else None)
                    stop = stop or (cfg.patience is not None and epoch + 1 - best["epoch"] >= cfg.patience)
                if stop or epoch + 1 == cfg.epochs:
                    if cfg.select == "best" and best["tensors"] is not None:
                        load_module_tensors(trainable, best["tensors"], f"best epoch {best['epoch']}")
                    save(epoch + 1, 0, done=True)
                    break
                save(epoch + 1, 0)
    finally:
        bar.close()
        log.flush()
        for t in trackers:
            t.close()
        if size > 1:  # free this run's DDP reducer now: its gradient hooks must not reach a later fit
            del wrapped, sync
            import gc

            gc.collect()
    return _result(history, best, cfg, resumed=start_epoch > 0 or start_step > 0)


def _place(teacher, device: torch.device) -> None:
    """Module teachers with no device of their own (also inside ensembles and precomputed teachers) run
    beside the student."""
    if teacher is None:
        return
    for inner in getattr(teacher, "teachers", ()):
        _place(inner, device)
    if getattr(teacher, "live", None) is not None:
        _place(teacher.live, device)
    if hasattr(teacher, "model") and getattr(teacher, "device", "absent") is None and hasattr(teacher, "to"):
        teacher.to(device)


def _result(history: list[dict], best: dict, cfg: TrainConfig, resumed: bool) -> dict[str, Any]:
    """``final`` is the evaluation of the weights the model ends with (the best epoch's with select=best)."""
    final = history[-1] if history else {}
    if cfg.select == "best" and best["accuracy"] is not None:
        final = next((h for h in history if h.get("epoch") == best["epoch"]), final)
    return {"history": history, "final": final, "resumed": resumed,
            "best": None if best["accuracy"] is None else {"accuracy": best["accuracy"], "epoch": best["epoch"]}}


@torch.no_grad()
def probe(student: nn.Module, objective: Objective, teacher: Teacher | None, data, seed: int,
          inputs: Sequence[str] | None = None, task: Any = None) -> None:
    """Run two samples through both models (eval mode, taps on) so the objective can size its adapters
    (through the ``task``'s ``prepare`` when there is one: the model sees what it prepares)."""
    batch = data.batch(torch.arange(min(2, len(data))))
    device = _device_of(student)
    runtime.check_one_device(batch, "the data set")
    if task is not None:
        batch = task.prepare(runtime.to_device(batch, device), epoch=0)
    was_training = student.training
    student.eval()
    try:
        with Taps(student, objective.student_taps) as taps:
            out = runtime.call_model(student, runtime.to_device(batch, device), inputs)
            s_out = runtime.as_float({"logits": runtime.logits_of(out, "the student"), **taps.outputs})
    finally:
        student.train(was_training)
    t_out = None
    if teacher is not None and objective.needs_teacher:
        t_out = runtime.as_float(runtime.to_device(teacher(batch, objective.teacher_taps), device))
    objective.build(s_out, t_out, seed=seed)
