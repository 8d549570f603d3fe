"""Sentences for embedding distillation: the Python standard library's docstrings (on every
machine with Python), or a text / JSONL file, and the fixed held-out split.

``stdlib_sentences()``: every ``.py`` file under ``sysconfig``'s stdlib path (site-packages
excluded) is parsed with ``ast``; the docstrings of modules, classes and functions are split into
paragraphs, doctest lines (``>>>``, ``...``) and markup lines (``.. directive``, ``:field:``,
rules of ``=-~^*#+``` ``) are dropped, each paragraph is joined into one line and split into
sentences after ``.``, ``!`` or ``?`` followed by a capital or a quote; sentences of 5 to 40 words
are kept, first occurrence only, in file order. On CPython 3.11 that gives about 20,700.
"""

from __future__ import annotations

import ast
import random
import re
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

from ..errors import DistilleryError
from ..io import cache_root, cached_arrays

HELD_OUT = 5000
_MARKUP = re.compile(r"^\s*(>>>|\.\.\.|\.\. |:[A-Za-z_]+:|[=\-~^*#+`]{3,}\s*$)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


def docstring_sentences(source: str, min_words: int = 5, max_words: int = 40) -> list[str]:
    """The sentences of every docstring in one module's source (see the module docstring)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        for para in re.split(r"\n\s*\n", doc):
            text = " ".join(line.strip() for line in para.splitlines() if not _MARKUP.match(line))
            for s in _SENTENCE_END.split(text):
                s = s.strip()
                if min_words <= len(s.split()) <= max_words:
                    out.append(s)
    return out


def _dedupe(sentences: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(sentences))


def stdlib_sentences(cache: bool = True) -> list[str]:
    """Docstring sentences of this interpreter's standard library, deduplicated, in a fixed order
    (parsing takes ~20 s on 2 cores; the result is cached under ``cache_root()`` by version)."""
    root = Path(sysconfig.get_paths()["stdlib"])

    def build():
        found = []
        for path in sorted(root.rglob("*.py")):
            if "site-packages" in path.relative_to(root).parts:
                continue
            try:
                found.extend(docstring_sentences(path.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError):
                continue
        import numpy as np

        return {"sentences": np.array(_dedupe(found), dtype=str)}

    if not cache:
        return [str(s) for s in build()["sentences"]]
    tag = re.sub(r"[^0-9A-Za-z]+", "_", sys.version.split()[0] + "_" + str(root))
    arrays = cached_arrays(cache_root() / f"stdlib_sentences_{tag}.npz", build)
    return [str(s) for s in arrays["sentences"]]


def read_sentences(path: str | Path, field: str = "text") -> list[str]:
    """Sentences from a text file (one per line) or a JSONL file (``field`` of each object), blank
    lines dropped, deduplicated in order."""
    path = Path(path)
    if not path.is_file():
        raise DistilleryError(f"corpus file {str(path)!r} does not exist; pass a text file with one sentence per line "
                              "or a .jsonl file with a 'text' field.")
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise DistilleryError(f"corpus file {str(path)!r} is not text (it holds NUL bytes); pass a UTF-8 text or "
                              "JSONL file.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DistilleryError(f"corpus file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}); "
                              "convert it to UTF-8.") from None
    if path.suffix == ".jsonl":
        from ..io import jsonl_texts

        out = [t.strip() for t in jsonl_texts(text.splitlines(), str(path), field)]
    else:
        out = [line.strip() for line in text.splitlines()]
    out = _dedupe(s for s in out if s)
    if not out:
        raise DistilleryError(f"corpus file {str(path)!r} holds no sentences; give at least one non-empty line.")
    return out


def split(sentences: Sequence[str], held_out: int = HELD_OUT, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held_out): ``random.Random(seed).sample(sentences, held_out)`` is held out (in
    sample order); the rest, in corpus order, is for training."""
    sentences = list(sentences)
    if not sentences:
        raise DistilleryError("the corpus is empty; give at least one sentence.")
    if not 0 < held_out < len(sentences):
        raise DistilleryError(f"cannot hold out {held_out} of {len(sentences)} sentences; hold out fewer "
                              "(at least one must remain for training).")
    test = random.Random(seed).sample(sentences, held_out)
    chosen = set(test)
    return [s for s in sentences if s not in chosen], test
