"""Condensation methods: coresets (random, herding, k-center) and synthetic sets learned by
gradient matching (DC, DSA), distribution matching (DM) and trajectory matching (MTT / FTD).

Every learned method starts from real images of each class (DC's ``init='real'``) and updates
the images with SGD (momentum 0.5, as all four codes). Each iteration's randomness is drawn from
(seed, iteration) alone, and the state (images, learned labels and step size, optimiser momenta)
is checkpointed, so an interrupted condensation resumes to the same result. ``flip`` (FYI, Son
et al. 2024) lets every synthetic image enter the matching together with its horizontal flip.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TrainConfig
from ..errors import DistilleryError, unknown
from ..io import atomic_save_safetensors, atomic_write_json, read_json
from . import nets
from .augment import check_strategy, dsa
from .data import Images
from .evaluate import QUIET, fit_plain
from .losses import gradient_distance, mean_embedding_distance, trajectory_loss

CORESETS = ("random", "herding", "kcenter")
LEARNED = ("dc", "dsa", "dm", "mtt")
METHODS = CORESETS + LEARNED


@dataclass
class Settings:
    """What a condensation does; defaults are the reference codes' unless noted (CPU budgets are
    ours: the papers run 1,000 (DC/DSA), 20,000 (DM) and 5,000 (MTT) iterations)."""

    iterations: int | None = None
    """None: dc/dsa 200, dm 1000, mtt 300."""
    lr_img: float | None = None
    """None: dc/dsa 0.1, dm 1.0 (the codes'), mtt 100 (MTT's MNIST-scale choice is ours)."""
    batch_real: int = 256
    width: int = 32
    strategy: tuple[str, ...] | None = None
    """DSA operations; None: ``augment.default_strategy`` of the data (digits' for images, ``SIGNALS``
    for 1-D signals)."""
    flip: bool = False
    checkpoint_every: int = 50
    # dc / dsa
    lr_net: float = 0.01
    # mtt
    experts: int = 5
    expert_epochs: int = 2
    max_start_epoch: int = 10
    train_epochs: int = 15
    syn_steps: int = 10
    lr_teacher: float = 0.01
    lr_lr: float = 1e-5
    sam: bool = False
    """FTD's flat experts: the experts are trained with SAM (rho ``sam_rho``)."""
    sam_rho: float = 0.05
    learn_labels: bool = False
    """DATM's learned soft labels (mtt only): label logits start as an expert's logits and are trained."""
    lr_y: float = 2.0

    def __post_init__(self) -> None:
        """Declared ranges: counts at least 1 (max_start_epoch and sam_rho at least 0), rates finite and > 0."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "strategy" or v is None or isinstance(v, bool):
                continue
            if f.name.startswith("lr"):
                ok, need = math.isfinite(v) and v > 0, "a finite number > 0"
            else:
                low = 0 if f.name in ("max_start_epoch", "sam_rho") else 1
                ok, need = math.isfinite(v) and v >= low, f"at least {low}"
            if not ok:
                raise DistilleryError(f"settings.{f.name} must be {need}, got {v}.")


def defaults(method: str, s: Settings, shape: tuple[int, ...]) -> Settings:
    """``s`` with the method's iterations and image rate filled in and the DSA strategy resolved
    for data of ``shape`` (C, H, W)."""
    its = {"dc": 200, "dsa": 200, "dm": 1000, "mtt": 300}
    lr = {"dc": 0.1, "dsa": 0.1, "dm": 1.0, "mtt": 100.0}
    if s.iterations is None and method in its:
        s.iterations = its[method]
    if s.lr_img is None and method in lr:
        s.lr_img = lr[method]
    s.strategy = check_strategy(s.strategy, shape)
    return s


def check_ipc(images: Images, ipc: int) -> None:
    counts = torch.bincount(images.y, minlength=images.num_classes)
    if isinstance(ipc, bool) or int(ipc) != ipc or ipc < 1:
        raise DistilleryError(f"ipc must be a positive integer, got {ipc!r}.")
    if ipc > int(counts.min()):
        c = int(counts.argmin())
        raise DistilleryError(f"ipc {ipc} is larger than the smallest class ({c}: {int(counts.min())} images); "
                              f"choose ipc <= {int(counts.min())}.")


def _seed(seed: int, it: int) -> int:
    return seed * 1_000_003 + it


def real_init(images: Images, ipc: int, seed: int) -> Tensor:
    """Positions of ``ipc`` random real images per class (class order), drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([idx[torch.randperm(len(idx), generator=g)[:ipc]] for idx in images.class_indices()])


