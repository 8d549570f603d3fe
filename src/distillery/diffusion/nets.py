"""Networks for the diffusion family (the ``diffusion`` extra: diffusers), and the diffusers folder format.

- ``MLPDenoiser``: a residual MLP over vectors (mixtures), a diffusers ``ModelMixin`` so it saves and
  loads with ``save_pretrained`` / ``from_pretrained`` (config.json + safetensors); it takes class labels
  and a guidance scale ``w`` as inputs (classifier-free-guidance distillation).
- ``unet(...)``: a small ``diffusers.UNet2DModel`` for images.
- ``Denoiser``: wraps either with its ``Process``: ``forward(x, tau, class_labels=None, w=None)`` returns
  the prediction (a tensor), feeding the network the process's timestep. Every method trains and
  samples through it; the teacher and the exact mixture (``mixture.ExactDenoiser``) answer the same call.

A model folder is a diffusers pipeline folder: ``model_index.json``, ``unet/`` (config.json and
diffusion_pytorch_model.safetensors) and ``scheduler/scheduler_config.json`` (DDIM with trailing
spacing for vp, FlowMatchEuler for flow, LCM for consistency students), plus ``distillery.json`` (the
process, sample shape and sampler). A UNet folder loads in diffusers alone (``DDPMPipeline``,
``UNet2DModel.from_pretrained``); ``load_folder`` reads any such folder back, also one diffusers wrote. A
layer-pruned UNet (``diffusion.prune``) keeps its full architecture with the removed layers' weights zero
(diffusers alone computes the pruned network) and lists them in ``distillery.json``: ``load_folder`` builds
the smaller network without them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..compress.quantize import quiet_torchao
from ..errors import DistilleryError
from .process import Process, _expand

quiet_torchao()  # diffusers imports torchao when it is installed: its warnings about GPU kernels are noise here
try:
    import diffusers
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
except ImportError as e:  # pragma: no cover - the extra is installed in CI
    raise DistilleryError("the diffusion family needs diffusers: pip install 'distillery[diffusion]'.") from e


def _sinusoid(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    arg = t.float()[:, None] * freqs[None]
    return torch.cat([arg.sin(), arg.cos()], -1)


class MLPDenoiser(ModelMixin, ConfigMixin):
    """x (B, D), timestep (B,), class labels (B,) in [0, num_classes] (num_classes: unconditional) and a
    guidance scale w (B,) -> (B, D). Residual SiLU blocks with LayerNorm; the time (and class, w)
    embedding is added to every block."""

    @register_to_config
    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, num_classes: int = 0, guidance: bool = False,
                 time_scale: float = 1.0):
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.time = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.classes = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.w = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)) if guidance else None
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                                  nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        cfg = self.config
        emb = self.time(_sinusoid(timestep.reshape(-1).expand(len(x)) * cfg.time_scale, cfg.hidden))
        if self.classes is not None:
            labels = class_labels if class_labels is not None else torch.full((len(x),), cfg.num_classes,
                                                                               device=x.device, dtype=torch.long)
            emb = emb + self.classes(labels)
        if self.w is not None:
            ws = w if w is not None else torch.zeros(len(x), device=x.device)
            emb = emb + self.w(_sinusoid(ws.reshape(-1).expand(len(x)) * 100.0, cfg.hidden))
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h)


def unet(channels: int = 1, size: int = 8, widths: tuple[int, ...] = (32, 64), layers: int = 1,
         num_classes: int = 0) -> nn.Module:
    """A small ``UNet2DModel`` for ``channels`` x ``size`` x ``size`` images (``num_classes``: class
    conditional, label ``num_classes`` meaning unconditional)."""
    if size % 2 ** (len(widths) - 1):
        raise DistilleryError(f"a UNet with {len(widths)} levels halves the image {len(widths) - 1} times; "
                              f"size {size} is not divisible by {2 ** (len(widths) - 1)}.")
    return diffusers.UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=layers,
        block_out_channels=tuple(widths), norm_num_groups=min(8, widths[0]),
        down_block_types=("DownBlock2D",) * len(widths), up_block_types=("UpBlock2D",) * len(widths),
        num_class_embeds=num_classes + 1 if num_classes else None)


class Denoiser(nn.Module):
    """A network with its process: ``forward(x, tau, class_labels=None, w=None) -> prediction``."""

    def __init__(self, net: nn.Module, process: Process, shape: tuple[int, ...], sampler: str = "ddim",
                 guided: float | None = None, solver_steps: int | None = None):
        super().__init__()
        self.net, self.process, self.shape, self.sampler = net, process, tuple(shape), sampler
        self.guided = guided
        """The guidance scale distilled into a class-conditional student (its output is already guided:
        sampling applies no classifier-free guidance on top); None: a plain conditional model."""
        self.solver_steps = solver_steps
        """A consistency student: the teacher's solver grid it was trained on (sampling snaps to it, as LCM)."""

    @property
    def num_classes(self) -> int:
        cfg = getattr(self.net, "config", None)
        if isinstance(self.net, diffusers.UNet2DModel):
            return (cfg.num_class_embeds or 1) - 1
        return int(getattr(cfg, "num_classes", 0) or 0)

    @property
    def takes_w(self) -> bool:
        return bool(getattr(getattr(self.net, "config", None), "guidance", False))

    def forward(self, x: Tensor, tau: Tensor, class_labels: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        t = self.process.timestep(tau.to(x.device).float().reshape(-1).expand(len(x)))
        if isinstance(self.net, diffusers.UNet2DModel):
            if class_labels is None and self.num_classes:
                class_labels = torch.full((len(x),), self.num_classes, device=x.device, dtype=torch.long)
            return self.net(x, t, class_labels=class_labels).sample
        if self.takes_w:
            return self.net(x, t, class_labels=class_labels, w=w)
        return self.net(x, t, class_labels=class_labels)

    def x0_eps(self, x: Tensor, tau: Tensor, class_labels: Tensor | None = None, w: Tensor | None = None):
        return self.process.to_x0_eps(self(x, tau, class_labels, w), x, tau.to(x.device))


def guided(model: nn.Module, x: Tensor, tau: Tensor, class_labels: Tensor | None, w: Tensor | None,
           process: Process) -> tuple[Tensor, Tensor]:
    """(x0, eps) of ``model`` at (x, tau), with classifier-free guidance ``u + w (c - u)`` when the model is
    class conditional, takes no ``w`` itself, has none distilled in and ``w`` is given (a guided teacher)."""
    takes_w = getattr(model, "takes_w", False)
    if class_labels is None or w is None or takes_w or getattr(model, "guided", None) is not None:
        return process.to_x0_eps(model(x, tau, class_labels, w), x, tau)
    null = torch.full_like(class_labels, model.num_classes)
    both = model(torch.cat([x, x]), torch.cat([tau, tau]), torch.cat([class_labels, null]))
    c, u = both.chunk(2)
    return process.to_x0_eps(u + _expand(w.float(), x) * (c - u), x, tau)


# ------------------------------------------------------------------ folders
SCHEDULERS = {"vp": "DDIMScheduler", "flow": "FlowMatchEulerDiscreteScheduler"}


def _scheduler(process: Process, sampler: str, solver_steps: int | None = None):
    if process.kind == "flow":
        return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=process.num_train_timesteps, shift=1.0)
    kw = dict(num_train_timesteps=process.num_train_timesteps, beta_schedule=process.beta_schedule,
              beta_start=process.beta_start, beta_end=process.beta_end, prediction_type=process.prediction,
              timestep_spacing="trailing", clip_sample=False)
    if sampler == "consistency":
        return diffusers.LCMScheduler(**kw, set_alpha_to_one=True, original_inference_steps=solver_steps or 50)
    return diffusers.DDIMScheduler(**kw, set_alpha_to_one=True)


