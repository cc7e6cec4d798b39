"""The structured-pruning driver: every cut that reaches the target is a candidate, the strategy keeps one.

RATIO is the fraction of multiply-accumulates removed, as the pruning literature counts it: each
cut's channel ratio is bisected until its MACs (and, asked, its parameters) fall by the target.
"""

from __future__ import annotations

import gc
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from bmc.compress.prune.blocks import drop_cheapest_blocks, residual_blocks
from bmc.compress.prune.channels import ROUND_CHANNELS_TO, ChannelRequest, PlanCache, plan_channels
from bmc.compress.prune.graph import apply_cuts, pruned_copy
from bmc.compress.prune.importance import BlockImportance, KLPerMillisecond
from bmc.compress.prune.latency import Probe
from bmc.compress.prune.measure import count_macs_and_params, trial_copy, trial_device
from bmc.compress.prune.outcome import BlockRank, PruneOutcome
from bmc.compress.prune.strategies import CUTS, PARTS, UNIFORM, Cut, Strategy, get_strategy
from bmc.errors import BmcError
from bmc.models.blocks import dropped_blocks

SEARCH_STEPS = 8
# The widest channel ratio tried, and where a cut that reaches no target stops.
MAX_CHANNEL_RATIO = 0.95


@dataclass(frozen=True)
class PruneTarget:
    """What pruning must remove: a fraction of the MACs (speed) and of the parameters (size; 0: none asked)."""

    macs: float
    params: float = 0.0


@dataclass(frozen=True)
class Counts:
    macs: int
    params: int

    @classmethod
    def of(cls, model: nn.Module, example: torch.Tensor) -> Counts:
        return cls(*count_macs_and_params(model, example))


@dataclass(frozen=True)
class _Candidate:
    """One cut's pruned copy that reaches the target."""

    cut: Cut
    model: nn.Module
    left_dense: list[str]
    channel_ratio: float
    round_to: int | None


def fraction_left(target: float, before: int, now: int) -> float:
    """The fraction of a model holding `now` (MACs or parameters) still to remove for it to have
    lost `target` of the `before` it started from; 0 once it has."""
    return max(0.0, 1 - (1 - target) * before / now)


def prune_structured(
    model: nn.Module,
    example: torch.Tensor,
    target: PruneTarget,
    strategy: Strategy | str = "depth",
    probe: Probe | None = None,
    block_importance: BlockImportance | None = None,
) -> tuple[nn.Module, PruneOutcome]:
    """A copy of model with about target.macs of its MACs removed by L1-ranked channels (and
    target.params of its parameters, when asked); the original is untouched.

    With a parameter target the channel search goes on until both are met, and the cuts that keep
    the residual streams cut each group in proportion to the parameters one of its channels holds,
    so the layers that hold the model's size shrink most. Each cut of CUTS that reaches the target
    is a candidate, timed with `probe` on the target when given; `strategy` keeps one. Depth first
    drops the residual blocks `block_importance` ranks cheapest (default: KL per millisecond on
    random inputs), then goes on as block-internal. Channel counts are multiples of 8 where that can
    reach the target; layers too narrow for it (the 6- and 16-channel digits CNN) fall back to free
    channel counts.
    """
    strategy = get_strategy(strategy)
    model = model.eval()
    with _small_forwards_on_one_thread(model):
        return _prune_structured(model, example, target, strategy, probe, block_importance)


def _prune_structured(model, example, target: PruneTarget, strategy: Strategy, probe, block_importance) -> tuple[nn.Module, PruneOutcome]:
    before = Counts.of(model, example)
    blocks = residual_blocks(model)
    ranking: list[BlockRank] = []
    if blocks and strategy.ranks_blocks:
        ranking = (block_importance or KLPerMillisecond()).rank(model, example, blocks, probe)
    candidates: list[_Candidate] = []
    failed: dict[str, str] = {}
    for cut in CUTS:
        if (cut.drop_blocks and not ranking) or (cut.by_parts and (candidates or not failed)):
            continue
        try:
            found = _candidate(model, example, target, before, cut, ranking)
        except BmcError as exc:
            # One cut can be beyond Torch-Pruning where another is not (regnet's grouped
            # convolutions fail block-internal rounding, not uniform): the others remain.
            failed[cut.name] = str(exc)
            continue
        if found is not None:
            candidates.append(found)
    if not candidates:
        candidates.append(_the_most_that_can_go(model, example, failed))
    measured: dict[str, dict[int, float]] = {}
    if probe is not None and len(candidates) > 1:
        measured = {candidate.cut.name: probe.latency_ms(candidate.model) for candidate in candidates}
    chosen = strategy.choose(candidates, lambda c: c.cut, (lambda c: measured[c.cut.name]) if measured else None)
    after = Counts.of(chosen.model, example)
    outcome = PruneOutcome(
        strategy=chosen.cut.name, macs_before=before.macs, macs_after=after.macs, params_before=before.params,
        params_after=after.params, channel_ratio=chosen.channel_ratio, left_dense=chosen.left_dense,
        channels_rounded_to=chosen.round_to or 1, candidate_latency_ms=measured,
        blocks_dropped=[name for name, _ in dropped_blocks(chosen.model)], droppable_blocks=len(blocks),
        strategies_failed=failed, block_ranking=ranking,
    )
    pruned = chosen.model
    del candidates, chosen
    # Torch-Pruning's dependency graphs leave reference cycles over the candidates' weights: 3.3 GB
    # of seed-cnn224 stayed resident until a collection, under the quantization that comes next.
    gc.collect()
    return pruned, outcome


