"""The packed top-k codec (lm.logit_codec): bit layout against a naive encoder, hand values, error bounds,
bytes, stores written with it and read by the kd loss, and its errors."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from distillery.errors import DistilleryError
from distillery.lm.corpus import TokenData
from distillery.lm.logit_codec import PackedCodec, decode, decode_topk, encode, encode_topk
from distillery.losses import get
from distillery.losses.sparse import TopK
from distillery.store import CachedTeacher, TeacherStore, _write_manifest, read_manifest, write_store
from distillery.teachers import ModuleTeacher

kd = get("kd")


def naive_encode(codec: PackedCodec, lp: np.ndarray, ix: np.ndarray, tail: float) -> bytes:
    """The record of one row, bit by bit, straight from the module docstring's table."""
    k, lb, b, s = codec.k, codec.low_bits, codec.value_bits, codec.clamp / (2**codec.value_bits - 1)
    assert lb == max(0, math.floor(math.log2(codec.num_classes / k)))
    order = sorted(range(k), key=lambda i: ix[i])
    x = [int(ix[i]) for i in order]
    top = max(lp)
    bits = [int(c) for c in format(round(math.asin(math.sqrt(math.exp(tail))) / (math.pi / 2) * 255), "08b")]
    high = [0] * (k + math.ceil(codec.num_classes / 2**lb))
    for i, xi in enumerate(x):
        high[(xi >> lb) + i] = 1
    bits += high
    for xi in x:
        bits += [(xi >> j) & 1 for j in range(lb - 1, -1, -1)]
    for i in order:
        q = min(round((top - lp[i]) / s), 2**b - 1)
        bits += [(q >> j) & 1 for j in range(b - 1, -1, -1)]
    bits += [0] * (-len(bits) % 8)
    return bytes(int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8))


