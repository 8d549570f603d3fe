import random

import numpy as np
import pytest
import torch
from torch import nn

from distillery import data, models
from distillery.errors import DistilleryError
from distillery.teachers import ModuleTeacher, PrecomputedTeacher


def test_mnist1d_split_ids_and_global_rng_untouched():
    random.seed(123)
    np.random.seed(123)
    py_before, np_before = random.random(), np.random.rand()
    random.seed(123)
    np.random.seed(123)
    splits = data.build("mnist1d", {"num_samples": 500})
    assert (random.random(), np.random.rand()) == (py_before, np_before)  # mnist1d reseeds; we restore
    tr, te = splits["train"], splits["test"]
    assert (len(tr), len(te), tr.input_shape) == (400, 100, (40,))
    assert torch.equal(tr.ids, torch.arange(400)) and torch.equal(te.ids, torch.arange(400, 500))
    again = data.build("mnist1d", {"num_samples": 500})  # from the cache now: the same samples
    assert torch.equal(again["train"].x, tr.x) and torch.equal(again["test"].y, te.y)


def test_transfer_set_is_unlabelled_and_differs_from_the_standard_set():
    t = data.build("mnist1d_transfer", {"size": 205, "seed": 3})["transfer"]
    assert t.y is None and len(t) == 205 and t.input_shape == (40,)
    std = data.build("mnist1d", {"num_samples": 500})["train"]
    assert not torch.allclose(t.x[:50], std.x[:50])
    with pytest.raises(DistilleryError, match="seed 42"):
        data.build("mnist1d_transfer", {"seed": 42})


def test_digits_and_models_by_name():
    d = data.build("digits")
    assert d["train"].input_shape == (1, 8, 8) and len(d["train"]) + len(d["test"]) == 1797
    assert not set(d["train"].ids.tolist()) & set(d["test"].ids.tolist())
    for name, shape in (("mlp", (1, 8, 8)), ("cnn2d", (1, 8, 8)), ("cnn1d", (40,)), ("patch_transformer", (40,))):
        m = models.build(name, shape, 10)
        assert m(torch.zeros(3, *shape)).shape == (3, 10)
    with pytest.raises(DistilleryError, match="unknown parameter 'width'"):
        models.build("mlp", (40,), 10, {"width": 3})


def test_precomputed_teacher_answers_by_id_not_position():
    torch.manual_seed(0)
    live = ModuleTeacher(nn.Linear(40, 10))
    t = data.build("mnist1d_transfer", {"size": 100, "seed": 3})["transfer"]
    shuffled = t.subset(torch.randperm(100))  # ids no longer equal positions
    pre = PrecomputedTeacher(live, shuffled)
    index = torch.tensor([5, 0, 99, 42])
    batch = shuffled.batch(index)
    assert torch.allclose(pre(batch)["logits"], live(batch)["logits"], atol=1e-6)
    assert torch.allclose(pre({"x": batch["x"]})["logits"], live(batch)["logits"])  # no ids: live teacher
    with pytest.raises(DistilleryError, match=r"sample ids \[1000\] are not in the precomputed"):
        pre({"x": batch["x"][:1], "id": torch.tensor([1000])})
    with pytest.raises(DistilleryError, match="hold \\['logits'\\], not \\['0'\\]"):
        pre(batch, ["0"])


def test_precomputed_teacher_stores_taps():
    torch.manual_seed(0)
    live = ModuleTeacher(nn.Sequential(nn.Linear(40, 8), nn.ReLU(), nn.Linear(8, 10)))
    t = data.build("mnist1d_transfer", {"size": 50, "seed": 3})["transfer"]
    pre = PrecomputedTeacher(live, t, taps=["1"])
    batch = t.batch(torch.tensor([3, 7]))
    got, want = pre(batch, ["1"]), live(batch, ["1"])
    assert set(got) == {"logits", "1"} and torch.allclose(got["1"], want["1"]) and torch.allclose(got["logits"], want["logits"])


