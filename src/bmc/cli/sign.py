"""`bmc sign`: Ed25519 signatures that `bmc serve --public-key` checks before serving a model."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def sign_command(
    models: Optional[List[Path]] = typer.Argument(None, metavar="MODEL.onnx...", help="Models to sign; each gets MODEL.onnx.sig, covering every file of the model (its manifest MODEL.onnx.sha256, written if missing)."),
    key: Optional[Path] = typer.Option(None, "--key", help="Ed25519 private key (PEM) to sign with."),
    new_key: Optional[Path] = typer.Option(None, "--new-key", help="Create a key pair: this private key (mode 0600) and PATH.pub."),
) -> None:
    """Sign model files with an Ed25519 key, or create a key pair."""
    from bmc.errors import UsageError
    from bmc.signing import new_key_pair, sign_model

    if models and key is None and new_key is None:
        raise UsageError("--key PRIVATE.pem is needed to sign (create one with --new-key)")
    if new_key is not None:
        public = new_key_pair(new_key)
        typer.echo(f"wrote {new_key} (private, keep it secret) and {public} (give it to bmc serve --public-key)")
        key = key or new_key  # --new-key with models: create the pair, then sign with it
    if models:
        for model in models:
            typer.echo(f"wrote {sign_model(model, key)}")
    elif new_key is None:
        raise UsageError("give MODEL.onnx files and --key, or --new-key PATH")


def register(app: typer.Typer) -> None:
    app.command("sign")(sign_command)
