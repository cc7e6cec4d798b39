"""How large a model is without running it on data: its multiply-accumulates and parameters, and a
copy to try a cut on: for a large model one that holds every shape and no weights (the meta
device), so a pruning search need not copy the weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


def count_macs_and_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass on `example`, and the parameter count."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


# Above this many bytes of weights a cut is tried on a meta copy: seed-cnn224 (1.6 GB) spent 12
# minutes in deep copies during the ratio search. Below it a plain copy is much faster, since meta
# kernels run in Python (docs/experiments.md, 4.17).
META_ABOVE_BYTES = 64 << 20


def trial_device(model: nn.Module) -> torch.device:
    """Where trial_copy puts a copy of this model: the meta device for a large model, else its own."""
    parameters = list(model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in parameters)
    if weight_bytes > META_ABOVE_BYTES or not parameters:
        return torch.device("meta")
    return parameters[0].device


def trial_copy(model: nn.Module) -> nn.Module:
    """A copy of model to try a cut on and count (on trial_device(model)); the model is untouched."""
    return meta_skeleton(model) if trial_device(model).type == "meta" else copy.deepcopy(model)


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of model whose parameters and buffers live on the meta device: every shape, no data."""
    memo: dict[int, torch.Tensor] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)
