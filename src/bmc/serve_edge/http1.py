"""HTTP/1.1 under bmc serve, one connection: asyncio with httptools' parser, and limits a hostile client cannot get around.

Our own connection layer rather than uvicorn's, because every limit below lives where uvicorn keeps
its code closed: with httptools, uvicorn accepts headers of any size and number (one 128 MiB header
cost 17.8 s of CPU, quadratic in the parser's concatenation), has no header or body read timeout,
and starts the app before the body arrives. Here, per connection:
  - The request line and headers are counted before the parser sees them: past `max_header_bytes`
    431, a URL past `max_url_bytes` 414, more than `max_headers` fields 431; then the connection closes.
  - Deadlines: a connection has `header_timeout_s` to send a request's headers and `body_timeout_s`
    after them for its body (408, then close; a connection that sent nothing is just closed); idle
    between requests it is closed after `keep_alive_s`; a response it does not read within
    `body_timeout_s` is dropped.
  - A body over `max_body_bytes` gets 413 before it is read (declared) or once it passes the limit (chunked).
  - The app (ASGI) sees a request only once its body is complete: a stalled upload holds nothing but its socket.
    That body comes in one http.request message, as bytes or, when it arrived in several pieces, a bytearray.
Accepting, counting and evicting connections, and the deadlines' clock, are http_server.py's.
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

import httptools
import orjson

if TYPE_CHECKING:
    from bmc.serve_edge.http_server import HttpServer, _Handshake

log = logging.getLogger("bmc.serve")

IDLE, HEAD, BODY = 0, 1, 2  # what a connection is receiving: nothing yet, a request's headers, its body
# After a refusal, what the client still sends is read and dropped this long before closing (nginx's
# lingering close): closing with unread data sends a reset, which can destroy the refusal before the
# client, still sending its request, gets to read it.
LINGER_S = 2.0
LINGER_BYTES = 256 * 1024  # the rest of a request line or headers; a client still uploading megabytes gets the reset
LARGE_BODY_BYTES = 1 << 16  # larger response bodies are written apart from their headers (no copy)
ASK_APP_ABOVE_BYTES = 1 << 20  # larger declared bodies are shown to the server's body_limit before they are read
ASGI = {"version": "3.0", "spec_version": "2.3"}


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


STATUS_LINES = {status: _status_line(status) for status in range(100, 600)}


@dataclass(frozen=True)
class HttpLimits:
    """What one client may cost the server; see the module docstring."""

    max_connections: int = 1024
    max_header_bytes: int = 16 * 1024  # Node's default; nginx allows 4 x 8 KiB, Triton's evhtp about 8 KiB
    max_url_bytes: int = 8 * 1024
    max_headers: int = 100  # Apache's LimitRequestFields and Go's default
    max_body_bytes: int = 64 * 1024 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_s: float = 5.0

    @property
    def sweep_interval_s(self) -> float:
        """How often deadlines are checked: a quarter of the shortest, between 50 ms and 1 s."""
        shortest = min(self.header_timeout_s, self.body_timeout_s, self.keep_alive_s)
        return min(1.0, max(0.05, shortest / 4))


class _Stop(Exception):
    """Raised in a parser callback to stop parsing; the connection answers its refusal and closes."""


class _Request:
    # Few objects per request: each one the garbage collector tracks brings its next pause closer,
    # and those pauses are what a loaded server's p99 is made of.
    __slots__ = ("method", "http_version", "keep_alive", "raw_path", "query", "headers", "body", "more_body", "body_bytes")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        # A body in more than one piece grows in place (realloc, not a list then a join): a 64 MiB
        # upload peaks at 64 MiB, not 128. Never sized from Content-Length: a length declared and not
        # sent costs nothing.
        self.more_body: bytearray | None = None
        self.body_bytes = 0


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests within the limits, answers them one at a time, in order."""

    def __init__(self, server: HttpServer, handshake: _Handshake):
        self.server = server
        self.limits = server.limits
        self.loop = server.loop
        self.handshake = handshake
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.phase = IDLE
        self.head_bytes = 0  # bytes fed to the parser since the last request ended
        self.deadline = 0.0  # loop time at which the current wait (headers, body, keep-alive) ends
        self.request: _Request | None = None  # the request being received
        self.url = b""
        self.refusal: tuple[int, str] | None = None
        self.queue: deque[_Request] = deque()  # received, waiting for the one in the app (pipelining)
        self.in_app = False
        self.reading_paused = False
        self.lingering = False
        self.lingered_bytes = 0
        self.closing = False
        self.close_after_response = False
        self.write_paused = False
        self.drained: asyncio.Future | None = None
        self.lost: asyncio.Future | None = None
        self.scheme = "http"
        self.client = None
        self.local = None
        # The request in the app and its answer so far (one at a time per connection).
        self.current: _Request | None = None
        self.unread: bytes | None = None
        self.response_start: dict | None = None
        self.response_parts: list[bytes] | None = None
        self.responded = False
        self.receive = self._receive  # bound once, not per request
        self.send = self._send

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.scheme = "https" if transport.get_extra_info("sslcontext") is not None else "http"
        self.client = transport.get_extra_info("peername")
        self.local = transport.get_extra_info("sockname")
        self.server.connected(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.disconnected(self)
        for future in (self.drained, self.lost):
            if future is not None and not future.done():
                future.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            if self.lingering:
                self.lingered_bytes += len(data)
                if self.lingered_bytes > LINGER_BYTES:
                    self.transport.close()
            return
        if self.phase == BODY:  # body bytes are bounded by max_body_bytes in on_body
            self._feed(data)
            return
        room = self.limits.max_header_bytes - self.head_bytes
        if len(data) <= room:
            self.head_bytes += len(data)
            self._feed(data)
            return
        # More than the head may still take: feed what fits, and refuse if the headers are not done by then.
        # (Bytes of a pipelined request that starts inside a piece are not counted: at most one more piece.)
        view = memoryview(data)
        while view and not self.closing:
            if self.phase == BODY:
                self._feed(view)
                return
            room = self.limits.max_header_bytes - self.head_bytes
            if room <= 0:
                self.refuse(431, f"the request line and headers exceed {self.limits.max_header_bytes} bytes (--max-header-bytes)")
                return
            piece, view = view[:room], view[room:]
            self.head_bytes += len(piece)
            if not self._feed(piece):
                return

    def eof_received(self) -> bool | None:
        return None  # close our side too; a response still being computed goes nowhere

    def _feed(self, data) -> bool:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request before the Upgrade header was complete and is answered; we speak nothing else.
            self.close_after_response = True
            self._pause_reading()
            return False
        except httptools.HttpParserError:
            status, message = self.refusal or (400, "malformed HTTP request")
            self.refuse(status, message)
            return False
        return True

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.phase = HEAD
        self.request = _Request()
        self.url = b""
        if not self.in_app:
            self.deadline = self.loop.time() + self.limits.header_timeout_s

    def on_url(self, url: bytes) -> None:
        url = self.url + url if self.url else url
        if len(url) > self.limits.max_url_bytes:  # so the concatenation stays short
            self._stop(414, f"the URL exceeds {self.limits.max_url_bytes} bytes")
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.request.headers
        if len(headers) >= self.limits.max_headers:
            self._stop(431, f"more than {self.limits.max_headers} header fields")
        # llhttp keeps trailing whitespace, which is not part of the value (RFC 9110, 5.5).
        headers.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        parser, request = self.parser, self.request
        request.method = parser.get_method().decode("ascii")
        request.http_version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive()
        try:
            parsed = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            self._stop(400, "malformed URL")
        request.raw_path = parsed.path or b"/"
        request.query = parsed.query or b""
        expect_continue = False
        for name, value in request.headers:
            if name == b"content-length":
                declared = int(value)  # llhttp has checked it is all digits
                if declared > self.limits.max_body_bytes:
                    self._stop(413, f"the body is {declared} bytes; at most {self.limits.max_body_bytes} are accepted (--max-body-bytes)")
                if declared > ASK_APP_ABOVE_BYTES and self.server.body_limit is not None:
                    refusal = self.server.body_limit(request.method, request.raw_path, request.headers, declared)
                    if refusal is not None:
                        self._stop(413, refusal)
            elif name == b"expect":
                expect_continue = value.lower() == b"100-continue"
        self.phase = BODY
        if not self.in_app:
            if expect_continue:  # not between another request's response bytes
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.deadline = self.loop.time() + self.limits.body_timeout_s

    def on_body(self, body: bytes) -> None:
        request = self.request
        request.body_bytes += len(body)
        if request.body_bytes > self.limits.max_body_bytes:  # chunked bodies declare no length
            self._stop(413, f"the body exceeds {self.limits.max_body_bytes} bytes (--max-body-bytes)")
        if request.more_body is not None:
            request.more_body += body
        elif not request.body:
            request.body = body
        else:
            request.more_body = bytearray(request.body)
            request.more_body += body
            request.body = b""

    def on_message_complete(self) -> None:
        request, self.request = self.request, None
        self.phase = IDLE
        self.head_bytes = 0
        self.queue.append(request)
        if self.in_app:
            self._pause_reading()  # one request in the app per connection; the rest wait unread
        else:
            self._next()

    def _pause_reading(self) -> None:
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def _stop(self, status: int, message: str):
        self.refusal = (status, message)
        raise _Stop()

    # answering

    def _next(self) -> None:
        request = self.queue.popleft()
        self.in_app = True
        self.server.working(self)
        self.server.start_task(self._answer(request))

    async def _answer(self, request: _Request) -> None:
        raw_path = request.raw_path
        path = raw_path.decode("latin-1")
        scope = {
            "type": "http",
            "asgi": ASGI,
            "http_version": request.http_version,
            "method": request.method,
            "scheme": self.scheme,
            "path": unquote(path) if "%" in path else path,
            "raw_path": raw_path,
            "query_string": request.query,
            "root_path": "",
            "headers": request.headers,
            "client": self.client,
            "server": self.local,
        }
        body = request.body if request.more_body is None else request.more_body  # bytes-like either way
        request.body, request.more_body = b"", None
        self.current, self.unread, self.response_start, self.responded = request, body, None, False
        try:
            await self.server.app(scope, self.receive, self.send)
        except Exception as exc:  # a bug in the app: answer if nothing went out yet, log the type only
            log.error("%s %s failed: %s", request.method, path[:80], type(exc).__name__)
            if self.response_start is None:
                self._write(request, 500, (), orjson.dumps({"error": "internal server error"}), b"application/json")
                self.responded = True
        if not self.responded:
            self.close_after_response = True  # the app left the answer unfinished: the client cannot frame it
            if self.response_start is None:
                self._write(request, 500, (), orjson.dumps({"error": "no response"}), b"application/json")
        self.current = self.unread = self.response_start = self.response_parts = None
        if self.write_paused and not self.closing:
            self.drained = self.loop.create_future()
            try:
                await asyncio.wait_for(self.drained, self.limits.body_timeout_s)
            except TimeoutError:  # a client that does not read its answer holds no buffer for long
                self.transport.abort()
        self.in_app = False
        if self.closing:
            return
        if self.close_after_response or not request.keep_alive or self.server.draining:
            self.close()
        elif self.queue:
            self._next()
        else:
            if self.reading_paused:
                self.reading_paused = False
                self.transport.resume_reading()
            self.server.waiting(self)

    async def _receive(self) -> dict:
        body = self.unread
        if body is not None:
            self.unread = None
            return {"type": "http.request", "body": body, "more_body": False}
        if not self.closing:  # the whole body was given: wait for the client to go away
            if self.lost is None:
                self.lost = self.loop.create_future()
            await self.lost
        return {"type": "http.disconnect"}

    async def _send(self, message: dict) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.response_start = message
            return
        if kind != "http.response.body" or self.response_start is None or self.responded or self.current is None:
            return
        chunk = message.get("body", b"")
        if message.get("more_body", False):
            if self.response_parts is None:
                self.response_parts = []
            self.response_parts.append(chunk)
            return
        if self.response_parts:
            chunk = b"".join([*self.response_parts, chunk])
        self.responded = True
        self._write(self.current, self.response_start["status"], self.response_start.get("headers", ()), chunk)

    def _write(self, request: _Request, status: int, headers, payload: bytes, content_type: bytes | None = None) -> None:
        if self.closing:
            return
        keep_alive = request.keep_alive and not self.close_after_response and not self.server.draining
        head = [STATUS_LINES[status]]
        if content_type is not None:
            head.append(b"content-type: %s\r\n" % content_type)
        has_length = False
        for name, value in headers:
            if name == b"content-length":
                has_length = True
            head.extend((name, b": ", value, b"\r\n"))
        if not has_length:
            head.append(b"content-length: %d\r\n" % len(payload))
        head.append(b"\r\n" if keep_alive else b"connection: close\r\n\r\n")
        if request.method == "HEAD" or not payload:
            self.transport.write(b"".join(head))
        elif len(payload) > LARGE_BODY_BYTES:
            self.transport.write(b"".join(head))
            self.transport.write(payload)
        else:
            head.append(payload)
            self.transport.write(b"".join(head))
        if not keep_alive:
            self.close_after_response = True

    # refusing and closing

    def refuse(self, status: int, message: str, extra_headers: tuple = (), reason: str | None = None, linger: bool = True) -> None:
        """Answer `status` with {"error": message} and close (after the answer in the app, if one is)."""
        if self.closing:
            return
        self.server.refused(reason or str(status))
        if self.in_app:  # answering now would cut into that response
            self.close_after_response = True
            self._pause_reading()
            return
        body = orjson.dumps({"error": message})
        head = [STATUS_LINES[status], b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)]
        head.extend(b"%s: %s\r\n" % header for header in extra_headers)
        head.append(b"connection: close\r\n\r\n")
        head.append(body)
        self.transport.write(b"".join(head))
        if not linger or not self.transport.can_write_eof():  # TLS: no half-close
            self.close()
            return
        self.closing = self.lingering = True  # data_received now drops what arrives
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        self.transport.write_eof()
        self.server.lingering(self)

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.server.closing(self)
            self.transport.close()

    def expire(self) -> None:
        """Its deadline passed while it waited for the client."""
        if self.lingering:
            self.transport.close()
        elif self.phase == HEAD:
            self.refuse(408, f"the request headers did not arrive within {self.limits.header_timeout_s:g} s (--header-timeout)")
        elif self.phase == BODY:
            self.refuse(408, f"the request body did not arrive within {self.limits.body_timeout_s:g} s (--body-timeout)")
        else:
            self.close()  # asked nothing, so nothing to answer

    def evict(self) -> None:
        """Make room for a new connection: this one has waited longest without a request in the app."""
        if self.lingering:
            self.transport.close()
        elif self.phase == IDLE:
            self.close()
        else:
            # Closed at once, not lingering: its descriptor is what the new connection needs.
            self.refuse(503, "the server is at its connection limit (--max-connections); retry", ((b"retry-after", b"1"),), "evicted", linger=False)
