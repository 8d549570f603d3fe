"""Token-level KD against TRL's GKD trainer: the same teacher, student, batches and loss
(generalized JSD, beta 0.5, temperature 1, over every next-token target) run for a fixed number
of steps by distillery and by ``trl.experimental.gkd.GKDTrainer`` (lmbda 0: no on-policy
generation, seq_kd off), each side in its own process, alternated (distillery, TRL, distillery,
TRL, ...). Step time and peak memory of each and their ratio (distillery / TRL).

Both sides run in the peers environment (same torch and transformers; TRL is a benchmark-only
dependency, ``benchmarks/requirements-peers.txt``), with distillery installed there without deps:

    /work/peers/venv/bin/pip install -r benchmarks/requirements-peers.txt
    /work/peers/venv/bin/pip install --no-deps -e .
    /work/peers/venv/bin/python benchmarks/lm_peers.py   ->  benchmarks/results/lm_peers.json

Set-up (``--folder``, default ``runs/bench-lm-peers``): a random-init Llama teacher (hidden 256,
8 layers, 8 heads, 4 KV heads, MLP 768: 10.5M parameters) and student (hidden 128, 4 layers,
4 heads, 2 KV heads, MLP 384: 2.9M), untied heads, vocabulary 8,192 (the built-in corpus's
tokenizer), saved once as transformers folders that both sides load; the first blocks of the
built-in corpus's train split (129 tokens each), in order, 8 per step. Time and memory do not
depend on the weights, so the models are not trained first.

- distillery: the ``Objective`` and ``engine.fit`` call that ``distillery.lm.distill.distil`` makes
  (loss ``generalized_jsd``, ``chunk_size`` 512 tokens, AdamW, constant rate, no clipping) with an
  ``on_step`` callback; the data set orders itself sequentially. Inputs are a block's first 128
  tokens, targets its last 128. A step is the time between two ``on_step`` calls: batch indexing,
  teacher forward (no grad), student forward, loss, backward, AdamW step.
- TRL: ``GKDTrainer`` (lmbda 0, beta 0.5, temperature 1, seq_kd off) with ``optim="adamw_torch"``
  (the same ``torch.optim.AdamW``; TRL's default is the fused one), constant rate, no clipping
  (``max_grad_norm=0``; the Trainer still computes the gradient norm every step), fp32 and no
  gradient checkpointing (``SFTConfig`` defaults to bf16 and checkpointing: both off here),
  sequential sampling, no logging, evaluation or saving, 0 workers. The data are the same 129-token
  blocks as ``input_ids`` (all-ones ``attention_mask``, ``labels`` = the ids with the first masked)
  through a pre-tokenized collator (GKDTrainer takes any ``data_collator``; its default,
  ``DataCollatorForChatML``, tokenizes chat ``messages`` and masks the prompt): TRL shifts
  (logits ``[:, :-1]`` against labels ``[:, 1:]``), so its loss covers exactly distillery's 8 x 128
  targets with the same normalisation (sum over tokens / 1,024). A step is ``on_step_begin`` to
  ``on_step_end``: teacher forward (no grad), student forward, loss, backward, gradient norm, AdamW
  step, ``zero_grad`` (the data loader and collation are before ``on_step_begin``; the interval from
  one ``on_step_end`` to the next, which includes them, is recorded too).
  Differences left: TRL's models see the 129-token block (one position more in each forward, whose
  logits its shift discards) and are called with an attention mask; its teacher builds a KV cache
  (``use_cache`` is not turned off in ``compute_loss``).

Each process runs ``--warmup`` steps, ``--steps`` timed steps, then one profiled step for the
peak. Time: median over every timed step of every round. Peak: the torch profiler's peak of live
tensors during that profiled step, with ``_common.peak_live_mb``'s accounting (allocations and frees
in time order, summed) over a window opened and closed from the callbacks (distillery: ``on_step``
to ``on_step``, the old gradients freed just before, as the engine's ``zero_grad`` would do next;
TRL: ``on_step_begin`` to ``on_step_end``, its gradients already freed by ``zero_grad``); weights,
optimizer state and the batch exist before the window and are not counted (the gradients, made
in the window, are); the maximum over rounds is reported. After training both sides
evaluate the loss of their student on the first batch with distillery's ``token_loss``
(``check_loss``): equal to float rounding when both trained on the same targets in the same order.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import numpy as np
import torch

from _common import RESULTS, command, machine, update_markdown, write

ROOT = Path(__file__).resolve().parents[1]
TEACHER = {"hidden_size": 256, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
           "intermediate_size": 768}
STUDENT = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 384}
SEEDS = {"teacher": 0, "student": 1, "training": 0}
SIDES = ("distillery", "trl")


class LivePeak:
    """``_common.peak_live_mb`` over a window that callbacks open (``start``) and close (``stop``):
    the torch profiler's memory events in time order, summed; the peak in MiB. Tensors alive at
    ``start`` are not counted, nor are their frees (the profiler records neither)."""

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.prof.start()

    def stop(self) -> float:
        self.prof.stop()
        events = [e for e in self.prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        live = peak = 0
        for e in events:
            live += e.nbytes()
            peak = max(peak, live)
        self.peak_mb = peak / 2**20
        return self.peak_mb


# --------------------------------------------------------------------------- set-up (once)


def prepare(folder: Path, n_blocks: int, block: int) -> dict:
    """Teacher and student folders and the first ``n_blocks`` blocks of the built-in corpus."""
    from distillery.lm.corpus import builtin
    from distillery.lm.models import llama, save_lm

    splits, tok = builtin(block=block, vocab_size=8192)
    train = splits["train"]
    if len(train) < n_blocks:
        raise SystemExit(f"the corpus has {len(train)} blocks, fewer than the {n_blocks} the run needs")
    if bool((train.y[:n_blocks] == -100).any()):
        raise SystemExit("the corpus blocks have masked targets; expected every target to count")
    rows = torch.cat([train.x[:n_blocks, :1], train.y[:n_blocks]], dim=1).numpy()  # (N, block + 1)
    vocab = len(tok)
    sizes = {}
    for name, cfg in (("teacher", TEACHER), ("student", STUDENT)):
        model = llama(cfg, vocab_size=vocab, seed=SEEDS[name], max_length=2 * block)
        save_lm(model, tok, folder / name)
        sizes[name] = model.num_parameters()
    np.save(folder / "blocks.npy", rows)
    return {"vocab": vocab, "parameters": sizes}


def check_loss(student, teacher, rows: np.ndarray, batch: int) -> float:
    """distillery's generalized JSD (beta 0.5) of ``student`` against ``teacher`` on the first batch."""
    from distillery.losses.tokens import token_loss

    x = torch.as_tensor(rows[:batch, :-1], dtype=torch.long)
    with torch.no_grad():
        s, t = student(x), teacher(x)
    return float(token_loss("generalized_jsd", s, t, mask=torch.ones(x.shape, dtype=torch.bool), beta=0.5))


