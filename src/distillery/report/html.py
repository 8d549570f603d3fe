"""``write_report(run_dir)``: one static HTML page (no JS, no network) plus its PNGs in ``run_dir/report/``."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from ..errors import DistilleryError
from ..io import atomic_write_text, read_json
from .calibration import ece as compute_ece
from .metrics import read_metrics, read_predictions
from .plots import plot_accuracy, plot_agreement, plot_loss_terms, plot_reliability

REPORT_DIR = "report"
PLOTS = (
    ("loss_terms.png", "Loss terms", plot_loss_terms, "records"),
    ("accuracy.png", "Test accuracy", plot_accuracy, "records"),
    ("agreement.png", "Teacher-student agreement", plot_agreement, "records"),
    ("reliability.png", "Reliability diagrams", plot_reliability, "predictions"),
)

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; }
.meta { color: #555; margin-top: 0; }
.status-running { color: #b26b00; } .status-failed { color: #b00020; } .status-done { color: #1b7a2e; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.7rem; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9rem; }
pre { background: #f7f7f7; border: 1px solid #ddd; padding: 0.8rem; overflow-x: auto; font-size: 0.85rem; }
"""

DASH = "\u2014"


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _pct(x: Any) -> str:
    return f"{100.0 * x:.2f}" if _is_num(x) else DASH


def _fmt(x: Any, spec: str) -> str:
    return format(x, spec) if _is_num(x) else DASH


def _read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise DistilleryError(
            f"no summary.json in {str(run_dir)!r}; pass a run directory written by the engine, or wait until its first phase ends."
        )
    summary = read_json(path, "run summary")
    if not isinstance(summary, dict) or not isinstance(summary.get("rows", []), list):
        raise DistilleryError(
            f"run summary {str(path)!r} is not an object with a 'rows' list; delete it or rerun the step that wrote it."
        )
    return summary


def _summary_table(rows: list[Any], predictions: dict[str, tuple[Any, Any]]) -> str:
    more = [k for k in ("size_kb", "latency_64_ms") if any(isinstance(r, dict) and k in r for r in rows)]
    titles = {"size_kb": "size KB (on disk)", "latency_64_ms": "latency ms, batch 64"}
    head = "".join(
        f"<th>{h}</th>"
        for h in ("model", "phase", "accuracy %", "params", "latency ms (1 thread, median ± half-range)", "agreement %",
                  "ECE", *(titles[k] for k in more))
    )
    body = []
    for row in rows:
        if not isinstance(row, dict):
            continue
        ece_value = row.get("ece")
        if not _is_num(ece_value) and row.get("phase") in predictions:
            # The summary may have been written before calibration was computed; fill the gap.
            ece_value = compute_ece(*predictions[row["phase"]])
        extra = [f'<td class="num">{_fmt(row.get(k), ".1f" if k == "size_kb" else ".3f")}</td>' for k in more]
        cells = [
            f"<td>{_e(row.get('model', DASH))}</td>",
            f"<td>{_e(row.get('phase', DASH))}</td>",
            f'<td class="num">{_pct(row.get("accuracy"))}</td>',
            f'<td class="num">{_fmt(row.get("params"), ",")}</td>',
            f'<td class="num">{_fmt(row.get("latency_ms"), ".3f")}'
            + (f' ± {row["latency_spread_ms"] / 2:.3f}' if _is_num(row.get("latency_spread_ms")) else "") + "</td>",
            f'<td class="num">{_pct(row.get("agreement"))}</td>',
            f'<td class="num">{_fmt(ece_value, ".4f")}</td>',
            *extra,
        ]
        body.append("<tr>" + "".join(cells) + "</tr>")
    if not body:
        return "<p>The summary has no rows yet.</p>"
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _generic_table(rows: list[Any]) -> str:
    """Rows of any kind: one column per key (first-seen order), numbers to four significant digits."""
    rows = [r for r in rows if isinstance(r, dict)]
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        if _is_num(v):
            return f'<td class="num">{v:.4g}</td>' if isinstance(v, float) else f'<td class="num">{v:,}</td>'
        return f"<td>{_e(DASH if v is None else v)}</td>"

    head = "".join(f"<th>{_e(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(cell(r.get(k)) for k in keys) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _is_classify(rows: list[Any]) -> bool:
    return bool(rows) and all(isinstance(r, dict) and "accuracy" in r and "latency_ms" in r for r in rows)


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/report/report.html`` and its PNGs; return the HTML path.

    Needs ``summary.json`` with rows or a non-empty ``metrics.jsonl``; predictions and ``config.yaml``
    are optional. A plot whose data are absent is left out (and a stale PNG of it removed); the
    figures a kind wrote itself (``summary["figures"]``, see ``RunDir.figure``) follow.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DistilleryError(
            f"run directory {str(run_dir)!r} does not exist; pass the folder the engine wrote."
        )
    summary = _read_summary(run_dir)
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() or not summary.get("rows") else []
    if not records and not summary.get("rows"):
        raise DistilleryError(
            f"{str(run_dir / 'metrics.jsonl')!r} has no records; wait until the run has logged a step, or rerun it."
        )
    predictions = read_predictions(run_dir)
    out_dir = run_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)

    figures = []
    for filename, caption, fn, source in PLOTS:
        data = records if source == "records" else predictions
        written = fn(data, out_dir / filename)
        if written is None:
            if not any(isinstance(f, dict) and f.get("file") == filename for f in summary.get("figures", [])):
                (out_dir / filename).unlink(missing_ok=True)  # stale: a kind's own figure of that name stays
        else:
            figures.append(
                f'<figure><img src="{_e(filename)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'
            )
    for fig in summary.get("figures", []):
        if isinstance(fig, dict) and (out_dir / str(fig.get("file", ""))).is_file():
            figures.append(f'<figure><img src="{_e(fig["file"])}" alt="{_e(fig.get("caption", ""))}">'
                           f'<figcaption>{_e(fig.get("caption", ""))}</figcaption></figure>')

    name = summary.get("name") or run_dir.name
    status = str(summary.get("status", "unknown"))
    meta = (
        f"recipe <b>{_e(summary.get('recipe', DASH))}</b> &middot; created {_e(summary.get('created', DASH))} &middot; "
        f'status <b class="status-{_e(status)}">{_e(status)}</b>'
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(name)} - distillery report</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(name)}</h1>",
        f'<p class="meta">{meta}</p>',
        "<h2>Summary</h2>",
        _summary_table(summary.get("rows", []), predictions) if _is_classify(summary.get("rows", []))
        else _generic_table(summary.get("rows", [])) if summary.get("rows") else "<p>The summary has no rows yet.</p>",
        "<h2>Plots</h2>",
        "".join(figures) if figures else "<p>No plottable metrics yet.</p>",
    ]
    config = run_dir / "config.yaml"
    if config.is_file():
        text = config.read_text(encoding="utf-8", errors="replace")
        parts += ["<h2>Resolved config</h2>", f"<pre>{_e(text)}</pre>"]
    parts.append("</body></html>\n")
    return atomic_write_text(out_dir / "report.html", "\n".join(parts))
