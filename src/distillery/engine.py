"""The loop and nothing else: optimiser and schedule, accumulation, clipping, autocast,
evaluation every epoch, atomic checkpoints with exact resume, metrics JSONL and progress.

The engine knows no distillation method: it calls the teacher protocol and the objective.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from . import distributed
from .config import TrainConfig, to_dict
from .data.core import TensorData, batches, epoch_order
from .errors import DistilleryError
from .io import atomic_save_safetensors, atomic_write_json, atomic_write_text, read_json, sha256_file
from .objective import Objective, check_finite
from .taps import Taps
from .teachers import Teacher, answer_all

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


@torch.no_grad()
def predict(model: nn.Module, data: TensorData, batch_size: int = 1024) -> Tensor:
    """Logits (N, C) for every sample in order; the model's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        out = [model(data.x[i : i + batch_size]) for i in range(0, len(data), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out).float()


def evaluate(model: nn.Module, data: TensorData, teacher_pred: Tensor | None = None) -> dict[str, Any]:
    """Accuracy (fraction), mean CE and agreement with the teacher's argmax on a labelled set."""
    logits = predict(model, data)
    out: dict[str, Any] = {"logits": logits}
    if data.y is not None:
        out["accuracy"] = float((logits.argmax(-1) == data.y).float().mean())
        out["loss"] = float(nn.functional.cross_entropy(logits, data.y))
    out["agreement"] = None if teacher_pred is None else float((logits.argmax(-1) == teacher_pred).float().mean())
    return out


# --------------------------------------------------------------------------- checkpoints


def _flat_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    state_meta: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        meta = {}
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim/{idx}/{k}"] = v.detach().clone().contiguous()
            else:
                meta[k] = v
        state_meta[str(idx)] = meta
    return tensors, {"param_groups": sd["param_groups"], "state": state_meta}


def _unflat_optimizer(tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(m) for i, m in meta["state"].items()}
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, idx, k = key.split("/", 2)
            state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def module_tensors(modules: dict[str, nn.Module]) -> dict[str, Tensor]:
    return {f"{name}/{k}": v.detach().clone().contiguous() for name, m in modules.items() for k, v in m.state_dict().items()}


def load_module_tensors(modules: dict[str, nn.Module], tensors: dict[str, Tensor], where: str) -> None:
    for name, m in modules.items():
        prefix = f"{name}/"
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            m.load_state_dict(sd)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise DistilleryError(f"checkpoint {where} does not fit module {name!r}: {first}. "
                                  "Was it written by another recipe?") from None


