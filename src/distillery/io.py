"""Atomic writes (temp file in the same folder, fsync, rename) and verified loads."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import DistilleryError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Load JSON, turning a missing or corrupted file into a clear ``DistilleryError``."""
    path = Path(path)
    if not path.is_file():
        raise DistilleryError(f"{what} {str(path)!r} does not exist.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DistilleryError(f"{what} {str(path)!r} is corrupted ({e}); delete it or rerun the step that wrote it.") from None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Save a dict of tensors as safetensors, atomically (contiguous copies are made as needed),
    with optional string ``metadata`` in the header."""
    from safetensors.torch import save

    return atomic_write_bytes(path, save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=metadata))


def cache_root() -> Path:
    """Where generated data sets are cached: ``$DISTILLERY_CACHE`` or ``~/.cache/distillery``."""
    return Path(os.environ.get("DISTILLERY_CACHE") or Path.home() / ".cache" / "distillery")


def cached_arrays(path: str | os.PathLike, build) -> dict:
    """numpy arrays from ``path`` (.npz, no pickle) when its checksum verifies, else ``build()`` them
    and store them atomically with a ``.json`` checksum beside. A corrupted file is rebuilt."""
    import io as _io

    import numpy as np

    path = Path(path)
    side = path.with_suffix(".json")
    if path.is_file() and side.is_file():
        try:
            ok = json.loads(side.read_text()).get("sha256") == sha256_file(path)
        except (json.JSONDecodeError, OSError):
            ok = False
        if ok:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    arrays = build()
    buf = _io.BytesIO()
    np.savez(buf, **arrays)
    try:
        atomic_write_bytes(path, buf.getvalue())
        atomic_write_json(side, {"sha256": sha256_file(path)})
    except OSError:
        pass  # a read-only cache only costs time
    return arrays


def atomic_folder(path: str | os.PathLike, write) -> Path:
    """Write a folder so that readers see the old one or the whole new one: ``write(tmp)`` fills a
    temporary sibling, which then replaces ``path`` by rename (an old folder is moved aside first
    and removed after). A failing ``write`` leaves ``path`` as it was."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


@contextlib.contextmanager
def locked_beside(path: str | os.PathLike):
    """An exclusive lock on ``<path>.lock`` (its folder made first) while the block runs: processes that
    share ``path`` (a store, a cached teacher) build it once; the others wait, then find it built."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


UNVERIFIED_HINT = ("if you trust the files (a folder from elsewhere), load them unverified: verify=False in Python, "
                   "--unverified on the command line, verify: false in a recipe")


def check_files(folder: str | os.PathLike, record: dict | None, where: str, *, verify: bool = True) -> None:
    """Verify the files a checksum record lists (``record["files"]``: name -> sha256) inside ``folder``. A
    missing record or an empty list is an error unless ``verify`` is off: an unchecked load is never silent."""
    if not verify:
        return
    folder = Path(folder)
    files = (record or {}).get("files")
    if not isinstance(files, dict) or not files:
        raise DistilleryError(f"{where} has no checksum record of its files, so its weights cannot be verified; "
                              f"{UNVERIFIED_HINT}.")
    for name, digest in files.items():
        target = (folder / str(name)).resolve()
        if folder.resolve() not in target.parents:
            raise DistilleryError(f"{where}: its checksum record names {name!r}, outside the folder; it was altered.")
        if not target.is_file() or sha256_file(target) != digest:
            raise DistilleryError(f"{folder / name} is missing or does not match its checksum in {where}; the "
                                  "folder is damaged: save the model again.")


def _record_digest(raw: bytes) -> tuple[str, dict]:
    """sha256 over a safetensors file's tensor entries (names, dtypes, shapes, offsets) and data, and its
    ``__metadata__``: what a record embedded in the header covers (everything but itself)."""
    if len(raw) < 8:
        raise DistilleryError("not a safetensors file (shorter than its 8-byte header length)")
    n = int.from_bytes(raw[:8], "little")
    if n <= 0 or 8 + n > len(raw):
        raise DistilleryError("not a safetensors file (its header length points past the end)")
    try:
        header = json.loads(raw[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DistilleryError("not a safetensors file (its header is not JSON)") from None
    metadata = header.pop("__metadata__", None) or {}
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    h.update(raw[8 + n:])
    return h.hexdigest(), metadata


def save_with_record(path: str | os.PathLike, tensors: dict, meta: dict, header: dict[str, str] | None = None) -> Path:
    """Safetensors whose header carries its own checksum record (``distillery_sha256`` over the tensor entries
    and data, ``distillery_meta``): weights and record commit together in one atomic rename. ``header`` adds
    string entries of another writer's metadata (torchao's description of quantized tensors)."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    digest, _ = _record_digest(save(tensors))
    blob = save(tensors, metadata={**(header or {}), "distillery_sha256": digest,
                                   "distillery_meta": json.dumps(meta, default=_json_default)})
    return atomic_write_bytes(path, blob)


def read_record(path: str | os.PathLike) -> dict | None:
    """The checksum record embedded by ``save_with_record``, verified (a mismatch is an error); None when the
    file carries none (written elsewhere, or by an older distillery)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DistilleryError(f"cannot read {str(path)!r}: {e.strerror}.") from None
    try:
        digest, metadata = _record_digest(raw)
    except DistilleryError as e:
        raise DistilleryError(f"weights file {str(path)!r} is {e}.") from None
    want = metadata.get("distillery_sha256")
    if want is None:
        return None
    if want != digest:
        raise DistilleryError(f"weights file {str(path)!r} is corrupted (it does not match the checksum in its "
                              "header); delete it and rerun.")
    try:
        return json.loads(metadata.get("distillery_meta") or "{}")
    except json.JSONDecodeError:
        raise DistilleryError(f"weights file {str(path)!r} has a damaged record in its header.") from None


def jsonl_rows(lines, where: str):
    """(line number, object) of every non-blank JSONL line; a line that is not a JSON object is one error
    naming ``where:line``."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DistilleryError(f"{where}:{n} is not JSON ({e.msg}); each line must be a JSON object.") from None
        if not isinstance(obj, dict):
            raise DistilleryError(f"{where}:{n} is not a JSON object; each line must be one.")
        yield n, obj


def jsonl_texts(lines, where: str, field: str) -> list[str]:
    """The string ``field`` of every JSONL object (``jsonl_rows``); a line without it is one error."""
    out = []
    for n, obj in jsonl_rows(lines, where):
        if not isinstance(obj.get(field), str):
            raise DistilleryError(f'{where}:{n} has no string field {field!r}; each line must be {{"{field}": "..."}} '
                                  "(name the field that holds the text).")
        out.append(obj[field])
    return out
