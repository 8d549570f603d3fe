"""The user's own components: models, data sets and losses registered by code the user names.

A recipe names components; it never runs code. Code enters in two ways only, both explicit:

- ``distillery run RECIPE --plugins mypkg.distill`` (any subcommand that reads recipes takes it, comma
  separated or repeated; ``DISTILLERY_PLUGINS`` in the environment does the same) imports the named
  modules before the recipe is read;
- an installed package declares an entry point in the group ``distillery.plugins``
  (``[project.entry-points."distillery.plugins"] mine = "mypkg.distill"``); installed packages are
  loaded by every command.

A plugin module registers what it brings when it is imported::

    from distillery import data, losses, models

    @models.MODELS.register("tiny_resnet")
    def tiny_resnet(input_shape, num_classes, width=16): ...

    @data.DATASETS.register("my_signals")
    def my_signals(root="data/signals"): ...          # -> {"train": TensorData, "test": TensorData}

    @losses.register("my_kd")
    def my_kd(student_logits, teacher_logits, *, temperature=2.0): ...

A module that does not import, or a name registered twice (also against a built-in), is a one-line
error naming the plugin.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable

from .errors import DistilleryError

GROUP = "distillery.plugins"
_loaded: set[str] = set()


def _import(module: str, source: str) -> None:
    if module in _loaded:
        return
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or module
        raise DistilleryError(f"plugin {module!r} ({source}) does not import: no module named {missing!r}; put it on "
                              "PYTHONPATH or install its package.") from None
    except DistilleryError as e:
        raise DistilleryError(f"plugin {module!r} ({source}): {e}") from None
    except Exception as e:  # the plugin's own code failed while importing
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DistilleryError(f"plugin {module!r} ({source}) failed while importing: {type(e).__name__}: "
                              f"{first}") from None
    _loaded.add(module)


def load(modules: Iterable[str] = (), *, entry_points: bool = True) -> list[str]:
    """Import the named plugin modules, those in ``DISTILLERY_PLUGINS``, and (with ``entry_points``) every
    installed ``distillery.plugins`` entry point; each once. Returns the modules loaded so far."""
    from importlib.metadata import entry_points as eps

    from . import data, losses, models  # noqa: F401  (the registries exist before any plugin registers)

    named = [m.strip() for item in modules for m in str(item).split(",") if m.strip()]
    named += [m.strip() for m in os.environ.get("DISTILLERY_PLUGINS", "").split(",") if m.strip()]
    for m in named:
        _import(m, "--plugins")
    if entry_points:
        for ep in eps(group=GROUP):
            source = f"entry point {ep.name!r} of group {GROUP}"
            module, _, attr = ep.value.partition(":")
            first = module.strip() not in _loaded
            _import(module.strip(), source)
            if attr and first:  # "pkg.mod:setup": a function that registers, called once
                try:
                    setup = ep.load()
                    if callable(setup):
                        setup()
                except DistilleryError as e:
                    raise DistilleryError(f"plugin {ep.value!r} ({source}): {e}") from None
                except Exception as e:
                    raise DistilleryError(f"plugin {ep.value!r} ({source}) failed: {type(e).__name__}: {e}") from None
    return sorted(_loaded)
