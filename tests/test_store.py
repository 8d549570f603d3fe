"""The teacher-output store: round trips, sparse targets, resumable writes, and its errors."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from distillery.config import TermConfig, TrainConfig
from distillery.data import TensorData
from distillery.engine import fit
from distillery.errors import DistilleryError
from distillery.losses import get
from distillery.losses.sparse import TopK
from distillery.objective import Objective
from distillery.store import CachedTeacher, TeacherStore, index_dtype, model_fingerprint, write_store
from distillery.teachers import ModuleTeacher, PrecomputedTeacher

kd = get("kd")


def setup(n=200, c=10):
    torch.manual_seed(0)
    x = torch.randn(n, 12)
    data = TensorData(x, None, torch.arange(n) * 3 + 7, c, "toy")  # ids are not positions
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, c))
    return data, model, ModuleTeacher(model)


def live_logits(model, data, ids):
    return model(data.x[(ids - 7) // 3]).detach()


def test_dense_round_trip_is_exact(tmp_path):
    data, model, teacher = setup()
    write_store(teacher, data, tmp_path, teacher_fingerprint=model_fingerprint(model), shard_size=64, temperature=2.0)
    cached = CachedTeacher(tmp_path)
    ids = data.ids[torch.randperm(len(data))[:50]]  # shuffled order: rows come by id
    got = cached({"id": ids})["logits"]
    want = live_logits(model, data, ids)
    assert torch.allclose(got.softmax(-1), want.softmax(-1), atol=1e-6)
    s = torch.randn(50, 10)
    for tau in (1.0, 4.0):
        assert kd(s, got, temperature=tau).item() == pytest.approx(kd(s, want, temperature=tau).item(), rel=1e-5)
    assert len(cached.store) == 200 and len(cached.store.arrays) == 4


def test_topk_store_values_indices_and_tail(tmp_path):
    data, model, teacher = setup()
    write_store(teacher, data, tmp_path, teacher_fingerprint="t", top_k=3, temperature=1.0)
    st = TeacherStore(tmp_path)
    assert st.arrays[0]["indices"].dtype == np.uint8 and st.arrays[0]["values"].dtype == np.float16
    ids = data.ids[:20]
    tk = st.lookup(ids)["logits"]
    logp = live_logits(model, data, ids).log_softmax(-1)
    v, i = logp.topk(3, 1)
    assert torch.equal(tk.indices, i)
    assert torch.allclose(tk.log_probs, v, atol=2e-3)  # float16: within half a unit in the last place
    rest = torch.log1p(-v.exp().sum(1))
    assert torch.allclose(tk.tail, rest, atol=1e-5)
    assert torch.equal(tk.argmax(), logp.argmax(-1))
    assert st.bytes_per_sample() == 8 + 3 * 2 + 3 * 1 + 4  # id, values, indices, tail


def test_index_dtype_is_the_smallest_that_holds_the_classes():
    assert index_dtype(256) == np.uint8 and index_dtype(257) == np.uint16 and index_dtype(70000) == np.int32


def test_sparse_kd_with_all_classes_equals_dense_kd():
    torch.manual_seed(1)
    t, s = torch.randn(6, 5), torch.randn(6, 5)
    for tail in (True, False):
        lp = (t / 2.0).log_softmax(-1)
        v, i = lp.topk(5, 1)
        tk = TopK(v, i, torch.full((6,), -math.inf) if tail else None, 5, temperature=2.0)
        for tau in (2.0, 4.0):
            assert kd(s, tk, temperature=tau).item() == pytest.approx(kd(s, t, temperature=tau).item(), rel=1e-5)


def test_sparse_kd_hand_value_and_tail_bucket():
    # teacher p = (0.5, 0.3 | tail 0.2 over 2 classes); student uniform over 4 classes, tau = 1
    tk = TopK(torch.tensor([[math.log(0.5), math.log(0.3)]]), torch.tensor([[2, 0]]),
              torch.tensor([math.log(0.2)]), 4)
    want = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    assert kd(torch.zeros(1, 4), tk, temperature=1.0).item() == pytest.approx(want, rel=1e-6)
    # tail dropped: the kept entries renormalised; the student's own kept mass (0.5 of it) is not
    dropped = TopK(tk.log_probs, tk.indices, None, 4)
    want = 0.625 * math.log(0.625 / 0.25) + 0.375 * math.log(0.375 / 0.25)
    assert kd(torch.zeros(1, 4), dropped, temperature=1.0).item() == pytest.approx(want, rel=1e-6)
    mask = torch.tensor([False])
    assert kd(torch.zeros(1, 4), tk, temperature=1.0, mask=mask).item() == 0.0


def test_retempering_matches_the_formula():
    p = torch.tensor([[0.6, 0.3]])
    tail = torch.tensor([0.1])
    tk = TopK(p.log(), torch.tensor([[0, 1]]), tail.log(), 4, temperature=1.0)
    r = tk.retemper(2.0)
    raw = torch.cat([p.pow(0.5), (2 * (tail / 2).pow(0.5)).unsqueeze(1)], 1)  # tail: 2 classes of 0.05
    want = raw / raw.sum(1, keepdim=True)
    assert torch.allclose(r.buckets().exp(), want, atol=1e-6)
    exact = TopK(p.log(), torch.tensor([[0, 1]]), None, 2, temperature=1.0).retemper(0.5)
    assert torch.allclose(exact.buckets().exp(), p.pow(2) / p.pow(2).sum(), atol=1e-6)


def test_interrupted_write_resumes_and_a_cut_shard_is_rewritten(tmp_path):
    data, model, teacher = setup()
    calls = {"n": 0}

    def flaky(batch, taps=()):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return teacher(batch, taps)

    with pytest.raises(RuntimeError, match="killed"):
        write_store(flaky, data, tmp_path, teacher_fingerprint="t", shard_size=50, batch_size=50)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000", "shard-00001"] and not manifest["complete"]
    with pytest.raises(DistilleryError, match="incomplete"):
        TeacherStore(tmp_path)
    (tmp_path / "shard-00002").mkdir()  # a shard cut mid-write: on disk, not in the manifest
    np.save(tmp_path / "shard-00002" / "ids.npy", np.zeros(3, np.int64))
    first = (tmp_path / "shard-00000" / "logits.npy").stat().st_mtime_ns
    calls["n"] = 10
    write_store(flaky, data, tmp_path, teacher_fingerprint="t", shard_size=50, batch_size=50)
    assert (tmp_path / "shard-00000" / "logits.npy").stat().st_mtime_ns == first  # kept, not recomputed
    assert calls["n"] == 12  # only shards 2 and 3 were computed
    got = CachedTeacher(tmp_path)({"id": data.ids})["logits"]
    assert torch.allclose(got.softmax(-1), live_logits(model, data, data.ids).softmax(-1), atol=1e-6)


def test_store_errors(tmp_path):
    data, _model, teacher = setup()
    write_store(teacher, data, tmp_path, teacher_fingerprint="abc", shard_size=100)
    with pytest.raises(DistilleryError, match="teacher_fingerprint"):
        TeacherStore(tmp_path, expect={"teacher_fingerprint": "xyz"})
    with pytest.raises(DistilleryError, match=r"sample ids \[1\] are not in the store"):
        CachedTeacher(tmp_path)({"id": torch.tensor([7, 1])})
    with pytest.raises(DistilleryError, match="taps"):
        CachedTeacher(tmp_path)({"id": data.ids[:2]}, ["0"])
    with pytest.raises(DistilleryError, match="other settings"):
        write_store(teacher, data, tmp_path, teacher_fingerprint="abc", shard_size=100, top_k=2)
    with open(tmp_path / "shard-00001" / "logits.npy", "r+b") as f:  # flip a byte
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(DistilleryError, match="corrupted"):
        TeacherStore(tmp_path)
    write_store(teacher, data, tmp_path, teacher_fingerprint="abc", shard_size=100)  # repairs it
    TeacherStore(tmp_path)
    with pytest.raises(DistilleryError, match="no manifest"):
        TeacherStore(tmp_path / "nothing")
    with pytest.raises(DistilleryError, match="no 'id'"):
        CachedTeacher(tmp_path)({"x": data.x[:2]})


def test_stored_taps_and_two_ranks_read_their_own_ids(tmp_path):
    data, model, teacher = setup()
    write_store(teacher, data, tmp_path, teacher_fingerprint="t", taps=["0"], shard_size=64)
    cached = CachedTeacher(tmp_path)
    for rank in range(2):  # a sampler sharding by id: each rank asks for its own ids, in its own order
        ids = data.ids[rank::2].flip(0)
        out = cached({"id": ids}, ["0"])
        assert torch.allclose(out["0"], model[0](data.x[(ids - 7) // 3]).detach(), atol=1e-6)


def test_training_from_the_store_matches_the_precomputed_teacher(tmp_path):
    data, _model, teacher = setup()
    labelled = TensorData(data.x, torch.zeros(len(data), dtype=torch.long), data.ids, 10, "toy")
    write_store(teacher, labelled, tmp_path, teacher_fingerprint="t", temperature=3.0)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, optimizer="sgd", log_every=1)
    terms = [TermConfig(loss="kd", params={"temperature": 2.0})]
    out = []
    for answers in (PrecomputedTeacher(teacher, labelled), CachedTeacher(tmp_path)):
        torch.manual_seed(5)
        student = nn.Sequential(nn.Linear(12, 10))
        fit(student, Objective(terms), labelled, cfg, teacher=answers, eval_data=labelled, seed=1, progress=False)
        out.append(student[0].weight.detach())
    assert torch.allclose(out[0], out[1], atol=1e-5)


def test_views_store_one_answer_per_augmented_view(tmp_path):
    from distillery.data.views import ShiftNoise, ViewData, view_seeds

    data, model, teacher = setup(n=60)
    aug = ShiftNoise(max_shift=2, noise=0.1)
    write_store(teacher, data, tmp_path, teacher_fingerprint="t", views=3, augment=aug, shard_size=25, top_k=2)
    views = ViewData(data, aug, 3)
    cached = CachedTeacher(tmp_path)
    for epoch in range(4):
        order = views.order(0, epoch)
        batch = views.batch(order[:16])
        assert int(batch["view"][0]) == epoch % 3
        got = cached(batch)["logits"]
        want = model(aug(data.x[(batch["id"] - 7) // 3], view_seeds(batch["id"], epoch % 3))).detach()
        assert torch.equal(got.indices, want.log_softmax(-1).topk(2, 1).indices)  # the view the student sees
    mixed = cached({"id": data.ids[:4], "view": torch.tensor([0, 2, 1, 0])})["logits"]
    assert mixed.log_probs.shape == (4, 2)
    with pytest.raises(DistilleryError, match="must say which"):
        cached({"id": data.ids[:4]})
    with pytest.raises(DistilleryError, match="augmented views"):
        PrecomputedTeacher(teacher, views)
    with pytest.raises(DistilleryError, match="need an augment"):
        write_store(teacher, data, tmp_path / "v", teacher_fingerprint="t", views=2)
    assert not torch.equal(aug(data.x[:2], view_seeds(data.ids[:2], 0)), aug(data.x[:2], view_seeds(data.ids[:2], 1)))


def test_batchnorm_teacher_fingerprint_and_sparse_store_refused_by_other_losses(tmp_path):
    from distillery import models as zoo

    bn = zoo.build("cnn2d", (1, 8, 8), 10)
    assert model_fingerprint(bn) == model_fingerprint(bn)  # 0-d num_batches_tracked buffers hash too
    data, _model, teacher = setup(n=20)
    write_store(teacher, data, tmp_path, teacher_fingerprint="t", top_k=2)
    obj = Objective([TermConfig(loss="reverse_kl")])
    ans = CachedTeacher(tmp_path)({"id": data.ids[:4]})
    with pytest.raises(DistilleryError, match="cannot read; use kd"):
        obj({"logits": torch.randn(4, 10)}, ans, {"x": data.x[:4], "id": data.ids[:4]})
    with pytest.raises(DistilleryError, match="empty"):
        write_store(teacher, data.subset(torch.arange(0)), tmp_path / "e", teacher_fingerprint="t")


def test_sparse_kd_ignores_garbage_in_masked_rows():
    tk = TopK(torch.tensor([[math.nan, 0.0], [math.log(0.5), math.log(0.3)]]), torch.tensor([[0, 1], [0, 1]]),
              torch.tensor([0.0, math.log(0.2)]), 3)
    s = torch.randn(2, 3, requires_grad=True)
    out = kd(s, tk, temperature=1.0, mask=torch.tensor([False, True]))
    assert torch.isfinite(out)
    out.backward()
    assert torch.isfinite(s.grad).all()


def test_the_manifest_is_sealed_and_confined_to_the_store(tmp_path):
    data, _model, teacher = setup()
    write_store(teacher, data, tmp_path, teacher_fingerprint="abc", shard_size=100)
    path = tmp_path / "manifest.json"
    good = json.loads(path.read_text())
    path.write_text(json.dumps({**good, "temperature": 2.0}))  # an edit would silently change training
    with pytest.raises(DistilleryError, match="does not match its checksum"):
        TeacherStore(tmp_path)
    escaped = {**good, "shards": [{**good["shards"][0], "file": "../elsewhere"}, *good["shards"][1:]]}
    from distillery.store import _seal

    escaped["sha256"] = _seal(escaped)  # even a consistent manifest may not point outside the store
    path.write_text(json.dumps(escaped))
    with pytest.raises(DistilleryError, match="not a shard of this store"):
        TeacherStore(tmp_path)
    path.write_text(json.dumps(good))
    assert len(TeacherStore(tmp_path)) == len(data)
