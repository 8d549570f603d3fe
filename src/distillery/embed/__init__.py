"""Embedding-model distillation: layer-reduced and static (model2vec) students of a sentence
encoder, the stdlib-docstring corpus, agreement metrics and model folders.

Needs the extra ``distillery[embed]`` (transformers, tokenizers, the all-MiniLM-L6-v2 teacher).
"""

from .corpus import read_sentences, split, stdlib_sentences
from .distill import default_terms, distil_static, train_student
from .evaluate import agreement, size_mb, throughput
from .models import Embedder, Encoder, StaticEncoder, cut_layers, default_layers, init_head, load_teacher

__all__ = [
    "Embedder", "Encoder", "StaticEncoder", "agreement", "cut_layers", "default_layers", "default_terms",
    "distil_static", "init_head", "load_teacher", "read_sentences", "size_mb", "split", "stdlib_sentences",
    "throughput", "train_student",
]
