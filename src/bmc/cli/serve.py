"""`bmc serve`: ONNX models over the Open Inference Protocol (KServe v2). The server loads inside the command."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def serve_command(
    models: List[Path] = typer.Argument(..., metavar="MODEL.onnx...", help="ONNX files to serve; each is named after its file's stem."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: loopback only)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    names: Optional[List[str]] = typer.Option(None, "--name", help="Model name, once per model in order (default: the file's stem)."),
    max_batch: int = typer.Option(32, "--max-batch", help="Most rows merged into one onnxruntime run (1: no batching)."),
    max_delay_ms: float = typer.Option(2.0, "--max-delay-ms", help="Longest a queued request waits for a batch to fill."),
    max_queue: int = typer.Option(256, "--max-queue", help="Requests that may wait per model; more get 503 at once."),
    timeout_ms: float = typer.Option(30_000, "--timeout-ms", help="A request without a result by then gets 504."),
    max_body_bytes: int = typer.Option(64 * 1024 * 1024, "--max-body-bytes", help="Larger request bodies get 413, unread."),
    reject_nonfinite: bool = typer.Option(False, "--reject-nonfinite", help="Refuse inputs holding NaN or infinity (400)."),
    sha256: Optional[List[str]] = typer.Option(None, "--sha256", help="Expected sha256, once per model in order (default: MODEL.onnx.sha256)."),
    public_key: Optional[Path] = typer.Option(None, "--public-key", help="Ed25519 public key: every model must carry its signature MODEL.onnx.sig (bmc sign)."),
    decrypt_key_file: Optional[Path] = typer.Option(None, "--decrypt-key-file", help="AES-256 key: serve models encrypted with it (bmc export --encrypt-key-file), decrypted in memory only."),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime intra-op threads per model (default: cores - 1)."),
    providers: str = typer.Option("cpu", "--providers", help="onnxruntime execution providers: cpu, cuda or auto."),
    exit_timeout: float = typer.Option(30.0, "--exit-timeout", help="Seconds to finish in-flight requests after SIGTERM."),
) -> None:
    """Serve ONNX models over the Open Inference Protocol (KServe v2 REST), with dynamic batching."""
    from bmc.serve_edge import ServeConfig, serve

    config = ServeConfig(
        models=tuple(models),
        names=tuple(names or ()),
        host=host,
        port=port,
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        max_queue=max_queue,
        timeout_ms=timeout_ms,
        max_body_bytes=max_body_bytes,
        reject_nonfinite=reject_nonfinite,
        sha256=tuple(sha256 or ()),
        public_key=public_key,
        decrypt_key_file=decrypt_key_file,
        threads=threads,
        providers=providers,
        exit_timeout_s=exit_timeout,
    )
    raise typer.Exit(serve(config))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
