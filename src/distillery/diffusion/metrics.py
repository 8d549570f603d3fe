"""Sample quality of a generator against its data.

- ``swd``: sliced Wasserstein-1 distance, the mean over random unit directions of the 1-D W1 between
  the projected sample sets (equal counts, sorted).
- ``energy``: the energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo), V-statistics.
- ``loglik``: the mean exact log-likelihood of samples under a mixture (``mixture.log_prob``).
- ``coverage``: the share of a mixture's components that receive at least 10% of their expected
  share of samples, counting a sample for its most likely component when it lies within that
  component's typical radius (squared distance in stds below D + 3 sqrt(2 D), the chi-square mean
  plus three deviations).
- ``fid``: the Frechet distance between Gaussians fitted to a small classifier's penultimate features
  of samples and of data (``DigitsFeatures``: an MLP trained on the digits here, seeded), as FID does
  with Inception features; ``classifier`` adds that classifier's accuracy on class-conditional samples
  and its mean confidence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mixture import GaussianMixture


def swd(x: Tensor, y: Tensor, projections: int = 256, seed: int = 0) -> float:
    x, y = x.flatten(1).double(), y.flatten(1).double()
    n = min(len(x), len(y))
    g = torch.Generator().manual_seed(seed)
    x, y = x[torch.randperm(len(x), generator=g)[:n]], y[torch.randperm(len(y), generator=g)[:n]]
    d = F.normalize(torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64), dim=0)
    px, _ = (x @ d).sort(0)
    py, _ = (y @ d).sort(0)
    return float((px - py).abs().mean())


def energy(x: Tensor, y: Tensor, max_n: int = 2000, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    x = x.flatten(1).double()[torch.randperm(len(x), generator=g)[:max_n]]
    y = y.flatten(1).double()[torch.randperm(len(y), generator=g)[:max_n]]
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def coverage(mixture: GaussianMixture, x: Tensor, min_share: float = 0.1) -> float:
    k, dist = mixture.component(x)
    d = mixture.dim
    inside = dist ** 2 <= d + 3 * math.sqrt(2 * d)
    counts = torch.bincount(k[inside], minlength=mixture.num_components).float()
    return float((counts >= min_share * len(x) * mixture.weights).float().mean())


def loglik(mixture: GaussianMixture, x: Tensor) -> float:
    return float(mixture.log_prob(x.flatten(1)).mean())


def frechet(f1: Tensor, f2: Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in float64 with symmetric eigensolvers."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    ev, vec = torch.linalg.eigh(s1)
    root1 = vec @ torch.diag(ev.clamp(min=0).sqrt()) @ vec.T
    cross = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * cross)


class DigitsFeatures(nn.Module):
    """An MLP classifier of 8x8 digits in [-1, 1]; ``features`` is its 64-wide penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def train_features(x: Tensor, y: Tensor, seed: int = 0, steps: int = 1500) -> DigitsFeatures:
    """The FID classifier, trained on (x, y) with Adam and light Gaussian noise (so features of imperfect
    samples stay informative); a plain seeded loop, a measuring tool rather than a distillation."""
    torch.manual_seed(seed)
    net = DigitsFeatures()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        xb = x[idx] + 0.1 * torch.randn(x[idx].shape, generator=g)
        loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def fid(net: DigitsFeatures, samples: Tensor, data: Tensor) -> float:
    return frechet(net.features(samples.float()), net.features(data.float()))


@torch.no_grad()
def classifier(net: DigitsFeatures, samples: Tensor, labels: Tensor | None) -> dict[str, float]:
    probs = net(samples.float()).softmax(-1)
    out = {"confidence": float(probs.max(-1).values.mean())}
    if labels is not None:
        out["class_accuracy"] = float((probs.argmax(-1) == labels).float().mean())
    return out
