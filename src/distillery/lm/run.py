"""The ``lm`` kind's run: data and tokenizer, the model, the method, the saved folder, the rows.

``run(recipe, rd)`` trains into the run directory (``rundir``): the engine's checkpoints and metrics
(an interrupted run resumes), ``models/model`` (``save_lm``: loads with transformers'
``AutoModelForCausalLM`` too), and rows with the validation and test perplexity of the student and
of the teacher when there is one (on data with answers, the test accuracy of greedy answers too).
Generated sequence-level KD text, the teacher's answers to chat prompts and top-k stores are kept
in ``work/`` and reused when their settings match.

Chat data (``data: reasoning`` or a file of ``messages`` / ``prompt`` + ``completion`` examples) go
through ``lm.chat`` (assistant-only targets, packed rows with positions); ``seq_kd`` on them asks the
teacher (a folder or a chat-completions endpoint) for answers and keeps the verified ones
(``lm.traces``); a teacher with another tokenizer teaches through ``uld`` / ``gold`` terms
(``lm.cross``); ``lora:`` trains PEFT adapters and exports them beside the merged model (``lm.lora``).
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
from ..io import cached_arrays
from ..rundir import writer
from . import chat, corpus, reasoning, traces
from . import distill as D
from .config import LMRecipe
from .models import (
    PRESETS,
    CausalLM,
    check_folder,
    check_same_tokenizer,
    end_ids,
    llama,
    load_lm,
    load_tokenizer,
    pad_id,
    same_tokenizer,
    save_lm,
)


def load_data(recipe: LMRecipe, tokenizer=None) -> tuple[dict[str, corpus.TokenData], Any]:
    """The train / validation / test blocks and the tokenizer (``tokenizer`` given: use it)."""
    if recipe.data == "stdlib":
        splits, tok = corpus.builtin(recipe.block, recipe.vocab_size, tokenizer=tokenizer)
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
            splits[name] = corpus.TokenData.from_blocks(rows, len(tok), f"{recipe.data}/{name}", first_id=first)
            first += len(rows)
    if recipe.max_train_blocks is not None:
        splits["train"] = splits["train"].subset(torch.arange(min(recipe.max_train_blocks, len(splits["train"]))))
    return splits, tok


def is_chat(recipe: LMRecipe) -> bool:
    return recipe.data == "reasoning" or (recipe.data != "stdlib" and chat.is_chat_file(recipe.data))


def load_chat(recipe: LMRecipe, tokenizer=None) -> tuple[dict[str, corpus.TokenData], Any, dict[str, list[dict]]]:
    """Chat data: (train / validation / test rows, the tokenizer, the examples of each split). ``reasoning``
    is the built-in task; a file is split 90 / 5 / 5 % (shuffled with the seed) unless an HF ``DatasetDict``
    has validation and test splits. Without a tokenizer, a ChatML one is trained on the training examples."""
    if recipe.data == "reasoning":
        r = recipe.reasoning
        examples = reasoning.splits(r.train, r.validation, r.test, r.seed, r.steps, r.largest)
    else:
        named = _named_splits(recipe.data)
        if named is not None:
            examples = named
        else:
            rows = chat.read_examples(recipe.data)
            if len(rows) < 3:
                raise DistilleryError(f"{recipe.data} holds {len(rows)} examples; train / validation / test need at "
                                      "least 3.")
            order = list(range(len(rows)))
            random.Random(recipe.seed).shuffle(order)
            n_hold = max(1, len(rows) // 20)
            parts = {"validation": order[:n_hold], "test": order[n_hold:2 * n_hold], "train": order[2 * n_hold:]}
            examples = {k: [rows[i] for i in sorted(v)] for k, v in parts.items()}
    tok = tokenizer or chat.train_tokenizer(examples["train"], recipe.vocab_size)
    splits, first = {}, 0
    for name in ("train", "validation", "test"):
        splits[name] = chat.token_data(tok, examples[name], recipe.block, pack=recipe.pack and name == "train",
                                       name=f"{recipe.data}/{name}", first_id=first, where=f"{recipe.data} {name}")
        first += len(splits[name])
    splits["train"] = _limited(recipe, splits["train"])
    return splits, tok, examples


def _limited(recipe: LMRecipe, data: corpus.TokenData) -> corpus.TokenData:
    """The first ``max_train_blocks`` rows of ``data`` (all without the setting)."""
    if recipe.max_train_blocks is None or len(data) <= recipe.max_train_blocks:
        return data
    out = data.subset(torch.arange(recipe.max_train_blocks))
    out.settings = getattr(data, "settings", {})
    return out


def _named_splits(path: str) -> dict[str, list[dict]] | None:
    """The examples of an HF DatasetDict folder that has train, validation and test splits (else None)."""
    folder = Path(path)
    if not (folder / "dataset_dict.json").is_file():
        return None
    names = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
    if not {"train", "validation", "test"} <= set(names):
        return None
    return {n: chat.read_examples(folder, split=n) for n in ("train", "validation", "test")}


def choose_tokenizer(recipe: LMRecipe, teacher_tok=None):
    """The tokenizer of the run (or None: trained on the data): ``tokenizer:``, else the model folder's,
    else the teacher's."""
    if recipe.tokenizer is not None:
        return load_tokenizer(recipe.tokenizer)
    if recipe.model not in PRESETS and (Path(check_folder(recipe.model)) / "tokenizer.json").is_file():
        return load_tokenizer(recipe.model)
    return teacher_tok


