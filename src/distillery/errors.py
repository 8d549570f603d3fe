"""One exception type for every error a user can fix, and a helper to name close matches."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DistilleryError(Exception):
    """An error in what the user asked for. The message names the problem and the fix.

    The CLI prints these as one line (no traceback)."""


class NonFiniteLoss(DistilleryError):
    """A loss became NaN or inf: the run stopped (a search records the trial as failed and goes on)."""


def close_matches(name: str, options: Iterable[str], n: int = 5) -> list[str]:
    """The options closest to ``name``, best first (difflib ratio, plus substring hits)."""
    options = list(options)
    found = difflib.get_close_matches(name, options, n=n, cutoff=0.5)
    for opt in options:
        if len(found) >= n:
            break
        if opt not in found and (name in opt or (opt and opt in name)):
            found.append(opt)
    return found


def unknown(kind: str, name: str, options: Iterable[str]) -> DistilleryError:
    """``DistilleryError`` for an unknown ``name`` of a ``kind``, listing close matches and all options."""
    options = sorted(options)
    near = close_matches(name, options)
    hint = f" Did you mean {', '.join(repr(m) for m in near)}?" if near else ""
    listing = ", ".join(options) if len(options) <= 40 else ", ".join(options[:40]) + ", ..."
    return DistilleryError(f"unknown {kind} {name!r}.{hint} Known {kind}s: {listing}.")