# --------------------------------------------------------------------------- the two sides


def run_distillery(args, rows: np.ndarray) -> dict:
    from transformers.utils import logging

    from distillery import engine
    from distillery.config import TrainConfig
    from distillery.lm.corpus import TokenData
    from distillery.lm.models import load_lm
    from distillery.objective import Objective, Term
    from distillery.teachers import ModuleTeacher

    logging.disable_progress_bar()

    class InOrder(TokenData):
        def order(self, seed: int, epoch: int) -> torch.Tensor:  # the engine's hook: batches in file order
            return torch.arange(len(self))

    teacher, _ = load_lm(args.folder / "teacher")
    student, _ = load_lm(args.folder / "student")
    data = InOrder.from_blocks(rows, student.vocab_size, "bench")
    cfg = TrainConfig(epochs=1, batch_size=args.batch, optimizer="adamw", lr=args.lr, weight_decay=0.0,
                      schedule="constant", log_every=10**9)
    # what distil(student, teacher, data, cfg, loss="generalized_jsd", params=..., chunk_size=...) runs
    objective = Objective([Term("generalized_jsd", params={"beta": 0.5, "temperature": 1.0})],
                          chunk_size=args.chunk)
    last = args.warmup + args.steps
    marks: list[float] = []
    window = LivePeak()

    def on_step(step: int) -> None:
        if step <= last:
            marks.append(time.perf_counter())
        if step == last:  # open the window for the profiled step
            for p in student.parameters():
                p.grad = None  # the engine's zero_grad(set_to_none=True) would free them at once
            window.start()
        elif step == last + 1:
            window.stop()

    engine.fit(student, objective, data, cfg, teacher=ModuleTeacher(teacher), phase="lm", seed=SEEDS["training"],
               progress=False, on_step=on_step)
    student.eval()
    return {"step_ms": [1000 * (b - a) for a, b in zip(marks[args.warmup - 1:], marks[args.warmup:])],
            "peak_mb": window.peak_mb, "check_loss": check_loss(student, teacher, rows, args.batch)}


