"""Which runtime targets the int8 search times, and which file it hands over with which target per batch size.

One file runs at different speeds on different runtimes and settings: on an AVX-512 CPU a QDQ
resnet20 runs fastest on onnxruntime at batch 1 and on OpenVINO at batch 32, whose per-call cost is
larger; a tiny model runs faster on one onnxruntime thread than on two; OpenVINO's bf16 hint
speeds up an fp32 transformer more than int8 does. So every file the search could hand over (each
int8 recipe's, and the fp32 model itself) is timed on every target here, each pair with its own
accuracy (a runtime or a precision hint changes numerics). A file is accepted when, at every batch
size, one of its pairs within the accuracy budget meets the speed guarantee against fp32 on the
baseline target; the fastest accepted file wins, and its fastest pair per batch size is the target
recorded in its metadata, which serve reads. No torch here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from bmc.runtime.target import Target

FP32 = "fp32"  # the label of the unquantized file among the search's candidates


def search_targets(runtimes: tuple[str, ...] | None, device: str = "cpu", threads: int | None = None) -> tuple[Target, ...]:
    """The baseline first (onnxruntime, fp32, `threads`), then every other target to time: each
    runtime asked for (None: every one installed and working here) with each precision it has here,
    and, where threads were not fixed, onnxruntime on one thread (small models lose more to
    thread hand-offs than they gain)."""
    from bmc.runtime.registry import plan_targets

    baseline = Target("onnxruntime", device, FP32, threads)
    planned = plan_targets(runtimes, None, device, threads)
    targets = [baseline, *planned]
    if threads is None and (os.cpu_count() or 1) > 1 and device == "cpu":
        targets.append(Target("onnxruntime", device, FP32, 1))
    return tuple(dict.fromkeys(targets))


@dataclass(frozen=True)
class FileChoice:
    """A file the search could hand over: its fastest pair within the accuracy budget per batch size."""

    label: str  # the recipe, or FP32
    targets: dict[int, Target]  # batch size -> the target it runs fastest on
    speedup: dict[int, float]  # batch size -> that pair's speed-up against fp32 on the baseline target
    size_bytes: int
    accuracy_drop_points: float | None  # the largest drop among the pairs chosen

    @property
    def mean_speedup(self) -> float:
        return math.prod(self.speedup.values()) ** (1 / len(self.speedup))


def file_choices(candidates, batch_sizes: tuple[int, ...], max_drop_points: float, min_speedup: float, baseline: Target,
                 fp32_size: int, speed_tie: float) -> list[FileChoice]:
    """For fp32 and each file among the candidates (pairs with .recipe, .target, .speedup,
    .size_bytes and .accuracy_drop_points), its fastest pair within the accuracy budget at each
    batch size that meets the speed guarantee (min_speedup). fp32 on the baseline target counts as
    a pair at 1.00x, so fp32 is always a choice; a file with a batch size none of its pairs within
    budget ran fast enough is left out. A pair takes a batch
    size from an earlier target only when faster by more than speed_tie: fewer runtimes to open in
    serve, and no switch on timing noise."""
    choices = []
    for label in dict.fromkeys([FP32, *(c.recipe for c in candidates)]):
        pairs = [c for c in candidates if c.recipe == label and _within_budget(c, max_drop_points)]
        best: dict[int, tuple[float, Target, float | None]] = {}
        if label == FP32:
            best = {b: (1.0, baseline, 0.0) for b in batch_sizes}
        for pair in pairs:  # in the order of the targets searched: a later one must be faster than timing noise to replace one
            for b, s in pair.speedup.items():
                if b in batch_sizes and s >= min_speedup and (b not in best or s > best[b][0] * (1 + speed_tie)):
                    best[b] = (s, pair.target, pair.accuracy_drop_points)
        if len(best) < len(batch_sizes):
            continue
        drops = [drop for _, _, drop in best.values() if drop is not None]
        size = fp32_size if label == FP32 else next(c.size_bytes for c in candidates if c.recipe == label)
        choices.append(FileChoice(label, {b: best[b][1] for b in batch_sizes}, {b: best[b][0] for b in batch_sizes}, size,
                                  max(drops) if drops else None))
    return choices


def choose_file(choices: list[FileChoice], speed_tie: float, baseline: Target) -> FileChoice:
    """The fastest choice (geometric mean of its speed-ups over batch sizes), except that among
    those within speed_tie of it the smallest file wins (timing noise on a shared machine against
    exact bytes: resnet20 pruned, three recipes at 1.68-1.69x, 148 kB against 163 kB). fp32 as it
    was, on the baseline target everywhere, is what is left when nothing else met the guarantee."""
    as_it_was = [c for c in choices if c.label == FP32 and all(t == baseline for t in c.targets.values())]
    contenders = [c for c in choices if c not in as_it_was] or as_it_was
    fastest = max(c.mean_speedup for c in contenders)
    near = [c for c in contenders if c.mean_speedup >= fastest * (1 - speed_tie)]
    return min(near, key=lambda c: (c.size_bytes, c.accuracy_drop_points or 0.0, -c.mean_speedup))


def _within_budget(candidate, max_drop_points: float) -> bool:
    """Ran, and lost no more accuracy than the budget (unmeasured accuracy: speed alone decides)."""
    if not candidate.speedup:
        return False
    return candidate.accuracy_drop_points is None or candidate.accuracy_drop_points <= max_drop_points


def onnxruntime_only(candidates, batch_sizes: tuple[int, ...], max_drop_points: float, baseline: Target) -> dict[int, float]:
    """The best speed-up per batch size on onnxruntime's default settings alone, within the accuracy
    budget: what the search would hand over without other runtimes, for the summary to stand beside."""
    plain = [c for c in candidates if c.target.runtime == baseline.runtime and c.target.precision == FP32 and c.target.threads == baseline.threads]
    best = {b: 1.0 for b in batch_sizes}
    for candidate in plain:
        if _within_budget(candidate, max_drop_points) and all(candidate.speedup.get(b, 0) >= 1.0 for b in batch_sizes):
            for b in batch_sizes:
                best[b] = max(best[b], candidate.speedup[b])
    return best
