"""The closing summary: the original and every model the stages made, measured together, and the
notes a user needs where the figures alone do not say it."""

from __future__ import annotations

from pathlib import Path

from bmc.compress.compare import Contender, Settings, compare
from bmc.compress.config import CompressConfig
from bmc.compress.quantize.runtimes import FP32
from bmc.runtime.target import Target
from bmc.compress.report import (
    DistillResult,
    HalfResult,
    Metrics,
    PruneOutcome,
    PruneResult,
    QatResult,
    QuantizeResult,
    SparsityResult,
    StageResult,
    SummaryRow,
)

# Timing per model and batch size over all rounds (compare.py alternates the models): a single pass
# once timed the original 6% slower than alternating rounds did (docs/experiments.md, 4.6).
SUMMARY_SECONDS = 0.6
UNPRUNED_INT8 = "model-int8-unpruned.onnx"
NOT_PRUNED = "int8, not pruned"


def produced_models(results: list[StageResult]) -> list[tuple[str, Path]]:
    """(label, file) of every model the stages made and kept, in order."""
    produced = []
    for result in results:
        if isinstance(result, PruneResult):
            produced.append(("pruned" + (" + kd" if result.finetune.distilled else ""), result.exported.path))
        elif isinstance(result, SparsityResult):
            produced.append(("sparse" + (" + kd" if result.finetune.distilled else ""), result.exported.path))
        elif isinstance(result, DistillResult):
            produced.append((f"student {result.student_model}", result.exported.path))
        elif isinstance(result, HalfResult) and result.accepted and result.path is not None:
            produced.append(("fp16", result.path))
        elif isinstance(result, QuantizeResult) and result.chosen:
            produced.append((result.chosen_recipe if result.chosen_recipe == FP32 else "int8", Path(result.chosen)))
        elif isinstance(result, QatResult) and result.chosen is not None:
            produced.append(("qat", result.chosen))
    return produced


def summarize(original: Path, results: list[StageResult], config: CompressConfig, out_dir: Path) -> tuple[list[SummaryRow], list[str]]:
    """Bench the original and each stage's model in one run, on the target when it is here (else
    this CPU); with int8 after pruning, the original quantized by the same recipe too. Returns the
    rows (the original first) and the notes."""
    from bmc.runtime.sessions import cuda_works

    produced = produced_models(results)
    prune = next((r for r in results if isinstance(r, PruneResult)), None)
    reference = _unpruned_int8(original, results, config, out_dir) if prune is not None else None
    if reference is not None:
        produced.append((NOT_PRUNED, reference))
    # On the threads the search's baseline ran on, so the original here is the search's baseline.
    measured_on = Target(device="cuda" if config.target == "cuda" and cuda_works() else "cpu", threads=config.quantization.threads)
    # fp32 handed over for a faster runtime or setting is the original on onnxruntime: no row of its own there.
    contenders = [Contender(path, label, measured_on) for label, path in produced if label != FP32]
    # The handed-over file on each runtime target it was chosen for, beside its row on onnxruntime.
    chosen_on = _chosen_targets(results)
    if produced and chosen_on:
        label, path = produced[-1] if reference is None else produced[-2]
        contenders += [Contender(path, f"{label} on {target.label}", target) for target in chosen_on if target != measured_on]
    comparison = compare(
        Contender(original, "original", measured_on), contenders,
        settings=Settings((1, 32), SUMMARY_SECONDS, config.quantization.calib_data if config.quantization.measure_accuracy else None,
                          config.quantization.calib_data_dir),
    )
    rows = []
    for measured in (comparison.baseline, *comparison.candidates):
        drop = comparison.accuracy_drop_points(measured)
        rows.append(SummaryRow(
            stage=measured.contender.label, path=measured.contender.path, format=measured.format, device=measured.device,
            parameters=measured.parameters, size_bytes=measured.size_bytes, gzip_bytes=measured.gzip_bytes,
            weight_sparsity=measured.weight_sparsity, accuracy=measured.accuracy,
            latency_ms={b: round(ms, 4) for b, ms in measured.latency_ms.items()},
            size_ratio=round(comparison.size_ratio(measured), 3),
            speedup={b: round(s, 3) for b, s in comparison.speedup(measured).items()},
            accuracy_change_points=round(-drop, 3) if drop is not None else None,
            runtime=measured.contender.target.label,
        ))
    notes = []
    for result in results:
        if isinstance(result, (PruneResult, SparsityResult)):
            notes += pruning_cost(result.original_metrics, result.finetune.metrics, config.quantization.max_accuracy_drop_points)
        if isinstance(result, PruneResult):
            notes += pruning_shortfall(result, config)
    if reference is not None:
        pruned_row = next(r for r in rows if r.path == produced[-2][1] and r.runtime == measured_on.label)
        unpruned_row = next(r for r in rows if r.stage == NOT_PRUNED)
        notes += pruning_paid_off(pruned_row, unpruned_row, prune.cut)
    return rows, notes


