import json
import subprocess
import sys

import pytest
import torch

from distillery.cli import main
from distillery.engine import load_checkpoint

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
baseline: {{enabled: true}}
distill:
  terms:
    - {{loss: kd, temperature: 4.0, weight: 0.9}}
    - {{loss: ce, teacher: null, weight: 0.1, targets: labels}}
  data: train
  train: {{epochs: 2, batch_size: 64, lr: 0.01}}
"""


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY.format(runs=tmp_path / "runs"))
    return p


def test_run_end_to_end_then_reuse_teacher_eval_report_runs(tiny, tmp_path, capsys):
    out = tmp_path / "run1"
    assert main(["run", str(tiny), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "teacher" in printed and "distilled" in printed and "baseline" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done"
    assert {r["model"] for r in summary["rows"]} == {"teacher", "baseline", "distilled"}
    assert all(0 <= r["accuracy"] <= 1 for r in summary["rows"])
    html = (out / "report" / "report.html").read_text()
    assert "distilled" in html and ".png" in html
    phases = {json.loads(line)["phase"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert phases == {"teacher", "baseline", "distill"}

    # Second run reuses the cached teacher (no teacher phase trained again) and gives the same numbers.
    out2 = tmp_path / "run2"
    assert main(["run", str(tiny), "--out", str(out2), "--quiet"]) == 0
    capsys.readouterr()
    records2 = [json.loads(line) for line in (out2 / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in records2 if r["event"] == "train"} == {"baseline", "distill"}
    reused = [r for r in records2 if r["phase"] == "teacher"]
    assert len(reused) == 2 and all(r["event"] == "eval" and "reused_from" in r for r in reused)
    rows2 = json.loads((out2 / "summary.json").read_text())["rows"]
    assert [r["accuracy"] for r in rows2] == [r["accuracy"] for r in summary["rows"]]

    assert main(["eval", str(out)]) == 0
    evald = capsys.readouterr().out
    distilled_acc = next(r["accuracy"] for r in summary["rows"] if r["model"] == "distilled")
    assert f"{100 * distilled_acc:.2f}%" in evald
    assert main(["report", str(out)]) == 0
    assert main(["runs", "--runs-dir", str(tmp_path / "runs")]) == 0
    listing = capsys.readouterr().out
    assert "tiny/kd" in listing and "done" in listing


def test_resume_a_finished_run_does_not_retrain(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(tiny), "--out", str(out), "--quiet"]) == 0
    before = (out / "metrics.jsonl").read_text()
    assert main(["run", str(tiny), "--out", str(out), "--quiet"]) == 2
    assert "already holds a run; continue it with --resume" in capsys.readouterr().err
    assert main(["run", str(tiny), "--resume", str(out), "--quiet"]) == 0
    assert (out / "metrics.jsonl").read_text() == before


def test_resume_may_change_where_a_run_goes_not_what_it_computes(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(tiny), "--out", str(out), "--quiet"]) == 0
    created = json.loads((out / "summary.json").read_text())["created"]
    assert main(["run", str(tiny), "distill.train.log_every=3", "distill.train.checkpoint_every_steps=50",
                 "--resume", str(out), "--quiet"]) == 0  # runtime keys: allowed, and recorded
    assert "checkpoint_every_steps: 50" in (out / "config.yaml").read_text()
    assert json.loads((out / "summary.json").read_text())["created"] == created
    assert main(["run", str(tiny), "distill.train.lr=0.5", "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "distill differ" in err and f"distillery run {out / 'config.yaml'} --resume {out}" in err
    assert main(["run", str(tiny), "--resume", str(out), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "--out or --resume" in capsys.readouterr().err


def test_a_failed_run_removes_what_it_wrote_and_nothing_else(tiny, tmp_path, monkeypatch):
    from distillery import pipeline

    out = tmp_path / "mine"
    (out / "models").mkdir(parents=True)
    (out / "models" / "weights.bin").write_text("the user's")
    (out / "notes.md").write_text("the user's")
    (out / "sub").mkdir()
    (out / "sub" / ".x.tmp").write_text("the user's")

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline, "measure", boom)  # after every phase trained: checkpoints exist
    with pytest.raises(RuntimeError):
        main_raw(["run", str(tiny), "--out", str(out), "--quiet"])
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"  # progress: kept, resumable
    monkeypatch.setattr(pipeline, "load_data", boom)  # before anything trained
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "notes.md").write_text("the user's")
    with pytest.raises(RuntimeError):
        main_raw(["run", str(tiny), "--out", str(fresh), "--quiet"])
    assert sorted(p.name for p in fresh.iterdir()) == ["notes.md"]  # its own files gone, the user's kept
    assert (out / "models" / "weights.bin").read_text() == "the user's" and (out / "sub" / ".x.tmp").is_file()


def test_an_interrupted_run_is_recorded_as_interrupted(tiny, tmp_path, monkeypatch):
    from distillery import pipeline

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "measure", stop)
    out = tmp_path / "run"
    assert main(["run", str(tiny), "--out", str(out), "--quiet"]) == 130
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    monkeypatch.undo()
    assert main(["run", str(tiny), "--resume", str(out), "--quiet"]) == 0


def main_raw(argv):
    """The CLI without its catch-all: the test sees the exception itself."""
    from distillery import kinds, recipes

    recipe = recipes.load(argv[1])
    return kinds.run(recipe, run_dir=argv[argv.index("--out") + 1], progress=False)


@pytest.mark.parametrize("args, fragment", [
    (["run", "mnist1d/kdd"], "unknown recipe 'mnist1d/kdd'. Did you mean 'mnist1d/kd'"),
    (["run", "mnist1d/kd", "distill.train.lr=fast"], "distill.train.lr: expected a number"),
    (["run", "mnist1d/kd", "distill.terms.0.loss=kl"], "unknown loss 'kl'"),
    (["eval", "/nonexistent/run"], "run config '/nonexistent/run/config.yaml' is missing"),
])
def test_bad_input_is_one_line_error(args, fragment, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_and_corrupted_weights(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(tiny), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    w = out / "models" / "distilled.safetensors"
    w.write_bytes(w.read_bytes()[:-7] + b"garbage")
    assert main(["eval", str(out)]) == 2
    assert "is corrupted" in capsys.readouterr().err
    w.unlink()
    assert main(["eval", str(out)]) == 2
    assert "distilled weights" in capsys.readouterr().err


def test_validate_and_ls(capsys):
    assert main(["validate"]) == 2  # every shipped recipe: lm/kd reads a teacher that lm/teacher trains first
    got = capsys.readouterr()
    assert "ok      mnist1d/kd" in got.out and "ok      lm/teacher" in got.out and "ok      graph/glnn" in got.out
    bad = got.err.strip().splitlines()  # the recipes that read a model another recipe trains first
    assert bad[0].startswith("invalid lm/kd: teacher 'runs/lm/teacher/models/model' is not a model folder") \
        and "distillery run lm/teacher" in bad[0]
    assert {b.split(":")[0] for b in bad[1:]} == {f"invalid lm/reasoning/{n}" for n in
                                                  ("cross", "lora", "on_policy", "sft", "traces")}
    assert main(["validate", "mnist1d/kd", "nope.yaml"]) == 2
    got = capsys.readouterr()
    assert "ok      mnist1d/kd" in got.out and "invalid nope.yaml: recipe file 'nope.yaml' does not exist" in got.err
    assert main(["ls"]) == 0
    listing = capsys.readouterr().out
    for name in ("mnist1d/kd", "kd", "dkd", "mlp", "cnn1d", "mnist1d_transfer", "digits"):
        assert f"  {name}\n" in listing


def test_console_script_module_entry():
    r = subprocess.run([sys.executable, "-m", "distillery", "ls", "losses"], capture_output=True, text=True, check=True)
    assert "generalized_jsd" in r.stdout


STAGED = TINY.replace("""distill:
  terms:
    - {{loss: kd, temperature: 4.0, weight: 0.9}}
    - {{loss: ce, teacher: null, weight: 0.1, targets: labels}}
