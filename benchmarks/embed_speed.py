"""Throughput of our static student beside model2vec's own ``StaticModel`` (its inference needs no
transformers) and the teacher, in one process: strings in, batch 64, 2 threads, the three
alternated in each of 5 rounds, median; the 1,024 first held-out sentences of the stdlib corpus.
model2vec's model comes from ``benchmarks/embed_peers.py --save-model2vec DIR`` (PCA 256, its defaults).

    python benchmarks/embed_speed.py --model2vec DIR
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from distillery.embed import distil_static, load_teacher, split, stdlib_sentences, throughput

from _common import RESULTS, command, machine, update_markdown, write


class Model2Vec:
    def __init__(self, path: Path):
        from model2vec import StaticModel

        self.model = StaticModel.from_pretrained(str(path))

    def encode(self, sentences, batch_size=64):
        return self.model.encode(list(sentences), batch_size=batch_size, show_progress_bar=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model2vec", type=Path, required=True)
    ap.add_argument("--sentences", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    _, test = split(stdlib_sentences())
    teacher = load_teacher()
    models = {"teacher": teacher, "static": distil_static(teacher, pca_dims=256), "model2vec": Model2Vec(args.model2vec)}
    speed = throughput(models, test[: args.sentences], batch_size=64, repeats=args.repeats)
    rows = [{"method": k, "throughput": v, "speedup": v / speed["teacher"]} for k, v in speed.items()]
    ratio = speed["static"] / speed["model2vec"]
    write(RESULTS / "embed_speed.json", {"benchmark": "embed_speed", "command": command(), "machine": machine(),
                                         "sentences": args.sentences, "repeats": args.repeats, "rows": rows,
                                         "static_over_model2vec": ratio})
    lines = ["## Static student beside model2vec, one process (`embed_speed`)", "",
             f"`{command()}`: strings in, batch 64, 2 threads, alternated, median of {args.repeats}.", "",
             "| model | sentences/s | speedup over teacher |", "|---|---|---|"]
    lines += [f"| {r['method']} | {r['throughput']:.0f} | {r['speedup']:.1f}x |" for r in rows]
    lines += ["", f"Our static student runs at {ratio:.2f}x model2vec's throughput."]
    update_markdown("embed_speed", "\n".join(lines))
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
