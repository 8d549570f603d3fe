"""Data sets that order themselves: labelled and unlabelled samples at a fixed share per batch, and
a mixture of named domains whose sampling weights follow where the student lags (DDK).

Both are ``TensorData`` (the samples of all parts, labels -100 where a part has none) with an
``order(seed, epoch)`` method that the engine uses instead of a plain permutation. The order is a
function of (seed, epoch) and, for the mixture, of the weights, which live in a small module the
engine checkpoints (``modules={"domains": mixture.weights}``), so a resumed run draws the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import DistilleryError
from .core import TensorData


def _join(parts: list[TensorData], name: str) -> TensorData:
    ids = torch.cat([p.ids for p in parts])
    if len(torch.unique(ids)) != len(ids):
        raise DistilleryError(f"{name}: sample ids repeat across the parts; give each part its own id range "
                              "(e.g. offset the transfer set's ids past the labelled ones).")
    shapes = {p.input_shape for p in parts}
    if len(shapes) != 1:
        raise DistilleryError(f"{name}: the parts have different input shapes {sorted(shapes)}.")
    ys = [p.y if p.y is not None else torch.full((len(p),), -100, dtype=torch.long) for p in parts]
    return TensorData(torch.cat([p.x for p in parts]), torch.cat(ys), ids, parts[0].num_classes, name)


def _cycle(perm_of, n: int, count: int, start: int) -> Tensor:
    """``count`` positions from an endless sequence of fresh permutations of range(n)."""
    out, i, have = [torch.zeros(0, dtype=torch.long)], start, 0
    while have < count:
        out.append(perm_of(i))
        have += n
        i += 1
    return torch.cat(out)[:count]


class LabelledShare(TensorData):
    """Labelled and unlabelled samples, every batch of ``batch_size`` holding round(share * batch_size)
    labelled ones (cycled when the labelled set is the smaller). An epoch is one pass over the
    unlabelled samples (the last batch keeps the share on the remainder), or over the labelled ones
    at share 1. Use the same ``batch_size`` in the training settings."""

    def __init__(self, labelled: TensorData, unlabelled: TensorData, share: float, batch_size: int):
        if not 0 <= share <= 1:
            raise DistilleryError(f"labelled share must lie in [0, 1], got {share}.")
        if labelled.y is None or len(labelled) == 0:
            raise DistilleryError(f"{labelled.name}: the labelled part has no labels or no samples.")
        joined = _join([labelled, unlabelled.unlabelled()], f"{labelled.name}+{unlabelled.name}")
        super().__init__(joined.x, joined.y, joined.ids, joined.num_classes, joined.name)
        self.n_lab, self.n_unl = len(labelled), len(unlabelled)
        self.share, self.batch_size = float(share), int(batch_size)
        self.per_batch = round(self.share * self.batch_size)
        if self.per_batch == 0 and share > 0:
            raise DistilleryError(f"share {share} of a batch of {batch_size} is no labelled sample; raise one of them.")
        u = self.batch_size - self.per_batch  # unlabelled samples in a full batch
        if u == 0 or self.n_unl == 0:
            self.counts = [(min(self.batch_size, self.n_lab - i), 0) for i in range(0, self.n_lab, self.batch_size)]
        else:  # full batches, then a last one holding the unlabelled remainder at the same share
            full, rest = divmod(self.n_unl, u)
            self.counts = [(self.per_batch, u)] * full + ([(round(self.per_batch * rest / u), rest)] if rest else [])
        self.length = sum(a + b for a, b in self.counts)

    def __len__(self) -> int:
        return self.length

    def order(self, seed: int, epoch: int) -> Tensor:
        g = lambda k: torch.Generator().manual_seed(seed * 100_003 + epoch * 1_009 + k)  # noqa: E731
        n_l, n_u = sum(a for a, _ in self.counts), sum(b for _, b in self.counts)
        lab = _cycle(lambda i: torch.randperm(self.n_lab, generator=g(2 * i)), self.n_lab, n_l, 0)
        unl = _cycle(lambda i: torch.randperm(self.n_unl, generator=g(2 * i + 1)) + self.n_lab, self.n_unl, n_u, 0)
        out, a, b = [torch.zeros(0, dtype=torch.long)], 0, 0
        for nl, nu in self.counts:
            out += [lab[a:a + nl], unl[b:b + nu]]
            a, b = a + nl, b + nu
        return torch.cat(out)


class DomainWeights(nn.Module):
    """The sampling weights r (one per domain) of a ``DomainMixture``, a buffer so checkpoints keep it."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.names = list(names)
        self.register_buffer("r", torch.full((len(names),), 1.0 / len(names), dtype=torch.float64))


