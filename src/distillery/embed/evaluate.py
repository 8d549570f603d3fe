"""Agreement of a student's embeddings with its teacher's, throughput and size on disk.

Definitions (fixed, so that tables from different runs compare):
- ``cosine``: mean cos(student_i, teacher_i) over the held-out sentences; None when the widths
  differ (a PCA-reduced static model lives in another space).
- ``spearman``: Spearman rank correlation between the teacher's and the student's cosines over
  ``pairs`` random pairs (i, j) = ``numpy.random.default_rng(0).integers(0, N, size=(pairs, 2))``.
- ``recall_at_10``: for ``queries`` queries ``default_rng(1).choice(N, queries, replace=False)``,
  the fraction of the teacher's 10 nearest neighbours (cosine, the query itself excluded) that are
  among the student's 10 nearest, averaged.
- ``throughput``: sentences per second from raw strings (tokenization included) at batch 64,
  the models alternated in one process, median of ``repeats`` rounds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DistilleryError
from .models import Embedder


def agreement(student: Tensor, teacher: Tensor, pairs: int = 20_000, queries: int = 500, k: int = 10) -> dict:
    """Cosine, Spearman over random pairs and recall@k of the teacher's neighbours (see above)."""
    from scipy.stats import spearmanr

    if student.shape[0] != teacher.shape[0]:
        raise DistilleryError(f"student and teacher embed different numbers of sentences: "
                              f"{student.shape[0]} and {teacher.shape[0]}.")
    n = student.shape[0]
    if n <= k:
        raise DistilleryError(f"recall@{k} needs more than {k} sentences, got {n}.")
    s = torch.nn.functional.normalize(student.double(), dim=1)
    t = torch.nn.functional.normalize(teacher.double(), dim=1)
    ij = torch.from_numpy(np.random.default_rng(0).integers(0, n, size=(pairs, 2)))
    cos_s = (s[ij[:, 0]] * s[ij[:, 1]]).sum(1)
    cos_t = (t[ij[:, 0]] * t[ij[:, 1]]).sum(1)
    rho = float(spearmanr(cos_t.numpy(), cos_s.numpy()).statistic)
    q = torch.from_numpy(np.random.default_rng(1).choice(n, size=min(queries, n), replace=False))

    def neighbours(x: Tensor) -> Tensor:
        sim = x[q] @ x.T
        sim[torch.arange(len(q)), q] = -torch.inf  # the query itself is not its own neighbour
        return sim.topk(k, dim=1).indices

    ns, nt = neighbours(s), neighbours(t)
    hits = (ns.unsqueeze(2) == nt.unsqueeze(1)).any(2).double().sum(1) / k
    same = student.shape[1] == teacher.shape[1]
    return {"cosine": float((s * t).sum(1).mean()) if same else None, "spearman": rho,
            f"recall_at_{k}": float(hits.mean())}


def throughput(models: Mapping[str, Embedder], sentences: Sequence[str], batch_size: int = 64,
               repeats: int = 3) -> dict[str, float]:
    """Sentences per second of each model on ``sentences`` (strings in, vectors out), the models
    alternated within each round; the median over ``repeats`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for m in models.values():
        m.encode(list(sentences[:batch_size]), batch_size)  # warm-up
    for _ in range(repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            m.encode(sentences, batch_size)
            times[name].append(time.perf_counter() - t0)
    return {name: len(sentences) / float(np.median(v)) for name, v in times.items()}


def size_mb(path: str | Path) -> float:
    """Size on disk of a model folder (every file in it), in MB (10^6 bytes)."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
