"""Which channels go at one channel ratio: Torch-Pruning's groups, ranked by importance, rounded.

Channel counts are rounded to multiples of 8: free counts (16 -> 11) made the pruned resnet20
slower than the dense one in onnxruntime, while multiples of 8 made it 1.9x faster. Nothing here
changes the model; graph.apply_cuts does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from bmc.compress.prune.graph import (
    TORCH_PRUNING_ERRORS,
    ChannelCut,
    example_inputs,
    has_grouped_convolution,
    joins_residual_stream,
    keeps_part_shapes,
    part_inputs,
    pruning_fn_name,
    rebuildable,
    torch_pruning_quiet,
    traceable_parts,
)
from bmc.compress.prune.importance import l1_importance, params_per_channel
from bmc.compress.prune.strategies import Cut
from bmc.errors import BmcError

ROUND_CHANNELS_TO = 8
# Layers at least this wide round their kept channels to the nearest multiple, narrower ones down.
WIDE_LAYER_CHANNELS = 64
# Layers narrower than this are kept whole by the cut that keeps narrow layers.
NARROW_CHANNELS = 32


@dataclass(frozen=True)
class ChannelRequest:
    """One planning step: remove `ratio` of each group's channels by `cut`, kept counts rounded to
    multiples of round_to (None: free counts); by_params weighs each group by the parameters one
    of its channels holds (a size target)."""

    ratio: float
    round_to: int | None
    cut: Cut
    by_params: bool = False


@dataclass(frozen=True)
class ChannelPlan:
    cuts: list[ChannelCut]
    left_dense: list[str]  # layers no channel may leave: the classifier, and groups a cut cannot follow


@dataclass
class PlanCache:
    """What stays the same between the ratio search's steps on one model: each group's channel
    order (scoring reads all the group's weights: a wide classifier's, and as much again in
    temporaries) and, planned by parts, the parts, their inputs and which groups keep a part's shapes."""

    channel_order: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    part_inputs: dict[str, tuple] | None = None
    parts: list[str] | None = None
    keeps_shapes: dict[tuple[str, str, str], bool] = field(default_factory=dict)


@dataclass(frozen=True)
class _Model:
    """The model being planned and what every graph of it shares."""

    names: dict  # module -> its qualified name
    ignored: list  # modules never pruned
    importance: object


def plan_channels(model: nn.Module, example: torch.Tensor, request: ChannelRequest, cache: PlanCache | None = None) -> ChannelPlan | None:
    """Which channels go at request.ratio, ranked by L1 norm on the model's weights; the model is
    untouched. None for a cut that keeps residual streams on a model without any (it is uniform's)."""
    cache = PlanCache() if cache is None else cache
    # The classifier's outputs are the classes: never pruned.
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    ignored = linears[-1:]
    if request.cut.keep_narrow_layers:
        ignored += [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels < NARROW_CHANNELS]
    context = _Model({module: name for name, module in model.named_modules()}, ignored, l1_importance())
    if not request.cut.by_parts:
        cuts, joined, fixed = _plan_graph("", model, (example,), context, request, cache)
        if request.cut.keep_residual_channels and not joined:
            return None
        return ChannelPlan(cuts, [context.names[m] for m in ignored] + fixed)
    if cache.part_inputs is None:  # one forward pass per search, not per step
        cache.part_inputs = part_inputs(model, example)
        cache.parts = traceable_parts(model, cache.part_inputs)
    cuts = []
    for part in cache.parts:
        found, _, _ = _plan_graph(part, model.get_submodule(part), cache.part_inputs[part], context, request, cache)
        cuts += [cut for cut in found if _keeps_part_shapes(model, cut, cache)]
    # Outside every part nothing is pruned; inside, each part's inputs and outputs keep their width.
    outside = [name for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and not any(name.startswith(f"{part}.") for part in cache.parts)]
    return ChannelPlan(cuts, outside)


def _keeps_part_shapes(model: nn.Module, cut: ChannelCut, cache: PlanCache) -> bool:
    key = (cut.scope, *cut.group_key)
    if key not in cache.keeps_shapes:
        cache.keeps_shapes[key] = keeps_part_shapes(model, cache.part_inputs, cut)
    return cache.keeps_shapes[key]


