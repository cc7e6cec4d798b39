"""Model files measured together, the first the baseline: what every compress decision rests on.

int8's candidate search, fp16's judgement and the closing summary each compare a baseline with
candidates in one run, in rounds: every model is timed `rounds` times in turn and keeps its
fastest round, so a burst of other work on a shared machine hits one round, not one model.
A contender is a model file and the runtime target it runs on (bmc.runtime's Target: runtime,
device, precision, threads). Contenders on several targets are measured in one bench run of every
file on every target, so the rounds interleave them all; only the pairs asked for are returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from bmc.errors import UsageError
from bmc.runtime.target import Target

TIMING_ROUNDS = 3


@dataclass(frozen=True)
class Contender:
    """One model file on one runtime target: what compare() measures."""

    path: Path
    label: str = ""
    target: Target = field(default_factory=Target)


@dataclass(frozen=True)
class Settings:
    """How long to time each contender and on which data to score it."""

    batch_sizes: tuple[int, ...] = (1, 32)
    seconds: float = 1.0  # per contender and batch size, over all rounds
    data: str | None = None  # the data set accuracy is measured on; None: speed only
    data_dir: Path | None = None


@dataclass(frozen=True)
class Measurement:
    """What compare() measured of one contender."""

    contender: Contender
    device: str  # the device its session really got
    format: str  # fp32, fp16, int8 ... as read from the file
    parameters: int
    size_bytes: int
    gzip_bytes: int
    weight_sparsity: float | None
    accuracy: float | None
    latency_ms: dict[int, float]  # batch size -> the best round's median; empty when the target could not open the file
    unopened: str = ""  # why the target could not run the file ("" when it ran)


@dataclass(frozen=True)
class Comparison:
    """The baseline and each candidate, measured in the same run."""

    baseline: Measurement
    candidates: tuple[Measurement, ...]

    def speedup(self, measured: Measurement) -> dict[int, float]:
        """Batch size -> the baseline's latency / this one's (> 1: faster)."""
        base = self.baseline.latency_ms
        return {b: base[b] / ms for b, ms in measured.latency_ms.items() if b in base and ms > 0}

    def accuracy_drop_points(self, measured: Measurement) -> float | None:
        """How many points of accuracy this one lost against the baseline (negative: gained)."""
        if measured.accuracy is None or self.baseline.accuracy is None:
            return None
        return 100 * (self.baseline.accuracy - measured.accuracy)

    def size_ratio(self, measured: Measurement) -> float:
        """The baseline's bytes / this one's (> 1: smaller)."""
        return self.baseline.size_bytes / measured.size_bytes if measured.size_bytes else float("inf")


def compare(baseline: Contender, candidates: Sequence[Contender], rounds: int = TIMING_ROUNDS, settings: Settings = Settings()) -> Comparison:
    """Measure the baseline and every candidate together, in `rounds` rounds; returns the Comparison."""
    from bmc.bench import BenchConfig, bench

    contenders = [baseline, *candidates]
    paths = list(dict.fromkeys(c.path for c in contenders))
    targets = tuple(dict.fromkeys(c.target for c in contenders))
    devices = {t.device for t in targets}
    if len(devices) != 1:
        raise UsageError(f"one comparison runs on one device; got {', '.join(sorted(devices))}")
    report = bench(
        paths,
        BenchConfig(
            batch_sizes=settings.batch_sizes, device=devices.pop(), seconds=settings.seconds / rounds,
            data=settings.data, data_dir=settings.data_dir if settings.data else None, rounds=rounds, targets=targets,
        ),
    )
    rows = {(path, target): report.models[i * len(targets) + j] for i, path in enumerate(paths) for j, target in enumerate(targets)}
    measured = []
    for contender in contenders:
        result = rows[(contender.path, contender.target)]
        measured.append(Measurement(
            contender=contender,
            device=result.device,
            format=result.facts.numeric_format,
            parameters=result.facts.parameters,
            size_bytes=result.facts.size_bytes,
            gzip_bytes=result.facts.gzip_bytes,
            weight_sparsity=result.facts.weight_sparsity,
            accuracy=result.quality.accuracy if result.quality else None,
            latency_ms={t.batch_size: t.latency_ms_median for t in result.timings},
            unopened=result.skipped[0][1] if result.skipped and not result.timings else "",
        ))
    return Comparison(measured[0], tuple(measured[1:]))