# ------------------------------------------------------------------------------------ coresets


def fit_real(arch: str, images: Images, net_seed: int, order_seed: int, epochs: int, width: int = 32) -> nn.Module:
    """A network trained on the whole real training set through the engine (``engine.fit``, cross-entropy):
    ``epochs`` of Adam, lr 1e-3, batch 128, initialised from ``net_seed``, batches ordered from
    ``order_seed``; returned in eval mode, on the device of ``images.x``."""
    net = nets.build(arch, images.shape, images.num_classes, width, seed=net_seed)
    cfg = TrainConfig(epochs=epochs, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant",
                      device=str(images.x.device), log_every=QUIET)
    return fit_plain(net, images.x, images.y, images.num_classes, cfg, order_seed)


def feature_net(images: Images, seed: int, epochs: int = 10, width: int = 32) -> nn.Module:
    """The feature space of herding and k-center: a ConvNet trained on the whole training set
    (``fit_real``), its penultimate features (``embed``)."""
    return fit_real("convnet", images, seed, seed, epochs, width)


def herding(features: Tensor, k: int) -> list[int]:
    """Welling's herding (as in iCaRL / DeepCore): greedily pick the sample that brings the mean of
    the chosen set closest to the class mean."""
    mu = features.mean(0)
    chosen: list[int] = []
    total = torch.zeros_like(mu)
    for i in range(k):
        cand = (mu.unsqueeze(0) - (total.unsqueeze(0) + features) / (i + 1)).norm(dim=1)
        if chosen:
            cand[chosen] = math.inf
        j = int(cand.argmin())
        chosen.append(j)
        total += features[j]
    return chosen


def kcenter(features: Tensor, k: int) -> list[int]:
    """Greedy k-center (Sener & Savarese 2018): start at the sample nearest the class mean, then
    repeatedly add the sample farthest from the chosen set."""
    first = int((features - features.mean(0)).norm(dim=1).argmin())
    chosen = [first]
    dist = (features - features[first]).norm(dim=1)
    dist[first] = -1.0
    while len(chosen) < k:
        j = int(dist.argmax())
        chosen.append(j)
        dist = torch.minimum(dist, (features - features[j]).norm(dim=1))
        dist[chosen] = -1.0  # never twice, even among duplicate images
    return chosen


def coreset(images: Images, method: str, ipc: int, seed: int) -> Tensor:
    if method == "random":
        return real_init(images, ipc, seed)
    net = feature_net(images, seed)
    with torch.no_grad():
        feats = net.embed(images.x)
    pick = herding if method == "herding" else kcenter
    return torch.cat([idx[torch.tensor(pick(feats[idx], ipc))] for idx in images.class_indices()])


# ------------------------------------------------------------------------------------ learned sets


class State:
    """The learned tensors of a condensation and their optimisers; checkpointable."""

    def __init__(self, x: Tensor, s: Settings, label_logits: Tensor | None = None):
        self.x = x.clone().requires_grad_(True)
        self.opt = torch.optim.SGD([self.x], lr=s.lr_img, momentum=0.5)
        self.syn_lr = torch.tensor(s.lr_teacher).requires_grad_(True)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=s.lr_lr, momentum=0.5)
        self.labels = None if label_logits is None else label_logits.clone().requires_grad_(True)
        self.opt_y = None if self.labels is None else torch.optim.SGD([self.labels], lr=s.lr_y, momentum=0.9)
        self.it = 0

    def _opts(self) -> dict[str, torch.optim.Optimizer]:
        return {k: v for k, v in (("x", self.opt), ("lr", self.opt_lr), ("y", self.opt_y)) if v is not None}

    def save(self, path: Path, run: dict) -> None:
        """One atomic safetensors file: the tensors, the iteration and ``run`` (what was condensed
        with which settings) in its metadata."""
        tensors = {"x": self.x.detach(), "syn_lr": self.syn_lr.detach().reshape(1)}
        if self.labels is not None:
            tensors["labels"] = self.labels.detach()
        for name, opt in self._opts().items():
            for i, st in opt.state_dict()["state"].items():
                if "momentum_buffer" in st and st["momentum_buffer"] is not None:
                    tensors[f"momentum/{name}/{i}"] = st["momentum_buffer"].reshape(-1).clone()
        meta = {"iteration": str(self.it), "run": json.dumps(run, sort_keys=True, default=str)}
        atomic_save_safetensors(path, tensors, meta)

    def load(self, path: Path, run: dict) -> None:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        if meta.get("run") != json.dumps(run, sort_keys=True, default=str):
            raise DistilleryError(f"checkpoint {path} was written by another condensation (data, method, ipc, seed or "
                                  "settings differ); use a new output folder, or delete it to start again.")
        with torch.no_grad():
            self.x.copy_(t["x"])
            self.syn_lr.copy_(t["syn_lr"][0])
            if self.labels is not None:
                self.labels.copy_(t["labels"])
        for name, opt in self._opts().items():
            sd = opt.state_dict()
            params = [self.x] if name == "x" else [self.syn_lr] if name == "lr" else [self.labels]
            for i, p in enumerate(params):
                key = f"momentum/{name}/{i}"
                if key in t:
                    sd["state"][i] = {"momentum_buffer": t[key].reshape(p.shape).clone()}
            opt.load_state_dict(sd)
        self.it = int(meta["iteration"])


