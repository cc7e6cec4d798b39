"""`bmc train`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from bmc.errors import UsageError


def parse_model_args(pairs: list[str]) -> dict:
    """KEY=VALUE pairs; values parse as JSON where they can (numbers, lists), else stay strings."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--model-arg expects KEY=VALUE, got {pair!r}")
        try:
            parsed[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key.strip()] = value
    return parsed


def parse_shape(text: str) -> tuple[int, ...]:
    """'3x32x32' or '3,32,32' -> (3, 32, 32)."""
    try:
        shape = tuple(int(part) for part in text.replace(",", "x").split("x") if part.strip())
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise UsageError(f"--input-shape expects positive sizes like 3x32x32, got {text!r}")
    return shape


# The options a resumed run may still take; every other one is a setting --resume reads from the run itself.
RESUME_OPTIONS = ("resume", "download", "device", "threads", "quiet", "json_output")


def train_command(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Architecture (see `bmc info`); default: the data set's."),
    model_arg: list[str] = typer.Option([], "--model-arg", help="Architecture argument KEY=VALUE, repeatable (e.g. preset=small)."),
    dataset: str = typer.Option("digits", "--dataset", "-d", help="Data set (see `bmc info`)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where the data set lives (torchvision sets, imagefolder)."),
    download: bool = typer.Option(False, "--download", help="Let torchvision download a missing data set."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="imagefolder: resize every image to this square size."),
    input_shape: str = typer.Option("3x32x32", "--input-shape", help="synthetic: the shape of one sample."),
    epochs: Optional[int] = typer.Option(None, "--epochs", "-e", help="Epochs (default: the model's recipe, else the data set's)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Global batch size."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: the model's recipe, else the data set's)."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="sgd (Nesterov) or adamw; default by architecture."),
    schedule: str = typer.Option("onecycle", "--schedule", help="onecycle or cosine (both with warm-up)."),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", "--precision", help="auto, fp32, bf16 or fp16."),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help="Default: on for conv nets."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    compile_mode: Optional[str] = typer.Option(
        None, "--compile-mode", help="auto (reduce-overhead on one GPU), default, reduce-overhead (CUDA graphs) or max-autotune; implies --compile."
    ),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: all cores)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/DATASET-MODEL-N)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue RUN_DIR from its last complete epoch."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Train a model (default: a small CNN on the embedded digits set); saves runs/<name>, points runs/latest at it."""
    from bmc.data import DataConfig
    from bmc.train import TrainConfig, train

    if resume is not None:
        # By name: typer's ParameterSource is not click's class, depending on the version.
        given = [
            name for name in ctx.params
            if name not in RESUME_OPTIONS and getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")
        ]
        if given:
            options = ", ".join("--" + name.replace("_", "-") for name in given)
            raise UsageError(f"--resume continues {resume} with the settings it was started with; drop {options}")
    config = TrainConfig(
        data=DataConfig(
            name=dataset,
            data_dir=data_dir,
            download=download,
            image_size=image_size,
            synthetic_shape=parse_shape(input_shape),
        ),
        model=model,
        model_args=parse_model_args(model_arg),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        schedule=schedule,
        label_smoothing=label_smoothing,
        weight_decay=weight_decay,
        device=device,
        precision=precision,
        channels_last=channels_last,
        compile=compile or compile_mode is not None,
        compile_mode=compile_mode or "auto",
        seed=seed,
        threads=threads,
        out=out,
    )
    if quiet or json_output:
        import logging

        logging.getLogger("bmc").setLevel(logging.WARNING)
    from bmc.cli.progress import RichTrainProgress

    progress = None if quiet or json_output else RichTrainProgress()
    try:
        run = train(config, progress=progress, resume=resume)
    finally:
        if progress is not None:
            progress.close()
    if run.run_dir is None:  # a non-main process of a distributed run
        return
    summary = run.summary()
    if json_output:
        typer.echo(json.dumps(summary, indent=2))
        return
    metric = (
        f"test accuracy {summary['test_accuracy']:.2%}"
        if "test_accuracy" in summary
        else f"test MSE {summary['test_mse']:.2f}, R² {summary['test_r2']:.3f}"
    )
    typer.echo(f"saved {run.run_dir} ({metric}, {summary['epochs']} epochs in {summary['train_seconds']:.1f} s)")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
