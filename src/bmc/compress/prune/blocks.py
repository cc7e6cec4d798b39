"""Residual blocks a model can lose whole, found by tracing, and the cheapest of them dropped.

A block computing x + branch(x) (then perhaps ReLU) with the shortcut itself can go and leave the
model running with every shape unchanged (bmc.models.blocks records it): one block fewer instead
of every layer a little narrower.
"""

from __future__ import annotations

import copy
import operator
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from bmc.compress.prune.measure import count_macs_and_params, trial_copy, trial_device
from bmc.models.blocks import drop_blocks

if TYPE_CHECKING:
    from bmc.compress.prune.outcome import BlockRank

# The ways a traced graph writes "add" and "relu".
_ADDS = {operator.add, operator.iadd, torch.add}
_RELUS = {F.relu, torch.relu}


def residual_blocks(model: nn.Module) -> list[tuple[str, str]]:
    """The blocks a model can lose whole: (name, "relu" or "identity") for each submodule computing
    x + branch(x), optionally followed by ReLU, with the shortcut x itself (no projection).

    Found by tracing each submodule, so it holds for bmc's CIFAR ResNets, torchvision's ResNets,
    MobileNet V2, EfficientNet and ConvNeXt alike; a submodule that does not trace is not a candidate.
    """
    found = []
    for name, module in model.named_modules():
        if name and any(isinstance(m, nn.Conv2d) for m in module.modules()):
            kind = _skip_kind(module)
            if kind is not None:
                found.append((name, kind))
    return found


def drop_cheapest_blocks(model: nn.Module, example: torch.Tensor, macs_fraction: float, macs_before: int,
                         ranking: list[BlockRank]) -> nn.Module | None:
    """A copy of model without the first blocks of `ranking`, as many as keep the MACs removed
    within the target (channels inside the remaining blocks make up the rest); None without any.

    Whole blocks take their operators with them: on a CPU, where a narrow convolution costs its
    per-call overhead whatever its width, dropping blocks buys more time per MAC than cutting
    channels (docs/experiments.md, 4.5).
    """
    trial_example = example.to(trial_device(model))
    chosen: list[tuple[str, str]] = []
    for block in ranking:
        trial = drop_blocks(trial_copy(model), [*chosen, (block.name, block.kind)])
        if 1 - count_macs_and_params(trial, trial_example)[0] / macs_before > macs_fraction:
            break
        chosen.append((block.name, block.kind))
    return drop_blocks(copy.deepcopy(model), chosen) if chosen else None


def _skip_kind(module: nn.Module) -> str | None:
    from torch.fx import symbolic_trace

    try:
        graph = symbolic_trace(module).graph
    except Exception:  # noqa: BLE001 - any untraceable block is simply not a candidate
        return None
    inputs = [node for node in graph.nodes if node.op == "placeholder"]
    result = next(node for node in graph.nodes if node.op == "output").args[0]
    if len(inputs) != 1 or not isinstance(result, torch.fx.Node):
        return None
    submodules = dict(module.named_modules())
    kind = "identity"
    if (
        (result.op == "call_function" and result.target in _RELUS)
        or (result.op == "call_method" and result.target == "relu")
        or (result.op == "call_module" and isinstance(submodules.get(result.target), nn.ReLU))
    ):
        kind, result = "relu", result.args[0]
    is_add = (result.op == "call_function" and result.target in _ADDS) or (result.op == "call_method" and result.target in ("add", "add_"))
    return kind if is_add and inputs[0] in result.args[:2] else None
