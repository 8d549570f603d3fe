"""Layer pruning of a denoiser and its recovery by normalised feature distillation (LAPTOP-Diff: Zhang, Li,
Chen, Xie & Lu, "LAPTOP-Diff: Layer Pruning and Normalized Distillation for Compressing Diffusion Models",
arXiv 2404.11098).

One-shot pruning criterion. Pruning is the combinatorial problem

    min_S  E || eps(without the layers S) - eps ||^2   subject to  params(S) >= ratio * params(network)

over the removable layers. The paper's criterion rests on its additivity: the output loss of removing a set
is close to the sum of the output losses of removing each layer alone, L(S) ~ sum_{i in S} L_i. So each
layer's L_i is measured once on a calibration batch, and the set is the cheapest cover of a 0-1 knapsack
(``cheapest_cover``, exact dynamic programming over parameter counts). The additivity is measured for the
chosen set, not assumed: the run reports sum_i L_i beside the pruned network's own output loss.

- The calibration batch: ``calibration`` training samples noised at seeded training times (uniform DDPM
  indices for vp, uniform tau for flow) with seeded noise and their labels, the denoiser's own prediction
  (epsilon, v or flow) compared. The expectation of the paper is over its prompts, times and noise.
- Removable layers: those that hold their own residual connection and keep the shape, so a removed layer is
  its residual path (diffusers' ``ResnetBlock2D`` with equal in and out channels and no resampling, and
  ``Attention`` with a residual connection: every one in ``UNet2DModel``'s blocks, mid block included); in an
  ``MLPDenoiser`` the residual blocks ``blocks.N``, whose removal drops the block's branch. ``layers:`` names
  the candidates instead (a named layer must return a tensor of its first input's shape).
- Other criteria, for comparison: ``magnitude`` (the mean |weight| of the layer) and ``random`` (seeded),
  both through the same knapsack.

A pruned ``MLPDenoiser`` is a smaller ``MLPDenoiser`` (its ``depth`` lowered; diffusers loads it). In any
other network a removed layer becomes a parameter-free ``Skip`` (its residual path). diffusers has no config
for a U-Net without some of its layers, so the folder keeps the full architecture with the removed layers'
weights zero, which computes the same function: diffusers alone loads and samples it exactly (at the full
size), and ``nets.load_folder`` reads ``removed_layers`` from ``distillery.json`` and builds the small one.

Recovery (``recover``): the pruned network trains on the denoising loss, plus output distillation (mean
squared difference to the unpruned teacher's prediction at the same noisy input) and feature distillation at
the outputs of every stage (the U-Net's down blocks, mid block and up blocks; an MLP's kept blocks against
the same teacher blocks). LAPTOP-Diff normalises each feature term by the teacher's feature map's L2 norm
(squared here: ``losses.features.normalized_mse``) so that no numerically large layer dominates; ``features: plain``
is the unnormalised mean squared error (BK-SDM's feature loss) and ``none`` drops the feature terms.

Written from the paper's abstract and method summary (its full text was not reachable offline): where the
details are ours -- the calibration distribution, the per-sample normalisation, the stage outputs as
feature points -- the text above says so.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import DistilleryError

CRITERIA = ("output_loss", "magnitude", "random")


@dataclass
class LayerPrune:
    """``prune:`` of a diffusion recipe with ``method: prune`` (LAPTOP-Diff)."""

    ratio: float = 0.3
    """Share of the network's parameters removed, in whole layers (the chosen layers hold at least this many)."""
    criterion: Literal["output_loss", "magnitude", "random"] = "output_loss"
    calibration: int = 256
    """Training samples (noised once each) on which each layer's output loss is measured."""
    layers: list[str] | None = None
    """Candidate layers (module paths in the network); null: every removable layer."""
    features: Literal["normalized", "plain", "none"] = "normalized"
    """Recovery's feature distillation: LAPTOP-Diff's normalised terms, plain mean squared error, or none."""
    output_weight: float = 1.0
    feature_weight: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ratio) and 0 < self.ratio < 1):
            raise DistilleryError(f"prune.ratio is the share of parameters removed, in (0, 1); got {self.ratio}.")
        if self.criterion not in CRITERIA:
            raise DistilleryError(f"prune.criterion {self.criterion!r} is not known; use one of {', '.join(CRITERIA)}.")
        if self.features not in ("normalized", "plain", "none"):
            raise DistilleryError(f"prune.features {self.features!r} is not known; use normalized, plain or none.")
        if self.calibration < 1 or self.output_weight < 0 or self.feature_weight < 0:
            raise DistilleryError("prune.calibration must be >= 1 and the weights >= 0.")


