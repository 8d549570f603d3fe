"""`distillery search`: an Optuna study over a recipe's space, end to end on a tiny recipe."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

optuna = pytest.importorskip("optuna")

from distillery.cli import main  # noqa: E402

TINY = """
name: tiny/kd
seed: 0
runs_dir: {runs}
data: {{name: mnist1d, num_samples: 600}}
transfer: {{name: mnist1d_transfer, size: 300, seed: 5}}
teacher:
  model: {{name: cnn1d, channels: 8, hidden: 16}}
  train: {{epochs: 2, batch_size: 64, lr: 0.01}}
student:
  model: {{name: mlp, hidden: [16]}}
distill:
  terms:
    - {{loss: kd, temperature: 4.0}}
  data: transfer
  train: {{epochs: 2, batch_size: 64, lr: 0.01}}
"""

SPACE = """
params:
  distill.terms: {choice: [[{loss: kd}], [{loss: kd}, {loss: hint, student: body, teacher: fc, weight: 0.1}]]}
  distill.terms.0.temperature: {float: [1.0, 8.0], log: true}
  distill.train.lr: {float: [0.003, 0.1], log: true}
"""


@pytest.fixture
def files(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY.format(runs=tmp_path / "runs"))
    (tmp_path / "space.yaml").write_text(SPACE)
    return tmp_path


def _search(files, *more, out="out", space="space.yaml"):
    return main(["search", str(files / "tiny.yaml"), "--space", str(files / space), "--out", str(files / out),
                 "--quiet", *more])


def _study(out):
    url = f"sqlite:///{out / 'study.sqlite'}"
    (name,) = optuna.get_all_study_names(url)  # distillery-<recipe>-search-<signature>
    assert name.startswith("distillery-tiny/kd-search-")
    return optuna.load_study(study_name=name, storage=url)


def test_a_tiny_study_end_to_end_and_its_best_recipe_runs(files, capsys):
    assert _search(files, "--trials", "3") == 0
    out = files / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done" and summary["kind"] == "search" and summary["trials"]["complete"] >= 1
    best = summary["rows"][0]
    assert best["model"].endswith("(best)") and 0 <= best["accuracy"] <= 1 and 0 <= best["val_accuracy"] <= 1
    html = (out / "report" / "report.html").read_text()
    assert 'src="history.png"' in html and 'src="importance.png"' in html
    assert len(list((out / "stores").glob("*/manifest.json"))) == 1  # one teacher store for every trial
    assert len(list((out / "cache" / "teachers").iterdir())) == 1  # the teacher trained once
    study = _study(out)
    assert len(study.trials) == 3 and all(t.params.keys() == {"distill.terms", "distill.terms.0.temperature",
                                                              "distill.train.lr"} for t in study.trials)
    # the written recipe holds the best trial's values and runs as any recipe does
    text = (out / "best.yaml").read_text()
    assert "name: tiny/kd-searched" in text and "cache_dir" not in text
    trial = study.trials[int(best["model"].split()[1])]
    assert f"{trial.params['distill.train.lr']}" in text
    assert main(["validate", str(out / "best.yaml")]) == 0
    capsys.readouterr()
    assert main(["run", str(out / "best.yaml"), "baseline.enabled=false", "--out", str(files / "again"),
                 "--quiet"]) == 0
    # rerunning the command continues the study (more trials; the same recipe and space)
    assert _search(files, "--trials", "5") == 0
    assert len(_study(out).trials) == 5


def test_an_interrupted_study_resumes_and_workers_share_one_storage(files):
    out = files / "out"
    cmd = [sys.executable, "-m", "distillery", "search", str(files / "tiny.yaml"), "--space",
           str(files / "space.yaml"), "--out", str(out), "--quiet", "--trials", "4", "--workers", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    study = _study(out)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) >= 4 and json.loads((out / "summary.json").read_text())["status"] == "done"
    assert len(list((out / "stores").glob("*/manifest.json"))) == 1
    # a study whose run directory lost its config (a crash before it was finished) continues from its storage
    (out / "config.yaml").unlink()
    (out / "summary.json").unlink()
    assert _search(files, "--trials", "5") == 0
    assert len([t for t in _study(out).trials if t.state.is_finished()]) >= 5


def test_multi_objective_gives_a_pareto_front(files):
    (files / "multi.yaml").write_text("""