def save_checkpoint(path: Path, modules: dict[str, nn.Module], opt, sched, meta: dict,
                    extra: dict[str, Tensor] | None = None) -> None:
    """``path``.safetensors (weights, optimiser tensors, torch RNG, ``extra`` tensors) then ``path``.json
    (the commit point: counters, RNG states, the safetensors' sha256). Both written atomically."""
    tensors = {**module_tensors(modules), **(extra or {})}
    opt_tensors, opt_meta = _flat_optimizer(opt)
    tensors.update(opt_tensors)
    tensors["rng/torch"] = torch.get_rng_state()
    st_path = path.with_suffix(".safetensors")
    atomic_save_safetensors(st_path, tensors)
    np_state = np.random.get_state()
    state = {
        **meta,
        "weights": st_path.name,
        "sha256": sha256_file(st_path),
        "optimizer": opt_meta,
        "scheduler": sched.state_dict(),
        "rng": {"python": _py_state_json(random.getstate()),
                "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]},
    }
    atomic_write_json(path.with_suffix(".json"), state)


def load_checkpoint(path: Path) -> tuple[dict, dict[str, Tensor]]:
    """Read and verify a checkpoint written by ``save_checkpoint``; a missing or corrupted one is a clear error."""
    meta = read_json(path.with_suffix(".json"), "checkpoint")
    st_path = path.with_suffix(".safetensors")
    if not st_path.is_file():
        raise DistilleryError(f"checkpoint weights {str(st_path)!r} are missing; rerun without resume.")
    if sha256_file(st_path) != meta.get("sha256"):
        raise DistilleryError(f"checkpoint {str(st_path)!r} is corrupted (checksum mismatch); delete it and rerun.")
    return meta, load_file(str(st_path))


def _py_state_json(state):
    return [state[0], list(state[1]), state[2]]


def _restore_rng(meta: dict, tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    v, internal, gauss = meta["rng"]["python"]
    random.setstate((v, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["rng"]["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------- logging


class MetricsLog:
    """Append-only JSONL of train and eval records (see ``distillery.report`` for the fields)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._buf: list[str] = []

    def write(self, record: dict) -> None:
        if self.path is not None:
            self._buf.append(json.dumps(record))

    def flush(self) -> None:
        if self.path is not None and self._buf:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n".join(self._buf) + "\n")
            self._buf.clear()

    def drop_after(self, phase: str, step: int) -> None:
        """On resume: forget the records of ``phase`` written after the checkpoint's step."""
        if self.path is None or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the interruption
            if not (r.get("phase") == phase and r.get("step", 0) > step):
                keep.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))


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


# --------------------------------------------------------------------------- the loop


def fit(
    student: nn.Module,
    objective: Objective,
    data: TensorData,
    cfg: TrainConfig,
    *,
    teacher: Teacher | None = None,
    eval_data: TensorData | None = None,
    modules: dict[str, nn.Module] | None = None,
    run_dir: str | Path | None = None,
    phase: str = "distill",
    seed: int = 0,
    resume: bool = True,
    progress: bool | None = None,
    on_step: Callable[[int], None] | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``student`` (and the trainable ``modules``, e.g. adapters) on ``data`` with ``objective``.

    ``on_step(global_step)`` runs after every optimiser step, ``on_epoch(epoch)`` after each epoch's
    evaluation and before its checkpoint. Checkpoints go to ``run_dir/checkpoints/<phase>`` every epoch (and every
    ``cfg.checkpoint_every_steps``); with ``resume`` a run continues from the last one and ends
    with the same weights as an uninterrupted run. Returns the last evaluation and the history.
    """
    run_dir = Path(run_dir) if run_dir is not None else None
    if (cfg.select == "best" or cfg.patience is not None) and (eval_data is None or not eval_data.labelled):
        raise DistilleryError(f"phase {phase!r}: train.select=best and train.patience pick epochs by evaluation "
                              "accuracy; pass a labelled validation set as eval_data.")
    if objective.needs_teacher and teacher is None:
        raise DistilleryError(f"phase {phase!r}: the objective reads the teacher, but none was given.")
    if objective.needs_labels and not data.labelled:
        raise DistilleryError(f"phase {phase!r}: a term needs labels but {data.name or 'the training set'} is unlabelled; "
                              "set that term's targets to teacher or train on a labelled set.")
    if teacher is not None and hasattr(teacher, "check_taps"):
        teacher.check_taps(objective.teacher_taps)
    Taps(student, objective.student_taps)  # wrong paths fail now, before any step
    if not objective.built:
        probe(student, objective, teacher, data, seed)
    modules = {**objective.modules(), **(modules or {})}
    trainable = {"student": student, **modules}

    params = [p for m in trainable.values() for p in m.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    n_batches = math.ceil(len(data) / cfg.batch_size)
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    sched = make_schedule(opt, cfg, steps_per_epoch)
    ckpt = run_dir / "checkpoints" / phase / "last" if run_dir is not None else None
    rank, size = distributed.world()
    label_masked = objective.label_masked(data.labelled, objective.needs_teacher and teacher is not None,
                                          tokens=getattr(data, "tokens", False))
    log = MetricsLog(run_dir / "metrics.jsonl" if run_dir is not None and rank == 0 else None)

    start_epoch, start_step, global_step = 0, 0, 0
    history: list[dict] = []
    best: dict[str, Any] = {"accuracy": None, "epoch": 0, "tensors": None}
    if ckpt is not None and resume and ckpt.with_suffix(".json").exists():
        meta, tensors = load_checkpoint(ckpt)
        if meta.get("config") != to_dict(cfg):
            raise DistilleryError(f"checkpoint {ckpt!s}.json was written with other train settings; "
                                  "use a new run directory or the same recipe.")
        load_module_tensors(trainable, tensors, str(ckpt))
        opt.load_state_dict(_unflat_optimizer(tensors, meta["optimizer"]))
        sched.load_state_dict(meta["scheduler"])
        _restore_rng(meta, tensors)
        start_epoch, start_step, global_step = meta["epoch"], meta["step_in_epoch"], meta["global_step"]
        history = meta.get("history", [])
        log.drop_after(phase, global_step)
        if "best" in meta:
            best.update(accuracy=meta["best"]["accuracy"], epoch=meta["best"]["epoch"],
                        tensors={k[5:]: v for k, v in tensors.items() if k.startswith("best/")} or None)
        if meta.get("done"):
            return _result(history, best, cfg, resumed=True)
    else:
        seed_everything(seed)

    teacher_pred = None
    if eval_data is not None and teacher is not None and not getattr(teacher, "needs_ids", False):
        teacher_pred = answer_all(teacher, eval_data.x)["logits"].argmax(-1)

    bar = _Progress(progress if rank == 0 else False, phase, cfg.epochs * steps_per_epoch, global_step, cfg.epochs)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.autocast == "bf16" else contextlib.nullcontext()
    t_taps = objective.teacher_taps
    ask_teacher = teacher if objective.needs_teacher else None
    s_taps = Taps(student, objective.student_taps)

    def save(epoch: int, step_in_epoch: int, done: bool = False) -> None:
        if ckpt is None:
            return
        if rank != 0:  # rank 0 writes; the others wait until the checkpoint is complete
            distributed.barrier()
            return
        log.flush()
        extra = {} if best["tensors"] is None else {f"best/{k}": v for k, v in best["tensors"].items()}
        save_checkpoint(ckpt, trainable, opt, sched, {
            "phase": phase, "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "done": done, "config": to_dict(cfg), "history": history,
            **({"best": {"accuracy": best["accuracy"], "epoch": best["epoch"]}} if best["accuracy"] is not None else {})},
            extra)
        distributed.barrier()

    try:
        with s_taps:
            for epoch in range(start_epoch, cfg.epochs):
                student.train()
                for m in modules.values():
                    m.train()
                # A data set may order itself (mixtures, labelled shares); the order is a function of
                # (seed, epoch) and of state checkpointed with the modules, so resume stays exact.
                order = data.order(seed, epoch) if hasattr(data, "order") else epoch_order(len(data), seed, epoch)
                groups = _groups(batches(order, cfg.batch_size), cfg.grad_accum)
                window_t, window_n = time.perf_counter(), 0
                for step_in_epoch in range(start_step if epoch == start_epoch else 0, len(groups)):
                    group = groups[step_in_epoch]
                    n_group = sum(len(i) for i in group)
                    opt.zero_grad(set_to_none=True)
                    n_local, loss_sum = 0, 0.0
                    # Each term is normalised by its count of valid rows over the whole step (every
                    # micro-batch of every rank): one all-reduce of the per-term counts first.
                    local = [distributed.shard(index, rank, size) for index in group]
                    local = [i for i in local if len(i)]  # more ranks than items left: join the average only
                    micro = [data.batch(i) for i in local]
                    counts = [objective.valid_counts(b, label_masked) for b in micro]
                    # Terms over every row need no communication: their total is the step's item count.
                    totals = [n_group] * len(objective.terms)
                    masked = [i for i, m in enumerate(label_masked) if m]
                    if masked:
                        summed = distributed.sum_counts([sum(c[i] for c in counts) for i in masked])
                        for i, v in zip(masked, summed):
                            totals[i] = v
                    bad = None
                    for index, batch, count in zip(local, micro, counts):
                        factors = [c * size / t if t else 0.0 for c, t in zip(count, totals)]
                        t_out = ask_teacher(batch, t_taps) if ask_teacher is not None else None
                        with amp:
                            s_taps.clear()
                            s_out = {"logits": student(batch["x"]), **s_taps.outputs}
                            result = objective(s_out, t_out, batch, factors)
                        where = f"{phase} epoch {epoch + 1} step {global_step + 1}"
                        if size == 1:
                            check_finite(result, where)
                        elif not bool(torch.isfinite(result["total"].detach()).all()):
                            bad = result  # told to every rank with the gradients, then raised everywhere
                            break
                        # The factors weight each term by this micro-batch's share of the step's valid
                        # rows (over all ranks and micro-batches), times the world size, which the
                        # gradient average divides out.
                        result["total"].backward()
                        n_local += len(index)
                        loss_sum += float(result["batch_total"]) * len(index)
                        del t_out, s_out
                    if distributed.average_gradients(params, size, failed=bad is not None):
                        if bad is not None:
                            check_finite(bad, where)
                        raise DistilleryError(f"non-finite loss at {phase} epoch {epoch + 1} step {global_step + 1} "
                                              "on another rank; the run stopped.")
                    if cfg.clip_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
                    opt.step()
                    sched.step()
                    objective.end_step()
                    distributed.broadcast_buffers(trainable.values())
                    global_step += 1
                    window_n += n_group
                    bar.step()
                    if global_step % cfg.log_every == 0 or step_in_epoch == len(groups) - 1:
                        now = time.perf_counter()
                        terms = {k: float(v.detach()) for k, v in result["terms"].items()} if n_local else {}
                        rate = window_n / max(now - window_t, 1e-9)
                        step_loss = distributed.weighted_mean(loss_sum / max(n_local, 1), n_local)
                        log.write({"event": "train", "phase": phase, "epoch": epoch + 1, "step": global_step,
                                   "lr": sched.get_last_lr()[0], "loss": step_loss, "terms": terms,
                                   "samples_per_s": rate, **({"world_size": size} if size > 1 else {})})
                        bar.info(f"{_fmt_terms(terms)}  {rate:,.0f}/s")
                        window_t, window_n = now, 0
                    if on_step is not None:
                        on_step(global_step)
                    if cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0:
                        save(epoch, step_in_epoch + 1)
                record = {"event": "eval", "phase": phase, "epoch": epoch + 1, "step": global_step, "split": "test"}
                if eval_data is not None:
                    ev = evaluate(student, eval_data, teacher_pred)
                    record.update(accuracy=ev.get("accuracy"), loss=ev.get("loss"), agreement=ev["agreement"])
                    log.write(record)
                    bar.epoch(epoch + 1, cfg.epochs, f"test acc {100 * ev.get('accuracy', float('nan')):.2f}%")
                history.append({k: record.get(k) for k in ("epoch", "step", "accuracy", "loss", "agreement")})
                if on_epoch is not None:  # before the checkpoint: what it changes is saved with this epoch
                    on_epoch(epoch + 1)
                stop = False
                if cfg.select == "best" or cfg.patience is not None:
                    acc = record["accuracy"]
                    if best["accuracy"] is None or acc >= best["accuracy"]:  # ties: the later epoch (as GLNN)
                        best.update(accuracy=acc, epoch=epoch + 1,
                                    tensors=module_tensors(trainable) if cfg.select == "best" else None)
                    stop = cfg.patience is not None and epoch + 1 - best["epoch"] >= cfg.patience
                if stop or epoch + 1 == cfg.epochs:
                    if cfg.select == "best" and best["tensors"] is not None:
                        load_module_tensors(trainable, best["tensors"], f"best epoch {best['epoch']}")
                    save(epoch + 1, 0, done=True)
                    break
                save(epoch + 1, 0)
    finally:
        bar.close()
        log.flush()
    return _result(history, best, cfg, resumed=start_epoch > 0 or start_step > 0)


def _result(history: list[dict], best: dict, cfg: TrainConfig, resumed: bool) -> dict[str, Any]:
    """``final`` is the evaluation of the weights the model ends with (the best epoch's with select=best)."""
    final = history[-1] if history else {}
    if cfg.select == "best" and best["accuracy"] is not None:
        final = next((h for h in history if h.get("epoch") == best["epoch"]), final)
    return {"history": history, "final": final, "resumed": resumed,
            "best": None if best["accuracy"] is None else {"accuracy": best["accuracy"], "epoch": best["epoch"]}}


@torch.no_grad()
def probe(student: nn.Module, objective: Objective, teacher: Teacher | None, data: TensorData, seed: int) -> None:
    """Run two samples through both models (eval mode, taps on) so the objective can size its adapters."""
    batch = data.batch(torch.arange(min(2, len(data))))
    was_training = student.training
    student.eval()
    try:
        with Taps(student, objective.student_taps) as taps:
            s_out = {"logits": student(batch["x"]), **taps.outputs}
    finally:
        student.train(was_training)
    t_out = teacher(batch, objective.teacher_taps) if teacher is not None and objective.needs_teacher else None
    objective.build(s_out, t_out, seed=seed)


def _groups(batch_list: list[Tensor], accum: int) -> list[list[Tensor]]:
    return [batch_list[i : i + accum] for i in range(0, len(batch_list), accum)]