class Skip(nn.Module):
    """A removed layer: its residual path alone, its first input divided by the layer's output scale (diffusers'
    ``output_scale_factor`` / ``rescale_output_factor``, 1 by default), with no parameters. That is the layer
    with its branch giving zero, which is how a folder stores it for diffusers (``dense``)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = float(scale)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return _skip(x, self.scale)


def _skip(x: Tensor, scale: float) -> Tensor:
    return x if scale == 1.0 else x / scale


def _scale(m: nn.Module) -> float:
    return float(getattr(m, "output_scale_factor", None) or getattr(m, "rescale_output_factor", None) or 1.0)


def _first_input(args: tuple, kwargs: dict) -> Tensor:
    if args:
        return args[0]
    for key in ("hidden_states", "input_tensor", "x"):
        if key in kwargs:
            return kwargs[key]
    raise DistilleryError("a removed layer must take its input first (or as hidden_states); name another layer.")


def _is_mlp(net: nn.Module) -> bool:
    from .nets import MLPDenoiser

    return isinstance(net, MLPDenoiser)


def _removable(m: nn.Module) -> bool:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    if isinstance(m, ResnetBlock2D):
        return m.in_channels == m.out_channels and not m.up and not m.down and m.conv_shortcut is None
    return isinstance(m, Attention) and bool(m.residual_connection)


def candidates(net: nn.Module, layers: list[str] | None = None) -> list[str]:
    """The layers of ``net`` that can be removed (module paths), or ``layers`` checked: each must exist (in an
    MLPDenoiser: whole blocks ``blocks.N``); a named layer's shape is checked on the calibration forward."""
    from ..taps import find_module

    if layers is not None:
        if not layers:
            raise DistilleryError("prune.layers is empty; name the candidate layers or leave it out (every removable "
                                  "layer).")
        for path in layers:
            find_module(net, path)  # a wrong path: one line naming the close matches
            if _is_mlp(net) and not _branch(net, path):
                raise DistilleryError(f"prune.layers {path!r}: in an MLPDenoiser only whole residual blocks can be "
                                      f"removed; name blocks.N (0 to {len(net.blocks) - 1}).")
        if len(set(layers)) != len(layers):
            raise DistilleryError(f"prune.layers names a layer twice: {layers}.")
        return list(layers)
    if _is_mlp(net):
        return [f"blocks.{i}" for i in range(len(net.blocks))]
    found = [n for n, m in net.named_modules() if n and _removable(m)]
    if not found:
        raise DistilleryError(f"{type(net).__name__} has no layer that can be removed whole (residual blocks that keep "
                              "their shape); name them in prune.layers.")
    return found


def _kept_blocks(depth: int, removed: list[str]) -> list[int]:
    """The indices of an MLPDenoiser's blocks that remain once the blocks ``removed`` (``blocks.N``) are gone."""
    drop = {int(p.split(".")[1]) for p in removed if re.fullmatch(r"blocks\.\d+", p)}
    return [i for i in range(depth) if i not in drop]


def _branch(net: nn.Module, path: str) -> bool:
    """True for an MLPDenoiser block, whose residual connection lies outside it (removed: it adds zero)."""
    return _is_mlp(net) and re.fullmatch(r"blocks\.\d+", path) is not None


