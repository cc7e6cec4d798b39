"""`bmc compress`: flags to a CompressConfig, the report printed by the type of each stage's result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from bmc.compress.prune.strategies import get_strategy, strategy_names

PRUNING, TRAINING, QUANTIZATION, OUTPUT = "Pruning", "Training after the change", "Quantization", "Output"
CALIBRATION = "Calibration data and preprocessing"
STRATEGY_HELP = "; ".join(f"{name}: {get_strategy(name).help}" for name in strategy_names())


def compress_command(
    source: Optional[Path] = typer.Argument(
        None, metavar="[RUN_DIR | MODEL.onnx]",
        help="The teacher: a run directory (default: runs/latest), or an ONNX file, which can only be quantized.",
    ),
    prune: float = typer.Option(0.0, "--prune", help="Fraction of multiply-accumulates to remove by whole channels and blocks (0.5 = half).", rich_help_panel=PRUNING),
    prune_params: float = typer.Option(
        0.0, "--prune-params", help="Also remove at least this fraction of the parameters (size), cut where one channel holds the most.",
        rich_help_panel=PRUNING,
    ),
    prune_strategy: str = typer.Option("depth", "--prune-strategy", help=f"Which cut to keep. {STRATEGY_HELP}.", rich_help_panel=PRUNING),
    prune_iterations: int = typer.Option(1, "--prune-iterations", help="Prune gradually: this many prune-then-fine-tune steps.", rich_help_panel=PRUNING),
    sparsity: float = typer.Option(
        0.0, "--sparsity", help="Instead of --prune: zero this fraction of the weights by magnitude (smaller once gzipped, no faster).",
        rich_help_panel=PRUNING,
    ),
    prune_method: Optional[str] = typer.Option(None, "--prune-method", hidden=True),  # before --sparsity: "magnitude" meant it
    finetune_epochs: Optional[int] = typer.Option(
        None, "--finetune-epochs", help="Fine-tuning after pruning, over all steps (default per data set; 0: none).", rich_help_panel=TRAINING,
    ),
    finetune_lr: Optional[float] = typer.Option(None, "--finetune-lr", help="Peak learning rate of fine-tuning (default: the run's own, rewound).", rich_help_panel=TRAINING),
    distill: bool = typer.Option(True, "--distill/--no-distill", help="Fine-tune with the unchanged model as teacher.", rich_help_panel=TRAINING),
    student: Optional[str] = typer.Option(None, "--student", help="Train this architecture from scratch, distilled from the teacher (names: bmc info).", rich_help_panel=TRAINING),
    kd_temperature: float = typer.Option(4.0, "--kd-temperature", help="Distillation temperature (Hinton's T).", rich_help_panel=TRAINING),
    kd_alpha: float = typer.Option(0.5, "--kd-alpha", help="Weight of the teacher's soft targets against the labels.", rich_help_panel=TRAINING),
    qat: bool = typer.Option(False, "--qat", help="Fine-tune under simulated int8 before int8 (quantization-aware training).", rich_help_panel=TRAINING),
    teacher: Optional[Path] = typer.Option(None, "--teacher", hidden=True),  # before: the teacher run; now the argument
    quantize: str = typer.Option(
        "auto", "--quantize", help="int8, int8-dynamic, fp16 or none, kept only if measured faster; auto: int8 for cpu, fp16 for cuda. int8 tries "
             "dynamic int8 too where MatMul/Gemm/LSTM do most of the work; int8-dynamic tries it alone (no calibration).", rich_help_panel=QUANTIZATION,
    ),
    target: str = typer.Option("cpu", "--target", help="cpu or cuda: where the model will run, and is timed.", rich_help_panel=QUANTIZATION),
    max_accuracy_drop: float = typer.Option(1.0, "--max-accuracy-drop", help="Largest accepted accuracy loss, in points.", rich_help_panel=QUANTIZATION),
    calib_data: Optional[str] = typer.Option(
        None, "--calib-data",
        help="What int8 is calibrated (and accuracy scored) on: a data set (imagefolder: DIR/train/<class>/*, whose labels score the model "
             "when their class count is its output width), images (any tree of image files, no labels), npy (preprocessed inputs) or "
             "synthetic (random images). Default: the model's data set; for an ONNX file that names none, synthetic (speed only).",
        rich_help_panel=CALIBRATION,
    ),
    calib_data_dir: Optional[Path] = typer.Option(
        None, "--calib-data-dir", help="Where that data lives; for npy, a .npy file or a folder of them (N x C x H x W floats).", rich_help_panel=CALIBRATION,
    ),
    calib_samples: int = typer.Option(512, "--calib-samples", help="Training samples used for calibration.", rich_help_panel=CALIBRATION),
    calib_method: str = typer.Option("minmax", "--calib-method", help="minmax, entropy or percentile.", rich_help_panel=CALIBRATION),
    input_size: Optional[int] = typer.Option(
        None, "--input-size", help="For an ONNX file bmc did not write whose image size is dynamic: the size it takes (N x N). "
        "Images of other sizes have their shorter side scaled to it and their centre cropped (torchvision's Resize + CenterCrop).",
        rich_help_panel=CALIBRATION,
    ),
    mean: Optional[str] = typer.Option(
        None, "--mean", help="Per-channel mean, after --scale, for a model whose metadata gives none: imagenet (its std too) or numbers, "
        "e.g. 0.485,0.456,0.406. Default there: ImageNet's for 3 channels. Written into the output model's metadata.", rich_help_panel=CALIBRATION,
    ),
    std: Optional[str] = typer.Option(None, "--std", help="Per-channel std, as --mean: imagenet or numbers.", rich_help_panel=CALIBRATION),
    scale: Optional[str] = typer.Option(
        None, "--scale", help="What pixels (0-255) are multiplied by before --mean/--std: 1/255 (default: [0, 1]) or 1 ([0, 255]).", rich_help_panel=CALIBRATION,
    ),
    runtime: str = typer.Option(
        "all", "--runtime", help="Runtimes every candidate is timed on: onnxruntime, openvino, a comma-separated list, or all (every one "
        "installed here). The result records its fastest per batch size in its metadata; bmc serve runs it there.", rich_help_panel=QUANTIZATION,
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="Fix the threads every runtime times with (default: each runtime's own, and onnxruntime on one thread tried too).",
        rich_help_panel=QUANTIZATION,
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Output folder (default: RUN_DIR/compressed), replaced whole by each finished run.", rich_help_panel=OUTPUT,
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON.", rich_help_panel=OUTPUT),
) -> None:
    """Make a model smaller and faster: prune, distill, then int8 chosen by measurement on this CPU (or fp16); writes compress_report.json."""
    from bmc.compress import CompressConfig, QuantizeConfig, compress
    from bmc.cli.options import name_list
    from bmc.compress.quantize.config import InputPreprocessing
    from bmc.errors import UsageError

    if teacher is not None:
        if source is not None and Path(source).resolve() != Path(teacher).resolve():
            raise UsageError(f"two teachers: RUN_DIR {source} and --teacher {teacher}; give one (the teacher is the argument)")
        source = teacher
    if prune_method not in (None, "l1-structured", "magnitude"):
        raise UsageError(f"--prune-method is gone: --prune removes channels, --sparsity zeroes weights; got {prune_method!r}")
    if prune_method == "magnitude":
        prune, sparsity = 0.0, sparsity or prune
    if quantize == "qat":  # before --qat, QAT was spelled as a format
        quantize, qat = "int8", True
    report = compress(CompressConfig(
        source=source, prune=prune, prune_params=prune_params, prune_strategy=prune_strategy, prune_iterations=prune_iterations,
        sparsity=sparsity, finetune_epochs=finetune_epochs, finetune_lr=finetune_lr, distill=distill, student=student,
        kd_temperature=kd_temperature, kd_alpha=kd_alpha, qat=qat, quantize=quantize, target=target, out=out,
        quantization=QuantizeConfig(
            calib_data=calib_data, calib_data_dir=calib_data_dir, calib_samples=calib_samples, calib_method=calib_method,
            max_accuracy_drop_points=max_accuracy_drop, threads=threads, runtimes=name_list(runtime, "--runtime"),
            preprocessing=InputPreprocessing.from_flags(input_size, mean, std, scale),
        ),
    ))
    if json_output:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    print_report(report)


def print_report(report) -> None:
    """Each stage's result as sentences, by its type; then the summary table, the notes and the result."""
    from bmc.compress import DistillResult, HalfResult, InputsResult, PruneResult, QatResult, QuantizeResult, SparsityResult

    for stage in report.stages:
        if isinstance(stage, InputsResult):
            _print_inputs(stage)
        elif isinstance(stage, DistillResult):
            typer.echo(
                f"distilled {stage.teacher_model} ({stage.teacher_parameters:,} parameters, {stage.teacher_metrics}) into "
                f"{stage.student_model} ({stage.student_parameters:,} parameters) over {stage.finetune.epochs} epochs: {stage.finetune.metrics}"
            )
        elif isinstance(stage, PruneResult):
            _print_pruning(stage)
        elif isinstance(stage, SparsityResult):
            typer.echo(f"zeroed {stage.weights_zeroed:.0%} of the weights by magnitude (no faster: dense kernels do not skip zeros); "
                       f"{_after(stage.finetune)}: {stage.finetune.metrics} (original {stage.original_metrics})")
        elif isinstance(stage, QuantizeResult):
            _print_candidates(stage)
        elif isinstance(stage, QatResult):
            why = "post-training int8 lost too much accuracy; " if stage.fallback else ""
            typer.echo(f"{why}quantization-aware fine-tuning, {stage.finetune.epochs} epochs: simulated int8 {stage.finetune.metrics}")
            _print_candidates(stage.quantized)
        elif isinstance(stage, HalfResult):
            typer.echo(stage.note)
    if report.summary:
        _print_summary(report.summary)
    for note in report.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"result: {report.result} (report: {Path(report.out_dir) / 'compress_report.json'})")


