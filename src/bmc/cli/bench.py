"""`bmc bench` (placeholder until bmc.bench lands)."""

from __future__ import annotations

import typer

from bmc.errors import BmcError


def bench_command(models: list[str] = typer.Argument(None, help="ONNX files.")) -> None:
    """Measure ONNX models in onnxruntime: size, latency, throughput, accuracy."""
    raise BmcError("`bmc bench` is not available in this version yet")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