def _with_flip(x: Tensor, y: Tensor, flip: bool) -> tuple[Tensor, Tensor]:
    return (torch.cat([x, x.flip(3)]), torch.cat([y, y])) if flip else (x, y)


def _class_batch(images: Images, idx: Tensor, n: int, g: torch.Generator) -> Tensor:
    return images.x[idx[torch.randperm(len(idx), generator=g)[:n]]]


def _augment(x: Tensor, seed: int, s: Settings, on: bool) -> Tensor:
    return dsa(x, seed, s.strategy) if on else x


def dm_step(state: State, images: Images, ipc: int, s: Settings, seed: int, classes: list[Tensor]) -> float:
    """One DM iteration: a fresh ConvNet's embedding, per class the squared distance of mean
    embeddings of an augmented real batch and the synthetic images (same DSA seed)."""
    it_seed = _seed(seed, state.it)
    g = torch.Generator().manual_seed(it_seed)
    net = nets.build("convnet", images.shape, images.num_classes, s.width, seed=it_seed).requires_grad_(False)
    loss = state.x.new_zeros(())
    for c, idx in enumerate(classes):
        aug_seed = int(torch.randint(2**31 - 1, (1,), generator=g))
        real = _augment(_class_batch(images, idx, s.batch_real, g), aug_seed, s, True)
        syn, _ = _with_flip(state.x[c * ipc:(c + 1) * ipc], torch.zeros(ipc), s.flip)
        syn = _augment(syn, aug_seed, s, True)
        loss = loss + mean_embedding_distance(net.embed(real).detach(), net.embed(syn))
    state.opt.zero_grad()
    loss.backward()
    state.opt.step()
    return float(loss.detach())


def dc_step(state: State, images: Images, ipc: int, s: Settings, seed: int, classes: list[Tensor], siamese: bool) -> float:
    """One DC (``siamese=False``) or DSA iteration: a fresh ConvNet; ``outer`` times: per class,
    match the gradients of the CE loss on a real batch and on the synthetic images, update the
    images; between outer steps, train the net ``inner`` epochs on the synthetic set (DC's
    (outer, inner) = (1, 1) at IPC 1, (10, 50) at IPC 10, (50, 10) at IPC 50)."""
    outer, inner = (1, 1) if ipc == 1 else (10, 50) if ipc <= 10 else (50, 10)
    it_seed = _seed(seed, state.it)
    g = torch.Generator().manual_seed(it_seed)
    net = nets.build("convnet", images.shape, images.num_classes, s.width, seed=it_seed)
    params = [p for p in net.parameters()]
    opt_net = torch.optim.SGD(params, lr=s.lr_net)
    total = 0.0
    y_all = torch.arange(images.num_classes).repeat_interleave(ipc)
    for ol in range(outer):
        loss = state.x.new_zeros(())
        for c, idx in enumerate(classes):
            aug_seed = int(torch.randint(2**31 - 1, (1,), generator=g))
            real = _augment(_class_batch(images, idx, s.batch_real, g), aug_seed, s, siamese)
            syn, y_syn = _with_flip(state.x[c * ipc:(c + 1) * ipc], torch.full((ipc,), c), s.flip)
            syn = _augment(syn, aug_seed, s, siamese)
            g_real = torch.autograd.grad(F.cross_entropy(net(real), torch.full((len(real),), c)), params)
            g_syn = torch.autograd.grad(F.cross_entropy(net(syn), y_syn), params, create_graph=True)
            loss = loss + gradient_distance(g_syn, [t.detach() for t in g_real])
        state.opt.zero_grad()
        loss.backward()
        state.opt.step()
        total += float(loss.detach())
        if ol == outer - 1:
            break
        x_train, y_train = _with_flip(state.x.detach(), y_all, s.flip)
        for _ in range(inner):
            for b in torch.randperm(len(y_train), generator=g).split(256):
                xb = _augment(x_train[b], int(torch.randint(2**31 - 1, (1,), generator=g)), s, siamese)
                opt_net.zero_grad()
                F.cross_entropy(net(xb), y_train[b]).backward()
                opt_net.step()
    return total / outer