def _print_inputs(inputs) -> None:
    where = f" from {inputs.data_dir}" if inputs.data_dir is not None else ""
    typer.echo(f"inputs: {inputs.data or 'no data'}{where}, shape {list(inputs.input_shape)}; {inputs.preprocessing}")
    if inputs.accuracy_measured:
        typer.echo(f"  accuracy scored on its labels ({len(inputs.class_names)} classes)")


def _after(finetune) -> str:
    if finetune.epochs == 0:
        return "not fine-tuned"
    return f"after {finetune.epochs} fine-tuning epochs" + (" with distillation" if finetune.distilled else "")


def _print_pruning(stage) -> None:
    cut = stage.cut
    timed = "; ".join(f"{name} " + "/".join(f"{ms:.2f}" for ms in times.values()) + " ms" for name, times in cut.candidate_latency_ms.items())
    typer.echo(
        f"pruned {stage.macs_removed:.0%} of MACs and {stage.params_removed:.0%} of parameters ({cut.strategy}; "
        f"strategies timed: {timed or 'none'}); {_after(stage.finetune)}: {stage.finetune.metrics} (original {stage.original_metrics})"
    )
    if cut.blocks_dropped:
        typer.echo(f"  residual blocks dropped whole: {', '.join(cut.blocks_dropped)}")
        typer.echo("  blocks ranked by prediction shift (KL) per ms they save, first dropped first: "
                   + ", ".join(_block_cost(rank) for rank in cut.block_ranking))
    for name, why in cut.strategies_failed.items():
        typer.echo(f"  strategy {name!r} could not be cut here: {why}")
    for step in stage.steps:
        typer.echo(f"  step {step.step}: {step.macs_removed:.0%} of MACs removed, {step.finetune_epochs} epochs, {step.metrics}")


