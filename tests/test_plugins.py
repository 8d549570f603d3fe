"""The user's own components through plugins: a module named with --plugins, and an installed
package's entry point; YAML itself runs nothing. Bad plugins are one-line errors."""

import json
import textwrap

import pytest

from distillery import plugins
from distillery.cli import main

PLUGIN = '''
import torch
from torch import nn

from distillery import data, losses, models
from distillery.data import TensorData


@models.MODELS.register("{prefix}_net")
def net(input_shape, num_classes, width=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), width), nn.ReLU(),
                         nn.Linear(width, num_classes))


@data.DATASETS.register("{prefix}_blobs")
def blobs(n=240, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 6, generator=g) + 2.0 * nn.functional.one_hot(y, 6).float()
    cut = n * 3 // 4
    return {{"train": TensorData(x[:cut], y[:cut], torch.arange(cut), 3, "blobs/train"),
             "test": TensorData(x[cut:], y[cut:], torch.arange(cut, n), 3, "blobs/test")}}


@losses.register("{prefix}_kd")
def my_kd(student_logits, teacher_logits, *, temperature=2.0):
    """Soft cross-entropy against the teacher at a temperature (the user's own loss)."""
    t = (teacher_logits / temperature).softmax(-1)
    return -(t * (student_logits / temperature).log_softmax(-1)).sum(-1).mean() * temperature ** 2
'''

RECIPE = """
name: user/kd
runs_dir: {runs}
data: {{name: {prefix}_blobs}}
teacher:
  model: {{name: {prefix}_net, width: 16}}
  train: {{epochs: 3, batch_size: 32, lr: 0.01}}
student:
  model: {{name: {prefix}_net, width: 4}}
baseline: {{enabled: false}}
distill:
  data: train
  terms:
    - {{loss: {prefix}_kd, temperature: 2.0}}
  train: {{epochs: 2, batch_size: 32, lr: 0.01}}
"""


def _package(root, name, prefix, body=PLUGIN):
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "distill.py").write_text(textwrap.dedent(body.format(prefix=prefix)))
    return pkg


def test_a_plugin_module_brings_its_model_data_and_loss_into_a_recipe(tmp_path, monkeypatch, capsys):
    _package(tmp_path / "src", "userpkg", "userpkg")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(runs=tmp_path / "runs", prefix="userpkg"))
    assert main(["validate", str(recipe)]) == 2  # without the plugin the names are unknown
    assert "userpkg_blobs" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--plugins", "userpkg.distill", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done" and {r["model"] for r in summary["rows"]} == {"teacher", "distilled"}
    terms = {k for line in (out / "metrics.jsonl").read_text().splitlines() for k in json.loads(line).get("terms", {})}
    assert "userpkg_kd" in terms
    assert main(["ls", "models", "--plugins", "userpkg.distill"]) == 0
    assert "userpkg_net" in capsys.readouterr().out


def test_an_installed_packages_entry_point_is_loaded(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _package(site, "eppkg", "eppkg")
    info = site / "eppkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: eppkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[distillery.plugins]\neppkg = eppkg.distill\n")
    monkeypatch.syspath_prepend(str(site))
    from distillery import losses, models

    assert "eppkg_net" not in models.MODELS
    assert "eppkg.distill" in plugins.load()
    assert "eppkg_net" in models.MODELS and "eppkg_kd" in losses.LOSSES


@pytest.mark.parametrize(("body", "words"), [
    ("import not_a_module_anywhere\n", "no module named 'not_a_module_anywhere'"),
    ("raise RuntimeError('boom')\n", "failed while importing: RuntimeError: boom"),
    ("from distillery import models\nmodels.MODELS.register('mlp')(lambda *a: None)\n", "'mlp' is registered twice"),
])
def test_a_bad_plugin_is_one_line(tmp_path, monkeypatch, capsys, body, words):
    name = f"bad{abs(hash(body)) % 10**8}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "distill.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["validate", "mnist1d/kd", "--plugins", f"{name}.distill"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and f"{name}.distill" in err[0]
    assert main(["validate", "mnist1d/kd", "--plugins", "nowhere_to_be_found"]) == 2
    assert "PYTHONPATH" in capsys.readouterr().err


def test_cp_copies_a_recipe_to_start_from_and_never_overwrites(tmp_path, capsys):
    assert main(["cp", "mnist1d/kd", str(tmp_path)]) == 0
    copy = tmp_path / "kd.yaml"
    assert "name: mnist1d/kd" in copy.read_text() and "distillery run" in capsys.readouterr().out
    assert main(["cp", "mnist1d/kd", str(copy)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["validate", str(copy)]) == 0


KIND_PLUGIN = '''
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from distillery import kinds
from distillery.config import TrainConfig
from distillery.data import TensorData
from distillery.engine import fit
from distillery.objective import Objective, Term
from distillery.pipeline import save_weights


@dataclass
class Regress:
    kind: Literal["{prefix}_regress"] = "{prefix}_regress"
    name: str = ""
    width: int = 4
    train: TrainConfig | None = None
    seed: int = 0
    threads: int = 1
    runs_dir: str = "runs"


def run(recipe, rd, *, progress=None):
    g = torch.Generator().manual_seed(recipe.seed)
    x = torch.randn(64, recipe.width, generator=g)
    y = (x.sum(1) > 0).long()
    model = nn.Linear(recipe.width, 2)
    fit(model, Objective([Term("ce", teacher=None)]), TensorData(x, y, torch.arange(64), 2, "toy"),
        recipe.train or TrainConfig(epochs=2, batch_size=16), run_dir=rd.path, phase="train", seed=recipe.seed,
        resume=rd.resume, progress=False)
    save_weights(model, rd.models / "model.safetensors", {{"width": recipe.width}})
    acc = float((model(x).argmax(1) == y).float().mean())
    return [{{"model": "linear", "accuracy": acc}}]


kinds.register("{prefix}_regress", Regress, run, help="a plugin's own flow")
'''


def test_a_plugin_brings_a_recipe_kind_of_its_own(tmp_path, monkeypatch, capsys):
    _package(tmp_path / "src", "kindpkg", "kindpkg", body=KIND_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"kind: kindpkg_regress\nwidth: 3\nruns_dir: {tmp_path / 'runs'}\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "x"), "--quiet"]) == 2  # no plugin: unknown kind
    assert "unknown recipe kind 'kindpkg_regress'" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--plugins", "kindpkg.distill", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "kindpkg_regress" and summary["name"] == "mine" and summary["status"] == "done"
    assert (out / "models" / "model.safetensors").is_file() and (out / "report" / "report.html").is_file()
    assert (out / "checkpoints" / "train" / "last.json").is_file() and "width: 3" in (out / "config.yaml").read_text()
    assert main(["runs", "--runs-dir", str(tmp_path / "runs")]) == 0
    assert "linear" in capsys.readouterr().out
    assert main(["ls", "kinds", "--plugins", "kindpkg.distill"]) == 0
    assert "kindpkg_regress" in capsys.readouterr().out
