"""An objective is a list of terms; one call returns every named term and their weighted total.

    total = sum_i weight_i * loss_i(student[tap_i], teacher[tap_i], **params_i)

Terms read ``logits`` or a tapped module output of either model. A loss never sees where its
tensors came from: the objective looks them up and passes plain tensors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import adapters, losses
from .config import TermConfig, check_kwargs
from .errors import DistilleryError, NonFiniteLoss
from .losses import tokens
from .runtime import as_bool_mask

_RESERVED = ("targets", "mask", "reduction", "state", "ids")


@dataclass
class Term:
    """One named loss term. ``fn`` is the loss function (looked up from ``loss`` when it is a name)."""

    loss: str | Callable[..., Tensor]
    weight: float = 1.0
    name: str = ""
    student: str = "logits"
    teacher: str | None = "logits"
    targets: str = "auto"
    params: dict[str, Any] = field(default_factory=dict)
    adapter: str = "auto"
    """Projection of the student tensor before the loss (``distillery.adapters``); feature terms only."""

    def __post_init__(self) -> None:
        self.fn = losses.get(self.loss) if isinstance(self.loss, str) else self.loss
        loss_name = self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__", "loss")
        self.name = self.name or loss_name
        self.caps = losses.capabilities(self.fn)
        """What the loss can do, as declared where it was registered (``losses.Capabilities``)."""
        self.batch_keys = self.caps.batch_keys
        """Batch entries the loss reads, passed by name (``edges`` of graph batches, ...)."""
        check_kwargs(self.fn, self.params, f"term {self.name!r} (loss {loss_name!r})", skip=2,
                     reserved=_RESERVED + self.batch_keys)
        if self.targets not in ("auto", "labels", "teacher"):
            raise DistilleryError(f"term {self.name!r}: targets must be auto, labels or teacher, got {self.targets!r}.")
        self.call = functools.partial(self.fn, **self.params)  # recipe parameters bound once
        self.needs_targets = self.caps.needs_targets
        self.needs_ids = self.caps.needs_ids
        self.state_cls = self.caps.state
        if self.adapter not in adapters.KINDS:
            raise DistilleryError(f"term {self.name!r}: adapter {self.adapter!r} is not known; "
                                  f"use one of {', '.join(adapters.KINDS)}.")
        self.adapter_module: nn.Module | None = None  # built by Objective.build from probed shapes
        self.state_module: nn.Module | None = None

    @property
    def peer(self) -> str | None:
        """For ``teacher: "student:PATH"``: PATH, a tap of the student itself (detached) that plays the
        teacher (mutual learning between the members of one model, deep-to-shallow self-distillation)."""
        if self.teacher is not None and self.teacher.startswith("student:"):
            return self.teacher[len("student:"):]
        return None

    @property
    def is_feature(self) -> bool:
        if self.caps.reads_logits:
            return False  # a logit loss reads logits, also from a tapped member (peers, ensembles)
        teacher_logits = self.teacher is None or self.teacher == "logits" or self.teacher.endswith(":logits")
        return self.student != "logits" or not teacher_logits  # "i:logits": ensemble member i's logits
    @classmethod
    def from_config(cls, cfg: TermConfig) -> Term:
        return cls(cfg.loss, cfg.weight, cfg.name or "", cfg.student, cfg.teacher, cfg.targets, dict(cfg.params),
                   cfg.adapter)


class TermScales(nn.Module):
    """Running magnitude of each normalised term (EMA of its detached value), as buffers so that
    checkpoints keep them: term / scale keeps every feature term near 1, so no single layer's magnitude
    dominates the sum (the imbalance LAPTOP-Diff names). This is distillery's loss-agnostic form; the
    paper's own normalisation, each term over the teacher map's squared norm, is the loss
    ``normalized_mse`` (``losses.features``)."""

    def __init__(self, names: Sequence[str], momentum: float = 0.99):
        super().__init__()
        self.names, self.momentum = list(names), momentum
        self.register_buffer("scale", torch.zeros(len(self.names)))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, i: int, value: Tensor) -> Tensor:
        v = value.detach().abs().float()
        if self.training:
            first = self.scale[i] == 0
            self.scale[i] = torch.where(first, v, self.momentum * self.scale[i] + (1 - self.momentum) * v)
        return value / self.scale[i].clamp(min=1e-12)


class TermBalance(nn.Module):
    """MTARD's normalisation loss balance (Zhao et al., ECCV 2022; code ``mtard_resnet18_cifar10.py``)
    over a group of K terms: with L_k^0 the term's first training value and r_k = (L_k / L_k^0)^beta
    (how little the term has fallen), each step w <- w - lr * (w - r / sum(r)), weights starting at
    1/K, so the term that has decreased least gets more weight. A term's contribution is
    weight * K * w_k (unchanged at the start). lr 0.025 and beta 1 are MTARD's. Buffers only."""

    def __init__(self, names: Sequence[str], lr: float = 0.025, beta: float = 1.0):
        super().__init__()
        if len(names) < 2:
            raise DistilleryError(f"a balanced group needs at least two terms, got {list(names)}.")
        if not 0 < lr <= 1 or beta <= 0:
            raise DistilleryError(f"balance needs 0 < lr <= 1 and beta > 0, got lr={lr}, beta={beta}.")
        self.names, self.lr, self.beta = list(names), float(lr), float(beta)
        self.register_buffer("initial", torch.zeros(len(self.names), dtype=torch.float64))
        self.register_buffer("w", torch.full((len(self.names),), 1.0 / len(self.names), dtype=torch.float64))
        self.pending: Tensor | None = None
        self.count = 0

    def add(self, values: list[Tensor]) -> None:
        """One micro-batch's term values; ``step`` applies their mean once per optimiser step."""
        v = torch.stack([x.detach().double() for x in values])
        self.pending = v if self.pending is None else self.pending + v
        self.count += 1

    def step(self) -> None:
        if self.pending is None:
            return
        v = self.pending / self.count
        self.pending, self.count = None, 0
        from . import distributed

        if distributed.world()[1] > 1:
            import torch.distributed as dist

            dist.all_reduce(v)
            v /= distributed.world()[1]
        self.update(list(v))

    @torch.no_grad()
    def update(self, values: list[Tensor]) -> None:
        v = torch.stack([torch.as_tensor(x).detach().double() for x in values])
        first = self.initial == 0
        self.initial[first] = v[first].clamp(min=1e-12)
        r = (v / self.initial).clamp(min=0).pow(self.beta)
        self.w.sub_(self.lr * (self.w - r / r.sum().clamp(min=1e-12)))

    def factor(self, i: int) -> Tensor:
        return self.w[i].float() * len(self.names)


