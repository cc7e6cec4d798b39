"""Accepting connections for bmc serve's HTTP layer (http1.py): counted, timed, evicted, drained.

At most `max_connections` connections, counted from accept (TLS handshakes included). One more
evicts the connection that has waited longest without a request in the app (idle, silent, slow,
lingering after a refusal, or mid-handshake); only when every connection has a request in the app
is the new one refused with 503 and closed. So slow and silent clients can hold neither descriptors
nor other clients' turns. A sweep every quarter of the shortest timeout closes what waited too long.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections import OrderedDict
from typing import Callable

import orjson

from bmc.serve_edge.http1 import HEAD, IDLE, LINGER_S, STATUS_LINES, HttpConnection, HttpLimits

log = logging.getLogger("bmc.serve")

ACCEPT_BATCH = 64  # connections accepted per wake-up of the listener
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _Handshake:
    """A connection accepted and not yet made: counted, timed and evictable like the others."""

    __slots__ = ("task", "deadline", "made")

    def __init__(self, deadline: float):
        self.task: asyncio.Task | None = None
        self.deadline = deadline
        self.made = False

    def expire(self) -> None:
        if self.task is not None:
            self.task.cancel()

    evict = expire


class HttpServer:
    """Accepts connections on a listening socket and runs an ASGI app's http scope for each request."""

    def __init__(self, app, limits: HttpLimits, ssl_context: ssl.SSLContext | None = None,
                 on_refused: Callable[[str], None] | None = None, body_limit: Callable | None = None):
        self.app = app
        # body_limit(method, raw_path, headers, declared_bytes) -> None, or why that body is too large
        # for its route (413 before it is read); asked only for bodies over ASK_APP_ABOVE_BYTES.
        self.body_limit = body_limit
        self.limits = limits
        self.ssl_context = ssl_context
        # Called with the status code of each refusal, "evicted" or "connection_limit": for the metrics.
        self.on_refused = on_refused or (lambda reason: None)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False
        self.hurry = False  # set during shutdown: stop waiting for requests in progress
        self.open = 0  # accepted and not yet closed: what holds descriptors
        # Connections with no request in the app, longest waiting first: timed, and evicted first.
        self._waiting: OrderedDict = OrderedDict()
        self._connections: set[HttpConnection] = set()
        self._tasks: set[asyncio.Task] = set()
        self._listener: socket.socket | None = None
        self._sweeper: asyncio.Task | None = None
        self._accept_paused = False

    @property
    def in_app(self) -> int:
        return sum(1 for connection in self._connections if connection.in_app)

    def start(self, listener: socket.socket) -> None:
        """Start accepting on `listener` (bound and listening) in the running loop."""
        self.loop = asyncio.get_running_loop()
        self._listener = listener
        listener.setblocking(False)
        self.loop.add_reader(listener.fileno(), self._accept)
        self._sweeper = self.loop.create_task(self._sweep(), name="http-deadlines")

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in OUT_OF_DESCRIPTORS:
                    raise
                # The descriptor limit was reached before max_connections (other files, another thread):
                # free the longest-waiting connection, or stop accepting for a moment.
                log.warning("out of file descriptors accepting a connection (%d open); see --max-connections", self.open)
                if not self._evict_one():
                    self._pause_accepting(0.1)
                return
            self._admit(sock)
            if self.open >= self.limits.max_connections:
                # An evicted connection's descriptor is released on the next loop iteration: accepting
                # more now would take descriptors that are not free yet (EMFILE under a low ulimit -n).
                return

    def _pause_accepting(self, seconds: float) -> None:
        if not self._accept_paused and self._listener is not None:
            self._accept_paused = True
            self.loop.remove_reader(self._listener.fileno())
            self.loop.call_later(seconds, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._accept_paused = False
        if not self.draining and self._listener is not None:
            self.loop.add_reader(self._listener.fileno(), self._accept)

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.open += 1
        if self.open > self.limits.max_connections and not self._evict_one():
            self.open -= 1
            self.refused("connection_limit")
            _refuse_socket(sock, self.ssl_context is None)
            return
        handshake = _Handshake(self.loop.time() + self.limits.header_timeout_s)
        self._waiting[handshake] = None
        factory = lambda: HttpConnection(self, handshake)  # noqa: E731
        if self.ssl_context is None:
            made = self.loop.connect_accepted_socket(factory, sock)
        else:
            made = self.loop.connect_accepted_socket(
                factory, sock, ssl=self.ssl_context, ssl_handshake_timeout=self.limits.header_timeout_s
            )
        handshake.task = self.loop.create_task(made)
        handshake.task.add_done_callback(lambda task: self._handshake_done(handshake, task, sock))

    def _handshake_done(self, handshake: _Handshake, task: asyncio.Task, sock: socket.socket) -> None:
        if handshake.made:
            return
        self._waiting.pop(handshake, None)
        self.open -= 1
        if not task.cancelled() and task.exception() is None:
            return
        if sock.fileno() != -1:  # closed by the loop on failure in most cases; never leak it
            sock.close()

    def _evict_one(self) -> bool:
        if not self._waiting:
            return False
        oldest, _ = self._waiting.popitem(last=False)
        if not isinstance(oldest, HttpConnection) or oldest.phase == IDLE:
            self.refused("evicted")
        oldest.evict()
        return True

    # called by connections

    def connected(self, connection: HttpConnection) -> None:
        handshake = connection.handshake
        handshake.made = True
        self._waiting.pop(handshake, None)
        self._connections.add(connection)
        if self.draining:
            connection.close()
            return
        connection.deadline = handshake.deadline if self.ssl_context is None else self.loop.time() + self.limits.header_timeout_s
        self._waiting[connection] = None

    def working(self, connection: HttpConnection) -> None:
        self._waiting.pop(connection, None)

    def waiting(self, connection: HttpConnection) -> None:
        """It has no request in the app again: time its wait from now."""
        now = self.loop.time()
        limits = self.limits
        timeout = limits.keep_alive_s if connection.phase == IDLE else limits.header_timeout_s if connection.phase == HEAD else limits.body_timeout_s
        connection.deadline = now + timeout
        self._waiting[connection] = None

    def closing(self, connection: HttpConnection) -> None:
        self._waiting.pop(connection, None)

    def lingering(self, connection: HttpConnection) -> None:
        """Refused and half-closed: first in line to be evicted, closed for good at its deadline."""
        connection.deadline = self.loop.time() + LINGER_S
        self._waiting[connection] = None
        self._waiting.move_to_end(connection, last=False)

    def disconnected(self, connection: HttpConnection) -> None:
        self._waiting.pop(connection, None)
        if connection in self._connections:
            self._connections.discard(connection)
            self.open -= 1

    def refused(self, reason: str) -> None:
        self.on_refused(reason)

    def start_task(self, coroutine) -> None:
        task = self.loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sweep(self) -> None:
        interval = self.limits.sweep_interval_s
        while True:
            await asyncio.sleep(interval)
            now = self.loop.time()
            for entry in [entry for entry in self._waiting if entry.deadline <= now]:
                self._waiting.pop(entry, None)
                entry.expire()

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting, close idle connections, let requests in the app (and ones being received) finish
        within grace_s, then close everything."""
        self.draining = True
        if self._listener is not None:
            if not self._accept_paused:
                self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
        for entry in list(self._waiting):
            if isinstance(entry, _Handshake) or entry.phase == IDLE:
                self._waiting.pop(entry, None)
                entry.expire()
        deadline = self.loop.time() + grace_s
        while not self.hurry and self.loop.time() < deadline and any(c.in_app or c.phase != IDLE for c in self._connections if not c.closing):
            await asyncio.sleep(0.05)
        for task in list(self._tasks):
            task.cancel()
        for connection in list(self._connections):
            if connection.transport is not None:
                connection.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.sleep(0)


def _refuse_socket(sock: socket.socket, plain: bool) -> None:
    """503 to a connection over the limit when none can be evicted (plain HTTP only: TLS has no handshake yet)."""
    try:
        if plain:
            # Read what the client already sent, so that closing sends FIN, not a reset that could discard the answer.
            try:
                sock.recv(65536)
            except OSError:
                pass
            body = orjson.dumps({"error": "the server is at its connection limit (--max-connections) and every "
                                          "connection has a request in progress; retry"})
            sock.send(STATUS_LINES[503] + b"content-type: application/json\r\ncontent-length: %d\r\nretry-after: 1\r\n"
                      b"connection: close\r\n\r\n%s" % (len(body), body))
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.close()
