"""A small SQLite index of runs, one row per run directory (stdlib ``sqlite3``).

The index is a cache: every row can be rebuilt from the run directories' ``summary.json``,
so a corrupted file is reported with the advice to delete it. Each call opens its own short
connection (timeout, rollback journal, no WAL: no ``-wal``/``-shm`` files next to the db, and
safe on network file systems) and each write is one ``BEGIN IMMEDIATE`` transaction.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import DistilleryError

TIMEOUT_S = 10.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_dir TEXT PRIMARY KEY,
    name    TEXT NOT NULL,
    recipe  TEXT NOT NULL,
    status  TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    rows    TEXT NOT NULL
)
"""
_COLUMNS = ("run_dir", "name", "recipe", "status", "created", "updated", "rows")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _utc(value: Any) -> str | None:
    """An ISO time as UTC ISO (so that the text sorts by time); naive times are local time."""
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t.astimezone(timezone.utc).isoformat(timespec="microseconds")


class RunIndex:
    """``RunIndex(path_to_db)``: ``record`` a run (insert or update by absolute run dir), ``list`` them newest first."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @contextmanager
    def _connect(self, write: bool) -> Iterator[sqlite3.Connection]:
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: no implicit transactions; we BEGIN/COMMIT ourselves.
            with closing(sqlite3.connect(self.path, timeout=TIMEOUT_S, isolation_level=None)) as conn:
                conn.execute("PRAGMA journal_mode=DELETE")  # also fails early on a file that is not a db
                if write:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        conn.execute(_SCHEMA)
                        yield conn
                        conn.execute("COMMIT")
                    except BaseException:
                        conn.execute("ROLLBACK")
                        raise
                else:
                    yield conn
        except sqlite3.OperationalError as e:
            msg = str(e).lower()
            if "locked" in msg or "busy" in msg:
                raise DistilleryError(
                    f"run index {str(self.path)!r} stayed locked for {TIMEOUT_S:.0f} s by another process; retry when it ends."
                ) from None
            if "unable to open" in msg:
                raise DistilleryError(
                    f"cannot open run index {str(self.path)!r} ({e}); check that its folder exists and is writable."
                ) from None
            raise self._corrupted(e) from None
        except sqlite3.DatabaseError as e:
            raise self._corrupted(e) from None

    def _corrupted(self, e: Exception) -> DistilleryError:
        return DistilleryError(
            f"run index {str(self.path)!r} is corrupted ({e}); delete it, it is rebuilt as runs are recorded."
        )

    def record(
        self, run_dir: str | os.PathLike, name: str, recipe: str, status: str, summary: dict[str, Any]
    ) -> None:
        """Insert or update the row of ``run_dir`` (keyed by its absolute path).

        ``created`` is ``summary["created"]`` when it is an ISO time, else now, and is kept on
        update; ``updated`` is now. ``summary["rows"]`` is stored as JSON.
        """
        key = str(Path(run_dir).resolve())
        now = _now()
        created = _utc(summary.get("created")) or now
        rows = json.dumps(summary.get("rows", []), sort_keys=True)
        with self._connect(write=True) as conn:
            conn.execute(
                "INSERT INTO runs (run_dir, name, recipe, status, created, updated, rows) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(run_dir) DO UPDATE SET name=excluded.name, recipe=excluded.recipe, "
                "status=excluded.status, updated=excluded.updated, rows=excluded.rows",
                (key, str(name), str(recipe), str(status), created, now, rows),
            )

    def forget(self, run_dir: str | os.PathLike) -> None:
        """Remove the row of ``run_dir`` (a run that left nothing behind)."""
        if not self.path.exists():
            return
        with self._connect(write=True) as conn:
            conn.execute("DELETE FROM runs WHERE run_dir = ?", (str(Path(run_dir).resolve()),))

    def list(self) -> list[dict[str, Any]]:
        """All runs, newest ``created`` first: dicts with the keys ``run_dir, name, recipe, status, created, updated, rows``."""
        if not self.path.exists():
            return []
        with self._connect(write=False) as conn:
            exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='runs'").fetchone()
            if not exists:
                return []
            found = conn.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM runs ORDER BY created DESC, updated DESC, rowid DESC"
            ).fetchall()
        out = []
        for values in found:
            row = dict(zip(_COLUMNS, values))
            try:
                row["rows"] = json.loads(row["rows"])
            except json.JSONDecodeError as e:
                raise self._corrupted(e) from None
            out.append(row)
        return out

    @staticmethod
    def format_table(rows: list[dict[str, Any]]) -> str:
        """Same as the module-level ``format_table``."""
        return format_table(rows)


HEADLINE = (("accuracy", "{:.2%}"), ("test_perplexity", "ppl {:.2f}"), ("spearman", "spearman {:.3f}"))
"""The first of these that a result row holds is its figure in ``distillery runs`` (any kind's rows)."""


def headline(summary_rows: Any) -> str:
    """One figure per result row, e.g. ``teacher 91.23%, baseline 80.10%, distilled 87.65%``; '-' if none."""
    if not isinstance(summary_rows, list):
        return "-"
    parts = []
    for r in summary_rows:
        if not isinstance(r, dict):
            continue
        for key, fmt in HEADLINE:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                parts.append(f"{r.get('model', '?')} {fmt.format(v)}")
                break
    return ", ".join(parts) or "-"


def _short_time(iso: Any) -> str:
    try:
        return datetime.fromisoformat(str(iso)).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return str(iso)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of ``RunIndex.list()`` rows: name, status, created, the result rows' figures, path."""
    header = ("name", "status", "created", "result", "path")
    lines = [
        (
            str(r.get("name", "")),
            str(r.get("status", "")),
            _short_time(r.get("created", "")),
            headline(r.get("rows")),
            str(r.get("run_dir", "")),
        )
        for r in rows
    ]
    widths = [max([len(h), *(len(line[i]) for line in lines)]) for i, h in enumerate(header)]
    right: set[int] = set()

    def fmt(cells) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines)])
