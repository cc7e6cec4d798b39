"""`bmc export`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def export_command(
    run_dir: Optional[Path] = typer.Argument(None, help="Run directory (default: runs/latest)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Export this architecture directly instead of a run."),
    input_size: int = typer.Option(224, "--input-size", help="With --model: square input size."),
    num_classes: int = typer.Option(1000, "--num-classes", help="With --model: output classes."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="With --model: load weights from this run."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output path (default: RUN_DIR/model.onnx)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset."),
    static_batch: bool = typer.Option(False, "--static-batch", help="Fix the batch size to 1 instead of a dynamic axis."),
    format: str = typer.Option("onnx", "--format", help="onnx, or triton for a Triton model repository."),
    fp16: bool = typer.Option(False, "--fp16", help="Half-precision weights, inputs and outputs."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Largest |onnxruntime - PyTorch| accepted (default 1e-4, 5e-2 with --fp16)."),
    encrypt_key_file: Optional[Path] = typer.Option(None, "--encrypt-key-file", help="AES-256 key file: write the model encrypted (bmc serve --decrypt-key-file opens it)."),
    new_encrypt_key: Optional[Path] = typer.Option(None, "--new-encrypt-key", help="Create a new AES-256 key file here (mode 0600), then encrypt with it."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Export a run (or an architecture) to ONNX, verified against PyTorch in onnxruntime."""
    from bmc.errors import UsageError
    from bmc.export import ExportConfig, export

    if run_dir is not None and model is not None:
        raise UsageError("give either RUN_DIR or --model, not both")
    if encrypt_key_file is not None and new_encrypt_key is not None:
        raise UsageError("give either --encrypt-key-file or --new-encrypt-key, not both")
    config = ExportConfig(
        run_dir=run_dir,
        model=model,
        input_size=input_size,
        num_classes=num_classes,
        checkpoint=checkpoint,
        out=out,
        opset=opset,
        dynamic_batch=not static_batch,
        format=format,
        fp16=fp16,
        atol=atol,
        encrypt_key_file=encrypt_key_file or new_encrypt_key,
    )
    if new_encrypt_key is not None:
        from bmc.sealed import new_key

        new_key(new_encrypt_key)
        typer.echo(f"wrote {new_encrypt_key} (AES-256 key, keep it secret; give it to bmc serve --decrypt-key-file)", err=json_output)
    result = export(config)
    if json_output:
        typer.echo(json.dumps(result.summary(), indent=2))
        return
    agreement = f", top-1 agreement {result.top1_agreement:.2%}" if result.top1_agreement is not None else ""
    files = f" (manifest of {len(result.files)} files)" if len(result.files) > 1 else ""
    encrypted = ", encrypted" if result.encrypted else ""
    typer.echo(
        f"wrote {result.path} ({result.size_bytes / 1e6:.2f} MB{encrypted}, sha256 {result.sha256[:12]}…{files}); "
        f"verified on {result.verified_on}: max |ORT - PyTorch| {result.max_abs_diff:.2g}{agreement}"
    )


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
