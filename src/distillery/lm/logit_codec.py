"""The ``packed`` codec: a teacher's top-k log-probabilities per token in a few bytes.

Each row (one token of a (B, T, k) ``TopK``, or one sample of an (N, k) one) becomes one record of
``R`` bytes (uint8), the same size for every row, so a store keeps a plain (n, T, R) array. The
record is one bit string, most significant bit first (``numpy.packbits`` order), zero-padded to
whole bytes. With V classes, k kept entries, b value bits and clamp L (nats):

    l = max(0, floor(log2(V / k)))           low bits per index (Elias-Fano)
    H = k + ceil(V / 2^l)                    high-part bits
    s = L / (2^b - 1)                        value step, nats
    R = ceil((8 + H + k l + k b) / 8)        bytes per row

    field      bits    content
    tail       8       c = round(asin(sqrt(t)) / (pi / 2) * 255), t = mass outside the kept entries
    high       H       the kept indices sorted, x_0 < x_1 < ... < x_{k-1}: bit (x_i >> l) + i is 1,
                       the other H - k bits are 0 (Elias-Fano's unary high parts)
    low        k l     x_i & (2^l - 1), l bits each, in the same sorted order
    values     k b     q_i = min(round((max_j lp_j - lp_i) / s), 2^b - 1), in the same sorted order
    padding    0..7    zero bits

Decoding inverts each field: x_i = ((p_i - i) << l) | low_i where p_i is the position of the i-th one
bit of the high part; r_i = q_i s; t = sin^2(theta) with theta = c (pi / 2) / 255, except c = 0 and
c = 255, read at the middle of their half-width bins (theta = step / 4 and pi / 2 - step / 4, so 0 < t
< 1); and the log-probabilities are

    lp_i = -r_i - log(sum_j exp(-r_j)) + log(1 - t),    tail = log(t),

so the kept entries and the tail sum to one exactly. Error bounds: an entry with
max_j lp_j - lp_i <= L decodes within s / 2 of its true log-probability *relative to the top entry*
(the absolute value moves further by the shared renormalisation, which the tail fixes); an entry more
than L below the top is stored at -L (the clamp); asin(sqrt(t)) is kept within (pi / 2) / 510.
Indices are exact. Why these choices: Elias-Fano spends about 2 + log2(V / k) bits per index instead of
ceil(log2 V) (the order of a set costs nothing to store, the values carry it); a log-domain step makes
the KL of the quantisation about s^2 / 24 times the kept mass whatever the probabilities; asin(sqrt(t))
is the variance-stabilising map of a Bernoulli mass, so 8 bits of it cost under 1e-5 nats of KL.

For V = 8192: k = 32, b = 4 -> 57 bytes; k = 64, b = 3 -> 97; k = 128, b = 4 -> 193 (DistillKit's
recommended setting, k = 128 with 16 exact bfloat16 values and 6 float32 polynomial terms, takes 264
bytes at this vocabulary, 312 at 65,536). Pure functions over numpy arrays; ``encode_topk`` /
``decode_topk`` wrap them for ``TopK``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DistilleryError
from ..losses.sparse import TopK

NAME = "packed"
TAIL_BITS = 8
MAX_VALUE_BITS = 8
_ROWS = 16384  # rows encoded or decoded at once: bounds the (rows, bits) bit arrays


@dataclass(frozen=True)
class PackedCodec:
    """The settings of the ``packed`` codec (the format is in the module docstring)."""

    num_classes: int
    """V: the classes (vocabulary) the indices come from."""
    k: int
    """Entries kept per row, 1 <= k <= V."""
    value_bits: int = 4
    """b: bits per log-probability, 1..8."""
    clamp: float = 8.0
    """L: nats below the top entry that the values cover; step s = L / (2^b - 1)."""

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or int(self.num_classes) != self.num_classes or self.num_classes < 2:
            raise DistilleryError(f"packed codec: num_classes must be an integer >= 2, got {self.num_classes!r}.")
        if isinstance(self.k, bool) or int(self.k) != self.k or not 1 <= self.k <= self.num_classes:
            raise DistilleryError(f"packed codec: k must be an integer in 1..{self.num_classes} (the number of "
                                  f"classes), got {self.k!r}; keep at most as many entries as there are classes.")
        if isinstance(self.value_bits, bool) or int(self.value_bits) != self.value_bits or \
                not 1 <= self.value_bits <= MAX_VALUE_BITS:
            raise DistilleryError(f"packed codec: value_bits must be an integer in 1..{MAX_VALUE_BITS}, got "
                                  f"{self.value_bits!r}; use 3 or 4 (more bits: store float16 values instead).")
        if not (isinstance(self.clamp, (int, float)) and math.isfinite(self.clamp) and self.clamp > 0):
            raise DistilleryError(f"packed codec: clamp must be a finite number of nats > 0, got {self.clamp!r} "
                                  "(8.0 covers entries down to e^-8 times the top one).")

    @property
    def low_bits(self) -> int:
        """l = max(0, floor(log2(V / k))), exactly in integers."""
        return max(0, (self.num_classes // self.k).bit_length() - 1)

    @property
    def high_bits(self) -> int:
        """H = k + ceil(V / 2^l)."""
        return self.k + -(-self.num_classes // (1 << self.low_bits))

    @property
    def step(self) -> float:
        """s = L / (2^b - 1) nats."""
        return float(self.clamp) / ((1 << self.value_bits) - 1)

    @property
    def bits(self) -> int:
        """8 + H + k l + k b: the bits of one row before padding."""
        return TAIL_BITS + self.high_bits + self.k * (self.low_bits + self.value_bits)

    @property
    def record_bytes(self) -> int:
        """R = ceil(bits / 8)."""
        return -(-self.bits // 8)

    def describe(self) -> dict:
        """What a store's manifest records (``from_manifest`` reads it back and checks it)."""
        return {"name": NAME, "num_classes": int(self.num_classes), "k": int(self.k),
                "value_bits": int(self.value_bits), "clamp": float(self.clamp), "low_bits": self.low_bits,
                "tail_bits": TAIL_BITS, "record_bytes": self.record_bytes}

    @classmethod
    def from_manifest(cls, d: dict) -> PackedCodec:
        """The codec a manifest names, refused when its derived fields disagree with this format."""
        if not isinstance(d, dict) or d.get("name") != NAME:
            name = d.get("name") if isinstance(d, dict) else d
            raise DistilleryError(f"the store's codec {name!r} is not one this distillery reads ({NAME!r}); "
                                  "write the store again with this version.")
        codec = cls(d.get("num_classes"), d.get("k"), d.get("value_bits"), d.get("clamp"))
        if codec.describe() != d:
            raise DistilleryError(f"the store's codec settings {d} do not match the {NAME} format of this distillery "
                                  f"({codec.describe()}); write the store again with this version.")
        return codec


