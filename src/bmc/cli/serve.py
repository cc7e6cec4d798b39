"""`bmc serve` (placeholder until bmc.serve_edge lands)."""

from __future__ import annotations

import typer

from bmc.errors import BmcError


def serve_command(models: list[str] = typer.Argument(None, help="ONNX files.")) -> None:
    """Serve ONNX models over the Open Inference Protocol (KServe v2)."""
    raise BmcError("`bmc serve` is not available in this version yet")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
