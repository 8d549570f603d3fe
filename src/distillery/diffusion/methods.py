"""Step distillation methods as engine tasks: each ``prepare(batch, epoch=...)`` draws times and noise
(seeded by (seed, epoch, sample ids), so a resumed run repeats them), asks the teacher under no_grad,
and returns the student's inputs (``x``, ``tau``, ``class_labels``, ``w``) and its regression
``target``; the objective's ``diffusion_l2`` / ``pseudo_huber`` term compares them. The student the
engine trains is the module each method names (the denoiser, its consistency function, or a
generator paired with a fake-score model).

- ``DenoiseTask``: the teacher's own training (DDPM epsilon / v, flow matching), label dropout for CFG.
- ``ProgressiveTask``: Salimans & Ho 2022. The student takes one step where the teacher takes two
  DDIM steps: from z at tau, with z'' the teacher's two steps to tau - 2/N, the target
  x~ = (z'' - (s''/s) z) / (a'' - (s''/s) a), expressed in the student's prediction type (v-prediction
  gives the paper's SNR+1 weighting of the x error). Epsilon prediction is refused (the paper's
  reason: it is undefined at tau = 1 on a zero-terminal-SNR path).
- ``ConsistencyTask``: consistency distillation (Song et al. 2023) as LCM does it: a skipping-step
  grid of ``solver_steps``, one teacher DDIM step from tau_{n+1} to tau_n, the target f_ema(x_n, tau_n)
  of an EMA copy, classifier-free guidance with w drawn per sample and given to the student as an
  input. ``segments`` > 0 is Hyper-SD's trajectory-segmented consistency: f maps to the lower edge of
  its segment (a DDIM jump, as TCD / Hyper-SD parametrise it), identity on a segment edge.
- ``ReflowTask``: rectified flow on (noise, teacher sample) pairs read from the teacher-output store
  by id (Liu et al. 2023); ``one_step`` trains at tau = 1 only (InstaFlow's distillation, L2).
- ``ScoreTask``: distribution matching and score distillation into a generator: ``dmd`` (Yin et al.
  2024; DMD2's two-time-scale rule: the generator steps every ``ratio``-th step, the fake score every
  step), ``vsd`` (ProlificDreamer / SwiftBrush: the same fake-score difference, unnormalised) and
  ``sds`` (DreamFusion: the teacher against the injected noise). DMD2's GAN term and DMD1's regression
  loss on teacher pairs are not built: the distribution-matching gradient alone. The gradient at the generator's
  sample x: DMD's (x0_fake - x0_real) / mean|x - x0_real|; VSD's eps_real - eps_fake and SDS's
  eps_real - eps, both with the weight w(t) = 1 (written in x0 terms: (a/s)(x0_fake - x0_real) and
  (a/s)(x - x0_real); DreamFusion's and ProlificDreamer's image experiments weight by sigma_t^2 instead,
  which damps the small-noise end this keeps); the generator regresses onto sg(x - grad).
"""

from __future__ import annotations

import copy
import hashlib

import torch
from torch import Tensor, nn

from ..callbacks import Callback
from ..errors import DistilleryError
from .nets import guided
from .process import Process, _expand, full
from .sample import consistency_x0


def model_signature(model: nn.Module | None) -> str | None:
    """A short fingerprint of a teacher the task asks: ``store.model_fingerprint`` of its tensors with its
    process (and, for the exact teacher, which has no tensors, its mixture) as the config."""
    if model is None:
        return None
    from ..store import model_fingerprint

    mix = getattr(model, "mixture", None)
    config = {"process": model.process.config(),
              "mixture": None if mix is None else [mix.means.tolist(), mix.stds.tolist(), mix.weights.tolist()]}
    return model_fingerprint(model, config)[:16]


def fixed_w(w: float | None, labels: Tensor | None, n: int, device) -> Tensor | None:
    """A fixed guidance scale as a per-sample tensor, for a class-conditional batch (else None)."""
    return None if w is None or labels is None else torch.full((n,), float(w), device=device)


def require_flow(process: Process) -> None:
    if process.kind != "flow":
        raise DistilleryError("reflow trains a rectified-flow student; set the student's process to flow.")


