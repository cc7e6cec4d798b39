"""Running the app under uvicorn: verify every model, bind, load in the background, serve, drain on SIGTERM, exit 0."""

from __future__ import annotations

import logging
import signal
import socket

from bmc.errors import BmcError
from bmc.serve_edge import ServeConfig

log = logging.getLogger("bmc.serve")


class ListenError(BmcError):
    """The server cannot listen on the requested address."""


def run_server(config: ServeConfig) -> int:
    """Verify the models, listen, then load and warm them up while `live` already answers; serve until
    SIGTERM/SIGINT. 0 after a clean drain; a model that fails to load stops the server with its error."""
    import uvicorn

    from bmc.serve_edge.app import ServeApp
    from bmc.serve_edge.integrity import read_verified_model
    from bmc.serve_edge.metrics import ServeMetrics
    from bmc.serve_edge.models import load_model

    # Every model's files are read once and verified (sha256 manifest, signature, decryption, ONNX
    # checks) before the server listens: a tampered file stops it at once. Loading builds the
    # sessions from these same bytes, so a file swapped after this point is never what runs.
    verified = _read_verified_models(config, read_verified_model)

    def load_models() -> dict:
        # Each model's bytes are let go once its sessions hold the weights.
        return {
            name: load_model(verified.pop(name), name, None, config.intra_op_threads, config.providers, config.max_batch)
            for name in config.model_names
        }

    app = ServeApp(load_models, config, ServeMetrics(config.model_names))
    listener = _listen(config.host, config.port)
    port = listener.getsockname()[1]
    uvicorn_config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,  # paths only would be harmless, but the cost per request is not
        lifespan="on",
        timeout_graceful_shutdown=config.exit_timeout_s,
        server_header=False,
        timeout_keep_alive=5,
    )
    log.info("listening on http://%s:%d (live now; ready once %s loaded)", config.host, port, ", ".join(config.model_names))
    server = _draining_server(uvicorn_config, app)

    def loaded(models: dict) -> None:
        for name, model in models.items():
            log.info(
                "serving %s (%s, sha256 %s ok, %s, batch <= %d) on http://%s:%d/v2/models/%s",
                name, model.path, model.sha256[:12], model.device, config.max_batch if model.can_merge else 1,
                config.host, port, name,
            )

    def failed(_error: BmcError) -> None:
        server.should_exit = True

    app.on_loaded, app.on_load_failure = loaded, failed
    server.run(sockets=[listener])
    if app.load_error is not None:
        raise app.load_error
    return 0


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


def _draining_server(uvicorn_config, app):
    """uvicorn's Server, with ready turned off the moment a stop signal arrives."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.draining = True
            super().handle_exit(sig, frame)
            # uvicorn re-raises the stop signal after its graceful shutdown, which would end the process
            # by SIGTERM; a drained server stops normally, with exit code 0.
            self._captured_signals = [s for s in self._captured_signals if s not in (signal.SIGTERM, signal.SIGINT)]

    return DrainingServer(uvicorn_config)


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
    listener.set_inheritable(True)
    return listener
