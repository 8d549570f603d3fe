"""The diffusion recipe (``kind: diffusion``): a teacher that samples in many steps distilled into a
student that samples in few.

    distillery run diffusion/cd
    distillery run diffusion/pd data=digits teacher.train.epochs=40

One run: the data (a Gaussian mixture with its exact log-likelihood, or scikit-learn's digits), the
teacher (``exact``: the mixture's closed-form denoiser; ``train``: an MLP or diffusers UNet trained
here and cached under ``runs_dir/cache``; or a local diffusers folder), the ``method``'s students
(``distill``), each saved as a diffusers folder under ``models/``, and one row per (model, steps):
sliced Wasserstein and energy distance to held-out data, the exact log-likelihood and mode coverage
(mixtures) or FID on a digits classifier's features with its confidence (digits), samples per second
and the distillation's seconds. The report shows samples per step count and each metric against steps.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import TrainConfig, to_dict
from ..errors import DistilleryError
from ..rundir import say, writer
from .prune import LayerPrune

METHODS = ("none", "pd", "cd", "reflow", "dmd", "sds", "vsd", "hyper_sd", "prune")
DATA = ("mixture2d", "mixture64d", "digits", "digits32")


@dataclass
class DiffusionTeacher:
    source: str = "train"
    """exact (the mixture's closed form; mixtures only) | train (trained here, cached) | a diffusers folder."""
    process: Literal["vp", "flow"] = "vp"
    prediction: str | None = None
    """epsilon | v_prediction | sample (vp), flow | sample (flow); null: v_prediction for vp, flow for flow."""
    beta_schedule: Literal["linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    net: dict[str, Any] = field(default_factory=dict)
    """The network's arguments: ``MLPDenoiser`` (hidden, depth) for vectors, ``nets.unet`` (widths, layers) for images."""
    class_conditional: bool = False
    """Condition on the data's labels (mixture components, digit classes), with label dropout for guidance."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, batch_size=256, lr=2e-3))

    def path(self):
        """The teacher's ``Process`` (its noising path and prediction type)."""
        from .process import Process

        return Process(self.process, self.prediction, beta_schedule=self.beta_schedule)

    def __post_init__(self) -> None:
        from .process import PREDICTIONS

        self.prediction = self.prediction or ("v_prediction" if self.process == "vp" else "flow")
        if self.prediction not in PREDICTIONS[self.process]:
            raise DistilleryError(f"teacher.prediction {self.prediction!r} does not fit a {self.process} process; use "
                                  f"one of {', '.join(PREDICTIONS[self.process])}.")


@dataclass
class DiffusionStudent:
    init: Literal["teacher", "scratch"] = "teacher"
    """teacher: a copy of the teacher network (every method's paper does so); scratch: a new network (``net``)."""
    net: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, batch_size=256, lr=1e-3))


@dataclass
class DiffusionSettings:
    pd_start: int = 64
    """pd: the teacher's step count of the first round (a power of two); rounds halve it down to 1."""
    solver_steps: int = 50
    """cd: the skipping-step grid of the teacher's ODE solver (LCM: 50 of 1000); hyper_sd: 64."""
    ema_decay: float = 0.95
    loss: Literal["pseudo_huber", "diffusion_l2"] = "pseudo_huber"
    huber_c: float = 0.001
    guidance: list[float] | None = None
    """cd: [w_min, w_max]: classifier-free guidance distilled with w drawn per sample and given to the student."""
    w: float | None = None
    """A fixed guidance scale of a class-conditional teacher (pd, dmd, vsd, sds, reflow pairs, sampling)."""
    segments: list[int] = field(default_factory=lambda: [8, 4, 2, 1])
    pairs: int = 10000
    """reflow: (noise, teacher sample) pairs in the teacher-output store."""
    pair_steps: int = 50
    one_step: TrainConfig | None = field(default_factory=lambda: TrainConfig(epochs=5, batch_size=256, lr=5e-4))
    """reflow: InstaFlow's one-step distillation after the 2-rectified flow; null: none."""
    ratio: int = 5
    """dmd, vsd: fake-score updates per generator update (DMD2's two-time-scale rule: 5)."""
    generator: Literal["denoiser", "points"] = "denoiser"
    """dmd / vsd / sds into a one-step generator (the student network) or a set of points (mixtures)."""
    points: int = 2000
    """generator: points: the number of points."""
    generator_steps: int = 1
    """dmd / vsd / sds: the one-step generator's schedule; 4: DMD2's multi-step generator (backward
    simulation), sampled in 1, 2 or 4 steps (every count that divides it)."""

    def __post_init__(self) -> None:
        if self.pd_start < 2 or self.pd_start & (self.pd_start - 1):
            raise DistilleryError(f"settings.pd_start must be a power of two >= 2 (progressive distillation halves it "
                                  f"each round), got {self.pd_start}.")
        if self.guidance is not None and (len(self.guidance) != 2 or self.guidance[0] > self.guidance[1]):
            raise DistilleryError(f"settings.guidance must be [w_min, w_max] with w_min <= w_max, got {self.guidance}.")
        for k in ("solver_steps", "pairs", "pair_steps", "ratio", "points", "generator_steps"):
            if getattr(self, k) < 1:
                raise DistilleryError(f"settings.{k} must be >= 1, got {getattr(self, k)}.")
        if not 0 <= self.ema_decay < 1:
            raise DistilleryError(f"settings.ema_decay must lie in [0, 1), got {self.ema_decay}.")


