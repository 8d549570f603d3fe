"""The evaluation protocol (DC's): fresh networks trained only on the synthetic set, tested on
the real test set; N sets x M networks, mean and std.

Training runs on the shared engine (``engine.fit``): SGD, lr 0.01, momentum 0.9, weight decay 5e-4,
batch 256, the rate x 0.1 at half the epochs, DSA augmentation on every batch (the data's default
strategy; DC evaluates DSA and DM sets so; we apply it to every method, one protocol for all).
``epochs`` is 500 here (DC: 1,000) to fit 2 cores. Soft labels train with soft cross-entropy
-sum_c y_c log p_c.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import engine
from ..config import TrainConfig
from ..data.core import TensorData
from ..objective import Objective, Term
from . import nets
from .augment import check_strategy, dsa
from .data import Images

QUIET = 1 << 30
"""``log_every`` of the engine runs here: no per-step records (each epoch still ends with one)."""


class BatchDSA:
    """The engine's step hook (``task.prepare``): one DSA transform per batch, its seed a function of
    (seed, epoch, the batch's sample ids), so that a run is reproducible whatever else draws random numbers."""

    def __init__(self, strategy: tuple[str, ...], seed: int):
        self.strategy, self.seed = strategy, int(seed)

    def prepare(self, batch: dict[str, Tensor], *, epoch: int) -> dict[str, Tensor]:
        key = hashlib.sha256(f"{self.seed}:{epoch}:{batch['id'].tolist()}".encode()).digest()
        return {**batch, "x": dsa(batch["x"], int.from_bytes(key[:4], "little") >> 1, self.strategy)}


def fit_plain(net: nn.Module, x: Tensor, y: Tensor, num_classes: int, cfg: TrainConfig, seed: int,
              task: BatchDSA | None = None) -> nn.Module:
    """``net`` trained on (x, y) by ``engine.fit`` with cross-entropy (soft cross-entropy when ``y`` is
    (N, C)), on the device of ``x``, batches ordered from ``seed``; no checkpoints, no records. Eval mode."""
    term = Term("ce", teacher=None)  # hard labels (N,) or soft labels (N, C) alike
    data = TensorData(x, y, torch.arange(len(x)), num_classes, "condense")
    engine.fit(net, Objective([term]), data, cfg, seed=seed, run_dir=None, progress=False, task=task,
               phase="train")
    return net.eval()


def train_net(x: Tensor, y: Tensor, images: Images, arch: str = "convnet", seed: int = 0, epochs: int = 500,
              lr: float = 0.01, batch: int = 256, augment: bool = True, strategy: tuple[str, ...] | None = None,
              width: int = 32) -> nn.Module:
    """A fresh ``arch`` (initialised from ``seed``) trained on (x, y) through the engine with DC's
    protocol (module docstring): hard labels (N,) or soft labels (N, C); batch order and DSA draws from
    ``seed`` (the same seed gives the same weights). Returned in eval mode, on the device of ``x``."""
    strategy = check_strategy(strategy, images.shape)
    net = nets.build(arch, images.shape, images.num_classes, width, seed=seed)
    # The engine's step schedule multiplies the rate by gamma every step_epochs (per optimiser step, so
    # by epoch as MultiStepLR([epochs // 2])); an odd epoch count's last epoch gets a second drop (x 0.01).
    cfg = TrainConfig(epochs=epochs, batch_size=batch, optimizer="sgd", lr=lr, momentum=0.9, weight_decay=5e-4,
                      schedule="step", step_epochs=max(1, epochs // 2), gamma=0.1, device=str(x.device),
                      log_every=QUIET)
    return fit_plain(net, x, y, images.num_classes, cfg, seed, BatchDSA(strategy, seed) if augment else None)


@torch.no_grad()
def accuracy(net: nn.Module, x: Tensor, y: Tensor) -> float:
    return float(torch.cat([net(x[i:i + 1024]).argmax(1) for i in range(0, len(x), 1024)]).eq(y).float().mean())


def evaluate(sets: Sequence[tuple[Tensor, Tensor]], images: Images, arch: str = "convnet", nets_per_set: int = 5,
             seed: int = 0, **train) -> dict:
    """Accuracy (%) on the real test set of ``nets_per_set`` networks trained on each set."""
    accs = []
    for i, (x, y) in enumerate(sets):
        for j in range(nets_per_set):
            net = train_net(x, y, images, arch, seed=seed + 1000 * i + j, **train)
            accs.append(100.0 * accuracy(net, images.x_test, images.y_test))
    return {"arch": arch, "accuracies": accs, "mean": statistics.fmean(accs),
            "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0, "sets": len(sets), "nets_per_set": nets_per_set}
