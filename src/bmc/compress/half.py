"""fp16, accepted only where it is measured faster than fp32 on the target (the compress speed guarantee).

On onnxruntime's CUDA provider fp16 is the fast path (int8 QDQ models have no int8 kernels there);
on its CPU provider most fp16 operators fall back behind casts and run slower than fp32. Both are
timed here rather than assumed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

TIMING_ROUNDS = 3


@dataclass
class HalfResult:
    target: str
    timed_on: str | None  # the device really timed on; None where the target is absent here
    accepted: bool
    note: str
    speedup: dict[int, float] = field(default_factory=dict)
    latency_ms: dict[int, float] = field(default_factory=dict)
    baseline_latency_ms: dict[int, float] = field(default_factory=dict)
    accuracy_drop_points: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def judge_fp16(
    fp32_path: Path,
    fp16_path: Path,
    target: str,
    batch_sizes: tuple[int, ...] = (1, 32),
    seconds_per_timing: float = 1.5,
    max_accuracy_drop_points: float = 1.0,
    data: str | None = None,
    data_dir: Path | None = None,
) -> HalfResult:
    """Time fp16 against fp32 on the target (best median of a few rounds each) and check the accuracy budget."""
    from bmc.bench import BenchConfig, bench_rounds
    from bmc.runtime.sessions import cuda_works

    if target == "cuda" and not cuda_works():
        return HalfResult(
            target=target,
            timed_on=None,
            accepted=True,
            note="fp16 for cuda, not timed: onnxruntime has no working CUDA provider here; "
            "run `bmc bench MODEL.onnx MODEL-fp16.onnx --device cuda` on the target",
        )
    if data is None:  # the data set the model was trained on, as int8 calibration defaults to
        from bmc.runtime.model_file import open_model
        from bmc.runtime.metadata import ModelMetadata

        data = ModelMetadata.from_props(open_model(Path(fp32_path)).metadata_props).dataset or None
    first, best = bench_rounds(
        [fp32_path, fp16_path],
        BenchConfig(batch_sizes=batch_sizes, device=target, seconds=seconds_per_timing / TIMING_ROUNDS, data=data, data_dir=data_dir),
        TIMING_ROUNDS,
    )
    speedup = {b: round(best[0][b] / best[1][b], 3) for b in batch_sizes if b in best[0] and b in best[1]}
    base_quality, half_quality = first.models[0].quality, first.models[1].quality
    drop = None
    if base_quality is not None and half_quality is not None and None not in (base_quality.accuracy, half_quality.accuracy):
        drop = round(100 * (base_quality.accuracy - half_quality.accuracy), 4)
    faster = bool(speedup) and all(s > 1.0 for s in speedup.values())
    within = drop is None or drop <= max_accuracy_drop_points
    shown = ", ".join(f"{s:.2f}x at batch {b}" for b, s in speedup.items())
    if faster and within:
        note = f"fp16 on {target}: {shown}"
    elif not faster:
        note = f"kept fp32: fp16 is not faster on {target} at every batch size ({shown})"
    else:
        note = f"kept fp32: fp16 loses {drop:.2f} points, over the {max_accuracy_drop_points} budget"
    return HalfResult(
        target=target,
        timed_on=target,
        accepted=faster and within,
        note=note,
        speedup=speedup,
        latency_ms={b: round(ms, 4) for b, ms in best[1].items()},
        baseline_latency_ms={b: round(ms, 4) for b, ms in best[0].items()},
        accuracy_drop_points=drop,
    )

