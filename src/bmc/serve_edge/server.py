"""Running the app: verify every model, bind, load in the background, serve (http1.py), drain on SIGTERM, exit 0."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket

from bmc.errors import BmcError
from bmc.serve_edge import ServeConfig

log = logging.getLogger("bmc.serve")

# Descriptors kept for everything but client connections: model files, onnxruntime, the event loop, logs.
RESERVED_DESCRIPTORS = 64


class ListenError(BmcError):
    """The server cannot listen on the requested address."""


def run_server(config: ServeConfig) -> int:
    """Verify the models, listen, then load and warm them up while `live` already answers; serve until
    SIGTERM/SIGINT. 0 after a clean drain; a model that fails to load stops the server with its error."""
    from bmc.serve_edge.access import Admission, is_loopback, read_token, tls_context
    from bmc.serve_edge.app import ServeApp
    from bmc.serve_edge.http1 import HttpLimits
    from bmc.serve_edge.http_server import HttpServer
    from bmc.serve_edge.integrity import read_verified_model
    from bmc.serve_edge.metrics import ServeMetrics
    from bmc.serve_edge.models import check_servable, load_model
    from bmc.serve_edge.targets import check_runtime_override, plan_serving

    check_runtime_override(config)  # --runtime not installed here: one line before any model is read
    # Every model's files are read once and verified (sha256 manifest, signature, decryption, ONNX
    # checks) before the server listens: a tampered file stops it at once. Loading builds the
    # sessions from these same bytes, so a file swapped after this point is never what runs.
    verified = _read_verified_models(config, read_verified_model)
    # What can be decided from the files is decided before listening too: a type the protocol cannot
    # carry, and which runtime serves which batch size (warnings where the metadata's choice cannot be followed).
    plans = {}
    for name, model in verified.items():
        check_servable(model)
        plans[name] = plan_serving(name, model, config)
        for note in plans[name].notes:
            log.warning("%s", note)
    ssl_context = tls_context(config.tls_cert, config.tls_key, config.tls_client_ca) if config.tls_cert else None
    token = read_token(config.auth_token_file) if config.auth_token_file is not None else None

    def load_models() -> dict:
        # Each model's bytes are let go once its sessions hold the weights.
        return {
            name: load_model(verified.pop(name), name, config, plans[name])
            for name in config.model_names
        }

    metrics = ServeMetrics(config.model_names)
    app = ServeApp(load_models, config, metrics, Admission.for_server(config.host, config.allow_hosts, token))
    limits = HttpLimits(
        max_connections=connection_limit(config.max_connections),
        max_header_bytes=config.max_header_bytes,
        max_body_bytes=config.max_body_bytes,
        header_timeout_s=config.header_timeout_s,
        body_timeout_s=config.body_timeout_s,
    )
    http_server = HttpServer(app, limits, ssl_context, on_refused=metrics.http_refused, body_limit=app.body_too_large)
    metrics.count_connections(lambda: http_server.open)
    listener = _listen(config.host, config.port)
    port = listener.getsockname()[1]
    scheme = "https" if ssl_context is not None else "http"
    if not is_loopback(config.host) and ssl_context is None and token is None:
        log.warning(
            "serving on %s without --tls-cert or --auth-token-file: anyone who can reach this address can run the "
            "models and read what other clients send", config.host,
        )
    log.info("listening on %s://%s:%d (live now; ready once %s loaded)", scheme, config.host, port, ", ".join(config.model_names))

    def loaded(models: dict) -> None:
        # What start-up made (modules, sessions, metadata) lives as long as the server: out of the
        # collector's sight, so a full collection walks only what requests made (shorter pauses, lower p99).
        gc.collect()
        gc.freeze()
        for name, model in models.items():
            log.info(
                "serving %s (%s, sha256 %s ok, %s, batch <= %d) on %s://%s:%d/v2/models/%s",
                name, model.path, model.sha256[:12], _runs_on(model), config.max_batch if model.can_merge else 1,
                scheme, config.host, port, name,
            )

    app.on_loaded = loaded
    loop = _new_event_loop()
    try:
        loop.run_until_complete(_serve(app, http_server, listener, config.exit_timeout_s))
    finally:
        loop.close()
    if app.load_error is not None:
        raise app.load_error
    return 0


async def _serve(app, http_server, listener: socket.socket, exit_timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal() -> None:
        app.draining = True  # ready turns off at once
        if stop.is_set():
            http_server.hurry = True  # a second signal skips the grace period, as in uvicorn
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    app.on_load_failure = lambda _error: stop.set()
    lifespan = _Lifespan(app)
    await lifespan.startup()
    http_server.start(listener)
    await stop.wait()
    await http_server.shutdown(exit_timeout_s)
    await lifespan.shutdown()


def _runs_on(model) -> str:
    """Where a model's batches run, for the log: "onnxruntime on cpu", "batch 1-5 onnxruntime, 6+ openvino on cpu"."""
    described = model.plan.describe()
    if len(described) == 1:
        return f"{next(iter(described.values()))} on {model.device}"
    return "batch " + ", ".join(f"{rows} {label}" for rows, label in described.items()) + f" on {model.device}"


def _read_verified_models(config: ServeConfig, read_verified_model) -> dict:
    """name -> the model read into memory and verified, in the order given."""
    hashes = config.sha256 or (None,) * len(config.models)
    decrypt_key = None
    if config.decrypt_key_file is not None:
        from bmc.sealed import load_key

        decrypt_key = load_key(config.decrypt_key_file)
    return {
        name: read_verified_model(path, digest, config.public_key, decrypt_key)
        for path, name, digest in zip(config.models, config.model_names, hashes)
    }


class _Lifespan:
    """The ASGI lifespan protocol, driven by hand: startup before listening, shutdown after the drain."""

    def __init__(self, app):
        self.app = app
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.replies: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None

    async def startup(self) -> None:
        self.task = asyncio.get_running_loop().create_task(
            self.app({"type": "lifespan", "asgi": {"version": "3.0"}}, self.inbox.get, self.replies.put)
        )
        await self.inbox.put({"type": "lifespan.startup"})
        await self.replies.get()

    async def shutdown(self) -> None:
        await self.inbox.put({"type": "lifespan.shutdown"})
        await self.task


def connection_limit(wanted: int) -> int:
    """`wanted`, or fewer when the descriptor limit (raised to its hard limit if need be) leaves less room."""
    try:
        import resource
    except ImportError:  # not on POSIX: nothing to ask
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + RESERVED_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    room = soft - RESERVED_DESCRIPTORS
    if room < 1:
        raise ListenError(f"the process may open {soft} files (ulimit -n), which leaves no room for client connections")
    log.info("--max-connections lowered to %d: the process may open %d files (ulimit -n)", room, soft)
    return room


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket, so a busy port is a one-line error before anything is served."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except (OSError, OverflowError) as exc:
        raise ListenError(f"cannot listen on {host}:{port} ({getattr(exc, 'strerror', None) or exc})") from None
    return listener