def seeded(seed: int, epoch: int, ids: Tensor, salt: str = "") -> torch.Generator:
    key = hashlib.sha256(f"{salt}:{seed}:{epoch}:{ids.tolist()}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))


def _randn(shape, g: torch.Generator, device) -> Tensor:
    return torch.randn(shape, generator=g).to(device)


def _rand(n: int, g: torch.Generator, device) -> Tensor:
    return torch.rand(n, generator=g).to(device)


def same_path(student: Process, teacher: Process, method: str) -> None:
    """A student noised on the teacher's path: the same process kind, timestep count and schedule (the
    prediction type may differ)."""
    keys = ("kind", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end")
    differ = [k for k in keys if getattr(student, k) != getattr(teacher, k) and (student.kind == "vp" or k in keys[:2])]
    if differ:
        raise DistilleryError(f"{method}: the student's process differs from the teacher's in {', '.join(differ)} "
                              f"({student.config()} against {teacher.config()}); build the student on the teacher's "
                              "process (only the prediction type may differ).")


class _Task:
    def __init__(self, student_process: Process, seed: int, num_classes: int = 0, guidance: tuple[float, float] | None = None):
        self.process, self.seed, self.num_classes, self.guidance = student_process, int(seed), num_classes, guidance

    def inputs(self) -> list[str]:
        return ["x", "tau"] + (["class_labels"] if self.num_classes else []) + (["w"] if self.guidance else [])

    def signature(self) -> dict:
        """What a resumed run must share (the engine compares it): the method, its settings, the teacher."""
        keep = (int, float, str, bool, tuple, type(None))
        settings = {k: v for k, v in vars(self).items() if isinstance(v, keep) and k != "seed"}
        return {"task": type(self).__name__, **settings, "process": self.process.config(),
                "teacher": model_signature(getattr(self, "teacher", None))}

    def _cond(self, batch: dict, out: dict, g: torch.Generator, drop: float = 0.0) -> tuple[Tensor | None, Tensor | None]:
        labels = ws = None
        if self.num_classes:
            if "y" not in batch:
                raise DistilleryError("a class-conditional model needs labelled data (y); give labels or set "
                                      "num_classes: 0.")
            labels = batch["y"].clone()
            if drop:
                labels[_rand(len(labels), g, labels.device) < drop] = self.num_classes
            out["class_labels"] = labels
        if self.guidance:
            lo, hi = self.guidance
            ws = lo + (hi - lo) * _rand(len(batch["id"]), g, batch["id"].device)
            out["w"] = ws
        return labels, ws


class DenoiseTask(_Task):
    """The denoising objective: x = a x0 + s eps at a training time, target the prediction of (x0, eps)."""

    def __init__(self, process: Process, seed: int, num_classes: int = 0, label_dropout: float = 0.1):
        super().__init__(process, seed, num_classes)
        self.label_dropout = label_dropout

    def prepare(self, batch: dict, *, epoch: int) -> dict:
        x0 = batch["x"]
        g = seeded(self.seed, epoch, batch["id"], "denoise")
        tau = self.process.train_tau(len(x0), g).to(x0.device)
        eps = _randn(x0.shape, g, x0.device)
        out = {"id": batch["id"], "x": self.process.noise(x0, eps, tau), "tau": tau,
               "target": self.process.from_x0_eps(x0, eps, tau)}
        self._cond(batch, out, g, self.label_dropout)
        return out


class ProgressiveTask(_Task):
    def __init__(self, teacher: nn.Module, process: Process, teacher_steps: int, seed: int, num_classes: int = 0,
                 w: float | None = None):
        if process.prediction == "epsilon":
            raise DistilleryError("progressive distillation cannot train an epsilon-prediction student (x0 = "
                                  "(z - s eps) / a is undefined where a -> 0); use prediction v_prediction or sample "
                                  "(Salimans & Ho 2022, section 4).")
        if teacher_steps < 2 or teacher_steps & (teacher_steps - 1):
            raise DistilleryError(f"progressive distillation halves the step count each round; the teacher's step "
                                  f"count must be a power of two >= 2, got {teacher_steps}.")
        same_path(process, teacher.process, "progressive distillation")
        super().__init__(process, seed, num_classes)
        self.teacher, self.N, self.w = teacher, int(teacher_steps), w

    @torch.no_grad()
    def targets(self, z: Tensor, tau: Tensor, labels: Tensor | None = None) -> Tensor:
        """x~: the x0 whose single DDIM step from (z, tau) lands where the teacher's two steps land."""
        p, n = self.teacher.process, len(z)
        ws = fixed_w(self.w, labels, n, z.device)
        mid, end = tau - 1 / self.N, tau - 2 / self.N
        x0, eps = guided(self.teacher, z, tau, labels, ws, p)
        z1 = p.ddim_step(x0, eps, mid)
        x0, eps = guided(self.teacher, z1, mid, labels, ws, p)
        z2 = p.ddim_step(x0, eps, end)
        a, s = (_expand(c, z) for c in self.process.coef(tau))
        a2, s2 = (_expand(c, z) for c in self.process.coef(end))
        r = s2 / s
        return (z2 - r * z) / (a2 - r * a)

    def prepare(self, batch: dict, *, epoch: int) -> dict:
        x0 = batch["x"]
        g = seeded(self.seed, epoch, batch["id"], "pd")
        i = torch.randint(1, self.N // 2 + 1, (len(x0),), generator=g).to(x0.device)
        tau = 2 * i.float() / self.N
        eps = _randn(x0.shape, g, x0.device)
        z = self.process.noise(x0, eps, tau)
        out = {"id": batch["id"], "x": z, "tau": tau}
        labels, _ = self._cond(batch, out, g)
        x_t = self.targets(z, tau, labels)
        a, s = (_expand(c, z) for c in self.process.coef(tau))
        out["target"] = self.process.from_x0_eps(x_t, (z - a * x_t) / s, tau)
        return out


class ConsistencyFn(nn.Module):
    """The consistency function of a denoiser: LCM's c_skip x + c_out x0_hat (``segments`` = 0), or
    Hyper-SD's DDIM jump to the lower edge of the segment holding tau (``segments`` = S)."""

    def __init__(self, denoiser: nn.Module, segments: int = 0):
        super().__init__()
        self.denoiser, self.segments = denoiser, int(segments)

    def edge(self, tau: Tensor) -> Tensor:
        S = self.segments
        return ((tau * S - 1e-4).ceil().clamp(min=1) - 1) / S

    def forward(self, x: Tensor, tau: Tensor, class_labels: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        d = self.denoiser
        x0, eps = d.process.to_x0_eps(d(x, tau, class_labels, w), x, tau)
        if self.segments:
            return d.process.ddim_step(x0, eps, self.edge(tau))
        return consistency_x0(d.process, x, tau, x0)


class EMA(Callback):
    """target <- mu target + (1 - mu) online, after every optimizer step (the consistency target network)."""

    def __init__(self, target: nn.Module, online: nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise DistilleryError(f"ema decay must lie in [0, 1), got {decay}.")
        self.target, self.online, self.decay = target, online, decay

    @torch.no_grad()
    def on_step(self, state, record) -> None:
        for t, o in zip(self.target.parameters(), self.online.parameters()):
            t.lerp_(o, 1 - self.decay)


class ConsistencyTask(_Task):
    def __init__(self, teacher: nn.Module, fn: ConsistencyFn, solver_steps: int, seed: int, num_classes: int = 0,
                 guidance: tuple[float, float] | None = None, ema_decay: float = 0.95, w: float | None = None):
        same_path(fn.denoiser.process, teacher.process, "consistency distillation")
        super().__init__(fn.denoiser.process, seed, num_classes, guidance)
        self.w = w  # a fixed guidance scale of the teacher, distilled into a student that does not take w
        if fn.segments and solver_steps % fn.segments:
            raise DistilleryError(f"segmented consistency needs solver_steps ({solver_steps}) divisible by the segment "
                                  f"count ({fn.segments}).")
        if guidance and not getattr(fn.denoiser, "takes_w", False):
            raise DistilleryError("guidance distillation gives the student w as an input; build the student with "
                                  "guidance: true (an MLP denoiser), or distil at a fixed w.")
        self.teacher, self.N = teacher, int(solver_steps)
        self.fn = fn
        self.ema = copy.deepcopy(fn).requires_grad_(False)
        self.callback = EMA(self.ema, fn, ema_decay)

    def prepare(self, batch: dict, *, epoch: int) -> dict:
        x0 = batch["x"]
        g = seeded(self.seed, epoch, batch["id"], "cd")
        n = len(x0)
        i = torch.randint(0, self.N, (n,), generator=g).to(x0.device)
        lo, hi = i.float() / self.N, (i.float() + 1) / self.N
        eps = _randn(x0.shape, g, x0.device)
        z = self.process.noise(x0, eps, hi)
        out = {"id": batch["id"], "x": z, "tau": hi}
        labels, ws = self._cond(batch, out, g)
        with torch.no_grad():
            p = self.teacher.process
            tw = ws if ws is not None else fixed_w(self.w, labels, n, z.device)
            tx0, teps = guided(self.teacher, z, hi, labels, tw, p)
            z_lo = p.ddim_step(tx0, teps, lo)
            self.ema.eval()
            target = self.ema(z_lo, lo, labels, ws)
            if self.fn.segments:  # identity on a segment's edge (the boundary condition)
                on_edge = _expand(((lo * self.fn.segments).round() - lo * self.fn.segments).abs() < 1e-6, z)
                target = torch.where(on_edge, z_lo, target)
        out["target"] = target
        return out


class ReflowTask(_Task):
    """2-rectified flow on stored (noise, sample) pairs; ``one_step``: InstaFlow's distillation at tau = 1."""

    def __init__(self, process: Process, pairs, shape: tuple[int, ...], seed: int, one_step: bool = False):
        require_flow(process)
        super().__init__(process, seed)
        self.pairs, self.shape, self.one_step = pairs, tuple(shape), one_step

    def prepare(self, batch: dict, *, epoch: int) -> dict:
        z = batch["x"].reshape(-1, *self.shape)
        x1 = self.pairs.lookup(batch["id"].cpu())["logits"].to(z.device).reshape(z.shape)
        g = seeded(self.seed, epoch, batch["id"], "reflow")
        tau = full(1.0, len(z), z.device) if self.one_step else _rand(len(z), g, z.device).clamp(min=1e-3)
        return {"id": batch["id"], "x": self.process.noise(x1, z, tau), "tau": tau,
                "target": self.process.from_x0_eps(x1, z, tau)}


class PointSet(nn.Module):
    """A parametric generator that is a set of points: ``forward(ids)`` returns rows ``ids`` (SDS / VSD
    into particles, ProlificDreamer's setting on the mixture)."""

    def __init__(self, init: Tensor):
        super().__init__()
        self.points = nn.Parameter(init.clone())

    def forward(self, ids: Tensor) -> Tensor:
        return self.points[ids]


class ScorePair(nn.Module):
    """What the engine trains for score distillation: a generator (a one-step ``Denoiser`` read at
    tau = 1, or a ``PointSet``) and, for vsd / dmd, the fake-score model ``fake`` (tapped as ``fake``).
    ``updates`` counts optimiser steps (a buffer advanced by ``ScoreTask.callback`` after each step, so
    every micro-batch of a step shares its rhythm and a resumed run keeps DMD2's two-time-scale rule)."""

    def __init__(self, generator: nn.Module, fake: nn.Module | None):
        super().__init__()
        self.generator, self.fake = generator, fake
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def generate(self, z: Tensor, ids: Tensor, tau: Tensor | None = None, class_labels: Tensor | None = None) -> Tensor:
        """The generator's sample: the points ``ids``, or its x0 prediction from z at tau (default 1)."""
        if isinstance(self.generator, PointSet):
            return self.generator(ids)
        tau = full(1.0, len(z), z.device) if tau is None else tau
        return self.generator.x0_eps(z, tau, class_labels)[0]

    def forward(self, z: Tensor, ids: Tensor, gen_step: Tensor, tau: Tensor | None = None, fake_x: Tensor | None = None,
                fake_tau: Tensor | None = None, class_labels: Tensor | None = None) -> Tensor:
        if self.fake is not None:
            self.fake(fake_x, fake_tau, class_labels)  # recorded by the tap "fake"
        if bool(gen_step):
            return self.generate(z, ids, tau, class_labels)
        return torch.zeros(z.shape if not isinstance(self.generator, PointSet) else
                           (len(ids), *self.generator.points.shape[1:]), device=z.device)


class ScoreTask:
    def __init__(self, teacher: nn.Module, pair: ScorePair, mode: str, seed: int, shape: tuple[int, ...],
                 ratio: int = 1, tau_range: tuple[float, float] = (0.02, 0.98), num_classes: int = 0,
                 w: float | None = None, steps: int = 1):
        if mode not in ("dmd", "vsd", "sds"):
            raise DistilleryError(f"score distillation mode {mode!r} is not known; use dmd, vsd or sds.")
        if (pair.fake is None) != (mode == "sds"):
            raise DistilleryError(f"{mode} {'needs' if mode != 'sds' else 'takes no'} fake-score model.")
        if ratio < 1:
            raise DistilleryError(f"the two-time-scale ratio must be >= 1, got {ratio}.")
        self.teacher, self.pair, self.mode, self.seed, self.shape = teacher, pair, mode, int(seed), tuple(shape)
        if steps < 1 or (steps > 1 and isinstance(pair.generator, PointSet)):
            raise DistilleryError(f"a generator's step count must be >= 1 (1 for a point set), got {steps}.")
        self.ratio, self.tau_range, self.num_classes, self.w = int(ratio), tau_range, num_classes, w
        self.steps = int(steps)
        if pair.fake is not None:
            same_path(pair.fake.process, teacher.process, f"{mode}'s fake score")
        if isinstance(pair.generator, nn.Module) and hasattr(pair.generator, "process"):
            same_path(pair.generator.process, teacher.process, f"{mode}'s generator")
        self.callback = _Count(pair)

    def signature(self) -> dict:
        return {"task": "ScoreTask", "mode": self.mode, "ratio": self.ratio, "steps": self.steps,
                "tau_range": list(self.tau_range), "w": self.w, "teacher": model_signature(self.teacher)}

    def inputs(self) -> list[str]:
        keys = ["z", "ids", "gen_step", "tau"] + (["fake_x", "fake_tau"] if self.pair.fake is not None else [])
        return keys + (["class_labels"] if self.num_classes else [])

    def prepare(self, batch: dict, *, epoch: int) -> dict:
        ids = batch["id"]
        device = ids.device
        g = seeded(self.seed, epoch, ids, self.mode)
        n = len(ids)
        z = _randn((n, *self.shape), g, device)
        labels = batch["y"] if self.num_classes else None
        gen_step = bool(int(self.pair.updates) % self.ratio == 0)  # advanced after each optimiser step
        out = {"id": ids, "z": z, "ids": ids, "gen_step": torch.tensor(gen_step), "tau": full(1.0, n, device)}
        if labels is not None:
            out["class_labels"] = labels
        p = self.teacher.process
        with torch.no_grad():
            if self.steps > 1:  # DMD2's backward simulation: the generator's own input at a step of its schedule
                out["z"], out["tau"] = self._simulate(z, ids, labels, g)
            x = self.pair.generate(out["z"], ids, out["tau"], labels)
            lo, hi = self.tau_range
            tau = lo + (hi - lo) * _rand(n, g, device)
            eps = _randn(x.shape, g, device)
            x_t = p.noise(x, eps, tau)
            ws = fixed_w(self.w, labels, n, device)
            real, _ = guided(self.teacher, x_t, tau, labels, ws, p)
            if self.mode == "sds":  # eps_hat - eps = (a / s) (x - x0_real)
                grad = (x - real) * _expand(ratio_as(p, tau), x)
            else:
                fake_model = self.pair.fake
                fake, _ = fake_model.process.to_x0_eps(fake_model(x_t, tau, labels), x_t, tau)
                if self.mode == "dmd":
                    grad = dmd_gradient(x, real, fake)
                else:  # eps_real - eps_fake, in x: (a / s) (x0_fake - x0_real)
                    grad = (fake - real) * _expand(ratio_as(p, tau), x)
            grad = torch.nan_to_num(grad)
            out["target"] = (x - grad) if gen_step else torch.zeros_like(x)
            if self.pair.fake is not None:
                fp = self.pair.fake.process
                f_tau = fp.train_tau(n, g).to(device)
                f_eps = _randn(x.shape, g, device)
                out["fake_x"] = fp.noise(x, f_eps, f_tau)
                out["fake_tau"] = f_tau
                out["fake_target"] = fp.from_x0_eps(x, f_eps, f_tau)
        return out

    @torch.no_grad()
    def _simulate(self, z: Tensor, ids: Tensor, labels: Tensor | None, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """Per sample a step i of the generator's ``steps``-step schedule (tau_i = 1 - i / steps) and its input
        there, made by running the generator from z through steps 0..i-1 (predict x0, renoise to the next
        time with fresh noise): what the generator meets when it samples (Yin et al. 2024b, section 4.5)."""
        n, p = len(z), self.pair.generator.process
        i = torch.randint(0, self.steps, (n,), generator=g).to(z.device)
        x = z.clone()
        for j in range(int(i.max())):
            tau = full(1 - j / self.steps, n, z.device)
            x0 = self.pair.generate(x, ids, tau, labels)
            nxt = p.noise(x0, _randn(x.shape, g, z.device), full(1 - (j + 1) / self.steps, n, z.device))
            x = torch.where(_expand(i > j, x), nxt, x)
        return x, 1 - i.float() / self.steps


class _Count(Callback):
    """Advances a ``ScorePair``'s step counter after each optimiser step."""

    def __init__(self, pair: ScorePair):
        self.pair = pair

    @torch.no_grad()
    def on_step(self, state, record) -> None:
        self.pair.updates += 1


def ratio_as(process: Process, tau: Tensor) -> Tensor:
    """a / s at tau: the factor between an epsilon difference and the x0 difference it implies."""
    a, s = process.coef(tau)
    return a / s.clamp(min=1e-4)


def dmd_gradient(x: Tensor, real_x0: Tensor, fake_x0: Tensor) -> Tensor:
    """DMD's generator gradient at samples x: (x0_fake - x0_real) / mean|x - x0_real| per sample."""
    norm = (x - real_x0).abs().flatten(1).mean(1).clamp(min=1e-8)
    return (fake_x0 - real_x0) / _expand(norm, x)