def build_model(recipe: LMRecipe, tok) -> CausalLM:
    """The preset, the model folder, or a fresh model of a folder's ``config.json`` alone (any architecture
    transformers knows, seeded; its vocabulary must hold the tokenizer's)."""
    if recipe.model in PRESETS:
        return llama(recipe.model, vocab_size=len(tok), seed=recipe.seed, max_length=max(512, recipe.block + 1))
    folder = check_folder(recipe.model)
    if not any(f.suffix in (".safetensors", ".bin", ".pt", ".pth") for f in folder.iterdir()):
        from .models import from_config

        return from_config(folder, len(tok), seed=recipe.seed)
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


def _store(teacher: CausalLM, data: corpus.TokenData, folder: Path, top_k: int | None, codec: str | None = None,
           value_bits: int = 4):
    """A ``CachedTeacher`` over the teacher's store of ``data`` in ``folder`` (top-k, or dense float16
    with ``top_k`` None), written first when missing or incomplete. A lock file lets runs in other
    processes share one store: the second waits for the first to finish writing."""
    from ..store import CachedTeacher, model_fingerprint, write_store_shared
    from ..teachers import ModuleTeacher

    write_store_shared(ModuleTeacher(teacher, inputs=data.inputs), data, folder, teacher_fingerprint=model_fingerprint(teacher.hf),
                       top_k=top_k, dtype=None if top_k is not None else "float16", shard_size=256,
                       **({"codec": codec, "value_bits": value_bits} if codec is not None else {}))
    return CachedTeacher(folder)


def validate(recipe: LMRecipe) -> None:
    """What can be checked before the run directory is made: the folders and data file the recipe names."""
    for key in ("teacher", "reference", "model"):
        folder = getattr(recipe, key)
        if folder is not None and not (key == "model" and folder in PRESETS) and \
                not (Path(folder) / "config.json").is_file():
            raise DistilleryError(f"{key} {folder!r} is not a model folder (no config.json); name a folder written by "
                                  "`distillery run` of an lm recipe (its models/model; the shipped lm/kd reads "
                                  "lm/teacher's: `distillery run lm/teacher --out runs/lm/teacher`) or by "
                                  "transformers' save_pretrained.")
    if recipe.data not in ("stdlib", "reasoning") and not Path(recipe.data).exists():
        raise DistilleryError(f"data {recipe.data!r} does not exist; pass a .txt / .jsonl file or an HF datasets "
                              "folder, or data: stdlib or reasoning (built in).")
    if recipe.tokenizer is not None and not (Path(recipe.tokenizer) / "tokenizer.json").is_file() and \
            not (Path(recipe.tokenizer).is_file() and Path(recipe.tokenizer).suffix == ".json"):
        raise DistilleryError(f"tokenizer {recipe.tokenizer!r} is neither a folder with tokenizer.json nor a tokenizer.json "
                              "file; name a model or tokenizer folder (tokenizer.save_pretrained writes one).")


