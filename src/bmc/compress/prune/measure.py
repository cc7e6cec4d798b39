"""How large a model is without running it on data: its multiply-accumulates and parameters, and a
copy that holds every shape and no weights (the meta device), so a pruning search can try a cut
without copying the weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


def count_macs_and_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass on `example`, and the parameter count."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of model whose parameters and buffers live on the meta device: every shape, no data."""
    memo: dict[int, torch.Tensor] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)
