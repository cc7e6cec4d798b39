"""fp16, kept only where it is measured faster than fp32 on the target (the compress speed guarantee).

On onnxruntime's CUDA provider fp16 is the fast path (int8 QDQ models have no int8 kernels there);
on its CPU provider most fp16 operators fall back behind casts and run slower than fp32. Both are
timed here rather than assumed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bmc.compress.compare import Contender, Settings, compare
from bmc.compress.config import CompressConfig
from bmc.compress.quantize.config import QuantizeConfig
from bmc.runtime.target import Target
from bmc.compress.report import HalfResult
from bmc.compress.stage import Artifact

HALF_FILE = "model-fp16.onnx"
SECONDS_PER_TIMING = 1.5  # per model and batch size, over all rounds


def fp16(artifact: Artifact, config: CompressConfig) -> tuple[Artifact, HalfResult]:
    """Export the run in half precision, then keep it only where it is measured faster on the target."""
    from bmc.export import ExportConfig, export

    half = export(ExportConfig(run_dir=artifact.run_dir, fp16=True, out=artifact.out_dir / HALF_FILE))
    judged = dataclasses.replace(judge_fp16(artifact.onnx, half.path, config.target, config.quantization), max_abs_diff=half.max_abs_diff)
    if judged.accepted:
        return dataclasses.replace(artifact, quantized=half.path), dataclasses.replace(judged, path=half.path)
    # A rejected candidate is not left beside the result, as with int8, nor named as if it were.
    half.path.unlink(missing_ok=True)
    Path(f"{half.path}.sha256").unlink(missing_ok=True)
    return artifact, judged


def judge_fp16(fp32_path: Path, fp16_path: Path, target: str, quantization: QuantizeConfig) -> HalfResult:
    """Time fp16 against fp32 on the target (best median of a few rounds each) and check the accuracy budget."""
    from bmc.runtime.sessions import cuda_works

    if target == "cuda" and not cuda_works():
        return HalfResult(
            target=target,
            timed_on=None,
            accepted=True,
            note="fp16 for cuda, not timed: onnxruntime has no working CUDA provider here; "
            "run `bmc bench MODEL.onnx MODEL-fp16.onnx --device cuda` on the target",
        )
    measured_on = Target(device=target, threads=quantization.threads)
    comparison = compare(
        Contender(Path(fp32_path), "fp32", measured_on), [Contender(Path(fp16_path), "fp16", measured_on)],
        settings=Settings(quantization.batch_sizes, SECONDS_PER_TIMING, quantization.calib_data, quantization.calib_data_dir),
    )
    half = comparison.candidates[0]
    speedup = {b: round(s, 3) for b, s in comparison.speedup(half).items()}
    drop = comparison.accuracy_drop_points(half)
    drop = round(drop, 4) if drop is not None else None
    budget = quantization.max_accuracy_drop_points
    # The speed guarantee, as int8's: faster than fp32 (by min_speedup) at every batch size.
    faster = bool(speedup) and all(s > quantization.min_speedup for s in speedup.values())
    within = drop is None or drop <= budget
    shown = ", ".join(f"{s:.2f}x at batch {b}" for b, s in speedup.items())
    if faster and within:
        note = f"fp16 on {target}: {shown}"
    elif not faster:
        note = f"kept fp32: fp16 is not faster on {target} at every batch size ({shown})"
    else:
        note = f"kept fp32: fp16 loses {drop:.2f} points, over the {budget} budget"
    return HalfResult(
        target=target,
        timed_on=target,
        accepted=faster and within,
        note=note,
        speedup=speedup,
        latency_ms={b: round(ms, 4) for b, ms in half.latency_ms.items()},
        baseline_latency_ms={b: round(ms, 4) for b, ms in comparison.baseline.latency_ms.items()},
        accuracy_drop_points=drop,
    )