def _traces_data(recipe: LMRecipe, teacher: CausalLM | None, tok, examples: list[dict], work: Path, first_id: int
                 ) -> corpus.TokenData:
    """Sequence-level KD on chat data: the teacher's answers to the training prompts (local or remote),
    filtered by the verifier and length, cached in ``work`` as JSONL under a name holding what they
    depend on (the settings, the teacher's weights or endpoint and model, the examples)."""
    from ..io import atomic_write_text
    from ..store import model_fingerprint

    s = recipe.seq_kd
    source = {"remote": {"base_url": s.remote.base_url, "model": s.remote.model}} if s.remote is not None else \
        {"teacher": model_fingerprint(teacher.hf)[:16],  # and the template its prompts are rendered with
         "template": hashlib.sha256(str(getattr(tok, "chat_template", "")).encode()).hexdigest()[:16]}
    if recipe.verifier == "exact" and any("answer" not in e for e in examples):
        raise DistilleryError("verifier exact compares final answers with each example's 'answer', which these examples "
                              "lack; use verifier: none (keep every answer) or a plugin's verifier.")
    settings = {"new_tokens": s.new_tokens, "samples": s.samples, "temperature": s.temperature, "top_p": s.top_p,
                "seed": recipe.seed, "verifier": recipe.verifier, "examples": traces.examples_fingerprint(examples),
                "top_logprobs": s.top_logprobs if s.remote is not None else 0, **source}
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    file = work / f"traces-{tag}.jsonl"
    if file.is_file():
        answers = [json.loads(line)["answers"] for line in file.read_text(encoding="utf-8").splitlines() if line]
    else:
        if s.remote is not None:
            from .remote import RemoteTeacher

            r = s.remote
            client = RemoteTeacher(r.base_url, r.model, api_key_env=r.api_key_env, timeout=r.timeout,
                                   max_retries=r.max_retries, log=work / f"requests-{tag}.jsonl")
            answers = traces.respond_remote(client, examples, s.new_tokens, samples=s.samples,
                                            temperature=s.temperature, top_p=s.top_p, seed=recipe.seed,
                                            concurrency=r.concurrency, top_logprobs=s.top_logprobs)
        else:
            answers = traces.respond(teacher, tok, examples, s.new_tokens, samples=s.samples,
                                     temperature=s.temperature, top_p=s.top_p, seed=recipe.seed)
        if writer():
            atomic_write_text(file, "".join(json.dumps({"answers": a}) + "\n" for a in answers))
    kept, counts = traces.keep(examples, answers, traces.verifier(recipe.verifier), tok, recipe.block + 1)
    if not kept:
        raise DistilleryError(f"the verifier ({recipe.verifier}) kept none of the teacher's {counts['answers']} answers "
                              f"({traces.describe(counts)}); check the teacher, or use verifier: none.")
    data = _limited(recipe, traces.answer_data(tok, kept, recipe.block, pack=recipe.pack, name="traces",
                                               first_id=first_id))
    data.settings = {**settings, **counts}
    return data


