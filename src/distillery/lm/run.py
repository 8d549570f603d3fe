"""Run an ``lm`` recipe: data and tokenizer, the model, the method, the saved folder and a report.

``run_recipe(recipe, out)`` writes ``out/model`` (``save_lm``: loads with transformers'
``AutoModelForCausalLM`` too), ``out/report.json`` (validation and test perplexity of the model,
and of the teacher when there is one; parameters; seconds) and ``out/run`` (the engine's
checkpoints and metrics: an interrupted run resumes there). Generated sequence-level KD text and
top-k stores are kept in ``out`` and reused when their settings match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DistilleryError
from ..io import atomic_write_json, cached_arrays, read_json
from . import corpus
from . import distill as D
from .config import LMRecipe
from .models import PRESETS, CausalLM, check_same_tokenizer, llama, load_lm, save_lm


def load_data(recipe: LMRecipe, tokenizer=None) -> tuple[dict[str, corpus.TokenData], Any]:
    """The train / validation / test blocks and the tokenizer (``tokenizer`` given: use it)."""
    if recipe.data == "stdlib":
        splits, tok = corpus.builtin(recipe.block, recipe.vocab_size)
        if tokenizer is not None:
            check_same_tokenizer(tokenizer, tok)
    else:
        docs = corpus.read_texts(recipe.data)
        order = list(range(len(docs)))
        random.Random(recipe.seed).shuffle(order)
        n_hold = max(1, len(docs) // 20)
        parts = {"validation": order[:n_hold], "test": order[n_hold:2 * n_hold], "train": order[2 * n_hold:]}
        if len(docs) < 3:
            raise DistilleryError(f"{recipe.data} holds {len(docs)} documents; train / validation / test need at least 3 "
                                  "(one JSONL line or one file each).")
        tok = tokenizer or corpus.train_tokenizer([docs[i] for i in parts["train"]], recipe.vocab_size)
        splits, first = {}, 0
        for name in ("train", "validation", "test"):
            rows = corpus.blocks(corpus.encode_documents([docs[i] for i in parts[name]], tok), recipe.block)
            splits[name] = corpus.TokenData.from_blocks(rows, tok.get_vocab_size(), f"{recipe.data}/{name}", first_id=first)
            first += len(rows)
    if recipe.max_train_blocks is not None:
        splits["train"] = splits["train"].subset(torch.arange(min(recipe.max_train_blocks, len(splits["train"]))))
    return splits, tok


def build_model(recipe: LMRecipe, tok) -> CausalLM:
    if recipe.model in PRESETS:
        return llama(recipe.model, vocab_size=tok.get_vocab_size(), seed=recipe.seed, max_length=max(512, recipe.block + 1))
    model, mtok = load_lm(recipe.model, verify=recipe.verify)
    check_same_tokenizer(mtok, tok)
    return model


def _seq_kd_data(recipe: LMRecipe, teacher: CausalLM, train: corpus.TokenData, out: Path) -> corpus.TokenData:
    """The teacher's text, cached in ``out`` under a name that holds everything it depends on: the
    sampling settings, the seed, the teacher's weights and the prompts (their token ids)."""
    from ..store import model_fingerprint

    s = recipe.seq_kd
    prompts = D.prompts_of(train, s.prompt)
    settings = {**dataclasses.asdict(s), "seed": recipe.seed, "blocks": len(train),
                "teacher": model_fingerprint(teacher.hf)[:16],
                "prompts": hashlib.sha256(prompts.numpy().tobytes()).hexdigest()[:16]}
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def build() -> dict[str, np.ndarray]:
        data = D.teacher_texts(teacher, prompts, s.new_tokens, samples=s.samples,
                               temperature=s.temperature, top_p=s.top_p, seed=recipe.seed)
        return {"x": data.x.numpy(), "y": data.y.numpy()}

    arrays = cached_arrays(out / f"seq_kd-{tag}.npz", build)
    x, y = torch.from_numpy(arrays["x"]).long(), torch.from_numpy(arrays["y"]).long()
    data = corpus.TokenData(x, y, torch.arange(len(x)), train.num_classes, "seq_kd")
    data.settings = settings
    return data


