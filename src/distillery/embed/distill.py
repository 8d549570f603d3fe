"""Distil a sentence encoder: a layer-reduced transformer or a static (model2vec) table.

Training goes through the one engine and the objective's terms: the student's unit vector is
its ``logits`` tap, the teacher's answers (its unit vectors) are computed once for the training
sentences and looked up by sample id (``PrecomputedTeacher``), so no teacher forward runs per
step. Default terms:

- same width as the teacher: ``hint`` (metric cosine: 1 - cos(s_i, t_i)) + ``cosine_gram`` (the
  batch's pairwise cosines);
- narrower students (a projection head, a PCA-reduced static table): ``cosine_gram`` on the
  student's own vector + ``hint`` (cosine) from the pooled vector through a learned linear adapter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import TrainConfig
from ..data.core import TensorData, epoch_order
from ..errors import DistilleryError
from ..objective import Objective, Term
from ..teachers import ModuleTeacher, PrecomputedTeacher
from .models import Embedder, StaticEncoder, masked_mean


def default_terms(student: Embedder, teacher: Embedder) -> list[Term]:
    if student.dim == teacher.dim:
        return [Term("hint", 1.0, "cosine", params={"metric": "cosine"}), Term("cosine_gram", 1.0)]
    return [Term("cosine_gram", 1.0),
            Term("hint", 1.0, "cosine", student="pool", params={"metric": "cosine"}, adapter="linear")]


@dataclass
class LengthBatches(TensorData):
    """Token-id data whose epoch order puts sentences of similar length in the same batch (less
    padding, several times faster on short text): a seeded permutation, sorted by length within
    windows of 50 batches, cut into batches, the batches shuffled (the short one kept last). A
    function of (seed, epoch) only, so resume stays exact."""

    batch_size: int = 64
    pad_id: int = 0

    def order(self, seed: int, epoch: int) -> Tensor:
        perm = epoch_order(len(self), seed, epoch)
        lengths = (self.x != self.pad_id).sum(1)
        window = self.batch_size * 50
        perm = torch.cat([c[torch.argsort(lengths[c], stable=True)] for c in perm.split(window)])
        blocks = list(perm.split(self.batch_size))
        full = len(blocks) if len(blocks[-1]) == self.batch_size else len(blocks) - 1
        g = torch.Generator().manual_seed(seed * 100_003 + epoch + 1)
        pick = [*torch.randperm(full, generator=g).tolist(), *range(full, len(blocks))]
        return torch.cat([blocks[i] for i in pick])


def _corpus(sentences: Sequence[str]) -> list[str]:
    sentences = [s for s in sentences if isinstance(s, str) and s.strip()]
    if not sentences:
        raise DistilleryError("the training corpus is empty; give at least one non-empty sentence.")
    return sentences


def teacher_answers(teacher: Embedder, sentences: Sequence[str]) -> PrecomputedTeacher:
    """The teacher's unit vectors for ``sentences`` (sample id = position), computed once on
    length-sorted batches; pass them to several ``train_student`` calls on the same sentences."""
    sentences = _corpus(sentences)
    ids = torch.arange(len(sentences))
    t_ids = teacher.ids(sentences)
    order = torch.argsort((t_ids != teacher.model.pad_id).sum(1), stable=True)
    return PrecomputedTeacher(ModuleTeacher(teacher.model), TensorData(t_ids[order], None, ids[order], 0),
                              batch_size=64)


def train_student(
    student: Embedder,
    teacher: Embedder,
    sentences: Sequence[str],
    *,
    answers: PrecomputedTeacher | None = None,
    terms: Sequence[Term] | None = None,
    train: TrainConfig | None = None,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool | None = False,
    eval_sentences: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train ``student`` (in place) to embed ``sentences`` as ``teacher`` does. The student and the
    teacher each tokenize the sentences their own way (static students without special tokens);
    samples are keyed by their position in ``sentences`` (``answers`` from ``teacher_answers``
    on the same list, or computed here). With ``eval_sentences`` (held out) every epoch logs the
    embedding agreement with the teacher (``embed.evaluate.agreement``: cosine, Spearman, recall@10).
    Returns the engine's result."""
    from ..engine import fit

    sentences = _corpus(sentences)
    if train is None:  # layer students: sentence-transformers' lr 1e-4 and warm-up; static tables move faster
        static = isinstance(student.model, StaticEncoder)
        train = (TrainConfig(epochs=10, batch_size=256, lr=1e-2) if static
                 else TrainConfig(epochs=3, batch_size=64, lr=1e-4, warmup_epochs=0.1))
    cfg = train
    data = LengthBatches(student.ids(sentences), None, torch.arange(len(sentences)), 0, "corpus", cfg.batch_size,
                         student.model.pad_id)
    if answers is None:
        answers = teacher_answers(teacher, sentences)
    elif len(answers.sorted_ids) != len(sentences):
        raise DistilleryError(f"the teacher answers hold {len(answers.sorted_ids)} sentences, the corpus {len(sentences)}; "
                              "compute them with teacher_answers on the same sentences.")
    objective = Objective(list(terms) if terms is not None else default_terms(student, teacher))
    try:
        return fit(student.model, objective, data, cfg, teacher=answers, run_dir=run_dir, phase="embed",
                   seed=seed, progress=progress,
                   evaluator=None if eval_sentences is None else embedding_agreement(student, teacher, eval_sentences))
    finally:
        student.model.eval()


