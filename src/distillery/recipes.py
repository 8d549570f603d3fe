"""Find and load recipes: a path to a YAML file, or a name such as ``mnist1d/kd``.

Names are looked up in ``$DISTILLERY_RECIPES`` (folders separated by ``os.pathsep``),
``./recipes`` and the recipes shipped beside the package.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import apply_overrides, from_dict, load_yaml
from .errors import DistilleryError, unknown

SHIPPED = Path(__file__).resolve().parents[2] / "recipes"


def search_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("DISTILLERY_RECIPES", "").split(os.pathsep) if p]
    dirs += [Path.cwd() / "recipes", SHIPPED]
    seen, out = set(), []
    for d in dirs:
        r = d.resolve()
        if r not in seen and r.is_dir():
            seen.add(r)
            out.append(d)
    return out


def available() -> dict[str, Path]:
    """Recipe name (path under its recipes folder, without .yaml) -> file, first folder wins."""
    found: dict[str, Path] = {}
    for d in search_dirs():
        for f in sorted(d.rglob("*.yaml")):
            if f.name.endswith(".space.yaml"):  # a search space beside its recipe (distillery search)
                continue
            found.setdefault(f.relative_to(d).with_suffix("").as_posix(), f)
    return found


def find(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise DistilleryError(f"recipe file {name_or_path!r} does not exist.")
        return p
    known = available()
    key = name_or_path.removesuffix("/")
    if key in known:
        return known[key]
    raise unknown("recipe", name_or_path, known)


def load(name_or_path: str, overrides: list[str] | None = None):
    """Load a recipe (YAML, safe), apply ``a.b=c`` overrides and check every key and value against the
    config of its ``kind`` (``kinds``; no kind is ``classify``). A recipe without ``name`` is named
    after its file (``lm/kd``)."""
    from . import kinds

    path = find(name_or_path)
    raw = apply_overrides(load_yaml(path), overrides or [])
    kind = raw.get("kind", "classify")
    if not isinstance(kind, str) or kind not in kinds.KINDS:
        raise unknown("recipe kind", str(kind), kinds.KINDS.names())
    if "name" not in raw:
        raw["name"] = path.stem if name_or_path.endswith((".yaml", ".yml")) else name_or_path.removesuffix("/")
    return from_dict(kinds.KINDS.get(kind).config_class(), raw)
