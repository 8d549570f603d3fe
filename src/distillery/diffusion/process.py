"""Noising processes, prediction types and the deterministic sampler shared by every diffusion method.

Both processes are Gaussian paths ``x_tau = a(tau) x0 + s(tau) eps`` over a time ``tau`` in [0, 1]
(0 clean, 1 the prior), so one set of formulas serves them:

- ``vp``: DDPM's discrete variance-preserving schedule (``num_train_timesteps`` betas, ``linear`` or
  ``squaredcos_cap_v2`` as diffusers computes them); ``a = sqrt(alpha_bar)``, ``s = sqrt(1 - alpha_bar)``.
  The model's timestep is the DDPM index ``tau * T - 1`` (so tau = 1 is index T - 1 and tau = 0 is the
  clean end, alpha_bar = 1, as DDIM's ``set_alpha_to_one``); between indices log alpha_bar is
  interpolated. A grid of n steps is diffusers' ``trailing`` spacing (T - 1, T - 1 - T/n, ...).
- ``flow``: rectified flow / flow matching, ``a = 1 - tau``, ``s = tau``; the model's timestep is
  ``tau * T`` as diffusers' ``FlowMatchEulerDiscreteScheduler`` feeds it.

Prediction types (what a network outputs): ``epsilon``, ``sample`` (x0), ``v_prediction``
(``a eps - s x0``, Salimans & Ho 2022; vp only) and ``flow`` (the velocity ``eps - x0``; flow only).
``ddim_step`` moves ``x_tau`` to ``tau'`` with a prediction's (x0, eps): DDIM (eta = 0) for vp, and
exactly the Euler step of the flow ODE for flow, so one sampler serves both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import DistilleryError

PREDICTIONS = {"vp": ("epsilon", "sample", "v_prediction"), "flow": ("flow", "sample", "epsilon")}


def betas_for(schedule: str, steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """The beta schedule as diffusers' DDPMScheduler computes it (float64)."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    if schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine schedule, betas capped at 0.999

        def bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1 - bar((i + 1) / steps) / bar(i / steps), 0.999) for i in range(steps)],
                            dtype=torch.float64)
    raise DistilleryError(f"beta schedule {schedule!r} is not known; use linear or squaredcos_cap_v2.")