def random_rows(n, v, k, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logp = (scale * torch.randn(n, v, generator=g, dtype=torch.float64)).log_softmax(-1)
    vals, idx = logp.topk(k, -1)
    rest = logp.scatter(-1, idx, float("-inf")).logsumexp(-1)
    return logp, vals, idx, rest


@pytest.mark.parametrize("v,k,bits", [(300, 20, 4), (300, 7, 3), (1000, 64, 2), (50, 50, 8), (8192, 32, 4)])
def test_records_match_a_naive_encoder_and_decode_within_the_bounds(v, k, bits):
    codec = PackedCodec(v, k, bits, clamp=6.0)
    logp, vals, idx, rest = random_rows(40, v, k)
    rec = encode(codec, vals.numpy(), idx.numpy(), rest.numpy())
    assert rec.shape == (40, codec.record_bytes) and rec.dtype == np.uint8
    for r in range(40):
        assert rec[r].tobytes() == naive_encode(codec, vals[r].tolist(), idx[r].tolist(), rest[r].item())
    lp, ix, tl = decode(codec, rec)
    assert np.array_equal(ix, np.sort(idx.numpy(), 1))  # indices exact (ascending)
    want = np.take_along_axis(logp.numpy(), ix, 1)
    rel_want, rel_got = want - want.max(1, keepdims=True), lp - lp.max(1, keepdims=True)
    inside = rel_want >= -codec.clamp
    assert np.abs(rel_got - rel_want)[inside].max() <= codec.step / 2 + 1e-5
    assert np.allclose(rel_got[~inside], -codec.clamp, atol=1e-5)  # beyond the clamp: stored at the clamp
    step_t = (math.pi / 2) / 255
    theta_got, theta_want = np.arcsin(np.sqrt(np.exp(tl))), np.arcsin(np.sqrt(np.exp(rest.numpy())))
    assert np.abs(theta_got - theta_want).max() <= step_t / 2 + 1e-6
    total = np.exp(lp.astype(np.float64)).sum(1) + np.exp(tl.astype(np.float64))  # kept + tail = 1
    assert np.allclose(total, 1.0, atol=1e-5)


def test_hand_computed_tiny_record():
    # V = 8, k = 2, b = 2, L = 3: l = 2, H = 2 + 2 = 4, s = 1; p = 0.5 at class 5, 0.25 at class 2, tail 0.25.
    codec = PackedCodec(8, 2, value_bits=2, clamp=3.0)
    assert (codec.low_bits, codec.high_bits, codec.step, codec.bits, codec.record_bytes) == (2, 4, 1.0, 20, 3)
    rec = encode(codec, np.log([[0.5, 0.25]]), np.array([[5, 2]]))  # tail from the kept mass: 0.25
    # tail asin(0.5) = pi / 6 -> 85 = 01010101 | high: 2 >> 2 = 0 at bit 0, 5 >> 2 = 1 at bit 1 + 1 -> 1010
    # | low: 2 & 3 = 10, 5 & 3 = 01 | values (sorted by index): class 2, round(log 2 / 1) = 1 -> 01; class 5 -> 00
    assert rec.tolist() == [[0b01010101, 0b10101001, 0b01000000]]
    lp, ix, tail = decode(codec, rec)
    assert ix.tolist() == [[2, 5]]
    assert np.allclose(np.exp(tail), 0.25, atol=1e-6)
    # kept entries e^-1 : 1, scaled to the kept mass 0.75
    assert np.allclose(np.exp(lp), [[0.75 * math.exp(-1) / (1 + math.exp(-1)), 0.75 / (1 + math.exp(-1))]], atol=1e-6)


def test_bytes_accounting():
    for (k, b), want in {(32, 4): 57, (64, 3): 97, (128, 4): 193, (192, 3): 249}.items():
        c = PackedCodec(8192, k, b)
        assert c.record_bytes == want == math.ceil((8 + k + math.ceil(8192 / 2**c.low_bits) + k * (c.low_bits + b)) / 8)
    c = PackedCodec(8192, 128, 4)
    _, vals, idx, rest = random_rows(6, 8192, 128)
    tk = TopK(vals.float().reshape(2, 3, 128), idx.reshape(2, 3, 128), rest.float().reshape(2, 3), 8192)
    rec = encode_topk(c, tk)
    assert rec.shape == (2, 3, 193) and rec.nbytes == 6 * 193
    back = decode_topk(c, rec)
    assert back.log_probs.shape == (2, 3, 128) and back.tail.shape == (2, 3) and back.indices.dtype == torch.int64


def token_setup(n=12, t=10, v=64):
    torch.manual_seed(0)
    rows = torch.randint(0, v, (n, t + 1))
    data = TokenData.from_blocks(rows.numpy(), v, "toy")
    model = nn.Sequential(nn.Embedding(v, 8), nn.Linear(8, v))
    with torch.no_grad():
        model[1].weight.mul_(4.0)  # peaked distributions, like an LM's
    return data, model.eval()


def test_store_with_the_codec_is_read_back_and_trains_with_kd(tmp_path):
    data, model = token_setup()
    write_store(ModuleTeacher(model), data, tmp_path / "p", teacher_fingerprint="t", top_k=16, codec="packed",
                value_bits=4, shard_size=5, batch_size=4)
    write_store(ModuleTeacher(model), data, tmp_path / "f", teacher_fingerprint="t", top_k=16, dtype="float32")
    m = read_manifest(tmp_path / "p" / "manifest.json")
    assert m["codec"] == PackedCodec(64, 16, 4).describe()
    assert read_manifest(tmp_path / "f" / "manifest.json")["codec"] is None
    st = TeacherStore(tmp_path / "p")
    assert sorted(st.arrays[0]) == ["ids", "packed"] and st.arrays[0]["packed"].shape == (5, 10, m["codec"]["record_bytes"])
    assert st.bytes_per_sample() < TeacherStore(tmp_path / "f").bytes_per_sample() / 3
    ids = data.ids[torch.tensor([7, 0, 11])]
    got = CachedTeacher(tmp_path / "p")({"id": ids})["logits"]
    ref = CachedTeacher(tmp_path / "f")({"id": ids})["logits"]
    assert isinstance(got, TopK) and got.log_probs.shape == (3, 10, 16) and got.tail.shape == (3, 10)
    o = ref.indices.argsort(-1)
    assert torch.equal(got.indices, ref.indices.gather(-1, o))
    step = PackedCodec(64, 16, 4).step
    rel = lambda lp: lp - lp.max(-1, keepdim=True).values  # noqa: E731
    want = rel(ref.log_probs.gather(-1, o))
    inside = want >= -8.0
    assert (rel(got.log_probs) - want).abs()[inside].max() <= step / 2 + 1e-5
    s = torch.randn(30, 64, requires_grad=True)
    loss, loss_ref = kd(s, got.flat(), temperature=1.0), kd(s, ref.flat(), temperature=1.0)
    assert loss.item() == pytest.approx(loss_ref.item(), abs=0.02)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # tail="drop": the same records, no tail bucket
    write_store(ModuleTeacher(model), data, tmp_path / "d", teacher_fingerprint="t", top_k=16, codec="packed",
                tail="drop")
    assert CachedTeacher(tmp_path / "d")({"id": ids})["logits"].tail is None


def test_the_codec_settings_are_checked_on_resume_and_reopen(tmp_path):
    data, model = token_setup()
    write_store(ModuleTeacher(model), data, tmp_path, teacher_fingerprint="t", top_k=8, codec="packed", value_bits=3)
    with pytest.raises(DistilleryError, match="codec differ"):
        write_store(ModuleTeacher(model), data, tmp_path, teacher_fingerprint="t", top_k=8, codec="packed", value_bits=4)
    with pytest.raises(DistilleryError, match="codec differ"):
        write_store(ModuleTeacher(model), data, tmp_path, teacher_fingerprint="t", top_k=8)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m.pop("sha256")
    m["codec"] = PackedCodec(64, 8, 5).describe()  # resealed: other settings than the records were written with
    _write_manifest(tmp_path / "manifest.json", m)
    with pytest.raises(DistilleryError, match="packed records") as e:
        TeacherStore(tmp_path)
    assert "\n" not in str(e.value)
    m["codec"] = {**PackedCodec(64, 8, 3).describe(), "low_bits": 1}
    _write_manifest(tmp_path / "manifest.json", m)
    with pytest.raises(DistilleryError, match="do not match"):
        TeacherStore(tmp_path)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_classes": 100, "k": 8, "value_bits": 0}, "value_bits must be an integer in 1..8"),
    ({"num_classes": 100, "k": 8, "value_bits": 9}, "value_bits must be an integer in 1..8"),
    ({"num_classes": 100, "k": 8, "value_bits": 2.5}, "value_bits"),
    ({"num_classes": 100, "k": 101}, "k must be an integer in 1..100"),
    ({"num_classes": 100, "k": 0}, "k must be"),
    ({"num_classes": 100, "k": 8, "clamp": float("nan")}, "clamp"),
    ({"num_classes": 100, "k": 8, "clamp": -1.0}, "clamp"),
])
def test_bad_settings_are_one_line_errors(kwargs, match):
    with pytest.raises(DistilleryError, match=match) as e:
        PackedCodec(**kwargs)
    assert "\n" not in str(e.value)


