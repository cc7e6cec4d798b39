"""Magnitude pruning: the smallest weights set to zero. Not structured pruning: no layer shrinks,
dense kernels do not skip zeros, so the model is smaller once compressed and no faster."""

from __future__ import annotations

import copy

import torch
from torch import nn


def prune_magnitude(model: nn.Module, fraction: float) -> tuple[nn.Module, float]:
    """A copy with the smallest-magnitude fraction of conv and linear weights set to zero (global
    ranking), and the fraction of those weights zeroed; the zeros stay through fine-tuning."""
    pruned = copy.deepcopy(model)
    weights = [m.weight for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    magnitudes = torch.cat([w.detach().abs().flatten() for w in weights])
    if fraction <= 0 or not len(magnitudes):
        return pruned, 0.0
    threshold = torch.kthvalue(magnitudes, max(1, int(fraction * len(magnitudes)))).values
    zeroed = 0
    with torch.no_grad():
        for module in pruned.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                mask = module.weight.abs() <= threshold
                module.weight[mask] = 0
                zeroed += int(mask.sum())
                module.register_forward_pre_hook(_KeepZeros(~mask))
    return pruned, zeroed / len(magnitudes)


class _KeepZeros:
    """A forward pre-hook that zeroes the pruned weights again before every forward: without it,
    fine-tuning revives them (a digits CNN kept 16% zeros of the 50% pruned). The checkpoint is
    written after the epoch's evaluation, a forward, so it holds the zeros; module hooks, unlike a
    tensor's gradient hooks, survive the copy that training makes of its initial model."""

    def __init__(self, keep: torch.Tensor) -> None:
        self.keep = keep

    def __call__(self, module: nn.Module, args) -> None:
        if self.keep.device != module.weight.device:
            self.keep = self.keep.to(module.weight.device)
        with torch.no_grad():
            module.weight.mul_(self.keep)