def _block_cost(rank) -> str:
    if rank.time_ms is None:  # ranked by MACs: no time was measured
        return f"{rank.name} {rank.prediction_shift_kl:.3g} KL"
    return f"{rank.name} {rank.prediction_shift_kl:.3g} KL / {rank.time_ms:.3g} ms"


def _print_candidates(result) -> None:
    several = len({c.target for c in result.candidates}) > 1
    for candidate in result.candidates:
        speed = ", ".join(f"{s:.2f}x at batch {b}" for b, s in candidate.speedup.items()) or "not run"
        # The change in accuracy, as the summary table shows it: minus is a loss.
        accuracy = f", {-candidate.accuracy_drop_points:+.2f} pt" if candidate.accuracy_drop_points is not None else ""
        if candidate.chosen_for:
            mark = "chosen" + (f" for batch {', '.join(map(str, candidate.chosen_for))}" if several else "")
        else:
            mark = "accepted, not the fastest" if candidate.accepted else "rejected: " + candidate.reason
        name = f"{candidate.recipe} on {candidate.target.label}" if several else candidate.recipe
        typer.echo(f"  {name:<64} {speed}{accuracy}  [{mark}]")
    typer.echo(result.note)
    if result.runtime_targets and result.onnxruntime_only_speedup:
        against = ", ".join(
            f"batch {b}: {result.chosen_speedup[b]:.2f}x against {result.onnxruntime_only_speedup[b]:.2f}x"
            for b in result.chosen_speedup if b in result.onnxruntime_only_speedup
        )
        typer.echo(f"  against the best on onnxruntime's defaults alone ({against})")


def _print_summary(rows) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"compress summary ({rows[0].device}; ratios to the original; gzip size and sparsity in the report)")
    for column in ("stage", "parameters", "size MB", "accuracy", "b1 ms", "b32 ms"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for row in rows:
        later = row is not rows[0]
        accuracy = "-" if row.accuracy is None else f"{100 * row.accuracy:.2f}%"
        if later and row.accuracy_change_points is not None:
            accuracy += f" {row.accuracy_change_points:+.2f}"
        latency = [
            (f"{row.latency_ms[b]:.3f}" + (f" {row.speedup[b]:.2f}x" if later else "")) if b in row.latency_ms else "-"
            for b in (1, 32)
        ]
        size = f"{row.size_bytes / 1e6:.3f}" + (f" {row.size_ratio:.1f}x" if later else "")
        table.add_row(f"{row.stage} ({row.format})", f"{row.parameters:,}", size, accuracy, *latency)
    Console(width=max(Console().width, 100)).print(table)


def register(app: typer.Typer) -> None:
    app.command("compress")(compress_command)
