"""`bmc serve`: ONNX models over the Open Inference Protocol (KServe v2 REST), with dynamic batching.

No torch here, directly or indirectly: the server runs on a box with onnxruntime and numpy only.
`serve(ServeConfig(models=(Path("digits.onnx"),)))` reads each model's files once, checks their sha256
(and signature, and decrypts them in memory when asked), builds the sessions from those bytes, warms
them up, then serves until SIGTERM/SIGINT.

Status codes, so clients can act on them:
  400  the request is malformed or does not fit the model (`{"error": ...}` names the problem),
       or holds more rows than --max-request-rows
  401  --auth-token-file is set and the request has no valid `Authorization: Bearer` (not live/ready)
  403  Host or Origin names none of the names the server answers to (see access.py, --allow-host)
  404  unknown route or model          405  known route, wrong method (Allow says which)
  408  headers or body not received within --header-timeout / --body-timeout (then the connection closes)
  413  body larger than --max-body-bytes (refused before the body is read; a gzip/deflate body once it inflates past it)
  414 / 431  URL, request line and headers larger than the limits (http1.py), or too many header fields
  415  a Content-Encoding other than gzip, deflate or identity; infer with a Content-Type other than
       JSON or application/octet-stream
  503  the queue is full, the server is shutting down, or it holds --max-connections connections
       that all have a request in progress: retry later (Retry-After: 1)
  504  the request's --timeout-ms passed before its result was ready (queued or running)
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from bmc.errors import UsageError
from bmc.runtime.target import Target

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # Triton's default request size limit
PROVIDER_CHOICES = ("cpu", "cuda", "auto")
# Model names go into URLs and metric labels: keep them to characters that need no escaping.
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def _default_threads() -> int:
    # One core stays with the event loop, which parses and encodes every request.
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, usable - 1)


@dataclass(frozen=True)
class ServeConfig:
    """What `bmc serve` serves and how; validated when built."""

    models: tuple[Path, ...]
    names: tuple[str, ...] = ()  # one per model, in order; default: each file's stem
    host: str = DEFAULT_HOST
    port: int = 8000
    max_batch: int = 32  # 1 = no batching
    max_delay_ms: float = 2.0
    max_queue: int = 256  # requests waiting per model, the running batch excluded
    timeout_ms: float = 30_000.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    reject_nonfinite: bool = False
    sha256: tuple[str, ...] = ()  # one per model, in order; default: each file's sidecar MODEL.onnx.sha256
    public_key: Path | None = None  # Ed25519: each model must carry MODEL.onnx.sig made with its private key
    decrypt_key_file: Path | None = None  # AES-256 key: every model must be encrypted with it (bmc export --encrypt-key-file)
    threads: int | None = None  # intra-op threads per model; None: the model's metadata's, else usable cores - 1
    providers: str = "cpu"
    # Every model on this runtime (and precision) instead of the one its metadata names (serve_edge/targets.py).
    runtime: str | None = None
    precision: str | None = None
    exit_timeout_s: float = 30.0  # Triton's default grace period
    # One client must not hurt the others (http1.py, http_server.py): connections, header size, read deadlines, rows.
    max_connections: int = 1024  # lowered to what the descriptor limit (ulimit -n) leaves
    max_header_bytes: int = 16 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_request_rows: int | None = None  # rows per infer request; None: max_batch (Triton's max_batch_size)
    # Who may talk to it (access.py).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # clients must present a certificate this CA signed (mutual TLS)
    auth_token_file: Path | None = None
    allow_hosts: tuple[str, ...] = ()  # more Host/Origin names to answer to; "*": any Host

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(Path(m) for m in self.models))
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "sha256", tuple(s.strip().lower() for s in self.sha256))
        object.__setattr__(self, "allow_hosts", tuple(self.allow_hosts))
        if not self.models:
            raise UsageError("give at least one ONNX file to serve")
        if self.names and len(self.names) != len(self.models):
            raise UsageError(f"--name given {len(self.names)} times for {len(self.models)} models; give one per model, in order")
        if self.sha256 and len(self.sha256) != len(self.models):
            raise UsageError(f"--sha256 given {len(self.sha256)} times for {len(self.models)} models; give one per model, in order")
        for digest in self.sha256:
            if not SHA256_PATTERN.match(digest):
                raise UsageError(f"--sha256 expects 64 hex digits; got {digest!r}")
        for name in self.model_names:
            if not MODEL_NAME_PATTERN.match(name):
                raise UsageError(f"model name {name!r} must be 1-128 characters of A-Z a-z 0-9 _ . - (use --name)")
        if len(set(self.model_names)) != len(self.model_names):
            raise UsageError(f"two models share a name ({', '.join(self.model_names)}); use --name")
        _check_range("port", self.port, 0, 65535)
        _check_range("max_batch", self.max_batch, 1, 4096)
        _check_range("max_delay_ms", self.max_delay_ms, 0, 10_000)
        _check_range("max_queue", self.max_queue, 1, 1_000_000)
        _check_range("timeout_ms", self.timeout_ms, 1, 3_600_000)
        _check_range("max_body_bytes", self.max_body_bytes, 1024, 1 << 34)
        _check_range("exit_timeout_s", self.exit_timeout_s, 0, 3600)
        if self.threads is not None:
            _check_range("threads", self.threads, 1, 1024)
        if self.providers not in PROVIDER_CHOICES:
            raise UsageError(f"providers must be one of {', '.join(PROVIDER_CHOICES)}; got {self.providers!r}")
        if self.precision is not None and self.runtime is None:
            raise UsageError("--precision goes with --runtime (each model's metadata names its own precision otherwise)")
        if self.runtime is not None:
            self.runtime_override  # an unknown runtime, a device or precision it lacks: UsageError naming what it has
        _check_range("max_connections", self.max_connections, 1, 1_000_000)
        _check_range("max_header_bytes", self.max_header_bytes, 1024, 1 << 20)
        _check_range("header_timeout_s", self.header_timeout_s, 0.01, 3600)
        _check_range("body_timeout_s", self.body_timeout_s, 0.01, 3600)
        if self.max_request_rows is not None:
            _check_range("max_request_rows", self.max_request_rows, 1, 1 << 24)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UsageError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise UsageError("--tls-client-ca needs --tls-cert and --tls-key (clients check the server first)")
        for name in self.allow_hosts:
            if not name or any(c in name for c in " /@,\t"):
                raise UsageError(f"--allow-host takes a host name or address (or '*'); got {name!r}")

    @property
    def model_names(self) -> tuple[str, ...]:
        return self.names or tuple(path.stem for path in self.models)

    @property
    def request_rows(self) -> int:
        """Most rows one infer request may hold."""
        return self.max_request_rows if self.max_request_rows is not None else self.max_batch

    @property
    def intra_op_threads(self) -> int:
        return self.threads if self.threads is not None else _default_threads()

    @property
    def runtime_override(self) -> Target | None:
        """The target --runtime (and --precision) put every model on; None when each model's metadata decides."""
        if self.runtime is None:
            return None
        # --providers names onnxruntime's devices; another runtime asked for by name runs on the CPU.
        if self.runtime != "onnxruntime" and self.providers != "cpu":
            raise UsageError(f"--providers {self.providers} is onnxruntime's; --runtime {self.runtime} serves on the CPU")
        device = self.providers if self.runtime == "onnxruntime" else "cpu"
        return Target(self.runtime, device, self.precision or "fp32", self.intra_op_threads)


def _check_range(field: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise UsageError(f"{field} must be in [{low}, {high}]; got {value!r}")


def serve(config: ServeConfig) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit code (0 after a clean shutdown)."""
    _quiet_runtime_telemetry()
    from bmc.serve_edge.server import run_server

    return run_server(config)


def _quiet_runtime_telemetry() -> None:
    """Keep the runtimes' usage telemetry out of a server, which writes nothing it need not (and may
    hold decrypted models): called before either runtime is imported in this process.

    onnxruntime 1.31 (Linux) writes $TMPDIR/.ses and a database under ~/.cache/Microsoft as soon as it
    is imported; onnxruntime.disable_telemetry_events() comes too late to stop that, the variable it
    reads at import does (a value the user set stays). `import openvino` (2026.4) imports its model
    converter, which sends an "import" event through the openvino_telemetry package and writes
    ~/intel/openvino_ga_cid unless a consent file says no; with that package unimportable (None in
    sys.modules) the converter uses its own no-op stub instead.
    """
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)


__all__ = ["ServeConfig", "serve", "DEFAULT_HOST", "DEFAULT_MAX_BODY_BYTES"]
