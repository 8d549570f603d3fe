import json

import pytest
import torch
from torch import nn

from distillery.config import TermConfig, TrainConfig
from distillery.engine import fit, load_checkpoint, make_schedule
from distillery.errors import DistilleryError
from distillery.objective import Objective, Term
from distillery.teachers import ModuleTeacher


def student():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4))


def teacher():
    torch.manual_seed(2)
    return ModuleTeacher(nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4)))


KD_CE = [TermConfig(loss="kd", params={"temperature": 2.0}, weight=0.7),
         TermConfig(loss="ce", teacher=None, weight=0.3)]


def cfg(**kw):
    base = dict(epochs=3, batch_size=16, lr=0.05, optimizer="sgd", warmup_epochs=0.5, log_every=1, grad_accum=2)
    return TrainConfig(**{**base, **kw})


class Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path, toy_data):
    t = teacher()
    full = student()
    fit(full, Objective(KD_CE), toy_data, cfg(), teacher=t, run_dir=tmp_path / "a", seed=3, progress=False)

    part = student()

    def stop(step):
        if step == 5:  # mid-epoch 2 (3 optimiser steps per epoch), after a step checkpoint at 4
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(part, Objective(KD_CE), toy_data, cfg(checkpoint_every_steps=2), teacher=t, run_dir=tmp_path / "b",
            seed=3, progress=False, on_step=stop)
    meta = json.loads((tmp_path / "b/checkpoints/distill/last.json").read_text())
    assert (meta["global_step"], meta["epoch"], meta["step_in_epoch"]) == (4, 1, 1)
    resumed = student()  # fresh weights: everything must come from the checkpoint
    out = fit(resumed, Objective(KD_CE), toy_data, cfg(checkpoint_every_steps=2), teacher=t,
              run_dir=tmp_path / "b", seed=3, progress=False)
    assert out["resumed"]
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "b/metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == list(range(1, 10))  # records after the checkpoint were dropped, none duplicated