def _bits_of(x: np.ndarray, nbits: int) -> np.ndarray:
    """(..., m) non-negative integers -> (..., m * nbits) bits, most significant first."""
    if nbits == 0:
        return np.zeros((*x.shape[:-1], 0), np.uint8)
    shifts = np.arange(nbits - 1, -1, -1, dtype=np.int64)
    return ((x[..., None].astype(np.int64) >> shifts) & 1).astype(np.uint8).reshape(*x.shape[:-1], -1)


def _int_of(bits: np.ndarray, nbits: int, m: int = 1) -> np.ndarray:
    """(n, m * nbits) bits, most significant first -> (n, m) int64: the inverse of ``_bits_of``."""
    if nbits == 0:
        return np.zeros((bits.shape[0], m), np.int64)
    weights = 1 << np.arange(nbits - 1, -1, -1, dtype=np.int64)
    return bits.reshape(bits.shape[0], -1, nbits).astype(np.int64) @ weights


def _tail_step() -> float:
    return (math.pi / 2) / ((1 << TAIL_BITS) - 1)


def encode(codec: PackedCodec, log_probs: np.ndarray, indices: np.ndarray, tail: np.ndarray | None = None) -> np.ndarray:
    """(..., k) log-probabilities and class indices (any order; the indices of a row distinct) and the
    (...,) log tail mass -> (..., R) uint8 records (module docstring). ``tail`` None: t = 1 - sum exp(lp),
    clamped to [0, 1] (the mass the kept entries leave)."""
    lp = np.asarray(log_probs, dtype=np.float64)
    ix = np.asarray(indices)
    k = codec.k
    if lp.ndim < 1 or lp.shape[-1] != k or ix.shape != lp.shape:
        raise DistilleryError(f"packed codec: log_probs {lp.shape} and indices {ix.shape} must both be (..., k) "
                              f"with k = {k}, the codec's k.")
    if tail is not None and np.shape(tail) != lp.shape[:-1]:
        raise DistilleryError(f"packed codec: tail must have shape {lp.shape[:-1]}, got {np.shape(tail)}.")
    lead = lp.shape[:-1]
    n = int(np.prod(lead, dtype=np.int64))
    lp, ix = lp.reshape(n, k), ix.reshape(n, k)
    if n and (not np.issubdtype(ix.dtype, np.integer) or ix.min() < 0 or ix.max() >= codec.num_classes):
        raise DistilleryError(f"packed codec: indices must be integers in 0..{codec.num_classes - 1}; "
                              "pass the class indices of the kept entries.")
    if np.isnan(lp).any() or (n and not np.isfinite(lp.max(1)).all()) or (lp > 1e-4).any():
        raise DistilleryError("packed codec: log_probs must be log-probabilities (<= 0, no NaN, a finite top entry "
                              "per row); pass log_softmax outputs, not logits.")
    if tail is None:
        t = np.clip(1.0 - np.exp(lp).sum(1), 0.0, 1.0)
    else:
        t = np.exp(np.asarray(tail, dtype=np.float64).reshape(n))
        if np.isnan(t).any():
            raise DistilleryError("packed codec: tail holds NaN; pass the log of the mass outside the kept entries.")
        t = np.clip(t, 0.0, 1.0)
    out = np.empty((n, codec.record_bytes), np.uint8)
    lb, b, qmax = codec.low_bits, codec.value_bits, (1 << codec.value_bits) - 1
    for lo in range(0, n, _ROWS):
        sl = slice(lo, min(n, lo + _ROWS))
        order = np.argsort(ix[sl], axis=1, kind="stable")
        x = np.take_along_axis(ix[sl], order, 1).astype(np.int64)  # (m, k) ascending
        if k > 1 and (np.diff(x, axis=1) == 0).any():
            raise DistilleryError("packed codec: a row repeats a class index; the kept entries of a row must be "
                                  "distinct classes (top-k indices are).")
        v = np.take_along_axis(lp[sl], order, 1)
        r = v.max(1, keepdims=True) - v  # >= 0, 0 at the top entry; inf for a -inf entry
        q = np.minimum(np.rint(np.minimum(r, 2.0 * codec.clamp) / codec.step), qmax).astype(np.int64)
        c = np.rint(np.arcsin(np.sqrt(t[sl])) / _tail_step()).astype(np.int64)  # (m,) 0..255
        m = len(x)
        high = np.zeros((m, codec.high_bits), np.uint8)
        high[np.arange(m)[:, None], (x >> lb) + np.arange(k)] = 1
        bits = np.concatenate([_bits_of(c[:, None], TAIL_BITS), high, _bits_of(x & ((1 << lb) - 1), lb),
                               _bits_of(q, b)], axis=1)
        out[sl] = np.packbits(bits, axis=1)
    return out.reshape(*lead, codec.record_bytes)


