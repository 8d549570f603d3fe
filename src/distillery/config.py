"""Typed recipes: YAML (``yaml.safe_load``) -> dataclasses, ``a.b=c`` overrides, validation.

Every unknown key and every value of the wrong type is a ``DistilleryError`` that names the
key (as a dotted path) and the allowed keys or values. Nothing in a recipe is executed.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .compress.prune import PruneConfig
from .compress.quantize import QuantizeConfig
from .errors import DistilleryError, close_matches


@dataclass
class TrainConfig:
    """How one model is trained (teacher, baseline or distilled student)."""

    epochs: int = 50
    batch_size: int = 128
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    """SGD only."""
    nesterov: bool = False
    schedule: Literal["constant", "cosine", "step"] = "cosine"
    warmup_epochs: float = 0.0
    """Linear warm-up from 0, in epochs (fractions allowed)."""
    min_lr: float = 0.0
    """Floor of the cosine schedule."""
    step_epochs: int = 30
    """Step schedule: multiply the rate by ``gamma`` every this many epochs."""
    gamma: float = 0.1
    grad_accum: int = 1
    """Micro-batches per optimiser step; losses are weighted by the global count of items."""
    clip_grad_norm: float | None = None
    device: str = "auto"
    """auto (CUDA when present, else the CPU) | cpu | cuda | cuda:N | mps."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast of the forward passes (fp16 with a gradient scaler); losses always reduce in fp32."""
    compile: bool = False
    """``torch.compile`` the student (costs a compilation on the first steps)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Under torch.distributed: DDP replicates the student; FSDP2 shards it (per block) over the processes."""
    find_unused_parameters: bool = False
    """DDP: set when some trainable parameters get no gradient in a step (the error says so)."""
    num_workers: int = 0
    """DataLoader worker processes (0: batches are built in the training process)."""
    pin_memory: bool | None = None
    """Pinned host memory for batches; null: on when training on CUDA."""
    persistent_workers: bool = False
    prefetch_factor: int | None = None
    inputs: list[str] | None = None
    """Batch keys passed to the model as keyword arguments (e.g. [input_ids, attention_mask]); null: the
    batch's ``x`` (a tensor positionally, a dict as keywords), or every key but ids, targets and masks."""
    loggers: list[str] = field(default_factory=list)
    """Trackers beside metrics.jsonl: tensorboard, mlflow, wandb (optional extras)."""
    log_every: int = 10
    """Steps between metric records."""
    checkpoint_every_steps: int | None = None
    """Also checkpoint every this many optimiser steps (a checkpoint is written every epoch anyway)."""
    eval_every_steps: int | None = None
    """Also evaluate every this many optimiser steps (a finer learning curve in metrics.jsonl; every epoch's
    end is evaluated anyway)."""
    select: Literal["last", "best"] = "last"
    """``best``: end with the weights of the epoch whose evaluation accuracy was highest, the later
    one on ties (the evaluation set must then be a validation set, never the test set)."""
    patience: int | None = None
    """Stop after this many epochs without an evaluation accuracy at least as high as the best (early stopping)."""

    def __post_init__(self) -> None:
        _positive(self, "epochs", "batch_size", "grad_accum", "log_every", "step_epochs", "checkpoint_every_steps",
                  "eval_every_steps")
        for name in ("lr", "weight_decay", "momentum", "warmup_epochs", "min_lr", "gamma"):
            v = getattr(self, name)
            if not math.isfinite(v):
                raise DistilleryError(f"train.{name} must be a finite number, got {v}.")
        for name in ("weight_decay", "warmup_epochs", "min_lr"):
            if getattr(self, name) < 0:
                raise DistilleryError(f"train.{name} must be >= 0, got {getattr(self, name)}.")
        if not 0 <= self.momentum < 1:
            raise DistilleryError(f"train.momentum must lie in [0, 1), got {self.momentum}.")
        if self.gamma <= 0:
            raise DistilleryError(f"train.gamma must be > 0, got {self.gamma}.")
        if self.min_lr > self.lr:
            raise DistilleryError(f"train.min_lr ({self.min_lr}) is above train.lr ({self.lr}); the cosine floor "
                                  "must not exceed the rate.")
        if self.warmup_epochs > self.epochs:
            raise DistilleryError(f"train.warmup_epochs ({self.warmup_epochs}) is longer than the run "
                                  f"({self.epochs} epochs).")
        if self.select not in ("last", "best"):
            raise DistilleryError(f"train.select must be last or best, got {self.select!r}.")
        if self.patience is not None and self.patience < 1:
            raise DistilleryError(f"train.patience must be >= 1 or null, got {self.patience}.")
        if self.lr <= 0:
            raise DistilleryError(f"train.lr must be > 0, got {self.lr}.")
        if self.clip_grad_norm is not None and not (self.clip_grad_norm > 0 and math.isfinite(self.clip_grad_norm)):
            raise DistilleryError("train.clip_grad_norm must be a finite number > 0, or null.")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(self.device)):
            raise DistilleryError(f"train.device: {self.device!r} is not a device; use auto, cpu, cuda, cuda:N or mps.")
        if self.num_workers < 0:
            raise DistilleryError(f"train.num_workers must be >= 0, got {self.num_workers}.")
        if self.prefetch_factor is not None and (self.prefetch_factor < 1 or self.num_workers == 0):
            raise DistilleryError("train.prefetch_factor needs num_workers >= 1 and a value >= 1.")
        from .callbacks import TRACKERS

        for n in self.loggers:
            if n not in TRACKERS:
                raise DistilleryError(f"train.loggers: {n!r} is not a tracker; use any of {', '.join(TRACKERS)}.")