def test_eval_every_steps_adds_points_inside_epochs_and_changes_no_weight(tmp_path, toy_data):
    a, b = student(), student()
    fit(a, Objective(KD_CE), toy_data, cfg(), teacher=teacher(), run_dir=tmp_path / "a", seed=3, progress=False,
        eval_data=toy_data)
    fit(b, Objective(KD_CE), toy_data, cfg(eval_every_steps=2), teacher=teacher(), run_dir=tmp_path / "b", seed=3,
        progress=False, eval_data=toy_data)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)  # evaluating leaves training as it was (modes, RNG)
    evals = [json.loads(line) for line in (tmp_path / "b/metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "eval"]
    assert [(e["step"], e.get("within_epoch", False)) for e in evals] == \
        [(2, True), (3, False), (4, True), (6, False), (8, True), (9, False)]  # 3 steps an epoch
    with pytest.raises(DistilleryError, match="eval_every_steps"):
        cfg(eval_every_steps=0)


def test_run_without_change_differs_with_other_seed(toy_data):
    a, b = student(), student()
    fit(a, Objective(KD_CE), toy_data, cfg(), teacher=teacher(), seed=3, progress=False)
    fit(b, Objective(KD_CE), toy_data, cfg(), teacher=teacher(), seed=4, progress=False)
    assert not torch.equal(a[0].weight, b[0].weight)


def test_grad_accum_matches_one_big_batch(toy_data):
    """Two micro-batches of 16 weighted by their share give the gradient of one batch of 32."""
    obj = Objective([TermConfig(loss="ce", teacher=None)])
    a, b = student(), student()
    for m in (a, b):
        m[2].p = 0.0  # no dropout: compare the arithmetic only
    fit(a, obj, toy_data, cfg(batch_size=16, grad_accum=2, epochs=1), seed=0, progress=False)
    fit(b, obj, toy_data, cfg(batch_size=32, grad_accum=1, epochs=1), seed=0, progress=False)
    assert torch.allclose(a[0].weight, b[0].weight, atol=1e-6)


def test_nan_loss_stops_with_message(toy_data):
    bad = toy_data.subset(torch.arange(96))
    bad.x[5, 3] = float("nan")
    with pytest.raises(DistilleryError) as e:
        fit(student(), Objective(KD_CE), bad, cfg(), teacher=teacher(), seed=0, progress=False)
    msg = str(e.value)
    assert "non-finite loss" in msg and "kd = nan" in msg and "clip_grad_norm" in msg


def test_teacher_stays_frozen(toy_data):
    t = teacher()
    before = [p.clone() for p in t.model.parameters()]
    fit(student(), Objective(KD_CE), toy_data, cfg(epochs=1), teacher=t, seed=0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
    assert not t.model.training and not any(p.requires_grad for p in t.model.parameters())
    out = t({"x": toy_data.x[:2]})
    assert not out["logits"].requires_grad
    t.model.train()
    with pytest.raises(DistilleryError, match="train mode"):
        t({"x": toy_data.x[:2]})


def test_student_back_in_train_mode_after_eval(toy_data):
    s = student()
    seen = []
    s.register_forward_pre_hook(lambda m, i: seen.append(m.training))
    fit(s, Objective([TermConfig(loss="ce", teacher=None)]), toy_data, cfg(epochs=2), eval_data=toy_data,
        seed=0, progress=False)
    assert seen.count(True) == 2 * 3 * 2  # every training forward of both epochs ran in train mode
    assert False in seen  # and evaluation ran in eval mode


def test_corrupted_checkpoint_is_refused(tmp_path, toy_data):
    fit(student(), Objective(KD_CE), toy_data, cfg(epochs=1), teacher=teacher(), run_dir=tmp_path, seed=0, progress=False)
    st = next((tmp_path / "checkpoints/distill").glob("last-*.safetensors"))
    data = bytearray(st.read_bytes())
    data[-10] ^= 0xFF
    st.write_bytes(bytes(data))
    with pytest.raises(DistilleryError, match="corrupted"):
        load_checkpoint(tmp_path / "checkpoints/distill/last")
    with pytest.raises(DistilleryError, match="corrupted"):
        fit(student(), Objective(KD_CE), toy_data, cfg(epochs=1), teacher=teacher(), run_dir=tmp_path, seed=0, progress=False)
    (tmp_path / "checkpoints/distill/last.json").write_text("{not json")
    with pytest.raises(DistilleryError, match="corrupted"):
        load_checkpoint(tmp_path / "checkpoints/distill/last")


def test_class_count_mismatch(toy_data):
    torch.manual_seed(0)
    t = ModuleTeacher(nn.Linear(12, 5))
    with pytest.raises(DistilleryError, match="teacher logits have 5 classes, student logits 4"):
        fit(student(), Objective(KD_CE), toy_data, cfg(epochs=1), teacher=t, seed=0, progress=False)


def test_schedule_warmup_then_cosine():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_schedule(opt, TrainConfig(epochs=2, lr=1.0, warmup_epochs=1, min_lr=0.1), steps_per_epoch=4)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(0.75 * torch.pi)).item()))


def test_objective_terms_and_targets(toy_data):
    obj = Objective([Term("kd", 0.5, params={"temperature": 1.0}), Term("kd", 2.0), Term("ce", teacher=None)])
    assert [t.name for t in obj.terms] == ["kd", "kd_2", "ce"]
    s = {"logits": torch.randn(4, 4)}
    t = {"logits": torch.randn(4, 4)}
    batch = {"x": toy_data.x[:4], "y": toy_data.y[:4]}
    out = obj(s, t, batch)
    assert set(out["terms"]) == {"kd", "kd_2", "ce"}
    expect = 0.5 * out["terms"]["kd"] + 2.0 * out["terms"]["kd_2"] + out["terms"]["ce"]
    assert torch.allclose(out["total"], expect)
    # On an unlabelled batch, ce with targets=auto and a teacher uses the teacher's argmax.
    hard = Objective([Term("ce", teacher="logits")])(s, t, {"x": batch["x"]})
    assert torch.allclose(hard["total"], torch.nn.functional.cross_entropy(s["logits"], t["logits"].argmax(-1)))
    with pytest.raises(DistilleryError, match="needs labels"):
        Objective([Term("ce", teacher=None)])(s, None, {"x": batch["x"]})


def test_clipping_bf16_and_step_schedule_run(toy_data):
    s = student()
    out = fit(s, Objective(KD_CE), toy_data, cfg(epochs=2, clip_grad_norm=0.1, precision="bf16", schedule="step",
                                                  step_epochs=1, gamma=0.5), teacher=teacher(), eval_data=toy_data,
              seed=0, progress=False)
    assert len(out["history"]) == 2 and all(0 <= h["accuracy"] <= 1 for h in out["history"])
    assert all(torch.isfinite(p).all() for p in s.parameters())


