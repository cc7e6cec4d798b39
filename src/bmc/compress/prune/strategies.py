"""Which channels may go (a Cut) and how one cut is chosen among those that reach the target (a Strategy).

Every Cut that applies to a model and reaches the target is a candidate; the Strategy the user
names (`--prune-strategy`, registered here once) picks one of them, by preference or by measured
latency. No torch here: the config validates strategy names against this registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

from bmc.errors import UsageError


@dataclass(frozen=True)
class Cut:
    """Which channels may go: every layer by the same ratio, only the channels inside residual
    blocks (the streams that additions join keep their width), the narrow layers kept, or a global
    ranking; drop_blocks removes the least important residual blocks whole before any channel goes."""

    name: str
    keep_narrow_layers: bool = False
    keep_residual_channels: bool = False
    global_ranking: bool = False
    drop_blocks: bool = False
    by_parts: bool = False  # one graph per traceable part, where the model's own graph cannot be built


UNIFORM = Cut("uniform")
# Where no residual block can go, depth falls back to this: the streams that additions join keep
# their width, which is faster than uniform pruning at the same accuracy (docs/experiments.md, 4.5).
BLOCK_INTERNAL = Cut("block-internal channels only", keep_residual_channels=True)
# The default: a block takes its operators' fixed costs with it, which channels do not. On resnet20
# at half the MACs, 1.90x faster in fp32 at batch 32 against block-internal's 1.35x, and more
# accurate (docs/experiments.md, 4.6).
DEPTH = Cut("residual blocks dropped, then block-internal channels", keep_residual_channels=True, drop_blocks=True)
# Narrow convolutions are dominated by per-operator overhead on a CPU, not by arithmetic: removing
# their channels takes MACs without taking time (resnet20's 16-channel stage, measured).
NARROW_KEPT = Cut("uniform, narrow layers kept", keep_narrow_layers=True)
GLOBAL = Cut("global ranking", global_ranking=True)
# Only where every cut above failed on the model's graph: shufflenet_v2's channel shuffle breaks
# Torch-Pruning's graph of the whole model, not of each block; inside each block the channels that
# do not reach its outputs can go, and everything else stays dense.
PARTS = Cut("channels inside the parts Torch-Pruning can follow; their inputs, outputs and all else dense", by_parts=True)
# Tried in this order; PARTS only where all the others failed.
CUTS = (BLOCK_INTERNAL, DEPTH, UNIFORM, NARROW_KEPT, GLOBAL, PARTS)

T = TypeVar("T")


@dataclass(frozen=True)
class Strategy:
    """A `--prune-strategy` name: which of the candidate cuts to keep. `prefers` wins where it is a
    candidate (else the first candidate, in CUTS order); without a preference, the fastest as
    measured (the product of its latencies over the timed batch sizes)."""

    name: str
    help: str
    prefers: Cut | None = None
    ranks_blocks: bool = False  # ranking residual blocks costs forward passes: only where depth may be chosen

    def choose(self, candidates: Sequence[T], cut_of: Callable[[T], Cut], latency_ms: Callable[[T], dict[int, float]] | None) -> T:
        """The candidate this strategy keeps."""
        ordered = list(candidates)
        if self.prefers is None and latency_ms is not None:
            ordered.sort(key=lambda c: math.prod(latency_ms(c).values()))
        if self.prefers is not None:
            ordered.sort(key=lambda c: cut_of(c) != self.prefers)
        return ordered[0]


_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy) -> Strategy:
    """Make a strategy available as `--prune-strategy NAME`."""
    if strategy.name in _STRATEGIES:
        raise ValueError(f"pruning strategy {strategy.name!r} registered twice")
    _STRATEGIES[strategy.name] = strategy
    return strategy


def strategy_names() -> list[str]:
    """The registered strategies' names, the default first."""
    return list(_STRATEGIES)


def get_strategy(name: str | Strategy) -> Strategy:
    """The registered strategy of this name; an unknown name lists the known ones."""
    if isinstance(name, Strategy):
        return name
    if name not in _STRATEGIES:
        raise UsageError(f"unknown pruning strategy {name!r}; known: {', '.join(_STRATEGIES)}")
    return _STRATEGIES[name]


register_strategy(Strategy(
    "depth",
    "the residual blocks that cost least per millisecond they save go whole, then block-internal",
    prefers=DEPTH, ranks_blocks=True,
))
register_strategy(Strategy("block-internal", "residual streams keep their width (uniform where a model has none)", prefers=BLOCK_INTERNAL))
# The gentlest elsewhere: on resnet20 -1.9 points after 5 fine-tuning epochs against -7.7 for the fastest.
register_strategy(Strategy("uniform", "every layer by the same ratio", prefers=UNIFORM))
register_strategy(Strategy("fastest", "the lowest measured latency on this CPU", ranks_blocks=True))
