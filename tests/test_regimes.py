"""Online (DML), EMA self-distillation, born-again generations and teacher-assistant chains."""

import pytest
import torch
from torch import nn

from distillery.config import TermConfig, TrainConfig
from distillery.engine import evaluate, fit
from distillery.errors import DistilleryError
from distillery.objective import Objective
from distillery.regimes import EMATeacher, Peers, born_again, chain, dml_terms


def mlp(seed, hidden=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, 4))


CFG = TrainConfig(epochs=3, batch_size=16, lr=0.05, optimizer="sgd", log_every=1)


def test_dml_terms_and_peers_teach_through_outputs_only(toy_data):
    peers = Peers([mlp(0), mlp(1)])
    obj = Objective(dml_terms(2))
    assert [t.name for t in obj.terms] == ["ce_0", "kl_0_from_1", "ce_1", "kl_1_from_0"]
    assert not obj.needs_teacher and obj.student_taps == ["members.0", "members.1"]
    from distillery.taps import Taps

    batch = toy_data.batch(torch.arange(16))
    with Taps(peers, obj.student_taps) as taps:
        out = peers(batch["x"])
        s_out = {"logits": out, **taps.outputs}
    result = obj(s_out, None, batch)
    result["terms"]["kl_0_from_1"].backward()  # member 1 only teaches: no gradient reaches it
    assert all(p.grad is None or not p.grad.any() for p in peers.members[1].parameters())
    assert any(p.grad is not None and p.grad.any() for p in peers.members[0].parameters())
    fit(peers, obj, toy_data, CFG, seed=0, progress=False)
    with pytest.raises(DistilleryError, match="two members"):
        Peers([mlp(0)])


def test_ema_update_follows_the_formula(toy_data):
    s = mlp(0)
    ema = EMATeacher(s, momentum=0.9)
    w0 = s[0].weight.detach().clone()
    with torch.no_grad():
        s[0].weight.add_(1.0)
    assert ema.update() == 0.0  # step 0: m = 0, a copy
    assert torch.equal(ema.model[0].weight, s[0].weight)
    with torch.no_grad():
        s[0].weight.add_(1.0)
    assert ema.update() == 0.5
    assert torch.allclose(ema.model[0].weight, 0.5 * (w0 + 1) + 0.5 * (w0 + 2))
    for _ in range(20):
        m = ema.update()
    assert m == 0.9
    out = ema({"x": toy_data.x[:3]})["logits"]
    assert out.shape == (3, 4) and not out.requires_grad


def test_ema_self_distillation_trains_and_resumes(tmp_path, toy_data):
    terms = [TermConfig(loss="kd", params={"temperature": 2.0}), TermConfig(loss="ce", teacher=None)]

    def run(run_dir, stop=None):
        s = mlp(0)
        ema = EMATeacher(s, momentum=0.9)

        def step(n):
            ema.update()
            if n == stop:
                raise KeyboardInterrupt

        fit(s, Objective(terms), toy_data, CFG, teacher=ema, modules={"ema": ema.model}, run_dir=run_dir, seed=0,
            progress=False, on_step=step)
        return s, ema

    a, ema_a = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop=8)
    b, ema_b = run(tmp_path / "b")
    assert torch.equal(a[0].weight, b[0].weight) and torch.equal(ema_a.model[0].weight, ema_b.model[0].weight)


def test_born_again_keeps_every_generation_and_resumes_mid_chain(tmp_path, toy_data):
    teacher = mlp(5, hidden=32)
    fit(teacher, Objective([TermConfig(loss="ce", teacher=None)]), toy_data, CFG, seed=0, progress=False)
    full = born_again(lambda: mlp(0), teacher, toy_data, CFG, generations=2, run_dir=tmp_path / "a")
    assert [g["generation"] for g in full] == [1, 2]
    born_again(lambda: mlp(0), teacher, toy_data, CFG, generations=1, run_dir=tmp_path / "b")  # stopped after gen 1
    resumed = born_again(lambda: mlp(0), teacher, toy_data, CFG, generations=2, run_dir=tmp_path / "b")
    assert resumed[0]["result"]["resumed"]
    assert torch.equal(full[1]["model"][0].weight, resumed[1]["model"][0].weight)


def test_chain_distils_link_by_link(toy_data):
    teacher = mlp(5, hidden=64)
    fit(teacher, Objective([TermConfig(loss="ce", teacher=None)]), toy_data, CFG, seed=0, progress=False)
    links = chain(teacher, [lambda: mlp(1, 32), lambda: mlp(2, 8)], toy_data, CFG, eval_data=toy_data)
    assert [r["params"] for r in links] == [12 * 32 + 32 + 32 * 4 + 4, 12 * 8 + 8 + 8 * 4 + 4]
    assert all(0 <= evaluate(r["model"], toy_data)["accuracy"] <= 1 for r in links)
    with pytest.raises(DistilleryError, match="at least one link"):
        chain(teacher, [], toy_data, CFG)


def test_data_free_refuses_a_teacher_without_batch_norm():
    from distillery.regimes import data_free

    with pytest.raises(DistilleryError, match="no batch-norm layers"):
        data_free(mlp(0), mlp(1), (12,), rounds=1)


def test_bn_prior_and_generator_terms_match_their_formulas():
    from distillery.regimes.datafree import Generator, _BNStats, generator_loss

    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    with torch.no_grad():
        net[1].running_mean.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
        net[1].running_var.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
    stats = _BNStats(net)
    x = torch.randn(32, 3)
    net(x)
    h = net[0](x)
    want = torch.norm(h.mean(0) - net[1].running_mean) + torch.norm(h.var(0, unbiased=False) - net[1].running_var)
    assert torch.allclose(stats.pop(), want)
    stats.remove()
    t = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    terms = generator_loss(t, t.clone(), torch.tensor(0.5), {"bn": 2.0, "oh": 1.0, "adv": 1.0, "balance": 5.0})
    pbar = t.softmax(-1).mean(0)
    assert terms["adv"].item() == pytest.approx(0.0, abs=1e-7)  # student = teacher: no disagreement
    assert terms["balance"].item() == pytest.approx(float((pbar * pbar.log()).sum()), rel=1e-6)
    assert terms["total"].item() == pytest.approx(1.0 + terms["oh"].item() + 5 * terms["balance"].item(), rel=1e-6)
    assert Generator((40,))(torch.randn(5, 64)).shape == (5, 40)
    assert Generator((1, 8, 8))(torch.randn(5, 64)).shape == (5, 1, 8, 8)


def test_data_free_runs_rounds_through_the_engine():
    from distillery import models as zoo
    from distillery.data import TensorData
    from distillery.regimes import data_free

    torch.manual_seed(0)
    x = torch.randn(128, 40)
    d = TensorData(x, (x[:, :10].mean(1) > 0).long(), torch.arange(128), 2, "toy")
    teacher = zoo.build("cnn1d", (40,), 2, {"channels": 4, "hidden": 8, "batch_norm": True})
    fit(teacher, Objective([TermConfig(loss="ce", teacher=None)]), d, CFG, seed=0, progress=False)
    student = zoo.build("mlp", (40,), 2, {"hidden": [8]})
    out = data_free(teacher, student, (40,), rounds=2, generator_steps=2, batch_size=32, samples_per_round=64,
                    memory=96, eval_data=d)
    assert [h["round"] for h in out["history"]] == [1, 2] and "bn" in out["history"][0]
    with pytest.raises(DistilleryError, match="unknown generator weights"):
        data_free(teacher, student, (40,), weights={"bnn": 1})
