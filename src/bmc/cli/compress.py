"""`bmc compress`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def compress_command(
    source: Optional[Path] = typer.Argument(None, help="Run directory or MODEL.onnx (default: runs/latest)."),
    prune: float = typer.Option(0.0, "--prune", help="Fraction of multiply-accumulates to remove (0.5 = half the MACs)."),
    prune_method: str = typer.Option("l1-structured", "--prune-method", help="l1-structured (channels removed) or magnitude (weights zeroed)."),
    prune_strategy: str = typer.Option(
        "depth", "--prune-strategy",
        help="depth (the residual blocks that cost least per millisecond saved go whole, then block-internal), block-internal (residual streams keep their width; uniform where a model has none), uniform (every layer alike) or fastest (lowest measured latency).",
    ),
    prune_iterations: int = typer.Option(1, "--prune-iterations", help="Prune gradually: this many prune-then-fine-tune steps."),
    prune_params: float = typer.Option(
        0.0, "--prune-params",
        help="Also remove at least this fraction of the parameters (size), cut where one channel holds the most; with --prune (the MACs, speed).",
    ),
    finetune_epochs: Optional[int] = typer.Option(None, "--finetune-epochs", help="Fine-tuning after pruning, over all steps (default per data set)."),
    finetune_lr: Optional[float] = typer.Option(None, "--finetune-lr", help="Peak learning rate of fine-tuning after pruning (default: the run's own, rewound)."),
    distill: bool = typer.Option(True, "--distill/--no-distill", help="Fine-tune with the unpruned model as teacher."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="The run to distill from (same as the RUN_DIR argument)."),
    student: Optional[str] = typer.Option(None, "--student", help="Train this architecture from scratch, distilled from the run (names: bmc info)."),
    kd_temperature: float = typer.Option(4.0, "--kd-temperature", help="Distillation temperature (Hinton's T)."),
    kd_alpha: float = typer.Option(0.5, "--kd-alpha", help="Weight of the teacher's soft targets against the labels."),
    quantize: str = typer.Option("auto", "--quantize", help="int8, fp16, qat (int8 after quantization-aware fine-tuning) or none, each kept only if measured faster; auto: int8 for cpu, fp16 for cuda."),
    target: str = typer.Option("cpu", "--target", help="cpu or cuda: where the model will run, and is timed."),
    calib_data: Optional[str] = typer.Option(None, "--calib-data", help="Data set for calibration and accuracy (default: the model's)."),
    calib_data_dir: Optional[Path] = typer.Option(None, "--calib-data-dir", help="Where that data set lives."),
    calib_samples: int = typer.Option(512, "--calib-samples", help="Training samples used for calibration."),
    calib_method: str = typer.Option("minmax", "--calib-method", help="minmax, entropy or percentile."),
    max_accuracy_drop: float = typer.Option(1.0, "--max-accuracy-drop", help="Largest accepted accuracy loss, in points."),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime threads when timing candidates."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: RUN_DIR/compressed)."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Make a model smaller and faster: int8 chosen by measurement on this CPU (or fp16); writes compress_report.json."""
    from bmc.compress import CompressConfig, compress
    from bmc.compress.quantize import QuantizeConfig
    from bmc.errors import UsageError

    if teacher is not None:
        if source is not None and Path(source).resolve() != Path(teacher).resolve():
            raise UsageError(f"two teachers: RUN_DIR {source} and --teacher {teacher}; give one")
        source = teacher
    report = compress(
        CompressConfig(
            source=source,
            student=student,
            kd_temperature=kd_temperature,
            kd_alpha=kd_alpha,
            prune=prune,
            prune_method=prune_method,
            prune_strategy=prune_strategy,
            prune_iterations=prune_iterations,
            prune_params=prune_params,
            finetune_epochs=finetune_epochs,
            finetune_lr=finetune_lr,
            distill=distill,
            quantize=quantize,
            target=target,
            out=out,
            quantization=QuantizeConfig(
                calib_data=calib_data,
                calib_data_dir=calib_data_dir,
                calib_samples=calib_samples,
                calib_method=calib_method,
                max_accuracy_drop_points=max_accuracy_drop,
                threads=threads,
            ),
        )
    )
    if json_output:
        from dataclasses import asdict

        typer.echo(json.dumps(asdict(report), indent=2))
        return
    for stage in report.stages:
        if stage["stage"] == "distill":
            typer.echo(
                f"distilled {stage['teacher_model']} ({stage['teacher_parameters']:,} parameters, {stage['teacher_test_metrics']}) into "
                f"{stage['student_model']} ({stage['student_parameters']:,} parameters) over {stage['epochs']} epochs: {stage['test_metrics']}"
            )
        if stage["stage"] == "prune" and stage["method"] == "l1-structured":
            typer.echo(
                f"pruned ({stage['strategy']}; strategies timed: {_latencies(stage['candidate_latency_ms'])}): "
                f"{stage['macs_removed']:.0%} of MACs and {stage['params_removed']:.0%} of parameters removed; "
                f"after {stage.get('finetune_epochs', 0)} fine-tuning epochs: {stage.get('test_metrics', {})} "
                f"(original {stage['original_test_metrics']})"
            )
            if stage.get("blocks_dropped"):
                typer.echo(f"  residual blocks dropped whole: {', '.join(stage['blocks_dropped'])}")
                typer.echo("  blocks ranked by prediction shift (KL) per ms they save, first dropped first: "
                           + ", ".join(_block_cost(rank) for rank in stage["block_ranking"]))
            for name, why in stage.get("strategies_failed", {}).items():
                typer.echo(f"  strategy {name!r} could not be cut here: {why}")
            for step in stage.get("iterations", []):
                typer.echo(f"  step {step['step']}: {step['macs_removed']:.0%} of MACs removed, {step['finetune_epochs']} epochs, "
                           f"test accuracy {step.get('test_accuracy', float('nan')):.4f}")
        if stage["stage"] == "quantize" and stage["method"] == "qat":
            typer.echo(f"quantization-aware fine-tuning, {stage['finetune_epochs']} epochs: simulated int8 {stage['fake_quant_test_metrics']}")
        if stage["stage"] == "quantize" and stage["method"] in ("int8", "qat"):
            for candidate in stage["candidates"]:
                speed = ", ".join(f"{s:.2f}x at batch {b}" for b, s in candidate["speedup"].items())
                drop = candidate["accuracy_drop_points"]
                # The change in accuracy, as the summary table shows it: minus is a loss.
                accuracy = f", {-drop:+.2f} pt" if drop is not None else ""
                if stage["chosen_recipe"] == candidate["recipe"]:
                    mark = "chosen"
                else:
                    mark = "accepted, not the fastest" if candidate["accepted"] else "rejected: " + candidate["reason"]
                typer.echo(f"  {candidate['recipe']:<50} {speed}{accuracy}  [{mark}]")
            typer.echo(stage["note"])
        if stage["stage"] == "quantize" and stage["method"] == "fp16":
            typer.echo(stage["note"])
    if report.summary:
        _print_summary(report.summary)
    for note in report.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"result: {report.result} (report: {Path(report.out_dir) / 'compress_report.json'})")


