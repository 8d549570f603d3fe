"""Dataset distillation: condense a training set into a few synthetic images per class (IPC).

    from distillery import condense
    images = condense.load("digits")
    syn = condense.condense(images, "dm", ipc=10)
    condense.evaluate([(syn.x, syn.y)], images)["mean"]

Methods: coresets ``random``, ``herding``, ``kcenter``; learned ``dc``, ``dsa``, ``dm``, ``mtt``
(FTD's flat experts with ``sam=True``); ``flip`` (FYI) for any learned method; soft labels
``learned`` (DATM, with mtt) or ``committee`` (CV-DD style, any method).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import DistilleryError, unknown
from .data import NAMES as DATA
from .data import Images, load
from .evaluate import evaluate, train_net
from .methods import CORESETS, LEARNED, METHODS, Settings, check_ipc, coreset, defaults, fit_real, learn
from .synthetic import SyntheticSet

SOFT = (None, "learned", "committee")

__all__ = ["DATA", "METHODS", "Images", "Settings", "SyntheticSet", "committee_labels", "condense", "evaluate",
           "grid_png", "load", "train_net"]


def committee_labels(x: torch.Tensor, images: Images, seed: int = 0, archs=("convnet", "convnet_bn", "mlp"),
                     epochs: int = 15, temperature: float = 1.0) -> torch.Tensor:
    """Soft labels from a committee of teachers trained on the real set (one per architecture,
    ``epochs`` of Adam lr 1e-3, batch 128): the mean of their softmax(logits / T) on ``x``. CV-DD
    (Cui et al. 2025) averages several teachers' predictions on the synthetic data; we take the
    committee's mean once, after condensation."""
    probs = []
    for k, arch in enumerate(archs):
        net = fit_real(arch, images, seed + 31 * (k + 1), seed + k, epochs)
        with torch.no_grad():
            probs.append(F.softmax(net(x) / temperature, dim=1))
    return torch.stack(probs).mean(0)


def condense(images: Images | str, method: str, ipc: int, *, flip: bool = False, soft_labels: str | None = None,
             settings: Settings | None = None, seed: int = 0, run_dir: str | Path | None = None,
             log=None) -> SyntheticSet:
    """A synthetic set of ``ipc`` images per class. With ``run_dir`` the condensation checkpoints
    there (and MTT keeps its expert trajectories there) and resumes when run again."""
    if isinstance(images, str):
        images = load(images)
    if method not in METHODS:
        raise unknown("condensation method", method, METHODS)
    if soft_labels not in SOFT:
        raise DistilleryError(f"soft_labels must be none, learned or committee, got {soft_labels!r}.")
    if images.y is None or images.y.numel() == 0:
        raise DistilleryError("dataset distillation needs a labelled training set.")
    check_ipc(images, ipc)
    s = defaults(method, dataclasses.replace(settings or Settings(), flip=flip,
                                             learn_labels=soft_labels == "learned"), images.shape)
    if flip and method in CORESETS:
        raise DistilleryError(f"flip enters the matching of learned methods ({', '.join(LEARNED)}); "
                              f"{method} selects real images and has none.")
    folder = Path(run_dir) if run_dir is not None else None
    t0 = time.perf_counter()
    syn_lr = None
    soft = None
    if method in CORESETS:
        x = images.x[coreset(images, method, ipc, seed)].clone()
    else:
        x, soft, syn_lr = learn(images, method, ipc, s, seed, folder, log)
    y = torch.arange(images.num_classes).repeat_interleave(ipc)
    if soft_labels == "committee":
        soft = committee_labels(x, images, seed)
    seconds = time.perf_counter() - t0
    meta = {"method": method, "ipc": ipc, "flip": flip, "soft_labels": soft_labels, "seed": seed,
            "data": images.name, "source_fingerprint": images.fingerprint(), "mean": images.mean, "std": images.std,
            "settings": dataclasses.asdict(s) if method in LEARNED else {}, "seconds": seconds,
            **({"syn_lr": syn_lr} if method == "mtt" else {})}
    return SyntheticSet(x, soft if soft is not None else y, images.num_classes, meta)


def grid_png(syn: SyntheticSet, path: str | Path, images: Images | None = None) -> Path:
    """The synthetic images as a grid (one row per class; 1-D signals as curves), written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..report.plots import save_png

    y = syn.hard_labels
    k = syn.num_classes
    per = max(int((y == c).sum()) for c in range(k))
    fig, axes = plt.subplots(k, per, figsize=(per * 0.6 + 0.4, k * 0.6 + 0.4), squeeze=False)
    lim = (float(syn.x.min()), float(syn.x.max()))  # signals share one amplitude scale
    for c in range(k):
        imgs = syn.x[y == c]
        for j in range(per):
            ax = axes[c][j]
            ax.axis("off")
            if j < len(imgs) and imgs.shape[2] == 1:  # a 1-D signal: its curve
                ax.plot(imgs[j, 0, 0].numpy(), linewidth=0.8)
                ax.set_ylim(*lim)
            elif j < len(imgs):
                ax.imshow(imgs[j, 0].numpy(), cmap="gray")
    fig.suptitle(f"{syn.meta.get('data', '')} ipc {syn.meta.get('ipc', '')} {syn.meta.get('method', '')}", fontsize=8)
    out = save_png(fig, path, dpi=80)
    plt.close(fig)
    return out
