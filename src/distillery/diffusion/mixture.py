"""A Gaussian mixture as an exact diffusion teacher.

Data ``x0 ~ sum_k pi_k N(mu_k, sigma_k^2 I)``. Noised by ``x = a x0 + s eps`` every marginal is again a
mixture, ``sum_k pi_k N(a mu_k, (a^2 sigma_k^2 + s^2) I)``, so the posterior mean E[x0 | x], the score,
epsilon, v and the flow velocity are closed form (``ExactDenoiser``), and the exact log-likelihood of
samples is a metric. For one component the probability-flow ODE itself is closed form
(``gaussian_flow``): each point keeps its standardised offset ``(x - a mu) / sqrt(a^2 sigma^2 + s^2)``.
Class labels are component indices; label ``K`` (the count) is "unconditional".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import DistilleryError
from .process import Process, _expand


class GaussianMixture:
    def __init__(self, means: Tensor, stds: Tensor | float, weights: Tensor | None = None, name: str = "mixture"):
        self.means = torch.as_tensor(means, dtype=torch.float32)
        if self.means.dim() != 2:
            raise DistilleryError(f"mixture means must be (K, D), got shape {tuple(self.means.shape)}.")
        k = len(self.means)
        self.stds = torch.as_tensor(stds, dtype=torch.float32).expand(k).clone()
        self.weights = torch.full((k,), 1 / k) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        if (self.stds <= 0).any() or (self.weights < 0).any() or abs(float(self.weights.sum()) - 1) > 1e-4:
            raise DistilleryError("mixture stds must be > 0 and weights non-negative summing to 1.")
        self.name = name

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return len(self.means)

    def sample(self, n: int, generator: torch.Generator | None = None, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(x0 (n, D), component labels (n,))."""
        if labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator)
        return self.means[labels] + self.stds[labels, None] * noise, labels

    def _parts(self, x: Tensor, a: Tensor, s: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """log pi_k N(x; a mu_k, v_k I) (n, K) and the variances v_k (n, K) at per-sample (a, s)."""
        a, s = a.reshape(-1, 1), s.reshape(-1, 1)
        var = a ** 2 * self.stds.to(x.device)[None] ** 2 + s ** 2  # (n, K)
        d2 = ((x[:, None, :] - a[:, :, None] * self.means.to(x.device)[None]) ** 2).sum(-1)
        logp = torch.log(self.weights.to(x.device))[None] - 0.5 * d2 / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        if labels is not None:  # conditional on a component (labels == K: unconditional)
            keep = labels[:, None] == torch.arange(self.num_components, device=x.device)[None]
            uncond = labels == self.num_components
            keep = keep | uncond[:, None]
            logp = logp.masked_fill(~keep, float("-inf"))
        return logp, var

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) of clean samples (n, D) -> (n,)."""
        one, zero = torch.ones(len(x), device=x.device), torch.zeros(len(x), device=x.device)
        return self._parts(x.flatten(1).float(), one, zero, None)[0].logsumexp(-1)

    def posterior_mean(self, x: Tensor, a: Tensor, s: Tensor, labels: Tensor | None = None) -> Tensor:
        """E[x0 | x_t = x] for x_t = a x0 + s eps (a, s per sample (n,))."""
        x = x.float()
        logp, var = self._parts(x, a, s, labels)
        r = torch.softmax(logp, -1)  # (n, K) responsibilities
        mu = self.means.to(x.device)[None]  # (1, K, D)
        gain = (a.reshape(-1, 1) * self.stds.to(x.device)[None] ** 2 / var)[:, :, None]  # (n, K, 1)
        per = mu + gain * (x[:, None, :] - a.reshape(-1, 1, 1) * mu)
        return (r[:, :, None] * per).sum(1)

    def score(self, x: Tensor, a: Tensor, s: Tensor, labels: Tensor | None = None) -> Tensor:
        """grad_x log p_t(x) = (a E[x0|x] - x) / s^2 (Tweedie)."""
        return (a.reshape(-1, 1) * self.posterior_mean(x, a, s, labels) - x) / s.reshape(-1, 1) ** 2

    def component(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(the most likely component of each clean sample, its distance in that component's stds)."""
        x = x.flatten(1).float()
        one, zero = torch.ones(len(x)), torch.zeros(len(x))
        k = self._parts(x, one, zero, None)[0].argmax(-1)
        dist = (x - self.means[k]).norm(dim=-1) / self.stds[k]
        return k, dist


def named(name: str, seed: int = 0) -> GaussianMixture:
    """The built-in mixtures: ``mixture2d`` (8 components on a circle of radius 2, std 0.15) and
    ``mixture64d`` (16 components in 64-D, means drawn N(0, 1) per coordinate with a seed, std 0.3)."""
    if name == "mixture2d":
        angle = torch.arange(8) * (2 * math.pi / 8)
        return GaussianMixture(2.0 * torch.stack([angle.cos(), angle.sin()], 1), 0.15, name=name)
    if name == "mixture64d":
        g = torch.Generator().manual_seed(seed + 64)
        return GaussianMixture(torch.randn(16, 64, generator=g), 0.3, name=name)
    raise DistilleryError(f"mixture {name!r} is not built in; use mixture2d or mixture64d.")


class ExactDenoiser(nn.Module):
    """The mixture's exact prediction as a network: ``forward(x, tau, class_labels=None, w=None)`` returns
    the process's prediction type (epsilon, x0, v or flow velocity). ``w`` is a guidance scale applied as
    classifier-free guidance, ``pred_u + w (pred_c - pred_u)``, when class labels are given."""

    def __init__(self, mixture: GaussianMixture, process: Process):
        super().__init__()
        self.mixture, self.process = mixture, process
        self.shape, self.sampler = (mixture.dim,), "ddim"
        self.num_classes, self.takes_w = mixture.num_components, True  # applies guidance itself
        self.register_buffer("_device", torch.zeros(0), persistent=False)

    def x0(self, x: Tensor, tau: Tensor, class_labels: Tensor | None = None) -> Tensor:
        a, s = self.process.coef(tau.to(x.device))
        a, s = a.expand(len(x)), s.expand(len(x))
        return self.mixture.posterior_mean(x.flatten(1), a, s.clamp(min=1e-6), class_labels).reshape(x.shape)

    def forward(self, x: Tensor, tau: Tensor, class_labels: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        x0 = self.x0(x, tau, class_labels)
        if class_labels is not None and w is not None:
            u = self.x0(x, tau, torch.full_like(class_labels, self.mixture.num_components))
            x0 = u + _expand(w.float(), x) * (x0 - u)
        a, s = (_expand(c, x) for c in self.process.coef(tau.to(x.device)))
        eps = (x - a * x0) / s.clamp(min=1e-6)
        return self.process.from_x0_eps(x0, eps, tau)


def gaussian_flow(x: Tensor, tau_from: float, tau_to: float, mean: Tensor, std: float, process: Process) -> Tensor:
    """The exact probability-flow ODE map of a single Gaussian N(mean, std^2 I) from tau_from to tau_to."""
    a0, s0 = process.coef(torch.tensor(tau_from))
    a1, s1 = process.coef(torch.tensor(tau_to))
    r = torch.sqrt(a1 ** 2 * std ** 2 + s1 ** 2) / torch.sqrt(a0 ** 2 * std ** 2 + s0 ** 2)
    return a1 * mean + r * (x - a0 * mean)
