"""Sampling: the deterministic DDIM / Euler sampler and multistep consistency sampling.

``sample(model, steps, n)`` runs ``steps`` steps on the process's evenly spaced grid from tau = 1:

- ``ddim``: x <- DDIM(x0, eps) at the next time (the flow's Euler step); the teacher, progressive
  distillation, rectified flow, Hyper-SD's segmented students and one-step generators sample so.
- ``consistency``: x0 <- f(x, tau) = c_skip x + c_out x0_hat (LCM's boundary condition), then fresh
  noise to the next time (Song et al. 2023, Algorithm 1, as diffusers' LCMScheduler does); the times
  snap to the solver grid the student was trained on (``solver_steps``: 4 steps of a 50-step grid are
  DDPM indices 999, 759, 499, 259).
- ``renoise``: x0 <- x0_hat, then fresh noise to the next time: a multi-step generator (DMD2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .process import Process, _expand, full

SIGMA_DATA, TIMESTEP_SCALING = 0.5, 10.0  # LCM's values (diffusers LCMScheduler)


def lcm_scalings(process: Process, tau: Tensor) -> tuple[Tensor, Tensor]:
    """LCM's (c_skip, c_out) at tau: with t the network timestep (clipped at 0) scaled by 10,
    c_skip = sigma_d^2 / (t^2 + sigma_d^2), c_out = t / sqrt(t^2 + sigma_d^2), sigma_d = 0.5."""
    t = process.timestep(tau).clamp(min=0) * TIMESTEP_SCALING
    return SIGMA_DATA ** 2 / (t ** 2 + SIGMA_DATA ** 2), t / (t ** 2 + SIGMA_DATA ** 2).sqrt()


def consistency_x0(process: Process, x: Tensor, tau: Tensor, x0: Tensor) -> Tensor:
    c_skip, c_out = (_expand(c.to(x.device), x) for c in lcm_scalings(process, tau))
    return c_skip * x + c_out * x0


@torch.no_grad()
def sample(model: nn.Module, steps: int, n: int, *, seed: int = 0, class_labels: Tensor | None = None,
           w: float | Tensor | None = None, sampler: str | None = None, noise: Tensor | None = None,
           batch_size: int = 4096, device=None) -> Tensor:
    """``n`` samples of ``model`` (a ``Denoiser`` or ``ExactDenoiser``) in ``steps`` steps, seeded."""
    from .nets import guided

    process: Process = model.process
    mode = sampler or getattr(model, "sampler", "ddim")
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    x_all = noise if noise is not None else torch.randn(n, *model.shape, generator=g)
    grid = process.grid(steps)
    solver = getattr(model, "solver_steps", None)
    if mode == "consistency" and solver and steps <= solver:  # the times it was trained at (LCM's snapping)
        grid = [int(t * solver + 0.5) / solver for t in grid]
    out = []
    was = model.training
    model.eval()
    for lo in range(0, n, batch_size):
        x = x_all[lo:lo + batch_size].to(device)
        m = len(x)
        labels = None if class_labels is None else class_labels[lo:lo + batch_size].to(device)
        ws = None if w is None else torch.as_tensor(w, dtype=torch.float32).expand(n)[lo:lo + batch_size].to(device)
        for i in range(steps):
            tau = full(grid[i], m, device)
            x0, eps = guided(model, x, tau, labels, ws, process)
            if mode in ("consistency", "renoise"):
                if mode == "consistency":
                    x0 = consistency_x0(process, x, tau, x0)
                x = x0 if i == steps - 1 else process.noise(x0, torch.randn(x.shape, generator=g).to(device),
                                                            full(grid[i + 1], m, device))
            else:
                x = process.ddim_step(x0, eps, full(grid[i + 1], m, device))
        out.append(x.cpu())
    model.train(was)
    return torch.cat(out)
