import pytest
import torch
from torch import nn

from distillery import adapters, losses
from distillery.config import TrainConfig
from distillery.engine import fit, load_checkpoint
from distillery.errors import DistilleryError
from distillery.objective import Objective, Term
from distillery.teachers import ModuleTeacher


@pytest.mark.parametrize("s, t, kind, cls, out", [
    ((16,), (32,), "auto", nn.Linear, (32,)),                 # vectors
    ((5, 16), (5, 32), "auto", nn.Linear, (5, 32)),           # tokens: same count, project the width
    ((8, 20), (16, 10), "auto", nn.Sequential, (16, 10)),     # 1-D maps: 1x1 conv, then pool to 10
    ((8, 4, 4), (16, 8, 8), "conv1x1", nn.Sequential, (16, 8, 8)),  # 2-D maps: 1x1 conv, then upsample
    ((8, 4, 4), (16, 4, 4), "auto", nn.Conv2d, (16, 4, 4)),
    ((16,), (32,), "mlp", nn.Sequential, (32,)),
    ((7,), (7,), "auto", nn.Identity, (7,)),
])
def test_adapters_sized_by_shape(s, t, kind, cls, out):
    a = adapters.build(kind, s, t, where="term 'x'")
    assert isinstance(a, cls)
    assert tuple(a(torch.randn(3, *s)).shape[1:]) == out


@pytest.mark.parametrize("s, t, kind, fragment", [
    ((16,), (4, 4), "auto", "no adapter maps student (16,) to teacher (4, 4)"),
    ((16,), (32,), "none", "adapter none, but student (16,) and teacher (32,) differ"),
    ((3, 16), (5, 16), "linear", "student has 3 tokens, teacher 5"),
    ((16,), (32,), "conv1x1", "needs feature maps"),
    ((16,), (32,), "lora", "adapter 'lora' is not known"),
])
def test_adapter_errors(s, t, kind, fragment):
    with pytest.raises(DistilleryError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        adapters.build(kind, s, t, where="term 'x'")


def mse(s, t):
    return ((s - t) ** 2).mean()


class Offset(nn.Module):
    """A learned state: a per-feature offset added to the student before the MSE."""

    def __init__(self, s_shape, t_shape, **_):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(t_shape))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))


@losses.capable(state=Offset, needs_ids=True)  # declared once, where the loss is defined
def offset_mse(s, t, *, state=None, ids=None):
    state.calls += 1
    assert ids is not None
    return ((s + state.offset - t) ** 2).mean()


def nets():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 4))
    teacher = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 4))
    return student, ModuleTeacher(teacher)


def cfg(**kw):
    return TrainConfig(**{**dict(epochs=2, batch_size=32, lr=0.05, optimizer="sgd", log_every=1), **kw})


def feature_terms():
    return [Term("kd", params={"temperature": 2.0}), Term(mse, 2.0, name="hint", student="1", teacher="1"),
            Term(offset_mse, 0.5, name="off", student="1", teacher="1")]


def test_feature_pair_trains_adapter_and_state_and_resumes(tmp_path, toy_data):
    student, teacher = nets()
    obj = Objective(feature_terms())
    fit(student, obj, toy_data, cfg(), teacher=teacher, run_dir=tmp_path / "a", seed=0, progress=False)
    adapter = obj.terms[1].adapter_module
    assert isinstance(adapter, nn.Linear) and adapter.weight.shape == (20, 6)
    assert obj.terms[2].state_module.calls.item() == 2 * 3  # 96 samples / 32 per batch, 2 epochs
    _, tensors = load_checkpoint(tmp_path / "a/checkpoints/distill/last")
    assert {"adapter.hint/weight", "adapter.off/weight", "state.off/offset", "state.off/calls"} <= set(tensors)
    assert torch.equal(tensors["adapter.hint/weight"], adapter.weight)

    # Interrupted in epoch 2, resumed in a fresh objective: adapters and state come back exactly.
    class Stop(Exception):
        pass

    def stop(step):
        if step == 4:
            raise Stop

    student2, _ = nets()
    with pytest.raises(Stop):
        fit(student2, Objective(feature_terms()), toy_data, cfg(), teacher=teacher, run_dir=tmp_path / "b", seed=0,
            progress=False, on_step=stop)
    student3, _ = nets()
    obj3 = Objective(feature_terms())
    fit(student3, obj3, toy_data, cfg(), teacher=teacher, run_dir=tmp_path / "b", seed=0, progress=False)
    assert torch.equal(obj3.terms[1].adapter_module.weight, adapter.weight)
    assert torch.equal(obj3.terms[2].state_module.offset, obj.terms[2].state_module.offset)
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), student3.parameters()))


