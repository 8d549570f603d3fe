"""Pure loss functions over tensors, registered by name.

``get(name)`` returns the function, ``names()`` lists them. A loss never knows where its
tensors came from. Signature of a logit loss::

    fn(student_logits: Tensor[N, C], teacher_logits: Tensor[N, C], *,
       targets: Tensor[N] | None = None, **params) -> Tensor  # scalar, batch mean
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields

from ..errors import DistilleryError
from ..registry import Registry

LOSSES: Registry[Callable] = Registry("loss")


@dataclass(frozen=True)
class Capabilities:
    """What a loss can do, declared once where it is registered (``register(name, **capabilities)``)."""

    reads_logits: bool = False
    """A logit loss: it reads logits (also a tapped member's), so no adapter and token batches go through
    ``losses.tokens.token_loss``; otherwise the term's taps decide (a feature term when either side is a module)."""
    row_wise: bool = False
    """Its value is a sum of per-row terms: token chunking splits it exactly."""
    needs_targets: bool = False
    """It takes ``targets`` (labels, or the teacher's classes)."""
    masks_unlabelled: bool = True
    """With targets: rows labelled -100 are masked (False: every row counts, e.g. teacher soft labels)."""
    accepts_sparse: bool = False
    """It reads a sparse top-k teacher (``losses.sparse.TopK``)."""
    needs_ids: bool = False
    """It takes the batch's sample ids (``ids``), e.g. CRD's memory bank."""
    different_widths: bool = False
    """It compares student and teacher of different widths itself (no projection needed)."""
    batch_keys: tuple[str, ...] = ()
    """Batch entries it reads, passed by name (``edges`` of graph batches, ...)."""
    state: type | None = None
    """A module class of learned state, built by the objective from probed shapes and trained with the student."""


_CAPS: dict[Callable, Capabilities] = {}


def _declare(fn: Callable, caps: dict) -> Capabilities:
    allowed = [f.name for f in fields(Capabilities)]
    bad = [k for k in caps if k not in allowed]
    if bad:
        raise DistilleryError(f"loss {getattr(fn, '__name__', fn)!r}: unknown capability {bad[0]!r}; use any of "
                              f"{', '.join(allowed)}.")
    spec = Capabilities(**{k: tuple(v) if k == "batch_keys" else v for k, v in caps.items()})
    _CAPS[fn] = spec
    return spec


def register(name: str | None = None, **capabilities) -> Callable[[Callable], Callable]:
    """Register a loss under ``name`` with what it can do (``Capabilities`` fields as keywords)."""

    def deco(fn: Callable) -> Callable:
        _declare(fn, capabilities)
        return LOSSES.register(name)(fn)

    return deco


def capable(**capabilities) -> Callable[[Callable], Callable]:
    """Declare the capabilities of a loss used directly (``Term(loss=fn)``) without registering a name."""

    def deco(fn: Callable) -> Callable:
        _declare(fn, capabilities)
        return fn

    return deco


def capabilities(fn: str | Callable) -> Capabilities:
    """The declared capabilities of a loss (by name, function or ``functools.partial``); defaults for others."""
    if isinstance(fn, str):
        fn = LOSSES.get(fn)
    while isinstance(fn, functools.partial):
        fn = fn.func
    return _CAPS.get(fn, Capabilities())


def get(name: str) -> Callable:
    """The loss function registered as ``name``; an unknown name lists the close matches."""
    return LOSSES.get(name)


def names() -> list[str]:
    """All registered loss names, sorted."""
    return LOSSES.names()


from . import cross_tokenizer, diffusion, features, graph, logits, relations, selection  # noqa: E402, F401  (importing registers the losses)
