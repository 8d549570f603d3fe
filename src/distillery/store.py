"""The teacher-output store: what a teacher says about every sample of a data set, written once,
keyed by sample id, and read by any number of student runs.

Layout of a store folder::

    manifest.json               fingerprints, temperature, k, dtypes, shard list with checksums
    shard-00000/ids.npy         int64 sample ids of the shard's rows
    shard-00000/logits.npy      dense: (n, C) the teacher's raw logits (float32 unless chosen)
    shard-00000/values.npy      top-k: (n, k) log-probabilities (float16, or bfloat16 bits as uint16)
    shard-00000/indices.npy     top-k: (n, k) class indices, the smallest integer type that holds C
    shard-00000/tail.npy        top-k with tail="bucket": (n,) float32 log of the mass outside the top k
    shard-00000/packed.npy      top-k with codec="packed" instead of values/indices/tail: (n, R) uint8
                                records of ``lm.logit_codec`` (Elias-Fano indices, b-bit log-probs, 1-byte
                                tail), the codec's settings in the manifest and checked on every open
    shard-00000/tap.<path>.npy  optional features of a tapped module, float32 (or the chosen dtype)

Each shard is written to a temporary folder and renamed into place, then recorded in the manifest
(also written atomically) with the sha256 of its files, so an interrupted ``write_store`` rerun
continues after the last recorded shard, and a shard present on disk but not in the manifest (cut
mid-write) is rewritten. ``TeacherStore`` verifies every shard's checksum once when it opens,
memory-maps the arrays, and refuses a store whose fingerprints do not match what the caller expects.
No pickle anywhere: ``numpy.load(..., allow_pickle=False)`` and JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.core import TensorData
from .errors import DistilleryError
from .io import atomic_write_json, read_json
from .lm.logit_codec import PackedCodec, decode_topk, encode
from .losses.sparse import TopK
from .teachers import Teacher

FORMAT = "distillery-teacher-store"
VERSION = 1
DTYPES = ("float32", "float16", "bfloat16")
CODECS = ("packed",)


# --------------------------------------------------------------------------- fingerprints


def _hash_tensors(h, tensors: dict[str, Tensor]) -> None:
    for k in sorted(tensors):
        v = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")


def model_fingerprint(model: nn.Module, config: Any = None) -> str:
    """sha256 of a model's class, weights and buffers, and its config (JSON)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    _hash_tensors(h, dict(model.state_dict()))
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    return h.hexdigest()


def data_fingerprint(data: TensorData) -> str:
    """sha256 of a data set's sample ids and inputs (labels do not change what a teacher says)."""
    h = hashlib.sha256()
    _hash_tensors(h, {"ids": data.ids, "x": data.x})
    return h.hexdigest()


def index_dtype(num_classes: int) -> np.dtype:
    """The smallest integer type that holds class indices 0..num_classes-1."""
    for dt in (np.uint8, np.uint16, np.int32):
        if num_classes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def _to_numpy(t: Tensor, dtype: str) -> np.ndarray:
    t = t.detach().cpu()
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return t.to(getattr(torch, dtype)).numpy()


def _from_numpy(a: np.ndarray, dtype: str) -> Tensor:
    a = np.ascontiguousarray(a)
    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _shard_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".npy")


