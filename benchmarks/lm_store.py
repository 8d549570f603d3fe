"""Bytes per token against fidelity for stores of an LM teacher's top-k log-probabilities (issue 22, item 7).

The built-in teacher (recipe ``lm/teacher``, about 10M parameters, vocabulary V = 8,192; trained first when
missing) on the stdlib corpus. Every row is one way of storing the teacher's answer per token:

- ``float16-k*``: today's top-k store (``store.write_store(top_k=k)``): k float16 log-probs, k uint16
  indices, a float32 tail: 4 k + 4 bytes.
- ``packed-k*-b*``: ``write_store(top_k=k, codec="packed", value_bits=b)`` (``lm.logit_codec``): Elias-Fano
  indices, b-bit log-probs (step 8 / (2^b - 1) nats below the top entry), a 1-byte tail.
- ``distillkit-*``: DistillKit's format (arcee-ai/DistillKit, ``distillkit/compression``), emulated here:
  the top k log-probs sorted, the first ``exact_k`` rounded to bfloat16, the rest replaced by a least-squares
  fit of the given terms (``t^i``, ``sqrt(t)``, t = 0, 1, ... over the approximated entries) whose float32
  coefficients are stored, residuals not stored (``residual_bins: []``), indices bit-packed at ceil(log2 V)
  bits; bytes from their ``DistributionQuantizationConfig.total_bits()``. The missing mass is read as their
  ``densify(..., missing=SYMMETRIC_UNIFORM, renormalize=True)`` does: 1 - sum of the decoded probabilities,
  at least (V - k) 1e-8, spread evenly over the other classes, then renormalised (their README's training
  example uses ``missing_probability_handling: zero``, which gives the other classes no mass at all, so an
  infinite KL(full || stored) over the vocabulary; the tail bucket is the fair reading). Faithful to their
  code in everything but the byte layout (not needed to count bytes or to decode): the fit follows their
  ``_solve_least_squares`` (float32 SVD, singular values <= 1e-5 dropped), which loses precision on the
  t^4 column; ``distillkit-recommended-f64fit`` fits in float64 instead, the best their format can do.
  Their README: recommended (k 128, exact_k 16 bfloat16, terms [0, 1, 2, 3, 4, sqrt] float32) "~300
  bytes/token" and budget (k 50, exact_k 1, terms [0, 1, sqrt]) "around 114 bytes per token"; by their
  formula those are 312 and 114 bytes at a vocabulary of at most 65,536 (16-bit indices), 344 and 127 at
  Qwen3's 151,936, and 264 and 96 at this teacher's 8,192 (13-bit indices), the figures compared here.

Columns: ``bytes_per_token`` (the encoded answer of one token: for stores, the bytes of its arrays over the
tokens, without ids and file headers; ``store_bytes_per_token`` counts those too), ``kl``: the mean over the
first ``--kl-blocks`` validation blocks' tokens of KL(full teacher || stored distribution), where the stored
distribution is what the ``kd`` loss reads: the kept entries and the tail bucket renormalised, the tail
spread evenly over the V - k other classes,

    KL = sum_j p_j log p_j - sum_{i kept} p_i log q_i - P_rest (log q_tail - log(V - k)),

and ``kd_perplexity``: validation perplexity (whole validation split) of the built-in ``student`` after KD
(recipe ``lm/kd``: forward KL at temperature 1, batch 16, one epoch) from that store on the first
``--train-blocks`` training blocks, same seed, same data order and same initialisation for every row, so
rows differ only by their targets (one seed: lm_kd shows a seed-to-seed std of about 5% of perplexity).
``alone``: the student on cross-entropy without a teacher, for scale. The teacher's top 256 entries per
token are computed once; the stores are written from a replay of them (``Replay``: exact for k <= 256) and
the DistillKit rows are served from memory (``Arrays``); KL rows use the same encode/decode functions as the
stores (checked against the stores written).

    python benchmarks/lm_store.py --teacher benchmarks/runs/lm/teacher/models/model
        -> benchmarks/results/lm_store.json and a BENCHMARKS.md section
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
from lm_kd import train

from distillery import recipes
from distillery.lm import distill as D
from distillery.lm.logit_codec import PackedCodec, decode, encode
from distillery.lm.models import llama, load_lm
from distillery.lm.run import load_data
from distillery.losses.sparse import TopK
from distillery.store import CachedTeacher, TeacherStore, write_store

from _common import RESULTS, command, machine, update_markdown, write

TOP = 256  # entries of the teacher kept per token for every setting below (k <= TOP)

# name -> how it is stored; "kd": whether a student is trained from it
SETTINGS: dict[str, dict] = {
    "float16-k8": {"kind": "float16", "k": 8, "kd": True},
    "float16-k32": {"kind": "float16", "k": 32, "kd": True},
    "float16-k128": {"kind": "float16", "k": 128, "kd": False},
    "distillkit-budget": {"kind": "distillkit", "k": 50, "exact_k": 1, "terms": [0, 1, "sqrt"], "kd": True},
    "distillkit-recommended": {"kind": "distillkit", "k": 128, "exact_k": 16, "terms": [0, 1, 2, 3, 4, "sqrt"],
                               "kd": True},
    "distillkit-recommended-f64fit": {"kind": "distillkit", "k": 128, "exact_k": 16,
                                      "terms": [0, 1, 2, 3, 4, "sqrt"], "f64": True, "kd": True},
    "packed-k32-b4": {"kind": "packed", "k": 32, "bits": 4, "kd": True},
    "packed-k56-b4": {"kind": "packed", "k": 56, "bits": 4, "kd": True},
    "packed-k64-b3": {"kind": "packed", "k": 64, "bits": 3, "kd": False},
    "packed-k128-b4": {"kind": "packed", "k": 128, "bits": 4, "kd": False},
    "packed-k144-b4": {"kind": "packed", "k": 144, "bits": 4, "kd": True},
    "packed-k192-b3": {"kind": "packed", "k": 192, "bits": 3, "kd": True},
}
README = {"distillkit-recommended": "~300 bytes/token (DistillKit README, recommended configuration)",
          "distillkit-budget": "around 114 bytes per token (DistillKit README, budget pick)"}


# --------------------------------------------------------------------------- the teacher's answers


@torch.no_grad()
def teacher_top(model, x: torch.Tensor, batch: int = 8) -> dict[str, torch.Tensor]:
    """Per token of the (N, T) blocks ``x``: the top ``TOP`` log-probs (float64, descending) and indices, the
    log of the mass outside them, and sum_j p_j log p_j over the whole vocabulary (float64)."""
    vals, idx, rest, neg_h = [], [], [], []
    for lo in range(0, len(x), batch):
        lp = model(x[lo:lo + batch]).double().log_softmax(-1)  # (b, T, V)
        v, i = lp.topk(TOP, -1)
        vals.append(v)
        idx.append(i.to(torch.int16))
        rest.append(lp.scatter(-1, i, float("-inf")).logsumexp(-1))
        neg_h.append((lp.exp() * lp).sum(-1))
    return {"vals": torch.cat(vals), "idx": torch.cat(idx), "rest": torch.cat(rest), "neg_h": torch.cat(neg_h)}


class Replay:
    """A teacher that answers the blocks of ``x`` from their top ``TOP`` entries: logits = the stored log-probs
    at those classes, log(rest / (V - TOP)) at the others. Its log_softmax has the teacher's top-k values,
    indices and tail for every k <= TOP (up to float32 rounding). Rows are found by their token ids."""

    def __init__(self, x: torch.Tensor, top: dict[str, torch.Tensor], vocab: int):
        self.row = {bytes(r.numpy().tobytes()): n for n, r in enumerate(x)}
        self.top, self.vocab = top, vocab

    def __call__(self, batch: dict, taps=()) -> dict:
        rows = torch.tensor([self.row[bytes(r.numpy().tobytes())] for r in batch["x"]])
        v, i, rest = self.top["vals"][rows].float(), self.top["idx"][rows].long(), self.top["rest"][rows].float()
        fill = (rest - math.log(self.vocab - TOP)).unsqueeze(-1)
        return {"logits": fill.expand(*v.shape[:-1], self.vocab).clone().scatter(-1, i, v)}


class Arrays:
    """A teacher answering by sample id from in-memory (N, T, k) ``TopK`` arrays (the DistillKit rows)."""

    needs_ids = True

    def __init__(self, ids: torch.Tensor, topk: TopK, name: str):
        self.pos = {int(s): n for n, s in enumerate(ids)}
        self.topk, self.name = topk, name

    def fingerprint(self) -> str:
        return self.name

    def check_taps(self, taps) -> None:
        pass

    def __call__(self, batch: dict, taps=()) -> dict:
        rows = torch.tensor([self.pos[int(s)] for s in batch["id"]])
        return {"logits": self.topk[rows]}


# --------------------------------------------------------------------------- the settings' stored answers


def distillkit(vals: torch.Tensor, s: dict, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DistillKit's decoded log-probs (n, k) of the sorted top k ``vals`` and the log tail mass as their
    symmetric-uniform ``densify`` reads it: first exact_k in bfloat16, the rest the fitted curve
    c . X(t) with float32 coefficients c = pinv(X) y (module docstring)."""
    k, ek = s["k"], s["exact_k"]
    v = vals[:, :k]
    exact = v[:, :ek].float().to(torch.bfloat16).float()
    wd = torch.float64 if s.get("f64") else torch.float32  # their work dtype is the inputs' (float32)
    t = torch.arange(k - ek, dtype=wd)
    X = torch.stack([t**p if isinstance(p, int) else torch.sqrt(t) for p in s["terms"]], -1)  # (k - ek, terms)
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    s_inv = torch.where(S > 1e-5, 1 / S, torch.zeros_like(S))
    coef = (Vh.T @ (s_inv[:, None] * (U.T @ v[:, ek:].to(wd).T))).T.float()  # (n, terms), stored as float32
    fit = (X.float().unsqueeze(0) * coef.unsqueeze(1)).sum(-1)  # their decoder: float32 terms x coefficients
    dec = torch.cat([exact, fit], 1).double()
    missing = 1 - dec.exp().sum(1)
    tail = torch.log((missing / (vocab - k)).clamp(min=1e-8)) + math.log(vocab - k)
    return dec, tail