class Ablated:
    """Context: the layers ``paths`` of ``net`` act as removed (forward hooks), nothing else changes."""

    def __init__(self, net: nn.Module, paths: list[str]):
        self.net, self.paths, self.handles = net, list(paths), []

    def __enter__(self):
        from ..taps import find_module

        for p in self.paths:
            branch = _branch(self.net, p)

            def hook(module, args, kwargs, output, branch=branch, path=p):
                out = output[0] if isinstance(output, tuple) else output
                if branch:
                    return torch.zeros_like(out)
                x = _first_input(args, kwargs)
                if x.shape != out.shape:
                    raise DistilleryError(f"layer {path!r} maps {tuple(x.shape)} to {tuple(out.shape)}; only a layer "
                                          "that keeps its input's shape can be removed. Leave it out of prune.layers.")
                return _skip(x, _scale(module))

            self.handles.append(find_module(self.net, p).register_forward_hook(hook, with_kwargs=True))
        return self.net

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def layer_params(net: nn.Module, path: str) -> int:
    from ..models import num_params
    from ..taps import find_module

    return num_params(find_module(net, path))


def remove(net: nn.Module, paths: list[str]) -> nn.Module:
    """A copy of ``net`` without the layers ``paths``: a shallower MLPDenoiser, or ``Skip`` in their place."""
    if _is_mlp(net) and all(_branch(net, p) for p in paths):
        from .nets import MLPDenoiser

        kept = _kept_blocks(len(net.blocks), paths)
        cfg = {k: v for k, v in net.config.items() if not k.startswith("_")}
        small = MLPDenoiser(**{**cfg, "depth": len(kept)})
        state = {}
        for k, v in net.state_dict().items():
            if k.startswith("blocks."):
                i = int(k.split(".")[1])
                if i not in kept:
                    continue
                k = f"blocks.{kept.index(i)}." + k.split(".", 2)[2]
            state[k] = v
        small.load_state_dict(state)
        ref = next(net.parameters())
        small = small.to(ref.device)  # diffusers warns on any dtype argument: only a real change passes one
        return small if ref.dtype == next(small.parameters()).dtype else small.to(ref.dtype)
    out = copy.deepcopy(net)
    for p in paths:
        parent, _, leaf = p.rpartition(".")
        holder = out.get_submodule(parent) if parent else out
        skip = Skip(_scale(out.get_submodule(p)))
        if isinstance(holder, (nn.ModuleList, nn.Sequential)):
            holder[int(leaf)] = skip
        else:
            setattr(holder, leaf, skip)
    out.removed_layers = sorted(set(getattr(net, "removed_layers", [])) | set(paths))
    return out


def dense(net: nn.Module) -> nn.Module:
    """A network with ``Skip`` layers as its full architecture: every removed layer back, its parameters zero, so
    its branch gives zero and it computes exactly what ``Skip`` does. diffusers alone loads and samples the
    folder this is saved to (at the full size); ``sparse_state`` reads the small one back."""
    full = type(net).from_config(net.config)
    own = net.state_dict()
    removed = tuple(p + "." for p in net.removed_layers)
    state = full.state_dict()
    missing = [k for k in state if k not in own and not k.startswith(removed)]
    if missing:
        raise DistilleryError(f"the pruned network lacks {missing[0]!r}; it was not built by diffusion.prune.remove.")
    full.load_state_dict({k: torch.zeros_like(v) if k.startswith(removed) else own[k] for k, v in state.items()})
    return full


def sparse_state(state: dict[str, Tensor], removed: list[str]) -> dict[str, Tensor]:
    """``dense``'s weights without the removed layers' (zero) ones; a non-zero one means the folder was edited."""
    prefixes = tuple(p + "." for p in removed)
    for k, v in state.items():
        if k.startswith(prefixes) and bool(v.any()):
            raise DistilleryError(f"{k} of a removed layer is not zero; the folder's weights do not match its "
                                  "removed_layers (distillery.json). Save the model again.")
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


def calibration_batch(denoiser, data, n: int, seed: int) -> dict[str, Tensor]:
    """``n`` training samples (seeded choice) noised at seeded training times: x, tau and labels."""
    g = torch.Generator().manual_seed(seed + 4099)
    idx = torch.randperm(len(data), generator=g)[: min(n, len(data))]
    x0 = data.x[idx].float()
    tau = denoiser.process.train_tau(len(x0), g)
    eps = torch.randn(x0.shape, generator=g)
    batch = {"x": denoiser.process.noise(x0, eps, tau), "tau": tau}
    if denoiser.num_classes and data.y is not None:
        batch["class_labels"] = data.y[idx].long()
    return batch


