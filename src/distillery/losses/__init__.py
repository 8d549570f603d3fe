"""Pure loss functions over tensors, registered by name.

``get(name)`` returns the function, ``names()`` lists them. A loss never knows where its
tensors came from. Signature of a logit loss::

    fn(student_logits: Tensor[N, C], teacher_logits: Tensor[N, C], *,
       targets: Tensor[N] | None = None, **params) -> Tensor  # scalar, batch mean
"""

from __future__ import annotations

from collections.abc import Callable

from ..registry import Registry

LOSSES: Registry[Callable] = Registry("loss")
register = LOSSES.register


def get(name: str) -> Callable:
    """The loss function registered as ``name``; an unknown name lists the close matches."""
    return LOSSES.get(name)


def names() -> list[str]:
    """All registered loss names, sorted."""
    return LOSSES.names()


from . import features, graph, logits, relations, selection  # noqa: E402, F401  (importing registers the losses)