def test_bad_inputs_are_one_line_errors(tmp_path):
    c = PackedCodec(100, 3)
    lp = np.log([[0.5, 0.2, 0.1]])
    cases = [
        (lambda: encode(c, lp, np.array([[1, 1, 2]])), "repeats a class index"),
        (lambda: encode(c, lp, np.array([[1, 2, 100]])), "indices must be integers in 0..99"),
        (lambda: encode(c, np.array([[3.0, 1.0, 0.5]]), np.array([[1, 2, 3]])), "not logits"),
        (lambda: encode(c, np.array([[np.nan, -1.0, -2.0]]), np.array([[1, 2, 3]])), "no NaN"),
        (lambda: encode(c, lp[:, :2], np.array([[1, 2]])), "k = 3"),
        (lambda: decode(c, np.zeros((2, c.record_bytes + 1), np.uint8)), "records must be uint8"),
        (lambda: decode(c, np.zeros((2, c.record_bytes), np.uint8)), "does not hold 3 indices"),
        (lambda: PackedCodec.from_manifest({"name": "zip"}), "not one this distillery reads"),
    ]
    data, model = token_setup()
    cases += [
        (lambda: write_store(ModuleTeacher(model), data, tmp_path / "a", teacher_fingerprint="t", codec="packed"),
         "pass top_k too"),
        (lambda: write_store(ModuleTeacher(model), data, tmp_path / "b", teacher_fingerprint="t", top_k=8, codec="zip"),
         "codec must be one of packed"),
        (lambda: write_store(ModuleTeacher(model), data, tmp_path / "c", teacher_fingerprint="t", top_k=8,
                             codec="packed", value_bits=12), "value_bits must be an integer in 1..8"),
    ]
    for fn, match in cases:
        with pytest.raises(DistilleryError, match=match) as e:
            fn()
        assert "\n" not in str(e.value), match
