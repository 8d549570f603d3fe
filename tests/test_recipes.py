"""Every shipped recipe, of every kind, runs through `distillery run` with tiny overrides (as litgpt
tests its configs): the recipes a user copies with `distillery cp` are known to work end to end.

Recipes whose family tests already run them through `distillery run` (with more checks) are listed in
ELSEWHERE with that file; the guard test makes sure each is still run there and that no shipped recipe
is left out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillery import recipes
from distillery.cli import main

HERE = Path(__file__).parent
FAST = ["threads=1"]
CLASSIFY = ["teacher.train.epochs=1", "baseline.train.epochs=1", "distill.train.epochs=1", "transfer.size=600"]
TINY: dict[str, list[str]] = {
    "mnist1d/kd": CLASSIFY,
    "mnist1d/fitnets": [*CLASSIFY, "distill.stages.0.train.epochs=1"],
    # the GPU recipe's settings on this CPU: the device and bf16 switched off, the rest as shipped
    "mnist1d/kd_gpu": [*CLASSIFY, "teacher.train.device=cpu", "baseline.train.device=cpu",
                       "distill.train.device=cpu", "distill.train.precision=fp32", "teacher.dtype=fp32",
                       "distill.train.pin_memory=false", "distill.train.num_workers=0"],
    "digits/kd": ["teacher.train.epochs=1", "distill.train.epochs=1"],
    "condense/digits_mtt": ["settings.iterations=2", "settings.experts=1", "settings.train_epochs=2",
                            "settings.max_start_epoch=1", "settings.expert_epochs=1", "settings.syn_steps=2",
                            "eval.nets=1", "eval.epochs=2"],
    "condense/mnist1d_dm": ["ipc=1", "settings.iterations=2", "eval.nets=1", "eval.epochs=2", "eval.archs=[mlp]"],
}
DIFFUSION = ["samples=512", "teacher.train.epochs=1", "student.train.epochs=1", "eval.samples=200",
             "eval.teacher_steps=[1,2]"]
TINY.update({
    "diffusion/cd": DIFFUSION,
    "diffusion/cd_guidance": DIFFUSION,
    "diffusion/pd": [*DIFFUSION, "settings.pd_start=4"],
    "diffusion/hyper_sd": [*DIFFUSION, "settings.segments=[2,1]", "settings.solver_steps=8"],
    "diffusion/reflow": [*DIFFUSION, "settings.pairs=256", "settings.pair_steps=4", "settings.one_step.epochs=1"],
    "diffusion/dmd": DIFFUSION,
    "diffusion/sds_points": [*DIFFUSION, "settings.points=200", "eval.teacher_steps=[2]"],
    "diffusion/prune": [*DIFFUSION[1:], "prune.calibration=32"],
})
ELSEWHERE = {
    "condense/digits_dm": "test_condense.py",
    "embed/layers": "test_embed.py",
    "embed/static": "test_embed.py",
    "graph/glnn": "test_graph.py",
    "lm/teacher": "test_lm.py",
    "lm/kd": "test_lm.py",
    "lm/student": "test_recipes.py",  # below: it needs a small text file
    **{f"lm/reasoning/{n}": "test_lm_practice.py" for n in ("teacher", "sft", "traces", "on_policy", "cross", "lora")},
}


def _shipped() -> list[str]:
    return sorted(n for n, p in recipes.available().items() if recipes.SHIPPED in p.parents)


def test_every_shipped_recipe_is_run_by_a_test():
    shipped = set(_shipped())
    assert shipped == set(TINY) | set(ELSEWHERE), "give a new shipped recipe tiny overrides in TINY"
    for name, test_file in ELSEWHERE.items():
        text = (HERE / test_file).read_text()
        assert f'"{name}"' in text and '"run"' in text, f"{test_file} no longer runs {name} through `distillery run`"


def _done(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done" and summary["rows"]
    assert (out / "config.yaml").is_file() and (out / "report" / "report.html").is_file()
    return summary


@pytest.mark.parametrize("name", sorted(TINY))
def test_shipped_recipe_runs_small(name, tmp_path):
    out = tmp_path / "run"
    assert main(["run", name, *TINY[name], *FAST, f"runs_dir={tmp_path / 'runs'}", "--out", str(out),
                 "--quiet"]) == 0
    summary = _done(out)
    assert summary["kind"] == recipes.load(name).kind
    assert any(out.joinpath("models").iterdir())


def test_shipped_lm_student_runs_small(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(40)))
    out = tmp_path / "run"
    assert main(["run", "lm/student", f"data={docs}", "block=16", "vocab_size=300", "model=tiny",
                 "train.batch_size=8", *FAST, f"runs_dir={tmp_path / 'runs'}", "--out", str(out), "--quiet"]) == 0
    rows = _done(out)["rows"]
    assert rows[-1]["method"] == "alone" and (out / "models" / "model" / "config.json").is_file()