def decode(codec: PackedCodec, records: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(..., R) uint8 records -> (log_probs (..., k) float32, indices (..., k) int64 ascending, tail (...,)
    float32 log mass): lp_i = -r_i - log sum_j exp(-r_j) + log(1 - t), tail = log t (module docstring)."""
    rec = np.asarray(records)
    if rec.dtype != np.uint8 or rec.ndim < 1 or rec.shape[-1] != codec.record_bytes:
        raise DistilleryError(f"packed codec: records must be uint8 (..., {codec.record_bytes}) for these settings, "
                              f"got {rec.dtype} {rec.shape}; read them with the codec they were written with.")
    lead = rec.shape[:-1]
    n = int(np.prod(lead, dtype=np.int64))
    rec = rec.reshape(n, codec.record_bytes)
    k, lb, b, hb = codec.k, codec.low_bits, codec.value_bits, codec.high_bits
    lp = np.empty((n, k), np.float32)
    ix = np.empty((n, k), np.int64)
    tail = np.empty(n, np.float32)
    step_t = _tail_step()
    for lo in range(0, n, _ROWS):
        sl = slice(lo, min(n, lo + _ROWS))
        bits = np.unpackbits(rec[sl], axis=1, count=codec.bits)
        m = len(bits)
        c = _int_of(bits[:, :TAIL_BITS], TAIL_BITS)[:, 0]
        high = bits[:, TAIL_BITS:TAIL_BITS + hb]
        if m and not (high.sum(1, dtype=np.int64) == k).all():
            raise DistilleryError(f"packed codec: a record does not hold {k} indices (damaged, or written with other "
                                  "settings); write the store again.")
        pos = np.nonzero(high)[1].reshape(m, k)  # row-major: each row's one bits in ascending order
        low = _int_of(bits[:, TAIL_BITS + hb:TAIL_BITS + hb + k * lb], lb, k)
        x = ((pos - np.arange(k)) << lb) | low
        if m and x.max() >= codec.num_classes:
            raise DistilleryError(f"packed codec: a record names a class >= {codec.num_classes} (damaged, or written "
                                  "for another vocabulary); write the store again.")
        q = _int_of(bits[:, TAIL_BITS + hb + k * lb:], b, k)
        theta = c * step_t
        theta = np.where(c == 0, step_t / 4, np.where(c == (1 << TAIL_BITS) - 1, math.pi / 2 - step_t / 4, theta))
        t = np.sin(theta) ** 2
        neg_r = -q * codec.step
        lse = np.log(np.exp(neg_r).sum(1, keepdims=True))  # r = 0 at the top: no overflow
        lp[sl] = neg_r - lse + np.log1p(-t)[:, None]
        ix[sl] = x
        tail[sl] = np.log(t)
    return lp.reshape(*lead, k), ix.reshape(*lead, k), tail.reshape(lead)


def encode_topk(codec: PackedCodec, topk: TopK) -> np.ndarray:
    """A (N, k) or (B, T, k) ``TopK`` -> (N, R) or (B, T, R) records; a dropped tail (None) is read as the mass
    the kept entries leave, t = 1 - sum exp(lp)."""
    if topk.num_classes != codec.num_classes:
        raise DistilleryError(f"packed codec: the TopK covers {topk.num_classes} classes, the codec {codec.num_classes}.")
    tail = None if topk.tail is None else topk.tail.detach().cpu().double().numpy()
    return encode(codec, topk.log_probs.detach().cpu().double().numpy(), topk.indices.detach().cpu().numpy(), tail)


def decode_topk(codec: PackedCodec, records: np.ndarray, *, temperature: float = 1.0, tail: bool = True) -> TopK:
    """Records -> the ``TopK`` the ``kd`` loss reads (float32 log-probs, int64 indices; the tail bucket, or
    None with ``tail=False``: the kept entries are then renormalised by ``TopK.buckets``)."""
    lp, ix, tl = decode(codec, records)
    return TopK(torch.from_numpy(lp), torch.from_numpy(ix), torch.from_numpy(tl) if tail else None,
                codec.num_classes, float(temperature))