def run_trl(args, rows: np.ndarray) -> dict:
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distillery.lm.corpus import EOS

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    load = lambda name: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        str(args.folder / name), local_files_only=True, use_safetensors=True, dtype=torch.float32)
    teacher, student = load("teacher"), load("student")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(args.folder / "student" / "tokenizer.json"),
                                  eos_token=EOS, pad_token=EOS)
    dataset = Dataset.from_dict({"input_ids": rows.tolist()})

    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([it["input_ids"] for it in items], dtype=torch.long)
        labels = ids.clone()
        labels[:, 0] = -100  # the first token is no one's target; after TRL's shift: the 128 targets
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    last = args.warmup + args.steps
    begin: list[float] = []
    end: list[float] = []
    window = LivePeak()

    class Clock(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kw):
            if state.global_step == last:  # the profiled step (gradients are already None here)
                window.start()
            begin.append(time.perf_counter())

        def on_step_end(self, targs, state, control, **kw):
            end.append(time.perf_counter())
            if state.global_step == last + 1:
                window.stop()

    with tempfile.TemporaryDirectory() as tmp:
        targs = GKDConfig(
            output_dir=tmp, max_steps=last + 1, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            optim="adamw_torch", max_grad_norm=0.0, lmbda=0.0, beta=0.5, temperature=1.0, seq_kd=False,
            bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, report_to="none",
            logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0, train_sampling_strategy="sequential", seed=SEEDS["training"])
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=targs, train_dataset=dataset,
                             processing_class=tok, data_collator=collate, callbacks=[Clock()])
        trainer.train()
    model = trainer.model.eval()
    logits = lambda m: lambda x: m(input_ids=x).logits  # noqa: E731
    timed = slice(args.warmup, last)
    return {"step_ms": [1000 * (b - a) for a, b in zip(begin[timed], end[timed])],
            "interval_ms": [1000 * (b - a) for a, b in zip(end[args.warmup - 1:last - 1], end[args.warmup:last])],
            "peak_mb": window.peak_mb, "check_loss": check_loss(logits(model), logits(teacher), rows, args.batch),
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                         "torch": torch.__version__}}


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    n = (args.warmup + args.steps + 1) * args.batch
    rows = np.load(args.folder / "blocks.npy")[:n]
    out = (run_distillery if args.worker == "distillery" else run_trl)(args, rows)
    out["threads"] = torch.get_num_threads()
    Path(args.out).write_text(json.dumps(out))


# --------------------------------------------------------------------------- orchestration


