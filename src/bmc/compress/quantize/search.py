"""Post-training int8 chosen by measurement on the CPU it runs on.

The obvious call (`quantize_static` on a fresh export) often gives a slower model, or one that
silently loses accuracy. So the graph is pre-processed once, a short list of recipes that suit this
CPU is quantized, every candidate is measured against the fp32 model in the same run (speed at
each batch size, accuracy on held-out data), and the fastest one that is faster everywhere and
within the accuracy budget is kept (the smallest file among those within timing noise of it), or
fp32 is kept and the report says why. When the recipes are fast enough but lose too much, the
fastest is retried with another calibration method and with its most sensitive layers in float.
No torch here.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from bmc.artifact import sha256_file, write_sidecar_sha256
from bmc.compress.compare import Contender, Settings, compare
from bmc.compress.quantize.calibration import Calibration, prepare
from bmc.compress.quantize.config import QuantizeConfig
from bmc.compress.quantize.recipes import QuantRecipe, candidate_recipes, plain_recipes, quantize_with_recipe
from bmc.compress.quantize.sensitivity import sensitive_nodes
from bmc.errors import BmcError
from bmc.runtime.target import Target

log = logging.getLogger("bmc")

# Speed-ups closer than this are not told apart: rounds of the same model differ by 2-3% here.
SPEED_TIE = 0.03
# Sensitive layers kept in float, tried in this order until one meets the budget.
FALLBACK_FLOAT_LAYERS = (1, 2, 4, 8)
INT8_FILE = "model-int8.onnx"


@dataclass
class Candidate:
    """An int8 file as measured against fp32 in the same run, and whether it is accepted."""

    recipe: str
    path: str  # "" once the search is over, unless it is the file chosen
    size_bytes: int
    accuracy: float | None
    accuracy_drop_points: float | None
    speedup: dict[int, float]  # batch size -> fp32 latency / this latency
    latency_ms: dict[int, float]
    target: Target = field(default_factory=Target)  # the runtime it was measured on
    accepted: bool = False
    reason: str = ""

    @property
    def mean_speedup(self) -> float:
        """The geometric mean of the speed-ups over the timed batch sizes."""
        return math.prod(self.speedup.values()) ** (1 / len(self.speedup))


@dataclass(frozen=True)
class CalibrationSummary:
    data: str
    samples: int
    method: str


@dataclass
class QuantizeResult:
    """Post-training int8: the chosen file (None when fp32 is kept) and every candidate's figures."""

    source: str
    chosen: str | None
    chosen_recipe: str | None
    baseline_accuracy: float | None
    baseline_latency_ms: dict[int, float]
    baseline_size_bytes: int
    candidates: list[Candidate] = field(default_factory=list)
    cpu_flags: list[str] = field(default_factory=list)
    calibration: CalibrationSummary | None = None
    note: str = ""


def judge(candidate: Candidate, config: QuantizeConfig) -> tuple[bool, str]:
    """Accept a candidate only if it is faster than fp32 at every batch size and within the accuracy budget."""
    slow = {b: s for b, s in candidate.speedup.items() if not s >= config.min_speedup}
    if slow:
        worst = min(slow, key=slow.get)
        return False, f"not faster than fp32: {slow[worst]:.2f}x at batch {worst} (needs {config.min_speedup:g}x)"
    if candidate.accuracy_drop_points is not None and candidate.accuracy_drop_points > config.max_accuracy_drop_points:
        return False, f"loses {candidate.accuracy_drop_points:.2f} points (budget {config.max_accuracy_drop_points:g})"
    return True, "faster everywhere and within the accuracy budget"


def choose_candidate(accepted: list[Candidate]) -> Candidate | None:
    """The fastest accepted candidate (geometric mean of its speed-ups), except that among those
    within SPEED_TIE of it the smallest file wins: closer than that is timing noise on a shared
    machine, while size is exact (docs/experiments.md, 4.15)."""
    if not accepted:
        return None
    fastest = max(c.mean_speedup for c in accepted)
    near = [c for c in accepted if c.mean_speedup >= fastest * (1 - SPEED_TIE)]
    return min(near, key=lambda c: (c.size_bytes, c.accuracy_drop_points or 0.0, -c.mean_speedup))


def lost_on_accuracy_only(result: QuantizeResult, config: QuantizeConfig) -> bool:
    """No candidate accepted, but one was fast enough and failed only the accuracy budget."""
    return result.chosen is None and any(
        _fast_enough(c, config) and c.accuracy_drop_points > config.max_accuracy_drop_points for c in result.candidates
    )