def embedding_agreement(student: Embedder, teacher: Embedder, sentences: Sequence[str]):
    """The engine's evaluator for embedding students: agreement with the teacher on held-out ``sentences``
    (the teacher's embeddings computed once)."""
    from .evaluate import agreement

    sentences = _corpus(sentences)
    if len(sentences) <= 10:
        raise DistilleryError(f"embedding agreement needs more than 10 held-out sentences, got {len(sentences)}.")
    target = teacher.encode(sentences)

    def evaluator(model: torch.nn.Module) -> dict[str, Any]:
        was = model.training
        try:
            got = student.encode(sentences)
        finally:
            model.train(was)
        return {k: v for k, v in agreement(got, target, pairs=2000, queries=min(100, len(sentences) - 1)).items()
                if isinstance(v, float) or v is None}

    return evaluator


# --------------------------------------------------------------------------- static (model2vec)


@torch.no_grad()
def token_vectors(teacher: Embedder, token_ids: Sequence[int], batch_size: int = 256) -> Tensor:
    """The teacher's output for each token alone: ``[CLS] token [SEP]`` through the backbone, the
    mean of the last hidden states over those positions (model2vec ``create_embeddings``, mean
    pooling; before any projection or normalisation). (K, H) float32."""
    model = teacher.model
    if teacher.kind != "transformer":
        raise DistilleryError("a static student is distilled from a transformer teacher, not a static model.")
    cls_id, sep_id = teacher.tokenizer.token_to_id("[CLS]"), teacher.tokenizer.token_to_id("[SEP]")
    probe = teacher.tokenizer.encode("a", add_special_tokens=True).ids
    prefix = [probe[0]] if cls_id is not None and probe and probe[0] == cls_id else []
    suffix = [probe[-1]] if sep_id is not None and probe and probe[-1] == sep_id else []
    was = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(token_ids), batch_size):
            part = torch.tensor([[*prefix, t, *suffix] for t in token_ids[start : start + batch_size]])
            mask = torch.ones_like(part, dtype=torch.bool)
            h = model.backbone(input_ids=part, attention_mask=mask.long()).last_hidden_state
            out.append(masked_mean(h, mask).float())
    finally:
        model.train(was)
    return torch.cat(out)


def zipf_sif_weights(n: int, sif: float | None = 1e-4) -> np.ndarray:
    """model2vec's token weights: the token of rank r (0-based, vocabulary order) has Zipf
    probability p_r = (1 / (r + 2)) / sum_j 1 / (j + 2), weight sif / (sif + p_r) (SIF, Arora et
    al. 2017); ``sif=None`` gives ones."""
    if sif is None:
        return np.ones(n)
    if not 0 < sif < 1:
        raise DistilleryError(f"the SIF coefficient must be in (0, 1), got {sif}; 1e-4 is model2vec's default.")
    inv = 1.0 / np.arange(2, n + 2)
    return sif / (sif + inv / inv.sum())


def pca(x: np.ndarray, dims: int) -> np.ndarray:
    """Principal components of the rows of ``x`` (centred, not whitened; full SVD, as scikit-learn's
    ``PCA(svd_solver="full").fit_transform``, whose sign convention we follow)."""
    from sklearn.decomposition import PCA

    return PCA(n_components=dims, svd_solver="full").fit_transform(x)


def distil_static(
    teacher: Embedder,
    pca_dims: int | None = 256,
    sif: float | None = 1e-4,
    remove: str | None = r"\[unused\d+\]",
    batch_size: int = 256,
) -> Embedder:
    """model2vec's distillation (Minish Lab, ``model2vec.distill.distill_from_model``): every token of
    the teacher's vocabulary (special tokens and those matching ``remove`` left out) is embedded
    alone by the teacher, the vectors are reduced by PCA to ``pca_dims`` and each is multiplied by
    its Zipf/SIF weight. A sentence is then the normalised mean of its tokens' vectors.
    The table keeps the tokenizer's ids; left-out tokens get zero rows (they never occur in
    text without special tokens). The weights are folded into the table, as model2vec does."""
    hidden = teacher.model.backbone.config.hidden_size
    if pca_dims is not None and not 0 < int(pca_dims) <= hidden:
        raise DistilleryError(f"PCA dimension {pca_dims} is above the teacher's {hidden} dims (or below 1); "
                              f"choose 1 to {hidden}, or None for no reduction.")
    vocab = teacher.tokenizer.get_vocab(with_added_tokens=True)
    specials = {t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab}
    specials |= {tok.content for tok in teacher.tokenizer.get_added_tokens_decoder().values() if tok.special}
    pattern = re.compile(remove) if remove else None
    keep = sorted(i for tok, i in vocab.items() if tok not in specials and not (pattern and pattern.fullmatch(tok)))
    if not keep:
        raise DistilleryError(f"no token is left in the vocabulary after removing {remove!r}; loosen the pattern.")
    vectors = token_vectors(teacher, keep, batch_size).double().numpy()
    if pca_dims is not None:
        if pca_dims >= len(keep):
            raise DistilleryError(f"PCA dimension {pca_dims} needs more than {len(keep)} vocabulary tokens.")
        vectors = pca(vectors, int(pca_dims))
    vectors = vectors * zipf_sif_weights(len(keep), sif)[:, None]
    table = torch.zeros(teacher.tokenizer.get_vocab_size(with_added_tokens=True), vectors.shape[1])
    table[torch.tensor(keep)] = torch.from_numpy(vectors).float()
    pad = teacher.model.pad_id
    return Embedder(StaticEncoder(table, pad), teacher.tokenizer, teacher.max_length)