def spawn(side: str, args, out: Path) -> dict:
    cmd = [args.python, str(Path(__file__).resolve()), "--worker", side, "--out", str(out),
           "--folder", str(args.folder), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch", str(args.batch), "--chunk", str(args.chunk), "--lr", str(args.lr),
           "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    result = json.loads(out.read_text())
    result["process_s"] = time.perf_counter() - t0
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20, help="timed steps per process")
    ap.add_argument("--rounds", type=int, default=3, help="alternations distillery, TRL")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first in each process")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=128, help="tokens per sequence (targets per row)")
    ap.add_argument("--chunk", type=int, default=512, help="distillery's loss chunk, tokens")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--folder", type=Path, default=ROOT / "runs" / "bench-lm-peers")
    ap.add_argument("--python", default=sys.executable, help="interpreter of both sides (the peers venv)")
    ap.add_argument("--worker", choices=SIDES, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        ap.error("--warmup, --steps and --rounds must be at least 1")
    if args.worker is not None:
        worker(args)
        return
    torch.set_num_threads(args.threads)
    args.folder.mkdir(parents=True, exist_ok=True)
    info = prepare(args.folder, (args.warmup + args.steps + 1) * args.batch, args.block)
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            row = {}
            for side in SIDES:
                print(f"round {r + 1}/{args.rounds}: {side}", file=sys.stderr, flush=True)
                row[side] = spawn(side, args, Path(tmp) / f"{side}-{r}.json")
            rounds.append(row)
    ms = {s: statistics.median(t for row in rounds for t in row[s]["step_ms"]) for s in SIDES}
    peak = {s: max(row[s]["peak_mb"] for row in rounds) for s in SIDES}
    trl_interval = statistics.median(t for row in rounds for t in row["trl"]["interval_ms"])
    versions = rounds[0]["trl"]["versions"]
    m = machine()
    m["worker_python"] = args.python
    sizes = info["parameters"]
    out = {
        "benchmark": "lm_peers", "command": command(), "machine": m, "seeds": SEEDS, "versions": versions,
        "distillery_ms": ms["distillery"], "trl_ms": ms["trl"], "time_ratio": ms["distillery"] / ms["trl"],
        "distillery_peak_mb": peak["distillery"], "trl_peak_mb": peak["trl"],
        "peak_ratio": peak["distillery"] / peak["trl"], "trl_interval_ms": trl_interval,
        "setup": {
            "teacher": {**TEACHER, "parameters": sizes["teacher"]}, "student": {**STUDENT, "parameters": sizes["student"]},
            "vocab": info["vocab"], "batch": args.batch, "seq": args.block, "dtype": "float32",
            "loss": "generalized_jsd, beta 0.5, temperature 1, every next-token target (batch x seq), "
                    "sum over tokens / their count",
            "optimizer": f"torch.optim.AdamW lr {args.lr}, weight decay 0, constant rate, no clipping",
            "distillery_chunk_size": args.chunk, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
            "threads": args.threads, "data": "built-in corpus (stdlib) train split, first blocks, in order",
            "order": "per round: distillery then TRL, each in its own process",
            "distillery_step": "between two engine.fit on_step calls: batch indexing, teacher forward (no grad), "
                               "student forward, chunked loss, backward, AdamW step",
            "trl_step": "GKDTrainer on_step_begin to on_step_end: teacher forward (no grad, 129 tokens), student "
                        "forward (129 tokens), loss, backward, gradient norm, AdamW step, zero_grad; data loading "
                        "is outside (trl_interval_ms, on_step_end to on_step_end, includes it)",
            "time": "median over all timed steps of all rounds, ms",
            "peak": "torch profiler's peak of live tensors (allocations and frees summed in time order, "
                    "_common.peak_live_mb's accounting) during one more step after the timed ones; weights, "
                    "optimizer state and the batch exist before and are not counted; max over rounds, MiB",
        },
        "check_loss": {s: [row[s]["check_loss"] for row in rounds] for s in SIDES},
        "rounds": [{s: {"step_ms": row[s]["step_ms"], "peak_mb": row[s]["peak_mb"],
                        "median_ms": statistics.median(row[s]["step_ms"]), "process_s": row[s]["process_s"],
                        **({"interval_ms": row[s]["interval_ms"]} if s == "trl" else {})} for s in SIDES}
                   for row in rounds],
    }
    write(RESULTS / "lm_peers.json", out)
    mib = lambda n: f"{n / 1e6:.1f}M"  # noqa: E731
    update_markdown("lm_peers", "\n".join([
        "## LM token KD against TRL's GKD trainer (`lm_peers`)", "",
        f"`{command()}` (in the peers venv, both sides): generalized JSD (beta 0.5, temperature 1) from a "
        f"{mib(sizes['teacher'])} Llama teacher into a {mib(sizes['student'])} Llama student, vocabulary "
        f"{info['vocab']:,}, batch {args.batch} x {args.block} tokens, float32, AdamW lr {args.lr}, "
        f"{args.threads} thread(s); TRL {versions['trl']} `GKDTrainer` with lmbda 0 (same data, no generation), "
        f"distillery's `engine.fit` with the loss in chunks of {args.chunk} tokens. Each side in its own process, "
        f"alternated, {args.rounds} round(s) of {args.warmup} warm-up + {args.steps} timed steps; a step is teacher "
        "forward, student forward, loss, backward and optimizer step (TRL's excludes its data loader). Peak = torch "
        "profiler's peak of live tensors during one more step (weights, optimizer state and batch not counted).", "",
        "| | ms / step (median) | peak MiB |", "|---|---|---|",
        f"| distillery | {ms['distillery']:.0f} | {peak['distillery']:.0f} |",
        f"| TRL GKDTrainer | {ms['trl']:.0f} | {peak['trl']:.0f} |",
        f"| ratio | {out['time_ratio']:.3f} | {out['peak_ratio']:.3f} |"]))


if __name__ == "__main__":
    main()
