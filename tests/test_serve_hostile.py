"""`bmc serve` against hostile clients: the real server in a subprocess on 127.0.0.1, real sockets, real tritonclient.

Every test answers a defect of issue 19 ("One client must not hurt the others", raw-path routing,
TLS and tokens, Host and Origin). Nothing races the clock: each asserts what the server answered
(431, 408, 503, 200) or that it closed the connection, with the server's own deadlines set short.
"""

from __future__ import annotations

import datetime
import http.client
import io
import json
import os
import re
import resource
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from test_serve import _free_port

DIGIT = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
DIGIT_BODY = json.dumps(DIGIT).encode()


class Served:
    """A `bmc serve` subprocess reached over HTTP or HTTPS; logs go to files (a full pipe would stall it)."""

    def __init__(self, logs: Path, *args: str, host: str = "127.0.0.1", nofile: int | None = None,
                 tls: ssl.SSLContext | None = None, token: str | None = None):
        self.port = _free_port()
        self.tls = tls
        self.token = token
        logs.mkdir(parents=True, exist_ok=True)
        self.stderr_path = logs / f"serve-{self.port}.err"
        limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))) if nofile else None
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bmc", "serve", *args, "--host", host, "--port", str(self.port)],
                stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=limit,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bmc serve exited {self.process.returncode}: {self.stderr()}")
            try:
                if self.request("GET", "/v2/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"bmc serve did not become ready in 60 s: {self.stderr()}")

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30):
        """(status, body, headers) on a fresh connection."""
        if self.tls is not None:
            connection = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout, context=self.tls)
        else:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        headers = dict(headers or {})
        if self.token is not None:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
        finally:
            connection.close()

    def raw(self, timeout: float = 30) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def metric(self, name: str) -> float:
        text = self.request("GET", "/metrics")[1].decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " "))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or b"" if it closes at once)."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from bmc.export import ExportConfig, export

    root = tmp_path_factory.mktemp("hostile_models")
    export(ExportConfig(model="seed-mlp", input_size=8, input_channels=1, num_classes=10, out=root / "digits.onnx"))
    return {"digits": root / "digits.onnx", "root": root}


@pytest.fixture(scope="module")
def digits(models, tmp_path_factory):
    """Short deadlines, so the timeout tests end in about a second."""
    server = Served(tmp_path_factory.mktemp("logs"), str(models["digits"]), "--max-batch", "8", "--threads", "1",
                    "--header-timeout", "1", "--body-timeout", "1")
    yield server
    server.stop()


# One client must not hurt the others: header and URL size


def test_a_64_mib_header_is_refused_with_431_before_the_server_reads_it(digits):
    with digits.raw() as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        chunk, sent, answer = b"a" * 65536, 0, b""
        try:
            while sent < 64 * 1024 * 1024 and not answer:
                sock.sendall(chunk)
                sent += len(chunk)
                try:
                    answer = sock.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
        except OSError:
            pass  # the server answered and stopped reading: the rest of the header goes nowhere
        answer += read_response(sock)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b"--max-header-bytes" in answer
    assert sent < 64 * 1024 * 1024  # answered long before the header ended
    assert digits.request("GET", "/v2/health/live")[0] == 200


@pytest.mark.parametrize("count, size", [(10_000, 16), (101, 1)], ids=["10,000 headers", "101 tiny headers"])
def test_too_many_header_fields_are_refused_with_431(digits, count, size):
    headers = "".join(f"x-{i}: {'v' * size}\r\n" for i in range(count)).encode()
    with digits.raw() as sock:
        try:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n")
        except OSError:
            pass
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]


def test_a_long_url_is_refused_with_414(digits):
    status, body, _ = digits.request("GET", "/v2/health/live?pad=" + "a" * 10_000)
    assert status == 414 and b"URL" in body


# Slow and silent connections


def test_silent_slow_header_and_slow_body_connections_are_closed_by_their_deadlines(digits):
    silent = digits.raw()
    slow_header = digits.raw()
    slow_header.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
    slow_body = digits.raw()
    # A Content-Length larger than the body sent: never answered before, 408 now.
    slow_body.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(DIGIT_BODY) + 100, DIGIT_BODY))
    try:
        assert read_response(silent) == b""  # asked nothing: closed without an answer
        header_answer = read_response(slow_header)
        assert header_answer.startswith(b"HTTP/1.1 408") and b"--header-timeout" in header_answer
        body_answer = read_response(slow_body)
        assert body_answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in body_answer
    finally:
        for sock in (silent, slow_header, slow_body):
            sock.close()
    assert digits.metric("bmc_serve_http_refusals_total") >= 2


