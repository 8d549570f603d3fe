"""The ``condense`` kind's run: synthetic sets condensed into ``models/``, their grid, the evaluation.

``run(recipe, rd)`` writes ``models/synthetic_K.safetensors`` (one per set, ``SyntheticSet``), a grid
of set 0 (``report/grid.png``), each set's condensation checkpoints under ``checkpoints/condense-K``
(an interrupted run resumes there; a finished set is loaded, not condensed again), and one row per
evaluation network (DC's protocol: fresh networks trained on the synthetic sets, tested on the real
test set).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DistilleryError
from ..rundir import say, writer
from . import condense, evaluate, grid_png, load
from .config import CondenseRecipe
from .synthetic import SyntheticSet


def run(recipe: CondenseRecipe, rd, *, progress: bool | None = None) -> list[dict[str, Any]]:
    images = load(recipe.data)
    soft = None if recipe.soft_labels == "none" else recipe.soft_labels
    sets = []
    for k in range(recipe.sets):
        path = rd.models / f"synthetic_{k}.safetensors"
        if path.is_file() and rd.resume:
            syn = SyntheticSet.load(path)
        else:
            syn = condense(images, recipe.method, recipe.ipc, flip=recipe.flip, soft_labels=soft,
                           settings=recipe.method_settings(), seed=recipe.seed + k,
                           run_dir=rd.path / "checkpoints" / f"condense-{k}")
            if writer():
                syn.save(path)
        if k == 0 and writer():
            grid_png(syn, rd.figure("grid.png", f"Synthetic set 0: {recipe.ipc} per class, one row per class"))
        say(progress, f"set {k}: {path} ({syn.meta['seconds']:.0f} s)")
        sets.append(syn)
    if not recipe.eval.enabled:
        return [{"model": f"synthetic_{k}", "method": recipe.method, "ipc": recipe.ipc,
                 "seconds": s.meta["seconds"]} for k, s in enumerate(sets)]
    return [_row(evaluate([(s.x, s.y) for s in sets], images, arch, recipe.eval.nets, epochs=recipe.eval.epochs))
            for arch in recipe.eval.archs]


def _row(result: dict) -> dict[str, Any]:
    """One evaluation network's row: accuracy as a share (as every kind's rows), its spread."""
    return {"model": result["arch"], "phase": "condense", "accuracy": result["mean"] / 100,
            "std": result["std"] / 100, "sets": result["sets"], "nets_per_set": result["nets_per_set"]}


def synthetic_files(path: Path) -> list[Path]:
    """The synthetic sets of a run directory (``models/synthetic_*.safetensors``), or one file."""
    if path.is_file():
        return [path]
    files = sorted((path / "models").glob("synthetic_*.safetensors")) or sorted(path.glob("synthetic_*.safetensors"))
    if not files:
        raise DistilleryError(f"{path} holds no synthetic_*.safetensors; pass a synthetic set or a condense run "
                              "directory.")
    return files


def remeasure(path: Path, config: dict, *, archs: list[str] | None = None, nets: int = 5, epochs: int = 500,
              **_) -> list[dict]:
    """``distillery eval`` of a condense run directory (or one synthetic set): fresh networks of each of
    ``archs`` (default: convnet) trained on its sets, tested on the real test set."""
    return evaluate_files(synthetic_files(Path(path)), archs or ["convnet"], nets, epochs)


def evaluate_files(files: list[Path], archs: list[str], nets: int, epochs: int) -> list[dict]:
    """Each architecture's row on the synthetic sets in ``files``, the sets checked against the data."""
    sets = [SyntheticSet.load(f) for f in files]
    images = load(sets[0].meta["data"])
    for f, s in zip(files, sets):
        if s.meta.get("source_fingerprint") != images.fingerprint():
            raise DistilleryError(f"{f} was condensed from other {s.meta['data']!r} data (fingerprint differs); "
                                  "condense it again from this data.")
    return [_row(evaluate([(s.x, s.y) for s in sets], images, arch, nets, epochs=epochs)) for arch in archs]
