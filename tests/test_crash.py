"""Crash safety: a run killed at any of its file writes resumes to the weights of an uninterrupted run.

The fault injector counts the atomic renames (``os.replace``: every file distillery writes commits
by one) and raises ``Crash`` at the Nth and at every later one, so that nothing more reaches the
disk, as after ``kill -9``. After the crash the run is started again as a user would: ``--resume``
when the folder holds a run, else the same ``--out``.
"""

import os

import pytest
import torch
from safetensors.torch import load_file

from distillery.cli import main

RECIPE = """
name: crash/kd
seed: 0
runs_dir: {runs}
data: {{name: mnist1d, num_samples: 300}}
teacher:
  model: {{name: cnn1d, channels: 4, hidden: 8}}
  train: {{epochs: 1, batch_size: 64, lr: 0.01}}
student:
  model: {{name: mlp, hidden: [8]}}
baseline: {{enabled: true, train: {{epochs: 1, batch_size: 64, lr: 0.01}}}}
distill:
  terms:
    - {{loss: kd, temperature: 4.0, weight: 0.9}}
    - {{loss: ce, teacher: null, weight: 0.1, targets: labels}}
  data: train
  train: {{epochs: 2, batch_size: 64, lr: 0.01, checkpoint_every_steps: 2}}
"""


class Crash(BaseException):
    """Not an Exception: nothing in distillery may catch it and carry on."""


def _inject(monkeypatch, at: int | None) -> list[str]:
    real, seen = os.replace, []

    def replace(src, dst, *a, **kw):
        seen.append(str(dst))
        if at is not None and len(seen) >= at:
            raise Crash(f"killed at write {at}: {dst}")
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    return seen


def _recipe(folder):
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "recipe.yaml"
    p.write_text(RECIPE.format(runs=folder / "runs"))
    return p


def _models(out):
    return {name: load_file(str(out / "models" / f"{name}.safetensors")) for name in ("teacher", "baseline", "distilled")}


def test_a_crash_at_every_write_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    writes = _inject(monkeypatch, None)
    assert main(["run", str(_recipe(ref)), "--out", str(ref / "out"), "--quiet"]) == 0
    monkeypatch.undo()
    total = len([w for w in writes if str(ref) in w])  # this run's own writes (not the shared data cache)
    want = _models(ref / "out")
    assert total >= 20, total
    print(f"write points: {total}")
    for n in range(1, total + 1):
        folder = tmp_path / f"crash{n}"
        recipe, out = _recipe(folder), folder / "out"
        _inject(monkeypatch, n)
        with pytest.raises(Crash):
            main(["run", str(recipe), "--out", str(out), "--quiet"])
        monkeypatch.undo()
        if out.is_dir():  # what kill -9 would also leave: a temp file of the interrupted write
            (out / ".distilled.safetensors.x1y2.tmp").write_bytes(b"half a file")
        again = ["--resume", str(out)] if (out / "config.yaml").is_file() else ["--out", str(out)]
        assert main(["run", str(recipe), *again, "--quiet"]) == 0, f"crash at write {n}"
        got = _models(out)
        for name, tensors in want.items():
            for k, v in tensors.items():
                assert torch.equal(v, got[name][k]), f"crash at write {n}: {name} {k}"
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")], f"crash at write {n}: temp files left"


def test_resume_of_a_folder_without_a_run_is_an_error(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    (tmp_path / "empty").mkdir()
    assert main(["run", str(recipe), "--resume", str(tmp_path / "empty"), "--quiet"]) == 2
    assert "holds no run to resume" in capsys.readouterr().err


def test_temp_files_of_an_interrupted_checkpoint_are_removed(tmp_path):
    from distillery.config import TermConfig, TrainConfig
    from distillery.data import TensorData
    from distillery.engine import fit
    from distillery.objective import Objective

    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    data = TensorData(x, x.argmax(1), torch.arange(32), 4, "toy")
    folder = tmp_path / "checkpoints" / "distill"
    folder.mkdir(parents=True)
    stale = [folder / ".last-3.safetensors.abc.tmp", folder / "last-3.safetensors", folder / ".last.json.x.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    torch.manual_seed(0)
    fit(torch.nn.Linear(4, 4), Objective([TermConfig(loss="ce", teacher=None)]), data,
        TrainConfig(epochs=1, batch_size=8), run_dir=tmp_path, progress=False)
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in folder.iterdir()) == ["last-1.safetensors", "last.json"]  # one save: number 1


def test_an_lm_distillation_killed_at_every_write_resumes_to_the_same_model(tmp_path, monkeypatch):
    """The LM flow: a dense teacher store (shards and manifest), checkpoints, the model folder, the report."""
    pytest.importorskip("transformers")
    import json

    docs = tmp_path / "docs.jsonl"
    text = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(60)]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in text))
    common = [f"data={docs}", "block=16", "vocab_size=300", "model=tiny", "train.batch_size=8", "train.log_every=1000",
              "train.checkpoint_every_steps=2", "max_train_blocks=24", f"runs_dir={tmp_path / 'runs'}", "--quiet"]
    assert main(["run", "lm/teacher", *common, "--out", str(tmp_path / "t")]) == 0
    teacher = f"teacher={tmp_path / 't' / 'models' / 'model'}"

    def run(out, store):
        again = ["--resume", str(out)] if (out / "config.yaml").is_file() else ["--out", str(out)]
        return main(["run", "lm/kd", *common, teacher, f"store={store}", *again])

    writes = _inject(monkeypatch, None)
    assert run(tmp_path / "ref", tmp_path / "ref-store") == 0
    monkeypatch.undo()
    mine = [w for w in writes if "ref" in w]
    want = load_file(str(tmp_path / "ref" / "models" / "model" / "model.safetensors"))
    assert len(mine) >= 8, mine
    for n in range(1, len(mine) + 1):
        out, store = tmp_path / f"c{n}", tmp_path / f"c{n}-store"
        _inject(monkeypatch, n)
        with pytest.raises(Crash):
            run(out, store)
        monkeypatch.undo()
        assert run(out, store) == 0, f"crash at write {n}"
        got = load_file(str(out / "models" / "model" / "model.safetensors"))
        assert all(torch.equal(v, got[k]) for k, v in want.items()), f"crash at write {n}"
