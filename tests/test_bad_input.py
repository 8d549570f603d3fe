"""Bad input across every subcommand: each case is exit code 2 and one line on stderr, never a traceback.

The cases are what a user (or an attacker) types: values out of range, wrong types, unknown names,
missing or garbled files and folders, flags that make no sense. Each is checked before anything is
trained or written where that is knowable.
"""

import pytest

from distillery.cli import main

TINY = """
name: tiny/kd
seed: 0
runs_dir: {runs}
data: {{name: mnist1d, num_samples: 300}}
teacher:
  model: {{name: cnn1d, channels: 4, hidden: 8}}
  train: {{epochs: 1, batch_size: 64, lr: 0.01}}
student:
  model: {{name: mlp, hidden: [8]}}
baseline: {{enabled: false}}
distill:
  terms:
    - {{loss: kd, temperature: 4.0}}
  data: train
  train: {{epochs: 1, batch_size: 64, lr: 0.01}}
"""

V = ["validate", "{recipe}", "--set"]  # validate the tiny recipe with one override
R = ["run", "{recipe}", "--quiet", "--out", "{tmp}/out"]

CASES = [
    # ---- train settings (validated when the recipe loads)
    ("lr nan", [*V, "distill.train.lr=.nan"], "finite"),
    ("lr negative", [*V, "distill.train.lr=-1"], "lr"),
    ("min_lr above lr", [*V, "distill.train.min_lr=1.0"], "above"),
    ("warm-up negative", [*V, "distill.train.warmup_epochs=-1"], "warmup_epochs"),
    ("weight decay negative", [*V, "distill.train.weight_decay=-1"], "weight_decay"),
    ("step_epochs zero", [*V, "distill.train.step_epochs=0"], "step_epochs"),
    ("epochs zero", [*V, "distill.train.epochs=0"], "epochs"),
    ("batch size negative", [*V, "distill.train.batch_size=-3"], "batch_size"),
    ("grad_accum zero", [*V, "distill.train.grad_accum=0"], "grad_accum"),
    ("clip zero", [*V, "distill.train.clip_grad_norm=0"], "clip_grad_norm"),
    ("momentum one", [*V, "distill.train.momentum=1.0"], "momentum"),
    ("device made up", [*V, "distill.train.device=gpu0"], "device"),
    ("precision fp8", [*V, "distill.train.precision=fp8"], "precision"),
    ("strategy zero3", [*V, "distill.train.strategy=zero3"], "strategy"),
    ("tracker unknown", [*V, "distill.train.loggers=[neptune]"], "tracker"),
    ("workers negative", [*V, "distill.train.num_workers=-1"], "num_workers"),
    ("prefetch without workers", [*V, "distill.train.prefetch_factor=2"], "prefetch"),
    ("epochs a string", [*V, "distill.train.epochs=many"], "integer"),
    ("teacher epochs negative", [*V, "teacher.train.epochs=-1"], "epochs"),
    # ---- recipe structure and names
    ("loss unknown", [*V, "distill.terms.0.loss=kdd"], "kdd"),
    ("loss parameter unknown", [*V, "distill.terms.0.temprature=2"], "temprature"),
    ("loss temperature negative", [*V, "distill.terms.0.temperature=-1"], "temperature"),
    ("term weight a string", [*V, "distill.terms.0.weight=heavy"], "number"),
    ("no terms", [*V, "distill.terms=[]"], "terms"),
    ("model unknown", [*V, "student.model.name=resnet9000"], "resnet9000"),
    ("model argument unknown", [*V, "student.model.widht=3"], "widht"),
    ("hidden negative", [*V, "student.model.hidden=[-5]"], "hidden"),
    ("data unknown", [*V, "data.name=imagenet"], "imagenet"),
    ("data size zero", [*V, "data.num_samples=0"], "num_samples"),
    ("unknown top key", [*V, "foo=1"], "foo"),
    ("transfer missing", [*V, "distill.data=transfer"], "transfer"),
    ("labelled share above 1", [*V, "distill.data=train+transfer", "--set",
                                "transfer={{name: mnist1d_transfer, size: 100, seed: 3}}", "--set",
                                "distill.labelled_share=2"], "share"),
    ("transfer size zero", [*V, "transfer={{name: mnist1d_transfer, size: 0, seed: 3}}", "--set",
                            "distill.data=transfer"], "size"),
    ("teacher dtype fp8", [*V, "teacher.dtype=fp8"], "dtype"),
    ("threads zero", [*V, "threads=0"], "threads"),
    ("seed a string", [*V, "seed=abc"], "integer"),
    ("baseline switch a string", [*V, "baseline.enabled=maybe"], "true or false"),
    ("term reads the teacher's null", [*V, "distill.terms.0.teacher=null"], "teacher"),
    ("override without a value", ["validate", "{recipe}", "--set", "distill.train.lr"], "key.path=value"),
    ("override into a value", [*V, "seed.x=1"], "value, not a section"),
    # ---- files and folders
    ("recipe unknown", ["run", "mnist1d/kdd", "--quiet"], "kdd"),
    ("recipe garbled", ["run", "{tmp}/garbled.yaml", "--quiet"], "YAML"),
    ("recipe a list", ["run", "{tmp}/list.yaml", "--quiet"], "mapping"),
    ("resume of an empty folder", ["run", "{recipe}", "--quiet", "--resume", "{tmp}/empty"], "no run"),
    ("teacher weights missing", [*R, "teacher.checkpoint={tmp}/nothing.safetensors"], "does not exist"),
    ("teacher weights garbled", [*R, "teacher.checkpoint={tmp}/garbled.safetensors", "teacher.verify=false"],
     "safetensors"),
    ("teacher weights without record", [*R, "teacher.checkpoint={tmp}/plain.safetensors"], "checksum record"),
    ("no CUDA", [*R, "distill.train.device=cuda:3"], "device"),
    ("nproc not a number", ["run", "{recipe}", "--nproc", "two"], "nproc"),
    ("stray argument", ["run", "{recipe}", "nonsense"], "key.path=value"),
    ("eval of nothing", ["eval", "{tmp}/nothing"], "nothing"),
    ("eval of an empty folder", ["eval", "{tmp}/empty"], "config"),
    ("report of nothing", ["report", "{tmp}/nothing"], "nothing"),
    ("ls of nothing", ["ls", "everything"], "invalid choice"),
    ("cache top-k zero", ["cache", "{recipe}", "--out", "{tmp}/store", "--top-k", "0"], "top"),
    ("cache temperature negative", ["cache", "{recipe}", "--out", "{tmp}/store", "--temperature", "-1"], "temperature"),
    ("cache shard size zero", ["cache", "{recipe}", "--out", "{tmp}/store", "--shard-size", "0"], "shard"),
    ("cache data unknown", ["cache", "{recipe}", "--out", "{tmp}/store", "--data", "all"], "data"),
    ("embed of no folder", ["embed", "{tmp}/nothing", "--input", "{tmp}/s.txt"], "nothing"),
    ("embed of a garbled folder", ["embed", "{tmp}/garbled", "--input", "{tmp}/s.txt"], "garbled"),
    ("embed batch size negative", ["embed", "{tmp}/garbled", "--input", "{tmp}/s.txt", "--batch-size", "-3"],
     "batch"),
    ("embed output over its input", ["embed", "{tmp}/garbled", "--input", "{tmp}/s.txt", "--output", "{tmp}/s.txt"],
     "input"),
    ("embed output is a folder", ["embed", "{tmp}/garbled", "--input", "{tmp}/s.txt", "--output", "{tmp}/empty"],
     "folder"),
    ("embed run batch size negative", ["run", "embed/static", "train.batch_size=-3", "--quiet", "--out", "{tmp}/e"],
     "batch_size"),
    ("embed run held-out negative", ["run", "embed/layers", "held_out=-5", "--quiet", "--out", "{tmp}/e"], "held_out"),
    ("embed run layers not numbers", ["run", "embed/layers", "layers=[a,b]", "--quiet", "--out", "{tmp}/e"], "layers"),
    ("embed run teacher missing", ["run", "embed/layers", "teacher={tmp}/nothing", "runs_dir={tmp}/runs", "--quiet",
                                   "--out", "{tmp}/e"], "nothing"),
    ("lm recipe unknown", ["run", "lm/kdd"], "kdd"),
    ("lm teacher missing", ["run", "lm/kd", "teacher={tmp}/nothing", "runs_dir={tmp}/runs", "--quiet", "--out", "{tmp}/l"], "nothing"),
    ("lm block zero", ["run", "lm/kd", "block=0", "--out", "{tmp}/l"], "block"),
    ("lm method unknown", ["run", "lm/kd", "method=magic", "--out", "{tmp}/l"], "magic"),
    ("lm keep above one", ["run", "lm/kd", "keep=1.5", "--out", "{tmp}/l"], "keep"),
    ("lm on-policy lambda negative", ["run", "lm/kd", "on_policy.lam=-0.1", "--out", "{tmp}/l"], "lam"),
    ("lm chunk size zero", ["run", "lm/kd", "chunk_size=0", "--out", "{tmp}/l"], "chunk_size"),
    ("condense recipe unknown", ["run", "condense/nothing"], "nothing"),
    ("condense ipc zero", ["run", "condense/digits_dm", "ipc=0", "--out", "{tmp}/c"], "ipc"),
    ("condense iterations negative", ["run", "condense/digits_dm", "settings.iterations=-5", "--out", "{tmp}/c"],
     "iterations"),
    ("serve of no folder", ["serve", "{tmp}/nothing"], "nothing"),
    ("serve port out of range", ["serve", "{tmp}/nothing", "--port", "70000"], "port"),
]


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "recipe.yaml").write_text(TINY.format(runs=tmp / "runs"))
    (tmp / "garbled.yaml").write_text("name: [unclosed\n  - : :")
    (tmp / "list.yaml").write_text("- a\n- b\n")
    (tmp / "garbled.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp / "plain.safetensors"))  # readable, but with no record
    (tmp / "empty").mkdir()
    (tmp / "garbled").mkdir()
    (tmp / "garbled" / "config.json").write_text("{not json")
    (tmp / "garbled" / "tokenizer.json").write_text("{not json")
    (tmp / "s.txt").write_text("one sentence\nanother one\n")
    return tmp


def test_there_are_at_least_sixty_cases():
    assert len(CASES) >= 60
    assert len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("name,argv,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_code_2(name, argv, needle, place, capsys):
    args = [a.format(tmp=place, recipe=place / "recipe.yaml") for a in argv]
    try:
        rc = main(args)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2, f"{name}: exit code {rc}, stderr: {err[-500:]}"
    assert "Traceback" not in err, f"{name}: {err[-800:]}"
    assert len(lines) == 1, f"{name}: {len(lines)} lines: {err[-800:]}"
    assert needle.lower() in lines[0].lower(), f"{name}: {lines[0]!r} does not name {needle!r}"
