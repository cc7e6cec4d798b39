"""Who may talk to bmc serve: TLS and client certificates, the bearer token, Host and Origin, infer's content type.

Request admission, in this order (each a one-line JSON error, nothing more):
  403  Host names none of the names the server answers to (DNS rebinding: a page on attacker.example
       whose name now resolves to 127.0.0.1 sends `Host: attacker.example`); names are the bound
       host, localhost, 127.0.0.1 and ::1, and --allow-host; a wildcard bind (0.0.0.0, ::) also
       accepts any IP address, which no rebinding can forge. The port is not compared, so a
       container's port mapping works.
  403  Origin (sent by browsers) names none of those names: another site's page cannot use the server.
  401  --auth-token-file is set and `Authorization: Bearer <token>` is missing or wrong (every route
       but /v2/health/live and /v2/health/ready; compared in constant time).
  415  infer with a Content-Type other than application/json or application/octet-stream (what
       aiohttp-based clients send for bytes); tritonclient's own client sends none, which is accepted.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from bmc.errors import BmcError

log = logging.getLogger("bmc.serve")

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
UNAUTHENTICATED_ROUTES = frozenset({"live", "ready"})
INFER_CONTENT_TYPES = frozenset({b"application/json", b"application/octet-stream"})
MIN_TOKEN_CHARS = 16
_HOST_CACHE_SIZE = 256


class AccessError(BmcError):
    """A TLS certificate, key or token file cannot be used."""


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


HOST_REFUSED = Refusal(403, "this server does not answer to that Host (see --allow-host)")
ORIGIN_REFUSED = Refusal(403, "requests from that Origin are not allowed (see --allow-host)")
UNAUTHORIZED = Refusal(401, "unauthorized", ((b"www-authenticate", b"Bearer"),))


@dataclass(frozen=True)
class Admission:
    """The per-request checks; `check` is called once per request with its headers and route kind."""

    host_names: frozenset[str]
    any_ip_host: bool = False  # bound to a wildcard address
    any_host: bool = False  # --allow-host '*'
    token_sha256: bytes | None = None
    _verdicts: dict = field(default_factory=dict, compare=False, repr=False)  # Host value -> allowed

    @classmethod
    def for_server(cls, bound_host: str, allow_hosts: tuple[str, ...] = (), token: bytes | None = None) -> Admission:
        bound = bound_host.strip("[]").lower()
        names = {*LOOPBACK_NAMES, *(name.strip("[]").lower().rstrip(".") for name in allow_hosts if name != "*")}
        if bound not in WILDCARD_HOSTS:
            names.add(bound)
        return cls(
            host_names=frozenset(names),
            any_ip_host=bound in WILDCARD_HOSTS,
            any_host="*" in allow_hosts,
            token_sha256=hashlib.sha256(token).digest() if token is not None else None,
        )

    def check(self, headers: list[tuple[bytes, bytes]], route: str) -> Refusal | None:
        """None when the request may go on; else the refusal to answer."""
        host = origin = authorization = content_type = None
        for name, value in headers:
            if name == b"host":
                host = value
            elif name == b"origin":
                origin = value
            elif name == b"authorization":
                authorization = value
            elif name == b"content-type":
                content_type = value
        # No Host at all is HTTP/1.0 or a hand-made request: browsers always send one.
        if host is not None and not self._host_allowed(host):
            return HOST_REFUSED
        if origin is not None and not self._origin_allowed(origin):
            return ORIGIN_REFUSED
        if self.token_sha256 is not None and route not in UNAUTHENTICATED_ROUTES and not self._authorized(authorization):
            return UNAUTHORIZED
        if route == "infer" and content_type is not None:
            media = content_type.split(b";", 1)[0].strip().lower()
            if media not in INFER_CONTENT_TYPES:
                shown = media[:40].decode("latin-1")
                return Refusal(415, f"infer takes Content-Type application/json or application/octet-stream; got {shown!r}")
        return None

    def _host_allowed(self, value: bytes) -> bool:
        verdict = self._verdicts.get(value)
        if verdict is None:
            name = host_name(value.decode("latin-1"))
            verdict = name is not None and (self.any_host or name in self.host_names or (self.any_ip_host and _is_ip(name)))
            if len(self._verdicts) >= _HOST_CACHE_SIZE:  # made-up Host values cannot grow it
                self._verdicts.clear()
            self._verdicts[value] = verdict
        return verdict

    def _origin_allowed(self, value: bytes) -> bool:
        scheme, sep, rest = value.decode("latin-1").partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            return False  # "null" (sandboxed frames, file://) and anything else
        name = host_name(rest)
        return name is not None and name in self.host_names

    def _authorized(self, value: bytes | None) -> bool:
        if value is None:
            return False
        scheme, _, credentials = value.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        # Digests of equal length: the comparison takes the same time whatever the client sent.
        return hmac.compare_digest(hashlib.sha256(credentials.strip()).digest(), self.token_sha256)


def host_name(authority: str) -> str | None:
    """The lower-case name in a Host or Origin authority ("name", "name:port", "[v6]:port"); None if malformed."""
    text = authority.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        name, rest = text[1:end], text[end + 1 :]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
    else:
        name, sep, port = text.partition(":")
        if sep and not port.isdigit():
            return None
    name = name.rstrip(".")
    return name or None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def read_token(path: Path) -> bytes:
    """The bearer token in `path` (surrounding whitespace dropped); AccessError if it is unusable."""
    try:
        token = Path(path).read_bytes().strip()
    except OSError as exc:
        raise AccessError(f"--auth-token-file {path}: {exc.strerror or exc}") from None
    if len(token) < MIN_TOKEN_CHARS or any(c <= 0x20 or c >= 0x7F for c in token):
        raise AccessError(
            f"--auth-token-file {path}: the token must be at least {MIN_TOKEN_CHARS} printable ASCII characters without spaces "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    try:
        if Path(path).stat().st_mode & 0o077:
            log.warning("%s is readable by other users; chmod 600 it", path)
    except OSError:
        pass
    return token


def tls_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """A server context (TLS 1.2 or later) for cert and key; with client_ca, clients must show a certificate it signed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise AccessError(f"--tls-cert {cert} / --tls-key {key}: cannot load them ({_ssl_reason(exc)})") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise AccessError(f"--tls-client-ca {client_ca}: cannot load it ({_ssl_reason(exc)})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _ssl_reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__
