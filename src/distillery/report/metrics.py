"""Read a run's ``metrics.jsonl`` and ``predictions/*.safetensors`` and pick series out of them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DistilleryError

METRICS_FILE = "metrics.jsonl"
PREDICTIONS_DIR = "predictions"


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of ``run_dir/metrics.jsonl``, in file order.

    Blank lines are skipped, and so is a last line that does not parse (the engine was killed
    while writing it). A line that does not parse anywhere else is a ``DistilleryError`` that
    names it. A missing file is a ``DistilleryError``; an empty one gives ``[]``.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise DistilleryError(
            f"no {METRICS_FILE} in {str(run_dir)!r}; pass a run directory that the engine has written to."
        )
    lines = path.read_bytes().split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    records: list[dict[str, Any]] = []
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if lineno == len(lines):
                break  # truncated last line of a killed run
            raise DistilleryError(
                f"{str(path)!r} line {lineno} is not valid JSON ({e}); delete that line or rerun the training."
            ) from None
        if not isinstance(rec, dict):
            raise DistilleryError(
                f"{str(path)!r} line {lineno} is not a JSON object; delete that line or rerun the training."
            )
        records.append(rec)
    return records


def phases(records: list[dict[str, Any]], event: str | None = None) -> list[str]:
    """Phase names in order of first appearance, of every record or only those of ``event``."""
    seen: dict[str, None] = {}
    for r in records:
        if (event is None or r.get("event") == event) and isinstance(r.get("phase"), str):
            seen.setdefault(r["phase"], None)
    return list(seen)


def _series(records: list[dict[str, Any]], keep, key) -> list[dict[str, Any]]:
    # A resumed run may log the same point twice; the later record wins. Sorted by (epoch, step).
    by_key: dict[tuple, dict[str, Any]] = {}
    for r in records:
        if keep(r):
            by_key[key(r)] = r
    return [by_key[k] for k in sorted(by_key)]


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _num(x: Any, default: float = -1) -> float:
    return x if _is_num(x) else default


def train_series(records: list[dict[str, Any]], phase: str) -> list[dict[str, Any]]:
    """Train records of ``phase`` sorted by (epoch, step), one per (epoch, step) (the last logged)."""
    return _series(
        records,
        lambda r: r.get("event") == "train" and r.get("phase") == phase,
        lambda r: (_num(r.get("epoch")), _num(r.get("step"))),
    )


def eval_series(records: list[dict[str, Any]], phase: str, split: str = "test") -> list[dict[str, Any]]:
    """Eval records of ``phase`` on ``split`` sorted by epoch, one per epoch (the last logged)."""
    return _series(
        records,
        lambda r: r.get("event") == "eval" and r.get("phase") == phase and r.get("split", split) == split,
        lambda r: (_num(r.get("epoch")),),
    )


def column(series: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps-or-epochs, values) of the records of ``series`` whose ``key`` is a number.

    The x axis is ``step`` for train records and ``epoch`` for eval records. ``key`` may be
    ``"terms.<name>"`` to read a named loss term. Shapes: (K,), (K,) with K <= len(series).
    """
    xs, ys = [], []
    for r in series:
        if key.startswith("terms."):
            terms = r.get("terms")
            v = terms.get(key[len("terms.") :]) if isinstance(terms, dict) else None
        else:
            v = r.get(key)
        x = r.get("step") if r.get("event") == "train" else r.get("epoch")
        if _is_num(v) and _is_num(x):
            xs.append(float(x))
            ys.append(float(v))
    return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)


def term_names(series: list[dict[str, Any]]) -> list[str]:
    """Names of the loss terms logged in ``series``, in order of first appearance."""
    seen: dict[str, None] = {}
    for r in series:
        terms = r.get("terms")
        if isinstance(terms, dict):
            for name in terms:
                seen.setdefault(str(name), None)
    return list(seen)


def read_predictions(run_dir: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{phase: (probs (N, C) float, targets (N,) int64)}`` from ``run_dir/predictions/<phase>.safetensors``.

    A missing folder gives ``{}``; a file with zero samples is left out. An unreadable file or one without ``probs``/``targets`` of
    matching shapes is a ``DistilleryError``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file  # torch, not numpy: also reads bf16/fp16 files

    folder = Path(run_dir) / PREDICTIONS_DIR
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.safetensors")):
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise DistilleryError(
                f"predictions file {str(path)!r} is unreadable ({e}); delete it or rerun the evaluation."
            ) from None
        probs, targets = tensors.get("probs"), tensors.get("targets")
        if probs is None or targets is None or probs.ndim != 2 or targets.shape != (probs.shape[0],):
            raise DistilleryError(
                f"predictions file {str(path)!r} needs tensors 'probs' (N, C) and 'targets' (N,); "
                "delete it or rerun the evaluation."
            )
        if probs.shape[0] == 0:
            continue  # nothing to calibrate or plot
        out[path.stem] = (probs.float().numpy(), targets.long().numpy())
    return out
