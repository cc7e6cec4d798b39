"""What a channel or a residual block is worth: the rankings pruning removes the cheapest of.

Channels: their L1 norm (Torch-Pruning's MagnitudeImportance), and for a size target the
parameters one channel of a group holds. Blocks: how far dropping each alone moves the model's
predictions (mean KL divergence from the full model's softmax) per millisecond its kernels take
on the target, or per MAC where nothing was timed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from bmc.compress.prune.measure import count_macs_and_params, trial_copy, trial_device
from bmc.compress.prune.outcome import BlockRank
from bmc.models.blocks import DroppedBlock, drop_blocks, replace_module

if TYPE_CHECKING:
    from bmc.compress.prune.latency import Probe

log = logging.getLogger("bmc")


def l1_importance():
    """Torch-Pruning's L1 norm of each channel's weights across its group: what channel pruning ranks by."""
    import torch_pruning as tp

    return tp.importance.MagnitudeImportance(p=1)


def params_per_channel(group) -> int:
    """The parameters one channel of a Torch-Pruning group holds: a filter of each layer producing
    it, the matching input slice of each layer reading it, a scale and shift of each normalization."""
    held = 0
    for dep, _ in group:
        layer, handler = dep.target.module, getattr(dep.handler, "__name__", "")
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and "out_channels" in handler:
            held += layer.weight[0].numel() + (layer.bias is not None)
        elif isinstance(layer, (nn.Conv2d, nn.Linear)) and "in_channels" in handler:
            held += layer.weight[:, 0].numel() if getattr(layer, "groups", 1) == 1 else 0
        elif isinstance(layer, (nn.BatchNorm2d, nn.LayerNorm)) and layer.weight is not None:
            held += 2
    return held


class BlockImportance(Protocol):
    """Ranks the droppable residual blocks, the first to drop first."""

    def rank(self, model: nn.Module, example: torch.Tensor, blocks: list[tuple[str, str]], probe: Probe | None) -> list[BlockRank]: ...


@dataclass(frozen=True)
class KLPerMillisecond:
    """The least prediction shift per millisecond saved on the target first (per MAC without a
    probe), the shift measured on `inputs` (real training inputs; 32 random ones when None).

    Per MAC, resnet20's blocks all cost the same, but a narrow block at high resolution takes more
    time than a wide one at low resolution; ranked by measured time, resnet20 kept a point more
    accuracy after the same fine-tuning, and ran faster (docs/experiments.md, 4.6).
    """

    inputs: torch.Tensor | None = None

    def rank(self, model: nn.Module, example: torch.Tensor, blocks: list[tuple[str, str]], probe: Probe | None) -> list[BlockRank]:
        inputs = self.inputs if self.inputs is not None else torch.randn(32, *example.shape[1:], generator=torch.Generator().manual_seed(0))
        shift = prediction_shift_kl(model, blocks, inputs)
        times = probe.scope_times_ms(model, [name for name, _ in blocks]) if probe is not None else {}
        if times and min(times.get(name, 0.0) for name, _ in blocks) <= 0:
            # A block the profile cannot place (a scope the exporter named otherwise) would look free
            # to drop: rank them all by MACs instead of mixing the two measures.
            log.info("depth pruning: no kernel time found for some blocks; ranking them by MACs")
            times = {}
        trial_example = example.to(trial_device(model))
        macs_full = count_macs_and_params(model, example)[0]
        ranking = []
        for name, kind in blocks:
            without = drop_blocks(trial_copy(model), [(name, kind)])
            saved = macs_full - count_macs_and_params(without, trial_example)[0]
            ranking.append(BlockRank(name, kind, shift[name], saved, times.get(name)))
        return sorted(ranking, key=lambda block: block.cost)


def prediction_shift_kl(model: nn.Module, blocks: list[tuple[str, str]], inputs: torch.Tensor) -> dict[str, float]:
    """How far the model's predictions move when each block alone is dropped: the mean KL divergence
    from the full model's softmax on `inputs` (no labels needed), by block name."""
    scores = {}
    with torch.no_grad():
        reference = torch.log_softmax(model(inputs), dim=1)
        for name, kind in blocks:
            original = replace_module(model, name, DroppedBlock(kind))
            try:
                moved = torch.log_softmax(model(inputs), dim=1)
            finally:
                replace_module(model, name, original)
            scores[name] = float(F.kl_div(moved, reference, log_target=True, reduction="batchmean"))
    return scores
