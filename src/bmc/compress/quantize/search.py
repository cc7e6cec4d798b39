"""Post-training int8 chosen by measurement on the CPU it runs on.

The obvious call (`quantize_static` on a fresh export) often gives a slower model, or one that
silently loses accuracy. So the graph is pre-processed once, a short list of recipes that suit this
CPU (dynamic int8 among them where matrix products do most of the work) is quantized, every
candidate is measured against the fp32 model in the same run (speed at each batch size, accuracy
on held-out data), and the fastest one that is faster everywhere and
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
from dataclasses import dataclass, field, replace
from pathlib import Path

from bmc.artifact import sha256_file, write_sidecar_sha256
from bmc.compress.compare import Contender, Settings, compare
from bmc.compress.quantize.calibration import Calibration, prepare
from bmc.compress.quantize.config import QuantizeConfig
from bmc.compress.quantize.compute import is_matmul_heavy
from bmc.compress.quantize.recipes import QuantRecipe, plain_recipes, quantize_with_recipe, recipes_to_try
from bmc.compress.quantize.runtimes import FP32, choose_file, file_choices, onnxruntime_only, search_targets
from bmc.compress.quantize.sensitivity import sensitive_nodes
from bmc.errors import BmcError
from bmc.runtime.target import Target

log = logging.getLogger("bmc")

# Speed-ups closer than this are not told apart: rounds of the same model differ by 2-3% here.
SPEED_TIE = 0.03
# Sensitive layers kept in float, tried in this order until one meets the budget.
FALLBACK_FLOAT_LAYERS = (1, 2, 4, 8)
INT8_FILE = "model-int8.onnx"
FP32_FILE = "model-fp32.onnx"  # the fp32 model, handed over where another runtime or setting runs it faster


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
    chosen_for: tuple[int, ...] = ()  # the batch sizes the handed-over file runs as this pair

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
    """Post-training int8: the file handed over (None when fp32 stays on onnxruntime's defaults) and every candidate's figures."""

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
    # The handed-over file's runtime target per batch size (empty when fp32 stays on onnxruntime's
    # defaults), its speed-ups against fp32 on onnxruntime, and the best int8 on onnxruntime's
    # defaults alone measured in the same run: what other runtimes and settings added.
    runtime_targets: dict[int, Target] = field(default_factory=dict)
    chosen_speedup: dict[int, float] = field(default_factory=dict)
    onnxruntime_only_speedup: dict[int, float] = field(default_factory=dict)
    targets_searched: list[Target] = field(default_factory=list)


def judge(candidate: Candidate, config: QuantizeConfig) -> tuple[bool, str]:
    """Accept a candidate only if it is faster than fp32 at every batch size and within the accuracy budget."""
    slow = {b: s for b, s in candidate.speedup.items() if not s >= config.min_speedup}
    if slow:
        worst = min(slow, key=slow.get)
        return False, f"not faster than fp32: {slow[worst]:.2f}x at batch {worst} (needs {config.min_speedup:g}x)"
    if candidate.accuracy_drop_points is not None and candidate.accuracy_drop_points > config.max_accuracy_drop_points:
        return False, f"loses {candidate.accuracy_drop_points:.2f} points (budget {config.max_accuracy_drop_points:g})"
    return True, "faster everywhere and within the accuracy budget"


def lost_on_accuracy_only(result: QuantizeResult, config: QuantizeConfig) -> bool:
    """No candidate accepted, but one was fast enough and failed only the accuracy budget."""
    return result.chosen_recipe in (None, FP32) and any(
        _fast_enough(c, config) and c.accuracy_drop_points > config.max_accuracy_drop_points for c in result.candidates
    )


def quantize_int8(model_path: Path, out_dir: Path, config: QuantizeConfig, baseline_path: Path | None = None,
                  recipes_tried: str = "auto") -> QuantizeResult:
    """Quantize model_path to int8 by the best measured recipe; writes out_dir/model-int8.onnx when one is accepted.

    Speed and accuracy are judged against baseline_path (default: model_path itself); quantization-aware
    fine-tuning passes the original model here, so its budget is the original's accuracy.
    recipes_tried (recipes.RECIPE_SETS): "auto" tries the static recipes, and the dynamic one too
    where matrix products do most of the model's compute; "static" or "dynamic" only those.
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
        made, recipes, unmade = [], {}, []
        matmul_heavy = recipes_tried == "auto" and is_matmul_heavy(calibration.model)
        for recipe in recipes_to_try(flags, recipes_tried, matmul_heavy):
            path = work / f"int8-{recipe.name}.onnx"
            try:
                routed = quantize_with_recipe(calibration, path, recipe, batch_sizes=config.batch_sizes, threads=config.threads)
            except BmcError as exc:
                if not recipe.dynamic:
                    raise
                # The dynamic recipe is an extra try beside the static ones: its failure rejects it alone.
                unmade.append(Candidate(recipe.name, "", 0, None, None, {}, {}, accepted=False, reason=f"could not be made: {exc}"))
                continue
            if recipe.gemm_convolutions and not routed:
                continue  # no convolution ran faster as a GEMM: the same file as the recipe without it
            made.append((recipe.name, path))
            recipes[recipe.name] = recipe
        reference = Path(baseline_path) if baseline_path is not None else model_path
        targets = search_targets(config.runtimes, "cpu", config.threads)
        # The fp32 model itself on the other targets, where it is the model the search started from
        # (quantization-aware fine-tuning judges against the original, which it cannot hand over).
        fp32_elsewhere = [(FP32, reference)] if baseline_path is None and len(targets) > 1 else []
        candidates, baseline = _measure(reference, made, config, calibration.data, targets, fp32_elsewhere)
        for candidate in unmade:
            candidate.target = targets[0]
        candidates = unmade + candidates
        fallback_note = ""
        # The fallback recalibrates and keeps layers in float: static recipes only (dynamic ones calibrate nothing).
        fast_enough = [c for c in candidates if c.recipe in recipes and not recipes[c.recipe].dynamic and _fast_enough(c, config)]
        if not any(c.accepted for c in candidates if c.recipe != FP32) and config.measure_accuracy and fast_enough:
            fastest = recipes[max(fast_enough, key=lambda c: c.mean_speedup).recipe]
            more, fallback_note = _accuracy_fallback(reference, calibration, fastest, work, config, targets)
            candidates.extend(more)
        choices = file_choices(candidates, config.batch_sizes, config.max_accuracy_drop_points, config.min_speedup, targets[0],
                               baseline.size_bytes, SPEED_TIE)
        choice = choose_file(choices, SPEED_TIE, targets[0])
        for candidate in candidates:
            candidate.chosen_for = tuple(b for b, t in choice.targets.items() if candidate.recipe == choice.label and candidate.target == t)
        on_defaults = all(t == targets[0] for t in choice.targets.values())
        chosen_path = None
        if choice.label == FP32 and on_defaults:
            note = "kept fp32: no int8 recipe was faster at every batch size within the accuracy budget"
        else:
            source = reference if choice.label == FP32 else next(Path(c.path) for c in candidates if c.recipe == choice.label)
            chosen_path = out_dir / (FP32_FILE if choice.label == FP32 else INT8_FILE)
            _hand_over(source, chosen_path, choice.targets)
            what = "kept fp32, on a faster runtime or setting" if choice.label == FP32 else f"int8 by {choice.label}"
            note = f"{what}: " + ", ".join(f"{s:.2f}x at batch {b} on {choice.targets[b].label}" for b, s in choice.speedup.items())
        if fallback_note:
            note += f" ({fallback_note})"
        for candidate in candidates:
            candidate.path = str(chosen_path) if candidate.recipe == choice.label and chosen_path is not None else ""
        ort_best = onnxruntime_only(candidates, config.batch_sizes, config.max_accuracy_drop_points, targets[0])
        return QuantizeResult(
            source=str(model_path),
            chosen=str(chosen_path) if chosen_path else None,
            chosen_recipe=choice.label if chosen_path else None,
            baseline_accuracy=baseline.accuracy,
            baseline_latency_ms={b: round(ms, 4) for b, ms in baseline.latency_ms.items()},
            baseline_size_bytes=baseline.size_bytes,
            candidates=candidates,
            cpu_flags=flags,
            calibration=CalibrationSummary(calibration.data, calibration.samples, config.calib_method),
            note=note,
            runtime_targets=dict(choice.targets) if chosen_path else {},
            chosen_speedup={b: round(v, 3) for b, v in choice.speedup.items()},
            onnxruntime_only_speedup={b: round(v, 3) for b, v in ort_best.items()},
            targets_searched=list(targets),
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


def _measure(reference: Path, labelled: list[tuple[str, Path]], config: QuantizeConfig, data_name: str,
             targets: tuple[Target, ...], fp32_elsewhere: list[tuple[str, Path]] = ()):
    """fp32 on the first target and every labelled file on every target, in one run (fp32_elsewhere:
    files on every target but the first): (the judged candidates, fp32's measurement)."""
    contenders = [Contender(path, label, target) for label, path in fp32_elsewhere for target in targets[1:]]
    contenders += [Contender(path, label, target) for label, path in labelled for target in targets]
    comparison = compare(
        Contender(reference, "fp32", targets[0]),
        contenders,
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
        if measured.unopened:
            candidate.accepted, candidate.reason = False, f"{measured.contender.target.label} cannot run it: {measured.unopened}"
        else:
            candidate.accepted, candidate.reason = judge(candidate, config)
        candidates.append(candidate)
    return candidates, comparison.baseline


def _hand_over(source: Path, target: Path, runtime_targets: dict[int, Target]) -> None:
    """source written as target with the chosen runtime target per batch size in its metadata, and its manifest."""
    from bmc.runtime.metadata import ModelMetadata, write_with_metadata
    from bmc.runtime.model_file import open_model

    metadata = ModelMetadata.from_props(open_model(source).metadata_props)
    write_with_metadata(source, target, replace(metadata, runtime_targets=dict(runtime_targets)))


def _fast_enough(candidate: Candidate, config: QuantizeConfig) -> bool:
    """Meets the speed guarantee and has a measured accuracy to judge."""
    return candidate.accuracy_drop_points is not None and all(v >= config.min_speedup for v in candidate.speedup.values())


def _accuracy_fallback(reference: Path, calibration: Calibration, recipe: QuantRecipe, work: Path,
                       config: QuantizeConfig, targets: tuple[Target, ...]) -> tuple[list[Candidate], str]:
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
    more, _ = _measure(reference, labelled, config, calibration.data, targets)
    scanned = ", ".join(f"{name} {drop:.1f} dB" for name, drop in ranked[:4])
    return more, (f"accuracy fallback on {recipe.name}: {other_method} calibration and up to {len(labelled) - 1} "
                  f"sensitivity-ranked layer sets in float; most sensitive: {scanned}")