# Train settings that change where and how fast a run goes, not what it computes: a run may resume
# with other values (on a GPU after a CPU start, with more workers, ...).
RUNTIME_KEYS = ("device", "num_workers", "pin_memory", "persistent_workers", "prefetch_factor", "loggers", "log_every",
                "compile", "checkpoint_every_steps", "eval_every_steps", "find_unused_parameters")


@dataclass
class ModelSpec:
    """A model by registered name; the other keys are the builder's keyword arguments."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSpec:
    """A data set by registered name; the other keys are the builder's keyword arguments."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class TermConfig:
    """One objective term. The other keys are the loss's parameters (checked against its signature)."""

    loss: str
    weight: float = 1.0
    name: str | None = None
    student: str = "logits"
    """``logits`` or a module path of the student."""
    teacher: str | None = "logits"
    """``logits``, a module path of the teacher, or null for terms that read no teacher (``ce``)."""
    targets: Literal["auto", "labels", "teacher"] = "auto"
    """``auto``: the labels where the batch has them, else the teacher's argmax."""
    adapter: Literal["auto", "none", "linear", "conv1x1", "mlp"] = "auto"
    """Projection of the student tensor to the teacher's shape, for feature terms (``distillery.adapters``)."""
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherConfig:
    model: ModelSpec
    checkpoint: str | None = None
    """A safetensors file of teacher weights; when null the teacher is trained (or reused from the cache)."""
    train: TrainConfig | None = field(default_factory=lambda: TrainConfig(lr=3e-3))
    """How the teacher is trained when no checkpoint is given; null: the model is used as it is built (a
    pretrained Hugging Face folder)."""
    verify: bool = True
    """Check ``checkpoint`` against its checksum record (``.json`` beside it, written by distillery); false
    loads a file from elsewhere unverified, knowingly."""
    device: str | None = None
    """Where the frozen teacher runs while distilling; null: the student's device. Its answers move to the student's."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """The frozen teacher's weights and activations in this precision while distilling."""
    shard: bool = False
    """Under train.strategy=fsdp: shard the frozen teacher over the processes too (no optimiser state)."""


@dataclass
class StudentConfig:
    model: ModelSpec


@dataclass
class BaselineConfig:
    """The student trained alone on the labelled set (cross-entropy), for comparison."""

    enabled: bool = True
    train: TrainConfig | None = None
    """Defaults to ``distill.train``."""


@dataclass
class StageConfig:
    """One stage of a staged distillation (FitNets: hint pre-training, then KD); stages run in order,
    each resumable, on the same student."""

    name: str
    terms: list[TermConfig]
    train: TrainConfig | None = None
    """Defaults to ``distill.train``."""
    trainable: list[str] | None = None
    """Student module paths trained in this stage (the rest is frozen); null trains the whole student."""


