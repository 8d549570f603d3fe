"""LAPTOP-Diff's layer pruning of denoisers and its normalised feature distillation: the removable layers, the
pruned network against the hook-ablated original, the knapsack against brute force, the criterion's report,
folders of pruned networks, the loss against hand values, a recipe run with resume, and the bad inputs."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from distillery.config import TrainConfig
from distillery.data.core import TensorData
from distillery.diffusion.process import Process
from distillery.errors import DistilleryError
from distillery.losses import get
from distillery.losses.logits import LossInputError

diffusers = pytest.importorskip("diffusers")

from distillery.diffusion import prune as P  # noqa: E402
from distillery.diffusion.nets import Denoiser, MLPDenoiser, load_folder, save_folder, unet  # noqa: E402

UNET_LAYERS = ["down_blocks.0.resnets.0", "down_blocks.0.resnets.1", "down_blocks.1.resnets.1",
               "mid_block.attentions.0", "mid_block.resnets.0", "mid_block.resnets.1"]


def _unet(classes: int = 0) -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(unet(1, 8, (8, 16), 2, num_classes=classes), Process("vp", "epsilon"), (1, 8, 8)).eval()


def _mlp(depth: int = 4) -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(MLPDenoiser(2, 32, depth), Process("flow", "flow"), (2,)).eval()


def _data(shape, n: int = 64, classes: int = 1) -> TensorData:
    g = torch.Generator().manual_seed(1)
    return TensorData(torch.randn(n, *shape, generator=g), torch.arange(n) % classes, torch.arange(n), classes, "x")


def test_removable_layers_keep_their_shape_and_hold_their_residual():
    assert P.candidates(_unet().net) == UNET_LAYERS  # no up-block resnet (they read the skip), no resampling one
    assert P.candidates(_mlp(3).net) == ["blocks.0", "blocks.1", "blocks.2"]
    assert P.candidates(_unet().net, ["mid_block.resnets.0"]) == ["mid_block.resnets.0"]


@pytest.mark.parametrize("make, drop", [(_unet, ["down_blocks.0.resnets.1", "mid_block.attentions.0",
                                                 "mid_block.resnets.0"]),
                                        (_mlp, ["blocks.0", "blocks.2"])])
def test_pruned_network_equals_the_original_with_those_layers_ablated(make, drop):
    d = make()
    batch = P.calibration_batch(d, _data(d.shape), 16, seed=0)
    with P.Ablated(d.net, drop):
        masked = P._predict(d, batch)
    small = P.remove(d.net, drop)
    pruned = Denoiser(small, d.process, d.shape).eval()
    torch.testing.assert_close(P._predict(pruned, batch), masked, atol=1e-6, rtol=1e-5)
    removed = sum(P.layer_params(d.net, p) for p in drop)
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in d.net.parameters()) - removed
    full = P._predict(d, batch)
    assert not torch.allclose(full, masked)  # the ablation did change the output
    if isinstance(d.net, MLPDenoiser):
        assert isinstance(small, MLPDenoiser) and small.config.depth == 2  # a smaller MLPDenoiser, not a patch
    else:
        assert small.removed_layers == sorted(drop)


def test_cheapest_cover_is_the_brute_force_optimum():
    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        m = int(torch.randint(2, 9, (1,), generator=g))
        costs = torch.rand(m, generator=g).tolist()
        sizes = torch.randint(1, 50, (m,), generator=g).tolist()
        need = int(torch.randint(1, sum(sizes) + 1, (1,), generator=g))
        got = P.cheapest_cover(costs, sizes, need)
        assert sum(sizes[i] for i in got) >= need
        best = min(sum(costs[i] for i in s) for r in range(m + 1) for s in itertools.combinations(range(m), r)
                   if sum(sizes[i] for i in s) >= need)
        assert sum(costs[i] for i in got) == pytest.approx(best)
    # by hand: removing 10 of sizes (6, 5, 5) at costs (1, 1.5, 0.4): {1, 2} costs 1.9, {0, 2} 1.4, {0, 1} 2.5
    assert P.cheapest_cover([1.0, 1.5, 0.4], [6, 5, 5], 10) == [0, 2]
    # sizes that round down below the need at the coarse unit: the unit shrinks until the cover is found
    assert P.cheapest_cover([1.0, 2.0, 0.5], [19999, 19999, 5], 40000, units=2) == [0, 1, 2]
    with pytest.raises(DistilleryError, match="fewer than"):
        P.cheapest_cover([1.0], [3], 4)


def test_output_loss_criterion_picks_the_cheapest_cover_and_reports_additivity():
    d = _unet()
    data = _data(d.shape)
    cfg = P.LayerPrune(ratio=0.1, calibration=32)
    chosen, rep = P.choose(d, data, cfg, seed=0)
    batch = P.calibration_batch(d, data, 32, seed=0)
    single = {p: P.output_loss(d, batch, [p]) for p in UNET_LAYERS}
    assert {p: c["score"] for p, c in rep["candidates"].items()} == pytest.approx(single)
    total = sum(p.numel() for p in d.net.parameters())
    need = math.ceil(0.1 * total)
    sizes = {p: P.layer_params(d.net, p) for p in UNET_LAYERS}
    best = min((s for r in range(1, 7) for s in itertools.combinations(UNET_LAYERS, r)
                if sum(sizes[p] for p in s) >= need), key=lambda s: sum(single[p] for p in s))
    assert sorted(chosen) == sorted(best) and rep["params_removed"] >= 0.1 * total
    assert rep["sum_of_layer_losses"] == pytest.approx(sum(single[p] for p in chosen))
    assert rep["output_loss"] == pytest.approx(P.output_loss(d, batch, chosen))
    _, rep2 = P.prune(d, data, cfg, seed=0)
    assert rep2["params"] == total - rep2["params_removed"]
    _, mag = P.choose(d, data, P.LayerPrune(ratio=0.1, criterion="magnitude", calibration=8))
    assert mag["candidates"]["mid_block.resnets.0"]["score"] == pytest.approx(float(torch.cat(
        [w.detach().abs().flatten() for w in d.net.mid_block.resnets[0].parameters()]).mean()))


def test_pruned_unet_folder_round_trip_and_class_labels(tmp_path):
    d = _unet(classes=3)
    data = _data(d.shape, classes=3)
    pruned, rep = P.prune(d, data, P.LayerPrune(ratio=0.1, calibration=16))
    path = save_folder(pruned, tmp_path / "m")
    meta = json.loads((path / "distillery.json").read_text())
    assert meta["removed_layers"] == sorted(rep["removed"])
    back = load_folder(path)
    batch = P.calibration_batch(d, data, 8, seed=1)
    assert "class_labels" in batch
    assert torch.equal(P._predict(back, batch), P._predict(pruned, batch))
    alone = diffusers.UNet2DModel.from_pretrained(path / "unet")  # diffusers alone: the same function, full size
    with torch.no_grad():
        t = back.process.timestep(batch["tau"])
        torch.testing.assert_close(alone(batch["x"], t, class_labels=batch["class_labels"]).sample,
                                   P._predict(back, batch), atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in back.net.parameters()) == rep["params"]
    from safetensors.torch import load_file, save_file

    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if k.startswith(rep["removed"][0] + ".") and k.endswith("weight"))
    state[key] = torch.ones_like(state[key])  # a removed layer's weights edited: no longer the pruned network
    save_file(state, weights)
    with pytest.raises(DistilleryError, match="is not zero"):
        load_folder(path)
    mlp = _mlp()
    small, _ = P.prune(mlp, _data(mlp.shape), P.LayerPrune(ratio=0.2, calibration=16))
    again = load_folder(save_folder(small, tmp_path / "mlp"))  # a plain MLPDenoiser folder
    assert again.net.config.depth == small.net.config.depth < 4


def test_normalized_mse_against_hand_values_and_a_naive_loop():
    fn = get("normalized_mse")
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    # sample 0: |(0, 2)|^2 / |(1, 0)|^2 = 4; sample 1: 25 / 25 = 1; mean 2.5
    assert float(fn(s, t)) == pytest.approx(2.5)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g) * 100
    naive = sum(float(((s[i] - t[i]) ** 2).sum() / (t[i] ** 2).sum()) for i in range(5)) / 5
    assert float(fn(s, t)) == pytest.approx(naive, rel=1e-5)
    assert float(fn(t * 1.1, t)) == pytest.approx(0.01, rel=1e-4)  # scale-free: a 10% error is 0.01 at any size
    assert torch.isfinite(fn(s, torch.zeros_like(t)))  # an all-zero teacher map: eps, not NaN
    s.requires_grad_(True)
    fn(s, t).backward()
    assert torch.isfinite(s.grad).all()
    with pytest.raises(LossInputError, match="normalized_mse"):
        fn(torch.randn(4, 3), torch.randn(4, 5))


def test_recovery_trains_with_normalized_feature_terms(tmp_path):
    d = _unet()
    data = _data(d.shape, n=32)
    cfg = P.LayerPrune(ratio=0.1, calibration=16)
    pruned, rep = P.prune(d, data, cfg)
    student = P.recover(d, pruned, data, cfg, rep["removed"], TrainConfig(epochs=1, batch_size=16), run_dir=tmp_path,
                        progress=False)
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    terms = next(r["terms"] for r in logged if r.get("event") == "train")
    assert {"task", "output_kd", "feat_down_blocks_0", "feat_mid_block", "feat_up_blocks_1"} <= set(terms)
    assert P.feature_pairs(student.net, d.net, rep["removed"])[0] == ("net.down_blocks.0", "net.down_blocks.0")
    mlp = _mlp(4)
    assert P.feature_pairs(P.remove(mlp.net, ["blocks.1"]), mlp.net, ["blocks.1"]) == [
        ("net.blocks.0", "net.blocks.0"), ("net.blocks.1", "net.blocks.2"), ("net.blocks.2", "net.blocks.3")]


def test_attention_blocks_are_removable_and_the_folder_is_exact_in_diffusers(tmp_path):
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4,
                                down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "AttnUpBlock2D"))
    d = Denoiser(net, Process("vp", "epsilon"), (1, 8, 8)).eval()
    found = P.candidates(net)
    assert "down_blocks.0.attentions.0" in found and "up_blocks.1.attentions.1" in found
    drop = ["down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "mid_block.resnets.1"]
    batch = P.calibration_batch(d, _data(d.shape), 8, seed=0)
    with P.Ablated(net, drop):
        masked = P._predict(d, batch)
    small = Denoiser(P.remove(net, drop), d.process, d.shape).eval()
    torch.testing.assert_close(P._predict(small, batch), masked, atol=1e-6, rtol=1e-5)
    path = save_folder(small, tmp_path / "m")
    alone = diffusers.UNet2DModel.from_pretrained(path / "unet")
    with torch.no_grad():
        out = alone(batch["x"], d.process.timestep(batch["tau"])).sample
    torch.testing.assert_close(out, masked, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(P._predict(load_folder(path), batch), masked, atol=1e-6, rtol=1e-5)


def test_a_resumed_prune_removes_the_recorded_layers_without_choosing_again(tmp_path, monkeypatch):
    d = _unet()
    data = _data(d.shape)
    cfg = P.LayerPrune(ratio=0.1, calibration=16)
    first, rep = P.prune(d, data, cfg, record=tmp_path / "prune.json")

    def no_choice(*a, **k):
        raise AssertionError("chose again")

    monkeypatch.setattr(P, "choose", no_choice)
    again, rep2 = P.prune(d, data, cfg, record=tmp_path / "prune.json")
    assert rep2["removed"] == rep["removed"] and again.net.removed_layers == first.net.removed_layers


def test_recovery_terms_follow_the_features_setting(tmp_path):
    d = _mlp(3)
    data = _data(d.shape, n=32)
    for features, weight, want, absent in (("plain", 1.0, {"task", "output_kd", "feat_blocks_0"}, set()),
                                           ("none", 0.0, {"task"}, {"output_kd", "feat_blocks_0"})):
        cfg = P.LayerPrune(ratio=0.2, calibration=16, features=features, output_weight=weight)
        pruned, rep = P.prune(d, data, cfg)
        P.recover(d, pruned, data, cfg, rep["removed"], TrainConfig(epochs=1, batch_size=16),
                  run_dir=tmp_path / features, progress=False)
        logged = [json.loads(x) for x in (tmp_path / features / "metrics.jsonl").read_text().splitlines()]
        terms = set(next(r["terms"] for r in logged if r.get("event") == "train"))
        assert want <= terms and not absent & terms


def test_bad_pruning_input_is_a_one_line_error():
    d = _unet()
    data = _data(d.shape)
    with pytest.raises(DistilleryError, match=r"lower prune\.ratio to at most"):
        P.choose(d, data, P.LayerPrune(ratio=0.9, calibration=8))
    with pytest.raises(DistilleryError, match=r"mid_block\.resnet\.0"):
        P.candidates(d.net, ["mid_block.resnet.0"])
    with pytest.raises(DistilleryError, match="keeps its input's shape"):
        P.choose(d, data, P.LayerPrune(ratio=0.01, calibration=8, layers=["down_blocks.1.resnets.0"]))
    with pytest.raises(DistilleryError, match=r"only whole residual blocks"):  # a layer inside a block
        P.candidates(_mlp().net, ["blocks.0.2"])
    for bad in ({"ratio": 1.0}, {"ratio": 0.0}, {"criterion": "taylor"}, {"features": "fancy"}):
        with pytest.raises(DistilleryError):
            P.LayerPrune(**bad)


def test_prune_recipe_runs_and_resumes(tmp_path, capsys):
    from distillery.cli import main

    out = tmp_path / "run"
    args = ["run", "diffusion/prune", "data=mixture2d", "samples=256", "teacher.net={hidden: 32, depth: 4}",
            "teacher.prediction=v_prediction", "teacher.train.epochs=1", "student.train.epochs=1",
            "prune.calibration=64", "prune.ratio=0.2", "eval.samples=100", "eval.teacher_steps=[2]",
            f"runs_dir={tmp_path / 'runs'}", "--out", str(out), "--quiet"]
    assert main(args) == 0
    rows = {r["method"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert set(rows) == {"teacher", "pruned", "prune"}
    assert rows["prune"]["params"] == rows["pruned"]["params"] < 0.8 * rows["teacher"]["params"] + 1
    assert rows["prune"]["removed"] and rows["prune"]["output_loss"] > 0
    assert (out / "models" / "prune-2step" / "unet" / "config.json").is_file()
    assert (out / "report" / "size.png").is_file()  # quality against size
    assert main([*args[:-3], "--resume", str(out), "--quiet"]) == 0
    again = {r["method"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert again["prune"]["swd"] == rows["prune"]["swd"]
    capsys.readouterr()
    for bad, msg in ((["teacher.source=exact", "student.init=scratch"], "network teacher"),
                     (["method=cd"], "belongs to method prune")):
        assert main([*args[:-3], *bad, "--out", str(tmp_path / "bad"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1
