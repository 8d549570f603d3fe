"""Reports of a finished (or running, or killed) run: calibration, plots, one HTML page, a run index.

``write_report(run_dir)`` writes ``run_dir/report/report.html`` and its PNGs. ``ece`` and
``reliability`` are pure calibration functions; ``RunIndex`` is a SQLite list of runs.

Run-directory contract (written by the engine; read here)::

    metrics.jsonl   one JSON object per line; a truncated last line (killed run) is skipped,
                    a bad line elsewhere is an error naming it.
        {"event": "train", "phase", "epoch", "step", "lr", "loss" (weighted total),
         "terms": {name: unweighted value}, "samples_per_s"}           every few steps
        {"event": "eval", "phase", "epoch", "step", "split": "test", "accuracy" (0-1),
         "loss", "agreement" (0-1, argmax == teacher's) | null}        once per epoch
        Phases are free strings, usually "teacher", "baseline", "distill"; any may be
        missing (a cached teacher has no train records). A point logged twice (resumed
        run) counts once, the later record.
    predictions/<phase>.safetensors   optional: probs float32 (N, C) softmax on the test
                    split, targets int64 (N,).
    summary.json    {"name", "recipe", "created" (ISO), "status": "done"|"running"|"failed",
                     "rows": [{"model": "teacher"|"baseline"|"distilled"|..., "phase",
                               "accuracy" (0-1), "params", "latency_ms", "agreement" | null,
                               "ece" | null}]}
    config.yaml     optional: the resolved config, shown verbatim.
"""

from __future__ import annotations

from .calibration import ece, reliability
from .html import write_report
from .index import RunIndex, format_table
from .metrics import read_metrics, read_predictions

__all__ = [
    "RunIndex",
    "ece",
    "format_table",
    "read_metrics",
    "read_predictions",
    "reliability",
    "write_report",
]
