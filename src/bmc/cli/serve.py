"""`bmc serve`: ONNX models over the Open Inference Protocol (KServe v2). The server loads inside the command."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def serve_command(
    models: List[Path] = typer.Argument(..., metavar="MODEL.onnx...", help="ONNX files to serve; each is named after its file's stem."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: loopback only; elsewhere, use --tls-cert or --auth-token-file)."),
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
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads per model (default: what its metadata chose, else cores - 1)."),
    providers: str = typer.Option("cpu", "--providers", help="onnxruntime execution providers: cpu, cuda or auto (cuda/auto: every batch on onnxruntime)."),
    runtime: Optional[str] = typer.Option(
        None, "--runtime",
        help="Serve every model on this runtime (onnxruntime, openvino). Default: the runtime each model's metadata chose "
             "per batch size (bmc compress), else onnxruntime; one not installed here falls back to onnxruntime with a warning.",
    ),
    precision: Optional[str] = typer.Option(None, "--precision", help="With --runtime: its float precision (fp32, or bf16/fp16 on OpenVINO where the CPU has it)."),
    exit_timeout: float = typer.Option(30.0, "--exit-timeout", help="Seconds to finish in-flight requests after SIGTERM."),
    max_connections: int = typer.Option(
        1024, "--max-connections",
        help="Open connections at most (lowered to what ulimit -n leaves). One more closes the connection waiting longest "
             "without a request in progress; if every one has a request in progress, it gets 503.",
    ),
    max_header_bytes: int = typer.Option(16 * 1024, "--max-header-bytes", help="Request line and headers at most; more gets 431 (a URL over 8 KiB 414)."),
    header_timeout: float = typer.Option(10.0, "--header-timeout", help="Seconds a connection has to send a request's headers (408, then close)."),
    body_timeout: float = typer.Option(60.0, "--body-timeout", help="Seconds after the headers for the whole body to arrive (408, then close)."),
    max_request_rows: Optional[int] = typer.Option(None, "--max-request-rows", help="Rows one infer request may hold; more gets 400 (default: --max-batch)."),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="Serve HTTPS with this PEM certificate (chain) ..."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="... and this PEM private key."),
    tls_client_ca: Optional[Path] = typer.Option(None, "--tls-client-ca", help="Mutual TLS: clients must present a certificate signed by this PEM CA."),
    auth_token_file: Optional[Path] = typer.Option(
        None, "--auth-token-file", help="Every route but /v2/health/live and /ready needs `Authorization: Bearer <the file's token>` (401 otherwise)."
    ),
    allow_hosts: Optional[List[str]] = typer.Option(
        None, "--allow-host",
        help="Also answer requests whose Host or Origin is this name (repeatable; '*': any Host). Default: the bound host, "
             "localhost, 127.0.0.1, ::1 (and any IP address when bound to 0.0.0.0 or ::).",
    ),
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
        runtime=runtime,
        precision=precision,
        exit_timeout_s=exit_timeout,
        max_connections=max_connections,
        max_header_bytes=max_header_bytes,
        header_timeout_s=header_timeout,
        body_timeout_s=body_timeout,
        max_request_rows=max_request_rows,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        auth_token_file=auth_token_file,
        allow_hosts=tuple(allow_hosts or ()),
    )
    raise typer.Exit(serve(config))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
