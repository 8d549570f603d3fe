"""Data on disk named by a recipe: tables (jsonl, csv, parquet), a datasets folder, npz arrays and an
image folder; and a run of a recipe on a CSV file."""

import json

import numpy as np
import pytest
import torch

from distillery import data
from distillery.cli import main
from distillery.errors import DistilleryError


def _rows(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 4)) + 2.0 * np.eye(4)[y]
    return [{"a": float(r[0]), "b": float(r[1]), "c": float(r[2]), "d": float(r[3]), "kind": ["x", "y", "z"][k]}
            for r, k in zip(x, y)]


def _csv(path, rows):
    path.write_text("a,b,c,d,kind\n" + "".join(f"{r['a']},{r['b']},{r['c']},{r['d']},{r['kind']}\n" for r in rows))


FEATURES = ["a", "b", "c", "d"]


def test_csv_jsonl_and_parquet_tables_give_the_same_tensors(tmp_path):
    train, test = _rows(60, 0), _rows(20, 1)
    _csv(tmp_path / "tr.csv", train)
    _csv(tmp_path / "te.csv", test)
    for name, rows in (("tr", train), ("te", test)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = {k: data.build(k, {"train": str(tmp_path / f"tr.{k}"), "test": str(tmp_path / f"te.{k}"),
                             "features": FEATURES, "label": "kind"}) for k in ("csv", "jsonl")}
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    for name, rows in (("tr", train), ("te", test)):
        pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / f"{name}.parquet"))
    got["parquet"] = data.build("parquet", {"train": str(tmp_path / "tr.parquet"), "test": str(tmp_path / "te.parquet"),
                                            "features": FEATURES, "label": "kind"})
    ref = got["csv"]
    assert ref["train"].x.shape == (60, 4) and ref["train"].num_classes == 3 and ref["test"].ids.min() == 60
    for k in ("jsonl", "parquet"):
        for split in ("train", "test"):
            assert torch.allclose(got[k][split].x, ref[split].x) and torch.equal(got[k][split].y, ref[split].y)


def test_a_recipe_runs_on_csv_files(tmp_path):
    _csv(tmp_path / "tr.csv", _rows(120, 0))
    _csv(tmp_path / "te.csv", _rows(40, 1))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: csv/kd
runs_dir: {tmp_path}/runs
data: {{name: csv, train: {tmp_path}/tr.csv, test: {tmp_path}/te.csv, features: [a, b, c, d], label: kind}}
teacher: {{model: {{name: mlp, hidden: [32]}}, train: {{epochs: 5, batch_size: 32, lr: 0.01}}}}
student: {{model: {{name: mlp, hidden: [4]}}}}
baseline: {{enabled: false}}
distill: {{data: train, terms: [{{loss: kd, temperature: 2.0}}], train: {{epochs: 3, batch_size: 32, lr: 0.01}}}}
""")
    assert main(["run", str(recipe), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    rows = json.loads((tmp_path / "o" / "summary.json").read_text())["rows"]
    assert rows[0]["accuracy"] > 0.5  # separable blobs: the teacher learns them


def test_npz_image_folder_and_a_datasets_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 4)):
        np.savez(tmp_path / f"{split}.npz", x=rng.normal(size=(n, 5)).astype(np.float32), y=rng.integers(0, 2, n))
    d = data.build("npz", {"train": str(tmp_path / "train.npz"), "test": str(tmp_path / "test.npz")})
    assert d["train"].x.shape == (10, 5) and d["test"].num_classes == 2
    from PIL import Image

    for split in ("train", "test"):
        for c, color in (("cat", 40), ("dog", 200)):
            folder = tmp_path / "img" / split / c
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (12, 10), (color, i * 10, 0)).save(folder / f"{i}.png")
    (tmp_path / "img/train/cat/.DS_Store").write_bytes(b"\x00\x01")  # not an image: skipped by its name
    d = data.build("image_folder", {"train": str(tmp_path / "img/train"), "test": str(tmp_path / "img/test"), "size": 8})
    assert d["train"].x.shape == (6, 3, 8, 8) and d["train"].y.tolist() == [0, 0, 0, 1, 1, 1]
    assert float(d["train"].x.min()) >= 0 and float(d["train"].x.max()) <= 1
    (tmp_path / "img/train/cat/broken.png").write_bytes(b"not an image")
    with pytest.raises(DistilleryError, match=r"broken\.png does not decode"):
        data.build("image_folder", {"train": str(tmp_path / "img/train"), "test": str(tmp_path / "img/test")})
    datasets = pytest.importorskip("datasets")
    rows = _rows(12, 2)
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "validation": datasets.Dataset.from_list(rows)})
    ds.save_to_disk(str(tmp_path / "hf"))
    d = data.build("hf_disk", {"path": str(tmp_path / "hf"), "test": "validation", "features": FEATURES,
                               "label": "kind"})
    assert d["train"].x.shape == (12, 4) and torch.equal(d["train"].y, d["test"].y)


@pytest.mark.parametrize(("args", "words"), [
    ({"label": "species"}, "no column 'species'"),
    ({"features": ["a", "kind"]}, "not all numbers"),
    ({"text": "a"}, "one of them"),
])
def test_bad_tables_are_one_line(tmp_path, args, words):
    _csv(tmp_path / "tr.csv", _rows(10, 0))
    _csv(tmp_path / "te.csv", _rows(4, 1))
    base = {"train": str(tmp_path / "tr.csv"), "test": str(tmp_path / "te.csv"), "features": FEATURES, "label": "kind"}
    with pytest.raises(DistilleryError, match=words):
        data.build("csv", {**base, **args})


def test_a_test_label_the_training_set_lacks_is_refused(tmp_path):
    _csv(tmp_path / "tr.csv", [r for r in _rows(30, 0) if r["kind"] != "z"])
    _csv(tmp_path / "te.csv", _rows(10, 1))
    with pytest.raises(DistilleryError, match="not one of the 2 classes"):
        data.build("csv", {"train": str(tmp_path / "tr.csv"), "test": str(tmp_path / "te.csv"), "features": FEATURES,
                           "label": "kind"})
