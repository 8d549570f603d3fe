"""The matching objectives of dataset distillation, as small pure functions over tensors.

- ``gradient_distance`` (DC, Zhao, Mopuri & Bilen, ICLR 2021, ``match_loss`` with
  ``dis_metric='ours'``): for each parameter's gradient pair, conv weights (O, I, kh, kw) and
  linear weights (O, I) are compared output unit by output unit, 1 - cos over each row (norms
  plus 1e-6 in the denominator, as the code); one-dimensional parameters (biases, norm scales)
  are skipped, as the code does. Sum over units and layers.
- ``mean_embedding_distance`` (DM, Zhao & Bilen, WACV 2023): ||mean_i f(real_i) - mean_j f(syn_j)||^2.
- ``trajectory_loss`` (MTT, Cazenavette et al., CVPR 2022): ||theta_N - theta*_{t+M}||^2 /
  ||theta*_t - theta*_{t+M}||^2 over flat parameter vectors (both terms divided by the number of
  parameters in the code, which cancels).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..errors import DistilleryError


def gradient_distance(syn: Sequence[Tensor], real: Sequence[Tensor]) -> Tensor:
    """Layer-wise sum of (1 - cos) between matching rows of synthetic and real gradients."""
    if len(syn) != len(real):
        raise DistilleryError(f"gradient_distance: {len(syn)} synthetic and {len(real)} real gradients.")
    total = syn[0].new_zeros(())
    for gs, gr in zip(syn, real):
        if gs.shape != gr.shape:
            raise DistilleryError(f"gradient_distance: shapes {tuple(gs.shape)} and {tuple(gr.shape)} differ.")
        if gs.dim() == 1:
            continue  # biases and norm parameters: DC skips them ('return 0')
        a, b = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
        total = total + (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-6)).sum()
    return total


def mean_embedding_distance(real: Tensor, syn: Tensor) -> Tensor:
    """(N, D), (M, D) -> scalar: the squared distance of the two means."""
    if real.dim() != 2 or syn.dim() != 2 or real.shape[1] != syn.shape[1]:
        raise DistilleryError(f"mean_embedding_distance takes (N, D) and (M, D), got {tuple(real.shape)} "
                              f"and {tuple(syn.shape)}.")
    return (real.mean(0) - syn.mean(0)).pow(2).sum()


def trajectory_loss(student_end: Tensor, expert_start: Tensor, expert_end: Tensor) -> Tensor:
    """Normalised parameter matching; all three are flat vectors of one network's parameters."""
    if not (student_end.shape == expert_start.shape == expert_end.shape) or student_end.dim() != 1:
        raise DistilleryError("trajectory_loss takes three flat parameter vectors of the same length.")
    return (student_end - expert_end).pow(2).sum() / (expert_start - expert_end).pow(2).sum().clamp_min(1e-12)