def _plan_graph(scope: str, module: nn.Module, inputs: tuple, context: _Model, request: ChannelRequest,
                cache: PlanCache) -> tuple[list[ChannelCut], int, list[str]]:
    """The cuts of one dependency graph (the whole model, or one part of it), how many groups
    joined residual streams (skipped where the cut keeps them), and the layers left dense because
    their group cuts a layer a pruned checkpoint cannot be rebuilt with. by_params: where the cut
    keeps the residual streams, each group loses the ratio scaled by the parameters one of its
    channels holds against the most any group's channel holds."""
    import torch_pruning as tp

    cut, round_to = request.cut, request.round_to
    try:
        with torch_pruning_quiet():
            pruner = tp.pruner.MetaPruner(
                module,
                example_inputs(inputs),
                importance=context.importance,
                pruning_ratio=request.ratio,
                ignored_layers=[m for m in context.ignored if any(m is sub for sub in module.modules())],
                # Torch-Pruning rounds kept channels down and skips a group that would round to none,
                # which made MACs fall and rise again with the ratio once the residual streams are
                # kept; that cut rounds to the nearest multiple itself. Elsewhere layers of
                # WIDE_LAYER_CHANNELS or more round to the nearest multiple too, narrower ones down:
                # nearest rounding halves a narrow layer, rounding down overshoots the target on wide
                # ones (docs/experiments.md, 4.16).
                round_to=None if cut.keep_residual_channels else round_to,
                global_pruning=cut.global_ranking,
            )
            cuts, joined, fixed = [], 0, []
            # interactive: the pruner only proposes; nothing is removed from the model here.
            groups = list(pruner.step(interactive=True))
            weights = {}
            if request.by_params and cut.keep_residual_channels:
                held = {id(group): params_per_channel(group) for group in groups if not joins_residual_stream(group)}
                most = max(held.values(), default=0)
                weights = {key: count / most for key, count in held.items()} if most else {}
            for group in groups:
                if cut.keep_residual_channels and joins_residual_stream(group):
                    joined += 1
                    continue
                if not rebuildable(group):
                    fixed.append(context.names.get(group[0].dep.target.module, "?"))
                    continue
                indices = list(group[0].idxs)
                channels = pruner.DG.get_out_channels(group[0].dep.target.module)
                if weights and round_to:
                    kept = channels * (1 - request.ratio * weights[id(group)])
                    indices = _rounded_selection(pruner.DG, group, context, round_to, cache, kept=kept)
                elif cut.keep_residual_channels and round_to:
                    indices = _rounded_selection(pruner.DG, group, context, round_to, cache)
                elif round_to and not cut.global_ranking and channels >= WIDE_LAYER_CHANNELS and not has_grouped_convolution(group):
                    # Torch-Pruning's selection was rounded down: rounded again from what it kept before that.
                    indices = _rounded_selection(pruner.DG, group, context, round_to, cache, kept=int(channels * (1 - request.ratio)))
                if indices:
                    root = group[0].dep.target.module
                    cuts.append(ChannelCut(scope, context.names[root], group[0].dep.handler, tuple(indices)))
    except TORCH_PRUNING_ERRORS as exc:
        raise BmcError(f"structured pruning failed on this architecture: {type(exc).__name__}: {exc}") from None
    return cuts, joined, fixed


def _rounded_selection(graph, group, context: _Model, round_to: int, cache: PlanCache, kept: float | None = None) -> list[int]:
    """The group's lowest-importance channels, as many as leave the kept count (default: what the
    group's own selection keeps) at the nearest multiple of round_to."""
    root, pruning_fn = group[0].dep.target.module, group[0].dep.handler
    channels = graph.get_out_channels(root)
    if channels <= round_to:
        return list(group[0].idxs)
    kept = channels - len(group[0].idxs) if kept is None else kept
    keep = max(round_to, int(kept / round_to + 0.5) * round_to)
    if keep >= channels:
        return []
    key = (context.names[root], pruning_fn_name(pruning_fn))
    if key not in cache.channel_order:
        cache.channel_order[key] = torch.argsort(context.importance(graph.get_pruning_group(root, pruning_fn, list(range(channels)))))
    return sorted(cache.channel_order[key][: channels - keep].tolist())
