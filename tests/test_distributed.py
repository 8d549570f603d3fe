"""Two gloo processes on CPU reach the weights of one process with the same global batch."""

import dataclasses
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from distillery import distributed
from distillery.config import TermConfig, TrainConfig
from distillery.data import TensorData
from distillery.engine import fit
from distillery.objective import Objective
from distillery.teachers import ModuleTeacher

TERMS = [TermConfig(loss="kd", params={"temperature": 2.0}, weight=0.7),
         TermConfig(loss="ce", teacher=None, weight=0.3)]


def toy(uneven: bool = False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 12, generator=g)
    y = x[:, :4].argmax(1).long()
    if uneven:  # labels on a third of the rows, unevenly spread over ranks and micro-batches
        y = torch.where(torch.rand(90, generator=g) < 0.33, y, torch.full_like(y, -100))
    return TensorData(x, y, torch.arange(90) * 2 + 1, 4, "toy")


def models():
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    torch.manual_seed(2)
    teacher = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
    return student, ModuleTeacher(teacher)


UNEVEN_TERMS = [TermConfig(loss="kd", params={"temperature": 2.0}, weight=0.7),
                TermConfig(loss="ce", teacher=None, weight=0.3, targets="labels")]

CFG = TrainConfig(epochs=2, batch_size=16, lr=0.05, optimizer="sgd", log_every=1, grad_accum=2)


def _worker(rank, world, init_file, run_dir, out, fail_rank, uneven=False):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        student, teacher = models()

        def boom(step):
            if rank == fail_rank and step == 2:
                raise RuntimeError(f"rank {rank} failed on purpose")

        terms = UNEVEN_TERMS if uneven else TERMS
        fit(student, Objective(terms), toy(uneven), CFG, teacher=teacher, run_dir=run_dir, seed=3, progress=False,
            on_step=boom)
        if rank == 0:
            torch.save(student.state_dict(), out)
    finally:
        if fail_rank < 0:
            distributed.shutdown()


def test_two_processes_match_one(tmp_path):
    student, teacher = models()
    fit(student, Objective(TERMS), toy(), CFG, teacher=teacher, seed=3, progress=False)
    out = tmp_path / "w.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "run"), str(out), -1), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    for k, v in student.state_dict().items():
        assert torch.allclose(v, got[k], atol=1e-6), k
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, 7))  # rank 0 alone wrote
    assert all(r.get("world_size") == 2 for r in records if r["event"] == "train")


def test_a_failing_rank_stops_the_job_with_its_message(tmp_path):
    with pytest.raises(Exception, match="rank 1 failed on purpose"):
        mp.spawn(_worker, args=(2, str(tmp_path / "init"), None, str(tmp_path / "w.pt"), 1), nprocs=2, join=True)


def test_one_process_is_unchanged():
    assert distributed.world() == (0, 1)
    idx = torch.arange(5)
    assert torch.equal(distributed.shard(idx, 0, 1), idx)
    assert distributed.weighted_mean(2.0, 3.0) == 2.0


def test_uneven_valid_rows_per_rank_normalise_globally(tmp_path):
    student, teacher = models()
    fit(student, Objective(UNEVEN_TERMS), toy(True), CFG, teacher=teacher, seed=3, progress=False)
    out = tmp_path / "w.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), None, str(out), -1, True), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    for k, v in student.state_dict().items():
        assert torch.allclose(v, got[k], atol=1e-6), k


class _NaNAfter(nn.Module):
    """Gives NaN outputs from its ``after``-th training forward on (only) the rank it is built for."""

    def __init__(self, inner, after):
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.after:
                out = out * float("nan")
        return out


def _nan_worker(rank, world, init_file, errors):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    student, teacher = models()
    net = _NaNAfter(student, 3) if rank == 1 else student
    try:
        fit(net, Objective(TERMS), toy(), CFG, teacher=teacher, seed=3, progress=False)
    except Exception as e:  # every rank must stop, each with a message
        with open(f"{errors}.{rank}", "w") as f:
            f.write(str(e))
    finally:
        distributed.shutdown(ok=False)


def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    mp.spawn(_nan_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "err")), nprocs=2, join=True)
    own, other = (tmp_path / "err.1").read_text(), (tmp_path / "err.0").read_text()
    assert "non-finite loss" in own and "another rank" not in own
    assert "non-finite loss" in other and "on another rank" in other


CRD_TERMS = [TermConfig(loss="kd", params={"temperature": 2.0}),
             TermConfig(loss="crd", student="logits", teacher="logits", weight=0.5,
                        params={"num_samples": 180, "feat_dim": 8, "num_negatives": 16})]


def _crd_worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        student, teacher = models()
        objective = Objective(CRD_TERMS)
        fit(student, objective, toy(), TrainConfig(epochs=1, batch_size=16, lr=0.05, optimizer="sgd"),
            teacher=teacher, seed=3, progress=False)
        st = objective.terms[1].state_module
        torch.save({"memory_s": st.memory_s, "memory_t": st.memory_t}, f"{out}.{rank}")
    finally:
        distributed.shutdown()


