"""Sparse teacher distributions: the top-k entries of each row plus an optional tail bucket.

``TopK(log_probs, indices, tail, num_classes)`` stands in for dense teacher logits wherever a loss
accepts it (``kd``): the loss gathers the student's log-probabilities at the kept indices and,
with a tail, lumps every other class into one bucket, so no (N, C) teacher tensor is ever built.

Re-tempering (``TopK.retemper``): log-probabilities stored at T_store are turned into those of
T_train as p_i^(T_store / T_train), renormalised over the kept entries and the tail bucket. The
tail is tempered as C - k classes sharing its mass equally (the maximum-entropy reading of a
lumped bucket): tail' = (C - k) (tail / (C - k))^(T_store / T_train). Exact when k = C; with
k < C it approximates the dense softmax(z / T_train), exactly when the other classes are equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DistilleryError


@dataclass
class TopK:
    log_probs: Tensor
    """(N, k) teacher log-probabilities of the kept classes, at ``temperature``; (B, T, k) for
    token sequences (``flat()`` gives the (B*T, k) rows the losses read)."""
    indices: Tensor
    """(N, k) class indices (any integer dtype); the shape of ``log_probs``."""
    tail: Tensor | None
    """(N,) log of the probability mass outside the kept classes, or None when it was dropped
    (the kept entries are then renormalised to sum to 1); ``log_probs.shape[:-1]``."""
    num_classes: int
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.log_probs.dim() < 2 or self.indices.shape != self.log_probs.shape:
            raise DistilleryError(f"TopK: log_probs {tuple(self.log_probs.shape)} and indices "
                                  f"{tuple(self.indices.shape)} must both be (N, k) (or (B, T, k) for tokens).")
        if self.tail is not None and self.tail.shape != self.log_probs.shape[:-1]:
            raise DistilleryError(f"TopK: tail must have shape {tuple(self.log_probs.shape[:-1])}, "
                                  f"got {tuple(self.tail.shape)}.")

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.log_probs.shape[:-1], self.num_classes)

    def flat(self) -> TopK:
        """The same entries as (rows, k): (B, T, k) token sequences become (B*T, k)."""
        if self.log_probs.dim() == 2:
            return self
        k = self.log_probs.shape[-1]
        return TopK(self.log_probs.reshape(-1, k), self.indices.reshape(-1, k),
                    None if self.tail is None else self.tail.reshape(-1), self.num_classes, self.temperature)

    def __len__(self) -> int:
        return self.log_probs.shape[0]

    def __getitem__(self, index) -> TopK:
        return TopK(self.log_probs[index], self.indices[index], None if self.tail is None else self.tail[index],
                    self.num_classes, self.temperature)

    def argmax(self, dim: int = -1) -> Tensor:
        if dim not in (-1, self.log_probs.dim() - 1):
            raise DistilleryError("TopK.argmax works over classes only (dim=-1).")
        return self.indices.long().gather(-1, self.log_probs.argmax(-1, keepdim=True)).squeeze(-1)

    def _rows(self, what: str) -> None:
        if self.log_probs.dim() != 2:
            raise DistilleryError(f"TopK.{what} works on (N, k) rows; call .flat() on a (B, T, k) TopK first.")

    def buckets(self) -> Tensor:
        """(N, k) or (N, k + 1) log-probabilities (float32, or float64 when stored so): the kept entries,
        then the tail bucket."""
        self._rows("buckets")
        lp = _up(self.log_probs)
        if self.tail is None:
            return lp - lp.logsumexp(1, keepdim=True)
        return torch.cat([lp, _up(self.tail).to(lp.dtype).unsqueeze(1)], 1)

    def retemper(self, temperature: float) -> TopK:
        """The same rows at another temperature: p^(T_store / T) renormalised over the buckets."""
        self._rows("retemper")
        if temperature == self.temperature and self.tail is None:
            return self
        r = self.temperature / float(temperature)  # r = 1: only renormalised (float16 values + tail)
        k = self.log_probs.shape[1]
        b = self.buckets() * r
        if self.tail is not None and self.num_classes > k:  # the tail as C - k equal classes, each tempered
            log_rest = math.log(self.num_classes - k)
            b[:, k] = log_rest + r * (_up(self.tail) - log_rest)
        b = b - b.logsumexp(1, keepdim=True)
        return TopK(b[:, :k], self.indices, b[:, k] if self.tail is not None else None, self.num_classes,
                    float(temperature))

    def dense(self) -> Tensor:
        """(N, C) log-probabilities with the tail spread evenly over the other classes (tests, small C)."""
        self._rows("dense")
        n, c = self.shape
        k = self.log_probs.shape[1]
        b = self.buckets()
        if self.tail is None or c == k:
            out = torch.full((n, c), float("-inf"))
        else:
            out = (b[:, k] - torch.log(torch.tensor(float(c - k)))).unsqueeze(1).expand(n, c).clone()
        return out.scatter(1, self.indices.long(), b[:, :k])


def _up(x: Tensor) -> Tensor:
    """At least float32: half precision is upcast, float64 is kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def student_buckets(student_logits: Tensor, t: TopK, temperature: float) -> Tensor:
    """The student's log-probabilities in the teacher's buckets: at the kept indices (of its softmax
    over all C classes, not renormalised: mass outside the kept classes is penalised), and with a
    tail log(1 - sum of them) for the rest, computed stably as a logsumexp over the other classes."""
    log_s = F.log_softmax(_up(student_logits) / temperature, dim=-1)  # float64 logits stay float64
    idx = t.indices.long()
    kept = log_s.gather(1, idx)
    if t.tail is None:
        return kept
    rest = log_s.scatter(1, idx, float("-inf")).logsumexp(1, keepdim=True)
    return torch.cat([kept, rest], 1)
