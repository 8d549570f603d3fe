"""Data on disk that a recipe names directly (nothing is downloaded; no pickle is read).

- Tables: ``{name: jsonl | csv | parquet, train: FILE, test: FILE, label: COLUMN}`` with either
  ``text: COLUMN`` and ``tokenizer: FOLDER`` (the text tokenised with the folder's ``tokenizer.json``,
  truncated to ``max_length``; items ``input_ids``, ``attention_mask``, ``labels``, padded with the
  tokenizer's pad id) or ``features: [COLUMN, ...]`` (numbers: a ``TensorData`` of (N, F) floats).
- ``{name: hf_disk, path: FOLDER, train: SPLIT, test: SPLIT, ...}``: a ``datasets.save_to_disk`` folder,
  read with the same ``text`` / ``features`` / ``label`` keys.
- ``{name: npz, train: FILE, test: FILE, x: KEY, y: KEY}``: NumPy arrays (``allow_pickle=False``).
- ``{name: image_folder, train: DIR, test: DIR, size: 32}``: one subfolder per class of images decoded
  with Pillow, resized to ``size`` x ``size``, as (N, C, H, W) floats in [0, 1].

Labels are integers 0..C-1, or strings numbered in sorted order of the training labels. A missing
column or key, a label the training set does not have (or outside ``num_classes``), an empty file or
an image that does not decode is a one-line error naming it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DistilleryError
from . import DATASETS
from .core import TensorData
from .loader import ItemData


def _rows(path: str, what: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise DistilleryError(f"data jsonl: {what} file {path!r} does not exist.")
    from ..io import jsonl_rows

    with open(p, encoding="utf-8") as f:
        rows = [row for _, row in jsonl_rows(f, f"data jsonl: {path}")]
    if not rows:
        raise DistilleryError(f"data jsonl: {what} file {path!r} holds no rows.")
    return rows


class _Items(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _table(path: str, what: str) -> list[dict]:
    p = Path(path)
    if p.suffix in (".jsonl", ".json"):
        return _rows(path, what)
    if not p.is_file():
        raise DistilleryError(f"data: {what} file {path!r} does not exist.")
    if p.suffix == ".csv":
        import csv

        with open(p, encoding="utf-8", newline="") as f:
            rows = [dict(r) for r in csv.DictReader(f)]
    elif p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DistilleryError("reading Parquet needs pyarrow; pip install 'distillery[hf]' (or pyarrow).") from None
        try:
            rows = pq.read_table(str(p)).to_pylist()
        except Exception as e:  # pyarrow's own error types for a damaged file
            raise DistilleryError(f"data: {path!r} is not a readable Parquet file ({str(e).splitlines()[0]}).") from None
    else:
        raise DistilleryError(f"data: {path!r}: read .jsonl, .csv or .parquet files here (npz and image folders have "
                              "their own names).")
    if not rows:
        raise DistilleryError(f"data: {what} file {path!r} holds no rows.")
    return rows


def _classes(labels: list, num_classes: int | None) -> tuple[dict, int]:
    def as_int(v):
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v)
        return None

    ints = [as_int(v) for v in labels]
    if all(i is not None for i in ints):
        classes = num_classes or max(ints) + 1
        return {**{i: i for i in range(classes)}, **{str(i): i for i in range(classes)}}, classes
    names = sorted({str(v) for v in labels})
    return {n: i for i, n in enumerate(names)}, len(names)


def _items(raw: dict[str, list[dict]], *, label: str, text: str | None, features: list[str] | None,
           tokenizer: str, max_length: int, num_classes: int | None, kind: str) -> dict:
    if (text is None) == (features is None):
        raise DistilleryError(f"data {kind}: give text: COLUMN (with tokenizer: FOLDER) or features: [COLUMN, ...], one "
                              "of them.")
    columns = [label, *([text] if text is not None else features)]
    for split, rows in raw.items():
        for number, row in enumerate(rows, 1):
            missing = [c for c in columns if c not in row]
            if missing:
                raise DistilleryError(f"data {kind}: row {number} of {split} has no column {missing[0]!r} (it has "
                                      f"{sorted(row)[:8]}); name the columns with text:, features: and label:.")
    index, classes = _classes([r[label] for r in raw["train"]], num_classes)

    def cls(split, number, v):
        key = v if isinstance(v, int) and not isinstance(v, bool) else str(v)
        if key not in index or index[key] >= classes:
            raise DistilleryError(f"data {kind}: row {number} of {split} has label {v!r}, which is not one of the "
                                  f"{classes} classes of the training set.")
        return index[key]

    out: dict = {}
    first = 0
    if text is not None:
        from ..lm.models import load_tokenizer

        if max_length < 2:
            raise DistilleryError(f"data {kind}: max_length must be >= 2, got {max_length}.")
        tok = load_tokenizer(tokenizer).backend_tokenizer  # special tokens as the tokenizer's post-processor adds them
        tok.enable_truncation(max_length)
        pad = next((tok.token_to_id(t) for t in ("[PAD]", "<pad>", "<|pad|>") if tok.token_to_id(t) is not None), 0)
        for split, rows in raw.items():
            items = []
            for number, row in enumerate(rows, 1):
                ids = torch.tensor(tok.encode(str(row[text])).ids, dtype=torch.long)
                items.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                              "labels": cls(split, number, row[label]), "id": first + number - 1})
            first += len(rows)
            out[split] = ItemData(_Items(items), name=f"{kind}/{split}", pad_values={"input_ids": pad},
                                  num_classes=classes)
        return out
    for split, rows in raw.items():
        try:
            x = torch.tensor([[float(row[c]) for c in features] for row in rows], dtype=torch.float32)
        except (TypeError, ValueError):
            raise DistilleryError(f"data {kind}: the features {features} of {split} are not all numbers.") from None
        y = torch.tensor([cls(split, n, row[label]) for n, row in enumerate(rows, 1)], dtype=torch.long)
        out[split] = TensorData(x, y, torch.arange(first, first + len(rows)), classes, f"{kind}/{split}")
        first += len(rows)
    return out


def _table_builder(kind: str):
    def build(train: str = "", test: str = "", label: str = "label", text: str | None = None,
              features: list[str] | None = None, tokenizer: str = "", max_length: int = 128,
              num_classes: int | None = None) -> dict:
        if not train or not test:
            raise DistilleryError(f"data {kind} needs train: FILE and test: FILE.")
        raw = {"train": _table(train, "train"), "test": _table(test, "test")}
        return _items(raw, label=label, text=text, features=features, tokenizer=tokenizer, max_length=max_length,
                      num_classes=num_classes, kind=kind)

    build.__name__ = kind
    build.__doc__ = f"A {kind} table (see the module docstring)."
    return build


for _kind in ("jsonl", "csv", "parquet"):
    DATASETS.add(_kind, _table_builder(_kind))


@DATASETS.register("hf_disk")
def hf_disk(path: str = "", train: str = "train", test: str = "test", label: str = "label", text: str | None = None,
            features: list[str] | None = None, tokenizer: str = "", max_length: int = 128,
            num_classes: int | None = None) -> dict:
    try:
        import datasets
    except ImportError:
        raise DistilleryError("data hf_disk needs the datasets package; pip install 'distillery[hf]'.") from None
    if not Path(path).is_dir():
        raise DistilleryError(f"data hf_disk: {path!r} is not a folder written by datasets' save_to_disk.")
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # datasets' own error types for a folder it cannot read
        raise DistilleryError(f"data hf_disk: {path!r} cannot be read ({str(e).splitlines()[0][:160]}).") from None
    if not hasattr(ds, "keys") or train not in ds or test not in ds:
        have = sorted(ds.keys()) if hasattr(ds, "keys") else "one split"
        raise DistilleryError(f"data hf_disk: {path!r} has splits {have}; name them with train: and test:.")
    raw = {"train": ds[train].to_list(), "test": ds[test].to_list()}
    return _items(raw, label=label, text=text, features=features, tokenizer=tokenizer, max_length=max_length,
                  num_classes=num_classes, kind="hf_disk")


@DATASETS.register("npz")
def npz(train: str = "", test: str = "", x: str = "x", y: str = "y", num_classes: int | None = None) -> dict:
    import numpy as np

    out, first = {}, 0
    labels = {}
    for split, path in (("train", train), ("test", test)):
        if not path or not Path(path).is_file():
            raise DistilleryError(f"data npz: {split} file {path!r} does not exist.")
        try:
            with np.load(path, allow_pickle=False) as z:
                if x not in z.files or y not in z.files:
                    raise DistilleryError(f"data npz: {path} has arrays {z.files}; name the inputs and labels with "
                                          "x: and y:.")
                xs, ys = torch.from_numpy(np.asarray(z[x], dtype=np.float32)), torch.from_numpy(np.asarray(z[y]))
        except (ValueError, OSError) as e:
            raise DistilleryError(f"data npz: {path} is not a readable .npz of plain arrays ({e}).") from None
        if len(xs) != len(ys) or len(xs) == 0:
            raise DistilleryError(f"data npz: {path} holds {len(xs)} inputs and {len(ys)} labels; give as many of each "
                                  "(at least one).")
        labels[split] = ys.long()
        out[split] = (xs, first)
        first += len(xs)
    classes = num_classes or int(labels["train"].max()) + 1
    for split, (xs, start) in out.items():
        ys = labels[split]
        if int(ys.min()) < 0 or int(ys.max()) >= classes:
            raise DistilleryError(f"data npz: labels of {split} lie in [{int(ys.min())}, {int(ys.max())}], outside the "
                                  f"{classes} classes 0..{classes - 1}.")
        out[split] = TensorData(xs, ys, torch.arange(start, start + len(xs)), classes, f"npz/{split}")
    return out


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@DATASETS.register("image_folder")
def image_folder(train: str = "", test: str = "", size: int = 32, grayscale: bool = False) -> dict:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if size < 1:
        raise DistilleryError(f"data image_folder: size must be >= 1, got {size}.")
    root = Path(train)
    if not root.is_dir():
        raise DistilleryError(f"data image_folder: {train!r} is not a folder of class subfolders.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DistilleryError(f"data image_folder: {train!r} holds no class subfolders (one per class, images inside).")
    out, first = {}, 0
    for split, folder in (("train", train), ("test", test)):
        folder = Path(folder)
        if not folder.is_dir():
            raise DistilleryError(f"data image_folder: {str(folder)!r} is not a folder.")
        extra = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in classes)
        if extra:
            raise DistilleryError(f"data image_folder: {folder} has classes {extra} that the training folder has not.")
        xs, ys = [], []
        for c, name in enumerate(classes):
            for f in sorted((folder / name).glob("*")) if (folder / name).is_dir() else []:
                if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES:
                    continue  # .DS_Store, Thumbs.db, a README: not images
                try:
                    with Image.open(f) as im:
                        im = im.convert("L" if grayscale else "RGB").resize((size, size))
                        a = np.asarray(im, dtype=np.float32) / 255.0
                except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
                    raise DistilleryError(f"data image_folder: {f} does not decode as an image ({e}).") from None
                xs.append(torch.from_numpy(a).reshape(size, size, -1).permute(2, 0, 1))
                ys.append(c)
        if not xs:
            raise DistilleryError(f"data image_folder: {folder} holds no images.")
        out[split] = TensorData(torch.stack(xs), torch.tensor(ys), torch.arange(first, first + len(xs)), len(classes),
                                f"image_folder/{split}")
        first += len(xs)
    return out