def _shard_sha(folder: Path) -> str:
    h = hashlib.sha256()
    for p in _shard_files(folder):
        h.update(p.name.encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- writing


@torch.no_grad()
def write_store(
    teacher: Teacher,
    data: TensorData,
    out: str | Path,
    *,
    teacher_fingerprint: str,
    top_k: int | None = None,
    temperature: float = 1.0,
    tail: str = "bucket",
    dtype: str | None = None,
    taps: Sequence[str] = (),
    shard_size: int = 4096,
    batch_size: int = 1024,
    views: int = 1,
    augment=None,
    codec: str | None = None,
    value_bits: int = 4,
    value_clamp: float = 8.0,
    progress: bool = False,
) -> Path:
    """Write (or continue writing) the store of ``teacher`` on ``data`` into ``out``.

    Dense (``top_k=None``): the teacher's logits for every class, float32 unless ``dtype`` says
    otherwise (``temperature`` applies to top-k stores). Top-k: the k largest log-probabilities (``dtype`` float16 by default, or
    bfloat16) and their indices; ``tail="bucket"`` keeps the rest of the mass as one log-probability,
    ``"drop"`` discards it. ``taps``: features of tapped teacher modules, stored too. ``views`` > 1 with
    an ``augment`` (``data.views``): the answers for each augmented view, keyed ``v<view>.<array>``.
    Token data (``lm.corpus.TokenData``: (n, T) blocks) store (n, T, k) top-k rows per block, read back
    by sample id as a (B, T, k) ``TopK``; their batches hold at most 4,096 tokens.
    ``codec="packed"`` (top-k only): each row's k log-probs, indices and tail in one record of
    ``lm.logit_codec`` (``value_bits`` b per log-prob, step ``value_clamp`` / (2^b - 1) nats below the row's
    top entry; about 1.5 bytes per kept entry at b = 4 for a vocabulary of 8,192 instead of 4 to 6), read
    back as the same ``TopK``; ``dtype`` then only applies to taps."""
    out = Path(out)
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise DistilleryError(f"top_k must be an integer >= 1 or None (dense), got {top_k!r}.")
    if tail not in ("bucket", "drop"):
        raise DistilleryError(f"tail must be bucket or drop, got {tail!r}.")
    dtype = dtype or ("float32" if top_k is None else "float16")
    if dtype not in DTYPES:
        raise DistilleryError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if not (math.isfinite(temperature) and temperature > 0):
        raise DistilleryError(f"temperature must be a finite number > 0, got {temperature!r}.")
    if shard_size < 1:
        raise DistilleryError(f"shard_size must be >= 1, got {shard_size}.")
    if len(data) == 0:
        raise DistilleryError(f"{data.name or 'the data set'} is empty; there is nothing to store.")
    if views < 1 or (views > 1 and augment is None):
        raise DistilleryError(f"views={views}: several views need an augment (distillery.data.views); one view needs none.")
    if codec is not None and codec not in CODECS:
        raise DistilleryError(f"codec must be one of {', '.join(CODECS)} or None, got {codec!r}.")
    if codec is not None and top_k is None:
        raise DistilleryError("codec='packed' compresses top-k stores; pass top_k too (e.g. top_k=64), or no codec.")
    packed = None if codec is None else PackedCodec(data.num_classes, min(int(top_k), data.num_classes),
                                                    value_bits, value_clamp).describe()
    if getattr(data, "tokens", False):  # (n, T, V) answers: batch by a budget of 4,096 tokens, not by rows
        batch_size = max(1, min(batch_size, 4096 // max(1, data.x.shape[1])))
    settings = {"format": FORMAT, "version": VERSION, "teacher_fingerprint": teacher_fingerprint,
                "data_fingerprint": data_fingerprint(data), "data_name": data.name, "num_samples": len(data),
                "num_classes": data.num_classes, "temperature": float(temperature), "top_k": top_k,
                "tail": tail if top_k is not None else None, "dtype": dtype,
                "index_dtype": str(index_dtype(data.num_classes)) if top_k is not None else None,
                "taps": list(dict.fromkeys(t for t in taps if t != "logits")), "shard_size": int(shard_size),
                "views": int(views), "augment": None if augment is None else _describe(augment), "codec": packed}
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".shard-*.tmp-*"):  # left by a crashed writer
        shutil.rmtree(stale, ignore_errors=True)
    manifest_path = out / "manifest.json"
    shards: list[dict] = []
    if manifest_path.is_file():
        old = read_manifest(manifest_path)
        differs = [k for k in settings if old.get(k) != settings[k]]
        if differs:
            raise DistilleryError(f"{out} holds a store written with other settings ({', '.join(differs)} differ); "
                                  "write to a new folder, or delete this one.")
        for sh in old.get("shards", []):  # keep the recorded shards whose files still check out
            folder = out / sh["file"]
            if folder.is_dir() and _shard_sha(folder) == sh["sha256"]:
                shards.append(sh)
            else:
                break
    n_shards = math.ceil(len(data) / shard_size)
    for i in range(len(shards), n_shards):
        lo, hi = i * shard_size, min(len(data), (i + 1) * shard_size)
        if augment is None:
            arrays = _answer(teacher, data, lo, hi, settings, batch_size)
        else:
            from .data.views import view_seeds

            arrays = {}
            for v in range(views):
                seen = TensorData(augment(data.x[lo:hi], view_seeds(data.ids[lo:hi], v)), None, data.ids[lo:hi],
                                  data.num_classes, data.name)
                part = _answer(teacher, seen, 0, hi - lo, settings, batch_size)
                arrays["ids"] = part.pop("ids")
                arrays.update({f"v{v}.{k}": a for k, a in part.items()})
        name = f"shard-{i:05d}"
        tmp = out / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for key, a in arrays.items():
            np.save(tmp / f"{key}.npy", a, allow_pickle=False)
        final = out / name
        shutil.rmtree(final, ignore_errors=True)  # a shard cut mid-write, or one that failed its checksum
        os.replace(tmp, final)
        shards.append({"file": name, "rows": hi - lo, "sha256": _shard_sha(final)})
        _write_manifest(manifest_path, {**settings, "shards": shards, "complete": i + 1 == n_shards})
        if progress:
            print(f"store: shard {i + 1}/{n_shards} ({hi} of {len(data)} samples)", flush=True)
    if not shards or not read_manifest(manifest_path).get("complete"):
        _write_manifest(manifest_path, {**settings, "shards": shards, "complete": True})
    return out


def write_store_shared(teacher: Teacher, data: TensorData, out: str | Path, **kwargs) -> Path:
    """``write_store`` under a lock file beside ``out``: processes that share one store (runs of one teacher
    and data, the trials and workers of a search) write it once; the others wait, then find it complete."""
    from .io import locked_beside

    with locked_beside(out):
        return write_store(teacher, data, out, **kwargs)


def _seal(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _write_manifest(path: Path, manifest: dict) -> None:
    """The manifest with a checksum over every field (temperature, k, fingerprints, shard list)."""
    atomic_write_json(path, {**manifest, "sha256": _seal(manifest)})


def read_manifest(path: Path) -> dict:
    """A store's manifest, verified: an edited field (a temperature changed by hand) or a shard entry that
    names a path outside the store is refused."""
    m = read_json(path, "store manifest")
    if not isinstance(m, dict) or m.get("sha256") != _seal(m):
        raise DistilleryError(f"{path}: the manifest does not match its checksum (edited, damaged, or written by an "
                              "older distillery); write the store again with `distillery cache`.")
    for sh in m.get("shards", []):
        name = str(sh.get("file", ""))
        if not re.fullmatch(r"shard-\d{5}", name):
            raise DistilleryError(f"{path}: shard entry {name!r} is not a shard of this store; the manifest was altered.")
    return m


def _describe(augment) -> Any:
    return augment.describe() if hasattr(augment, "describe") else type(augment).__qualname__


def _answer(teacher: Teacher, data: TensorData, lo: int, hi: int, settings: dict, batch_size: int) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    taps = settings["taps"]
    for start in range(lo, hi, batch_size):
        index = torch.arange(start, min(hi, start + batch_size))
        # the inputs only (x, and pos for packed token rows): no ids, a precomputed teacher would answer from its table
        batch = {k: v for k, v in data.batch(index).items() if k not in ("id", "y", "mask")}
        ans = teacher(batch, taps)
        logits = ans["logits"].float()
        if logits.shape[-1] != settings["num_classes"]:
            raise DistilleryError(f"the teacher gives {logits.shape[-1]} classes, the data set {settings['num_classes']}.")
        logp = F.log_softmax(logits / settings["temperature"], dim=-1)
        rows: dict[str, np.ndarray] = {"ids": data.ids[index].numpy().astype(np.int64)}
        k = settings["top_k"]
        if k is None:
            rows["logits"] = _to_numpy(logits, settings["dtype"])  # raw: exact for every loss, any temperature
        else:
            k = min(k, logp.shape[-1])  # over the last dim: (n, C) rows, or (n, T, V) token sequences
            values, idx = logp.topk(k, dim=-1)
            rest = logp.scatter(-1, idx, float("-inf")).logsumexp(-1)
            if settings.get("codec") is not None:  # one record per row; the tail is in it either way
                rows["packed"] = encode(PackedCodec.from_manifest(settings["codec"]), values.double().cpu().numpy(),
                                        idx.cpu().numpy(), rest.double().cpu().numpy())
            else:
                rows["values"] = _to_numpy(values, settings["dtype"])
                rows["indices"] = idx.cpu().numpy().astype(settings["index_dtype"])
                if settings["tail"] == "bucket":
                    rows["tail"] = rest.cpu().numpy().astype(np.float32)
        for t in taps:
            rows[f"tap.{t}"] = _to_numpy(ans[t].float(), "float32" if settings["dtype"] == "float32" else settings["dtype"])
        for key, a in rows.items():
            parts.setdefault(key, []).append(a)
    return {k: np.concatenate(v) for k, v in parts.items()}


# --------------------------------------------------------------------------- reading


class TeacherStore:
    """A written store, opened read-only: checksums verified once, arrays memory-mapped, rows found
    by sample id. ``expect`` maps manifest keys (``teacher_fingerprint``, ``data_fingerprint``, ...)
    to the values the caller needs; any mismatch is refused with the key named."""

    def __init__(self, path: str | Path, *, expect: dict[str, Any] | None = None, verify: bool = True):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.is_file():
            raise DistilleryError(f"{self.path} is not a teacher-output store (no manifest.json); "
                                  "write one with `distillery cache` or distillery.store.write_store.")
        self.manifest = m = read_manifest(mpath)
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise DistilleryError(f"{mpath}: not a {FORMAT} v{VERSION} manifest.")
        if not m.get("complete"):
            raise DistilleryError(f"{self.path}: the store is incomplete ({sum(s['rows'] for s in m['shards'])} of "
                                  f"{m['num_samples']} samples); rerun the same `distillery cache` command to finish it.")
        for key, want in (expect or {}).items():
            if m.get(key) != want:
                raise DistilleryError(
                    f"{self.path}: the store's {key} is {str(m.get(key))[:16]}..., but this run needs {str(want)[:16]}...; "
                    "it was written for another teacher or data set. Write a new store for this recipe.")
        self.arrays: list[dict[str, np.ndarray]] = []
        for sh in m["shards"]:
            folder = self.path / sh["file"]
            if not folder.is_dir():
                raise DistilleryError(f"{self.path}: shard {sh['file']} is missing; rerun `distillery cache` to rewrite it.")
            if verify and _shard_sha(folder) != sh["sha256"]:
                raise DistilleryError(f"{self.path}: shard {sh['file']} is corrupted (checksum mismatch); "
                                      "rerun `distillery cache` with the same settings to rewrite it.")
            self.arrays.append({p.stem: np.load(p, mmap_mode="r", allow_pickle=False) for p in _shard_files(folder)})
        ids = np.concatenate([a["ids"] for a in self.arrays]) if self.arrays else np.zeros(0, np.int64)
        shard_of = np.concatenate([np.full(len(a["ids"]), i) for i, a in enumerate(self.arrays)]) if self.arrays \
            else np.zeros(0, np.int64)
        row_of = np.concatenate([np.arange(len(a["ids"])) for a in self.arrays]) if self.arrays else np.zeros(0, np.int64)
        order = np.argsort(ids, kind="stable")
        self.sorted_ids, self.shard_of, self.row_of = ids[order], shard_of[order], row_of[order]
        self.num_classes = int(m["num_classes"])
        self.temperature = float(m["temperature"])
        self.top_k = m["top_k"]
        self.codec = None if m.get("codec") is None else PackedCodec.from_manifest(m["codec"])
        if self.codec is not None:
            for sh, arrays in zip(m["shards"], self.arrays):
                bad = [k for k, a in arrays.items() if k.endswith("packed") and a.shape[-1] != self.codec.record_bytes]
                if bad or not any(k.endswith("packed") for k in arrays):
                    raise DistilleryError(f"{self.path}: shard {sh['file']} does not hold {self.codec.record_bytes}-byte "
                                          "packed records, as its manifest says; write the store again.")

    def __len__(self) -> int:
        return len(self.sorted_ids)

    def bytes_per_sample(self) -> float:
        total = sum(a.nbytes for arrays in self.arrays for a in arrays.values())
        return total / max(len(self), 1)

    def _locate(self, ids: Tensor) -> tuple[np.ndarray, np.ndarray]:
        q = ids.detach().cpu().numpy().astype(np.int64)
        pos = np.searchsorted(self.sorted_ids, q).clip(max=max(len(self.sorted_ids) - 1, 0))
        found = self.sorted_ids[pos] == q if len(self.sorted_ids) else np.zeros(len(q), bool)
        if not found.all():
            raise DistilleryError(f"sample ids {q[~found][:5].tolist()} are not in the store {self.path}; "
                                  "write the store for the data set being trained on.")
        return self.shard_of[pos], self.row_of[pos]

    def _gather(self, key: str, shard: np.ndarray, row: np.ndarray) -> np.ndarray:
        first = self.arrays[0][key]
        out = np.empty((len(row), *first.shape[1:]), dtype=first.dtype)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.arrays[s][key][row[sel]]
        return out

    def lookup(self, ids: Tensor, taps: Sequence[str] = (), view: Tensor | None = None) -> dict[str, Any]:
        """The stored answers for ``ids``: ``logits`` (dense: the teacher's logits) or a ``TopK``,
        and each tap's features; of view ``view`` (per row) in a store of several views."""
        views = int(self.manifest.get("views", 1))
        if views == 1:
            if view is not None and bool((view != 0).any()):
                raise DistilleryError(f"the store {self.path} holds one view; the batch asks for view {int(view.max())}.")
            return self._lookup(ids, taps, "")
        if view is None:
            raise DistilleryError(f"the store {self.path} holds {views} views; the batch must say which (batch['view'], "
                                  "as distillery.data.views.ViewData gives).")
        if int(view.min()) < 0 or int(view.max()) >= views:
            raise DistilleryError(f"view {int(view.max())} is not in the store ({views} views).")
        parts = {int(v): self._lookup(ids[view == v], taps, f"v{int(v)}.") for v in torch.unique(view)}
        out: dict[str, Any] = {}
        for key in next(iter(parts.values())):
            first = parts[next(iter(parts))][key]
            if isinstance(first, TopK):
                lp = torch.empty(len(ids), first.log_probs.shape[1])
                ix = torch.empty(len(ids), first.indices.shape[1], dtype=torch.long)
                tl = None if first.tail is None else torch.empty(len(ids))
                for v, p in parts.items():
                    sel = view == v
                    lp[sel], ix[sel] = p[key].log_probs, p[key].indices
                    if tl is not None:
                        tl[sel] = p[key].tail
                out[key] = TopK(lp, ix, tl, first.num_classes, first.temperature)
            else:
                full = torch.empty((len(ids), *first.shape[1:]), dtype=first.dtype)
                for v, p in parts.items():
                    full[view == v] = p[key]
                out[key] = full
        return out

    def _lookup(self, ids: Tensor, taps: Sequence[str], prefix: str) -> dict[str, Any]:
        shard, row = self._locate(ids)
        m = self.manifest
        out: dict[str, Any] = {}
        if self.top_k is None:
            out["logits"] = _from_numpy(self._gather(f"{prefix}logits", shard, row), m["dtype"]).float()
        elif self.codec is not None:
            out["logits"] = decode_topk(self.codec, self._gather(f"{prefix}packed", shard, row),
                                        temperature=self.temperature, tail=m["tail"] == "bucket")
        else:
            values = _from_numpy(self._gather(f"{prefix}values", shard, row), m["dtype"]).float()
            idx = torch.from_numpy(self._gather(f"{prefix}indices", shard, row).astype(np.int64))
            tail = torch.from_numpy(self._gather(f"{prefix}tail", shard, row)) if m["tail"] == "bucket" else None
            out["logits"] = TopK(values, idx, tail, self.num_classes, self.temperature)
        for t in taps:
            if t == "logits":
                continue
            if f"{prefix}tap.{t}" not in self.arrays[0]:
                raise DistilleryError(f"the store holds the taps {m['taps']}, not {t!r}; write it with that tap.")
            dt = "float32" if m["dtype"] == "float32" else m["dtype"]
            out[t] = _from_numpy(self._gather(f"{prefix}tap.{t}", shard, row), dt).float()
        return out


class CachedTeacher:
    """The teacher protocol answered from a ``TeacherStore`` by ``batch["id"]``: every loss and regime
    works unchanged. Dense stores give the teacher's logits (exact in float32); top-k stores give a
    ``TopK``, which ``kd`` reads without building (N, C) teacher tensors (other losses refuse it). Batches without ids are
    refused (``needs_ids``): a store knows samples, not inputs."""

    needs_ids = True

    def __init__(self, store: TeacherStore | str | Path, **open_kwargs):
        self.store = store if isinstance(store, TeacherStore) else TeacherStore(store, **open_kwargs)

    def check_taps(self, taps: Sequence[str]) -> None:
        extra = [t for t in taps if t != "logits" and t not in self.store.manifest["taps"]]
        if extra:
            raise DistilleryError(f"the store {self.store.path} holds the taps {self.store.manifest['taps']}, not {extra}; "
                                  "write the store with those taps.")

    def __call__(self, batch: dict[str, Tensor], taps: Sequence[str] = ()) -> dict[str, Any]:
        if "id" not in batch:
            raise DistilleryError("a cached teacher answers by sample id, but the batch has no 'id'.")
        self.check_taps(taps)
        view = batch.get("view")
        return self.store.lookup(batch["id"].cpu(), taps, None if view is None else view.cpu())

    def fingerprint(self) -> str:
        return self.store.manifest["sha256"][:16]  # the manifest's seal covers every field (read_manifest)
