"""torch.distributed for the engine: which rank this is, DDP and FSDP2 wrapping, and the few
collectives a step needs. One process changes nothing.

Every rank draws the same global batch (the order is a function of (seed, epoch)) and takes the
items at positions rank, rank + world, ... of it (``data.loader.plan``); samples are known by id, so
a teacher cache or store answers each rank for its own items. Each term of a rank's loss is scaled
by its share of the step's valid rows (summed over ranks and accumulation steps) times the world
size; DDP (``torch.nn.parallel.DistributedDataParallel``) and FSDP2 (``fully_shard``) average
gradients over ranks, which divides the world size out, so the update equals the single-process
one on the same global batch however the valid rows fall. Only rank 0 writes logs and plain
checkpoints; FSDP checkpoints go through ``torch.distributed.checkpoint`` on every rank.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import DistilleryError


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(index: Tensor, rank: int, size: int) -> Tensor:
    """This rank's share of a global batch: positions rank, rank + size, ..."""
    return index[rank::size] if size > 1 else index


# --------------------------------------------------------------------------- wrapping


def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """``module`` in DDP (gloo on CPU, NCCL on CUDA: the process group's backend). Buffers are broadcast
    by the engine after each optimiser step (``broadcast_buffers``), not at every forward."""
    if not any(p.requires_grad for p in module.parameters()):
        raise DistilleryError("nothing to train: the student has no parameter with requires_grad=True.")
    import inspect

    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters \
        else {"broadcast_buffers": False}  # the name changed in torch 2.13
    return ddp(module, device_ids=ids, find_unused_parameters=find_unused_parameters, **sync)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model (the children of its largest ``ModuleList`` / ``Sequential`` of
    modules of one class with parameters: transformer layers, residual stages): FSDP2 shards per block."""
    best: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= 2:
            kids = list(m.children())
            if len({type(k) for k in kids}) == 1 and all(any(True for _ in k.parameters()) for k in kids) \
                    and len(kids) > len(best) and not isinstance(kids[0], (nn.Linear, nn.Conv1d, nn.Conv2d)):
                best = kids
    return best


def shard_fsdp(model: nn.Module, *, reshard_after_forward: bool | None = None) -> nn.Module:
    """FSDP2 in place: ``fully_shard`` each block (``blocks_of``), then the whole model. ``reshard_after_forward``
    None is FSDP2's default: blocks reshard after forward, the root keeps its parameters for backward."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return model  # sharded by an earlier stage of the same run
    if world()[1] < 2:
        raise DistilleryError("train.strategy=fsdp shards over processes, but this is one process; launch with "
                              "torchrun --nproc-per-node N (or --nproc N), or use strategy ddp.")
    for block in blocks_of(model):
        fully_shard(block, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def set_gradient_sync(modules, on: bool) -> None:
    """FSDP2's ``no_sync``: skip the reduce-scatter on accumulation micro-batches."""
    for m in modules:
        if hasattr(m, "set_requires_gradient_sync"):
            m.set_requires_gradient_sync(on)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole (unsharded) state dict on every rank, on the CPU; a plain ``state_dict`` when unsharded.
    Under FSDP every rank must call it (it all-gathers)."""
    if not is_sharded(model):
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """``clip_grad_norm_`` that also takes FSDP2's sharded (DTensor) gradients: the norm over all shards."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


# --------------------------------------------------------------------------- collectives


def broadcast_buffers(modules) -> None:
    """Rank 0's buffers (batch-norm statistics, running term scales, loss state) to every rank, after
    each optimiser step, as DDP's ``broadcast_buffers`` does: all ranks evaluate and decide alike."""
    if world()[1] <= 1:
        return
    by_key: dict[tuple, list[Tensor]] = {}
    for m in modules:
        for b in m.buffers():
            by_key.setdefault((b.dtype, b.device), []).append(b)
    for bufs in by_key.values():  # one broadcast per dtype and device
        flat = torch.cat([b.reshape(-1) for b in bufs])
        dist.broadcast(flat, 0)
        offset = 0
        for b in bufs:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_counts(counts: list[int]) -> list[int]:
    """Element-wise sum of integer counts over ranks."""
    if world()[1] <= 1:
        return list(counts)
    t = torch.tensor(counts, dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def any_failed(failed: bool):
    """Did any rank fail this step? Starts one asynchronous all-reduce and returns the function that waits
    for it, so the caller can overlap it with the backward pass (DDP runs read it from the gradients)."""
    if world()[1] <= 1:
        return lambda: failed
    t = torch.tensor([float(failed)], dtype=torch.float32, device=_comm_device())
    work = dist.all_reduce(t, async_op=True)

    def wait() -> bool:
        work.wait()
        return bool(t[0] > 0)

    return wait


def weighted_mean(value: float, weight: float) -> float:
    """The mean of ``value`` over ranks, weighted (the loss of a step over all its items)."""
    if world()[1] <= 1:
        return value
    t = torch.tensor([value * weight, weight], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t[0] / t[1].clamp(min=1e-12))


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...): NCCL when CUDA is there, gloo otherwise (or ``DISTILLERY_BACKEND``). False when not
    launched that way, or when a group already exists (it is not ours to close)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return False
    backend = backend or os.environ.get("DISTILLERY_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    dist.init_process_group(backend)
    return True


def shutdown(ok: bool = True) -> None:
    """Leave the group: after a barrier when every rank finished (avoids aborts at exit with gloo),
    at once after an error (the other ranks may be waiting in a collective; torchrun stops them)."""
    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()  # DDP reducers and FSDP states of finished runs go before their process group
        if ok:
            dist.barrier()
        dist.destroy_process_group()
