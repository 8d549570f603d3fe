"""Teachers answer one question: what does the teacher say about this batch?

``teacher(batch, taps=()) -> {"logits": Tensor[N, C], <tap path>: Tensor, ...}``

The student side calls only this protocol, so a frozen module, an ensemble, a cache of stored
outputs keyed by sample id, or a remote service are interchangeable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .errors import DistilleryError
from .runtime import call_model, logits_of, to_device
from .taps import Taps, check_paths


@runtime_checkable
class Teacher(Protocol):
    def __call__(self, batch: dict[str, Tensor], taps: Sequence[str] = ()) -> dict[str, Tensor]: ...


class ModuleTeacher:
    """A frozen ``nn.Module``: eval mode, ``requires_grad_(False)``, run under ``no_grad``.

    Freezing happens here, before any wrapping, and is asserted on every call: a teacher put back
    in train mode or given trainable parameters is an error, not a silent change of targets.
    A teacher is never wrapped in DDP (it has no gradients to synchronise).

    ``device`` places it (its inputs follow it; the engine moves its answers to the student's
    device); ``dtype`` holds its weights in bf16 or fp16 (answers in that dtype, upcast by the losses);
    ``inputs`` names the batch keys passed as keyword arguments (``runtime.call_model``)."""

    def __init__(self, model: nn.Module, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 inputs: Sequence[str] | None = None):
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            raise DistilleryError("the teacher is wrapped in DDP/DataParallel; pass the bare module (a frozen teacher needs no gradient sync).")
        self.model = model.eval().requires_grad_(False)
        self.inputs = list(inputs) if inputs else None
        self.device: torch.device | None = None
        self.dtype = dtype if dtype is not None and dtype != torch.float32 else None
        if self.dtype is not None:
            self.model.to(self.dtype)
        if device is not None:
            self.to(device)
        self._params = list(model.parameters())  # walked once: named_modules() on every call costs

    def check_frozen(self) -> None:
        if self.model.training:
            raise DistilleryError("the teacher module was switched to train mode; teachers must stay in eval mode.")
        if any(p.requires_grad for p in self._params):
            raise DistilleryError("the teacher has parameters with requires_grad=True; teachers must stay frozen.")

    def check_taps(self, taps: Sequence[str]) -> None:
        check_paths(self.model, [t for t in taps if t != "logits"])

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor], taps: Sequence[str] = ()) -> dict[str, Tensor]:
        self.check_frozen()
        if self.device is not None:
            batch = to_device(batch, self.device)
        if self.dtype is not None:  # float inputs in the teacher's precision (token ids stay as they are)
            batch = {k: v.to(self.dtype) if isinstance(v, Tensor) and v.is_floating_point() else v
                     for k, v in batch.items()}
        paths = [t for t in taps if t != "logits"]
        if not paths:
            return {"logits": logits_of(call_model(self.model, batch, self.inputs), "the teacher")}
        with Taps(self.model, paths, detach=True) as t:
            logits = logits_of(call_model(self.model, batch, self.inputs), "the teacher")
            return {"logits": logits, **{p: t[p] for p in paths}}

    def to(self, device: torch.device | str) -> ModuleTeacher:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def fingerprint(self) -> str:
        return module_fingerprint(self.model)


def module_fingerprint(model: nn.Module) -> str:
    """A short hash of a module's class, weights and buffers (``store.model_fingerprint``): another teacher,
    or the same one changed, gives another fingerprint."""
    from .store import model_fingerprint

    return model_fingerprint(model)[:16]


def teacher_fingerprint(teacher) -> str:
    if teacher is None:
        return "none"
    fp = getattr(teacher, "fingerprint", None)
    if callable(fp):
        return str(fp())
    return type(teacher).__name__


@torch.no_grad()
def answer_all(teacher: Teacher, x, taps: Sequence[str] = (), batch_size: int = 1024) -> dict[str, Tensor]:
    """The teacher's answers for every sample of ``x`` (a tensor of inputs, or a data set: its batches go to
    the teacher without their ids, so a precomputed teacher answers live), on the CPU, concatenated."""
    from .runtime import to_device

    if isinstance(x, Tensor):
        batches = ({"x": x[i:i + batch_size]} for i in range(0, len(x), batch_size))
    else:
        from .data.loader import iter_batches

        batches = ({k: v for k, v in b.items() if k != "id"} for b in iter_batches(x, batch_size))
    parts = [to_device(teacher(b, taps), torch.device("cpu")) for b in batches]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class PrecomputedTeacher:
    """A teacher's outputs (logits, and the tapped features named in ``taps``) for every sample of
    a fixed data set, computed once and looked up by sample id (``batch["id"]``), never by batch
    position.

    Right when the inputs do not change between epochs (no augmentation): the answers are those of
    the live teacher, without its forward pass at every step. Batches without ids (evaluation)
    go to the live teacher; an id outside the set, or a tap that was not stored, is an error."""

    def __init__(self, teacher: Teacher, data, taps: Sequence[str] = (), batch_size: int = 1024):
        if getattr(data, "views", 1) > 1:
            raise DistilleryError("the data set has augmented views; precomputed answers would be those of the clean "
                                  "inputs. Write a store with the same views (store.write_store(..., views, augment)).")
        from .data.loader import iter_batches
        from .runtime import to_device

        self.live = teacher
        self.taps = [t for t in dict.fromkeys(taps) if t != "logits"]
        cpu = torch.device("cpu")
        ids, parts = [], []
        for b in iter_batches(data, batch_size):
            ids.append(b["id"].cpu())
            parts.append(to_device(teacher({k: v for k, v in b.items() if k != "id"}, self.taps), cpu))
        answers = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        self.sorted_ids, order = torch.sort(torch.cat(ids))
        self.outputs = {k: v[order] for k, v in answers.items()}

    def fingerprint(self) -> str:
        return teacher_fingerprint(self.live)

    def check_taps(self, taps: Sequence[str]) -> None:
        extra = [t for t in taps if t != "logits" and t not in self.outputs]
        if extra:
            raise DistilleryError(f"the precomputed teacher outputs hold {sorted(self.outputs)}, not {extra}; "
                                  "precompute those taps too, or set distill.precompute_teacher=false.")

    def __call__(self, batch: dict[str, Tensor], taps: Sequence[str] = ()) -> dict[str, Tensor]:
        self.check_taps(taps)
        if "id" not in batch:
            return self.live(batch, taps)
        ids = batch["id"].cpu()
        pos = torch.searchsorted(self.sorted_ids, ids).clamp_(max=len(self.sorted_ids) - 1)
        if not torch.equal(self.sorted_ids[pos], ids):
            missing = ids[self.sorted_ids[pos] != ids][:5].tolist()
            raise DistilleryError(f"sample ids {missing} are not in the precomputed teacher outputs; "
                                  "precompute them for the data set being trained on.")
        return {k: self.outputs[k][pos] for k in ("logits", *taps) if k in self.outputs}


# --------------------------------------------------------------------------- ensembles


def _mean_entropy(logits: Tensor, temperature: float) -> float:
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def temperature_for_entropy(logits: Tensor, target: float, lo: float = 1e-2, hi: float = 1e2, iters: int = 60) -> float:
    """The temperature T at which the mean entropy of softmax(logits / T) equals ``target`` (nats),
    by bisection on log T (entropy rises with T). Clamped to [lo, hi] when the target is out of reach."""
    c = logits.shape[-1]
    if not 0 < target < math.log(c):
        raise DistilleryError(f"target entropy must lie in (0, log C = {math.log(c):.3f}), got {target}.")
    a, b = math.log(lo), math.log(hi)
    for _ in range(iters):
        m = (a + b) / 2
        if _mean_entropy(logits, math.exp(m)) < target:
            a = m
        else:
            b = m
    return math.exp((a + b) / 2)


class EnsembleTeacher:
    """Several teachers (live, precomputed or cached; any architectures) answering as one.

    ``logits`` is log sum_i w_i softmax(z_i / T_i), the log of the mixture (a loss's own temperature
    then softens the mixture, not each member): the mean of the members' probabilities (MEAL V2,
    Shen & Savvides 2020; committee soft labels as CV-DD averages them), ``weights`` w_i (normalised)
    for a weighted mean, and per-member temperatures T_i (1 unless set). ``balance(x)`` sets the T_i
    so that every member's mean prediction entropy on ``x`` equals a common target (the mean of their
    entropies at T = 1 unless given). This is the aim of the entropy-based balance of B-MTARD (the
    extension of MTARD, arXiv 2306.16170), whose code nudges the two temperatures by +-eta (0.001)
    per step toward equal entropies within [1, 10]; we solve for the temperatures once, by bisection
    on a calibration set, so that a sample's target never depends on its batch or step.

    Each member also answers on its own: the tap ``"i:logits"`` (or ``"i:<module path>"``) is member
    i's output, so one objective can hold a term per teacher (MTARD's clean and robust teachers)."""

    def __init__(self, teachers: Sequence[Teacher], *, weights: Sequence[float] | None = None,
                 temperatures: Sequence[float] | None = None):
        if len(teachers) < 1:
            raise DistilleryError("an ensemble needs at least one teacher.")
        self.teachers = list(teachers)
        n = len(self.teachers)
        w = [1.0] * n if weights is None else [float(v) for v in weights]
        if len(w) != n or any(not math.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
            raise DistilleryError(f"ensemble weights must be {n} non-negative numbers with a positive sum, got {weights}.")
        self.weights = [v / sum(w) for v in w]
        self.temperatures = [1.0] * n if temperatures is None else [float(t) for t in temperatures]
        if len(self.temperatures) != n or any(not math.isfinite(t) or t <= 0 for t in self.temperatures):
            raise DistilleryError(f"ensemble temperatures must be {n} numbers > 0, got {temperatures}.")

    def fingerprint(self) -> str:
        return ",".join(teacher_fingerprint(t) for t in self.teachers) + f":{self.weights}:{self.temperatures}"

    @property
    def needs_ids(self) -> bool:
        return any(getattr(t, "needs_ids", False) for t in self.teachers)

    def _route(self, taps: Sequence[str]) -> list[list[str]]:
        own: list[list[str]] = [[] for _ in self.teachers]
        for tap in taps:
            if tap == "logits":
                continue
            i, sep, path = tap.partition(":")
            if not sep or not i.isdigit() or str(int(i)) != i or int(i) >= len(self.teachers):
                raise DistilleryError(f"ensemble tap {tap!r}: name a member as 'i:logits' or 'i:<module path>' with "
                                      f"i in 0..{len(self.teachers) - 1}.")
            if path != "logits":
                own[int(i)].append(path)
        return own

    def check_taps(self, taps: Sequence[str]) -> None:
        for t, paths in zip(self.teachers, self._route(taps)):
            if paths and hasattr(t, "check_taps"):
                t.check_taps(paths)

    @torch.no_grad()
    def balance(self, x: Tensor | dict[str, Tensor], target: float | None = None) -> list[float]:
        """Set each member's temperature so its mean entropy on ``x`` (inputs, or a batch dict with
        ids for cached members) equals ``target``; returns the temperatures."""
        batch = x if isinstance(x, dict) else {"x": x}
        logits = [t(batch)["logits"].float() for t in self.teachers]
        if target is None:
            target = sum(_mean_entropy(z, 1.0) for z in logits) / len(logits)
        self.temperatures = [temperature_for_entropy(z, target) for z in logits]
        return self.temperatures

    def entropies(self, x: Tensor | dict[str, Tensor]) -> list[float]:
        batch = x if isinstance(x, dict) else {"x": x}
        return [_mean_entropy(t(batch)["logits"].float(), tt) for t, tt in zip(self.teachers, self.temperatures)]

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor], taps: Sequence[str] = ()) -> dict[str, Tensor]:
        own = self._route(taps)
        answers = [t(batch, paths) for t, paths in zip(self.teachers, own)]
        for a in answers:
            if not isinstance(a["logits"], Tensor):
                raise DistilleryError("ensemble members must give dense logits; cache them densely (no --top-k).")
        logp = torch.stack([torch.log_softmax(a["logits"].float() / tt, -1) + math.log(max(w, 1e-300))
                            for a, tt, w in zip(answers, self.temperatures, self.weights)])
        out: dict[str, Tensor] = {"logits": torch.logsumexp(logp, 0)}
        for i, (a, paths) in enumerate(zip(answers, own)):
            out[f"{i}:logits"] = a["logits"]
            for p in paths:
                out[f"{i}:{p}"] = a[p]
        return {k: v for k, v in out.items() if k == "logits" or k in taps}