def _print_summary(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"compress summary ({rows[0]['device']}; ratios to the original; gzip size and sparsity in the report)")
    for column in ("stage", "parameters", "size MB", "accuracy", "b1 ms", "b32 ms"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for row in rows:
        later = row is not rows[0]
        accuracy = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.2f}%"
        if later and row["accuracy_change_points"] is not None:
            accuracy += f" {row['accuracy_change_points']:+.2f}"
        latency = [
            (f"{row['latency_ms'][b]:.3f}" + (f" {row['speedup'][b]:.2f}x" if later else "")) if b in row["latency_ms"] else "-"
            for b in (1, 32)
        ]
        size = f"{row['size_bytes'] / 1e6:.3f}" + (f" {row['size_ratio']:.1f}x" if later else "")
        table.add_row(f"{row['stage']} ({row['format']})", f"{row['parameters']:,}", size, accuracy, *latency)
    Console(width=max(Console().width, 100)).print(table)


def _block_cost(rank: dict) -> str:
    if rank["time_ms"] is None:  # ranked by MACs: no time was measured
        return f"{rank['block']} {rank['prediction_shift_kl']:.3g} KL"
    return f"{rank['block']} {rank['prediction_shift_kl']:.3g} KL / {rank['time_ms']:.3g} ms"


def _latencies(by_strategy: dict) -> str:
    return "; ".join(f"{name} " + "/".join(f"{ms:.2f}" for ms in times.values()) + " ms" for name, times in by_strategy.items()) or "none"


def register(app: typer.Typer) -> None:
    app.command("compress")(compress_command)