def test_wrong_teacher_path_fails_before_training(toy_data):
    student, teacher = nets()
    with pytest.raises(DistilleryError, match=r"unknown module path '3'\. Known module paths: 0, 1, 2"):
        fit(student, Objective([Term(mse, student="1", teacher="3")]), toy_data, cfg(), teacher=teacher,
            seed=0, progress=False)


def test_loss_needing_ids_without_ids(toy_data):
    obj = Objective([Term(offset_mse, student="1", teacher="1")])
    s_out = {"logits": torch.zeros(2, 4), "1": torch.zeros(2, 6)}
    t_out = {"logits": torch.zeros(2, 4), "1": torch.zeros(2, 20)}
    obj.build(s_out, t_out)
    with pytest.raises(DistilleryError, match="needs sample ids"):
        obj(s_out, t_out, {"x": torch.zeros(2, 12)})


def test_normalized_terms_are_scaled_and_logged(toy_data):
    obj = Objective([Term(mse, 1.0, name="a", student="1", teacher="1"),
                     Term(mse, 1.0, name="b", student="1", teacher="1"), Term("kd")], normalize=True)
    s_out = {"logits": torch.randn(4, 4), "1": torch.randn(4, 20)}
    t_out = {"logits": torch.randn(4, 4), "1": 100 * torch.randn(4, 20)}
    obj.build(s_out, t_out)
    obj.scales.train()
    out = obj(s_out, t_out, {"x": torch.zeros(4, 12), "id": torch.arange(4)})
    assert out["terms"]["a/scaled"].item() == pytest.approx(1.0)  # first value sets the scale
    assert out["terms"]["a"].item() > 100  # the raw value is logged too
    assert "kd/scaled" not in out["terms"]  # logit terms are not rescaled
    assert torch.allclose(out["total"], out["terms"]["a/scaled"] + out["terms"]["b/scaled"] + out["terms"]["kd"])


def test_pair_terms_with_a_ddp_wrapped_student(tmp_path, toy_data):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        student, teacher = nets()
        ddp = nn.parallel.DistributedDataParallel(student)
        obj = Objective([Term("kd"), Term("hint", student="module.1", teacher="1")])
        fit(ddp, obj, toy_data, cfg(epochs=1), teacher=teacher, seed=0, progress=False)
        assert isinstance(obj.terms[1].adapter_module, nn.Linear)
        assert len(student[1]._forward_hooks) == 0  # hooks gone after training
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.parametrize("loss", ["trg", "hint", "similarity"])
def test_token_feature_terms_between_transformers(loss):
    from distillery import data, models

    d = data.build("mnist1d", {"num_samples": 200})["train"]
    torch.manual_seed(0)
    teacher = ModuleTeacher(models.build("patch_transformer", (40,), 10, {"dim": 32}))
    student = models.build("patch_transformer", (40,), 10, {"dim": 16, "heads": 2})
    obj = Objective([Term("kd"), Term(loss, student="blocks.1", teacher="blocks.1")])
    out = fit(student, obj, d, cfg(epochs=1, lr=0.01), teacher=teacher, eval_data=d, seed=0, progress=False)
    adapter = obj.terms[1].adapter_module
    if loss == "similarity":
        assert adapter is None  # compares batch relations: widths may differ
    else:
        assert isinstance(adapter, nn.Linear) and adapter.weight.shape == (32, 16)  # tokens: project D only
    assert 0 <= out["final"]["accuracy"] <= 1