@dataclass
class DistillConfig:
    terms: list[TermConfig] = field(default_factory=list)
    stages: list[StageConfig] = field(default_factory=list)
    """Instead of ``terms``: stages run in order, each with its own terms, training and trainable parts."""
    data: Literal["transfer", "train", "train+transfer"] = "transfer"
    """Which samples the distillation step reads: the unlabelled transfer set, the labelled set, or both."""
    train: TrainConfig = field(default_factory=TrainConfig)
    normalize_terms: bool = False
    """Divide each feature term by a running estimate of its magnitude, so none dominates (LAPTOP-Diff's
    imbalance; the paper's own per-term normalisation is the loss ``normalized_mse``)."""
    balance_terms: list[str] = field(default_factory=list)
    """Names of terms whose weights move by MTARD's relative-loss-decrease balance (per teacher terms)."""
    precompute_teacher: bool = True
    """Compute the teacher's logits (and the taps terms read) once per sample and look them up by id
    (the inputs do not change between epochs); false runs the teacher at every step."""
    labelled_share: float | None = None
    """With ``data: train+transfer``: the share of labelled samples in every batch (labels kept, -100 on
    transfer rows, so a ``ce`` term reads them); None joins both sets unlabelled, in one shuffle."""
    teacher_store: str | None = None
    """A store written by ``distillery cache`` for this recipe's teacher and distillation data: the
    teacher's answers are read from it (dense or top-k), and a store of another teacher or data set
    is refused."""


