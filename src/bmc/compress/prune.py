"""Structured pruning: remove whole channels so the layers physically shrink, following dependencies.

Torch-Pruning (the DepGraph paper's library) builds the dependency graph: which layers must shrink
together through residual additions, concatenations, depthwise convolutions and the linear layer
after a flatten. bmc adds the driver: RATIO is the fraction of multiply-accumulates removed, as the
pruning literature counts it, found by searching the channel ratio; channel counts are rounded to
multiples of 8, because free counts (16 -> 11) made the pruned resnet20 slower than the dense one
in onnxruntime while multiples of 8 made it 1.9x faster (the issue's measurements).
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from bmc.compress.depth import drop_least_important_blocks, rank_blocks, residual_blocks
from bmc.compress.measure import count_macs_and_params, meta_skeleton
from bmc.errors import BmcError
from bmc.models.blocks import dropped_blocks

log = logging.getLogger("bmc")

ROUND_CHANNELS_TO = 8
# Layers at least this wide round their kept channels to the nearest multiple, narrower ones down.
WIDE_LAYER_CHANNELS = 64
SEARCH_STEPS = 8


@dataclass
class PruneStats:
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    channel_ratio: float
    left_dense: list[str]
    channels_rounded_to: int
    strategy: str = "uniform"
    candidate_latency_ms: dict = field(default_factory=dict)
    blocks_dropped: list[str] = field(default_factory=list)
    droppable_blocks: int = 0  # residual blocks the model could lose whole (--prune-strategy depth)
    strategies_failed: dict = field(default_factory=dict)  # strategy -> why Torch-Pruning could not cut it
    block_ranking: list[dict] = field(default_factory=list)  # each droppable block's cost and time, in drop order

    @property
    def macs_removed(self) -> float:
        return 1 - self.macs_after / self.macs_before if self.macs_before else 0.0

    def to_dict(self) -> dict:
        return {
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_removed": round(self.macs_removed, 4),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_removed": round(1 - self.params_after / self.params_before, 4) if self.params_before else 0.0,
            "channel_ratio": round(self.channel_ratio, 4),
            "left_dense": self.left_dense,
            "channels_rounded_to": self.channels_rounded_to,
            "strategy": self.strategy,
            "candidate_latency_ms": self.candidate_latency_ms,
            "blocks_dropped": self.blocks_dropped,
            "droppable_blocks": self.droppable_blocks,
            "strategies_failed": self.strategies_failed,
            "block_ranking": self.block_ranking,
        }


@dataclass(frozen=True)
class Strategy:
    """Which channels may go: every layer by the same ratio, only the channels inside residual blocks
    (the streams that additions join keep their width), the narrow layers kept, or a global ranking;
    drop_blocks removes the least important residual blocks whole before any channel goes."""

    name: str
    keep_narrow_layers: bool = False
    keep_residual_channels: bool = False
    global_ranking: bool = False
    drop_blocks: bool = False
    by_parts: bool = False  # one graph per traceable part, where the model's own graph cannot be built


# Narrow convolutions are dominated by per-operator overhead on a CPU, not by arithmetic: removing
# their channels takes MACs without taking time (resnet20's 16-channel stage, measured).
NARROW_CHANNELS = 32
UNIFORM = Strategy("uniform")
BLOCK_INTERNAL = Strategy("block-internal channels only", keep_residual_channels=True)
DEPTH = Strategy("residual blocks dropped, then block-internal channels", keep_residual_channels=True, drop_blocks=True)
# --prune-strategy NAME -> the strategy preferred where it is a candidate (else the next in STRATEGIES).
PARTS = Strategy("channels inside the parts Torch-Pruning can follow; their inputs, outputs and all else dense", by_parts=True)
PREFERRED = {"depth": DEPTH, "block-internal": BLOCK_INTERNAL, "uniform": UNIFORM}
STRATEGIES = (
    # Where no residual block can go, depth falls back to this: the streams that additions join keep
    # their width. resnet20, 53% of MACs removed, 5 distilled epochs: 84.67% like uniform pruning
    # (55%), and 1.43x instead of 1.21x in fp32 at batch 32, 2.02x instead of 1.70x in int8
    # (benchmarks/prune_allocation.py).
    BLOCK_INTERNAL,
    # The default: resnet20, 50% of MACs, 15 distilled epochs: 86.29% against block-internal's
    # 85.70%, 1.90x against 1.35x in fp32 and 3.52x against 1.95x in int8 at batch 32 (BENCHMARKS.md).
    DEPTH,
    UNIFORM,
    Strategy("uniform, narrow layers kept", keep_narrow_layers=True),
    Strategy("global ranking", global_ranking=True),
    # Only where every strategy above failed on the model's graph: shufflenet_v2's channel shuffle
    # breaks Torch-Pruning's graph of the whole model, not of each block; inside each block the
    # channels that do not reach its outputs can go, and everything else stays dense.
    PARTS,
)


def prune_structured(
    model: nn.Module,
    example: torch.Tensor,
    macs_fraction: float,
    latency_ms: Callable[[nn.Module], dict[int, float]] | None = None,
    choose: str = "depth",
    ranking_inputs: torch.Tensor | None = None,
    block_time_ms: Callable[[nn.Module, list[str]], dict[str, float]] | None = None,
    params_fraction: float = 0.0,
) -> tuple[nn.Module, PruneStats]:
    """A copy of model with about macs_fraction of its MACs removed by L1-ranked channels; the original is untouched.

    params_fraction > 0 also asks for that fraction of the parameters removed (size, where MACs are
    speed): the channel search then goes on until both are met, and the strategies that keep the
    residual streams cut each group in proportion to the parameters one of its channels holds
    (`_params_per_channel`), so the layers that hold the model's size shrink most.

    Each strategy that reaches the MACs target is a candidate, timed with `latency_ms` (the model's
    latency per batch size on the target) when given. choose="depth" first drops the residual
    blocks whose absence changes the outputs on `ranking_inputs` least (real training inputs; random
    ones when not given) for the time each saves (`block_time_ms`: each block's time on the target;
    MACs when not given), then goes on as block-internal; choose="block-internal" keeps the residual
    streams whole where the model has them (else uniform), choose="uniform" cuts every layer by the same ratio (the gentlest elsewhere:
    on resnet20 -1.9 points after 5 fine-tuning epochs against -7.7 for the fastest),
    choose="fastest" the fastest as measured. Channel counts are multiples of 8 where that can
    reach the target; layers too narrow for it (the documents' 6- and 16-channel CNN) fall back to
    free channel counts.
    """
    model = model.eval()
    macs_before, params_before = count_macs_and_params(model, example)
    blocks = residual_blocks(model)
    # Ranking blocks costs forward passes: only when depth may be chosen.
    ranking = rank_blocks(model, example, blocks, ranking_inputs, block_time_ms) if blocks and choose in ("depth", "fastest") else []
    candidates, failed = [], {}
    for strategy in STRATEGIES:
        if (strategy.drop_blocks and not ranking) or (strategy.by_parts and (candidates or not failed)):
            continue
        try:
            found = _candidate(model, example, (macs_fraction, params_fraction), (macs_before, params_before), strategy, ranking)
        except BmcError as exc:
            # One strategy's cut can be beyond Torch-Pruning where another's is not (regnet's
            # grouped convolutions fail block-internal rounding, not uniform): the others remain.
            failed[strategy.name] = str(exc)
            continue
        if found is not None:
            candidates.append((strategy, *found))
    if not candidates:
        # No strategy reaches the target: the most one can remove, and the report says how much.
        fallback = PARTS if failed.get(UNIFORM.name) else UNIFORM
        try:
            plan, left_dense = _plan(model, example, 0.95, None, fallback)
            if not plan:
                raise BmcError("no channel could go without changing a layer Torch-Pruning cannot follow")
            candidates.append((fallback, None, _pruned_copy(model, example, plan), left_dense, 0.95))
        except BmcError as exc:
            reasons = sorted({*failed.values(), str(exc)})
            raise BmcError(
                f"{'; '.join(reasons)} (every strategy: Torch-Pruning could not follow this model's channels); "
                "--prune-method magnitude and --quantize without --prune still apply"
            ) from None
    measured: dict[str, dict[int, float]] = {}
    if latency_ms is not None and len(candidates) > 1:
        measured = {strategy.name: latency_ms(pruned) for strategy, _, pruned, _, _ in candidates}
        if choose == "fastest":
            candidates.sort(key=lambda c: math.prod(measured[c[0].name].values()))
    if choose in PREFERRED:
        candidates.sort(key=lambda c: c[0] != PREFERRED[choose])
    strategy, round_to, pruned, left_dense, ratio = candidates[0]
    macs_after, params_after = count_macs_and_params(pruned, example)
    stats = PruneStats(
        macs_before, macs_after, params_before, params_after, ratio, left_dense, round_to or 1,
        strategy=strategy.name, candidate_latency_ms=measured, blocks_dropped=[name for name, _ in dropped_blocks(pruned)],
        droppable_blocks=len(blocks), strategies_failed=failed, block_ranking=[r.to_dict() for r in ranking],
    )
    del candidates
    # Torch-Pruning's dependency graphs leave reference cycles over the candidates' weights: 3.3 GB
    # of seed-cnn224 stayed resident until a collection, under the quantization that comes next.
    gc.collect()
    return pruned, stats


def _candidate(model, example, targets, counts_before, strategy, ranking):
    """(channels rounded to, pruned copy, layers left dense, channel ratio) for one strategy, or None
    when it cannot reach the targets (fractions of MACs and of parameters removed; counts_before:
    the model's MACs and parameters) or does not apply to this model."""
    start, counts_start = model, counts_before
    if strategy.drop_blocks:
        start = drop_least_important_blocks(model, example, targets[0], counts_before[0], ranking)
        if start is None:
            return None
        counts_start = count_macs_and_params(start, example)
    fractions = tuple(fraction_left(target, before, now) for target, before, now in zip(targets, counts_before, counts_start))
    for round_to in (ROUND_CHANNELS_TO, None):
        if start is not model and max(fractions) < 0.01:
            return None, start, [], 0.0  # the dropped blocks alone reach the targets
        found = _search_ratio(start, example, fractions, counts_start, round_to, strategy)
        if found is not None:
            return (round_to, *found)
    return None


def fraction_left(target: float, before: int, now: int) -> float:
    """The fraction of a model holding `now` (MACs or parameters) still to remove for it to have
    lost `target` of the `before` it started from; 0 once it has."""
    return max(0.0, 1 - (1 - target) * before / now)


def _search_ratio(model, example, fractions, counts_before, round_to, strategy):
    """Bisect the channel ratio for the smallest one that removes `fractions` of the MACs and of the
    parameters (counts_before: the model's MACs and parameters).

    Each step plans on the real weights (L1 ranking needs them) but prunes a skeleton of the model
    on the meta device, which holds shapes and no data: the search costs a dependency trace per
    step instead of a deep copy of the weights (seed-cnn224, 1.6 GB: 12 minutes before).
    """
    low, high = 0.0, 0.95
    # A convolution's MACs scale with its input and output channels, both pruned by the ratio: the
    # first probe, 1 - sqrt(1 - fraction), lands near the answer and saves bisection steps.
    ratio = min(high, 1 - math.sqrt(max(0.0, 1 - max(fractions))))
    best = None
    shape_only = example.to("meta")
    memo: dict = {}  # each group's channel order and what parts the model has: the same at every step
    by_params = fractions[1] > 0
    for _ in range(SEARCH_STEPS):
        plan, left_dense = _plan(model, example, ratio, round_to, strategy, memo, by_params)
        if plan is None:
            return None  # no residual streams: the strategy is uniform's
        skeleton = _apply_plan(meta_skeleton(model), shape_only, plan)
        counts = count_macs_and_params(skeleton, shape_only)
        # How far past each target asked this ratio goes; the binding target is the one nearest to it.
        margin = min((1 - now / before - target for now, before, target in zip(counts, counts_before, fractions) if target > 0), default=0.0)
        if margin >= 0:
            best = (plan, left_dense, ratio)
            high = ratio
            if margin < 0.01:
                break
        else:
            low = ratio
        ratio = (low + high) / 2
    if best is None:
        return None
    plan, left_dense, ratio = best
    return _pruned_copy(model, example, plan), left_dense, ratio


# One pruning decision: (the graph it was planned on: "" for the whole model, else the part's name;
# the root module's name; Torch-Pruning's pruning function; channel indices).
PrunePlan = list[tuple[str, str, Callable, list[int]]]


def _plan(
    model: nn.Module, example: torch.Tensor, channel_ratio: float, round_to: int | None, strategy: Strategy, memo: dict | None = None,
    by_params: bool = False,
) -> tuple[PrunePlan | None, list[str]]:
    """Which channels go at this ratio, ranked by L1 norm on the model's weights; the model is untouched.
    `memo` keeps what does not change between calls on the same model: each group's channel
    ranking and, by parts, the parts, their inputs and which groups keep a part's shapes.

    None for a strategy that keeps residual streams on a model without any.
    """
    memo = {} if memo is None else memo
    # The classifier's outputs are the classes: never pruned.
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    ignored = linears[-1:]
    if strategy.keep_narrow_layers:
        ignored += [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels < NARROW_CHANNELS]
    names = {module: name for name, module in model.named_modules()}
    if not strategy.by_parts:
        plan, joined, fixed = _plan_graph("", model, (example,), names, ignored, channel_ratio, round_to, strategy, memo, by_params)
        if strategy.keep_residual_channels and not joined:
            return None, []  # no residual streams: the same as uniform, not a candidate of its own
        return plan, [names[m] for m in ignored] + fixed
    plan = []
    if ("inputs", id(model)) not in memo:  # one forward pass per search, not per step
        memo[("inputs", id(model))] = _part_inputs(model, example)
    inputs = memo[("inputs", id(model))]
    parts = _traceable_parts(model, inputs, memo)
    for part in parts:
        found, _, _ = _plan_graph(part, model.get_submodule(part), inputs[part], names, ignored, channel_ratio, round_to, strategy, memo)
        plan += [entry for entry in found if _keeps_part_shapes(model, inputs, entry, memo)]
    # Outside every part nothing is pruned; inside, each part's inputs and outputs keep their width.
    outside = [name for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and not any(name.startswith(f"{part}.") for part in parts)]
    return plan, outside


def _plan_graph(scope, module, inputs, names, ignored, channel_ratio, round_to, strategy, memo, by_params=False) -> tuple[PrunePlan, int, list[str]]:
    """The plan of one dependency graph (the whole model, or one part of it), how many groups
    joined residual streams (skipped where the strategy keeps them), and the layers left dense
    because their group cuts a layer a pruned checkpoint cannot be rebuilt with. by_params: where
    the strategy keeps the residual streams, each group loses channel_ratio scaled by the
    parameters one of its channels holds against the most any group's channel holds."""
    import torch_pruning as tp

    importance = tp.importance.MagnitudeImportance(p=1)
    try:
        with _torch_pruning_quiet():
            pruner = tp.pruner.MetaPruner(
                module,
                _example_inputs(inputs),
                importance=importance,
                pruning_ratio=channel_ratio,
                ignored_layers=[m for m in ignored if any(m is sub for sub in module.modules())],
                # Torch-Pruning rounds kept channels down and skips a group that would round to none,
                # which made MACs fall and rise again with the ratio once the residual streams are
                # kept; that strategy rounds to the nearest multiple itself. Elsewhere layers of
                # WIDE_LAYER_CHANNELS or more round to the nearest multiple too, narrower ones down:
                # nearest rounding everywhere cut the digits CNN's 16-channel layer to 8 and cost 1.1
                # points (3.6 in 3 gradual steps), while rounding down wide layers overshot the target
                # (seed-mlp on digits: 57% of MACs for --prune 0.5, -1.39 points; 53% and -0.83 now).
                round_to=None if strategy.keep_residual_channels else round_to,
                global_pruning=strategy.global_ranking,
            )
            plan, joined, fixed = [], 0, []
            # interactive: the pruner only proposes; nothing is removed from the model here.
            groups = list(pruner.step(interactive=True))
            weights = {}
            if by_params and strategy.keep_residual_channels:
                held = {id(group): _params_per_channel(group) for group in groups if not _joins_outputs(group)}
                most = max(held.values(), default=0)
                weights = {key: count / most for key, count in held.items()} if most else {}
            for group in groups:
                if strategy.keep_residual_channels and _joins_outputs(group):
                    joined += 1
                    continue
                if not _rebuildable(group):
                    fixed.append(names.get(group[0].dep.target.module, "?"))
                    continue
                indices = list(group[0].idxs)
                channels = pruner.DG.get_out_channels(group[0].dep.target.module)
                if weights and round_to:
                    kept = channels * (1 - channel_ratio * weights[id(group)])
                    indices = _rounded_selection(pruner.DG, group, importance, round_to, memo, kept=kept)
                elif strategy.keep_residual_channels and round_to:
                    indices = _rounded_selection(pruner.DG, group, importance, round_to, memo)
                elif round_to and not strategy.global_ranking and channels >= WIDE_LAYER_CHANNELS and not _has_grouped_convolution(group):
                    # Torch-Pruning's selection was rounded down: rounded again from what it kept before that.
                    indices = _rounded_selection(pruner.DG, group, importance, round_to, memo, kept=int(channels * (1 - channel_ratio)))
                if indices:
                    plan.append((scope, names[group[0].dep.target.module], group[0].dep.handler, indices))
    except (RuntimeError, ValueError, ZeroDivisionError, KeyError, IndexError) as exc:
        # Torch-Pruning crashes on some graphs (shufflenet_v2's channel shuffle: ZeroDivisionError).
        raise BmcError(f"structured pruning failed on this architecture: {type(exc).__name__}: {exc}") from None
    return plan, joined, fixed


@contextmanager
def _torch_pruning_quiet() -> Iterator[None]:
    """Torch-Pruning warns of each raw parameter it meets (a Transformer's positions); what bmc
    leaves dense is in its report instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="torch_pruning")
        yield


# The layers checkpoint.shrink_to_state resizes when a pruned run is loaded again.
REBUILDABLE_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


def _rebuildable(group) -> bool:
    """Whether a pruned run could be loaded again after this group's cut: every layer it touches is
    one shrink_to_state resizes, or one of Torch-Pruning's stand-ins for functional operations. A
    Transformer's model width runs through LayerNorm, attention and a raw position parameter: cut,
    the run saved fine and failed to load ("norm1.bias: [16] in the file, [32] in the model")."""
    return all(
        isinstance(dep.target.module, REBUILDABLE_LAYERS) or type(dep.target.module).__module__.startswith("torch_pruning")
        for dep, _ in group
    )


def _part_inputs(model: nn.Module, example: torch.Tensor) -> dict[str, tuple]:
    """Each submodule's positional inputs in one forward pass on `example` (tensors of example's
    device: meta tensors for a skeleton), by name; submodules that took anything but tensors are left out."""
    seen: dict[str, tuple] = {}

    def keep(name):
        def hook(module, args, output):
            if name not in seen and args and all(isinstance(a, torch.Tensor) for a in args):
                seen[name] = tuple(torch.zeros_like(a) for a in args)
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in model.named_modules()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _traceable_parts(model: nn.Module, inputs: dict[str, tuple], memo: dict) -> list[str]:
    """The largest submodules whose dependency graph Torch-Pruning can build, where it cannot build
    the whole model's: shufflenet_v2's channel shuffle between blocks breaks the model's graph,
    not each block's own."""
    key = ("parts", id(model))
    if key in memo:
        return memo[key]
    parts: list[str] = []

    def visit(name: str, module: nn.Module) -> None:
        if not any(isinstance(m, nn.Conv2d) for m in module.modules()) or isinstance(module, (nn.Conv2d, nn.Linear)):
            return  # nothing to prune inside, or a single layer whose width is its part's interface
        if name in inputs:
            try:
                _graph(module, inputs[name])
                parts.append(name)
                return
            except Exception:  # noqa: BLE001 - any failure to build sends the search one level down
                pass
        for child, sub in module.named_children():
            visit(f"{name}.{child}" if name else child, sub)

    for child, sub in model.named_children():
        visit(child, sub)
    memo[key] = parts
    return parts


def _keeps_part_shapes(model: nn.Module, inputs: dict[str, tuple], entry, memo: dict) -> bool:
    """Whether pruning this group leaves its part taking and giving the same shapes: only then can
    the part change without the model's graph (which Torch-Pruning cannot build) following it.
    Checked once per group on a skeleton of the part."""
    part, name, pruning_fn, _ = entry
    key = ("keeps shapes", part, name, getattr(pruning_fn, "__name__", str(pruning_fn)))
    if key not in memo:
        skeleton = meta_skeleton(model.get_submodule(part))
        args = tuple(a.to("meta") for a in inputs[part])
        try:
            with torch.no_grad():
                before = skeleton(*args)
            graph = _graph(skeleton, args)
            root = skeleton.get_submodule(name[len(part) + 1:])
            graph.get_pruning_group(root, pruning_fn, [0]).prune()
            with torch.no_grad():
                after = skeleton(*args)
            memo[key] = _shapes(after) == _shapes(before)
        except Exception:  # noqa: BLE001 - a group that breaks its part is one that stays dense
            memo[key] = False
    return memo[key]


def _graph(module: nn.Module, args: tuple):
    """Torch-Pruning's dependency graph of module, traced on its positional inputs."""
    import torch_pruning as tp

    with _torch_pruning_quiet():
        return tp.DependencyGraph().build_dependency(module, example_inputs=_example_inputs(args))


def _example_inputs(args: tuple):
    return args[0] if len(args) == 1 else args  # Torch-Pruning calls module(x) for one tensor, module(*args) for a tuple


def _shapes(output) -> list:
    if isinstance(output, torch.Tensor):
        return [tuple(output.shape)]
    if isinstance(output, (tuple, list)):
        return [shape for item in output for shape in _shapes(item)]
    return [type(output).__name__]


def _rounded_selection(graph, group, importance, round_to: int, memo: dict, kept: int | None = None) -> list[int]:
    """The group's lowest-L1 channels, as many as leave the kept count (default: what the group's
    own selection keeps) at the nearest multiple of round_to.

    A group's scores read all its weights (a wide classifier's, and as much again in temporaries):
    computed once per group and kept in `memo` across the ratio search.
    """
    root, pruning_fn = group[0].dep.target.module, group[0].dep.handler
    channels = graph.get_out_channels(root)
    if channels <= round_to:
        return list(group[0].idxs)
    kept = channels - len(group[0].idxs) if kept is None else kept
    keep = max(round_to, int(kept / round_to + 0.5) * round_to)
    if keep >= channels:
        return []
    key = (id(root), getattr(pruning_fn, "__name__", str(pruning_fn)))
    if key not in memo:
        memo[key] = torch.argsort(importance(graph.get_pruning_group(root, pruning_fn, list(range(channels)))))
    return sorted(memo[key][: channels - keep].tolist())


def _params_per_channel(group) -> int:
    """The parameters one channel of the group holds: a filter of each layer producing it, the
    matching input slice of each layer reading it, a scale and shift of each normalization."""
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


def _has_grouped_convolution(group) -> bool:
    """Whether a convolution of the group has groups of several channels (regnet's): only
    Torch-Pruning's own selection keeps every group of such a layer the same width."""
    return any(
        isinstance(dep.target.module, nn.Conv2d) and 1 < dep.target.module.groups < dep.target.module.out_channels
        for dep, _ in group
    )


def _joins_outputs(group) -> bool:
    """Whether the group's channels are the outputs of several layers added together (a residual stream)."""
    producers = [
        dep.target.module
        for dep, _ in group
        if getattr(dep.handler, "__name__", "") == "prune_out_channels"
        and isinstance(dep.target.module, (nn.Conv2d, nn.Linear))
        and getattr(dep.target.module, "groups", 1) == 1
    ]
    return len(producers) > 1


def _apply_plan(model: nn.Module, example: torch.Tensor, plan: PrunePlan) -> nn.Module:
    """Remove the planned channels from model (in place) and check that it still runs."""
    modules = dict(model.named_modules())
    inputs = _part_inputs(model, example) if any(scope for scope, *_ in plan) else {}
    graphs: dict[str, object] = {}
    try:
        for scope, name, pruning_fn, indices in plan:
            if scope not in graphs:
                # A part's graph is built on the part alone, from its own inputs in the model.
                module, args = (model, (example,)) if not scope else (modules[scope], inputs[scope])
                graphs[scope] = _graph(module, args)
            graphs[scope].get_pruning_group(modules[name], pruning_fn, indices).prune()
        with torch.no_grad():
            model(example)  # the pruned graph must still run
    except (RuntimeError, ValueError, ZeroDivisionError, KeyError, IndexError) as exc:
        raise BmcError(f"structured pruning failed on this architecture: {type(exc).__name__}: {exc}") from None
    return model


def _pruned_copy(model: nn.Module, example: torch.Tensor, plan: PrunePlan) -> nn.Module:
    return _apply_plan(copy.deepcopy(model), example, plan)


def prune_magnitude(model: nn.Module, fraction: float) -> tuple[nn.Module, float]:
    """A copy with the smallest-magnitude fraction of conv and linear weights set to zero (global ranking).

    Dense kernels do not skip zeros: the file shrinks once compressed, the model does not speed up.
    """
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
