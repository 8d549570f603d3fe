"""The evaluation protocol (DC's): fresh networks trained only on the synthetic set, tested on
the real test set; N sets x M networks, mean and std.

Training: SGD, lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, the rate x 0.1 at half the
epochs, DSA augmentation on every batch (the data's default strategy; DC evaluates DSA and DM
sets so; we apply it to every method, one protocol for all). ``epochs`` is 500 here (DC: 1,000) to fit 2 cores. Soft labels
train with soft cross-entropy -sum_c y_c log p_c.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import nets
from .augment import check_strategy, dsa
from .data import Images


def train_net(x: Tensor, y: Tensor, images: Images, arch: str = "convnet", seed: int = 0, epochs: int = 500,
              lr: float = 0.01, batch: int = 256, augment: bool = True, strategy: tuple[str, ...] | None = None,
              width: int = 32) -> nn.Module:
    strategy = check_strategy(strategy, images.shape)
    net = nets.build(arch, images.shape, images.num_classes, width, seed=seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [epochs // 2], 0.1)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        for b in torch.randperm(len(x), generator=g).split(batch):
            xb = dsa(x[b], int(torch.randint(2**31 - 1, (1,), generator=g)), strategy) if augment else x[b]
            out = net(xb)
            loss = -(y[b] * F.log_softmax(out, 1)).sum(1).mean() if y.dim() == 2 else F.cross_entropy(out, y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return net.eval()


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