def _store(teacher: CausalLM, data: corpus.TokenData, folder: Path, top_k: int | None):
    """A ``CachedTeacher`` over the teacher's store of ``data`` in ``folder`` (top-k, or dense float16
    with ``top_k`` None), written first when missing or incomplete. A lock file lets runs in other
    processes share one store: the second waits for the first to finish writing."""
    import fcntl

    from ..store import CachedTeacher, model_fingerprint, write_store
    from ..teachers import ModuleTeacher

    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        write_store(ModuleTeacher(teacher), data, folder, teacher_fingerprint=model_fingerprint(teacher.hf),
                    top_k=top_k, dtype=None if top_k is not None else "float16", shard_size=256)
    return CachedTeacher(folder)


def _same_recipe(recipe: LMRecipe, out: Path) -> None:
    """``out/recipe.json`` records the recipe of the first run; another recipe in the same folder is
    refused (its checkpoints, text and stores belong to the first), naming the keys that differ."""
    want = json.loads(json.dumps(dataclasses.asdict(recipe), default=str))
    path = out / "recipe.json"
    if path.is_file():
        have = read_json(path, "recipe record")
        differ = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k) and k != "threads")
        if differ:
            raise DistilleryError(f"{out} holds a run of another recipe ({', '.join(differ)} differ); "
                                  "use a new --out folder, or delete this one to start over.")
    else:
        atomic_write_json(path, want)


def run_recipe(recipe: LMRecipe, out: str | Path, *, progress: bool | None = None) -> dict[str, Any]:
    """Train the recipe's model into ``out`` (see the module docstring); returns the report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _same_recipe(recipe, out)
    torch.set_num_threads(recipe.threads)
    teacher, ttok = (None, None) if recipe.teacher is None else load_lm(recipe.teacher, verify=recipe.verify)
    splits, tok = load_data(recipe, ttok)
    model = build_model(recipe, tok)
    t0 = time.perf_counter()
    common = {"run_dir": out / "run", "seed": recipe.seed, "progress": progress, "eval_data": splits["validation"]}
    if teacher is None:
        D.train(model, splits["train"], recipe.train, chunk_size=recipe.chunk_size, **common)
    else:
        kd = {"loss": recipe.loss, "params": recipe.params, "ce_weight": recipe.ce_weight, "chunk_size": recipe.chunk_size}
        if recipe.method == "kd":
            source = teacher if recipe.store is None else _store(teacher, splits["train"], Path(recipe.store), None)
            D.distil(model, source, splits["train"], recipe.train, **kd, **common)
        elif recipe.method == "seq_kd":
            D.train(model, _seq_kd_data(recipe, teacher, splits["train"], out), recipe.train,
                    chunk_size=recipe.chunk_size, **common)
        elif recipe.method == "on_policy":
            op = recipe.on_policy
            task = D.OnPolicy(model, lam=op.lam, prompt=op.prompt, temperature=op.temperature, seed=recipe.seed)
            task.check(splits["train"])
            D.distil(model, teacher, splits["train"], recipe.train, **kd, **common, task=task)
        elif recipe.method == "adaspec":
            from .adaspec import AdaSPEC, BatchTeacher

            ref, rtok = load_lm(recipe.reference, verify=recipe.verify)
            check_same_tokenizer(rtok, tok)
            task = AdaSPEC(model, ref, teacher, recipe.keep)
            D.distil(model, BatchTeacher(), splits["train"], recipe.train, **kd, **common, task=task)
        else:  # topk
            folder = Path(recipe.store) if recipe.store is not None else out / f"store-top{recipe.top_k}"
            D.distil(model, _store(teacher, splits["train"], folder, recipe.top_k), splits["train"], recipe.train,
                     **kd, **common)
    seconds = time.perf_counter() - t0
    save_lm(model, tok, out / "model", extra={"recipe": dataclasses.asdict(recipe)})
    report = {"method": "alone" if teacher is None else recipe.method, "loss": recipe.loss, "seed": recipe.seed,
              "parameters": model.num_parameters(), "train_seconds": seconds,
              "validation_perplexity": D.perplexity(model, splits["validation"]),
              "test_perplexity": D.perplexity(model, splits["test"])}
    if teacher is not None:
        report["teacher_validation_perplexity"] = D.perplexity(teacher, splits["validation"])
    atomic_write_json(out / "report.json", report)
    return report
