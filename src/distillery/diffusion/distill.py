"""The Python API of step distillation: each method trains through ``engine.fit`` with its task
(``methods``) and returns the students it produced, keyed by the step count they sample with.

    teacher = train_teacher(Denoiser(MLPDenoiser(dim=2), Process("vp", "v_prediction"), (2,)), data)
    students = progressive(teacher, data, start=64, stop=1)         # {32: ..., 16: ..., ..., 1: ...}
    student = consistency(teacher, copy_of(teacher), data)          # sample(student, 1 | 2 | 4, n)

``data`` is a ``TensorData`` of clean samples (labels for class-conditional models). Each phase
checkpoints under ``run_dir/checkpoints/<phase>`` and resumes there.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn

from ..config import TrainConfig
from ..data.core import TensorData
from ..engine import fit
from ..errors import DistilleryError
from ..objective import Objective, Term
from .methods import (
    ConsistencyFn,
    ConsistencyTask,
    DenoiseTask,
    PointSet,
    ProgressiveTask,
    ReflowTask,
    ScorePair,
    ScoreTask,
    model_signature,
    require_flow,
)
from .nets import Denoiser


def copy_of(model: nn.Module) -> nn.Module:
    """A trainable copy of a denoiser (a student initialised from its teacher)."""
    return copy.deepcopy(model).train().requires_grad_(True)


def _fit(student: nn.Module, task, data: TensorData, train: TrainConfig, *, phase: str, seed: int,
         run_dir: str | Path | None, resume: bool, progress: bool | None, loss: str = "diffusion_l2",
         loss_params: dict | None = None, extra_terms: list[Term] = (), callbacks=(),
         modules: dict[str, nn.Module] | None = None) -> dict:
    cfg = dataclasses.replace(train, inputs=task.inputs())
    teacher = getattr(task, "teacher", None)
    if isinstance(teacher, nn.Module):  # the task asks the teacher: it lives on the training device, frozen
        from ..runtime import resolve_device

        teacher.to(resolve_device(cfg.device)).requires_grad_(False)
    terms = [Term(loss, teacher=None, params=loss_params or {}, name="student"), *extra_terms]
    return fit(student, Objective(terms), data, cfg, task=task, run_dir=run_dir, phase=phase, seed=seed,
               resume=resume, progress=progress, callbacks=callbacks, modules=modules)


def train_teacher(model: Denoiser, data: TensorData, train: TrainConfig | None = None, *, seed: int = 0,
                  label_dropout: float = 0.1, run_dir=None, resume: bool = True, progress: bool | None = None,
                  phase: str = "teacher") -> Denoiser:
    """The denoising objective (DDPM's epsilon / v loss, flow matching's velocity loss) on ``data``."""
    task = DenoiseTask(model.process, seed, model.num_classes, label_dropout)
    _fit(model, task, data, train or TrainConfig(), phase=phase, seed=seed, run_dir=run_dir, resume=resume,
         progress=progress)
    return model.eval()


def progressive(teacher: nn.Module, data: TensorData, student: Denoiser | None = None, *, start: int = 64,
                stop: int = 1, train: TrainConfig | None = None, seed: int = 0, w: float | None = None, run_dir=None,
                resume: bool = True, progress: bool | None = None) -> dict[int, Denoiser]:
    """Progressive distillation from ``start`` teacher steps down to ``stop``: round r trains a student for
    N/2 steps from the previous round's model (round 1 from ``student``, default a copy of the teacher),
    which then teaches the next round. Returns {steps: student} for every round."""
    for name, n in (("start", start), ("stop", stop)):
        if n < 1 or n & (n - 1):
            raise DistilleryError(f"progressive distillation halves the step count; {name} must be a power of two, "
                                  f"got {n}.")
    if stop >= start:
        raise DistilleryError(f"progressive distillation goes from start ({start}) down to stop ({stop}); "
                              "start must be larger.")
    current: nn.Module = teacher
    init = student if student is not None else copy_of(teacher)
    out: dict[int, Denoiser] = {}
    n = start
    while n > stop:
        s = copy_of(init if n == start else current)
        task = ProgressiveTask(current, s.process, n, seed, s.num_classes, w)
        _fit(s, task, data, train or TrainConfig(), phase=f"pd-{n // 2}", seed=seed, run_dir=run_dir, resume=resume,
             progress=progress)
        current = s.eval().requires_grad_(False)
        if w is not None and s.num_classes:
            current.guided = w  # round 1 distilled the guided teacher; later rounds' teachers are guided already
        out[n // 2] = current
        n //= 2
    return out


def consistency(teacher: nn.Module, student: Denoiser, data: TensorData, *, solver_steps: int = 50,
                segments: int = 0, ema_decay: float = 0.95, loss: str = "pseudo_huber", huber_c: float = 0.001,
                guidance: tuple[float, float] | None = None, w: float | None = None, train: TrainConfig | None = None,
                seed: int = 0, run_dir=None, resume: bool = True, progress: bool | None = None,
                phase: str = "cd") -> Denoiser:
    """Consistency distillation (LCM parametrisation; ``segments`` > 0: Hyper-SD's segmented form).
    A class-conditional teacher is guided with w drawn in ``guidance`` (given to the student as an input)
    or at the fixed ``w`` (distilled into the student)."""
    if loss not in ("pseudo_huber", "diffusion_l2"):
        raise DistilleryError(f"consistency loss {loss!r} is not known; use pseudo_huber or diffusion_l2.")
    fn = ConsistencyFn(student, segments)
    task = ConsistencyTask(teacher, fn, solver_steps, seed, student.num_classes, guidance, ema_decay, w)
    _fit(fn, task, data, train or TrainConfig(), phase=phase, seed=seed, run_dir=run_dir, resume=resume,
         progress=progress, loss=loss, loss_params={"c": huber_c} if loss == "pseudo_huber" else {},
         callbacks=[task.callback], modules={"ema": task.ema})  # the EMA target is checkpointed with the student
    student.sampler = "ddim" if segments else "consistency"
    student.solver_steps = None if segments else solver_steps
    if w is not None and guidance is None and student.num_classes:
        student.guided = w
    return student.eval()


def hyper_sd(teacher: nn.Module, student: Denoiser, data: TensorData, *, segments=(8, 4, 2, 1), solver_steps: int = 64,
             **kw) -> dict[int, Denoiser]:
    """Hyper-SD's trajectory-segmented consistency distillation: stages of ``segments`` (8 -> 4 -> 2 -> 1),
    each from the previous stage's weights against the teacher's ODE. Returns {segments: student}; a
    stage's student samples in that many steps."""
    segs = list(segments)
    if not segs or any(s < 1 for s in segs) or segs != sorted(segs, reverse=True):
        raise DistilleryError(f"hyper_sd segments must be decreasing counts >= 1 (e.g. [8, 4, 2, 1]), got {segs}.")
    out: dict[int, Denoiser] = {}
    current = student
    for s in segs:
        current = copy_of(current)
        consistency(teacher, current, data, segments=s, solver_steps=solver_steps, phase=f"hyper_sd-{s}", **kw)
        out[s] = current
    return out


def write_pairs(teacher: nn.Module, n: int, out: str | Path, *, steps: int = 50, seed: int = 0):
    """(noise, teacher sample) pairs of ``n`` seeded noises into the teacher-output store at ``out``
    (keyed by id 0..n-1; the teacher's ODE in ``steps`` DDIM / Euler steps, unconditional). Returns the
    noise set and the opened store."""
    from ..store import TeacherStore, write_store_shared
    from .sample import sample

    shape = tuple(teacher.shape)
    dim = int(torch.tensor(shape).prod())
    g = torch.Generator().manual_seed(seed + 7919)
    z = torch.randn(n, dim, generator=g)
    noise = TensorData(z, None, torch.arange(n), dim, "noise")

    def answer(batch, taps=()):
        x = batch["x"].reshape(-1, *shape)
        return {"logits": sample(teacher, steps, len(x), noise=x).flatten(1)}

    fingerprint = f"{model_signature(teacher)}:{getattr(teacher, 'sampler', 'ddim')}:{steps}"  # what the pairs depend on
    write_store_shared(answer, noise, out, teacher_fingerprint=fingerprint, batch_size=512)
    return noise, TeacherStore(out)


def reflow(teacher: nn.Module, student: Denoiser, n_pairs: int, store_dir: str | Path, *, pair_steps: int = 50,
           train: TrainConfig | None = None, distill_train: TrainConfig | None = None, seed: int = 0, run_dir=None,
           resume: bool = True, progress: bool | None = None) -> tuple[Denoiser, Denoiser | None]:
    """2-rectified flow on the teacher's (noise, sample) pairs, then (``distill_train``) InstaFlow's
    one-step distillation: the one-step student regresses onto the 2-rectified flow's own ODE samples
    (a second pair store, ``<store_dir>-2rf``), as Liu et al. 2024 distil their 2-RF. Returns
    (2-rectified flow, one-step student or None)."""
    require_flow(student.process)  # before the pairs are written
    store_dir = Path(store_dir)
    noise, pairs = write_pairs(teacher, n_pairs, store_dir, steps=pair_steps, seed=seed)
    task = ReflowTask(student.process, pairs, student.shape, seed)
    _fit(student, task, noise, train or TrainConfig(), phase="reflow", seed=seed, run_dir=run_dir, resume=resume,
         progress=progress)
    student.eval()
    if distill_train is None:
        return student, None
    one = copy_of(student)
    noise, pairs = write_pairs(student, n_pairs, store_dir.with_name(store_dir.name + "-2rf"), steps=pair_steps,
                               seed=seed + 1)
    task = ReflowTask(one.process, pairs, one.shape, seed, one_step=True)
    _fit(one, task, noise, distill_train, phase="reflow-distill", seed=seed, run_dir=run_dir, resume=resume,
         progress=progress)
    return student, one.eval()


def score_distill(teacher: nn.Module, generator: nn.Module, mode: str, n: int, *, fake: Denoiser | None = None,
                  ratio: int = 1, labels=None, w: float | None = None, steps: int = 1, train: TrainConfig | None = None,
                  seed: int = 0, run_dir=None, resume: bool = True, progress: bool | None = None) -> nn.Module:
    """DMD / VSD / SDS into ``generator`` (a ``Denoiser`` used in one step from tau = 1, or a
    ``PointSet`` of ``n`` points); ``fake``: the fake-score model (vsd, dmd), trained on the
    generator's samples by a second term. ``n`` is the epoch size (the point count for a PointSet).
    ``steps`` > 1: a multi-step generator trained on its own ``steps``-step schedule by DMD2's backward
    simulation; it samples with ``sampler="renoise"`` in any step count that divides ``steps``."""
    pair = ScorePair(generator, fake)
    shape = tuple(generator.points.shape[1:]) if isinstance(generator, PointSet) else tuple(generator.shape)
    task = ScoreTask(teacher, pair, mode, seed, shape, ratio, num_classes=getattr(generator, "num_classes", 0)
                     if labels is not None else 0, w=w, steps=steps)
    data = TensorData(torch.zeros(n, 1), labels, torch.arange(n), 1, "ids")
    extra = [] if fake is None else [Term("fake_score_l2", teacher=None, student="fake", name="fake_score")]
    train = train or TrainConfig()
    if ratio > 1:  # fake-score-only steps leave the generator without gradients, which DDP must be told
        train = dataclasses.replace(train, find_unused_parameters=True)
    _fit(pair, task, data, train, phase=mode, seed=seed, run_dir=run_dir, resume=resume, progress=progress,
         extra_terms=extra, callbacks=[task.callback])
    if isinstance(generator, Denoiser):
        generator.sampler = "renoise" if steps > 1 else "ddim"
        if w is not None and labels is not None:
            generator.guided = w
    return generator.eval()