@contextmanager
def _small_forwards_on_one_thread(model: nn.Module) -> Iterator[None]:
    """The search runs hundreds of forward passes of one sample; on a small model a second thread
    only waits for the first, and on a busy machine that wait made resnet20's search 10x slower
    (docs/experiments.md, 4.17)."""
    if trial_device(model).type == "meta":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _the_most_that_can_go(model: nn.Module, example: torch.Tensor, failed: dict[str, str]) -> _Candidate:
    """Where no cut reaches the target: the most one can remove (the report says how much)."""
    fallback = PARTS if failed.get(UNIFORM.name) else UNIFORM
    try:
        plan = plan_channels(model, example, ChannelRequest(MAX_CHANNEL_RATIO, None, fallback))
        if not plan.cuts:
            raise BmcError("no channel could go without changing a layer Torch-Pruning cannot follow")
        return _Candidate(fallback, pruned_copy(model, example, plan.cuts), plan.left_dense, MAX_CHANNEL_RATIO, None)
    except BmcError as exc:
        reasons = sorted({*failed.values(), str(exc)})
        raise BmcError(
            f"{'; '.join(reasons)} (every strategy: Torch-Pruning could not follow this model's channels); "
            "--sparsity (weights zeroed) and --quantize without --prune still apply"
        ) from None


def _candidate(model: nn.Module, example: torch.Tensor, target: PruneTarget, before: Counts, cut: Cut,
               ranking: list[BlockRank]) -> _Candidate | None:
    """The cut's pruned copy that reaches the target, or None when it cannot or does not apply."""
    start, start_counts = model, before
    if cut.drop_blocks:
        start = drop_cheapest_blocks(model, example, target.macs, before.macs, ranking)
        if start is None:
            return None
        start_counts = Counts.of(start, example)
    left = PruneTarget(fraction_left(target.macs, before.macs, start_counts.macs), fraction_left(target.params, before.params, start_counts.params))
    for round_to in (ROUND_CHANNELS_TO, None):
        if start is not model and max(left.macs, left.params) < 0.01:
            return _Candidate(cut, start, [], 0.0, None)  # the dropped blocks alone reach the targets
        found = _search_ratio(start, example, left, start_counts, cut, round_to)
        if found is not None:
            return found
    return None


def _search_ratio(model: nn.Module, example: torch.Tensor, target: PruneTarget, before: Counts, cut: Cut,
                  round_to: int | None) -> _Candidate | None:
    """Bisect the channel ratio for the smallest one that removes target's fractions of the MACs
    and of the parameters (before: the model's counts).

    Each step plans on the real weights (L1 ranking needs them) and counts what remains on a trial
    copy (of a large model: shapes only, no weights to copy).
    """
    low, high = 0.0, MAX_CHANNEL_RATIO
    # A convolution's MACs scale with its input and output channels, both pruned by the ratio: the
    # first probe, 1 - sqrt(1 - fraction), lands near the answer and saves bisection steps.
    ratio = min(high, 1 - math.sqrt(max(0.0, 1 - max(target.macs, target.params))))
    best = None
    trial_example = example.to(trial_device(model))
    cache = PlanCache()
    asked = [(target.macs, before.macs, 0), (target.params, before.params, 1)]
    for _ in range(SEARCH_STEPS):
        plan = plan_channels(model, example, ChannelRequest(ratio, round_to, cut, by_params=target.params > 0), cache)
        if plan is None:
            return None  # no residual streams: the cut is uniform's
        counts = count_macs_and_params(apply_cuts(trial_copy(model), trial_example, plan.cuts), trial_example)
        # How far past each target asked this ratio goes; the binding target is the one nearest to it.
        margin = min((1 - counts[index] / count - fraction for fraction, count, index in asked if fraction > 0), default=0.0)
        if margin >= 0:
            best = (plan, ratio)
            high = ratio
            if margin < 0.01:
                break
        else:
            low = ratio
        ratio = (low + high) / 2
    if best is None:
        return None
    plan, ratio = best
    return _Candidate(cut, pruned_copy(model, example, plan.cuts), plan.left_dense, ratio, round_to)
