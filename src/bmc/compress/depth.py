"""Depth pruning: which residual blocks a model can lose whole, and which to drop first.

A block computing x + branch(x) (then perhaps ReLU) with the shortcut itself can go and leave the
model running with every shape unchanged (bmc.models.blocks records it). The blocks are ranked by
what losing each costs per millisecond it saves: the shift of the model's predictions when that
block alone is dropped, divided by its kernels' time on the target.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from bmc.compress.measure import count_macs_and_params, meta_skeleton
from bmc.models.blocks import DroppedBlock, drop_blocks, replace_module

log = logging.getLogger("bmc")


@dataclass(frozen=True)
class BlockRank:
    """One residual block as depth pruning weighs it: what dropping it alone does to the model's
    predictions (mean KL divergence from the full model's), against what it saves."""

    name: str
    kind: str
    prediction_shift: float
    macs: int
    time_ms: float | None  # its kernels' time on the target; None where not measured

    @property
    def cost(self) -> float:
        saved = self.time_ms if self.time_ms is not None else self.macs
        return self.prediction_shift / saved if saved > 0 else math.inf

    def to_dict(self) -> dict:
        return {"block": self.name, "prediction_shift_kl": round(self.prediction_shift, 4), "macs": self.macs,
                "time_ms": None if self.time_ms is None else round(self.time_ms, 4)}


def rank_blocks(
    model: nn.Module, example: torch.Tensor, blocks: list[tuple[str, str]], ranking_inputs: torch.Tensor | None,
    block_time_ms: Callable[[nn.Module, list[str]], dict[str, float]] | None,
) -> list[BlockRank]:
    """The droppable blocks, cheapest to lose first: the least prediction shift per millisecond
    saved on the target (per MAC without timings).

    Per MAC alone, resnet20's blocks all cost the same (4.7 M MACs each) and the KL order dropped
    two of stage 3's; per measured time, a stage-1 block (1.36 ms at batch 32 against 0.85) goes
    instead of stage 3's second: 86.29% against 85.26% after the same 15 epochs, 1.94x against
    1.76x faster in fp32 at batch 32 (benchmarks/depth_block_order.py).
    """
    inputs = ranking_inputs if ranking_inputs is not None else torch.randn(32, *example.shape[1:], generator=torch.Generator().manual_seed(0))
    importance = _block_importance(model, blocks, inputs)
    times = block_time_ms(model, [name for name, _ in blocks]) if block_time_ms is not None else {}
    if times and min(times.get(name, 0.0) for name, _ in blocks) <= 0:
        # A block the profile cannot place (a scope the exporter named otherwise) would look free
        # to drop: rank them all by MACs instead of mixing the two measures.
        log.info("depth pruning: no kernel time found for some blocks; ranking them by MACs")
        times = {}
    shape_only = example.to("meta")
    macs_full = count_macs_and_params(meta_skeleton(model), shape_only)[0]
    ranking = []
    for name, kind in blocks:
        without = drop_blocks(meta_skeleton(model), [(name, kind)])
        saved = macs_full - count_macs_and_params(without, shape_only)[0]
        ranking.append(BlockRank(name, kind, importance[(name, kind)], saved, times.get(name)))
    return sorted(ranking, key=lambda block: block.cost)


def drop_least_important_blocks(model, example, macs_fraction, macs_before, ranking: list[BlockRank]) -> nn.Module | None:
    """A copy of model without the cheapest residual blocks of `ranking`, as many as keep the MACs
    removed within the target (channels inside the remaining blocks make up the rest); None without any.

    Whole blocks take their operators with them: on a CPU, where a narrow convolution costs its
    per-call overhead whatever its width, resnet20 without 4 of its 9 blocks (46% of MACs) runs
    1.9x faster in fp32 and 3.3x in int8 at batch 32, against 1.4x and 1.8x for 53% of MACs taken
    from channels (benchmarks/prune_allocation.py).
    """
    shape_only = example.to("meta")
    chosen: list[tuple[str, str]] = []
    for block in ranking:
        trial = drop_blocks(meta_skeleton(model), [*chosen, (block.name, block.kind)])
        if 1 - count_macs_and_params(trial, shape_only)[0] / macs_before > macs_fraction:
            break
        chosen.append((block.name, block.kind))
    return drop_blocks(copy.deepcopy(model), chosen) if chosen else None


def _block_importance(model: nn.Module, blocks: list[tuple[str, str]], inputs: torch.Tensor) -> dict[tuple[str, str], float]:
    """How far the model's predictions move when each block alone is dropped: the mean KL divergence
    from the full model's softmax on `inputs` (no labels needed)."""
    scores = {}
    with torch.no_grad():
        reference = torch.log_softmax(model(inputs), dim=1)
        for name, kind in blocks:
            original = replace_module(model, name, DroppedBlock(kind))
            try:
                moved = torch.log_softmax(model(inputs), dim=1)
            finally:
                replace_module(model, name, original)
            scores[(name, kind)] = float(F.kl_div(moved, reference, log_target=True, reduction="batchmean"))
    return scores


# The ways a traced graph writes "add" and "relu".
_ADDS = {operator.add, operator.iadd, torch.add}
_RELUS = {F.relu, torch.relu}


def residual_blocks(model: nn.Module) -> list[tuple[str, str]]:
    """The blocks a model can lose whole: (name, "relu" or "identity") for each submodule computing
    x + branch(x), optionally followed by ReLU, with the shortcut x itself (no projection).

    Dropping such a block (bmc.models.blocks) leaves what its addition would have started from, so
    the model still runs with every shape unchanged: one block fewer instead of every layer a little
    narrower. Found by
    tracing each submodule, so it holds for bmc's CIFAR ResNets, torchvision's ResNets, MobileNet V2,
    EfficientNet and ConvNeXt alike; a submodule that does not trace is not a candidate.
    """
    found = []
    for name, module in model.named_modules():
        if name and any(isinstance(m, nn.Conv2d) for m in module.modules()):
            kind = _skip_kind(module)
            if kind is not None:
                found.append((name, kind))
    return found


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
