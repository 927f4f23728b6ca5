"""Task-vector merge operators, as PEFT 0.21's peft/utils/merge_utils.py computes them, with the random masks of
DARE drawn from an explicit `torch.Generator` instead of torch's global one.

Every op takes `task_tensors` (a list of same-shape tensors, one per adapter) and `weights` ([n] float32) and
returns one tensor of that shape. Worked example, ties with density 0.5 and weights [1, 1] over
    t0 = [ 4, -1]   t1 = [-3, -2]
  prune to the top half by |value|:   [4, 0], [-3, 0]
  elect the sign by total mass:       4 + -3 = 1 >= 0 -> +
  keep values of that sign, average:  [4, 0] / max(1, count) -> [4, 0]
"""
from __future__ import annotations

import torch


def _weighted(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """stacked [n, ...] * weights [n] broadcast over the rest."""
    return task_tensors * weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) largest |values|, zero the rest."""
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    top_k = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
    mask[top_k[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool,
                   generator: torch.Generator) -> torch.Tensor:
    """Keep each value with probability `density` (Bernoulli mask drawn from `generator`); / density if rescale."""
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density), generator=generator)
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def prune(tensor: torch.Tensor, density: float, method: str, rescale: bool = False,
          generator: torch.Generator | None = None) -> torch.Tensor:
    if density >= 1:                   # PEFT: no pruning, and no random numbers drawn
        return tensor
    if density < 0:
        raise ValueError(f"density must be >= 0, got {density}")
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    return random_pruning(tensor, density, rescale, generator)


def majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """[n, ...] bool: where each adapter's sign agrees with the elected one ("total": sign of the sum;
    "frequency": the more frequent sign; ties go to +)."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def task_arithmetic(task_tensors, weights):
    return _weighted(torch.stack(task_tensors, dim=0), weights).sum(dim=0)


def magnitude_prune(task_tensors, weights, density):
    pruned = [prune(t, density, "magnitude") for t in task_tensors]
    return _weighted(torch.stack(pruned, dim=0), weights).sum(dim=0)


def ties(task_tensors, weights, density, method):
    stacked = torch.stack([prune(t, density, "magnitude") for t in task_tensors], dim=0)
    mask = majority_sign_mask(stacked, method)
    return disjoint_merge(_weighted(stacked, weights), mask)


def dare_linear(task_tensors, weights, density, generator):
    pruned = [prune(t, density, "random", rescale=True, generator=generator) for t in task_tensors]
    return _weighted(torch.stack(pruned, dim=0), weights).sum(dim=0)


def dare_ties(task_tensors, weights, density, method, generator):
    stacked = torch.stack([prune(t, density, "random", rescale=True, generator=generator) for t in task_tensors],
                          dim=0)
    mask = majority_sign_mask(stacked, method)
    return disjoint_merge(_weighted(stacked, weights), mask)


def combine(kind: str, task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None,
            majority_sign_method: str, generator: torch.Generator) -> torch.Tensor:
    """`kind`: linear (task arithmetic), ties, dare_linear, dare_ties or magnitude_prune."""
    if kind == "linear":
        return task_arithmetic(task_tensors, weights)
    if kind == "ties":
        return ties(task_tensors, weights, density, majority_sign_method)
    if kind == "dare_linear":
        return dare_linear(task_tensors, weights, density, generator)
    if kind == "dare_ties":
        return dare_ties(task_tensors, weights, density, majority_sign_method, generator)
    if kind == "magnitude_prune":
        return magnitude_prune(task_tensors, weights, density)
    raise ValueError(f"unknown combination {kind!r}")
