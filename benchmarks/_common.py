"""Shared bits of the benchmark scripts: machine description and result files."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from distillery.io import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def command() -> str:
    return " ".join(shlex.quote(a) for a in ["python", *sys.argv])


def write(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    atomic_write_json(path, payload)
    print(f"wrote {path}")
    return path


def finished_rows(recipe_name: str, overrides: list[str], out: Path, progress: bool = False) -> list[dict]:
    """The rows of the recipe's run in ``out``: reused when it is done, resumed when it was cut, else run."""
    import json

    from distillery import kinds, recipes

    summary = Path(out) / "summary.json"
    if not (summary.is_file() and json.loads(summary.read_text())["status"] == "done"):
        recipe = recipes.load(recipe_name, overrides)
        kinds.run(recipe, run_dir=out, resume=(Path(out) / "config.yaml").is_file(), progress=progress)
    return json.loads(summary.read_text())["rows"]


BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def update_markdown(name: str, text: str) -> None:
    """Replace this benchmark's section of BENCHMARKS.md (between its markers), or append it."""
    from distillery.io import atomic_write_text

    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    doc = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    block = f"{start}\n{text.strip()}\n{end}"
    if start in doc and end in doc:
        doc = doc[: doc.index(start)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(BENCHMARKS_MD, doc)


def peak_live_mb(fn) -> float:
    """Peak MiB of live tensors allocated while ``fn()`` runs, from the torch profiler's memory
    events (allocations and frees in time order, summed; tensors alive before the call are not
    counted). Unlike resident memory this does not see the allocator's caching or fragmentation."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20
