"""Quantization-aware distillation on torchao: fake quantization against a hand-computed reference, the
converted model against the fake-quantized one, export and load, the recipe flow, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("torchao")

from distillery import models
from distillery.cli import main
from distillery.compress import quantize as Q
from distillery.errors import DistilleryError


def _mlp(seed=0):
    torch.manual_seed(seed)
    return models.build("mlp", (16,), 4, {"hidden": [32]})


def test_fake_quantization_is_torchaos_symmetric_per_channel_int8():
    m = _mlp()
    w = m.body[0].weight.detach().clone()
    Q.prepare(m, Q.QuantizeConfig(weights=8, granularity="per_channel", activations=None))
    fq = m.body[0].weight_fake_quantizer(m.body[0].weight).detach()
    scale = w.abs().amax(1, keepdim=True) / 127.5  # torchao's symmetric range: max |w| over (qmax - qmin) / 2
    want = (w * (1.0 / scale)).round().clamp(-128, 127) * scale  # it multiplies by the inverse scale
    torch.testing.assert_close(fq, want, atol=0, rtol=0)
    assert not torch.equal(fq, w)


@pytest.mark.parametrize("bits,gran,act", [(4, "per_group", 8), (2, "per_channel", None), (8, "per_group", None)])
def test_converted_equals_fake_quantized_and_export_loads_back(tmp_path, bits, gran, act):
    cfg = Q.QuantizeConfig(weights=bits, granularity=gran, group_size=8, activations=act)
    m = _mlp().eval()
    x = torch.randn(12, 16)
    Q.prepare(m, cfg)
    fake = m(x)
    Q.convert(m, cfg)
    torch.testing.assert_close(m(x), fake)  # what was trained is what runs
    Q.save(m, tmp_path / "q.safetensors", {"bits": bits})
    back = Q.load(_mlp(1).eval(), tmp_path / "q.safetensors", cfg)
    torch.testing.assert_close(back(x), fake)


def test_an_int8_export_is_over_3_5_times_smaller_than_fp32(tmp_path):
    from distillery.pipeline import save_weights

    torch.manual_seed(0)
    m = models.build("mlp", (256,), 10, {"hidden": [512, 512]})
    save_weights(m, tmp_path / "fp32.safetensors", {})
    Q.ptq(m, Q.QuantizeConfig(weights=8, granularity="per_channel"))
    Q.save(m, tmp_path / "int8.safetensors", {})
    ratio = (tmp_path / "fp32.safetensors").stat().st_size / (tmp_path / "int8.safetensors").stat().st_size
    assert ratio > 3.5, ratio


def test_int8_export_runs_the_converted_weights_on_torchs_int8_kernels(tmp_path):
    from distillery.compress import int8
    from distillery.pipeline import save_weights

    torch.manual_seed(0)
    build = lambda: nn.Sequential(nn.Embedding(300, 256), nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 300))  # noqa: E731
    m = build().eval()
    x = torch.randint(0, 300, (4, 9))
    save_weights(m, tmp_path / "fp32.safetensors", {})
    float_out = m(x)
    Q.ptq(m, Q.QuantizeConfig(weights=8, granularity="per_channel", activations=None))
    converted = m(x)
    int8.export(m, tmp_path / "w.safetensors", {}, activations="none")
    weight_only = int8.load(build(), tmp_path / "w.safetensors")
    assert isinstance(weight_only[1], int8.Int8Linear) and isinstance(weight_only[0], int8.Int8Embedding)
    torch.testing.assert_close(weight_only(x), converted, atol=1e-4, rtol=1e-4)  # torchao's own int8 values and scales
    int8.export(m, tmp_path / "d.safetensors", {}, activations="dynamic")
    dynamic = int8.load(build(), tmp_path / "d.safetensors")
    err = (dynamic(x) - float_out).abs().max() / float_out.abs().max()
    assert 0 < err < 0.05  # int8 inputs too: close to float, not equal
    ratio = (tmp_path / "fp32.safetensors").stat().st_size / (tmp_path / "d.safetensors").stat().st_size
    assert ratio > 3.5, ratio
    # a float model is quantized by the export itself: symmetric per row, max |w| / 127
    f = build().eval()
    q, scale = int8.int8_weights(f[1].weight)
    torch.testing.assert_close(scale, f[1].weight.abs().amax(1) / 127)
    assert int(q.abs().max()) == 127 and (q.float() * scale[:, None] - f[1].weight).abs().max() <= scale.max() / 2 + 1e-7
    with pytest.raises(DistilleryError, match="does not fit the model"):
        int8.load(nn.Sequential(nn.Embedding(300, 128), nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 300)),
                  tmp_path / "d.safetensors")
    with pytest.raises(DistilleryError, match="not an int8 export"):
        Q.save(m, tmp_path / "t.safetensors", {})
        int8.load(build(), tmp_path / "t.safetensors")
    g = _mlp()
    Q.ptq(g, Q.QuantizeConfig(weights=8, granularity="per_group", group_size=8))
    with pytest.raises(DistilleryError, match="per_channel"):
        int8.export(g, tmp_path / "g.safetensors", {})
    p = _mlp()
    Q.prepare(p, Q.QuantizeConfig(weights=8, granularity="per_channel"))
    with pytest.raises(DistilleryError, match="fake-quantized"):
        int8.export(p, tmp_path / "p.safetensors", {})
    with pytest.raises(DistilleryError, match="export: int8 runs 8-bit weights"):
        Q.QuantizeConfig(weights=4, export="int8")


def test_bad_quantization_input_is_one_line():
    with pytest.raises(DistilleryError, match="2 to 8 bits"):
        Q.QuantizeConfig(weights=1)
    with pytest.raises(DistilleryError, match="int8"):
        Q.QuantizeConfig(activations=4)
    with pytest.raises(DistilleryError, match="not a multiple of group_size 5"):
        Q.prepare(_mlp(), Q.QuantizeConfig(group_size=5))
    with pytest.raises(DistilleryError, match=r"body\.9"):
        Q.prepare(_mlp(), Q.QuantizeConfig(modules=["body.9"]))
    convs = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Conv1d(4, 2, 3))
    with pytest.raises(DistilleryError, match="no linear or embedding layer"):
        Q.prepare(convs, Q.QuantizeConfig())
    m = Q.prepare(_mlp(), Q.QuantizeConfig(group_size=8))
    with pytest.raises(DistilleryError, match="convert it before export"):
        Q.save(m, "/tmp/never.safetensors", {})
    with pytest.raises(DistilleryError, match="prepare it first"):
        Q.convert(_mlp(), Q.QuantizeConfig())


def test_conv_layers_stay_float_and_are_named():
    m = models.build("cnn1d", (40,), 10, {"channels": 8, "hidden": 32})
    cfg = Q.QuantizeConfig(group_size=8)
    assert list(Q.targets(m, cfg)) == ["fc.1", "head"]
    assert Q.float_layers(m, Q.targets(m, cfg)) == ["features.0", "features.2", "features.4"]


RECIPE = """
name: tiny/qat
seed: 0
runs_dir: {runs}
data: {{name: mnist1d, num_samples: 600}}
teacher:
  model: {{name: cnn1d, channels: 8, hidden: 16}}
  train: {{epochs: 2, batch_size: 64, lr: 0.01}}