def save_folder(model: Denoiser, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a diffusers pipeline folder (atomically: ``io.atomic_folder``)."""
    from ..io import atomic_folder

    def write(tmp: Path) -> None:
        if getattr(model.net, "removed_layers", None):  # layer-pruned: the full architecture, removed layers zero
            from .prune import dense

            dense(model.net).save_pretrained(tmp / "unet", safe_serialization=True)
        else:
            model.net.save_pretrained(tmp / "unet", safe_serialization=True)
        sched = _scheduler(model.process, model.sampler, model.solver_steps)
        sched.save_pretrained(tmp / "scheduler")
        index = {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
                 "unet": ["diffusers", type(model.net).__name__], "scheduler": ["diffusers", type(sched).__name__]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        meta = {"process": model.process.config(), "shape": list(model.shape), "sampler": model.sampler,
                "guided": model.guided, "solver_steps": model.solver_steps, "net": type(model.net).__name__,
                **({"removed_layers": model.net.removed_layers} if getattr(model.net, "removed_layers", None) else {}),
                "grid": "tau = 1 - i / steps (diffusers: DDIM or LCM with timestep_spacing trailing; FlowMatchEuler: "
                        "set_timesteps(sigmas=[1 - i / steps]))", **(extra or {})}
        (tmp / "distillery.json").write_text(json.dumps(meta, indent=2))

    return atomic_folder(path, write)


def _process_from_scheduler(cfg: dict) -> Process:
    name = cfg.get("_class_name", "")
    T = int(cfg.get("num_train_timesteps", 1000))
    if name.startswith("FlowMatch"):
        return Process("flow", "flow", T)
    if name in ("DDPMScheduler", "DDIMScheduler", "LCMScheduler", "EulerDiscreteScheduler"):
        if cfg.get("trained_betas") is not None or cfg.get("rescale_betas_zero_snr"):
            raise DistilleryError("the teacher's scheduler uses trained_betas or rescale_betas_zero_snr, which "
                                  "distillery's vp process does not model; use a folder with a linear or "
                                  "squaredcos_cap_v2 beta schedule.")
        if cfg.get("beta_schedule", "linear") not in ("linear", "squaredcos_cap_v2"):
            raise DistilleryError(f"scheduler beta_schedule {cfg.get('beta_schedule')!r} is not supported; "
                                  "use linear or squaredcos_cap_v2.")
        return Process("vp", cfg.get("prediction_type", "epsilon"), T, cfg.get("beta_schedule", "linear"),
                       float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02)))
    raise DistilleryError(f"scheduler {name!r} cannot drive step distillation; use a folder whose scheduler is "
                          "DDPM, DDIM, LCM, Euler or FlowMatchEuler.")


def load_folder(path: str | Path) -> Denoiser:
    """A diffusers folder (ours or one diffusers wrote: ``unet/`` with safetensors and ``scheduler/``) as
    a ``Denoiser``. Weights load from safetensors only."""
    path = Path(path)
    unet_dir = path / "unet"
    if not unet_dir.is_dir():
        raise DistilleryError(f"{path} is not a diffusers folder (no unet/); save one with save_pretrained "
                              "(unet/ and scheduler/).")
    if not (unet_dir / "diffusion_pytorch_model.safetensors").is_file():
        raise DistilleryError(f"{unet_dir} has no diffusion_pytorch_model.safetensors (pickled weights are not "
                              "loaded); save it again with save_pretrained(safe_serialization=True).")
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise DistilleryError(f"{path} has no scheduler/scheduler_config.json; add the scheduler the model was "
                              "trained with.")
    cls_name = json.loads((unet_dir / "config.json").read_text()).get("_class_name", "")
    cls = {"UNet2DModel": diffusers.UNet2DModel, "MLPDenoiser": MLPDenoiser}.get(cls_name)
    if cls is None:
        raise DistilleryError(f"{unet_dir} holds a {cls_name!r}; distillery loads UNet2DModel and MLPDenoiser.")
    meta_file = path / "distillery.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta.get("removed_layers"):  # a layer-pruned network (diffusion.prune): the layers removed, then its weights
        from safetensors.torch import load_file

        from .prune import remove, sparse_state

        net = remove(cls.from_config(cls.load_config(unet_dir)), meta["removed_layers"])
        state = load_file(unet_dir / "diffusion_pytorch_model.safetensors")
        net.load_state_dict(sparse_state(state, meta["removed_layers"]), strict=True)
    else:
        net = cls.from_pretrained(unet_dir, use_safetensors=True, low_cpu_mem_usage=False)
    sched_cfg = json.loads(sched_file.read_text())
    process = Process(**meta["process"]) if "process" in meta else _process_from_scheduler(sched_cfg)
    if "shape" in meta:
        shape = tuple(meta["shape"])
    elif cls is diffusers.UNet2DModel:
        shape = (net.config.in_channels, net.config.sample_size, net.config.sample_size)
    else:
        shape = (net.config.dim,)
    sampler = meta.get("sampler", "consistency" if "LCM" in sched_cfg.get("_class_name", "") else "ddim")
    return Denoiser(net, process, shape, sampler, meta.get("guided"), meta.get("solver_steps")).eval()