def quantize_int8(model_path: Path, out_dir: Path, config: QuantizeConfig, baseline_path: Path | None = None) -> QuantizeResult:
    """Quantize model_path to int8 by the best measured recipe; writes out_dir/model-int8.onnx when one is accepted.

    Speed and accuracy are judged against baseline_path (default: model_path itself); quantization-aware
    fine-tuning passes the original model here, so its budget is the original's accuracy.
    """
    from bmc.environment import cpu_info

    model_path = Path(model_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / ".quantize"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        calibration = prepare(model_path, config, work)
        flags = cpu_info()["flags"]
        made, recipes = [], {}
        for recipe in candidate_recipes(flags):
            path = work / f"int8-{recipe.name}.onnx"
            routed = quantize_with_recipe(calibration, path, recipe, batch_sizes=config.batch_sizes, threads=config.threads)
            if recipe.gemm_convolutions and not routed:
                continue  # no convolution ran faster as a GEMM: the same file as the recipe without it
            made.append((recipe.name, path))
            recipes[recipe.name] = recipe
        reference = Path(baseline_path) if baseline_path is not None else model_path
        candidates, baseline = _measure(reference, made, config, calibration.data)
        fallback_note = ""
        fast_enough = [c for c in candidates if _fast_enough(c, config)]
        if not any(c.accepted for c in candidates) and config.measure_accuracy and fast_enough:
            fastest = recipes[max(fast_enough, key=lambda c: c.mean_speedup).recipe]
            more, fallback_note = _accuracy_fallback(reference, calibration, fastest, work, config)
            candidates.extend(more)
        chosen = choose_candidate([c for c in candidates if c.accepted])
        chosen_path = None
        if chosen is not None:
            chosen_path = out_dir / INT8_FILE
            os.replace(chosen.path, chosen_path)
            write_sidecar_sha256(chosen_path, sha256_file(chosen_path))
            note = f"int8 by {chosen.recipe}: " + ", ".join(f"{s:.2f}x at batch {b}" for b, s in chosen.speedup.items())
        else:
            note = "kept fp32: no int8 recipe was faster at every batch size within the accuracy budget"
        if fallback_note:
            note += f" ({fallback_note})"
        for candidate in candidates:
            candidate.path = str(chosen_path) if candidate is chosen else ""
        return QuantizeResult(
            source=str(model_path),
            chosen=str(chosen_path) if chosen_path else None,
            chosen_recipe=chosen.recipe if chosen else None,
            baseline_accuracy=baseline.accuracy,
            baseline_latency_ms={b: round(ms, 4) for b, ms in baseline.latency_ms.items()},
            baseline_size_bytes=baseline.size_bytes,
            candidates=candidates,
            cpu_flags=flags,
            calibration=CalibrationSummary(calibration.data, calibration.samples, config.calib_method),
            note=note,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def quantize_like(model_path: Path, target: Path, recipe_name: str, config: QuantizeConfig) -> Path | None:
    """model_path quantized by the named recipe with config's calibration, no candidates and no
    judging: a reference to compare a result with. None when the name is no plain recipe."""
    recipe = plain_recipes().get(recipe_name)
    if recipe is None:
        return None
    work = target.parent / f".{target.stem}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        calibration = prepare(Path(model_path), config, work)
        quantize_with_recipe(calibration, work / "quantized.onnx", recipe, batch_sizes=config.batch_sizes, threads=config.threads)
        os.replace(work / "quantized.onnx", target)
        write_sidecar_sha256(target, sha256_file(target))
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(reference: Path, labelled: list[tuple[str, Path]], config: QuantizeConfig, data_name: str):
    """fp32 and every labelled int8 file measured in one run: (the judged candidates, fp32's measurement)."""
    measured_on = Target(device="cpu", threads=config.threads)
    comparison = compare(
        Contender(reference, "fp32", measured_on),
        [Contender(path, label, measured_on) for label, path in labelled],
        settings=Settings(config.batch_sizes, config.seconds_per_timing, data_name if config.measure_accuracy else None, config.calib_data_dir),
    )
    candidates = []
    for measured in comparison.candidates:
        drop = comparison.accuracy_drop_points(measured)
        candidate = Candidate(
            recipe=measured.contender.label,
            path=str(measured.contender.path),
            size_bytes=measured.size_bytes,
            accuracy=measured.accuracy,
            accuracy_drop_points=round(drop, 4) if drop is not None else None,
            speedup={b: round(s, 3) for b, s in comparison.speedup(measured).items()},
            latency_ms={b: round(ms, 4) for b, ms in measured.latency_ms.items()},
            target=measured.contender.target,
        )
        candidate.accepted, candidate.reason = judge(candidate, config)
        candidates.append(candidate)
    return candidates, comparison.baseline


def _fast_enough(candidate: Candidate, config: QuantizeConfig) -> bool:
    """Meets the speed guarantee and has a measured accuracy to judge."""
    return candidate.accuracy_drop_points is not None and all(v >= config.min_speedup for v in candidate.speedup.values())


def _accuracy_fallback(reference: Path, calibration: Calibration, recipe: QuantRecipe, work: Path,
                       config: QuantizeConfig) -> tuple[list[Candidate], str]:
    """When every recipe fast enough loses too much accuracy: the fastest one (`recipe`) again with
    another calibration method, and with its most sensitive layers left in float. Returns (new candidates, note)."""
    labelled = []
    other_method = "percentile" if config.calib_method != "percentile" else "entropy"
    path = work / f"int8-{recipe.name}-{other_method}.onnx"
    try:
        quantize_with_recipe(calibration.using(method=other_method), path, recipe, batch_sizes=config.batch_sizes, threads=config.threads)
        labelled.append((f"{recipe.name}, {other_method} calibration", path))
    except BmcError as exc:
        log.info("%s", exc)
    ranked = sensitive_nodes(calibration, recipe, work)
    for count in FALLBACK_FLOAT_LAYERS:
        if count > len(ranked):
            break
        excluded = tuple(name for name, _ in ranked[:count])
        path = work / f"int8-{recipe.name}-float{count}.onnx"
        quantize_with_recipe(calibration, path, recipe, excluded, batch_sizes=config.batch_sizes, threads=config.threads)
        labelled.append((f"{recipe.name}, {count} sensitive layer{'s' if count > 1 else ''} in float: {', '.join(excluded)}", path))
    if not labelled:
        return [], ""
    more, _ = _measure(reference, labelled, config, calibration.data)
    scanned = ", ".join(f"{name} {drop:.1f} dB" for name, drop in ranked[:4])
    return more, (f"accuracy fallback on {recipe.name}: {other_method} calibration and up to {len(labelled) - 1} "
                  f"sensitivity-ranked layer sets in float; most sensitive: {scanned}")
