"""`bmc serve` as clients meet it: the real server in a subprocess on 127.0.0.1, real HTTP, real tritonclient."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bmc.artifact import write_sidecar_sha256
from bmc.runtime.sessions import cuda_works
from bmc.serve_edge import ServeConfig
from bmc.serve_edge.integrity import read_verified_model
from conftest import run_bmc

ROW = 16  # features per row of the held model
TEST_GATE_ENV = "BMC_SERVE_TEST_GATE"  # bmc.serve_edge.testing: every model run waits while the gate is closed


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A `bmc serve` subprocess; stopped (SIGTERM, then SIGKILL) when the test is done."""

    def __init__(self, *args: str, env: dict | None = None, gate: Gate | None = None):
        self.port = _free_port()
        self.gate = gate
        if gate is not None:
            env = {**(env or {}), TEST_GATE_ENV: str(gate.path)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bmc", "serve", *args, "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bmc serve exited {self.process.returncode}: {self.process.stderr.read()}")
            try:
                if self.request("GET", "/v2/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("bmc serve did not become ready in 60 s")

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read(), dict(response.getheaders())
        finally:
            connection.close()

    def infer(self, model: str, array: np.ndarray, timeout: float = 30):
        body = {"inputs": [{"name": "input", "shape": list(array.shape), "datatype": "FP32", "data": array.ravel().tolist()}]}
        status, raw, headers = self.request("POST", f"/v2/models/{model}/infer", json.dumps(body).encode(), timeout=timeout)
        return status, json.loads(raw), headers

    def metric(self, name: str, labels: str = "") -> float:
        text = self.request("GET", "/metrics")[1].decode()
        match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def stop(self) -> None:
        if self.gate is not None:
            self.gate.open()  # a held batch would keep the drain waiting
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Gate:
    """The file a server started with BMC_SERVE_TEST_GATE waits on: every model run waits while it is closed."""

    def __init__(self, path: Path, opened: bool = True):
        self.path = path
        if opened:
            self.open()

    def open(self) -> None:
        self.path.touch()

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


def held_model(path: Path) -> Path:
    """x @ W for rows of ROW features, W orthogonal: every output row depends on its input row alone."""
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((ROW, ROW)))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["output"])],
        "held",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", ROW])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", ROW])],
        [numpy_helper.from_array(q.astype(np.float32), "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    write_sidecar_sha256(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from bmc.export import ExportConfig, export

    root = tmp_path_factory.mktemp("serve_models")
    export(ExportConfig(model="seed-mlp", input_size=8, input_channels=1, num_classes=10, out=root / "digits.onnx"))
    return {"digits": root / "digits.onnx", "held": held_model(root / "held.onnx")}


@pytest.fixture(scope="module")
def digits_server(models):
    server = Server(str(models["digits"]), "--max-batch", "8", "--reject-nonfinite", "--max-body-bytes", "1048576", "--threads", "1")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def held_server(models, tmp_path_factory):
    """The held model behind a gate its tests close and open; --timeout-ms far off, so holding never turns into a 504."""
    gate = Gate(tmp_path_factory.mktemp("gate") / "open")
    server = Server(str(models["held"]), "--max-batch", "8", "--max-queue", "8", "--threads", "1", "--timeout-ms", "600000", gate=gate)
    yield server
    server.stop()


def _reference(path: Path, array: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": array})[0]


def test_protocol_routes_and_metadata(digits_server):
    assert digits_server.request("GET", "/v2/health/live")[0] == 200
    assert digits_server.request("GET", "/v2/health/ready")[0] == 200
    status, body, _ = digits_server.request("GET", "/v2")
    assert status == 200 and json.loads(body)["name"] == "bmc" and "binary_tensor_data" in json.loads(body)["extensions"]
    status, body, _ = digits_server.request("GET", "/v2/models/digits")
    assert status == 200
    assert json.loads(body)["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert digits_server.request("GET", "/v2/models/digits/ready")[0] == 200
    assert digits_server.request("GET", "/v2/models/digits/versions/1/ready")[0] == 200
    status, body, _ = digits_server.request("GET", "/v2/models/nope")
    assert status == 404 and "unknown model 'nope'" in json.loads(body)["error"]


def test_tritonclient_json_and_binary_tensors(digits_server, models):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(digits_server.url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    assert client.get_model_metadata("digits")["outputs"][0]["name"] == "output"
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    expected = _reference(models["digits"], x)
    for binary_in in (False, True):
        for binary_out in (False, True, None):
            tensor = triton.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary_in)
            outputs = None if binary_out is None else [triton.InferRequestedOutput("output", binary_data=binary_out)]
            result = client.infer("digits", [tensor], outputs=outputs, request_id="r1")
            np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-5, atol=1e-6)
            assert result.get_response()["id"] == "r1"
    with pytest.raises(triton.InferenceServerException, match="unknown model"):
        client.infer("nope", [tensor])
    client.close()


def _infer_body(shape, data, datatype="FP32", name="input") -> bytes:
    return json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}).encode()


GOOD = [0.5] * 64
BAD_REQUESTS = [
    ("malformed JSON", b'{"inputs": [', {}, 400, "not valid JSON"),
    ("100,000-deep JSON", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400, ""),
    # Refused by the JSON parser (orjson 3.13 stops at 1,024 levels; older releases parse it) or by the tensor decoder: the
    # wording is the library's, the 400 is ours.
    ("100,000-deep data", b'{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": '
     + b"[" * 100_000 + b"]" * 100_000 + b"}]}", {}, 400, ""),
    ("not an object", b"[1, 2]", {}, 400, "JSON object"),
    ("no inputs", b"{}", {}, 400, "'inputs'"),
    ("unknown input", _infer_body([1, 1, 8, 8], GOOD, name="x"), {}, 400, "unknown input 'x'"),
    ("missing input", b'{"inputs": [{"name": "input"}]}', {}, 400, "'shape'"),
    ("prod(shape) != data", _infer_body([1, 1, 8, 8], GOOD[:10]), {}, 400, "needs 64 values"),
    ("negative dims", _infer_body([-1, 1, 8, 8], GOOD), {}, 400, "negative dimension"),
    ("wrong rank", _infer_body([1, 64], GOOD), {}, 400, "the model takes [-1, 1, 8, 8]"),
    ("string in FP32", _infer_body([1, 1, 8, 8], ["a"] * 64), {}, 400, "holds strings"),
    ("numeric strings in FP32", _infer_body([1, 1, 8, 8], ["1.5"] * 64), {}, 400, "holds strings"),
    ("wrong dtype", _infer_body([1, 1, 8, 8], [1] * 64, datatype="INT64"), {}, 400, "the model takes FP32"),
    ("ragged data", _infer_body([1, 1, 8, 8], [[1, 2], [3]]), {}, 400, "ragged"),
    ("beyond FP32", _infer_body([1, 1, 8, 8], [1e39] * 64), {}, 400, "outside the range of FP32"),
    ("empty batch", _infer_body([0, 1, 8, 8], []), {}, 400, "empty"),
    ("huge shape", _infer_body([10**12, 1, 8, 8], GOOD), {}, 400, "needs"),
    ("bad header length", _infer_body([1, 1, 8, 8], GOOD), {"Inference-Header-Content-Length": "999999"}, 400, "outside"),
    ("unknown output", b'{"inputs": [{"name": "input", "shape": [1,1,8,8], "datatype": "FP32", "data": ' + json.dumps(GOOD).encode()
     + b'}], "outputs": [{"name": "nope"}]}', {}, 400, "unknown output"),
]


@pytest.mark.parametrize("label, body, headers, status, fragment", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_requests_get_4xx_with_a_json_error(digits_server, label, body, headers, status, fragment):
    got, raw, _ = digits_server.request("POST", "/v2/models/digits/infer", body, headers)
    assert got == status, raw
    error = json.loads(raw)["error"]
    assert isinstance(error, str) and error and "\n" not in error and fragment in error
    # and the server is none the worse for it
    assert digits_server.infer("digits", np.zeros((1, 1, 8, 8), np.float32))[0] == 200


def test_binary_faults_nan_and_unknown_model(digits_server):
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": 256}}]}).encode()
    nan = np.full((1, 1, 8, 8), np.nan, dtype=np.float32).tobytes()
    status, raw, _ = digits_server.request("POST", "/v2/models/digits/infer", header + nan, {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "NaN" in json.loads(raw)["error"]
    status, raw, _ = digits_server.request("POST", "/v2/models/digits/infer", header + nan[:100], {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "binary section" in json.loads(raw)["error"]
    status, raw, _ = digits_server.request("POST", "/v2/models/nope/infer", header, {})
    assert status == 404 and "unknown model" in json.loads(raw)["error"]


def test_oversized_bodies_get_413_before_they_are_read(digits_server):
    with socket.create_connection(("127.0.0.1", digits_server.port), timeout=10) as raw:
        # Declares 100 MB and sends none of it: the answer must not wait for the body.
        raw.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 413")
    with socket.create_connection(("127.0.0.1", digits_server.port), timeout=10) as raw:
        # Chunked: no length declared, so the server counts what streams in.
        raw.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        try:
            for _ in range(40):
                raw.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass  # the server may answer and close before the upload ends
        assert raw.recv(4096).startswith(b"HTTP/1.1 413")


ROUTES = ["/", "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/digits", "/v2/models/digits/ready",
          "/v2/models/digits/infer", "/v2/models/digits/classify", "/v2/models/nope/infer", "/v2/repository/index", "/metrics",
          "/v2/models/digits/versions/7/infer", "/v2/models//infer"]


def test_every_route_with_every_method_gives_no_500(digits_server):
    for path in ROUTES:
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"):
            status, _, headers = digits_server.request(method, path, b"{}" if method in ("POST", "PUT", "PATCH") else None)
            assert status < 500, (method, path, status)
            if status == 405:
                assert "allow" in {k.lower() for k in headers}
    assert digits_server.request("DELETE", "/v2/models/digits/infer")[0] == 405
    assert digits_server.request("GET", "/v2/models/digits/infer")[0] == 405
    assert digits_server.request("GET", "/v2/health/live")[0] == 200


def test_classify_returns_top_k_labels(digits_server):
    from PIL import Image

    image = io.BytesIO()
    Image.fromarray((np.arange(64, dtype=np.uint8) * 4).reshape(8, 8)).save(image, format="PNG")
    status, raw, _ = digits_server.request("POST", "/v2/models/digits/classify?top_k=3", image.getvalue())
    assert status == 200, raw
    predictions = json.loads(raw)["predictions"]
    assert len(predictions) == 3 and all(p["label"].startswith("class_") for p in predictions)
    assert predictions[0]["probability"] >= predictions[1]["probability"] >= predictions[2]["probability"]
    status, raw, _ = digits_server.request("POST", "/v2/models/digits/classify", b"not an image")
    assert status == 400 and "PNG or JPEG" in json.loads(raw)["error"]


def test_clients_that_disconnect_mid_request_leave_the_server_healthy(digits_server):
    good = _infer_body([1, 1, 8, 8], GOOD)
    for index in range(100):
        with socket.create_connection(("127.0.0.1", digits_server.port), timeout=10) as raw:
            head = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(good)
            # Half stop inside the body, half send it all and leave before the answer.
            raw.sendall(head + (good[: len(good) // 2] if index % 2 else good))
    # The server notices each departure on its own time: wait for that, not for a fixed 10 s.
    _wait_until(lambda: digits_server.metric("bmc_serve_requests_in_progress") <= 1, "the abandoned requests to end")  # 1: /metrics itself
    assert digits_server.metric("bmc_serve_queue_depth", '{model="digits"}') == 0
    assert digits_server.request("GET", "/v2/health/live")[0] == 200
    status, body, _ = digits_server.infer("digits", np.zeros((1, 1, 8, 8), np.float32))
    assert status == 200 and len(body["outputs"][0]["data"]) == 10


def test_metrics_count_every_request(digits_server):
    text = digits_server.request("GET", "/metrics")[1].decode()
    for name in ("bmc_serve_requests_total", "bmc_serve_request_latency_seconds_bucket", "bmc_serve_queue_time_seconds_bucket",
                 "bmc_serve_batch_size_bucket", "bmc_serve_queue_depth"):
        assert name in text
    before = sum(float(v) for v in re.findall(r'^bmc_serve_requests_total\{route="infer",status="\d+"\} (\S+)$', text, re.MULTILINE))
    for _ in range(3):
        digits_server.infer("digits", np.zeros((1, 1, 8, 8), np.float32))
    digits_server.request("POST", "/v2/models/digits/infer", b"{")
    text = digits_server.request("GET", "/metrics")[1].decode()
    after = sum(float(v) for v in re.findall(r'^bmc_serve_requests_total\{route="infer",status="\d+"\} (\S+)$', text, re.MULTILINE))
    assert after - before == 4


HELD = '{model="held"}'


def _wait_until(condition, what: str, hang_s: float = 60) -> None:
    """Wait for an event the test cannot be told about directly; hang_s only stops a broken server hanging the suite."""
    deadline = time.monotonic() + hang_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {hang_s:g} s for {what}")
        time.sleep(0.01)


def _in_server(server: Server, rows_before: float = 0) -> float:
    """Rows of the held model the server holds: in batches started since rows_before, plus those queued."""
    return server.metric("bmc_serve_batch_size_sum", HELD) - rows_before + server.metric("bmc_serve_queue_depth", HELD)


def test_full_queue_refuses_at_once_and_batched_equals_unbatched(held_server, models):
    server, gate = held_server, held_server.gate
    rng = np.random.default_rng(3)
    batches_before = server.metric("bmc_serve_batch_size_count", HELD)
    rows_before = server.metric("bmc_serve_batch_size_sum", HELD)
    rows = [rng.standard_normal((1, ROW)).astype(np.float32) for _ in range(10)]
    gate.close()
    with ThreadPoolExecutor(16) as pool:
        try:
            # Triton's queue test: one full batch running (8 rows, held at the gate), then 10 more requests for 8 queue places.
            running = pool.submit(server.infer, "held", rng.standard_normal((8, ROW)).astype(np.float32))
            _wait_until(lambda: server.metric("bmc_serve_batch_size_count", HELD) == batches_before + 1, "the first batch to start")
            pending = [pool.submit(server.infer, "held", row) for row in rows]
            _wait_until(lambda: sum(f.done() for f in pending) + server.metric("bmc_serve_queue_depth", HELD) == 10, "10 requests queued or answered")
            # At once: the refusals were answered while the running batch was still held at the gate.
            refused_while_held = [f.result() for f in pending if f.done()]
            assert len(refused_while_held) == 2 and server.metric("bmc_serve_queue_depth", HELD) == 8 and not running.done()
        finally:
            gate.open()  # also when an assertion failed: the pool waits for every request
        results = [f.result() for f in pending]
        assert running.result()[0] == 200
    assert all(r[0] == 503 and "queue is full" in r[1]["error"] and r[2].get("retry-after") == "1" for r in refused_while_held)
    assert sorted(r[0] for r in results) == [200] * 8 + [503] * 2
    # The 8 queued requests ran as one batch: each row must equal the model run on that row alone.
    assert server.metric("bmc_serve_batch_size_count", HELD) == batches_before + 2
    assert server.metric("bmc_serve_batch_size_sum", HELD) == rows_before + 16
    for row, (status, body, _) in zip(rows, results):
        if status == 200:
            got = np.asarray(body["outputs"][0]["data"], dtype=np.float32)
            np.testing.assert_allclose(got, _reference(models["held"], row)[0], rtol=1e-5, atol=1e-6)


def test_ten_times_overload_gives_only_503s_and_bounded_memory(held_server):
    server, gate = held_server, held_server.gate

    def rss_kib() -> int:
        status = Path(f"/proc/{server.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))

    before = rss_kib()
    rows_before = server.metric("bmc_serve_batch_size_sum", HELD)
    zero = np.zeros((1, ROW), np.float32)
    batches_before = server.metric("bmc_serve_batch_size_count", HELD)
    gate.close()
    with ThreadPoolExecutor(24) as pool:
        try:
            futures = [pool.submit(server.infer, "held", zero) for _ in range(80)]
            # Held at the gate, the server keeps one batch and 8 queued requests; it must refuse every other one.
            _wait_until(lambda: sum(f.done() for f in futures) + _in_server(server, rows_before) == 80, "80 requests held or answered")
            answered_while_held = sum(f.done() for f in futures)
            batches_while_held = server.metric("bmc_serve_batch_size_count", HELD) - batches_before
            batch_rows = server.metric("bmc_serve_batch_size_sum", HELD) - rows_before
            queued = server.metric("bmc_serve_queue_depth", HELD)
        finally:
            gate.open()
        statuses = [f.result()[0] for f in futures]
    assert batches_while_held == 1 and 1 <= batch_rows <= 8 and queued == 8
    assert statuses.count(503) == answered_while_held == 80 - batch_rows - queued
    assert statuses.count(200) == batch_rows + queued
    assert server.metric("bmc_serve_queue_depth", HELD) == 0
    assert server.request("GET", "/v2/health/live")[0] == 200
    assert rss_kib() - before < 200 * 1024


def _refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_answers_requests_in_flight_refuses_new_ones_and_exits_0(models, tmp_path):
    gate = Gate(tmp_path / "gate")
    server = Server(str(models["held"]), "--max-batch", "4", "--threads", "1", "--timeout-ms", "600000", gate=gate)
    try:
        gate.close()
        zero = np.zeros((1, ROW), np.float32)
        with ThreadPoolExecutor(6) as pool:
            try:
                futures = [pool.submit(server.infer, "held", zero) for _ in range(6)]
                # All six in flight: one batch held at the gate, the others queued behind it.
                _wait_until(lambda: _in_server(server) == 6, "6 requests in the server")
                server.process.send_signal(signal.SIGTERM)
                _wait_until(lambda: _refuses_connections(server.port), "new connections to be refused")
                assert not any(f.done() for f in futures)  # refused new work while these were still held
            finally:
                gate.open()
            statuses = [f.result()[0] for f in futures]
        assert statuses == [200] * 6
        assert server.process.wait(30) == 0
    finally:
        server.stop()


def test_tampered_model_refuses_to_start_and_names_the_file(models, workdir):
    tampered = workdir / "tampered.onnx"
    shutil.copy(models["digits"], tampered)
    write_sidecar_sha256(tampered)
    data = bytearray(tampered.read_bytes())
    data[-1] ^= 0xFF
    tampered.write_bytes(bytes(data))
    result = run_bmc("serve", str(tampered), "--port", str(_free_port()), cwd=workdir, timeout=60)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(tampered) in lines[0] and "sha256" in lines[0], result.stderr

    unsigned = workdir / "unsigned.onnx"
    shutil.copy(models["digits"], unsigned)
    result = run_bmc("serve", str(unsigned), "--port", str(_free_port()), cwd=workdir, timeout=60)
    assert result.returncode == 1 and "unsigned.onnx" in result.stderr and "no sidecar" in result.stderr
    result = run_bmc("serve", str(unsigned), "--sha256", "0" * 64, "--port", str(_free_port()), cwd=workdir, timeout=60)
    assert result.returncode == 1 and "does not match --sha256" in result.stderr


def test_serves_where_importing_torch_fails(models, tmp_path):
    for package in ("torch", "torchvision"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("raise ImportError('torch is not allowed here')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env={**os.environ, **env}, capture_output=True)
    assert probe.returncode != 0
    server = Server(str(models["digits"]), "--threads", "1", env=env)
    try:
        status, body, _ = server.infer("digits", np.ones((2, 1, 8, 8), np.float32))
        assert status == 200 and body["outputs"][0]["shape"] == [2, 10]
    finally:
        server.stop()


def test_batches_padded_to_buckets_give_each_request_its_own_rows():
    """The CUDA path's padding, run on the CPU: every run sees a bucket size, every request its rows."""
    import asyncio

    from bmc.serve_edge.batcher import DynamicBatcher
    from bmc.serve_edge.metrics import ServeMetrics

    seen_rows = []

    def run_batch(feed):
        x = feed["x"]
        seen_rows.append(len(x))
        return {"y": x * 2 + 1}

    async def scenario():
        batcher = DynamicBatcher(
            "m", run_batch, ServeMetrics(["m"]), max_batch=8, max_delay_ms=50, max_queue=64, can_merge=True, batch_buckets=(1, 2, 4, 8)
        )
        batcher.start()
        requests = [np.full((rows, 3), float(i), dtype=np.float32) for i, rows in enumerate([3, 2, 1, 3])]
        for _ in requests:
            batcher.arrival_started()
        pending = [asyncio.ensure_future(batcher.infer({"x": x}, len(x), timeout_s=10)) for x in requests]
        await asyncio.sleep(0)
        for _ in requests:
            batcher.arrival_finished()
        results = await asyncio.gather(*pending)
        await batcher.stop()
        return requests, results

    requests, results = asyncio.run(scenario())
    for x, out in zip(requests, results):
        np.testing.assert_array_equal(out["y"], x * 2 + 1)
    # 3 + 2 + 1 rows run padded to 8, the last 3 to 4
    assert seen_rows == [8, 4]


def test_each_bucket_runs_on_its_own_session_and_agrees_with_the_others(models):
    """The CUDA path's one-session-per-batch-size, run on the CPU: a session never sees a second shape."""
    from bmc.serve_edge.models import load_model, serving_buckets

    assert serving_buckets("cuda", True, 32) == (1, 4, 16, 32)
    assert serving_buckets("cpu", True, 32) == () and serving_buckets("cuda", False, 32) == ()
    # Large models keep fewer copies of their weights on the GPU: batch 1 and the largest, or the largest alone.
    assert serving_buckets("cuda", True, 32, model_bytes=400 << 20) == (1, 32)
    assert serving_buckets("cuda", True, 32, model_bytes=1600 << 20) == (32,)
    config = ServeConfig(models=(models["digits"],), threads=1, max_batch=4)
    verified = read_verified_model(models["digits"])
    model = load_model(verified, "digits", config, buckets=(1, 4))
    assert model.buckets == (1, 4) and len(model.sessions) == 2
    one, four = model.sessions
    assert one is not four and one.session is not four.session
    rng = np.random.default_rng(0)
    # The largest bucket's session also takes other shapes.
    for rows, expected_session in ((1, one), (4, four), (3, four), (9, four)):
        x = rng.standard_normal((rows, 1, 8, 8)).astype(np.float32)
        assert model.sessions[model.session_index({"input": x})] is expected_session
        np.testing.assert_allclose(model.run({"input": x})["output"], _reference(models["digits"], x), rtol=1e-5, atol=1e-5)
    unbucketed = load_model(verified, "digits", config)
    assert unbucketed.buckets == () and len(unbucketed.sessions) == 1


@pytest.mark.skipif(
    not cuda_works(), reason="needs a CUDA GPU that onnxruntime's CUDA provider really runs on (none on CI or the project machines)"
)
def test_on_cuda_every_bucket_gets_its_own_gpu_session(models):
    from bmc.serve_edge.models import load_model

    config = ServeConfig(models=(models["digits"],), threads=1, providers="cuda", max_batch=8)
    model = load_model(read_verified_model(models["digits"]), "digits", config)
    assert model.device == "cuda" and model.buckets == (1, 4, 8)
    sessions = model.sessions
    assert len({id(s.session) for s in sessions}) == 3 and all("CUDAExecutionProvider" in s.providers for s in sessions)
    x = np.random.default_rng(1).standard_normal((4, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(model.run({"input": x})["output"], _reference(models["digits"], x), rtol=1e-3, atol=1e-3)


def test_live_answers_while_models_load_and_ready_waits_for_them(models, tmp_path):
    # The gate starts closed: the warm-up run waits at it, so loading stays under way until the test opens it.
    gate = Gate(tmp_path / "gate", opened=False)
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "bmc", "serve", str(models["held"]), "--threads", "1", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, TEST_GATE_ENV: str(gate.path)})
    probe = Server.__new__(Server)
    probe.port, probe.process, probe.gate = port, process, gate

    def live() -> bool:
        try:
            return probe.request("GET", "/v2/health/live")[0] == 200
        except OSError:
            return False

    try:
        _wait_until(live, "live to answer")
        assert probe.request("GET", "/v2/health/ready")[0] == 503
        status, body, headers = probe.request("GET", "/v2/models/held")
        assert status == 503 and "still loading" in json.loads(body)["error"] and headers.get("retry-after") == "1"
        assert probe.request("GET", "/v2/models/other")[0] == 404
        assert probe.infer("held", np.zeros((1, ROW), np.float32))[0] == 503
        gate.open()
        _wait_until(lambda: probe.request("GET", "/v2/health/ready")[0] == 200, "ready once the warm-up ran")
        status, body, _ = probe.infer("held", np.zeros((1, ROW), np.float32))
        assert status == 200 and body["outputs"][0]["shape"] == [1, ROW]
    finally:
        probe.stop()


def test_a_model_onnxruntime_cannot_load_stops_the_server_with_one_line(workdir):
    graph = helper.make_graph(
        [helper.make_node("NoSuchOperator", ["input"], ["output"], domain="bmc.test")],
        "broken",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
    )
    broken = workdir / "broken.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("bmc.test", 1)], ir_version=8), broken)
    write_sidecar_sha256(broken)
    result = run_bmc("serve", str(broken), "--port", str(_free_port()), cwd=workdir, timeout=60)
    errors = [line for line in result.stderr.splitlines() if not line.startswith("info:") and line.strip()]
    assert result.returncode == 1 and len(errors) == 1 and str(broken) in errors[0] and "Traceback" not in result.stderr, result.stderr


def test_signed_models_are_served_and_unsigned_or_tampered_ones_refused(models, workdir):
    model = workdir / "signed.onnx"
    shutil.copy(models["digits"], model)
    write_sidecar_sha256(model)
    assert run_bmc("sign", "--new-key", str(workdir / "key"), cwd=workdir).returncode == 0
    assert (workdir / "key").stat().st_mode & 0o777 == 0o600
    # A new pair and a signature in one call; without any key, nothing is written.
    elsewhere = workdir / "elsewhere.onnx"
    shutil.copy(models["digits"], elsewhere)
    assert run_bmc("sign", str(elsewhere), cwd=workdir).returncode == 2 and not Path(f"{elsewhere}.sig").exists()
    other = run_bmc("sign", "--new-key", str(workdir / "other"), str(elsewhere), cwd=workdir)
    assert other.returncode == 0 and Path(f"{elsewhere}.sig").is_file()

    def serve_fails(public_key: str) -> str:
        result = run_bmc("serve", str(model), "--public-key", public_key, "--port", str(_free_port()), cwd=workdir, timeout=60)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        return lines[0]

    assert "no signature signed.onnx.sig" in serve_fails(str(workdir / "key.pub"))
    assert run_bmc("sign", str(model), "--key", str(workdir / "key"), cwd=workdir).returncode == 0
    server = Server(str(model), "--public-key", str(workdir / "key.pub"), "--threads", "1")
    try:
        assert server.infer("signed", np.zeros((1, 1, 8, 8), np.float32))[0] == 200
    finally:
        server.stop()
    assert "signed by another key" in serve_fails(str(workdir / "other.pub"))
    # Replaced together with its sidecar: the sha256 check passes, the signature does not.
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    write_sidecar_sha256(model)
    assert "does not match this file" in serve_fails(str(workdir / "key.pub"))