def test_crd_banks_keep_every_ranks_samples(tmp_path):
    """Each rank updates the bank rows of its own samples; end_step shares them, so after an epoch
    every sample's rows have moved on both ranks (before, rank 0's buffers overwrote rank 1's rows)."""
    probe = Objective(CRD_TERMS)
    probe.build({"logits": torch.zeros(2, 4)}, {"logits": torch.zeros(2, 4)}, seed=3)  # as fit builds it
    init = probe.terms[1].state_module
    mp.spawn(_crd_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "bank")), nprocs=2, join=True)
    a, b = (torch.load(f"{tmp_path / 'bank'}.{r}", weights_only=True) for r in (0, 1))
    ids = toy().ids
    for name in ("memory_s", "memory_t"):
        assert torch.equal(a[name], b[name])  # every rank holds the same banks
        moved = (a[name] - getattr(init, name)).abs().sum(1) > 1e-6
        assert torch.equal(moved.nonzero().flatten(), ids.sort().values)  # each sample's row, no other


# --------------------------------------------------------------------------- FSDP2 and resume of each strategy


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return torch.relu(self.lin(x))


class Blocks(nn.Module):
    """A student with repeated blocks (FSDP2 shards each one, then the whole model)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.blocks = nn.ModuleList([Block(16), Block(16)])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


FEATURE_TERMS = [*TERMS, TermConfig(loss="hint", student="blocks.0", teacher="0", weight=0.1)]
SCALE_CFG = TrainConfig(epochs=2, batch_size=16, lr=0.05, optimizer="adamw", log_every=1, grad_accum=2,
                        clip_grad_norm=1.0, checkpoint_every_steps=1)


def blocks_models():
    torch.manual_seed(1)
    student = Blocks()
    torch.manual_seed(2)
    teacher = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
    return student, ModuleTeacher(teacher)


def _scale_worker(rank, world, init_file, run_dir, out, strategy, fail_step):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ok = False
    try:
        student, teacher = blocks_models()
        teacher.shard = strategy == "fsdp"  # a live teacher sharded like the student
        objective = Objective(FEATURE_TERMS)

        def boom(step):
            if step == fail_step:
                raise RuntimeError("killed on purpose")

        cfg = dataclasses.replace(SCALE_CFG, strategy=strategy)
        fit(student, objective, toy(), cfg, teacher=teacher, run_dir=run_dir, seed=3, progress=False, on_step=boom)
        full = distributed.full_state_dict(student)
        adapter = distributed.full_state_dict(objective.terms[2].adapter_module)
        if rank == 0:
            torch.save({"student": full, "adapter": adapter}, out)
        ok = True
    except RuntimeError as e:
        if "killed on purpose" not in str(e):
            raise
        ok = True  # every rank stops at the same step: leave the group together
    finally:
        distributed.shutdown(ok)


def _one_process(run_dir=None):
    student, teacher = blocks_models()
    objective = Objective(FEATURE_TERMS)
    fit(student, objective, toy(), SCALE_CFG, teacher=teacher, run_dir=run_dir, seed=3, progress=False)
    return student.state_dict(), objective.terms[2].adapter_module.state_dict()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_each_strategy_equals_one_process_and_resumes_exactly(tmp_path, strategy):
    want_s, want_a = _one_process()
    run, out = tmp_path / "run", tmp_path / "w.pt"
    # Killed in step 3 (after its update, before its checkpoint), then resumed: the weights of one process.
    mp.spawn(_scale_worker, args=(2, str(tmp_path / "i1"), str(run), str(out), strategy, 3), nprocs=2, join=True)
    assert not out.exists()
    meta = json.loads((run / "checkpoints/distill/last.json").read_text())
    assert meta["global_step"] == 2 and meta["strategy"] == strategy
    assert meta["format"] == ("dcp" if strategy == "fsdp" else "safetensors")
    mp.spawn(_scale_worker, args=(2, str(tmp_path / "i2"), str(run), str(out), strategy, -1), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    for k, v in want_s.items():
        assert torch.allclose(v, got["student"][k], atol=1e-5), k
    for k, v in want_a.items():
        assert torch.allclose(v, got["adapter"][k], atol=1e-5), k
    names = sorted(p.name for p in (run / "checkpoints/distill").iterdir())
    assert len([n for n in names if n.startswith("last-")]) == 1 + (strategy == "fsdp")  # + its RNG file


def test_a_ddp_checkpoint_resumes_in_one_process(tmp_path):
    """The global batch does not depend on the world size: a 2-process run resumes in one process."""
    want_s, _ = _one_process()
    run, out = tmp_path / "run", tmp_path / "w.pt"
    mp.spawn(_scale_worker, args=(2, str(tmp_path / "i1"), str(run), str(out), "ddp", 3), nprocs=2, join=True)
    got_s, _ = _one_process(run)
    for k, v in want_s.items():
        assert torch.allclose(v, got_s[k], atol=1e-5), k


def _stages_worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out_w = _two_stages()
        if rank == 0:
            torch.save(out_w, out)
    finally:
        distributed.shutdown()


def _two_stages():
    """Two fits on one student (a staged recipe): the second wraps it anew."""
    student, teacher = models()
    fit(student, Objective([TermConfig(loss="ce", teacher=None)]), toy(), CFG, seed=3, progress=False, phase="a")
    fit(student, Objective(TERMS), toy(), CFG, teacher=teacher, seed=3, progress=False, phase="b")
    return student.state_dict()


def test_stages_rewrap_the_student_and_still_match_one_process(tmp_path):
    want = _two_stages()
    mp.spawn(_stages_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "w.pt")), nprocs=2, join=True)
    got = torch.load(tmp_path / "w.pt", weights_only=True)
    for k, v in want.items():
        assert torch.allclose(v, got[k], atol=1e-6), k