student:
  model: {{name: mlp, hidden: [64]}}
baseline: {{enabled: false}}
distill:
  terms:
    - {{loss: kd, temperature: 4.0}}
  data: train
  train: {{epochs: 2, batch_size: 64, lr: 0.01}}
compress:
  - name: int4
    quantize: {{method: qat, weights: 4, group_size: 8}}
    teacher: student
    train: {{epochs: 2, batch_size: 64, lr: 0.003}}
"""


def test_a_recipe_distils_then_quantizes_with_kd_and_resumes(tmp_path, capsys):
    recipe = tmp_path / "q.yaml"
    recipe.write_text(RECIPE.format(runs=tmp_path / "runs"))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    rows = {r["model"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["int4"]["phase"] == "compress-int4" and rows["int4"]["size_kb"] < rows["distilled"]["size_kb"]
    assert all(r["latency_64_ms"] > 0 for r in rows.values())
    assert (out / "checkpoints" / "compress-int4" / "last.json").is_file()
    html = (out / "report" / "report.html").read_text()
    assert 'src="compress.png"' in html and "size KB" in html
    assert "size KB" in capsys.readouterr().out
    # the exported model is what was measured
    exported = Q.load(models.build("mlp", (40,), 10, {"hidden": [64]}).eval(), out / "models" / "int4.safetensors",
                      Q.QuantizeConfig(weights=4, group_size=8))
    assert exported is not None
    metrics = (out / "metrics.jsonl").read_text()
    assert main(["run", str(recipe), "--resume", str(out), "--quiet"]) == 0  # finished: nothing trains again
    assert (out / "metrics.jsonl").read_text() == metrics
    assert json.loads((out / "summary.json").read_text())["rows"][2]["accuracy"] == rows["int4"]["accuracy"]


@pytest.mark.parametrize("override,words", [
    ("compress.0.quantize.weights=9", "2 to 8 bits"),
    ("compress.0.quantize.method=ptq", "ptq trains nothing"),
    ("compress.0.name=distilled", "not teacher, baseline or distilled"),
])
def test_bad_compress_stages_are_one_line(tmp_path, capsys, override, words):
    recipe = tmp_path / "q.yaml"
    recipe.write_text(RECIPE.format(runs=tmp_path / "runs"))
    assert main(["validate", str(recipe), "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


# ------------------------------------------------------------------------------------------ pruning

pytest.importorskip("torch_pruning")

from distillery.compress import prune as P  # noqa: E402


def test_pruned_mlp_is_the_masked_original_and_round_trips(tmp_path):
    torch.manual_seed(0)
    m = models.build("mlp", (16,), 4, {"hidden": [32]})
    orig = {k: v.clone() for k, v in m.state_dict().items()}
    pr = P.Pruner(m, P.PruneConfig(ratio=0.5), torch.randn(2, 16))
    pr.step(torch.randn(8, 16), None)
    w = m.body[0].weight
    assert w.shape == (16, 16) and m.head.weight.shape == (4, 16) and m.head.out_features == 4
    kept = [int((orig["body.0.weight"] == row).all(1).nonzero()) for row in w]  # which neurons survived
    assert len(set(kept)) == 16
    masked = models.build("mlp", (16,), 4, {"hidden": [32]})
    masked.load_state_dict(orig)
    gone = [i for i in range(32) if i not in kept]
    with torch.no_grad():
        masked.body[0].weight[gone] = 0
        masked.body[0].bias[gone] = 0
    x = torch.randn(10, 16)
    torch.testing.assert_close(m(x), masked(x))
    P.save(m, tmp_path / "p.safetensors", {})
    back = P.load(models.build("mlp", (16,), 4, {"hidden": [32]}), tmp_path / "p.safetensors")
    torch.testing.assert_close(back(x), m(x))
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in m.parameters())


def test_bad_pruning_input_is_one_line():
    with pytest.raises(DistilleryError, match="would leave layers empty"):
        P.PruneConfig(ratio=1.0)
    with pytest.raises(DistilleryError, match=r"body\.7"):
        P.Pruner(_mlp(), P.PruneConfig(ignore=["body.7"]), torch.randn(2, 16))
    pr = P.Pruner(_mlp(), P.PruneConfig(importance="taylor"), torch.randn(2, 16))
    with pytest.raises(DistilleryError, match="labelled calibration data"):
        pr.step(torch.randn(4, 16), None)


PRUNE = RECIPE.replace("""compress:
  - name: int4
    quantize: {{method: qat, weights: 4, group_size: 8}}
    teacher: student
    train: {{epochs: 2, batch_size: 64, lr: 0.003}}""", """compress:
  - name: pruned
    prune: {{ratio: 0.5, importance: taylor, steps: 2}}
    train: {{epochs: 2, batch_size: 64, lr: 0.003}}
  - name: int8
    quantize: {{method: ptq, weights: 8, granularity: per_channel, export: int8}}""")


def test_a_recipe_prunes_with_kd_recovery_then_quantizes_and_resumes(tmp_path):
    recipe = tmp_path / "p.yaml"
    recipe.write_text(PRUNE.format(runs=tmp_path / "runs"))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    rows = {r["model"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["pruned"]["params"] < 0.6 * rows["distilled"]["params"] and rows["int8"]["params"] == rows["pruned"]["params"]
    assert rows["int8"]["size_kb"] < rows["pruned"]["size_kb"] < rows["distilled"]["size_kb"]
    assert {p.name for p in (out / "checkpoints").iterdir()} >= {"compress-pruned-1", "compress-pruned-2"}
    metrics = (out / "metrics.jsonl").read_text()
    assert main(["run", str(recipe), "--resume", str(out), "--quiet"]) == 0  # finished: replayed, not retrained
    assert (out / "metrics.jsonl").read_text() == metrics
    again = {r["model"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert again["pruned"]["accuracy"] == rows["pruned"]["accuracy"] and again["int8"]["params"] == rows["int8"]["params"]
    assert main(["validate", str(recipe), "--set", "compress.1.name=x", "--set",
                 "compress=[{name: a, quantize: {}}, {name: b, prune: {}}]"]) == 2


def test_compress_paths_are_checked_before_anything_trains(tmp_path, capsys):
    recipe = tmp_path / "q.yaml"
    recipe.write_text(RECIPE.format(runs=tmp_path / "runs"))
    assert main(["validate", str(recipe), "--set", "compress.0.quantize.modules=[body.5]"]) == 2
    assert "body.5" in capsys.readouterr().err
    assert main(["run", str(recipe), "compress.0.quantize.modules=[bdy]", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "body" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ------------------------------------------------------------------- differentiable quantization

from distillery.compress import dq as DQ  # noqa: E402


def test_dq_maps_each_bucket_to_the_nearest_learned_point_and_gives_points_their_gradient():
    w = torch.tensor([[0.0, 1.0, 0.2, 0.6], [-2.0, 2.0, 0.9, -0.7]])
    q = DQ.DQWeight(w, bits=2, bucket=4)  # points 0, 1/3, 2/3, 1 on each bucket's [min, max]
    # by hand: row 1 scaled (0, 1, .2, .6) -> points (0, 1, 1/3, 2/3); row 2 scaled (0, 1, .725, .325) -> (0, 1, 2/3, 1/3)
    want = torch.tensor([[0.0, 1.0, 1 / 3, 2 / 3], [-2.0, 2.0, -2 + 4 * 2 / 3, -2 + 4 / 3]])
    torch.testing.assert_close(q(), want)
    g = torch.randn_like(w)
    (q() * g).sum().backward()
    idx = q.index()
    alpha = q.alpha.expand_as(idx)
    expect = torch.stack([(g.reshape(-1, 4) * alpha)[idx == i].sum() for i in range(4)])
    torch.testing.assert_close(q.points.grad, expect)


def test_dq_trains_only_the_points_and_exports_what_it_learned(tmp_path):
    torch.manual_seed(0)
    teacher = models.build("mlp", (16,), 4, {"hidden": [64]})
    student = models.build("mlp", (16,), 4, {"hidden": [64]})
    student.load_state_dict(teacher.state_dict())
    x = torch.randn(256, 16)
    paths = DQ.prepare(student, bits=2, bucket=16)
    assert paths == ["body.0", "head"] and [n for n, p in student.named_parameters() if p.requires_grad] == \
        ["body.0.dq.points", "head.dq.points"]
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=0.01)

    def kl():
        return F.kl_div(student(x).log_softmax(-1), teacher(x).softmax(-1), reduction="batchmean")

    before = float(kl().detach())
    for _ in range(100):
        opt.zero_grad()
        kl().backward()
        opt.step()
    assert float(kl().detach()) < 0.8 * before  # the learned points fit the teacher better than uniform ones
    DQ.save(student, tmp_path / "dq.safetensors", {})
    back = DQ.load(models.build("mlp", (16,), 4, {"hidden": [64]}), tmp_path / "dq.safetensors")
    torch.testing.assert_close(back(x), student(x))


def test_dq_in_a_recipe_and_its_bad_settings(tmp_path, capsys):
    recipe = tmp_path / "q.yaml"
    recipe.write_text(RECIPE.format(runs=tmp_path / "runs").replace(
        "quantize: {method: qat, weights: 4, group_size: 8}",
        "quantize: {method: dq, weights: 2, group_size: 16, activations: null}"))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    rows = {r["model"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["int4"]["size_kb"] < rows["distilled"]["size_kb"]
    assert main(["validate", str(recipe), "--set", "compress.0.quantize.activations=8"]) == 2
    assert "set activations: null" in capsys.readouterr().err


def test_dq_bit_allocation_by_gradient_norm_as_polino_code():
    # by hand: 2 layers of 4 points: 2 each first, the other 4 by norms 1 : 3 -> 1 and 3 more: (3, 5)
    assert DQ.allocate_points([1.0, 3.0], 4) == [3, 5]
    # rounding: norms 1 : 1 : 1 share 12 of 24 as 4 each -> (8, 8, 8); 1 : 1 : 2 -> 3, 3, 6 more
    assert DQ.allocate_points([1.0, 1.0, 1.0], 8) == [8, 8, 8]
    assert DQ.allocate_points([1.0, 1.0, 2.0], 8) == [7, 7, 10]
    assert DQ.allocate_points([0.2, 0.2, 1.0], 4) == [3, 3, 6]  # 6 shared as 0.86, 0.86, 4.29
    # rounding: 2 + round(1.5) twice and 2 + 3 make 13 of 12, so the largest gives one back; 2 + 2.4 twice and
    # 2 + 1.2 make 11, so the smallest gets one
    assert DQ.allocate_points([1.0, 1.0, 2.0], 4) == [4, 4, 4]
    assert DQ.allocate_points([2.0, 2.0, 1.0], 4) == [4, 4, 4]
    assert DQ.allocate_points([0.0, 0.0], 16) == [16, 16]  # no gradient: uniform
    torch.manual_seed(0)
    m = models.build("mlp", (16,), 4, {"hidden": [64]})
    x, y = torch.randn(40, 16), torch.randint(0, 4, (40,))
    batches = [{"x": x[i:i + 8], "y": y[i:i + 8]} for i in range(0, 40, 8)]
    norms = DQ.gradient_importances(m, ["body.0", "head"], batches, lambda mm, b: F.cross_entropy(mm(b["x"]), b["y"]))
    m.zero_grad()
    total = [torch.zeros_like(m.body[0].weight), torch.zeros_like(m.head.weight)]
    for b in batches:  # the naive loop: backward per batch, mean gradient, its norm
        m.zero_grad()
        F.cross_entropy(m(b["x"]), b["y"]).backward()
        total[0] += m.body[0].weight.grad
        total[1] += m.head.weight.grad
    assert norms == pytest.approx([float((t / 5).norm()) for t in total], rel=1e-5)
    pts = DQ.allocate_points(norms, 4)
    DQ.prepare(m, bits=2, bucket=16, points=pts)
    assert [len(m.body[0].dq.points), len(m.head.dq.points)] == pts


def test_dq_allocation_in_a_recipe(tmp_path, capsys):
    recipe = tmp_path / "q.yaml"
    recipe.write_text(RECIPE.format(runs=tmp_path / "runs").replace(
        "quantize: {method: qat, weights: 4, group_size: 8}",
        "quantize: {method: dq, weights: 3, group_size: 16, activations: null, allocate: gradient}"))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    from distillery.pipeline import read_weights

    _, record = read_weights(next((out / "models").glob("int4*.safetensors")))
    points = record["dq_points"]
    assert sum(points.values()) == 8 * len(points) and len(set(points.values())) > 1
    kept = json.loads((out / "dq-points-int4.json").read_text())  # a resumed stage reads this, not new gradients
    assert kept["points"] == list(points.values()) and len(kept["gradient_norms"]) == len(points)
    assert main(["validate", str(recipe), "--set", "compress.0.quantize.method=qat",
                 "--set", "compress.0.quantize.activations=8"]) == 2
    assert "method dq" in capsys.readouterr().err


def test_int8_export_keeps_tied_float_weights(tmp_path):
    from distillery.compress import int8

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.body, self.head = nn.Embedding(40, 16), nn.Linear(16, 16), nn.Linear(16, 40, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.relu(self.body(self.emb(x))))

    torch.manual_seed(0)
    m = Tied().eval()
    x = torch.randint(0, 40, (3, 5))
    int8.export(m, tmp_path / "t.safetensors", {}, only={"body"})  # the tied pair stays float
    back = int8.load(Tied(), tmp_path / "t.safetensors")
    assert isinstance(back.body, int8.Int8Linear) and isinstance(back.emb, nn.Embedding)
    assert (back(x) - m(x)).abs().max() < 0.05 * m(x).abs().max()
