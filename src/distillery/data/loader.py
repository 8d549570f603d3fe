"""Any data set into the engine, batched by ``torch.utils.data.DataLoader``.

One protocol for every data set the engine trains on: ``len(data)``, ``data.batch(index) -> dict``
(a whole batch in one call) and, optionally, ``data.order(seed, epoch)``. ``TensorData`` and its
kinds (tokens, graph nodes, views, mixtures) are in memory and slice a batch at once; ``as_dataset``
turns anything else into ``ItemData``:

- a map-style ``torch.utils.data.Dataset`` whose items are dicts of tensors (or numbers, or lists),
  or tuples ``(x,)`` / ``(x, y)``;
- a Hugging Face ``datasets.Dataset`` (its rows are read as torch tensors);
- a ``torch.utils.data.IterableDataset`` that knows its length becomes ``StreamData`` (one pass per
  epoch in the stream's own order, resumed by position); one without a length is refused.

A sample's id is its item's ``id`` when it has one, else its index. An item's ``labels`` (or ``label``)
are its targets (``y``); a ``mask`` or ``attention_mask`` of 0/1 integers is read as a boolean mask.
Collation stacks equal shapes and pads unequal sequences on their first dimension (``pad_values``:
``input_ids`` with the pad id, ``attention_mask`` / ``mask`` with 0, ``y`` / ``labels`` with -100).

The order of an epoch is a function of (seed, epoch) (``epoch_order``, or the data set's own
``order``); the engine cuts it into global batches, groups them into optimiser steps, and each rank
takes positions rank, rank + world, ... of every global batch (``plan``). The DataLoader fetches each
rank's share with ``__getitems__`` (one ``batch`` call), so in-memory sets cost what slicing costs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from ..distributed import shard
from ..errors import DistilleryError
from .core import TensorData, epoch_order

PAD_DEFAULTS = {"y": -100, "labels": -100, "mask": 0, "attention_mask": 0, "token_type_ids": 0}


def _tensor(v: Any, key: str, where: str) -> Any:
    if isinstance(v, Tensor):
        return v
    if isinstance(v, Mapping):
        return {k: _tensor(w, f"{key}.{k}", where) for k, w in v.items()}
    if isinstance(v, (bool, int, float, np.generic, list, tuple, np.ndarray)):
        try:
            return torch.as_tensor(np.asarray(v))
        except (TypeError, ValueError):
            pass
    if isinstance(v, str):
        return v  # text stays text (tokenised by a collate of the user's)
    raise DistilleryError(f"{where}: item key {key!r} holds {type(v).__name__}, which is no tensor; return tensors, "
                          "numbers or lists of numbers from the data set.")


def as_item(item: Any, index: int, where: str) -> dict[str, Any]:
    """One data set item as a dict with an ``id``: tuples become ``x`` (and ``y``), ``labels`` -> ``y``."""
    if isinstance(item, Mapping):
        out = {str(k): _tensor(v, str(k), where) for k, v in item.items()}
    elif isinstance(item, (tuple, list)) and 1 <= len(item) <= 2:
        out = {"x": _tensor(item[0], "x", where)}
        if len(item) == 2:
            out["y"] = _tensor(item[1], "y", where)
    elif isinstance(item, Tensor):
        out = {"x": item}
    else:
        raise DistilleryError(f"{where}: item {index} is a {type(item).__name__}; items must be dicts of tensors or "
                              "tuples (x,) / (x, y).")
    for key in ("labels", "label"):  # transformers' and datasets' names for the targets
        if key in out and "y" not in out:
            out["y"] = out.pop(key)
    if "id" not in out:
        out["id"] = torch.tensor(index, dtype=torch.long)
    elif not isinstance(out["id"], Tensor) or out["id"].dim() != 0 or out["id"].is_floating_point():
        raise DistilleryError(f"{where}: item {index} has an 'id' that is not one integer; give each item one int id.")
    return out


def collate(items: Sequence[dict[str, Any]], pad_values: Mapping[str, int] | None = None, where: str = "") -> dict:
    """Stack items into one batch; sequences of unequal length are right-padded (see the module docstring)."""
    pads = {**PAD_DEFAULTS, **(pad_values or {})}
    keys = list(items[0])
    out: dict[str, Any] = {}
    for k in keys:
        if any(k not in it for it in items):
            raise DistilleryError(f"{where}: item key {k!r} is missing from some items; give every item the same keys.")
        vals = [it[k] for it in items]
        if isinstance(vals[0], Mapping):
            out[k] = collate(vals, pad_values, where)
            continue
        if not isinstance(vals[0], Tensor):
            out[k] = vals  # strings
            continue
        shapes = {tuple(v.shape) for v in vals}
        if len(shapes) == 1:
            out[k] = torch.stack(vals)
            continue
        if len({v.dim() for v in vals}) != 1 or vals[0].dim() == 0 or len({tuple(v.shape[1:]) for v in vals}) != 1:
            raise DistilleryError(f"{where}: item key {k!r} has shapes {sorted(shapes)[:3]} that differ beyond the first "
                                  "dimension; only sequences are padded.")
        length = max(v.shape[0] for v in vals)
        fill = pads.get(k)
        if fill is None:
            raise DistilleryError(f"{where}: item key {k!r} holds sequences of unequal length and no pad value; give "
                                  f"pad_values={{{k!r}: <id>}} (input_ids pad with the tokenizer's pad id).")
        batch = vals[0].new_full((len(vals), length, *vals[0].shape[1:]), fill)
        for i, v in enumerate(vals):
            batch[i, : v.shape[0]] = v
        out[k] = batch
    if isinstance(out.get("mask"), Tensor) and out["mask"].dtype != torch.bool:  # a loss mask (not attention_mask)
        from ..runtime import as_bool_mask

        out["mask"] = as_bool_mask(out["mask"], f"{where} 'mask'")
    return out


def _kinds(first: dict[str, Any]) -> tuple[bool, bool]:
    """(labelled, tokens) of a data set from its first item: tokens when it has a loss mask or per-position targets."""
    y = first.get("y")
    return y is not None, "mask" in first or (isinstance(y, Tensor) and y.dim() >= 1)


def _finish(out: dict[str, Any], tokens: bool) -> dict[str, Any]:
    """A collated batch of token items gets its loss mask from the targets (-100: not trained)."""
    if tokens and "mask" not in out and "y" in out:
        out["mask"] = out["y"] != -100
    return out


class ItemData:
    """A map-style data set of items, served a batch at a time (``batch``/``__getitems__``)."""

    def __init__(self, dataset: Any, *, name: str = "", pad_values: Mapping[str, int] | None = None,
                 num_classes: int | None = None):
        self.dataset = dataset
        self.name = name or type(dataset).__name__
        self.pad_values = dict(pad_values or {})
        try:
            n = len(dataset)
        except TypeError:
            raise DistilleryError(f"{self.name}: the data set has no length; give a map-style Dataset with __len__ and "
                                  "__getitem__.") from None
        if n == 0:
            raise DistilleryError(f"{self.name}: the data set is empty.")
        self._len = n
        self.labelled, self.tokens = _kinds(self._item(0))
        self.num_classes = num_classes

    def __len__(self) -> int:
        return self._len

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input (``x``); () for dict inputs such as token ids of any length."""
        x = self._item(0).get("x")
        return tuple(x.shape) if isinstance(x, Tensor) else ()

    def _item(self, i: int) -> dict[str, Any]:
        return as_item(self.dataset[i], i, self.name)

    def batch(self, index: Tensor | Sequence[int]) -> dict[str, Any]:
        idx = index.tolist() if isinstance(index, Tensor) else [int(i) for i in index]
        getitems = getattr(self.dataset, "__getitems__", None)
        raw = getitems(idx) if callable(getitems) else [self.dataset[i] for i in idx]
        items = [as_item(r, i, self.name) for r, i in zip(raw, idx)]
        return _finish(collate(items, self.pad_values, self.name), self.tokens)

    def __getitems__(self, index: Sequence[int]) -> dict[str, Any]:
        return self.batch(index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._item(int(i))


def as_dataset(data: Any, name: str = "", pad_values: Mapping[str, int] | None = None) -> Any:
    """The engine's data protocol for ``data`` (see the module docstring); ``TensorData`` and objects that
    already have ``batch`` pass through."""
    mod = type(data).__module__ or ""
    hf = mod.startswith("datasets.") and hasattr(data, "with_format")  # a Hugging Face datasets.Dataset
    if not hf and hasattr(data, "batch") and callable(data.batch) and hasattr(data, "__len__"):
        return data
    if isinstance(data, IterableDataset) or (hf and not hasattr(data, "__getitem__")):
        return StreamData(data, name=name, pad_values=pad_values)
    if hf:
        data = data.with_format("torch")
        name = name or str((getattr(data, "info", None) and data.info.dataset_name) or "hf-dataset")
    if not hasattr(data, "__getitem__"):
        raise DistilleryError(f"{type(data).__name__} is not a data set; pass a torch Dataset (items: dicts of tensors or "
                              "(x, y) tuples), a datasets.Dataset or a TensorData.")
    return ItemData(data, name=name, pad_values=pad_values)


class StreamData:
    """An ``IterableDataset`` (or a streaming HF data set) as the engine's data: an epoch is one pass over
    the stream in its own order (``set_epoch(epoch)`` is called when the stream has it, e.g. to reshuffle
    a buffer); a sample's id is its item's ``id`` or its position in the pass. The stream must know its
    length (``__len__``: items per pass), so that epochs, schedules and checkpoints have steps. Each rank
    reads the stream and keeps its own share of every global batch; a resumed run skips the items of
    the steps already done (resume by position, exact for a stream that repeats itself per epoch)."""

    def __init__(self, stream: Any, *, name: str = "", pad_values: Mapping[str, int] | None = None):
        self.stream, self.name = stream, name or type(stream).__name__
        self.pad_values = dict(pad_values or {})
        try:
            self._len = len(stream)
        except TypeError:
            raise DistilleryError(f"{self.name}: the stream has no length; give it a __len__ (items per epoch) so that "
                                  "epochs, schedules and checkpoints have steps.") from None
        first = next(self._read([[0]], 0), None)
        if first is None:
            raise DistilleryError(f"{self.name}: the stream is empty.")
        self.labelled, self.tokens = _kinds(first[0])

    def __len__(self) -> int:
        return self._len

    def order(self, seed: int, epoch: int) -> Tensor:
        return torch.arange(self._len)  # the stream's own order

    def _read(self, lists: Sequence[Sequence[int]], epoch: int):
        """One pass of epoch ``epoch``: the items of each list of increasing positions, list by list (the
        positions of later lists lie after those of earlier ones); the stream is read only as far as needed."""
        if hasattr(self.stream, "set_epoch"):
            self.stream.set_epoch(epoch)
        if not lists:
            return
        it = enumerate(self.stream)
        for want in lists:
            items = []
            for p in want:  # positions increase: read on to each one, dropping the others' items
                while True:
                    try:
                        pos, item = next(it)
                    except StopIteration:
                        raise DistilleryError(f"{self.name}: the stream ended before position {p}; its __len__ "
                                              f"({self._len}) is more than one pass yields.") from None
                    if pos == p:
                        items.append(as_item(item, pos, self.name))
                        break
            yield items

    def batches(self, lists: Sequence[Sequence[int]], epoch: int, every: int = 1, offset: int = 0):
        """One pass: the collated batch of each list of increasing positions (lists offset, offset + every, ...)."""
        for items in self._read(list(lists)[offset::every], epoch):
            yield _finish(collate(items, self.pad_values, self.name), self.tokens)

    def batch(self, index: Tensor | Sequence[int]) -> dict[str, Any]:
        """The items at ``index`` (positions of the first pass; reads the stream up to the last one)."""
        idx = index.tolist() if isinstance(index, Tensor) else [int(i) for i in index]
        want = sorted(set(idx))
        got = dict(zip(want, next(self._read([want], 0))))
        return _finish(collate([got[p] for p in idx], self.pad_values, self.name), self.tokens)

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256(f"stream:{self.name}:{self._len}".encode())
        for k, v in sorted(next(self._read([[0]], 0))[0].items()):
            if isinstance(v, Tensor):
                h.update(f"{k}:{tuple(v.shape)}:{float(v.double().sum()) if v.numel() else 0:.10e}".encode())
        return h.hexdigest()[:16]


class _StreamBatches(IterableDataset):
    """The DataLoader's view of a stream: the batches of the epoch's lists; worker w of W builds lists w, w + W,
    ... (the DataLoader takes from the workers in turn, so the order is kept)."""

    def __init__(self, data: StreamData):
        self.data, self.lists, self.epoch = data, [], 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        every, offset = (1, 0) if info is None else (info.num_workers, info.id)
        return iter(self.data.batches(self.lists, self.epoch, every, offset))


# --------------------------------------------------------------------------- the order of an epoch


@dataclass
class Micro:
    """One micro-batch of a step on this rank: the positions it loads and whether it is a stand-in
    (a rank with no item left in a global batch loads one item and weighs it 0, so that every rank
    runs the same forwards and backwards, which DDP and FSDP need)."""

    index: Tensor
    dummy: bool = False


@dataclass
class Step:
    micro: list[Micro]
    items: int
    """Items in the step over all ranks (the global count that normalises terms over every row)."""


def plan(data: Any, seed: int, epoch: int, batch_size: int, grad_accum: int, rank: int = 0, size: int = 1) -> list[Step]:
    """This rank's steps of epoch ``epoch`` (see the module docstring)."""
    order = data.order(seed, epoch) if hasattr(data, "order") else epoch_order(len(data), seed, epoch)
    glob = list(order.split(batch_size))
    steps = []
    for lo in range(0, len(glob), grad_accum):
        group = glob[lo: lo + grad_accum]
        micro = []
        for index in group:
            local = shard(index, rank, size)
            micro.append(Micro(local) if len(local) else Micro(index[:1], dummy=True))
        steps.append(Step(micro, sum(len(i) for i in group)))
    return steps


class _Indices:
    """The DataLoader's batch sampler: the positions of the micro-batches still to load this epoch."""

    def __init__(self) -> None:
        self.lists: list = []  # index tensors, or lists of ints for worker processes

    def __iter__(self) -> Iterator:
        return iter(self.lists)

    def __len__(self) -> int:
        return len(self.lists)


def _passthrough(batch):
    return batch  # __getitems__ already built the batch


class Loader:
    """A DataLoader over ``data`` whose batches are the micro-batches of ``steps[start:]`` of one epoch."""

    def __init__(self, data: Any, *, num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False,
                 prefetch_factor: int | None = None, seed: int = 0):
        if persistent_workers and num_workers > 0 and hasattr(data, "order"):
            raise DistilleryError(f"{getattr(data, 'name', 'the data set')} orders itself each epoch (views, mixtures, "
                                  "length buckets), which persistent workers would not see; set "
                                  "train.persistent_workers=false.")
        self.indices = _Indices()
        self.in_process = num_workers == 0
        self.generator = torch.Generator()  # the loader never draws from the global RNG (exact resume)
        self.seed = seed
        kw: dict[str, Any] = {}
        if num_workers > 0:
            kw.update(persistent_workers=persistent_workers, multiprocessing_context="fork"
                      if "fork" in torch.multiprocessing.get_all_start_methods() else None)
            if prefetch_factor is not None:
                kw["prefetch_factor"] = prefetch_factor
        self.stream = _StreamBatches(data) if isinstance(data, StreamData) else None
        if self.stream is not None:
            if persistent_workers and num_workers > 0:
                raise DistilleryError(f"{data.name}: a stream's workers start a new pass each epoch; set "
                                      "train.persistent_workers=false.")
            kw.pop("persistent_workers", None)
            self.loader = DataLoader(self.stream, batch_size=None, collate_fn=_passthrough, num_workers=num_workers,
                                     pin_memory=pin_memory, generator=self.generator, **kw)
            return
        ds = data if hasattr(data, "__getitems__") else _Getitems(data)
        self.loader = DataLoader(ds, batch_sampler=self.indices, collate_fn=_passthrough, num_workers=num_workers,
                                 pin_memory=pin_memory, generator=self.generator, **kw)

    def epoch(self, steps: list[Step], start: int, epoch: int) -> Iterator[dict[str, Any]]:
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)
        if self.stream is not None:
            self.stream.lists = [m.index.tolist() for st in steps[start:] for m in st.micro]
            self.stream.epoch = epoch
        else:  # index tensors in this process (no list round trip); lists travel lighter to workers
            self.indices.lists = [m.index if self.in_process else m.index.tolist() for st in steps[start:]
                                  for m in st.micro]
        return iter(self.loader)


class _Getitems(torch.utils.data.Dataset):
    """A data set with ``batch`` but no ``__getitems__``: one ``batch`` call per micro-batch."""

    def __init__(self, data: Any):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, index: list[int] | Tensor) -> dict[str, Any]:
        return self.data.batch(index if isinstance(index, Tensor) else torch.as_tensor(index, dtype=torch.long))


def num_samples(data: Any) -> int:
    """How many samples ``data`` holds (an epoch of a data set that orders itself may be longer or shorter)."""
    x = getattr(data, "x", None)
    return len(x) if isinstance(x, Tensor) else len(data)


def iter_batches(data: Any, batch_size: int = 1024) -> Iterator[dict[str, Any]]:
    """Every sample of ``data`` in order, ``batch_size`` at a time."""
    n = num_samples(data)
    if isinstance(data, StreamData):
        yield from data.batches([list(range(lo, min(lo + batch_size, n))) for lo in range(0, n, batch_size)], 0)
        return
    for lo in range(0, n, batch_size):
        yield data.batch(torch.arange(lo, min(lo + batch_size, n)))


__all__ = ["ItemData", "Loader", "Micro", "Step", "TensorData", "as_dataset", "collate", "iter_batches", "plan"]
