"""The run directory: one layout, written by this module alone, for every recipe kind.

    <runs_dir>/<recipe name>/<time>/      (or --out DIR)
        config.yaml          the resolved recipe (a resumed run must have the same one)
        summary.json         status (running | done | failed), the result rows, the report's figures
        metrics.jsonl        what the engine logged (every phase)
        checkpoints/<phase>/ the engine's checkpoints (``--resume`` continues from them)
        models/              what the run produced (weights, model folders, synthetic sets)
        report/report.html   the summary table, the family's plots, the config
    <runs_dir>/index.sqlite  one row per run (``distillery runs``)

A kind's run function receives a ``RunDir`` and returns its result rows; ``open_run`` and
``RunDir.finish`` do the rest. Under torch.distributed rank 0 writes and every rank checks.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import distributed
from .config import to_dict
from .errors import DistilleryError
from .io import atomic_write_json, atomic_write_text


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"


def new_path(runs_dir: str | Path, name: str) -> Path:
    """A fresh folder ``runs_dir/<name>/<time>`` (a suffix when two runs start in one second)."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(runs_dir) / slug(name)
    for i in range(1000):
        d = base / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            d.mkdir(parents=True)
            return d
        except FileExistsError:
            continue
    raise DistilleryError(f"cannot create a run directory under {str(base)!r}.")


def say(progress: bool | None, msg: str) -> None:
    """A progress line on stderr, unless ``progress`` is False (``--quiet``)."""
    if progress is not False:
        import sys

        print(msg, file=sys.stderr, flush=True)


def writer() -> bool:
    """Rank 0 writes run files under torch.distributed; every process does otherwise."""
    return distributed.world()[0] == 0


def _settings(d: Any) -> Any:
    """``d`` without the train settings that change where and how fast a run goes, not what it computes
    (``config.RUNTIME_KEYS``: device, workers, trackers, ...), in every training section."""
    from .config import RUNTIME_KEYS

    if isinstance(d, dict):
        train = "epochs" in d and "batch_size" in d
        return {k: _settings(v) for k, v in d.items() if not (train and k in RUNTIME_KEYS)}
    if isinstance(d, list):
        return [_settings(v) for v in d]
    return d


def _same(a: dict, b: dict, mutable: tuple[str, ...] = ("threads",)) -> list[str]:
    """Top-level keys whose settings differ, but for ``mutable`` ones (``threads`` only changes speed; a
    config class may name more in ``MUTABLE``) and the runtime keys of training sections: a resume may
    change them."""
    a, b = _settings(a), _settings(b)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in mutable)


OWN = ("config.yaml", "summary.json", "metrics.jsonl", "report", "predictions")
"""What the run directory's writer and reports write; anything else a run writes (checkpoints, models,
caches, stores, a study) is progress that a failed run keeps, to be resumed."""


def _files(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()} if path.is_dir() else set()


