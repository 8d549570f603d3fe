"""Labelled shares per batch, domain mixtures and DDK's weight update, through the engine."""

import math

import pytest
import torch
from torch import nn

from distillery.config import TermConfig, TrainConfig
from distillery.data import TensorData
from distillery.data.mixing import DomainMixture, LabelledShare, ddk_update, domain_losses
from distillery.engine import fit
from distillery.errors import DistilleryError
from distillery.objective import Objective
from distillery.teachers import ModuleTeacher


def part(n, start, labelled=True, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g) + shift
    y = x[:, :3].argmax(1) if labelled else None
    return TensorData(x, y, torch.arange(start, start + n), 3, f"p{start}")


def test_every_batch_holds_the_labelled_share():
    d = LabelledShare(part(30, 0), part(90, 100, labelled=False), share=0.25, batch_size=16)
    assert len(d) == 120  # 90 unlabelled at 12 per batch of 16: 7 full batches and a last of 8 (2 labelled)
    order = d.order(0, 0)
    assert len(order) == 120 and torch.equal(order, d.order(0, 0)) and not torch.equal(order, d.order(0, 1))
    for b in order.split(16):
        assert int((b < 30).sum()) == (4 if len(b) == 16 else 2)
    unl = order[order >= 30]
    assert sorted(unl.tolist()) == list(range(30, 120))  # one pass over the unlabelled part
    batch = d.batch(order[:16])
    assert int((batch["y"] == -100).sum()) == 12
    with pytest.raises(DistilleryError, match="ids repeat"):
        LabelledShare(part(5, 0), part(5, 3, labelled=False), share=0.5, batch_size=4)


def test_domain_mixture_samples_by_weight():
    mix = DomainMixture({"a": part(20, 0), "b": part(40, 100)}, length=4000)
    mix.weights.r.copy_(torch.tensor([0.8, 0.2], dtype=torch.float64))
    order = mix.order(1, 0)
    share_a = float((order < 20).float().mean())
    assert abs(share_a - 0.8) < 0.03
    mix.weights.r.copy_(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert bool((mix.order(1, 0) >= 20).all())


def test_ddk_update_matches_its_formula():
    w = DomainMixture({"a": part(4, 0), "b": part(4, 10), "c": part(4, 20)}).weights
    ls, lt = torch.tensor([2.0, 1.0, 1.5]), torch.tensor([1.0, 1.0, 1.0])
    ratio = [math.exp(a) / math.exp(b) for a, b in zip(ls.tolist(), lt.tolist())]
    r0 = ddk_update(w, ls, lt, initial=True)
    soft = [math.exp(v) / sum(math.exp(u) for u in ratio) for v in ratio]
    assert r0.tolist() == pytest.approx(soft, rel=1e-12)
    r1 = ddk_update(w, ls, lt, alpha=0.5)
    psi = [r * math.exp(v) for r, v in zip(soft, ratio)]
    assert r1.tolist() == pytest.approx([0.5 * p / sum(psi) + 0.5 / 3 for p in psi], rel=1e-12)


def test_ddk_through_the_engine_resumes_exactly(tmp_path):
    domains = {"near": part(60, 0, seed=1), "far": part(60, 100, seed=2, shift=2.0)}
    val = {"near": part(30, 500, seed=3), "far": part(30, 600, seed=4, shift=2.0)}
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 3))
    cfg = TrainConfig(epochs=4, batch_size=16, lr=0.05, optimizer="sgd", log_every=1)
    terms = [TermConfig(loss="kd", params={"temperature": 2.0})]
    t_loss = domain_losses(teacher, val)

    def train(run_dir, stop_at=None):
        mix = DomainMixture(domains, length=96)
        torch.manual_seed(1)
        student = nn.Sequential(nn.Linear(6, 3))

        def update(epoch):
            ddk_update(mix.weights, domain_losses(student, val), t_loss, initial=epoch == 1)
            if epoch == stop_at:
                raise KeyboardInterrupt

        fit(student, Objective(terms), mix, cfg, teacher=ModuleTeacher(teacher), modules={"domains": mix.weights},
            run_dir=run_dir, seed=0, progress=False, on_epoch=update)
        return student, mix

    full, mix_full = train(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", stop_at=2)  # raised before epoch 2's checkpoint: resumes from epoch 1
    resumed, mix_res = train(tmp_path / "b")
    assert torch.equal(full[0].weight, resumed[0].weight)
    assert torch.equal(mix_full.weights.r, mix_res.weights.r)
    assert not torch.allclose(mix_full.weights.r, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_auto_targets_fill_unlabelled_rows_with_the_teachers_class():
    obj = Objective([TermConfig(loss="dkd")])
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([0, -100, 2, -100])
    got = obj({"logits": s}, {"logits": t}, {"x": s, "y": y})["total"]
    from distillery.losses import get

    want = get("dkd")(s, t, targets=torch.where(y == -100, t.argmax(-1), y))
    assert torch.allclose(got, want)
    ce_only = Objective([TermConfig(loss="ce", teacher=None)])  # no teacher: unlabelled rows stay masked
    assert torch.allclose(ce_only({"logits": s}, None, {"x": s, "y": y})["total"],
                          nn.functional.cross_entropy(s[[0, 2]], y[[0, 2]]))
