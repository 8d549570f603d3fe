"""Training checkpoints: one commit point, verified loads, exact resume.

A checkpoint of phase P is ``checkpoints/P/last.json`` (the commit point: counters, RNG states,
optimiser metadata, the run's signature, the name and sha256 of the weights) beside the weights it
names: ``last-<n>.safetensors`` (one process or DDP: rank 0 writes the whole state) or the
folder ``last-<n>.dcp`` (FSDP: every rank writes its shards through
``torch.distributed.checkpoint``, which can load them back at another world size). New weights are
written under a new name, then ``last.json`` is replaced atomically, then older weights are
removed: a crash at any point leaves the previous complete checkpoint in force, and leftovers of
an interrupted write are removed by the next save.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from . import distributed
from .errors import DistilleryError
from .io import atomic_save_safetensors, atomic_write_json, read_json, sha256_file

# --------------------------------------------------------------------------- tensors of modules and optimisers


def module_tensors(modules: dict[str, nn.Module]) -> dict[str, Tensor]:
    return {f"{name}/{k}": v.detach().clone().contiguous() for name, m in modules.items() for k, v in m.state_dict().items()}


def load_module_tensors(modules: dict[str, nn.Module], tensors: dict[str, Tensor], where: str) -> None:
    for name, m in modules.items():
        prefix = f"{name}/"
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            m.load_state_dict(sd)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise DistilleryError(f"checkpoint {where} does not fit module {name!r}: {first}. "
                                  "Was it written by another recipe?") from None


def _flat_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    state_meta: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        meta = {}
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim/{idx}/{k}"] = v.detach().cpu().clone().contiguous()
            else:
                meta[k] = v
        state_meta[str(idx)] = meta
    return tensors, {"param_groups": sd["param_groups"], "state": state_meta}


def _unflat_optimizer(tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(m) for i, m in meta["state"].items()}
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, idx, k = key.split("/", 2)
            state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


# --------------------------------------------------------------------------- RNG


def rng_state() -> tuple[dict, Tensor]:
    np_state = np.random.get_state()
    py = random.getstate()
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return meta, torch.get_rng_state()


def restore_rng(meta: dict, torch_state: Tensor) -> None:
    torch.set_rng_state(torch_state)
    v, internal, gauss = meta["python"]
    random.setstate((v, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def accelerator_rng() -> dict[str, Tensor]:
    """The CUDA generators' states (dropout on a GPU draws from them), by device index."""
    if not torch.cuda.is_available():
        return {}
    return {f"rng/cuda/{i}": s.cpu() for i, s in enumerate(torch.cuda.get_rng_state_all())}


def restore_accelerator_rng(tensors: dict[str, Tensor]) -> None:
    states = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng/cuda/")),
                                         key=lambda k: int(k.rsplit("/", 1)[1]))]
    if states and torch.cuda.is_available() and len(states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states)


# --------------------------------------------------------------------------- save and load


def _holder(modules: dict[str, nn.Module]) -> nn.ModuleDict:
    return nn.ModuleDict({k.replace(".", "__"): m for k, m in modules.items()})