class DomainMixture(TensorData):
    """Named domains sampled by weight: an epoch draws ``length`` samples, domain d with probability
    r_d, within a domain cycling through fresh permutations. ``weights`` (``DomainWeights``) is what
    ``ddk_update`` moves."""

    def __init__(self, domains: dict[str, TensorData], length: int | None = None):
        if not domains:
            raise DistilleryError("a domain mixture needs at least one domain.")
        names = list(domains)
        joined = _join([domains[k] for k in names], "+".join(names))
        super().__init__(joined.x, joined.y, joined.ids, joined.num_classes, joined.name)
        self.names = names
        self.sizes = [len(domains[k]) for k in names]
        if min(self.sizes) < 1:
            raise DistilleryError(f"domains {[k for k, n in zip(names, self.sizes) if n < 1]} are empty.")
        self.starts = [sum(self.sizes[:i]) for i in range(len(names))]
        self.length = int(length or sum(self.sizes))
        self.weights = DomainWeights(names)

    def __len__(self) -> int:
        return self.length

    def order(self, seed: int, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch * 1_009)
        which = torch.multinomial(self.weights.r.float(), self.length, replacement=True, generator=g)
        out = torch.empty(self.length, dtype=torch.long)
        for d, (start, n) in enumerate(zip(self.starts, self.sizes)):
            pos = (which == d).nonzero().squeeze(1)
            def perm(i: int, d: int = d, n: int = n) -> Tensor:
                return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch * 1_009
                                                                                 + 7 * (i + 1) + d))

            out[pos] = _cycle(perm, n, len(pos), 0) + start
        return out


def domain_losses(model: nn.Module, domains: dict[str, TensorData], batch_size: int = 1024) -> Tensor:
    """Mean cross-entropy of ``model`` on each domain's labelled (validation) set, (D,)."""
    from ..engine import predict

    out = []
    for k, d in domains.items():
        if d.y is None:
            raise DistilleryError(f"domain {k!r}: the validation set has no labels.")
        out.append(float(nn.functional.cross_entropy(predict(model, d, batch_size), d.y)))
    return torch.tensor(out, dtype=torch.float64)


@torch.no_grad()
def ddk_update(weights: DomainWeights, student_losses: Tensor, teacher_losses: Tensor, alpha: float = 0.5,
               initial: bool = False) -> Tensor:
    """DDK's factor-smoothed domain sampling (Liu et al., "DDK: Distilling Domain Knowledge for
    Efficient Large Language Models", NeurIPS 2024, Eq. 1-2), with perplexities l = exp(CE) on each
    domain's validation set:
        initial:  r_0[i] = softmax_i(l_S[i] / l_T[i])
        update:   psi[i] = r_t[i] * exp(l_S[i] / l_T[i]);  r_{t+1}[i] = alpha * psi[i] / sum(psi) + (1 - alpha) / N
    Domains where the student's perplexity is furthest above the teacher's get sampled more; the
    uniform share keeps every domain in the mix. The paper's default alpha is 0.5. Returns r."""
    if not 0 <= alpha <= 1:
        raise DistilleryError(f"alpha must lie in [0, 1], got {alpha}.")
    ratio = torch.exp(student_losses.double()) / torch.exp(teacher_losses.double())
    if initial:
        r = torch.softmax(ratio, 0)
    else:
        log_psi = torch.log(weights.r) + ratio
        r = alpha * torch.softmax(log_psi, 0) + (1 - alpha) / len(ratio)
    weights.r.copy_(r)
    return r
