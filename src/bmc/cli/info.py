"""`bmc info`: what this bmc knows (data sets, models, machine), or what a run directory holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def info_command(
    target: Optional[Path] = typer.Argument(None, help="A run directory; omit to list data sets, models and the machine."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List data sets, models and this machine's capabilities, or describe a run directory."""
    if target is not None:
        from bmc.artifact import read_meta, resolve_run_dir

        meta = read_meta(resolve_run_dir(target))
        if json_output:
            typer.echo(json.dumps(meta, indent=2))
            return
        last = meta["history"][-1] if meta.get("history") else {}
        typer.echo(f"run        {target}  ({meta.get('status', '?')}, {meta.get('completed_epochs', 0)}/{meta.get('epochs', '?')} epochs)")
        typer.echo(f"model      {meta['model']['name']}  {meta['model']['parameters']:,} parameters, input {meta['model']['input_shape']}")
        typer.echo(f"data       {meta['data']['name']}  {meta['data']['train_samples']} train / {meta['data']['test_samples']} test")
        typer.echo(f"weights    {meta['weights']['file']}  sha256 {meta['weights']['sha256'][:16]}…")
        typer.echo("metrics    " + ", ".join(f"{k} {v}" for k, v in last.items() if k.startswith("test_")))
        return

    from bmc.data import describe_datasets
    from bmc.environment import environment
    from bmc.models import describe_models

    report = {"datasets": describe_datasets(), "models": describe_models(), "environment": environment()}
    if json_output:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo("data sets:")
    for name, text in report["datasets"].items():
        typer.echo(f"  {name:<16} {text}")
    typer.echo("models (and any torchvision classifier as torchvision:<name>):")
    for name, text in report["models"].items():
        typer.echo(f"  {name:<16} {text}")
    cpu = report["environment"]["cpu"]
    typer.echo(f"cpu: {cpu['model']}, {cpu['usable_cores']} cores, flags: {' '.join(cpu['flags']) or 'none of interest'}")


def register(app: typer.Typer) -> None:
    app.command("info")(info_command)
