"""Small reference architectures for the built-in data, registered by name.

A builder is ``fn(input_shape: tuple, num_classes: int, **kwargs) -> nn.Module``; recipes
give only the keyword arguments, the data set supplies the shape and class count.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def get(name: str) -> Callable[..., nn.Module]:
    return MODELS.get(name)


def names() -> list[str]:
    return MODELS.names()


def build(name: str, input_shape: tuple[int, ...], num_classes: int, args: dict | None = None) -> nn.Module:
    from ..config import check_kwargs

    fn = MODELS.get(name)
    check_kwargs(fn, args or {}, f"model {name!r}", skip=2)
    try:
        return fn(tuple(input_shape), num_classes, **(args or {}))
    except (ValueError, TypeError, RuntimeError) as e:  # e.g. a negative width reaching nn.Linear
        from ..errors import DistilleryError

        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistilleryError(f"model {name!r} cannot be built with {args or {}}: {first}; check its sizes "
                              "(positive integers).") from None


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


from . import hf, small, timm_model  # noqa: E402, F401  (registering; hf: a Hugging Face model folder, timm)

__all__ = ["MODELS", "build", "get", "names", "num_params"]