@dataclass
class CompressStage:
    """One compress stage after distillation (stages chain, each on the previous one's model): the student
    pruned (``prune``: then recovered by training) or quantized (``quantize``: trained when the method is
    QAT), with ``terms`` from ``teacher``; then exported as the real compressed model, loaded back and
    measured (a row of the run)."""

    name: str
    prune: PruneConfig | None = None
    quantize: QuantizeConfig | None = None
    teacher: Literal["teacher", "student"] = "teacher"
    """Who teaches the recovery: the recipe's teacher, or the uncompressed student itself."""
    terms: list[TermConfig] | None = None
    """Default: the last distillation stage's terms."""
    train: TrainConfig | None = None
    """Default: ``distill.train``."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name) or self.name in ("teacher", "baseline", "distilled"):
            raise DistilleryError(f"compress stage name {self.name!r}: letters, digits, _ or -, and not teacher, "
                                  "baseline or distilled.")
        if (self.prune is None) == (self.quantize is None):
            raise DistilleryError(f"compress stage {self.name!r}: give prune: {{...}} or quantize: {{...}}, one of them.")
        if self.quantize is not None and self.quantize.method == "ptq" and \
                (self.terms is not None or self.train is not None):
            raise DistilleryError(f"compress stage {self.name!r}: ptq trains nothing; leave out terms and train, or "
                                  "use method qat.")


@dataclass
class Recipe:
    """``kind: classify`` (the default kind): a classifier distilled from a teacher."""

    name: str
    data: DataSpec
    teacher: TeacherConfig
    student: StudentConfig
    distill: DistillConfig
    kind: Literal["classify"] = "classify"
    transfer: DataSpec | None = None
    """The unlabelled transfer set (needed when ``distill.data`` reads it)."""
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    seed: int = 0
    threads: int = 2
    """torch intra-op threads (set deliberately: results and speed depend on it)."""
    runs_dir: str = "runs"
    cache_dir: str | None = None
    """Where trained teachers are kept for reuse; default ``<runs_dir>/cache``."""
    compress: list[CompressStage] = field(default_factory=list)
    """Stages after distillation that compress the student (quantization-aware distillation), each a row."""

    def __post_init__(self) -> None:
        share = self.distill.labelled_share
        if share is not None and not 0 <= share <= 1:
            raise DistilleryError(f"distill.labelled_share must lie in [0, 1] (a share of every batch), got {share}.")
        if "transfer" in self.distill.data and self.transfer is None:
            raise DistilleryError(
                f"distill.data is {self.distill.data!r} but the recipe has no 'transfer' data set; "
                "add transfer: {name: ...} or set distill.data=train."
            )
        if bool(self.distill.terms) == bool(self.distill.stages):
            raise DistilleryError("give distill.terms (one stage) or distill.stages (several), exactly one of them; "
                                  "e.g. terms: [{loss: kd}].")
        names = [st.name for st in self.distill.stages]
        if len(set(names)) != len(names) or not all(re.fullmatch(r"[A-Za-z0-9_-]+", n) for n in names):
            raise DistilleryError(f"distill.stages need distinct names of letters, digits, _ or -; got {names}.")
        for st in self.distill.stages:
            if not st.terms:
                raise DistilleryError(f"distill.stages {st.name!r} has no terms.")
        if self.threads < 1:
            raise DistilleryError("threads must be >= 1.")
        names = [st.name for st in self.compress]
        if len(set(names)) != len(names):
            raise DistilleryError(f"compress stages need distinct names; got {names}.")
        if any(st.quantize is not None for st in self.compress[:-1]):
            raise DistilleryError("compress: a quantized model is final; put the quantize stage last.")


# Keys of these dataclasses that collect the remaining mapping entries ("name: mlp, hidden: [256]").
_REST = {ModelSpec: "args", DataSpec: "args", TermConfig: "params"}


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if v is not None and v < 1:
            raise DistilleryError(f"{n} must be >= 1, got {v}.")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except DistilleryError as e:
                errors.append(str(e))
        raise DistilleryError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}.")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            near = close_matches(str(value), [str(a) for a in allowed])
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise DistilleryError(f"{where}: {value!r} is not allowed{hint}; allowed values: {', '.join(map(repr, allowed))}.")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise DistilleryError(f"{where}: expected a list, got {type(value).__name__} {value!r}.")
        (item, *_) = typing.get_args(tp) or (Any,)
        return tuple(_convert(v, item, f"{where}.{i}") for i, v in enumerate(value))
    if origin is list:
        if not isinstance(value, list):
            raise DistilleryError(f"{where}: expected a list, got {type(value).__name__} {value!r}.")
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise DistilleryError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}.")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise DistilleryError(f"{where}: expected true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DistilleryError(f"{where}: expected an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DistilleryError(f"{where}: expected a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise DistilleryError(f"{where}: expected a string, got {value!r}.")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {where}")


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, naming the dotted key of every problem."""
    label = where or "recipe"
    if dataclasses.is_dataclass(data):
        return data
    if isinstance(data, str) and cls in _REST:  # shorthand: `model: mlp`
        data = {"name" if cls is not TermConfig else "loss": data}
    if not isinstance(data, dict):
        raise DistilleryError(f"{label}: expected a mapping, got {type(data).__name__} {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    rest_key = _REST.get(cls)
    kwargs: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in data.items():
        key_s = str(key)
        path = f"{where}.{key_s}" if where else key_s
        if key_s == rest_key and isinstance(value, dict):  # an explicit `args:` / `params:` mapping
            rest.update({str(k): v for k, v in value.items()})
            continue
        if key_s not in fields:
            if rest_key is not None:
                rest[key_s] = value
                continue
            near = close_matches(key_s, fields)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise DistilleryError(f"unknown key {path!r}.{hint} Allowed keys here: {', '.join(fields)}.")
        kwargs[key_s] = _convert(value, hints[key_s], path)
    if rest_key is not None:
        kwargs[rest_key] = rest
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise DistilleryError(f"{label}: missing required key(s) {', '.join(repr(m) for m in missing)}.")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """The inverse of ``from_dict``: plain dicts/lists, with the collected keys flattened back."""
    if dataclasses.is_dataclass(obj):
        out: dict[str, Any] = {}
        rest_key = _REST.get(type(obj))
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.name == rest_key:
                out.update(to_dict(v))
            else:
                out[f.name] = to_dict(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a copy of the raw recipe mapping."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise DistilleryError(f"override {item!r} is not of the form key.path=value.")
        key, _, text = item.partition("=")
        try:
            value = safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
            raise DistilleryError(f"override {item!r}: the value is not valid YAML ({problem}).") from None
        parts = key.strip().split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise DistilleryError(f"override {key!r}: {part!r} is not an index of a list of {len(node)}.")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if not isinstance(node.get(part), (dict, list)):
                        node[part] = {} if node.get(part) is None else node[part]
                    if not isinstance(node[part], (dict, list)):
                        raise DistilleryError(f"override {key!r}: {'.'.join(parts[: i + 1])!r} is a value, not a section.")
                    node = node[part]
            else:
                raise DistilleryError(f"override {key!r}: {'.'.join(parts[:i])!r} is a value, not a section.")
    return raw


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no tags that build objects or run code) that also reads ``1e-3`` as a float:
    YAML 1.1 needs a dot in a float, so the bare form would arrive as the string '1e-3'."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_SafeLoader)  # a SafeLoader subclass: builds no objects, runs no code


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        raise DistilleryError(f"recipe {str(path)!r} is not valid YAML{at}: {problem}.") from None
    except OSError as e:
        raise DistilleryError(f"cannot read recipe {str(path)!r}: {e.strerror}.") from None
    if not isinstance(data, dict):
        raise DistilleryError(f"recipe {str(path)!r} must be a mapping of keys, got {type(data).__name__}.")
    return data


def check_kwargs(fn: Any, kwargs: dict, where: str, *, skip: int = 0, reserved: tuple[str, ...] = ()) -> None:
    """Check ``kwargs`` against ``fn``'s signature without calling it (torchtune's ``validate`` idea)."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    allowed = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in reserved]
    for k in kwargs:
        if k not in allowed:
            near = close_matches(k, allowed)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise DistilleryError(f"{where}: unknown parameter {k!r}.{hint} Allowed: {', '.join(allowed) or '(none)'}.")
