"""torch.distributed for the engine: which rank this is, the share of a batch it trains on, and
the gradient average. Used by ``engine.fit`` only when a process group is initialised (``torchrun``);
one process changes nothing.

Every rank draws the same global batch (the order is a function of (seed, epoch)) and takes the
items at positions rank, rank + world, ... of it; samples are known by id, so a teacher cache or
store answers each rank for its own items. Each term of a rank's loss is scaled by its share of
the step's valid rows (summed over ranks and accumulation steps) times the world size, and
gradients are summed and divided by the world size, so the update equals the single-process one
on the same global batch, however the valid rows fall. Only rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(index: Tensor, rank: int, size: int) -> Tensor:
    return index[rank::size] if size > 1 else index


def average_gradients(params: list[torch.nn.Parameter], size: int, failed: bool = False) -> bool:
    """Sum every gradient across ranks (one flat all-reduce) and divide by the world size. A parameter
    no rank gave a gradient keeps ``grad=None`` (so weight decay and momentum skip it, as in one process).
    ``failed`` (a non-finite loss on this rank) travels in the same all-reduce: returns True on every
    rank when any rank failed, so all of them stop together."""
    if size <= 1:
        return failed
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([p.grad is not None for p in params] + [failed], dtype=torch.float32)
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [present])
    dist.all_reduce(flat)
    if flat[-1] > 0:
        return True
    flat[:-len(params) - 1].div_(size)
    seen = flat[-len(params) - 1:-1]
    offset = 0
    for i, (p, g) in enumerate(zip(params, grads)):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone() if seen[i] > 0 else None
        offset += n
    return False


def broadcast_buffers(modules) -> None:
    """Rank 0's buffers (batch-norm statistics, running term scales, loss state) to every rank, after
    each optimiser step, as DDP's ``broadcast_buffers`` does: all ranks evaluate and decide alike."""
    if world()[1] <= 1:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for m in modules:
        for b in m.buffers():
            by_dtype.setdefault(b.dtype, []).append(b)
    for bufs in by_dtype.values():  # one broadcast per dtype
        flat = torch.cat([b.reshape(-1) for b in bufs])
        dist.broadcast(flat, 0)
        offset = 0
        for b in bufs:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def sum_counts(counts: list[int]) -> list[int]:
    """Element-wise sum of integer counts over ranks."""
    if world()[1] <= 1:
        return list(counts)
    t = torch.tensor(counts, dtype=torch.int64)
    dist.all_reduce(t)
    return t.tolist()


def weighted_mean(value: float, weight: float) -> float:
    """The mean of ``value`` over ranks, weighted (the loss of a step over all its items)."""
    if world()[1] <= 1:
        return value
    t = torch.tensor([value * weight, weight], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0] / t[1].clamp(min=1e-12))


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def init_from_env(backend: str = "gloo") -> bool:
    """Join the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...). gloo: the engine keeps its tensors on the CPU. False when not launched that
    way, or when a group already exists (it is not ours to close)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return False
    dist.init_process_group(backend)
    return True


def shutdown(ok: bool = True) -> None:
    """Leave the group: after a barrier when every rank finished (avoids aborts at exit with gloo),
    at once after an error (the other ranks may be waiting in a collective; torchrun stops them)."""
    if dist.is_available() and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()