params:
  student.model.hidden: {choice: [[4], [16], [64]]}
  distill.train.lr: {float: [0.003, 0.1], log: true}
objectives: [accuracy, params]
""")
    assert _search(files, "--trials", "4", space="multi.yaml", out="multi") == 0
    summary = json.loads((files / "multi" / "summary.json").read_text())
    assert (files / "multi" / "report" / "pareto.png").is_file()
    assert all("val_accuracy" in r for r in summary["rows"])
    assert _study(files / "multi").directions == [optuna.study.StudyDirection.MAXIMIZE,
                                                   optuna.study.StudyDirection.MINIMIZE]


def test_a_diverging_trial_is_failed_and_the_study_goes_on(files):
    (files / "nan.yaml").write_text("""
params:
  distill.train.lr: {choice: [1.0e+30, 0.01]}
  distill.train.optimizer: {choice: [sgd]}
pruner: none
""")
    assert _search(files, "--trials", "4", space="nan.yaml", out="nan") == 0
    states = {t.state.name for t in _study(files / "nan").trials}
    assert "FAIL" in states and "COMPLETE" in states


@pytest.mark.parametrize(("space", "words"), [
    ("params: {distill.train.lr: {choice: []}}", "choice is empty"),
    ("params: {distill.train.lr: {float: [0.1, 0.01]}}", "low 0.1 is above high 0.01"),
    ("params: {distill.train.lrr: {float: [0.01, 0.1]}}", "did you mean 'lr'"),
    ("params: {distill.terms.0.loss: {choice: [kd, kdd]}}", "unknown loss 'kdd'"),
    ("params: {distill.train.lr: {float: [0, 0.1], log: true}}", "log range needs low > 0"),
    ("parms: {}", "did you mean 'params'"),
    ("params: {distill.train.epochs: {int: [1, 3], step: 0.5}}", "a whole one for int"),
    ("params: {distill.train.lr: {float: [0.01, 0.1]}}\nobjectives: [params]", "objectives must start with accuracy"),
])
def test_bad_spaces_are_one_line(files, capsys, space, words):
    (files / "bad.yaml").write_text(space)
    assert _search(files, "--trials", "2", space="bad.yaml", out="bad") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words.lower() in err[0].lower(), err
    assert not (files / "bad").exists()


def test_a_bad_storage_and_a_study_of_another_recipe_are_one_line(files, capsys):
    assert _search(files, "--trials", "2", "--storage", "nosuchdb://x/y", out="s1") == 2
    assert "cannot open the study storage 'nosuchdb://x/y'" in capsys.readouterr().err
    url = f"sqlite:///{files / 'shared.sqlite'}"
    assert _search(files, "--trials", "1", "--storage", url, out="s2") == 0
    assert "shared.sqlite" not in (files / "s2" / "config.yaml").read_text()  # a URL may hold a password
    (files / "space2.yaml").write_text(SPACE.replace("8.0", "6.0"))
    capsys.readouterr()
    assert _search(files, "--trials", "1", space="space2.yaml", out="s2") == 2  # its folder holds another study
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a run of another recipe (space differ" in err[0]
    # another space's study shares the storage under a name of its own
    assert _search(files, "--trials", "1", "--storage", url, space="space2.yaml", out="s3") == 0
    assert len(optuna.get_all_study_names(url)) == 2


def test_the_shipped_spaces_check_against_their_recipes():
    from distillery import recipes
    from distillery.config import load_yaml, to_dict
    from distillery.search import SearchConfig

    spaces = sorted(recipes.SHIPPED.rglob("*.space.yaml"))
    assert len(spaces) >= 2
    for f in spaces:
        name = f.relative_to(recipes.SHIPPED).as_posix().removesuffix(".space.yaml")
        cfg = SearchConfig(recipe=to_dict(recipes.load(name)), space=load_yaml(f), name=name)
        assert cfg.parsed.params and f"distillery search {name} --space recipes/{name}.space.yaml" in f.read_text()