@dataclass
class DiffusionEval:
    enabled: bool = True
    steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Student step counts measured (each method samples at the counts it trained for)."""
    teacher_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 50])
    samples: int = 2000

    def __post_init__(self) -> None:
        if any(s < 1 for s in [*self.steps, *self.teacher_steps]) or self.samples < 2:
            raise DistilleryError("eval.steps and eval.teacher_steps must be counts >= 1 and eval.samples >= 2.")


@dataclass
class DiffusionRecipe:
    kind: Literal["diffusion"] = "diffusion"
    name: str = ""
    data: str = "mixture2d"
    """mixture2d | mixture64d (exact Gaussian mixtures) | digits (scikit-learn's 8x8 digits in [-1, 1]) |
    digits32 (the same upscaled to 32x32, bilinear: an image size for GPU runs)."""
    samples: int = 20000
    """Mixtures: training samples drawn with the seed (digits: all 1,797)."""
    teacher: DiffusionTeacher = field(default_factory=DiffusionTeacher)
    method: str = "cd"
    """none | pd | cd | reflow | dmd | sds | vsd | hyper_sd | prune (LAPTOP-Diff: layers removed by their output
    loss, then recovery by normalised feature distillation; the student samples in the teacher's step counts)."""
    student: DiffusionStudent = field(default_factory=DiffusionStudent)
    prune: LayerPrune | None = None
    """method prune: ``diffusion.prune.LayerPrune`` (ratio, criterion, calibration, layers, features, weights)."""
    settings: DiffusionSettings = field(default_factory=DiffusionSettings)
    eval: DiffusionEval = field(default_factory=DiffusionEval)
    seed: int = 0
    threads: int = 2
    runs_dir: str = "runs"

    def __post_init__(self) -> None:
        if self.data not in DATA:
            raise DistilleryError(f"data {self.data!r} is not known; use one of {', '.join(DATA)}.")
        if self.method not in METHODS:
            raise DistilleryError(f"method {self.method!r} is not known; use one of {', '.join(METHODS)}.")
        if self.teacher.source == "exact" and not self.data.startswith("mixture"):
            raise DistilleryError("teacher.source exact is the closed-form mixture; use it with mixture2d or "
                                  "mixture64d, or train a teacher (source: train).")
        if self.teacher.source == "exact" and self.student.init == "teacher" and self.method != "none":
            raise DistilleryError("the exact teacher has no network to copy; set student.init: scratch (and "
                                  "student.net) with teacher.source exact.")
        if self.method == "pd" and self.teacher.prediction == "epsilon" and self.student.init == "teacher":
            raise DistilleryError("progressive distillation cannot train an epsilon-prediction student (x0 is "
                                  "undefined where a -> 0); give the teacher prediction v_prediction or sample.")
        if self.settings.generator == "points" and self.teacher.class_conditional:
            raise DistilleryError("a point set has no labels; use an unconditional teacher with settings.generator: "
                                  "points.")
        if self.settings.generator == "points" and self.settings.generator_steps != 1:
            raise DistilleryError("a point set is a one-step generator; set settings.generator_steps: 1.")
        if self.settings.generator == "points" and (self.method not in ("dmd", "vsd", "sds")
                                                   or not self.data.startswith("mixture")):
            raise DistilleryError("settings.generator points is for dmd, vsd and sds on mixtures.")
        g = self.settings.guidance
        if g and not self.teacher.class_conditional:
            raise DistilleryError("settings.guidance distils classifier-free guidance; set teacher.class_conditional: "
                                  "true.")
        if g and self.method != "cd":
            raise DistilleryError(f"settings.guidance (w as the student's input) is distilled by cd; {self.method} "
                                  "distils a fixed settings.w instead: remove settings.guidance.")
        if g and not self.data.startswith("mixture"):
            raise DistilleryError("settings.guidance gives w to an MLP student (mixtures); for images distil a fixed "
                                  "settings.w instead.")
        if g and (self.settings.w is None or not g[0] <= self.settings.w <= g[1]):
            raise DistilleryError(f"settings.guidance {g} needs settings.w inside it: the scale the student and the "
                                  "teacher are sampled with.")
        segs = self.settings.segments
        if self.method == "hyper_sd" and (not segs or min(segs) < 1 or any(self.settings.solver_steps % k for k in segs)):
            raise DistilleryError(f"hyper_sd needs settings.solver_steps ({self.settings.solver_steps}) divisible by "
                                  f"every segment count {segs} (each segment edge on the solver's grid); e.g. 64.")
        if self.method == "reflow" and self.teacher.class_conditional:
            raise DistilleryError("reflow pairs noise with unconditional teacher samples; use an unconditional teacher "
                                  "(teacher.class_conditional: false) or a method that takes labels (cd, pd, dmd).")
        if self.settings.w is not None and not self.teacher.class_conditional:
            raise DistilleryError("settings.w is a classifier-free guidance scale; set teacher.class_conditional: true.")
        if self.method == "prune":
            self.prune = self.prune or LayerPrune()
            if self.teacher.source == "exact" or self.student.init != "teacher":
                raise DistilleryError("method prune removes layers of the teacher's network; give a network teacher "
                                      "(teacher.source: train or a folder) and student.init: teacher.")
        elif self.prune is not None:
            raise DistilleryError("prune: {...} belongs to method prune; remove it or set method: prune.")
        if self.samples < 2 or self.threads < 1:
            raise DistilleryError("samples must be >= 2 and threads >= 1.")


# --------------------------------------------------------------------------- data and models


def load_data(recipe: DiffusionRecipe):
    """(training TensorData, held-out reference samples, mixture or None)."""
    from ..data.core import TensorData

    if recipe.data.startswith("mixture"):
        from .mixture import named

        mix = named(recipe.data, recipe.seed)
        x, y = mix.sample(recipe.samples, torch.Generator().manual_seed(recipe.seed))
        ref, _ = mix.sample(recipe.eval.samples, torch.Generator().manual_seed(recipe.seed + 10_000))
        return TensorData(x, y, torch.arange(len(x)), mix.num_components, recipe.data), ref, mix
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # [0, 16] -> [-1, 1]
    if recipe.data == "digits32":
        x = torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.long)
    return TensorData(x, y, torch.arange(len(x)), 10, recipe.data), x, None


def build_net(shape: tuple[int, ...], args: dict[str, Any], num_classes: int, guidance: bool):
    from .nets import MLPDenoiser, unet

    if len(shape) == 1:
        kw = {"hidden": 256, "depth": 3, **args}
        return MLPDenoiser(dim=shape[0], num_classes=num_classes, guidance=guidance, **kw)
    if guidance:
        raise DistilleryError("guidance as an input is built into the MLP denoiser only; distil a UNet at a fixed "
                              "settings.w instead of settings.guidance.")
    kw = {"widths": (32, 64), "layers": 1, **args}
    kw["widths"] = tuple(kw["widths"])
    return unet(shape[0], shape[-1], num_classes=num_classes, **kw)


def _fingerprint(recipe: DiffusionRecipe) -> str:
    t = recipe.teacher
    key = {"data": recipe.data, "samples": recipe.samples, "seed": recipe.seed, "process": t.process,
           "prediction": t.prediction, "beta_schedule": t.beta_schedule, "net": t.net,
           "class_conditional": t.class_conditional, "train": to_dict(t.train)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def load_teacher(recipe: DiffusionRecipe, data, mix, rd, progress):
    """(teacher, where it came from: exact | folder | cached | trained, its training seconds or None). A
    trained teacher goes into the cache (with its training time) under a lock: runs that share it train
    it once, the others wait and load it."""
    from ..io import locked_beside
    from .mixture import ExactDenoiser
    from .nets import load_folder

    t = recipe.teacher
    shape = tuple(data.x.shape[1:])
    if t.source == "exact":
        return ExactDenoiser(mix, t.path()), "exact", None
    if t.source != "train":
        model = load_folder(t.source)
        if tuple(model.shape) != shape:
            raise DistilleryError(f"the teacher folder {t.source} makes samples of shape {tuple(model.shape)}, the data "
                                  f"{recipe.data!r} has {shape}; give a teacher for this data.")
        want = data.num_classes if t.class_conditional else 0
        if model.num_classes != want:
            raise DistilleryError(
                f"the teacher folder {t.source} is conditioned on {model.num_classes} classes (distillery's convention: "
                f"a UNet's num_class_embeds is classes + 1, the last one the unconditional label), the recipe on "
                f"{want} ({recipe.data!r}, teacher.class_conditional: {str(t.class_conditional).lower()}); give a "
                "teacher of this data's classes, or set teacher.class_conditional to match.")
        return model.requires_grad_(False), "folder", None
    cache = Path(recipe.runs_dir) / "cache" / "diffusion-teachers" / _fingerprint(recipe)[:16]
    with locked_beside(cache):
        if (cache / "unet" / "diffusion_pytorch_model.safetensors").is_file():
            say(progress, f"teacher: reused from the cache {cache}")
            meta = json.loads((cache / "distillery.json").read_text())
            return load_folder(cache).requires_grad_(False), "cached", meta.get("train_seconds")
        return _train_teacher(recipe, data, shape, cache, rd, progress)


def _train_teacher(recipe: DiffusionRecipe, data, shape, cache: Path, rd, progress):
    """(the trained teacher, "trained", its training seconds), saved into ``cache`` with that time."""
    from .distill import train_teacher
    from .nets import Denoiser, save_folder

    t = recipe.teacher
    t0 = time.perf_counter()
    classes = data.num_classes if t.class_conditional else 0
    torch.manual_seed(recipe.seed)  # the initial weights are the seed's, whatever ran before
    model = Denoiser(build_net(shape, t.net, classes, False), t.path(), shape)
    train_teacher(model, data, t.train, seed=recipe.seed, run_dir=rd.path, resume=rd.resume, progress=progress)
    seconds = time.perf_counter() - t0
    if writer():
        save_folder(model, cache, {"train_seconds": seconds})
    return model.requires_grad_(False), "trained", seconds


def new_student(recipe: DiffusionRecipe, teacher, data, process=None):
    """The student network on the teacher's process (``process``: another one, reflow's flow): a copy of
    the teacher (``student.init: teacher``), or a new network of the teacher's architecture updated by
    ``student.net``; a student that takes the guidance scale w gets the teacher's weights wherever they
    fit (its w embedding starts new)."""
    from .distill import copy_of
    from .nets import Denoiser, MLPDenoiser

    guidance = bool(recipe.settings.guidance)
    if recipe.student.init == "teacher":
        if process is not None and process.kind != teacher.process.kind:
            raise DistilleryError(f"{recipe.method} trains a {process.kind} student, but the teacher is "
                                  f"{teacher.process.kind}; its network cannot be copied: set student.init: scratch, "
                                  f"or teacher.process: {process.kind}.")
        if not guidance or getattr(teacher, "takes_w", False):
            return copy_of(teacher)
    shape = tuple(data.x.shape[1:])
    arch = dict(recipe.teacher.net)
    net_cfg = getattr(getattr(teacher, "net", None), "config", None)
    if isinstance(getattr(teacher, "net", None), MLPDenoiser):  # a folder teacher: its own architecture
        arch = {"hidden": net_cfg.hidden, "depth": net_cfg.depth, "time_scale": net_cfg.time_scale}
    elif net_cfg is not None and hasattr(net_cfg, "block_out_channels"):
        arch = {"widths": list(net_cfg.block_out_channels), "layers": net_cfg.layers_per_block}
    torch.manual_seed(recipe.seed + 1)
    net = build_net(shape, {**arch, **recipe.student.net}, teacher.num_classes if recipe.teacher.class_conditional
                    else 0, guidance)
    if recipe.student.init == "teacher":
        try:
            net.load_state_dict(teacher.net.state_dict(), strict=False)
        except RuntimeError as e:
            raise DistilleryError(f"student.net does not fit the teacher's weights ({str(e).splitlines()[0]}); drop "
                                  "student.net, or set student.init: scratch.") from None
    return Denoiser(net, process or teacher.process, shape)


# --------------------------------------------------------------------------- the run


def distil(recipe: DiffusionRecipe, teacher, data, rd, progress) -> list[tuple[str, int, Any, float]]:
    """The method's students: (label, steps, model, seconds) for every step count it samples with."""
    from . import distill as D
    from .distill import copy_of
    from .methods import PointSet
    from .process import Process

    s, m = recipe.settings, recipe.method
    common = dict(train=recipe.student.train, seed=recipe.seed, run_dir=rd.path, resume=rd.resume, progress=progress)
    labels = data.y if recipe.teacher.class_conditional else None
    t0 = time.perf_counter()
    out: list[tuple[str, int, Any, float]] = []
    if m == "pd":
        students = D.progressive(teacher, data, new_student(recipe, teacher, data), start=s.pd_start, w=s.w, **common)
        out = [(m, k, st, time.perf_counter() - t0) for k, st in sorted(students.items()) if k in recipe.eval.steps]
    elif m == "cd":
        st = D.consistency(teacher, new_student(recipe, teacher, data), data, solver_steps=s.solver_steps,
                           ema_decay=s.ema_decay, loss=s.loss, huber_c=s.huber_c,
                           guidance=tuple(s.guidance) if s.guidance else None, w=s.w, **common)
        out = [(m, k, st, time.perf_counter() - t0) for k in recipe.eval.steps]
    elif m == "hyper_sd":
        students = D.hyper_sd(teacher, new_student(recipe, teacher, data), data, segments=tuple(s.segments),
                              solver_steps=s.solver_steps, ema_decay=s.ema_decay, loss=s.loss, huber_c=s.huber_c,
                              w=s.w, **common)
        out = [(m, k, st, time.perf_counter() - t0) for k, st in sorted(students.items()) if k in recipe.eval.steps]
    elif m == "reflow":
        flow = teacher.process if teacher.process.kind == "flow" else Process("flow", "flow")
        student = new_student(recipe, teacher, data, flow)
        rf, one = D.reflow(teacher, student, s.pairs, rd.path / "teacher-pairs", pair_steps=s.pair_steps,
                           distill_train=s.one_step, **common)
        secs = time.perf_counter() - t0
        out = [(m, k, rf, secs) for k in recipe.eval.steps]
        if one is not None:  # InstaFlow's one-step student, distilled from the 2-rectified flow
            out.append(("reflow_distill", 1, one, time.perf_counter() - t0))
    elif m == "prune":  # LAPTOP-Diff: one-shot layer pruning, then recovery; sampled like the teacher
        from ..runtime import resolve_device
        from .prune import prune, recover

        teacher.to(resolve_device(recipe.student.train.device))  # the calibration forwards run where training does
        pruned, report = prune(teacher, data, recipe.prune, recipe.seed, record=rd.path / "prune.json")
        say(progress, f"prune: removed {', '.join(report['removed'])} ({report['params_removed']:,} of "
                      f"{report['params_before']:,} parameters); output loss {report['output_loss']:.4g} (sum of the "
                      f"layers' own: {report['sum_of_layer_losses']:.4g})")
        secs = time.perf_counter() - t0
        pruned.notes = {k: report[k] for k in ("removed", "output_loss", "sum_of_layer_losses", "criterion")}
        student = recover(teacher, copy_of(pruned), data, recipe.prune, report["removed"], recipe.student.train,
                          **{k: v for k, v in common.items() if k != "train"})
        student.notes = pruned.notes
        secs2 = time.perf_counter() - t0
        out = [("pruned", k, pruned.eval(), secs) for k in recipe.eval.teacher_steps]
        out += [(m, k, student, secs2) for k in recipe.eval.teacher_steps]
    elif m in ("dmd", "vsd", "sds"):
        if s.generator == "points":
            init = torch.randn(s.points, *data.x.shape[1:], generator=torch.Generator().manual_seed(recipe.seed + 1))
            gen, n = PointSet(init), s.points
        else:
            gen, n = new_student(recipe, teacher, data), len(data)
        fake = None if m == "sds" else new_student(recipe, teacher, data)
        g = D.score_distill(teacher, gen, m, n, fake=fake, ratio=s.ratio if m != "sds" else 1,
                            labels=labels[:n] if labels is not None and s.generator != "points" else None, w=s.w,
                            steps=s.generator_steps, **common)
        secs = time.perf_counter() - t0
        out = [(m, k, g, secs) for k in recipe.eval.steps if s.generator_steps % k == 0] or [(m, 1, g, secs)]
    return out


def _samples(model, steps: int, n: int, recipe: DiffusionRecipe, labels) -> tuple[torch.Tensor, float]:
    from .methods import PointSet
    from .sample import sample

    t0 = time.perf_counter()
    if isinstance(model, PointSet):
        x = model.points.detach().clone()
    else:
        x = sample(model, steps, n, seed=recipe.seed + 1, class_labels=labels, w=recipe.settings.w)
    return x, n / max(time.perf_counter() - t0, 1e-9)


def measure(x: torch.Tensor, ref: torch.Tensor, mix, fid_net, labels) -> dict[str, Any]:
    from . import metrics as M

    x = torch.nan_to_num(x, nan=0.0, posinf=1e6, neginf=-1e6)
    row: dict[str, Any] = {"swd": M.swd(x, ref), "energy": M.energy(x, ref)}
    if mix is not None:
        row.update(loglik=M.loglik(mix, x), coverage=M.coverage(mix, x))
    else:
        x, ref = _as8(x), _as8(ref)  # the FID classifier reads 8x8 digits
        row.update(fid=M.fid(fid_net, x, ref), coverage=None, **M.classifier(fid_net, x, labels))
    return row


def _size(model) -> dict[str, int]:
    """The network's parameter count (none for the exact teacher, which has no network)."""
    from ..models import num_params

    n = num_params(model)
    return {"params": n} if n else {}


def _as8(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[-1] == 8 else torch.nn.functional.adaptive_avg_pool2d(x, 8)


def run(recipe: DiffusionRecipe, rd, *, progress: bool | None = None) -> list[dict[str, Any]]:
    from .methods import PointSet
    from .nets import Denoiser, save_folder

    data, ref, mix = load_data(recipe)
    say(progress, f"diffusion: {recipe.data}, {len(data)} training samples of shape {tuple(data.x.shape[1:])}; "
                   f"method {recipe.method}")
    teacher, origin, teacher_secs = load_teacher(recipe, data, mix, rd, progress)
    students = distil(recipe, teacher, data, rd, progress) if recipe.method != "none" else []
    saved: dict[int, list[int]] = {}
    for _, steps, model, _ in students:
        saved.setdefault(id(model), []).append(steps)
    for label, steps, model, _ in students:
        ks = saved.pop(id(model), None)
        if ks is None:  # one model sampled at several step counts is saved once
            continue
        folder = label if len(ks) > 1 else f"{label}-{steps}step"
        if writer() and isinstance(model, Denoiser):
            save_folder(model, rd.models / folder, {"method": recipe.method, "steps": ks})
        elif writer() and isinstance(model, PointSet):
            from ..pipeline import save_weights

            save_weights(model, rd.models / f"{label}-points.safetensors", {"method": recipe.method, "data": recipe.data})
    if not recipe.eval.enabled:
        return [{"method": label, "data": recipe.data, "steps": k, "seconds": secs} for label, k, _, secs in students]

    n = recipe.eval.samples
    labels = None
    if recipe.teacher.class_conditional:
        labels = torch.arange(n) % data.num_classes
    fid_net = None
    if mix is None:
        from .metrics import train_features

        fid_net = train_features(_as8(data.x), data.y, seed=recipe.seed)
    rows, shown = [], {}
    entries = [("teacher", k, teacher, teacher_secs) for k in recipe.eval.teacher_steps]
    entries += students
    for label, k, model, secs in entries:
        x, rate = _samples(model, k, n, recipe, labels)
        row = {"method": label, "data": recipe.data, "steps": k, **measure(x, ref, mix, fid_net, labels),
               "samples_per_s": rate, "seconds": secs, **_size(model), **getattr(model, "notes", {})}
        if label == "teacher":
            row["teacher"] = origin
        rows.append(row)
        shown[(label, k)] = x[:min(len(x), 400 if mix is not None else 40)]
        say(progress, f"{label} {k} step(s): " + ", ".join(f"{key} {v:.4g}" for key, v in row.items()
                                                          if isinstance(v, float) and key != "seconds"))
    if writer():
        from .report import plot_metrics, plot_samples, plot_size

        plot_samples(rd.figure("samples.png", "Samples per step count: the teacher and each student"), shown, ref, mix)
        plot_metrics(rd.figure("metrics.png", "Each metric against the number of sampling steps"), rows)
        if recipe.method == "prune":
            plot_size(rd.figure("size.png", "Quality against size: the teacher, the pruned network before and after "
                                            "recovery"), rows)
    return rows


def validate(recipe: DiffusionRecipe) -> None:
    if recipe.teacher.source not in ("exact", "train"):
        from .nets import load_folder

        load_folder(recipe.teacher.source)