def clean(folder: Path, keep: str | None) -> None:
    """Remove weights other than ``keep`` and temp files of interrupted writes."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        ours = keep is not None and (p.name == keep or p.name.startswith(keep + "."))  # the weights and their RNG
        stale = (p.name.startswith("last-") or p.name.startswith(".last") or p.name == "last.safetensors") and not ours
        if stale:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def save(path: Path, modules: dict[str, nn.Module], opt: torch.optim.Optimizer, meta: dict[str, Any], *,
         extra: dict[str, Tensor] | None = None, sharded: bool = False) -> None:
    """Write the checkpoint ``path``.json and its weights (see the module docstring). Under torch.distributed
    every rank calls this; rank 0 writes the plain form, every rank its shards of the sharded one."""
    rank = distributed.world()[0]
    folder = path.parent
    seq = int(meta.get("seq", 0))  # a number per save: two saves at one step never share a name
    rng_meta, torch_rng = rng_state()
    extra = {**(extra or {}), **accelerator_rng()}
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        name = f"{path.name}-{seq}.dcp"
        target = folder / name
        if rank == 0:
            shutil.rmtree(target, ignore_errors=True)  # a leftover of an interrupted save of this step
            folder.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        msd, osd = get_state_dict(_holder(modules), opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(target))
        state = {**meta, "weights": name, "format": "dcp", "rng": rng_meta}
        distributed.barrier()
        if rank == 0:
            atomic_save_safetensors(folder / f"{name}.rng.safetensors", {"rng/torch": torch_rng, **(extra or {})})
            state["rng_file"] = f"{name}.rng.safetensors"
            state["rng_sha256"] = sha256_file(folder / state["rng_file"])
            # DCP's own metadata file is a pickle: every file of the folder is checksummed here and
            # verified before torch.distributed.checkpoint reads any of them.
            state["files"] = {p.name: sha256_file(p) for p in sorted(target.iterdir()) if p.is_file()}
            atomic_write_json(path.with_suffix(".json"), state)
            clean(folder, name)
        distributed.barrier()
        return
    if rank != 0:
        distributed.barrier()
        return
    tensors = {**module_tensors(modules), **(extra or {})}
    opt_tensors, opt_meta = _flat_optimizer(opt)
    tensors.update(opt_tensors)
    tensors["rng/torch"] = torch_rng
    tensors = {k: v.cpu() for k, v in tensors.items()}
    name = f"{path.name}-{seq}.safetensors"
    st_path = folder / name
    atomic_save_safetensors(st_path, tensors)
    state = {**meta, "weights": name, "format": "safetensors", "sha256": sha256_file(st_path), "optimizer": opt_meta,
             "rng": rng_meta}
    atomic_write_json(path.with_suffix(".json"), state)
    clean(folder, name)
    distributed.barrier()


def exists(path: Path) -> bool:
    return path.with_suffix(".json").is_file()


def read_meta(path: Path) -> dict:
    return read_json(path.with_suffix(".json"), "checkpoint")


def weights_path(path: Path, meta: dict) -> Path:
    name = meta.get("weights") or f"{path.name}.safetensors"
    if "/" in name or "\\" in name or name.startswith(".."):
        raise DistilleryError(f"checkpoint {path}.json names weights outside its folder ({name!r}); it was altered.")
    return path.parent / name


def read(path: Path, meta: dict | None = None) -> tuple[dict, dict[str, Tensor]]:
    """(meta, tensors) of a plain checkpoint, verified (``meta``: its JSON, when already read); a missing or
    corrupted one is a clear error."""
    path = Path(path)
    meta = read_meta(path) if meta is None else meta
    st_path = weights_path(path, meta)
    if not st_path.is_file():
        raise DistilleryError(f"checkpoint weights {str(st_path)!r} are missing; rerun without resume in a new "
                              "directory.")
    if sha256_file(st_path) != meta.get("sha256"):
        raise DistilleryError(f"checkpoint {str(st_path)!r} is corrupted (checksum mismatch); rerun in a new "
                              "directory.")
    return meta, load_file(str(st_path))


def load(path: Path, meta: dict, modules: dict[str, nn.Module], opt: torch.optim.Optimizer,
         device: torch.device) -> dict[str, Tensor]:
    """Restore modules, optimiser and RNG from a checkpoint whose ``meta`` was read; returns the extra tensors."""
    folder = path.parent
    name = weights_path(path, meta).name
    if meta.get("format") == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        target = folder / name
        rng_name = str(meta.get("rng_file", ""))
        if rng_name != f"{name}.rng.safetensors":
            raise DistilleryError(f"checkpoint {path}.json names an RNG file {rng_name!r} that is not its own; it was "
                                  "altered.")
        rng_file = folder / rng_name
        if not target.is_dir() or not rng_file.is_file():
            raise DistilleryError(f"checkpoint {str(target)!r} is missing; rerun without resume in a new directory.")
        if sha256_file(rng_file) != meta.get("rng_sha256"):
            raise DistilleryError(f"checkpoint {str(rng_file)!r} is corrupted (checksum mismatch).")
        from .io import check_files

        check_files(target, meta, f"sharded checkpoint {str(target)!r}")  # before DCP unpickles its metadata
        if sorted(p.name for p in target.iterdir() if p.is_file()) != sorted(meta.get("files", {})):
            raise DistilleryError(f"sharded checkpoint {str(target)!r} holds files its record does not list; it was "
                                  "altered.")
        holder = _holder(modules)
        msd, osd = get_state_dict(holder, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(target))
        set_state_dict(holder, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        tensors = load_file(str(rng_file))
    else:
        _, tensors = read(path, meta)
        load_module_tensors(modules, tensors, str(path))
        opt.load_state_dict(_unflat_optimizer({k: v.to(device) for k, v in tensors.items() if k.startswith("optim/")},
                                              meta["optimizer"]))
    restore_rng(meta["rng"], tensors["rng/torch"])
    restore_accelerator_rng(tensors)
    return tensors
