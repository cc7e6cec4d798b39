"""Commands whose implementation lands with later issues; they exist so the CLI's shape is stable."""

from __future__ import annotations

import typer

from bmc.errors import BmcError

PLANNED = {
    "compress": "Prune, quantize and distill a model (runs/latest by default).",
}


def _planned(name: str):
    def command(args: list[str] = typer.Argument(None, hidden=True)) -> None:
        raise BmcError(f"`bmc {name}` is not available in this version yet")

    command.__doc__ = PLANNED[name]
    return command


def register(app: typer.Typer) -> None:
    for name, help_text in PLANNED.items():
        app.command(name, help=help_text, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})(
            _planned(name)
        )