def test_normal_clients_are_served_while_300_silent_and_slow_connections_are_held(models, tmp_path):
    # 256 descriptors: the server keeps 64 for itself and lowers --max-connections to 192.
    server = Served(tmp_path, str(models["digits"]), "--threads", "1", nofile=256)
    held: list[socket.socket] = []
    try:
        assert "--max-connections lowered to 192" in server.stderr()
        for index in range(300):
            sock = server.raw()
            if index % 3 == 1:
                sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            elif index % 3 == 2:
                sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n{")
            held.append(sock)

        def client(_) -> list[int]:
            return [server.request("POST", "/v2/models/digits/infer", DIGIT_BODY)[0] for _ in range(10)]

        with ThreadPoolExecutor(8) as pool:
            statuses = [status for batch in pool.map(client, range(8)) for status in batch]
        assert statuses == [200] * 80
        assert server.process.poll() is None
    finally:
        for sock in held:
            sock.close()
        server.stop()


def identity_model(path: Path, width: int) -> Path:
    """[batch, width] FP32 in, the same out: large answers on demand."""
    import onnx
    from onnx import TensorProto, helper

    from bmc.artifact import write_sidecar_sha256

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])], "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    write_sidecar_sha256(path)
    return path


def test_a_new_connection_gets_503_when_every_connection_has_a_request_in_progress(models, tmp_path):
    width = 1 << 20
    model = identity_model(models["root"] / "identity.onnx", width)
    server = Served(tmp_path, str(model), "--threads", "1", "--max-batch", "4", "--max-connections", "1")
    try:
        rows = np.ones((4, width), np.float32)  # a 16 MiB answer
        header = json.dumps({"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                                         "parameters": {"binary_data_size": rows.nbytes}}],
                             "parameters": {"binary_data_output": True}}).encode()
        busy = socket.socket()
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        busy.settimeout(30)
        busy.connect(("127.0.0.1", server.port))
        with busy:
            busy.sendall(b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nInference-Header-Content-Length: %d\r\n"
                         b"Content-Length: %d\r\n\r\n" % (len(header), len(header) + rows.nbytes) + header + rows.tobytes())
            # Its answer has begun and is not read: the request stays in progress until the client reads it.
            assert busy.recv(12) == b"HTTP/1.1 200"
            with server.raw() as refused:
                answer = read_response(refused)
            assert answer.startswith(b"HTTP/1.1 503") and b"--max-connections" in answer, answer[:200]
            assert b"retry-after: 1" in answer.lower()
        # Once the server has seen that client go, a new one is served again.
        deadline = time.monotonic() + 10
        while server.request("GET", "/v2/health/live")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.request("GET", "/v2/health/live")[0] == 200
    finally:
        server.stop()


# A stalled upload delays every batch


def test_a_stalled_upload_does_not_hold_the_batch_of_other_requests(models, tmp_path):
    # The batcher waits up to --max-delay-ms only for requests still arriving; a stalled body must not count,
    # or the complete request below waits 10 s and misses its 5 s deadline (504).
    server = Served(tmp_path, str(models["digits"]), "--threads", "1", "--max-batch", "8",
                    "--max-delay-ms", "10000", "--timeout-ms", "5000")
    try:
        with server.raw() as stalled:
            stalled.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(DIGIT_BODY))
            assert stalled.recv(4096).startswith(b"HTTP/1.1 100")  # its headers are in: the request is under way
            stalled.sendall(DIGIT_BODY[:20])
            status, body, _ = server.request("POST", "/v2/models/digits/infer", DIGIT_BODY)
            assert status == 200, body
    finally:
        server.stop()


# Rows per request