class Objective:
    """Terms -> ``{"total": Tensor, "terms": {name: Tensor}}`` for one batch.

    ``normalize=True`` divides every feature term by its running magnitude before weighting
    (``TermScales``); the raw values are logged as ``<term>`` and the scaled ones as ``<term>/scaled``.
    Adapters and the learned state of losses (``fn.state``) are built by ``build`` from one probed
    batch and returned by ``modules()`` for the engine to train and checkpoint with the student."""

    def __init__(self, terms: Sequence[Term | TermConfig], *, normalize: bool = False,
                 balance: Sequence[str] = (), balance_lr: float = 0.025, balance_beta: float = 1.0,
                 chunk_size: int | None = None):
        self.terms = [t if isinstance(t, Term) else Term.from_config(t) for t in terms]
        self.normalize = normalize
        self.chunk_size = chunk_size
        """Token batches: logit terms run through ``losses.tokens.token_loss`` in chunks of this many tokens."""
        self.scales: TermScales | None = None
        self.built = False
        if not self.terms:
            raise DistilleryError("an objective needs at least one term.")
        seen: dict[str, int] = {}
        for t in self.terms:  # two kd terms become kd and kd_2
            seen[t.name] = seen.get(t.name, 0) + 1
            if seen[t.name] > 1:
                t.name = f"{t.name}_{seen[t.name]}"
        if normalize:
            self.scales = TermScales([t.name for t in self.terms if t.is_feature])
        self.balance: TermBalance | None = None
        if balance:
            names = [t.name for t in self.terms]
            missing = [b for b in balance if b not in names]
            if missing:
                from .errors import unknown

                raise unknown("term to balance", missing[0], names)
            self.balance = TermBalance(list(balance), balance_lr, balance_beta)
        self.built = not any(t.is_feature or t.state_cls is not None for t in self.terms)

    def build(self, student: dict[str, Tensor], teacher: dict[str, Tensor] | None, *, seed: int = 0) -> None:
        """Size adapters and loss states from one probed batch (outputs of both models, by tap).
        Initialisation is seeded and leaves the global RNG as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7919)
            for t in self.terms:
                s = student[t.student]
                tv = student[t.peer] if t.peer is not None else (
                    None if t.teacher is None or teacher is None else teacher[t.teacher])
                where = f"term {t.name!r}"
                if t.is_feature and tv is not None:
                    t.adapter_module = adapters.build(t.adapter, tuple(s.shape[1:]), tuple(tv.shape[1:]), where=where,
                                                      different_widths_ok=t.caps.different_widths)
                    if isinstance(t.adapter_module, nn.Identity):
                        t.adapter_module = None
                    else:
                        with torch.no_grad():
                            s = t.adapter_module(s)
                if t.state_cls is not None:
                    t.state_module = t.state_cls(tuple(s.shape[1:]), None if tv is None else tuple(tv.shape[1:]), **t.params)
        self.built = True

    def modules(self) -> dict[str, nn.Module]:
        """Trainable parts owned by terms, by checkpoint name (left out of the exported student)."""
        out: dict[str, nn.Module] = {}
        for t in self.terms:
            if t.adapter_module is not None:
                out[f"adapter.{t.name}"] = t.adapter_module
            if t.state_module is not None:
                out[f"state.{t.name}"] = t.state_module
        if self.scales is not None and self.scales.names:
            out["term_scales"] = self.scales
        if self.balance is not None:
            out["term_balance"] = self.balance
        return out

    def check(self, num_classes: int) -> None:
        """Each logit term's parameters, checked by one call on a tiny random batch (what a recipe can get
        wrong before training: a negative temperature, a teacher of null for a loss that reads one).
        Feature terms, learned states and id-keyed losses are checked when the engine probes the models."""
        g = torch.Generator().manual_seed(0)
        c = max(int(num_classes), 2)
        s, tv, y = torch.randn(2, c, generator=g), torch.randn(2, c, generator=g), torch.tensor([0, 1])
        for t in self.terms:
            if t.is_feature or t.state_cls is not None or t.needs_ids or t.batch_keys or t.peer is not None:
                continue
            kw: dict[str, Any] = {"targets": y} if t.needs_targets else {}
            try:
                t.call(s, None if t.teacher is None else tv, **kw)
            except DistilleryError as e:
                raise DistilleryError(f"term {t.name!r}: {e}") from None
            except (TypeError, AttributeError, ValueError, RuntimeError):
                if t.teacher is None:
                    raise DistilleryError(f"term {t.name!r}: loss {t.loss!r} reads the teacher, but the term says "
                                          "teacher: null; remove that key (teacher: logits).") from None
                raise

    def describe(self) -> dict[str, Any]:
        """The objective as plain data (terms with their parameters), for a run's signature."""
        def plain(v: Any) -> Any:
            return v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else repr(v)

        terms = [{"name": t.name, "loss": t.loss if isinstance(t.loss, str) else getattr(t.loss, "__name__", "loss"),
                  "weight": t.weight, "student": t.student, "teacher": t.teacher, "targets": t.targets,
                  "adapter": t.adapter, "params": {k: plain(v) for k, v in t.params.items()}} for t in self.terms]
        return {"terms": terms, "normalize": self.normalize, "chunk_size": self.chunk_size,
                "balance": None if self.balance is None else self.balance.names}

    @property
    def needs_teacher(self) -> bool:
        return any(t.teacher is not None and t.peer is None for t in self.terms)

    @property
    def student_taps(self) -> list[str]:
        paths = [p for t in self.terms for p in (t.student, t.peer) if p is not None and p != "logits"]
        return list(dict.fromkeys(paths))

    @property
    def teacher_taps(self) -> list[str]:
        return list(dict.fromkeys(t.teacher for t in self.terms if t.teacher not in (None, "logits") and t.peer is None))

    @property
    def needs_labels(self) -> bool:
        return any(t.needs_targets and (t.targets == "labels" or (t.teacher is None and t.targets == "auto"))
                   for t in self.terms)

    def end_step(self) -> None:
        """Called by the engine after every optimiser step, on every rank: MTARD's balance updates
        once per step; loss states with an ``end_step`` (CRD's banks under torch.distributed) run it."""
        if self.balance is not None:
            self.balance.step()
        for t in self.terms:
            if t.state_module is not None and hasattr(t.state_module, "end_step"):
                t.state_module.end_step()

    def label_masked(self, labelled: bool, has_teacher: bool = False, tokens: bool = False) -> list[bool]:
        """Per term: does it average over the labelled rows only (labels of -100 masked)? As _targets:
        "auto" fills unlabelled rows with the teacher's class when a teacher answers. On token data
        (``tokens``) every term averages over the valid tokens (``batch["mask"]``): logit terms through
        ``losses.tokens.token_loss``, hidden-state terms over the (n, H) rows of the valid positions."""
        if tokens:  # logit terms and hidden-state terms alike average over the valid tokens
            return [True for _ in self.terms]
        return [t.needs_targets and labelled and t.caps.masks_unlabelled and (
                t.targets == "labels" or (t.targets == "auto" and not has_teacher)) for t in self.terms]

    def valid_counts(self, batch: dict[str, Tensor], masked: list[bool]) -> list[int]:
        """How many rows of ``batch`` each term averages over: the labelled rows for the terms ``masked``
        marks (``label_masked``), every row otherwise. The engine sums these over ranks and
        accumulation steps to normalise each term by its global count."""
        n = len(batch["id"]) if "id" in batch else len(batch["x"])
        if "mask" in batch:  # token batches: the valid tokens of the logit terms
            valid = int(as_bool_mask(batch["mask"], "the batch's 'mask'").sum())
            return [valid if m else n for m in masked]
        labelled = int((batch["y"] != -100).sum()) if any(masked) else n
        return [labelled if m else n for m in masked]

    def __call__(self, student: dict[str, Tensor], teacher: dict[str, Tensor] | None,
                 batch: dict[str, Tensor], factors: list[float] | None = None) -> dict[str, Any]:
        """``factors`` (one per term) scale each term inside the total only: the engine's share of this
        batch's valid rows in the whole step's. ``batch_total`` is the unscaled weighted sum (logged)."""
        terms: dict[str, Tensor] = {}
        total: Tensor | None = None
        plain = torch.zeros(())
        if "mask" in batch and isinstance(batch["mask"], Tensor) and batch["mask"].dtype != torch.bool:
            batch = {**batch, "mask": as_bool_mask(batch["mask"], "the batch's 'mask'")}  # never row indices
        bal = self.balance
        balanced: dict[str, Tensor] = {}
        for i, t in enumerate(self.terms):
            s = student[t.student]
            if t.teacher is None:
                tv = None
            elif t.peer is not None:
                tv = student[t.peer].detach()  # a peer teaches through its output, never its gradient
            else:
                if teacher is None:
                    raise DistilleryError(f"term {t.name!r} reads the teacher, but no teacher was given.")
                tv = teacher[t.teacher]
                if not isinstance(tv, Tensor) and not t.caps.accepts_sparse:
                    raise DistilleryError(
                        f"term {t.name!r}: the teacher's {t.teacher!r} is sparse ({type(tv).__name__}, a top-k store), "
                        f"which loss {getattr(t.fn, '__name__', t.fn)!r} cannot read; use kd, or a dense store.")
                if (t.student == "logits" and t.teacher == "logits" and s.shape[-1] != tv.shape[-1]
                        and not t.caps.different_widths):  # relation losses compare any widths
                    raise DistilleryError(
                        f"teacher and student disagree on the class count: teacher logits have {tv.shape[-1]} classes, "
                        f"student logits {s.shape[-1]}; build both for the same data set (num_classes)."
                    )
            if t.adapter_module is not None:
                s = t.adapter_module(s)
            kw: dict[str, Any] = {}
            if t.needs_targets:
                kw["targets"] = self._targets(t, batch, teacher)
            if t.state_cls is not None:
                if t.state_module is None:
                    raise DistilleryError(f"term {t.name!r}: its loss has learned state; call Objective.build first "
                                          "(the engine does this on the first batch).")
                kw["state"] = t.state_module
            if t.needs_ids:
                if "id" not in batch:
                    raise DistilleryError(f"term {t.name!r} needs sample ids, but the batch has no 'id'; "
                                          "train on a data set whose batches carry sample ids.")
                kw["ids"] = batch["id"]
            for key in t.batch_keys:
                if key not in batch:
                    raise DistilleryError(f"term {t.name!r} (loss {t.fn.__name__!r}) reads {key!r} from the batch, but "
                                          f"the batch has only {sorted(batch)}; train it on a data set whose batches "
                                          f"carry {key!r} (graph losses: distillery.graph.NodeData).")
                kw[key] = batch[key]
            if s.dim() == 3 and "mask" in batch and not t.is_feature:  # (B, T, V) token logits
                value = tokens.token_loss(t.call, s, tv, mask=batch["mask"], targets=kw.pop("targets", None),
                                          chunk_size=self.chunk_size, **kw)
            elif "mask" in batch and s.dim() >= 3 and s.shape[:2] == batch["mask"].shape:
                # hidden states (B, T, H) of token batches: the valid tokens only, as (n, H) rows
                value = t.call(s[batch["mask"]], None if tv is None else tv[batch["mask"]], **kw)
            else:
                value = t.call(s, tv, **kw)
            terms[t.name] = value
            if self.scales is not None and t.name in self.scales.names:
                value = self.scales(self.scales.names.index(t.name), value)
                terms[f"{t.name}/scaled"] = value
            if bal is not None and t.name in bal.names:
                balanced[t.name] = value
                factor = bal.factor(bal.names.index(t.name))
                terms[f"{t.name}/balance"] = factor.detach() / len(bal.names)
                value = value * factor
            w = t.weight if factors is None else t.weight * factors[i]
            total = w * value if total is None else total + w * value
            plain = plain + t.weight * value.detach()
            if t.state_module is not None and hasattr(t.state_module, "metrics"):  # logged, not in the total
                terms.update({f"{t.name}/{k}": v for k, v in t.state_module.metrics().items()})
        if bal is not None and bal.training and torch.is_grad_enabled():
            bal.add([balanced[n] for n in bal.names])  # applied once per optimiser step: end_step()
        return {"total": total, "terms": terms, "batch_total": plain}

    def _targets(self, t: Term, batch: dict[str, Tensor], teacher: dict[str, Tensor] | None) -> Tensor | None:
        mode = t.targets
        if mode == "labels" or (mode == "auto" and "y" in batch):
            if "y" not in batch:
                raise DistilleryError(f"term {t.name!r} needs labels but the batch has none (an unlabelled set); "
                                      "use targets: teacher, or train this term on a labelled set.")
            y = batch["y"]
            if mode == "auto" and teacher is not None and "logits" in teacher and bool((y == -100).any()):
                y = torch.where(y == -100, teacher["logits"].argmax(-1), y)  # unlabelled rows: the teacher's class
            return y
        if teacher is not None and "logits" in teacher:
            return teacher["logits"].argmax(-1)
        if t.teacher is None:
            raise DistilleryError(f"term {t.name!r} needs labels but the batch has none and there is no teacher.")
        return None


def check_finite(result: dict[str, Any], where: str) -> None:
    """Stop with a message naming the non-finite terms (NaN or inf), never a silent divergence."""
    total = result["total"]
    total = total.detach()
    finite = math.isfinite(float(total)) if total.numel() == 1 else bool(torch.isfinite(total).all())
    if finite:  # a scalar costs one sync and no extra kernels
        return
    bad = {k: float(v.detach()) for k, v in result["terms"].items() if not bool(torch.isfinite(v).all())}
    detail = ", ".join(f"{k} = {v}" for k, v in bad.items()) or f"total = {float(total)}"
    raise NonFiniteLoss(
        f"non-finite loss at {where}: {detail}. The run stopped; lower the learning rate, set "
        "train.clip_grad_norm, or check the inputs and teacher outputs for NaN/inf."
    )