""", """distill:
  stages:
    - {{name: head, terms: [{{loss: ce, teacher: null}}], trainable: [head], train: {{epochs: 1, lr: 0.01}}}}
    - {{name: kd, terms: [{{loss: kd}}]}}
""")


def test_staged_recipe_runs_stages_in_order_and_resumes_at_a_stage(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    p = tmp_path / "staged.yaml"
    p.write_text(STAGED.format(runs=tmp_path / "runs"))
    out = tmp_path / "run"
    assert main(["run", str(p), "--out", str(out), "--quiet"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    order = list(dict.fromkeys(r["phase"] for r in records if r["event"] == "train"))
    assert order == ["teacher", "baseline", "distill-head", "distill-kd"]
    first = load_file(str(out / "models/distilled.safetensors"))
    stage1 = load_checkpoint(out / "checkpoints/distill-head/last")[1]
    init = {k: v for k, v in load_checkpoint(out / "checkpoints/baseline/last")[1].items()}
    assert "student/body.0.weight" in stage1 and "student/body.0.weight" in init
    # Stage 1 trained only the head: the body still has the initial weights of the student.
    torch.manual_seed(0)
    from distillery import models

    fresh = models.build("mlp", (40,), 10, {"hidden": [16]}).state_dict()
    assert torch.equal(stage1["student/body.0.weight"], fresh["body.0.weight"])
    assert not torch.equal(stage1["student/head.weight"], fresh["head.weight"])
    # Lose stage 2 and resume: stage 1 is loaded as it was, stage 2 retrained to the same weights.
    for f in (out / "checkpoints/distill-kd").iterdir():
        f.unlink()
    assert main(["run", str(p), "--resume", str(out), "--quiet"]) == 0
    capsys.readouterr()
    again = load_file(str(out / "models/distilled.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    with pytest.raises(Exception, match="exactly one of them"):
        from distillery import recipes

        recipes.load(str(p), ["distill.terms=[{loss: kd}]"])


def test_wrong_stage_path_fails_before_any_training(tmp_path, capsys):
    p = tmp_path / "staged.yaml"
    p.write_text(STAGED.format(runs=tmp_path / "runs").replace("trainable: [head]", "trainable: [haed]"))
    assert main(["run", str(p), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "unknown module path 'haed'. Did you mean 'head'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cache_then_run_from_the_store(tiny, tmp_path, capsys):
    store = tmp_path / "store"
    args = ["cache", str(tiny), "--data", "train", "--out", str(store), "--quiet", "--shard-size", "200"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "480 samples" in printed and "distill.teacher_store=" in printed
    assert main(args) == 0  # a second call finds the store complete and leaves it
    capsys.readouterr()
    out_live, out_store = tmp_path / "live", tmp_path / "cached"
    assert main(["run", str(tiny), "--out", str(out_live), "--quiet", "baseline.enabled=false"]) == 0
    assert main(["run", str(tiny), "--out", str(out_store), "--quiet", "baseline.enabled=false",
                 f"distill.teacher_store={store}"]) == 0
    capsys.readouterr()
    acc = [next(r["accuracy"] for r in json.loads((d / "summary.json").read_text())["rows"] if r["model"] == "distilled")
           for d in (out_live, out_store)]
    assert acc[0] == pytest.approx(acc[1], abs=0.01)  # dense float32 store: the live teacher's answers
    topk = tmp_path / "topk"
    assert main(["cache", str(tiny), "--data", "train", "--out", str(topk), "--quiet", "--top-k", "2"]) == 0
    # a store of another data set is refused with the reason
    assert main(["run", str(tiny), "--out", str(tmp_path / "x"), "--quiet", "distill.data=transfer",
                 f"distill.teacher_store={store}"]) == 2
    assert "data_fingerprint" in capsys.readouterr().err
    assert main(["run", str(tiny), "--out", str(tmp_path / "y"), "--quiet", "baseline.enabled=false",
                 f"distill.teacher_store={topk}"]) == 0


def test_labelled_share_mixes_both_sets_in_every_batch(tiny, tmp_path, capsys):
    out = tmp_path / "mixed"
    assert main(["run", str(tiny), "--out", str(out), "--quiet", "baseline.enabled=false",
                 "distill.data=train+transfer", "distill.labelled_share=0.25"]) == 0
    capsys.readouterr()
    assert json.loads((out / "summary.json").read_text())["status"] == "done"
    terms = [json.loads(line)["terms"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train" and json.loads(line)["phase"] == "distill"]
    assert all(t["ce"] > 0 for t in terms)  # the labelled rows reach the ce term
    assert main(["run", str(tiny), "--out", str(tmp_path / "bad"), "--quiet", "distill.labelled_share=0.5"]) == 2
    assert "train+transfer" in capsys.readouterr().err


def test_selection_on_the_test_split_is_refused(tiny, capsys):
    assert main(["run", str(tiny), "--quiet", "distill.train.select=best"]) == 2
    assert "tune on test" in capsys.readouterr().err


def test_run_with_two_processes(tiny, tmp_path, capsys):
    out = tmp_path / "ddp"
    rc = main(["run", str(tiny), "--out", str(out), "--quiet", "--nproc", "2", "baseline.enabled=false",
               "distill.train.epochs=1"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("world_size") == 2 for r in records if r["event"] == "train")
    assert main(["run", str(tiny), "--quiet", "--nproc", "2"]) == 2  # one run directory for all ranks
    assert "--out" in capsys.readouterr().err


def test_run_with_two_processes_sharded_by_fsdp(tiny, tmp_path):
    out = tmp_path / "fsdp"
    rc = main(["run", str(tiny), "--out", str(out), "--quiet", "--nproc", "2", "baseline.enabled=false",
               "distill.train.epochs=1", "distill.train.strategy=fsdp"])
    assert rc == 0
    assert json.loads((out / "summary.json").read_text())["status"] == "done"
    meta = json.loads((out / "checkpoints/distill/last.json").read_text())
    assert meta["format"] == "dcp" and meta["world_size"] == 2
    from safetensors.torch import load_file

    weights = load_file(str(out / "models/distilled.safetensors"))  # consolidated: whole tensors, no shards
    assert all(v.dim() >= 1 for v in weights.values()) and "body.0.weight" in "".join(weights)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_recipe_on_a_machine_without_cuda_is_one_line(tmp_path, capsys):
    rc = main(["run", "mnist1d/kd_gpu", "--out", str(tmp_path / "g"), "--quiet", f"runs_dir={tmp_path}",
               "transfer.size=100", "teacher.train.epochs=1"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device; available: cpu" in err[0]


def test_eval_refuses_weights_without_their_checksum_record(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(tiny), "--out", str(out), "--quiet", "baseline.enabled=false", "distill.train.epochs=1"]) == 0
    weights = out / "models" / "distilled.safetensors"
    (out / "models" / "distilled.json").unlink()
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0  # the record travels in the file's header: one atomic write
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(weights)), str(weights))  # the same tensors with no record anywhere (from elsewhere)
    assert main(["eval", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checksum record" in err[0] and "--unverified" in err[0]
    assert main(["eval", str(out), "--unverified"]) == 0
    from distillery.io import save_with_record

    save_with_record(weights, load_file(str(weights)), {"model": "x"})
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF  # a flipped bit in the data
    weights.write_bytes(bytes(raw))
    assert main(["eval", str(out)]) == 2
    assert "corrupted" in capsys.readouterr().err


def test_latency_is_timed_at_one_thread_with_its_spread():
    from torch import nn

    from distillery.pipeline import latency

    before = torch.get_num_threads()
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    out = latency(Probe(), torch.zeros(4, 3), repeats=3, rounds=2)
    assert set(seen) == {1} and len(seen) == 5 + 3 * 2 and torch.get_num_threads() == before
    assert out["ms"] >= 0 and out["spread_ms"] >= 0 and out["threads"] == 1


def test_the_teacher_cache_key_follows_the_model_source(tmp_path, monkeypatch):
    import importlib

    from distillery.pipeline import model_structure

    keys = []
    for i, act in enumerate(("relu", "gelu")):
        pkg = tmp_path / f"v{i}"
        pkg.mkdir()
        (pkg / "user_teacher.py").write_text(
            "import torch\n\n\nclass Teacher(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
            f"        self.lin = torch.nn.Linear(3, 2)\n\n    def forward(self, x):\n        return torch.{act}(self.lin(x))\n")
        monkeypatch.syspath_prepend(str(pkg))
        import sys

        sys.modules.pop("user_teacher", None)
        mod = importlib.import_module("user_teacher")
        keys.append(model_structure(mod.Teacher()))
    assert keys[0] != keys[1]  # same class name, same shapes, another activation: another cache entry
