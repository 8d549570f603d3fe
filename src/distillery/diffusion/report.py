"""The diffusion run's figures: samples per step count (scatter plots of 2-D mixtures, image grids of
digits, the first two coordinates of higher-dimensional vectors), each metric against steps, and (pruned
students) quality against size."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..report.plots import save_png


def plot_samples(path: Path, shown: dict[tuple[str, int], torch.Tensor], ref: torch.Tensor, mix) -> None:
    keys = list(shown)
    cols = min(5, len(keys) + 1)
    rows = -(-(len(keys) + 1) // cols)
    fig = Figure(figsize=(2.3 * cols, 2.3 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    panels = [("data", ref[: len(next(iter(shown.values())))] if shown else ref), *[(f"{k[0]}, {k[1]} step"
                                                                                     + ("s" if k[1] > 1 else ""), shown[k])
                                                                                    for k in keys]]
    for i, (title, x) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        if x.dim() == 4:  # images: a grid of up to 40
            x = x[:40].clamp(-1, 1)
            n, side = len(x), x.shape[-1]
            per, cell = 8, x.shape[-1] + 1
            grid = torch.ones((-(-n // per)) * cell, per * cell)
            for j in range(n):
                r, c = divmod(j, per)
                grid[r * cell:r * cell + side, c * cell:c * cell + side] = (x[j, 0] + 1) / 2
            ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            x = x.flatten(1)
            ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=2, alpha=0.5, color="#1f77b4")
            if mix is not None:
                ax.scatter(mix.means[:, 0].numpy(), mix.means[:, 1].numpy(), s=12, marker="x", color="#d62728")
            lim = float(ref.flatten(1)[:, :2].abs().max()) * 1.3
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            ax.tick_params(labelsize=6)
        ax.set_title(title, fontsize=8)
    save_png(fig, path, dpi=100)


def plot_metrics(path: Path, rows: list[dict]) -> None:
    metrics = [m for m in ("swd", "energy", "loglik", "fid", "coverage") if any(r.get(m) is not None for r in rows)]
    fig = Figure(figsize=(3.2 * len(metrics), 3.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        for name in methods:
            pts = sorted((r["steps"], r[m]) for r in rows if r["method"] == name and r.get(m) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_title(m, fontsize=9)
        if m in ("swd", "energy", "fid"):
            ax.set_yscale("log")
        if i == 0:
            ax.legend(fontsize=7)
    save_png(fig, path, dpi=100)


def plot_size(path: Path, rows: list[dict]) -> None:
    """Each metric against the network's parameter count at the most sampling steps measured: the teacher, the
    pruned network before recovery and after (method ``prune``)."""
    steps = max(r["steps"] for r in rows)
    at = [r for r in rows if r["steps"] == steps and r.get("params")]
    metrics = [m for m in ("swd", "energy", "loglik", "fid") if any(r.get(m) is not None for r in at)]
    fig = Figure(figsize=(3.2 * len(metrics), 3.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        for r in at:
            if r.get(m) is not None:
                ax.scatter([r["params"]], [r[m]], label=r["method"])
        ax.set_xlabel("parameters")
        ax.set_title(f"{m} at {steps} steps", fontsize=9)
        if m in ("swd", "energy", "fid"):
            ax.set_yscale("log")
        if i == 0:
            ax.legend(fontsize=7)
    save_png(fig, path, dpi=100)