def distillkit_bytes(s: dict, vocab: int) -> int:
    """DistillKit's ``total_bits() / 8``: exact_k bfloat16 + 32-bit terms (to whole bytes) + k ceil(log2 V)-bit
    indices (to whole bytes)."""
    lp_bits = s["exact_k"] * 16 + len(s["terms"]) * 32
    return -(-lp_bits // 8) + -(-s["k"] * math.ceil(math.log2(vocab)) // 8)


def tail_of(top: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """log of the mass outside the top k: logsumexp of entries k..TOP and the rest."""
    return torch.cat([top["vals"][..., k:], top["rest"].unsqueeze(-1)], -1).logsumexp(-1)


def stored(name: str, top: dict[str, torch.Tensor], vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(kept indices (n, k), their stored log-probs (n, k) float64, stored log tail (n,), bytes per token)
    for the flat (n, TOP) answers ``top`` under setting ``name``."""
    s = SETTINGS[name]
    k = s["k"]
    vals, idx = top["vals"][:, :k], top["idx"][:, :k].long()
    if s["kind"] == "float16":  # what write_store keeps: float16 values, float32 tail
        return idx, vals.half().double(), tail_of(top, k).float().double(), 4 * k + 4
    if s["kind"] == "distillkit":
        lq, tail = distillkit(top["vals"], s, vocab)
        return idx, lq, tail, distillkit_bytes(s, vocab)
    codec = PackedCodec(vocab, k, s["bits"])
    rec = encode(codec, vals.numpy(), idx.numpy(), tail_of(top, k).numpy())
    lp, ix, tl = decode(codec, rec)
    return torch.from_numpy(ix), torch.from_numpy(lp).double(), torch.from_numpy(tl).double(), rec.shape[-1]


def kl_full_stored(top: dict[str, torch.Tensor], idx: torch.Tensor, lq: torch.Tensor, tail: torch.Tensor,
                   vocab: int) -> torch.Tensor:
    """(n,) KL(full || stored) (module docstring): buckets renormalised as ``TopK.retemper`` does, the tail
    spread over the V - k classes not kept; p at the kept indices from the exact top ``TOP``."""
    k = idx.shape[1]
    b = torch.cat([lq, tail.unsqueeze(1)], 1)
    b = b - b.logsumexp(1, keepdim=True)
    # p at the kept indices: the exact value of each kept class (kept classes are the teacher's top k)
    order = top["idx"][:, :k].long().argsort(1)
    exact_idx = top["idx"][:, :k].long().gather(1, order)
    exact = top["vals"][:, :k].gather(1, order)
    mine = idx.argsort(1)
    if not torch.equal(idx.gather(1, mine), exact_idx):
        raise AssertionError("a setting kept other classes than the teacher's top k")
    p = exact.exp()
    q = b[:, :k].gather(1, mine)
    rest = (1 - p.sum(1)).clamp(min=0)
    return top["neg_h"] - (p * q).sum(1) - rest * (b[:, k] - math.log(vocab - k))


def flat(top: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in top.items()}


# --------------------------------------------------------------------------- KD from a store


def kd_run(name: str, source, splits, vocab: int, args, work: Path) -> dict:
    """Validation perplexity of the ``student`` preset after lm/kd's training (or lm/student's for
    ``source`` None) on the train blocks, from ``source``; cached in ``work/<name>/result.json``."""
    out = work / name
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    recipe = recipes.load("lm/kd" if source is not None else "lm/student",
                          [f"seed={args.seed}", f"max_train_blocks={args.train_blocks}"])
    student = llama("student", vocab_size=vocab, seed=args.seed, max_length=max(512, recipe.block + 1))
    t0 = time.perf_counter()
    shutil.rmtree(out / "run", ignore_errors=True)  # a run cut before its result: start it again
    D.distil(student, source, splits["train"], recipe.train, terms=recipe.objective(), chunk_size=recipe.chunk_size,
             run_dir=out / "run", seed=args.seed, progress=False, phase="distill" if source is not None else "train")
    seconds = time.perf_counter() - t0
    res = {"kd_perplexity": D.perplexity(student, splits["validation"]), "train_seconds": seconds}
    done.write_text(json.dumps(res))
    return res


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", type=Path, default=Path("runs/lm/teacher/models/model"),
                    help="teacher folder (trained with recipe lm/teacher into its run directory when missing)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-lm-store"))
    ap.add_argument("--kl-blocks", type=int, default=300, help="validation blocks of 128 tokens the KL is taken on")
    ap.add_argument("--train-blocks", type=int, default=1500, help="training blocks of the KD runs")
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS))
    ap.add_argument("--no-kd", action="store_true", help="bytes and KL only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-save", action="store_true", help="print the rows; write neither the json nor BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    teacher_run = args.teacher.parent.parent
    if not (args.teacher / "config.json").is_file():
        print(f"training the teacher into {teacher_run} (recipe lm/teacher)", flush=True)
    teacher_report = train(recipes.load("lm/teacher"), teacher_run)
    model, tok = load_lm(args.teacher)
    model.eval()
    vocab = model.vocab_size
    splits, _ = load_data(recipes.load("lm/kd", [f"teacher={args.teacher}", f"max_train_blocks={args.train_blocks}"]),
                          tok)
    val_x = splits["validation"].x[: args.kl_blocks]
    t0 = time.perf_counter()
    val = flat(teacher_top(model, val_x))
    print(f"teacher on {len(val_x)} validation blocks: {time.perf_counter() - t0:.0f} s", flush=True)

    rows = []
    for name in args.settings:
        idx, lq, tail, nbytes = stored(name, val, vocab)
        kl = kl_full_stored(val, idx, lq, tail, vocab)
        s = SETTINGS[name]
        rows.append({"setting": name, "kind": s["kind"], "k": s["k"], "bytes_per_token": nbytes,
                     "kl": float(kl.mean()), "kl_median": float(kl.median()),
                     **({"value_bits": s["bits"]} if "bits" in s else {}),
                     **({"emulated": True, "readme_figure": README.get(name.replace("-f64fit", ""))}
                        if s["kind"] == "distillkit" else {})})
        print(f"{name}: {nbytes} bytes/token, KL {rows[-1]['kl']:.4f}", flush=True)
    exact = {}
    for k in sorted({SETTINGS[n]["k"] for n in args.settings}):
        vals, ix = val["vals"][:, :k], val["idx"][:, :k].long()
        exact[k] = float(kl_full_stored(val, ix, vals, tail_of(val, k), vocab).mean())
    for r in rows:
        r["kl_exact_topk"] = exact[r["k"]]  # the same k with exact values: what truncation alone costs

    if not args.no_kd:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
        train_data = splits["train"]
        t0 = time.perf_counter()
        top = teacher_top(model, train_data.x)
        print(f"teacher on {len(train_data)} training blocks: {time.perf_counter() - t0:.0f} s", flush=True)
        replay = Replay(train_data.x, top, vocab)
        alone = kd_run("alone", None, splits, vocab, args, work)
        print(f"alone: perplexity {alone['kd_perplexity']:.1f} ({alone['train_seconds']:.0f} s)", flush=True)
        for r in rows:
            s = SETTINGS[r["setting"]]
            if not s["kd"]:
                continue
            if s["kind"] == "distillkit":
                f = flat(top)
                lq, tail = distillkit(f["vals"], s, vocab)
                n, t = train_data.x.shape
                tk = TopK(lq.float().reshape(n, t, -1), f["idx"][:, : s["k"]].long().reshape(n, t, -1),
                          tail.float().reshape(n, t), vocab)
                source = Arrays(train_data.ids, tk, r["setting"])
            else:
                folder = work / "stores" / r["setting"]
                kw = {"codec": "packed", "value_bits": s["bits"]} if s["kind"] == "packed" else {}
                write_store(replay, train_data, folder, teacher_fingerprint=f"replay-top{TOP}", top_k=s["k"],
                            shard_size=256, **kw)
                store = TeacherStore(folder)
                tokens = train_data.x.numel()
                arrays = sum(a.nbytes for sh in store.arrays for key, a in sh.items() if key != "ids")
                r["store_bytes_per_token"] = sum(p.stat().st_size for p in folder.rglob("*.npy")) / tokens
                if arrays / tokens != r["bytes_per_token"]:
                    raise AssertionError(f"{r['setting']}: the store holds {arrays / tokens} bytes per token")
                check_store(store, train_data.ids, top, r["setting"], vocab)
                source = CachedTeacher(store)
            res = kd_run(r["setting"], source, splits, vocab, args, work)
            r.update(res)
            print(f"{r['setting']}: perplexity {res['kd_perplexity']:.1f} ({res['train_seconds']:.0f} s)", flush=True)
        rows.append({"setting": "alone", "kind": "no teacher (cross-entropy)", **alone})
    if args.no_save:
        print(json.dumps(rows, indent=1))
    else:
        save(args, rows, teacher_report, time.perf_counter() - t_start)


def check_store(store: TeacherStore, data_ids: torch.Tensor, top: dict[str, torch.Tensor], name: str,
                vocab: int) -> None:
    """The store's answers for a few blocks equal ``stored`` on the same tokens (the KL rows' path)."""
    pos = [0, len(data_ids) // 2, len(data_ids) - 1]
    got = store.lookup(data_ids[pos])["logits"].flat()
    sub = flat({k: v[pos] for k, v in top.items()})
    idx, lq, tail, _ = stored(name, sub, vocab)
    o1, o2 = got.indices.argsort(1), idx.argsort(1)
    # the store computed the teacher's log-probs in float32, ``stored`` in float64: a value near a rounding edge
    # may land one float16 ulp (or, packed, one step) apart
    s = SETTINGS[name]
    tol = 2e-3 * lq.abs().clamp(min=1) if s["kind"] == "float16" else 1e-3
    diff = (got.log_probs.double().gather(1, o1) - lq.gather(1, o2)).abs()
    step = PackedCodec(vocab, s["k"], s["bits"]).step if s["kind"] == "packed" else 0.0
    ok = torch.equal(got.indices.gather(1, o1), idx.gather(1, o2)) and \
        (diff > tol).double().mean() < 0.01 and diff.max() <= step + 0.05 and \
        torch.allclose(got.tail.double(), tail, atol=0.01)
    if not ok:
        raise AssertionError(f"{name}: the store's answers differ from the KL rows' round trip")


def save(args, rows: list[dict], teacher_report: dict, wall: float) -> None:
    write(RESULTS / "lm_store.json", {
        "benchmark": "lm_store", "command": command(), "machine": machine(), "seeds": [args.seed],
        "metric": "bytes per token; mean KL(full teacher || stored distribution) in nats; KD validation perplexity",
        "teacher": {"recipe": "lm/teacher", "parameters": teacher_report["params"],
                    "validation_perplexity": teacher_report["validation_perplexity"], "vocabulary": 8192},
        "setup": {"kl_tokens": args.kl_blocks * 128, "train_blocks": args.train_blocks,
                  "student_recipe": "lm/kd (forward KL, temperature 1) with max_train_blocks; alone: lm/student",
                  "distillkit": "arcee-ai/DistillKit distillkit/compression (emulated; see the script's docstring)",
                  "distillkit_readme_bytes": {"recommended": 300, "budget": 114},
                  "distillkit_bytes_by_vocabulary": {
                      str(v): {n: distillkit_bytes(SETTINGS[f"distillkit-{n}"], v) for n in ("recommended", "budget")}
                      for v in (8192, 65536, 151936)}},
        "wall_s": wall, "rows": rows})
    lines = ["## Compact top-k teacher stores (`lm_store`)", "",
             f"`{command()}`: the built-in teacher ({teacher_report['params'] / 1e6:.1f}M parameters, "
             "vocabulary 8,192) stored per token in each format. `kl`: mean KL(full teacher || stored distribution, "
             f"tail spread evenly) over {args.kl_blocks * 128:,} validation tokens; `kl exact` the same k with "
             "exact values (truncation alone). `KD ppl`: validation perplexity of the 1.2M student after "
             f"lm/kd from that store on {args.train_blocks:,} blocks (one seed; same init and order for every "
             "row). `packed` is `write_store(codec=\"packed\")` (distillery.lm.logit_codec); DistillKit rows "
             "are emulated from its code (bytes by its own formula at this vocabulary; its README quotes "
             "~300 and ~114 bytes at 16-bit indices).", "",
             "| setting | bytes/token | kl | kl exact | KD ppl |", "|---|---|---|---|---|"]
    for r in rows:
        if "bytes_per_token" not in r:
            lines.append(f"| {r['setting']} | - | - | - | {r['kd_perplexity']:.1f} |")
            continue
        ppl = f"{r['kd_perplexity']:.1f}" if "kd_perplexity" in r else "-"
        lines.append(f"| {r['setting']} | {r['bytes_per_token']} | {r['kl']:.4f} | {r['kl_exact_topk']:.4f} | {ppl} |")
    update_markdown("lm_store", "\n".join(lines))


if __name__ == "__main__":
    main()