@torch.no_grad()
def _predict(denoiser, batch: dict[str, Tensor], chunk: int = 256) -> Tensor:
    device = next(denoiser.parameters()).device
    outs = []
    for i in range(0, len(batch["x"]), chunk):
        part = {k: v[i:i + chunk].to(device) for k, v in batch.items()}
        outs.append(denoiser(part["x"], part["tau"], part.get("class_labels")).float().cpu())
    return torch.cat(outs)


def output_loss(denoiser, batch: dict[str, Tensor], paths: list[str], reference: Tensor | None = None) -> float:
    """E ||pred(without ``paths``) - pred||^2 on the calibration batch (mean over samples and elements)."""
    ref = _predict(denoiser, batch) if reference is None else reference
    with Ablated(denoiser.net, paths):
        out = _predict(denoiser, batch)
    return float(((out - ref) ** 2).mean())


def cheapest_cover(costs: list[float], sizes: list[int], need: int, units: int = 10_000) -> list[int]:
    """The indices S minimising sum(costs[S]) subject to sum(sizes[S]) >= need: a 0-1 covering knapsack,
    solved as its complement, the 0-1 knapsack that keeps the most cost within sum(sizes) - need. Dynamic
    programming over sizes in units of ceil(capacity / ``units``), each kept size rounded up, so the answer
    always removes ``need`` (exact when every size is a multiple of the unit) and holds at most ``units`` + 1
    states."""
    if sum(sizes) < need:
        raise DistilleryError(f"the candidate layers hold {sum(sizes)} parameters, fewer than the {need} to remove.")
    room = sum(sizes) - need
    unit = max(1, -(-room // units))
    cap = room // unit
    best = {0: (0.0, 0)}  # kept units -> (kept cost, bit mask of the kept layers)
    for i, (c, s) in enumerate(zip(costs, sizes)):
        w = -(-s // unit)
        for used, (value, mask) in list(best.items()):
            key = used + w
            if key <= cap and (key not in best or value + c > best[key][0]):
                best[key] = (value + c, mask | 1 << i)
    kept = max(best.values(), key=lambda v: v[0])[1]
    return [i for i in range(len(sizes)) if not kept >> i & 1]


def choose(denoiser, data, cfg: LayerPrune, seed: int = 0) -> tuple[list[str], dict[str, Any]]:
    """The layers to remove by ``cfg.criterion`` and a report: each candidate's parameters and score, the chosen
    set, and (output_loss criterion) the sum of the single-layer losses beside the chosen set's own loss."""
    net = denoiser.net
    paths = candidates(net, cfg.layers)
    from ..models import num_params

    total = num_params(net)
    sizes = [layer_params(net, p) for p in paths]
    need = math.ceil(cfg.ratio * total)
    if sum(sizes) < need:
        share = sum(sizes) / total
        raise DistilleryError(f"prune.ratio {cfg.ratio} asks to remove {need:,} of {total:,} parameters, but the "
                              f"removable layers hold {sum(sizes):,} ({share:.3f}); lower prune.ratio to at most "
                              f"{math.floor(share * 1000) / 1000}, or name more layers in prune.layers.")
    batch = calibration_batch(denoiser, data, cfg.calibration, seed)
    reference = _predict(denoiser, batch)
    if cfg.criterion == "output_loss":
        scores = [output_loss(denoiser, batch, [p], reference) for p in paths]
    elif cfg.criterion == "magnitude":
        from ..taps import find_module

        scores = [float(torch.cat([w.detach().abs().flatten() for w in find_module(net, p).parameters()]).mean())
                  if s else 0.0 for p, s in zip(paths, sizes)]
    else:
        scores = torch.rand(len(paths), generator=torch.Generator().manual_seed(seed + 17)).tolist()
    chosen = [paths[i] for i in cheapest_cover(scores, sizes, need)]
    report = {"criterion": cfg.criterion, "candidates": {p: {"params": s, "score": c}
                                                         for p, s, c in zip(paths, sizes, scores)},
              "removed": chosen, "params_before": total, "params_removed": sum(layer_params(net, p) for p in chosen),
              "output_loss": output_loss(denoiser, batch, chosen, reference)}
    singles = {p: (c if cfg.criterion == "output_loss" else output_loss(denoiser, batch, [p], reference))
               for p, c in zip(paths, scores) if p in chosen}
    report["sum_of_layer_losses"] = sum(singles.values())  # additivity: close to output_loss
    return chosen, report


def prune(denoiser, data, cfg: LayerPrune, seed: int = 0, record: str | Path | None = None):
    """(the pruned denoiser, the report of ``choose``): a new ``Denoiser`` on the same process. ``record``: a
    JSON file that keeps the report; when it exists (a resumed run) its layers are removed again without a new
    choice, so the architecture a checkpoint holds cannot change."""
    import json

    from ..io import atomic_write_json
    from ..models import num_params
    from .nets import Denoiser

    record = Path(record) if record is not None else None
    if record is not None and record.is_file():
        report = json.loads(record.read_text())
        candidates(denoiser.net, report["removed"])  # each must still exist
    else:
        _, report = choose(denoiser, data, cfg, seed)
    net = remove(denoiser.net, report["removed"])
    small = Denoiser(net, denoiser.process, denoiser.shape, denoiser.sampler, denoiser.guided, denoiser.solver_steps)
    report["params"] = num_params(net)
    if record is not None and not record.is_file():
        from ..rundir import writer

        if writer():
            atomic_write_json(record, report)
    return small, report


def feature_pairs(student_net: nn.Module, teacher_net: nn.Module, removed: list[str]) -> list[tuple[str, str]]:
    """(student path, teacher path) of the feature points: a U-Net's down, mid and up blocks (present in both);
    an MLP's kept blocks against the teacher's blocks they were copied from."""
    if _is_mlp(teacher_net):
        kept = _kept_blocks(len(teacher_net.blocks), removed)
        return [(f"net.blocks.{j}", f"net.blocks.{i}") for j, i in enumerate(kept)]
    names = [n for n in ("down_blocks", "up_blocks") if hasattr(teacher_net, n)]
    pairs = [f"net.{n}.{i}" for n in names[:1] for i in range(len(getattr(teacher_net, n)))]
    if getattr(teacher_net, "mid_block", None) is not None:
        pairs.append("net.mid_block")
    pairs += [f"net.{n}.{i}" for n in names[1:] for i in range(len(getattr(teacher_net, n)))]
    return [(p, p) for p in pairs]


def recover(teacher, student, data, cfg: LayerPrune, removed: list[str], train, *, seed: int = 0, run_dir=None,
            resume: bool = True, progress: bool | None = None, phase: str = "prune-recover"):
    """Retrain the pruned ``student`` (LAPTOP-Diff's retraining): the denoising loss, output distillation from
    the unpruned ``teacher`` (weight ``output_weight``) and feature distillation at every stage output
    (``features``: normalized or plain, weight ``feature_weight``)."""
    import dataclasses

    from ..engine import fit
    from ..objective import Objective, Term
    from ..runtime import resolve_device
    from ..teachers import ModuleTeacher
    from .methods import DenoiseTask

    task = DenoiseTask(student.process, seed, student.num_classes)
    terms = [Term("diffusion_l2", teacher=None, name="task")]
    if cfg.output_weight:
        terms.append(Term("hint", weight=cfg.output_weight, name="output_kd", params={"metric": "mse"}))
    if cfg.features != "none" and cfg.feature_weight:
        loss = "normalized_mse" if cfg.features == "normalized" else "hint"
        for s_path, t_path in feature_pairs(student.net, teacher.net, removed):
            terms.append(Term(loss, weight=cfg.feature_weight, student=s_path, teacher=t_path, adapter="none",
                              name="feat_" + s_path.removeprefix("net.").replace(".", "_")))
    tcfg = dataclasses.replace(train, inputs=task.inputs())
    mt = ModuleTeacher(teacher, device=resolve_device(tcfg.device), inputs=task.inputs())
    fit(student, Objective(terms), data, tcfg, teacher=mt, task=task, run_dir=run_dir, phase=phase, seed=seed,
        resume=resume, progress=progress)
    return student.eval()