@dataclass(frozen=True)
class Process:
    kind: str = "vp"
    """``vp`` (DDPM / DDIM) or ``flow`` (rectified flow)."""
    prediction: str = "epsilon"
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        if self.kind not in PREDICTIONS:
            raise DistilleryError(f"process {self.kind!r} is not known; use vp or flow.")
        if self.prediction not in PREDICTIONS[self.kind]:
            raise DistilleryError(f"a {self.kind} process cannot use prediction {self.prediction!r}; use one of "
                                  f"{', '.join(PREDICTIONS[self.kind])}.")
        if self.num_train_timesteps < 2:
            raise DistilleryError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}.")
        if self.kind == "vp":
            bar = torch.cumprod(1 - betas_for(self.beta_schedule, self.num_train_timesteps, self.beta_start,
                                              self.beta_end), 0)
            object.__setattr__(self, "_log_bar", torch.cat([torch.zeros(1, dtype=torch.float64), bar.log()]))

    # ---------------------------------------------------------------- coefficients
    def coef(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        """(a, s) at ``tau`` (any shape), float32 on tau's device."""
        tau = torch.as_tensor(tau, dtype=torch.float64)
        if self.kind == "flow":
            a, s = 1 - tau, tau
        else:  # index tau*T - 1 in [-1, T-1]; position 0 of _log_bar is the clean end (alpha_bar = 1)
            pos = (tau.clamp(0, 1) * self.num_train_timesteps).cpu()
            lo = pos.floor().clamp(max=self.num_train_timesteps - 1).long()
            frac = pos - lo
            log_bar = self._log_bar[lo] * (1 - frac) + self._log_bar[(lo + 1).clamp(max=self.num_train_timesteps)] * frac
            bar = log_bar.exp().to(tau.device)
            a, s = bar.sqrt(), (1 - bar).clamp(min=0).sqrt()
        return a.float(), s.float()

    def timestep(self, tau: Tensor) -> Tensor:
        """The network's timestep input at ``tau`` (the DDPM index for vp, ``tau * T`` for flow)."""
        tau = torch.as_tensor(tau, dtype=torch.float32)
        t = tau * self.num_train_timesteps
        return t - 1 if self.kind == "vp" else t

    def grid(self, steps: int) -> list[float]:
        """``steps + 1`` times from the prior (1) to clean (0), evenly spaced (diffusers' trailing spacing)."""
        if steps < 1:
            raise DistilleryError(f"the number of sampling steps must be at least 1, got {steps}.")
        return [1 - i / steps for i in range(steps)] + [0.0]

    def train_tau(self, n: int, generator: torch.Generator, device=None) -> Tensor:
        """Training times: a uniform DDPM index for vp, uniform in (0, 1] for flow."""
        if self.kind == "vp":
            idx = torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=device)
            return (idx.float() + 1) / self.num_train_timesteps
        return torch.rand(n, generator=generator, device=device).clamp(min=1e-3)

    # ---------------------------------------------------------------- predictions
    def to_x0_eps(self, pred: Tensor, x: Tensor, tau: Tensor, prediction: str | None = None) -> tuple[Tensor, Tensor]:
        """(x0, eps) implied by a network output ``pred`` of type ``prediction`` at (x, tau)."""
        kind = prediction or self.prediction
        a, s = (_expand(c, x) for c in self.coef(tau))
        if kind == "epsilon":
            return (x - s * pred) / a.clamp(min=1e-4), pred
        if kind == "sample":
            return pred, (x - a * pred) / s.clamp(min=1e-4)
        if kind == "v_prediction":  # a^2 + s^2 = 1
            return a * x - s * pred, s * x + a * pred
        if kind == "flow":  # a + s = 1: x0 = x - s u, eps = x + a u
            return x - s * pred, x + a * pred
        raise DistilleryError(f"prediction type {kind!r} is not known; use one of epsilon, sample, v_prediction, flow.")

    def from_x0_eps(self, x0: Tensor, eps: Tensor, tau: Tensor, prediction: str | None = None) -> Tensor:
        """The network output of type ``prediction`` that means (x0, eps) at tau."""
        kind = prediction or self.prediction
        a, s = (_expand(c, x0) for c in self.coef(tau))
        return {"epsilon": lambda: eps, "sample": lambda: x0, "v_prediction": lambda: a * eps - s * x0,
                "flow": lambda: eps - x0}[kind]()

    def noise(self, x0: Tensor, eps: Tensor, tau: Tensor) -> Tensor:
        a, s = (_expand(c, x0) for c in self.coef(tau))
        return a * x0 + s * eps

    def ddim_step(self, x0: Tensor, eps: Tensor, tau_to: Tensor | float) -> Tensor:
        """x at ``tau_to`` on the deterministic path through (x0, eps): DDIM (eta = 0) / the flow's Euler step."""
        tau_to = torch.as_tensor(tau_to, device=x0.device).expand(x0.shape[0]) if not isinstance(tau_to, Tensor) \
            or tau_to.dim() == 0 else tau_to
        return self.noise(x0, eps, tau_to)

    def config(self) -> dict:
        return {"kind": self.kind, "prediction": self.prediction, "num_train_timesteps": self.num_train_timesteps,
                "beta_schedule": self.beta_schedule, "beta_start": self.beta_start, "beta_end": self.beta_end}


def _expand(c: Tensor, like: Tensor) -> Tensor:
    c = c.to(like.device)
    if c.dim() == 0:
        return c
    return c.reshape(c.shape[0], *([1] * (like.dim() - 1)))


def full(tau: float | Tensor, n: int, device=None) -> Tensor:
    """``tau`` as a (n,) tensor."""
    return torch.full((n,), float(tau), device=device)
