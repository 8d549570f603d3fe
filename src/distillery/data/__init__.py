"""Built-in data sets. Every sample carries a stable sample id (``batch["id"]``).

A data set builder is registered by name and returns a mapping of splits to ``TensorData``:
labelled sets give ``train`` and ``test``; transfer sets give ``transfer`` (no labels).
"""

from __future__ import annotations

from collections.abc import Callable

from ..registry import Registry
from .core import TensorData

DATASETS: Registry[Callable[..., dict[str, TensorData]]] = Registry("data set")


def get(name: str) -> Callable[..., dict[str, TensorData]]:
    return DATASETS.get(name)


def names() -> list[str]:
    return DATASETS.names()


def build(name: str, args: dict | None = None) -> dict[str, TensorData]:
    from ..config import check_kwargs
    from ..errors import DistilleryError

    fn = DATASETS.get(name)
    check_kwargs(fn, args or {}, f"data set {name!r}")
    try:
        return fn(**(args or {}))
    except DistilleryError:
        raise
    except (ValueError, TypeError, IndexError, ZeroDivisionError) as e:  # e.g. a size of 0 or below
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistilleryError(f"data set {name!r} cannot be built with {args or {}}: {first}") from None


from . import builtin, files  # noqa: E402, F401  (registers the built-in sets and the file readers)

__all__ = ["DATASETS", "TensorData", "build", "get", "names"]