@dataclass
class RunDir:
    path: Path
    recipe: Any
    resume: bool = False
    summary: dict[str, Any] = field(default_factory=dict)
    before: set[Path] = field(default_factory=set)
    """The files the folder held when the run opened (a failed run never deletes these)."""

    @property
    def models(self) -> Path:
        return self.path / "models"

    @property
    def report_dir(self) -> Path:
        return self.path / "report"

    @property
    def index(self) -> Path:
        return Path(self.recipe.runs_dir) / "index.sqlite"

    def figure(self, filename: str, caption: str) -> Path:
        """Where a kind writes a plot of its own (``report/<filename>``); the report shows it."""
        from .report.html import PLOTS

        if filename in {p[0] for p in PLOTS}:
            raise ValueError(f"{filename!r} is the name of a built-in report plot; name the figure otherwise.")
        figs = self.summary.setdefault("figures", [])
        if not any(f["file"] == filename for f in figs):
            figs.append({"file": filename, "caption": caption})
        self.report_dir.mkdir(parents=True, exist_ok=True)
        return self.report_dir / filename

    def _record(self) -> None:
        from .report import RunIndex

        atomic_write_json(self.path / "summary.json", self.summary)
        RunIndex(self.index).record(self.path, self.recipe.name, self.recipe.name, self.summary["status"], self.summary)

    def finish(self, rows: list[dict[str, Any]], **extra: Any) -> Path | None:
        """The run is done: its rows in summary.json and the index, then the report (rank 0)."""
        self.summary.update(status="done", rows=rows, **extra)
        if not writer():
            return None
        self._record()
        from .report import write_report

        return write_report(self.path)

    def failed(self, interrupted: bool = False) -> None:
        """A run that failed (or was interrupted) before it wrote anything to resume from removes what it
        wrote, and only that (``--out`` can be used again); a run with progress (a checkpoint, a saved
        model, a cache) is recorded as failed, to be continued with ``--resume``."""
        if not writer():
            return
        new = _files(self.path) - self.before
        progress = [p for p in new if p.relative_to(self.path).parts[0] not in OWN]
        if not self.resume and not progress:
            for p in sorted(new, key=lambda p: len(p.parts), reverse=True):
                p.unlink(missing_ok=True)
            for d in sorted((d for d in self.path.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only the folders left empty
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only if now empty
            from .report import RunIndex

            RunIndex(self.index).forget(self.path)
            return
        self.summary["status"] = "interrupted" if interrupted else "failed"
        self._record()


def open_run(recipe: Any, run_dir: str | Path | None, resume: bool, progress: bool | None) -> RunDir:
    """Check and start (or continue) the run directory of ``recipe``: config.yaml written (or compared,
    on resume), summary.json ``running``, its row in the index."""
    rank, size = distributed.world()
    if size > 1 and run_dir is None:
        raise DistilleryError("under torch.distributed every process must write to one run directory; pass --out DIR.")
    path = Path(run_dir) if run_dir is not None else new_path(recipe.runs_dir, recipe.name)
    config = path / "config.yaml"
    want = to_dict(recipe)
    text = yaml.safe_dump(want, sort_keys=False)
    if resume and not config.is_file():
        raise DistilleryError(f"{str(path)!r} holds no run to resume (no config.yaml); start one there with "
                              f"--out {path} instead of --resume.")
    if not resume and config.exists():
        raise DistilleryError(f"{str(path)!r} already holds a run; continue it with --resume {path}, "
                              "or choose another --out.")
    if resume:
        have = yaml.safe_load(config.read_text()) or {}
        mutable = getattr(type(recipe), "MUTABLE", ("threads",))
        differ = _same(have, want, mutable) if isinstance(have, dict) else ["config.yaml"]
        if differ:
            raise DistilleryError(f"{str(path)!r} holds a run of another recipe ({', '.join(differ)} differ in "
                                  f"config.yaml); resume it with its own recipe (`distillery run {path / 'config.yaml'}"
                                  f" --resume {path}`), or start a new run with --out.")
    distributed.barrier()  # every rank has checked before rank 0 writes
    say(progress if rank == 0 else False, f"run directory: {path}")
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if resume and (path / "summary.json").is_file():  # a resumed run keeps the time it was created
        with contextlib.suppress(Exception):
            created = json.loads((path / "summary.json").read_text()).get("created", created)
    rd = RunDir(path, recipe, resume, {"name": recipe.name, "recipe": recipe.name, "kind": recipe.kind,
                                       "created": created, "status": "running", "rows": []},
                set() if resume else _files(path))  # a resumed run is never cleaned up, so never walked
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        own = [path / d for d in ("checkpoints", "models", "report", "predictions", "work")]
        for stale in [*path.glob(".*.tmp"), *(p for d in own for p in d.rglob(".*.tmp"))]:
            stale.unlink(missing_ok=True)  # left by a write of this run that a crash (kill -9) interrupted
        if not resume or config.read_text() != text:  # a resume may change mutable keys: recorded
            atomic_write_text(config, text)
        rd._record()
    distributed.barrier()
    return rd
