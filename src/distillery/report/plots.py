"""PNG plots of a run: loss terms, test accuracy, teacher agreement, reliability diagrams.

Each figure is a ``matplotlib.figure.Figure`` drawn on its own Agg canvas: nothing here imports
pyplot or calls ``matplotlib.use``, so the caller's backend and pyplot state are left alone.
Each ``plot_*`` returns the path it wrote, or ``None`` (and writes nothing) when its data are
absent.
"""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..io import atomic_write_bytes
from .calibration import reliability
from .metrics import column, eval_series, phases, term_names, train_series

_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
_USUAL = ("teacher", "baseline", "distill")
DPI = 110


def phase_color(phase: str) -> str:
    """A colour per phase name, the same in every plot and run: fixed for the usual phases, by name otherwise."""
    if phase in _USUAL:
        return _PALETTE[_USUAL.index(phase)]
    rest = _PALETTE[len(_USUAL) :]
    return rest[zlib.crc32(phase.encode("utf-8")) % len(rest)]


def phase_order(names) -> list[str]:
    """The usual phases first (teacher, baseline, distill), then the others in the given order."""
    names = list(names)
    return [p for p in _USUAL if p in names] + [p for p in names if p not in _USUAL]


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, out_path: str | os.PathLike, dpi: int = DPI) -> Path:
    """``fig`` as a PNG, written atomically; no "Software"/date metadata: the same run gives the same bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return atomic_write_bytes(out_path, buf.getvalue())


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return (n + cols - 1) // cols, cols


def plot_loss_terms(records: list[dict[str, Any]], out_path: str | os.PathLike) -> Path | None:
    """One panel per phase with train records: every named term and the weighted total over steps."""
    names = phase_order(phases(records, "train"))
    panels = []
    for p in names:
        s = train_series(records, p)
        lines = [(t, *column(s, f"terms.{t}")) for t in term_names(s)]
        total = column(s, "loss")
        if len(total[0]) or any(len(x) for _, x, _ in lines):
            panels.append((p, lines, total))
    if not panels:
        return None
    rows, cols = _grid(len(panels))
    fig = _new_figure(4.6 * cols, 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (p, lines, (tx, ty)) in zip(axes, panels):
        for t, x, y in lines:
            if len(x):
                ax.plot(x, y, lw=1.2, label=t)
        if len(tx):
            ax.plot(tx, ty, color="black", lw=2.0, label="total (weighted)")
        ax.set_title(f"{p}: loss terms")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return save_png(fig, out_path)


def _plot_eval(records: list[dict[str, Any]], key: str, ylabel: str, title: str, out_path) -> Path | None:
    curves = []
    for p in phase_order(phases(records, "eval")):
        x, y = column(eval_series(records, p), key)
        if len(x):
            curves.append((p, x, 100.0 * y))
    if not curves:
        return None
    fig = _new_figure(6.0, 3.8)
    ax = fig.subplots()
    for p, x, y in curves:
        ax.plot(x, y, marker="o", ms=3.5, color=phase_color(p), label=p)
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, out_path)


def plot_accuracy(records: list[dict[str, Any]], out_path: str | os.PathLike) -> Path | None:
    """Test accuracy (%) per epoch of every phase with eval records, on one axis."""
    return _plot_eval(records, "accuracy", "test accuracy (%)", "Test accuracy", out_path)


def plot_agreement(records: list[dict[str, Any]], out_path: str | os.PathLike) -> Path | None:
    """Teacher-student top-1 agreement (%) per epoch, for the phases that log it (non-null)."""
    return _plot_eval(
        records, "agreement", "agreement with teacher (%)", "Teacher-student agreement", out_path
    )


def plot_reliability(
    predictions: dict[str, tuple[Any, Any]], out_path: str | os.PathLike, n_bins: int = 15
) -> Path | None:
    """One reliability diagram per phase with predictions: accuracy per confidence bin, the diagonal, ECE."""
    if not predictions:
        return None
    rows, cols = _grid(len(predictions))
    fig = _new_figure(3.8 * cols, 3.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, p in zip(axes, phase_order(predictions)):
        probs, targets = predictions[p]
        r = reliability(probs, targets, n_bins)
        edges = r["edges"]
        acc = np.nan_to_num(r["accuracy"], nan=0.0)  # empty bins: no bar
        ax.bar(
            edges[:-1],
            acc,
            width=np.diff(edges),
            align="edge",
            color=phase_color(p),
            edgecolor="black",
            lw=0.5,
            alpha=0.85,
            label=f"accuracy (ECE {r['ece']:.4f})",
        )
        ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1.0, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_title(f"{p} (N={int(r['count'].sum())})")
        ax.set_xlabel("confidence (max prob)")
        ax.set_ylabel("accuracy")
        ax.legend(loc="upper left", fontsize="small")
    for ax in axes[len(predictions) :]:
        ax.set_visible(False)
    return save_png(fig, out_path)


def plot_size_accuracy(rows: list[dict[str, Any]], out_path: str | os.PathLike) -> Path | None:
    """Test accuracy (%) against size on disk (KB) of every model of a run with compress stages."""
    pts = [(r["size_kb"], 100 * r["accuracy"], r["model"]) for r in rows
           if isinstance(r.get("size_kb"), (int, float)) and isinstance(r.get("accuracy"), (int, float))]
    if not pts:
        return None
    fig = _new_figure(5.5, 3.8)
    ax = fig.subplots()
    for size, acc, name in pts:
        ax.scatter([size], [acc], color=phase_color(name))
        ax.annotate(name, (size, acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("size on disk (KB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Quality against size")
    return save_png(fig, out_path)
