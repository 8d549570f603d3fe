"""Tests of distillery.report: calibration, metrics reading, plots, the HTML page, the run index."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from distillery.errors import DistilleryError
from distillery.report import RunIndex, ece, format_table, read_metrics, reliability, write_report
from distillery.report.metrics import eval_series, phases, read_predictions, train_series
from distillery.report.plots import plot_agreement, plot_reliability

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- calibration


def _naive_ece(probs: np.ndarray, targets: np.ndarray, n_bins: int) -> float:
    """Guo et al. 2017 eq. 3, written as the plain loop over bins (lo, hi]."""
    conf = probs.max(1)
    correct = probs.argmax(1) == targets
    total = 0.0
    for m in range(n_bins):
        lo, hi = m / n_bins, (m + 1) / n_bins
        in_bin = (conf > lo) & (conf <= hi) if m > 0 else (conf <= hi)
        if in_bin.sum() == 0:
            continue
        total += in_bin.sum() / len(conf) * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(total)


def test_ece_hand_computed():
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.65, 0.35], [0.55, 0.45]], dtype=np.float32)
    targets = np.array([0, 0, 0, 1])
    # 5 bins (0,.2] (.2,.4] (.4,.6] (.6,.8] (.8,1]; confidences .9 .7 .65 .55, correct: yes no yes no.
    #   bin (.8,1]:  n=1, acc 1,   conf .9            -> 1/4 * |1 - .9|    = .025
    #   bin (.6,.8]: n=2, acc 1/2, conf (.7+.65)/2=.675 -> 2/4 * |.5 - .675| = .0875
    #   bin (.4,.6]: n=1, acc 0,   conf .55           -> 1/4 * |0 - .55|   = .1375
    #   ECE = .025 + .0875 + .1375 = .25
    assert ece(probs, targets, n_bins=5) == pytest.approx(0.25, abs=1e-6)
    r = reliability(probs, targets, n_bins=5)
    assert r["count"].tolist() == [0, 0, 1, 2, 1]
    np.testing.assert_allclose(r["accuracy"][2:], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(r["confidence"][2:], [0.55, 0.675, 0.9], atol=1e-6)
    assert np.isnan(r["accuracy"][:2]).all()
    np.testing.assert_allclose(r["edges"], np.linspace(0, 1, 6))


def test_bins_are_closed_on_the_right():
    # Guo et al.: B_m = ((m-1)/M, m/M]. With M=4 a confidence of exactly .5 is in (.25, .5], 1.0 in (.75, 1].
    probs = np.array([[0.5, 0.5], [1.0, 0.0], [0.75, 0.25]])
    assert reliability(probs, np.array([0, 0, 0]), n_bins=4)["count"].tolist() == [0, 1, 1, 1]


def test_ece_matches_naive_loop_and_accepts_torch():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(500, 7, generator=g)
    probs = logits.softmax(-1)
    targets = torch.randint(0, 7, (500,), generator=g)
    for n_bins in (1, 10, 15):
        want = _naive_ece(probs.double().numpy(), targets.numpy(), n_bins)
        assert ece(probs, targets, n_bins) == pytest.approx(want, abs=1e-9)
        assert ece(probs.numpy(), targets.numpy(), n_bins) == pytest.approx(want, abs=1e-9)
    assert ece(probs.to(torch.bfloat16), targets) == pytest.approx(ece(probs, targets), abs=0.02)


def test_perfect_calibration_gives_zero():
    # Exactly calibrated: 10 samples at confidence .8 with 8 right, 5 at .6 with 3 right.
    probs = np.array([[0.8, 0.2]] * 10 + [[0.4, 0.6]] * 5)
    targets = np.array([0] * 8 + [1] * 2 + [1] * 3 + [0] * 2)
    assert ece(probs, targets) == pytest.approx(0.0, abs=1e-12)
    # Targets drawn from the probabilities themselves: calibrated in expectation.
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5) * 0.5, size=100_000)
    t = (p.cumsum(1) > rng.random((len(p), 1))).argmax(1)
    assert ece(p, t) < 0.01


def test_reliability_counts_sum_to_n_and_bad_shapes():
    p = np.random.default_rng(1).dirichlet(np.ones(4), size=321)
    t = np.zeros(321, dtype=np.int64)
    r = reliability(p, t, n_bins=15)
    assert r["count"].sum() == 321 and len(r["count"]) == 15 and len(r["edges"]) == 16
    with pytest.raises(DistilleryError, match="targets"):
        ece(p, t[:5])
    with pytest.raises(DistilleryError, match=r"\(N, C\)"):
        ece(p[:, 0], t)
    with pytest.raises(DistilleryError, match="n_bins"):
        ece(p, t, n_bins=0)


# ---------------------------------------------------------------- a synthetic run


def _records() -> list[dict]:
    recs = []
    for phase, base in (("teacher", 2.0), ("distill", 3.0)):
        step = 0
        for epoch in range(3):
            for _ in range(4):
                step += 5
                terms = (
                    {"ce": base / step**0.5}
                    if phase == "teacher"
                    else {"ce": base / step**0.5, "kd": 1.0 / step}
                )
                recs.append(
                    {
                        "event": "train",
                        "phase": phase,
                        "epoch": epoch,
                        "step": step,
                        "lr": 0.1,
                        "loss": sum(terms.values()),
                        "terms": terms,
                        "samples_per_s": 1000.0,
                    }
                )
            recs.append(
                {
                    "event": "eval",
                    "phase": phase,
                    "epoch": epoch,
                    "step": step,
                    "split": "test",
                    "accuracy": 0.5 + 0.1 * epoch,
                    "loss": 1.0 / (epoch + 1),
                    "agreement": None if phase == "teacher" else 0.6 + 0.1 * epoch,
                }
            )
    return recs


SUMMARY = {
    "name": "mnist1d-kd",
    "recipe": "mnist1d/kd",
    "created": "2024-05-01T12:00:00+00:00",
    "status": "done",
    "rows": [
        {
            "model": "teacher",
            "phase": "teacher",
            "accuracy": 0.9123,
            "params": 123456,
            "latency_ms": 1.234,
            "agreement": None,
            "ece": 0.0321,
        },
        {
            "model": "distilled",
            "phase": "distill",
            "accuracy": 0.8765,
            "params": 4321,
            "latency_ms": 0.456,
            "agreement": 0.875,
            "ece": None,
        },
    ],
}


def _write_run(run: Path, summary: dict | None = SUMMARY, predictions: bool = True) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in _records()]
    text = "\n".join(lines) + "\n" + '{"event": "train", "phase": "distill", "ep'  # killed mid-write
    (run / "metrics.jsonl").write_text(text)
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    if predictions:
        g = torch.Generator().manual_seed(0)
        for phase in ("teacher", "distill"):
            probs = (2 * torch.randn(200, 10, generator=g)).softmax(-1).float()
            (run / "predictions").mkdir(exist_ok=True)
            save_file(
                {"probs": probs, "targets": torch.randint(0, 10, (200,), generator=g)},
                str(run / "predictions" / f"{phase}.safetensors"),
            )
    (run / "config.yaml").write_text("model: {name: mlp}\nnote: '<b>bold</b> & co'\n")
    return run


def test_read_metrics_skips_truncated_last_line(tmp_path):
    run = _write_run(tmp_path / "run")
    recs = read_metrics(run)
    assert len(recs) == len(_records())
    assert phases(recs) == ["teacher", "distill"]
    assert [r["step"] for r in train_series(recs, "distill")] == list(range(5, 65, 5))
    assert [r["epoch"] for r in eval_series(recs, "teacher")] == [0, 1, 2]
    assert train_series(recs, "baseline") == []  # a missing phase is just empty


def test_read_metrics_duplicate_points_keep_the_last(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    recs = [
        {"event": "eval", "phase": "p", "epoch": 0, "accuracy": 0.1},
        {"event": "eval", "phase": "p", "epoch": 0, "accuracy": 0.2},
    ]  # resumed run re-evaluated epoch 0
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    assert [r["accuracy"] for r in eval_series(read_metrics(run), "p")] == [0.2]


def test_read_metrics_corrupt_middle_line_names_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"event": "train"}\n{"event": tr\n{"event": "eval"}\n')
    with pytest.raises(DistilleryError, match="line 2"):
        read_metrics(run)
    (run / "metrics.jsonl").write_text('{"event": "train"}\n[1, 2]\n{"event": "eval"}\n')
    with pytest.raises(DistilleryError, match="line 2 is not a JSON object"):
        read_metrics(run)


def test_read_metrics_missing_file(tmp_path):
    with pytest.raises(DistilleryError, match=r"no metrics\.jsonl"):
        read_metrics(tmp_path)


def test_write_report(tmp_path):
    pyplot_loaded = "matplotlib.pyplot" in sys.modules
    run = _write_run(tmp_path / "run")
    out = write_report(run)
    assert out == run / "report" / "report.html"
    page = out.read_text()
    assert "<h1>mnist1d-kd</h1>" in page and "mnist1d/kd" in page
    # Summary values: accuracy %, params with separators, latency ms, agreement %, ECE.
    for cell in ("91.23", "87.65", "123,456", "4,321", "1.234", "0.456", "87.50", "0.0321"):
        assert f">{cell}</td>" in page, cell
    # The distilled row's ECE was null: it is filled in from its predictions.
    probs, targets = read_predictions(run)["distill"]
    assert f">{ece(probs, targets):.4f}</td>" in page
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(srcs) == ["accuracy.png", "agreement.png", "loss_terms.png", "reliability.png"]
    for src in srcs:
        assert (out.parent / src).read_bytes()[:8] == PNG_MAGIC, src
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in page  # config.yaml shown escaped
    assert "<script" not in page.lower()  # no JS
    assert "http://" not in page and "https://" not in page  # nothing fetched from the network
    if not pyplot_loaded:
        assert "matplotlib.pyplot" not in sys.modules


def test_write_report_without_predictions_leaves_reliability_out(tmp_path):
    run = _write_run(tmp_path / "run")
    write_report(run)
    for f in (run / "predictions").iterdir():
        f.unlink()
    page = write_report(run).read_text()
    assert "reliability.png" not in page
    assert not (run / "report" / "reliability.png").exists()  # the stale PNG went too
    assert "accuracy.png" in page


def test_plots_return_none_without_data(tmp_path):
    recs = [r for r in _records() if r["phase"] == "teacher"]  # agreement is null throughout
    assert plot_agreement(recs, tmp_path / "a.png") is None
    assert plot_reliability({}, tmp_path / "r.png") is None
    assert not list(tmp_path.iterdir())


def test_write_report_escapes_run_strings(tmp_path):
    evil = dict(SUMMARY, name="<script>alert(1)</script>", status='done"><img src=x>')
    evil["rows"] = [dict(SUMMARY["rows"][0], model="<i>t</i>")]
    page = write_report(_write_run(tmp_path / "run", summary=evil)).read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>" not in page and "<i>t</i>" not in page and "<img src=x>" not in page
    assert "&lt;i&gt;t&lt;/i&gt;" in page


def test_write_report_missing_inputs(tmp_path):
    with pytest.raises(DistilleryError, match=r"no summary\.json"):
        write_report(_write_run(tmp_path / "a", summary=None))
    run = _write_run(tmp_path / "b")
    (run / "metrics.jsonl").unlink()
    assert "<table>" in write_report(run).read_text()  # rows alone (a kind that logs no training) make a report
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "rows": []}))
    with pytest.raises(DistilleryError, match=r"no metrics\.jsonl"):
        write_report(run)
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(DistilleryError, match="no records"):
        write_report(run)
    with pytest.raises(DistilleryError, match="does not exist"):
        write_report(tmp_path / "nowhere")
    (run / "summary.json").write_text('{"name": ')
    with pytest.raises(DistilleryError, match="corrupted"):
        write_report(run)


def test_bad_predictions_file(tmp_path):
    run = _write_run(tmp_path / "run")
    (run / "predictions" / "distill.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(DistilleryError, match=r"distill\.safetensors"):
        write_report(run)


# ---------------------------------------------------------------- run index


def test_run_index_record_twice_updates_one_row(tmp_path):
    idx = RunIndex(tmp_path / "db" / "runs.sqlite")
    assert idx.list() == []
    run = tmp_path / "run"
    idx.record(run, "kd", "mnist1d/kd", "running", {"created": "2024-05-01T12:00:00+00:00", "rows": []})
    idx.record(tmp_path / "x" / ".." / "run", "kd", "mnist1d/kd", "done", SUMMARY)  # same dir, other spelling
    rows = idx.list()
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "done" and row["run_dir"] == str(run.resolve())
    assert row["rows"] == SUMMARY["rows"]
    assert row["created"].startswith("2024-05-01T12:00:00") and row["updated"] > row["created"]
    assert not list((tmp_path / "db").glob("*-wal"))


def test_run_index_newest_first_and_table(tmp_path):
    idx = RunIndex(tmp_path / "runs.sqlite")
    # 10:00 UTC, 11:00 UTC, 12:00 UTC once the offsets are applied.
    for name, created in (
        ("mid", "2024-01-01T11:00:00+00:00"),
        ("old", "2024-01-01T12:00:00+02:00"),
        ("new", "2024-01-01T12:00:00Z"),
    ):
        idx.record(tmp_path / name, name, "r", "done", dict(SUMMARY, created=created))
    idx.record(tmp_path / "nodate", "nodate", "r", "failed", {"rows": []})  # created = now
    rows = idx.list()
    assert [r["name"] for r in rows] == ["nodate", "new", "mid", "old"]
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["name", "status", "created", "result", "path"]
    assert len(lines) == 6
    assert "87.65%" in lines[3] and "91.23%" in lines[3] and "2024-01-01 12:00 UTC" in lines[3]
    assert str((tmp_path / "old").resolve()) in lines[5]
    assert lines[2].split()[:2] == ["nodate", "failed"] and " - " in lines[2]
    assert RunIndex.format_table(rows) == table
    assert format_table([]).count("\n") == 1


def test_run_index_corrupted_file(tmp_path):
    db = tmp_path / "runs.sqlite"
    db.write_bytes(b"this is not an sqlite database " * 64)
    idx = RunIndex(db)
    with pytest.raises(DistilleryError, match=r"corrupted.*delete it"):
        idx.list()
    with pytest.raises(DistilleryError, match=r"corrupted.*delete it"):
        idx.record(tmp_path / "run", "n", "r", "done", SUMMARY)
