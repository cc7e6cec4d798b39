"""What structured pruning reports: the cut chosen, its counts, the candidates timed, and the
residual blocks as ranked. Plain data, no torch: the compress report holds it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BlockRank:
    """One residual block as depth pruning weighs it: what dropping it alone does to the model's
    predictions (mean KL divergence from the full model's), against what it saves."""

    name: str
    kind: str  # "relu" or "identity": what the block ended with
    prediction_shift_kl: float
    macs: int
    time_ms: float | None  # its kernels' time on the target; None where not measured

    @property
    def cost(self) -> float:
        saved = self.time_ms if self.time_ms is not None else self.macs
        return self.prediction_shift_kl / saved if saved > 0 else math.inf


@dataclass(frozen=True)
class PruneOutcome:
    """One structured cut: the strategy's choice among the cuts that reached the target."""

    strategy: str  # the cut chosen
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    channel_ratio: float
    left_dense: list[str]
    channels_rounded_to: int
    candidate_latency_ms: dict[str, dict[int, float]] = field(default_factory=dict)  # each candidate cut, timed
    blocks_dropped: list[str] = field(default_factory=list)
    droppable_blocks: int = 0  # residual blocks the model could lose whole
    strategies_failed: dict[str, str] = field(default_factory=dict)  # cut -> why Torch-Pruning could not make it
    block_ranking: list[BlockRank] = field(default_factory=list)  # each droppable block, in drop order
    macs_removed: float = field(init=False)
    params_removed: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "macs_removed", 1 - self.macs_after / self.macs_before if self.macs_before else 0.0)
        object.__setattr__(self, "params_removed", 1 - self.params_after / self.params_before if self.params_before else 0.0)