def _chosen_targets(results: list[StageResult]) -> list[Target]:
    """The distinct runtime targets the int8 search chose for the handed-over file, by batch size."""
    final = results[-1] if results else None
    quantized = final if isinstance(final, QuantizeResult) else final.quantized if isinstance(final, QatResult) else None
    if quantized is None or not quantized.runtime_targets:
        return []
    return list(dict.fromkeys(quantized.runtime_targets[b] for b in sorted(quantized.runtime_targets)))


def _unpruned_int8(original: Path, results: list[StageResult], config: CompressConfig, out_dir: Path) -> Path | None:
    """The original model quantized by the recipe the pruned one got: what int8 alone would have
    given. None unless the result is int8 of a plain recipe."""
    from bmc.compress.quantize.search import quantize_like

    final = results[-1] if results else None
    recipe = final.chosen_recipe if isinstance(final, QuantizeResult) else final.quantized.chosen_recipe if isinstance(final, QatResult) else None
    if recipe is None:
        return None
    return quantize_like(original, out_dir / UNPRUNED_INT8, recipe, config.quantization)


def pruning_cost(before: Metrics, after: Metrics, budget_points: float) -> list[str]:
    """A note when the pruned, fine-tuned model lost more than the accuracy budget: pruning is what
    the user asked for, so it stays the result, but not silently (a digits CNN pruned by half with
    one epoch of fine-tuning lost 17.5 points)."""
    advice = "fine-tune longer (--finetune-epochs) or prune less"
    if before.accuracy is not None and after.accuracy is not None:
        lost = 100 * (before.accuracy - after.accuracy)
        if lost > budget_points:
            return [f"pruning cost {lost:.2f} points of test accuracy, more than the {budget_points:g}-point budget (--max-accuracy-drop): {advice}"]
    elif before.r2 is not None and after.r2 is not None and before.r2 - after.r2 > budget_points / 100:
        return [f"pruning lowered the test R² from {before.r2:.3f} to {after.r2:.3f}: {advice}"]
    return []


def pruning_shortfall(result: PruneResult, config: CompressConfig) -> list[str]:
    """A note for each target (MACs, parameters) that pruning fell short of: all that could go went."""
    notes = []
    for what, removed, asked in (("MACs", result.macs_removed, config.prune), ("parameters", result.params_removed, config.prune_params)):
        if removed < asked - 0.005:
            notes.append(
                f"pruning removed {removed:.1%} of the {what}, not the {asked:.0%} asked: that is all that could go "
                f"({result.cut.strategy}; layers left dense: {', '.join(result.cut.left_dense) or 'none'})"
            )
    return notes


def pruning_paid_off(pruned: SummaryRow, unpruned: SummaryRow, cut: PruneOutcome) -> list[str]:
    """A note when the pruned int8 model is no faster than int8 alone at some batch size (with what
    pruning cost, and the way out where the model has residual blocks to drop)."""
    slower = {b: ms for b, ms in pruned.latency_ms.items() if ms >= unpruned.latency_ms.get(b, float("inf"))}
    if not slower:
        return []
    lost = ""
    if None not in (pruned.accuracy, unpruned.accuracy) and pruned.accuracy < unpruned.accuracy:
        lost = f" and cost {100 * (unpruned.accuracy - pruned.accuracy):.2f} points"
    where = ", ".join(f"batch {b}: {ms:.3f} against {unpruned.latency_ms[b]:.3f} ms" for b, ms in slower.items())
    smaller = 1 - pruned.size_bytes / unpruned.size_bytes
    droppable = cut.droppable_blocks
    depth = ""
    if droppable and not cut.blocks_dropped:
        depth = (f"; --prune-strategy depth removes whole residual blocks instead ({droppable} of this model's can go), "
                 "which takes operators and their fixed costs away, not only arithmetic")
    return [
        f"pruning bought no speed over int8 alone ({where}){lost}, for a {smaller:.0%} smaller file; "
        f"the unpruned int8 model is {unpruned.path}{depth}"
    ]