def test_more_rows_than_max_batch_are_refused_with_400(digits):
    rows = np.zeros((9, 1, 8, 8), np.float32)
    body = json.dumps({"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]})
    status, raw, _ = digits.request("POST", "/v2/models/digits/infer", body.encode())
    assert status == 400 and "at most 8" in json.loads(raw)["error"] and "--max-request-rows" in json.loads(raw)["error"]
    # A large binary request of many rows is refused too, without running it: 25 MB of JSON-described rows ...
    many = np.zeros((100_000, 1, 8, 8), np.float32)
    header = json.dumps({"inputs": [{"name": "input", "shape": [100_000, 1, 8, 8], "datatype": "FP32"}]}).encode()
    rows_as_json = b'{"inputs": [{"name": "input", "shape": [100000, 1, 8, 8], "datatype": "FP32", "data": [' + b",".join([b"0"] * many.size) + b"]}]}"
    status, raw, _ = digits.request("POST", "/v2/models/digits/infer", rows_as_json)
    assert status == 400 and "100000 rows" in json.loads(raw)["error"]
    # ... and in binary form even before its body is read: its length says it holds more than 8 rows.
    header = json.dumps({"inputs": [{"name": "input", "shape": list(many.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": many.nbytes}}]}).encode()
    with digits.raw() as sock:
        sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nInference-Header-Content-Length: %d\r\n"
                     b"Content-Length: %d\r\n\r\n" % (len(header), len(header) + many.nbytes))
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 413") and b"--max-request-rows" in answer, answer[:300]
    one = np.zeros((1, 1, 8, 8), np.float32)
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": one.nbytes}}]}).encode()
    status, _, _ = digits.request("POST", "/v2/models/digits/infer", header + one.tobytes(), {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200
    eight = json.dumps({"inputs": [{"name": "input", "shape": [8, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 512}]})
    assert digits.request("POST", "/v2/models/digits/infer", eight.encode())[0] == 200


def test_onnxruntime_gives_back_the_memory_of_a_run_larger_than_any_full_batch(models, tmp_path):
    """A model with a dynamic width: one 100 MB request must not leave its activations in onnxruntime's arena."""
    import onnx
    from onnx import TensorProto, helper

    from bmc.artifact import write_sidecar_sha256

    path = models["root"] / "wide.onnx"
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["hidden"]), helper.make_node("Neg", ["hidden"], ["output"])], "wide",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "width"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "width"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    write_sidecar_sha256(path)
    server = Served(tmp_path, str(path), "--threads", "1", "--max-body-bytes", str(128 << 20))

    def infer(width: int) -> int:
        x = np.ones((1, width), np.float32)
        header = json.dumps({"inputs": [{"name": "input", "shape": [1, width], "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}],
                             "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}).encode()
        return server.request("POST", "/v2/models/wide/infer", header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))})[0]

    def rss_mb() -> float:
        return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{server.process.pid}/status").read_text()).group(1)) / 1024

    try:
        assert infer(1000) == 200
        before = rss_mb()
        assert infer(25_000_000) == 200  # 100 MB in, 100 MB between the two nodes, 100 MB out
        assert infer(1000) == 200
        # The arena alone would keep about 300 MB of the large run.
        assert rss_mb() - before < 100, (before, rss_mb())
    finally:
        server.stop()


# /classify memory


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def _png(width: int, height: int, rows: bytes, interlace: int = 0) -> bytes:
    """A grayscale 8-bit PNG whose IDAT holds `rows` (filter byte + pixels per row), compressed."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, interlace)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows, 9)) + _png_chunk(b"IEND", b"")


def test_a_png_whose_pixel_data_stops_early_gets_400(digits):
    whole = b"".join(b"\x00" + bytes([row * 8] * 32) for row in range(32))
    assert digits.request("POST", "/v2/models/digits/classify", _png(32, 32, whole))[0] == 200
    status, raw, _ = digits.request("POST", "/v2/models/digits/classify", _png(32, 32, whole[: len(whole) // 2]))
    assert status == 400 and "pixel data" in json.loads(raw)["error"]
    # Interlaced (Adam7): the last row is written by an early pass, so only the full check can tell.
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    adam7 = b"".join((b"\x00" + b"\x80" * ((32 - x0 + dx - 1) // dx)) * ((32 - y0 + dy - 1) // dy) for x0, y0, dx, dy in passes)
    assert digits.request("POST", "/v2/models/digits/classify", _png(32, 32, adam7, interlace=1))[0] == 200
    assert digits.request("POST", "/v2/models/digits/classify", _png(32, 32, adam7[: len(adam7) - 200], interlace=1))[0] == 400


def test_a_one_pixel_high_40_megapixel_png_is_refused_before_it_is_decoded(digits):
    # 39 KB on the wire, 40 MB of pixels: refused by its aspect ratio from the header alone.
    bomb = _png(40_000_000, 1, b"\x00" + bytes(40_000_000))
    assert len(bomb) < 100_000
    status, raw, _ = digits.request("POST", "/v2/models/digits/classify", bomb)
    assert status == 400 and "aspect ratio" in json.loads(raw)["error"]


def test_a_large_jpeg_is_decoded_at_a_reduced_size(digits):
    from PIL import Image

    photo = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (3000, 4000, 3), dtype=np.uint8)).save(photo, format="JPEG", quality=50)
    status, raw, _ = digits.request("POST", "/v2/models/digits/classify?top_k=1", photo.getvalue())
    assert status == 200, raw


# Routing on the raw path


@pytest.mark.parametrize("path", ["/v2/models/digits%2finfer", "/v2/models/digits%2Finfer", "/v2%2fmodels/digits/infer",
                                  "/v2/models/digits/versions%2f1/infer"])
def test_percent_encoded_slashes_are_not_path_separators(digits, path):
    status, body, _ = digits.request("POST", path, DIGIT_BODY)
    assert status in (404, 405) and b"outputs" not in body  # a model named "digits%2finfer" (GET only) or no route
    assert digits.request("POST", "/v2/models/digits/infer", DIGIT_BODY)[0] == 200


# Keep data from leaking: TLS, client certificates, token, Host and Origin


def make_certificates(directory: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def certificate(subject, key, issuer, issuer_key, ca: bool, extensions=()):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(stem: str, cert, key) -> None:
        (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                                  serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate(name("bmc test CA"), ca_key, name("bmc test CA"), ca_key, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = certificate(name("127.0.0.1"), server_key, ca.subject, ca_key, ca=False, extensions=[
        x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])])
    client = certificate(name("a client"), client_key, ca.subject, ca_key, ca=False,
                         extensions=[x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])])
    write("ca", ca, ca_key)
    write("server", server, server_key)
    write("client", client, client_key)
    return {stem: directory / f"{stem}.{suffix}" for stem in ("ca", "server", "client") for suffix in ("pem",)} | {
        "server_key": directory / "server.key", "client_key": directory / "client.key"}


def _triton_infer(client, headers: dict | None = None) -> np.ndarray:
    import tritonclient.http as triton

    tensor = triton.InferInput("input", [1, 1, 8, 8], "FP32")
    tensor.set_data_from_numpy(np.full((1, 1, 8, 8), 0.5, np.float32), binary_data=True)
    return client.infer("digits", [tensor], headers=headers).as_numpy("output")


def test_tritonclient_speaks_tls_and_mutual_tls(models, tmp_path):
    import tritonclient.http as triton

    certs = make_certificates(tmp_path)
    trusted = ssl.create_default_context(cafile=str(certs["ca"]))
    server = Served(tmp_path, str(models["digits"]), "--threads", "1", "--tls-cert", str(certs["server"]),
                    "--tls-key", str(certs["server_key"]), tls=trusted)
    try:
        client = triton.InferenceServerClient(server.url, ssl=True, ssl_options={"ca_certs": str(certs["ca"])})
        assert client.is_server_ready() and _triton_infer(client).shape == (1, 10)
        client.close()
        with server.raw() as plain:  # plain HTTP on the TLS port is not answered in the clear
            plain.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert b'"live"' not in read_response(plain)
        assert "https://" in server.stderr()
    finally:
        server.stop()

    mutual = Served(tmp_path, str(models["digits"]), "--threads", "1", "--tls-cert", str(certs["server"]), "--tls-key",
                    str(certs["server_key"]), "--tls-client-ca", str(certs["ca"]),
                    tls=_client_context(certs))
    try:
        options = {"ca_certs": str(certs["ca"]), "certfile": str(certs["client"]), "keyfile": str(certs["client_key"])}
        client = triton.InferenceServerClient(mutual.url, ssl=True, ssl_options=options)
        assert _triton_infer(client).shape == (1, 10)
        client.close()
        anonymous = triton.InferenceServerClient(mutual.url, ssl=True, ssl_options={"ca_certs": str(certs["ca"])})
        with pytest.raises(Exception):  # no client certificate: the handshake fails, nothing is answered
            anonymous.is_server_live()
        anonymous.close()
    finally:
        mutual.stop()


def _client_context(certs: dict[str, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs["ca"]))
    context.load_cert_chain(certs["client"], certs["client_key"])
    return context


def test_a_bearer_token_guards_every_route_but_live_and_ready(models, tmp_path):
    import tritonclient.http as triton

    token = "s3cret-token-" + "x" * 20
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    server = Served(tmp_path, str(models["digits"]), "--threads", "1", "--auth-token-file", str(token_file),
                    "--allow-host", "serve.example", token=token)
    try:
        anonymous = Served.__new__(Served)
        anonymous.port, anonymous.tls, anonymous.token = server.port, None, None
        assert anonymous.request("GET", "/v2/health/live")[0] == 200
        assert anonymous.request("GET", "/v2/health/ready")[0] == 200
        for method, path in (("GET", "/v2"), ("GET", "/metrics"), ("GET", "/v2/models/digits"), ("GET", "/v2/models/nope"),
                             ("GET", "/no/such/route"), ("POST", "/v2/models/digits/infer")):
            status, body, headers = anonymous.request(method, path, DIGIT_BODY if method == "POST" else None)
            assert status == 401 and json.loads(body) == {"error": "unauthorized"} and headers["www-authenticate"] == "Bearer", path
        for wrong in ("Bearer " + token[:-1], "Bearer " + token + "x", "Basic " + token, token):
            assert anonymous.request("GET", "/v2", headers={"Authorization": wrong})[0] == 401
        assert anonymous.request("GET", "/v2", headers={"Authorization": "bearer " + token})[0] == 200
        assert server.request("POST", "/v2/models/digits/infer", DIGIT_BODY)[0] == 200
        # --allow-host: that name is answered too (with the token).
        assert server.request("GET", "/v2", headers={"Host": "serve.example:443"})[0] == 200

        client = triton.InferenceServerClient(server.url)
        header = {"Authorization": f"Bearer {token}"}
        assert client.is_model_ready("digits", headers=header) and _triton_infer(client, header).shape == (1, 10)
        with pytest.raises(triton.InferenceServerException, match="unauthorized"):
            _triton_infer(client)
        client.close()
    finally:
        server.stop()
    assert token not in server.stderr()


def test_requests_naming_another_host_or_origin_are_refused(digits):
    # DNS rebinding: a page on attacker.example, whose name now resolves to 127.0.0.1, posts text/plain.
    status, body, _ = digits.request("POST", "/v2/models/digits/infer", DIGIT_BODY,
                                     {"Host": "attacker.example", "Content-Type": "text/plain"})
    assert status == 403 and "--allow-host" in json.loads(body)["error"]
    assert digits.request("GET", "/v2/health/live", headers={"Host": "attacker.example:%d" % digits.port})[0] == 403
    for host in (f"127.0.0.1:{digits.port}", f"localhost:{digits.port}", f"[::1]:{digits.port}", "LOCALHOST", "localhost."):
        assert digits.request("GET", "/v2/health/live", headers={"Host": host})[0] == 200, host
    # Another site's page (the browser sends its Origin) cannot use the server, even with the right Host.
    for origin in ("http://attacker.example", "null", "http://127.0.0.1.attacker.example"):
        assert digits.request("POST", "/v2/models/digits/infer", DIGIT_BODY, {"Origin": origin})[0] == 403, origin
    assert digits.request("POST", "/v2/models/digits/infer", DIGIT_BODY, {"Origin": "http://localhost:3000"})[0] == 200
    # infer takes JSON or binary tensors: none of the content types a page can send without asking first.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, body, _ = digits.request("POST", "/v2/models/digits/infer", DIGIT_BODY, {"Content-Type": content_type})
        assert status == 415 and "application/json" in json.loads(body)["error"], content_type
    for content_type in (None, "application/json", "application/json; charset=utf-8", "application/octet-stream"):
        headers = {"Content-Type": content_type} if content_type else {}
        assert digits.request("POST", "/v2/models/digits/infer", DIGIT_BODY, headers)[0] == 200, content_type


def test_binding_beyond_loopback_without_tls_or_a_token_warns_and_answers_ip_addresses_only(models, tmp_path):
    server = Served(tmp_path, str(models["digits"]), "--threads", "1", host="0.0.0.0")
    try:
        assert "warning: serving on 0.0.0.0 without --tls-cert or --auth-token-file" in server.stderr()
        assert server.request("GET", "/v2/health/live", headers={"Host": "192.0.2.7:8000"})[0] == 200
        assert server.request("GET", "/v2/health/live", headers={"Host": "attacker.example"})[0] == 403
    finally:
        server.stop()
    token_file = tmp_path / "token"
    token_file.write_text("t" * 32)
    token_file.chmod(0o600)
    quiet = Served(tmp_path, str(models["digits"]), "--threads", "1", "--auth-token-file", str(token_file), host="0.0.0.0")
    quiet.stop()
    assert "warning" not in quiet.stderr()
    local = Served(tmp_path, str(models["digits"]), "--threads", "1")
    local.stop()
    assert "warning" not in local.stderr()