def test_teacher_refuses_ddp_wrapper(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with pytest.raises(DistilleryError, match="wrapped in DDP"):
            ModuleTeacher(nn.parallel.DistributedDataParallel(nn.Linear(2, 2)))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_patch_transformer_taps_tokens():
    from distillery.taps import Taps

    m = models.build("patch_transformer", (40,), 10, {"dim": 16, "heads": 2})
    with Taps(m, ["blocks.1"]) as taps:
        m(torch.randn(3, 40))
    assert taps["blocks.1"].shape == (3, 10, 16)


# --------------------------------------------------------------------------- ensembles


def _members():
    from distillery.teachers import ModuleTeacher

    torch.manual_seed(0)
    ms = [torch.nn.Sequential(torch.nn.Linear(6, 5)) for _ in range(3)]
    with torch.no_grad():
        ms[1][0].weight.mul_(4.0)  # a sharper teacher
    return ms, [ModuleTeacher(m) for m in ms]


def test_ensemble_is_the_weighted_mean_of_probabilities():
    from distillery.teachers import EnsembleTeacher

    ms, ts = _members()
    x = torch.randn(8, 6)
    p = [m(x).softmax(-1) for m in ms]
    out = EnsembleTeacher(ts)({"x": x})["logits"]
    assert torch.allclose(out.exp(), (p[0] + p[1] + p[2]) / 3, atol=1e-6)
    out = EnsembleTeacher(ts, weights=[1, 0, 3])({"x": x})["logits"]
    assert torch.allclose(out.exp(), 0.25 * p[0] + 0.75 * p[2], atol=1e-6)
    both = EnsembleTeacher(ts)({"x": x}, ["1:logits", "2:0"])
    assert torch.allclose(both["1:logits"], ms[1](x)) and torch.allclose(both["2:0"], ms[2](x))
    with pytest.raises(DistilleryError, match="'i:logits'"):
        EnsembleTeacher(ts)({"x": x}, ["5:logits"])
    with pytest.raises(DistilleryError, match="non-negative"):
        EnsembleTeacher(ts, weights=[1, -1, 1])


def test_entropy_balancing_reaches_equal_entropies():
    from distillery.teachers import EnsembleTeacher, temperature_for_entropy

    _, ts = _members()
    x = torch.randn(256, 6)
    ens = EnsembleTeacher(ts)
    before = ens.entropies(x)
    assert max(before) - min(before) > 0.2
    temps = ens.balance(x)
    after = ens.entropies(x)
    target = sum(before) / 3
    assert all(abs(h - target) < 1e-6 for h in after)
    assert temps[1] > temps[0]  # the sharp teacher is softened the most
    z = torch.tensor([[2.0, 0.0]])
    t = temperature_for_entropy(z, 0.5)
    p = torch.softmax(z / t, -1)
    assert float(-(p * p.log()).sum()) == pytest.approx(0.5, abs=1e-9)


def test_one_term_per_ensemble_member_in_an_objective():
    from distillery.config import TermConfig
    from distillery.losses import get
    from distillery.objective import Objective
    from distillery.teachers import EnsembleTeacher

    ms, ts = _members()
    x = torch.randn(8, 6)
    obj = Objective([TermConfig(loss="kd", teacher="0:logits", name="clean"),
                     TermConfig(loss="kd", teacher="1:logits", name="robust", weight=0.5)])
    assert obj.built and obj.teacher_taps == ["0:logits", "1:logits"]
    s = torch.randn(8, 5)
    ens = EnsembleTeacher(ts)
    out = obj({"logits": s}, ens({"x": x}, obj.teacher_taps), {"x": x})
    kd = get("kd")
    assert torch.allclose(out["total"], kd(s, ms[0](x)) + 0.5 * kd(s, ms[1](x)))


def test_mtard_balance_moves_weight_to_the_term_that_fell_least():
    from distillery.config import TermConfig
    from distillery.objective import Objective, TermBalance

    bal = TermBalance(["a", "b"], lr=0.5)
    bal.update([torch.tensor(2.0), torch.tensor(4.0)])  # first values: r = (1, 1)
    assert bal.w.tolist() == pytest.approx([0.5, 0.5])
    bal.update([torch.tensor(1.0), torch.tensor(4.0)])  # a halved, b did not: r = (0.5, 1)
    assert bal.w.tolist() == pytest.approx([0.5 - 0.5 * (0.5 - 1 / 3), 0.5 - 0.5 * (0.5 - 2 / 3)])
    obj = Objective([TermConfig(loss="kd", name="a"), TermConfig(loss="kd", name="b", params={"temperature": 1.0}),
                     TermConfig(loss="ce", teacher=None)], balance=["a", "b"])
    assert "term_balance" in obj.modules()
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    out = obj({"logits": s}, {"logits": t}, {"x": s, "y": y})
    assert out["terms"]["a/balance"].item() == pytest.approx(0.5)
    assert obj.balance.initial.tolist() == [0.0, 0.0]  # applied once per optimiser step, by the engine
    obj.end_step()
    assert obj.balance.initial.tolist() == pytest.approx([out["terms"]["a"].item(), out["terms"]["b"].item()])
    with pytest.raises(DistilleryError, match="Did you mean 'a'"):
        Objective([TermConfig(loss="kd", name="a"), TermConfig(loss="kd", name="b")], balance=["aa", "b"])