# ------------------------------------------------------------------------------------ MTT


def flat_params(net: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def functional(net: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """``f(x, flat)``: the network's output with its parameters taken from one flat vector."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]

    def f(x: Tensor, flat: Tensor) -> Tensor:
        parts = flat.split(sizes)
        return torch.func.functional_call(net, {n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}, (x,))

    return f


def _sam_step(net: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable[[], Tensor], rho: float) -> None:
    """SAM (Foret et al. 2021): the gradient at w + rho g / ||g||, applied at w."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt.zero_grad()
    loss_fn().backward()
    grads = [p.grad.detach().clone() for p in params]
    norm = torch.sqrt(sum((g * g).sum() for g in grads)).clamp_min(1e-12)
    eps = [rho * g / norm for g in grads]
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    opt.zero_grad()
    loss_fn().backward()
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.sub_(e)
    opt.step()


def train_experts(images: Images, s: Settings, folder: Path, seed: int = 0) -> list[Path]:
    """``s.experts`` expert trajectories: ConvNets trained on the real set with SGD (lr
    ``lr_teacher``, no momentum, no weight decay, batch 256, DSA augmentation; MTT's
    ``buffer.py``), the flat parameters saved at the start and after each of ``train_epochs``
    epochs as ``expert_K.safetensors``. Written one expert at a time, atomically: an interrupted
    run keeps the finished experts and trains only the missing ones."""
    folder.mkdir(parents=True, exist_ok=True)
    strategy = check_strategy(s.strategy, images.shape)
    spec = {"data": images.fingerprint(), "seed": seed, "width": s.width, "lr_teacher": s.lr_teacher,
            "train_epochs": s.train_epochs, "sam": s.sam, "sam_rho": s.sam_rho, "strategy": list(strategy)}
    meta = folder / "experts.json"
    if meta.is_file() and read_json(meta, "experts description") != spec:
        raise DistilleryError(f"the experts in {folder} were trained with other settings ({meta}); use a new "
                              "output folder, or delete the experts to train them again.")
    atomic_write_json(meta, spec)
    paths = []
    for k in range(s.experts):
        path = folder / f"expert_{k}.safetensors"
        paths.append(path)
        if path.is_file():
            continue
        e_seed = _seed(seed + 7919 * (k + 1), 0)
        net = nets.build("convnet", images.shape, images.num_classes, s.width, seed=e_seed)
        opt = torch.optim.SGD(net.parameters(), lr=s.lr_teacher, momentum=0.0, weight_decay=0.0)
        g = torch.Generator().manual_seed(e_seed)
        traj = {"epoch_0": flat_params(net)}
        for e in range(s.train_epochs):
            for b in torch.randperm(len(images.y), generator=g).split(256):
                xb = dsa(images.x[b], int(torch.randint(2**31 - 1, (1,), generator=g)), strategy)
                yb = images.y[b]
                if s.sam:
                    _sam_step(net, opt, lambda xb=xb, yb=yb, net=net: F.cross_entropy(net(xb), yb), s.sam_rho)
                else:
                    opt.zero_grad()
                    F.cross_entropy(net(xb), yb).backward()
                    opt.step()
            traj[f"epoch_{e + 1}"] = flat_params(net)
        atomic_save_safetensors(path, traj)
    return paths


def load_expert(path: Path, epochs: int) -> list[Tensor]:
    from safetensors.torch import load_file

    t = load_file(str(path))
    if f"epoch_{epochs}" not in t:
        raise DistilleryError(f"expert {path} stops before epoch {epochs}; train the experts again with "
                              "train_epochs >= max_start_epoch + expert_epochs (or delete the folder).")
    return [t[f"epoch_{e}"] for e in range(epochs + 1)]


def mtt_step(state: State, images: Images, ipc: int, s: Settings, seed: int, experts: list[list[Tensor]],
             f: Callable[[Tensor, Tensor], Tensor]) -> float:
    """One MTT iteration: a random expert and start epoch t <= max_start_epoch; ``syn_steps`` SGD
    steps of a student from theta*_t on the synthetic set with the learnable step size; loss
    ``trajectory_loss`` against theta*_{t+M}; images, step size (and soft labels) updated."""
    g = torch.Generator().manual_seed(_seed(seed, state.it))
    traj = experts[int(torch.randint(len(experts), (1,), generator=g))]
    start = int(torch.randint(s.max_start_epoch + 1, (1,), generator=g))
    theta0, target = traj[start], traj[start + s.expert_epochs]
    y_hard = torch.arange(images.num_classes).repeat_interleave(ipc)
    x, _ = _with_flip(state.x, y_hard, s.flip)
    targets = F.softmax(state.labels, dim=1) if state.labels is not None else y_hard
    if s.flip:
        targets = torch.cat([targets, targets])
    theta = theta0.clone().requires_grad_(True)
    for _ in range(s.syn_steps):
        xb = dsa(x, int(torch.randint(2**31 - 1, (1,), generator=g)), s.strategy)
        ce = F.cross_entropy(f(xb, theta), targets)
        grad = torch.autograd.grad(ce, theta, create_graph=True)[0]
        theta = theta - state.syn_lr * grad
    loss = trajectory_loss(theta, theta0, target)
    for opt in state._opts().values():
        opt.zero_grad()
    loss.backward()
    for opt in state._opts().values():
        opt.step()
    with torch.no_grad():
        state.syn_lr.clamp_(min=1e-6)  # a step size must stay positive
    return float(loss.detach())


# ------------------------------------------------------------------------------------ driver


def learn(images: Images, method: str, ipc: int, s: Settings, seed: int, folder: Path | None,
          log: Callable[[int, float], None] | None = None) -> tuple[Tensor, Tensor | None, float]:
    """Run a learned method; returns (images, soft labels or None, final learnable step size)."""
    if method not in LEARNED:
        raise unknown("condensation method", method, METHODS)
    s = defaults(method, dataclasses.replace(s), images.shape)  # what the checkpoint names is what runs
    init = images.x[real_init(images, ipc, seed)]
    classes = images.class_indices()
    label_logits = None
    experts: list[list[Tensor]] = []
    f = None
    if method == "mtt":
        if s.max_start_epoch + s.expert_epochs > s.train_epochs:
            raise DistilleryError(f"mtt: max_start_epoch {s.max_start_epoch} + expert_epochs {s.expert_epochs} exceeds "
                                  f"the experts' train_epochs {s.train_epochs}.")
        if folder is not None:
            experts = [load_expert(p, s.train_epochs) for p in train_experts(images, s, folder / "experts", seed)]
        else:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="distillery-experts-") as tmp:
                experts = [load_expert(p, s.train_epochs) for p in train_experts(images, s, Path(tmp), seed)]
        f = functional(nets.build("convnet", images.shape, images.num_classes, s.width, seed=0))
        if s.learn_labels:  # DATM: the logits of an expert (at max_start_epoch) on the initial images
            with torch.no_grad():
                label_logits = f(init, experts[0][s.max_start_epoch]).detach()
    elif s.learn_labels:
        raise DistilleryError("learned soft labels (DATM) come with mtt; for other methods use soft_labels=committee.")
    state = State(init, s, label_logits)
    fixed = {k: v for k, v in dataclasses.asdict(s).items() if k not in ("iterations", "checkpoint_every")}
    run = {"data": images.fingerprint(), "method": method, "ipc": ipc, "seed": seed, "settings": fixed}  # more
    # iterations may be asked for later: a resumed run continues; anything else is another condensation
    ckpt = None if folder is None else folder / "checkpoint.safetensors"
    if ckpt is not None and ckpt.is_file():
        state.load(ckpt, run)
    while state.it < s.iterations:
        if method == "dm":
            loss = dm_step(state, images, ipc, s, seed, classes)
        elif method in ("dc", "dsa"):
            loss = dc_step(state, images, ipc, s, seed, classes, siamese=method == "dsa")
        else:
            loss = mtt_step(state, images, ipc, s, seed, experts, f)
        if not math.isfinite(loss):
            raise DistilleryError(f"{method}: the matching loss became {loss} at iteration {state.it + 1}; "
                                  "lower lr_img.")
        state.it += 1
        if log is not None:
            log(state.it, loss)
        if ckpt is not None and (state.it % s.checkpoint_every == 0 or state.it == s.iterations):
            state.save(ckpt, run)
    soft = None if state.labels is None else F.softmax(state.labels.detach(), dim=1)
    return state.x.detach().clone(), soft, float(state.syn_lr.detach())