def test_clipping_bounds_the_update(toy_data):
    """With plain SGD (no momentum) one step moves the weights by lr * clipped gradient."""
    s = student()
    s[2].p = 0.0
    before = [p.detach().clone() for p in s.parameters()]
    c = cfg(epochs=1, batch_size=96, grad_accum=1, momentum=0.0, lr=1.0, warmup_epochs=0, schedule="constant",
            clip_grad_norm=1e-3)
    fit(s, Objective([TermConfig(loss="ce", teacher=None)]), toy_data, c, seed=0, progress=False)
    moved = float(torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(s.parameters(), before))))
    assert moved == pytest.approx(1e-3, rel=1e-3)


def _val(toy_data):
    from distillery.data import TensorData

    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 12, generator=g)
    return TensorData(x, x[:, :4].argmax(1).long(), torch.arange(1000, 1040), 4, "toy-val")


def test_select_best_ends_with_the_best_epochs_weights(toy_data):
    from distillery.engine import evaluate

    val = _val(toy_data)
    s = student()
    out = fit(s, Objective(KD_CE), toy_data, cfg(epochs=8, lr=0.2, select="best"), teacher=teacher(), eval_data=val,
              seed=3, progress=False)
    accs = [h["accuracy"] for h in out["history"]]
    best_epoch = max(i for i, a in enumerate(accs) if a == max(accs)) + 1  # ties: the later epoch
    assert out["best"] == {"accuracy": max(accs), "epoch": best_epoch}
    assert out["final"]["epoch"] == best_epoch
    assert evaluate(s, val)["accuracy"] == pytest.approx(max(accs))
    if best_epoch < 8:  # the weights went back to that epoch's, not the last one's
        last = student()
        fit(last, Objective(KD_CE), toy_data, cfg(epochs=best_epoch, lr=0.2), teacher=teacher(), eval_data=val,
            seed=3, progress=False)
        for a, b in zip(s.state_dict().values(), last.state_dict().values()):
            assert torch.equal(a, b)


def test_patience_stops_early_and_resume_keeps_the_best(tmp_path, toy_data):
    val = _val(toy_data)
    kw = dict(epochs=30, lr=0.2, select="best", patience=2)
    full = student()
    out = fit(full, Objective(KD_CE), toy_data, cfg(**kw), teacher=teacher(), eval_data=val, seed=3, progress=False)
    n = len(out["history"])
    assert n < 30 and n - out["best"]["epoch"] == 2

    part = student()

    def stop(step):
        if step == 3 * (n - 1):  # at the end of the last epoch but one, after its best was seen
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(part, Objective(KD_CE), toy_data, cfg(**kw), teacher=teacher(), eval_data=val, run_dir=tmp_path,
            seed=3, progress=False, on_step=stop)
    resumed = student()
    out2 = fit(resumed, Objective(KD_CE), toy_data, cfg(**kw), teacher=teacher(), eval_data=val, run_dir=tmp_path,
               seed=3, progress=False)
    assert out2["best"] == out["best"]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_select_best_needs_a_labelled_eval_set(toy_data):
    with pytest.raises(DistilleryError, match="validation set"):
        fit(student(), Objective(KD_CE), toy_data, cfg(select="best"), teacher=teacher(), progress=False)
    with pytest.raises(DistilleryError, match="patience"):
        TrainConfig(patience=0)


def test_accumulation_normalises_each_term_by_its_valid_rows(toy_data):
    from distillery.data import TensorData

    g = torch.Generator().manual_seed(4)
    y = torch.where(torch.rand(96, generator=g) < 0.3, toy_data.y, torch.full_like(toy_data.y, -100))
    data = TensorData(toy_data.x, y, toy_data.ids, 4, "sparse-labels")
    terms = [TermConfig(loss="ce", teacher=None, targets="labels")]
    one, many = student(), student()
    fit(one, Objective(terms), data, cfg(grad_accum=1, batch_size=32, warmup_epochs=0), seed=3, progress=False)
    fit(many, Objective(terms), data, cfg(grad_accum=4, batch_size=8, warmup_epochs=0), seed=3, progress=False)
    for a, b in zip(one.parameters(), many.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