def run(recipe: LMRecipe, rd, *, progress: bool | None = None) -> list[dict[str, Any]]:
    """Train the recipe's model into the run directory ``rd`` (see the module docstring); the rows."""
    out, work = rd.path, rd.path / "work"
    teacher, ttok = (None, None) if recipe.teacher is None else load_lm(recipe.teacher, verify=recipe.verify)
    tok = choose_tokenizer(recipe, ttok)
    terms = recipe.objective()
    cross_tok = teacher is not None and tok is not ttok and not same_tokenizer(ttok, tok)
    if cross_tok:  # a teacher with another vocabulary teaches through cross-tokenizer losses only
        taught = [t for t in terms if t.teacher is not None]
        if recipe.method != "kd" or not taught or any(t.loss not in D.cross_losses() for t in taught):
            check_same_tokenizer(ttok, tok)  # the one-line refusal, naming the cross-tokenizer losses
        if not is_chat(recipe):
            raise DistilleryError("distillation across tokenizers lines up answers of chat data; give data: reasoning "
                                  "or a chat file (messages or prompt / completion).")
    elif teacher is not None and tok is not ttok:
        check_same_tokenizer(ttok, tok)
    examples = None
    if is_chat(recipe):
        splits, tok, examples = load_chat(recipe, tok)
        if cross_tok:
            from .cross import paired_data

            splits["train"] = _limited(recipe, paired_data(tok, ttok, examples["train"], recipe.block,
                                                           teacher.max_length - 1, name=f"{recipe.data}/train",
                                                           where=f"{recipe.data} train"))
    elif recipe.seq_kd.remote is not None:
        raise DistilleryError("seq_kd.remote asks a chat-completions endpoint, which needs chat data (messages or "
                              "prompt / completion examples, or data: reasoning); for plain text use a local teacher.")
    else:
        splits, tok = load_data(recipe, tok)
    model = build_model(recipe, tok)
    pruned: list[dict] = []
    if recipe.prune is not None:  # Minitron: prune on calibration blocks, then recover (KD from the teacher)
        from ..compress.lm_prune import prune

        unpruned = model.num_parameters()
        model = prune(model, recipe.prune, splits["train"].x[: recipe.prune.calibration])
        pruned = [{"model": "unpruned", "phase": "prune", "params": unpruned},  # the prune stage, before recovery
                  {"model": "pruned", "phase": "prune", "params": model.num_parameters(),
                   **{f"{k}_perplexity": D.perplexity(model, splits[k]) for k in ("validation", "test")}}]
    if recipe.lora is not None:
        from .lora import add_lora

        model = add_lora(model, recipe.lora)
    if examples is not None and recipe.pack:
        chat.check_packing(model, splits["train"])
    reads_teacher = any(t.teacher is not None for t in terms)
    t0 = time.perf_counter()
    fit = {"run_dir": out, "seed": recipe.seed, "progress": progress, "eval_data": splits["validation"],
           "chunk_size": recipe.chunk_size, "terms": terms, "resume": rd.resume,
           "phase": "distill" if teacher is not None or recipe.seq_kd.remote is not None else "train"}
    train = splits["train"]
    notes: dict[str, Any] = {}
    if teacher is None and recipe.method != "seq_kd":
        D.distil(model, None, train, recipe.train, **fit)
    elif cross_tok:
        from .cross import CrossTokenizerTeacher

        D.distil(model, CrossTokenizerTeacher(teacher), train, recipe.train, **fit)
    elif recipe.method == "kd":
        source = teacher if recipe.store is None else _store(teacher, train, Path(recipe.store), None)
        D.distil(model, source, train, recipe.train, **fit)
    elif recipe.method == "seq_kd" and examples is not None:
        train = _traces_data(recipe, teacher, tok, examples["train"], work, 0)
        notes = {k: train.settings[k] for k in ("answers", "kept", "wrong", "too_long", "empty")}
        source = teacher if teacher is not None else traces.AnswerTopK(len(tok))  # remote: its top-k, in the batch
        D.distil(model, source if reads_teacher else None, train, recipe.train, **fit)
    elif recipe.method == "seq_kd":
        train = _seq_kd_data(recipe, teacher, train, work)
        D.distil(model, teacher if reads_teacher else None, train, recipe.train, **fit)
    elif recipe.method == "on_policy":
        op = recipe.on_policy
        chat_rows = examples is not None
        task = D.OnPolicy(model, lam=op.lam, prompt=None if chat_rows else op.prompt, temperature=op.temperature,
                          seed=recipe.seed, eos_id=end_ids(tok) if chat_rows else None, pad_id=pad_id(tok))
        task.check(train)
        D.distil(model, teacher, train, recipe.train, **fit, task=task)
    elif recipe.method == "adaspec":
        from .adaspec import AdaSPEC, BatchTeacher

        ref, rtok = load_lm(recipe.reference, verify=recipe.verify)
        check_same_tokenizer(rtok, tok)
        D.distil(model, BatchTeacher(), train, recipe.train, **fit, task=AdaSPEC(model, ref, teacher, recipe.keep))
    else:  # topk
        tag = f"-{recipe.codec}{recipe.value_bits}" if recipe.codec else ""
        folder = Path(recipe.store) if recipe.store is not None else work / f"store-top{recipe.top_k}{tag}"
        D.distil(model, _store(teacher, train, folder, recipe.top_k, recipe.codec, recipe.value_bits), train,
                 recipe.train, **fit)
    seconds = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    notes["train_tokens"] = int((train.y != -100).sum()) * recipe.train.epochs  # trained targets (on-policy: the data's)
    if writer():
        extra = {"recipe": dataclasses.asdict(recipe)}
        if recipe.lora is not None:
            from .lora import save_lora

            model = save_lora(model, tok, rd.models, extra, merge=recipe.lora.merge, base=recipe.prune is not None)
        else:
            save_lm(model, tok, rd.models / "model", extra=extra)
    graded = examples is not None and all("answer" in e for e in examples["test"])
    check = traces.verifier("exact" if recipe.verifier == "none" else recipe.verifier) if graded else None

    def scores(m: CausalLM, mtok, data: dict[str, corpus.TokenData]) -> dict[str, Any]:
        row = {"validation_perplexity": D.perplexity(m, data["validation"]),
               "test_perplexity": D.perplexity(m, data["test"])}
        if graded:
            row["accuracy"] = traces.accuracy(m, mtok, examples["test"], check=check,
                                              max_new_tokens=min(recipe.seq_kd.new_tokens, m.max_length // 2))
        return row

    rows = []
    if teacher is not None:  # perplexities over the teacher's own tokens (per token: not comparable across tokenizers)
        tdata = load_chat(recipe, ttok)[0] if cross_tok else splits
        rows.append({"model": "teacher", "phase": "teacher", "params": teacher.num_parameters(),
                     **scores(teacher, ttok, tdata)})
    rows += pruned
    method = "alone" if teacher is None and recipe.seq_kd.remote is None else recipe.method
    rows.append({"model": recipe.model if recipe.model in PRESETS else "model", "phase": fit["phase"],
                 "method": method, "terms": ", ".join(t.name for t in terms), "params": model.num_parameters(),
                 **({"trainable_params": trainable} if recipe.lora is not None else {}),
                 **scores(model, tok, splits), "train_seconds": seconds, **notes})
    if writer():
        _plot(rows, rd.figure("perplexity.png", "Validation and test perplexity (lower is better)"))
    return rows


def _plot(rows: list[dict], path: Path) -> None:

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..report.plots import save_png

    rows = [r for r in rows if "validation_perplexity" in r]
    fig, ax = plt.subplots(figsize=(5, 3))
    names = [r["model"] for r in rows]
    for k, split in enumerate(("validation", "test")):
        vals = [r[f"{split}_perplexity"] for r in rows]
        ax.bar([i + 0.4 * k for i in range(len(rows))], vals, width=0.4, label=split)
    ax.set_xticks([i + 0.2 for i in range(len(rows))], names)
    ax.set_ylabel("perplexity")
    ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=90)
    plt.close(fig)
