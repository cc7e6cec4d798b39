"""bmc serve as NVIDIA's example clients use it: the scenarios of tritonclient's simple_http_infer_client,
simple_http_aio_infer_client, simple_http_health_metadata, simple_http_string_infer_client and
image_client, called through tritonclient's API against the real server on 127.0.0.1, with models
shaped like theirs ("simple", "simple_string", "simple_identity", an image classifier) built here.
"""

from __future__ import annotations

import asyncio
import gzip
import importlib.util
import io
import json
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bmc.artifact import write_sidecar_sha256
from bmc.runtime.metadata import ModelMetadata
from test_serve import Server

MAX_BODY_BYTES = 1 << 20
IMAGE_SIDE = 16
IMAGE_CLASSES = ("red", "green", "blue", "gray")
# Each class scores the mean of one channel; gray a little more than the mean of all three.
IMAGE_WEIGHTS = np.array([[1, 0, 0, 0.34], [0, 1, 0, 0.34], [0, 0, 1, 0.34]], dtype=np.float32)


def _save(graph, path: Path, props: dict[str, str] | None = None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if props:
        helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    write_sidecar_sha256(path)
    return path


def simple_model(path: Path) -> Path:
    """Triton's "simple": INPUT0, INPUT1 INT32 [-1, 16] -> OUTPUT0 = sum, OUTPUT1 = difference."""
    io_ = [helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", 16]) for n in ("INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1")]
    graph = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]), helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])],
        "simple", io_[:2], io_[2:],
    )
    return _save(graph, path)


def simple_string_model(path: Path) -> Path:
    """Its BYTES twin: the same sum and difference on decimal strings, as ONNX string tensors."""
    io_ = [helper.make_tensor_value_info(n, TensorProto.STRING, ["batch", 16]) for n in ("INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1")]
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["INPUT0"], ["a"], to=TensorProto.INT32),
            helper.make_node("Cast", ["INPUT1"], ["b"], to=TensorProto.INT32),
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Sub", ["a", "b"], ["difference"]),
            helper.make_node("Cast", ["sum"], ["OUTPUT0"], to=TensorProto.STRING),
            helper.make_node("Cast", ["difference"], ["OUTPUT1"], to=TensorProto.STRING),
        ],
        "simple_string", io_[:2], io_[2:],
    )
    return _save(graph, path)


def simple_identity_model(path: Path) -> Path:
    """Triton's "simple_identity": a BYTES [-1, 16] tensor back as it came."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "simple_identity",
        [helper.make_tensor_value_info("INPUT0", TensorProto.STRING, ["batch", 16])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.STRING, ["batch", 16])],
    )
    return _save(graph, path)


def image_model(path: Path) -> Path:
    """An image classifier with bmc metadata: FP32 [-1, 3, 16, 16] -> [-1, 4] scores, one class per colour."""
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "weights"], ["output"]),
        ],
        "colours",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, IMAGE_SIDE, IMAGE_SIDE])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", len(IMAGE_CLASSES)])],
        [numpy_helper.from_array(IMAGE_WEIGHTS, "weights")],
    )
    metadata = ModelMetadata(
        bmc_version="test", model="colours", class_names=IMAGE_CLASSES, input_layout="NCHW",
        input_shape=(3, IMAGE_SIDE, IMAGE_SIDE), data_input_shape=(3, IMAGE_SIDE, IMAGE_SIDE),
    )
    return _save(graph, path, metadata.to_props())


@pytest.fixture(scope="module")
def triton_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("triton_models")
    return {
        "simple": simple_model(root / "simple.onnx"),
        "simple_string": simple_string_model(root / "simple_string.onnx"),
        "simple_identity": simple_identity_model(root / "simple_identity.onnx"),
        "colours": image_model(root / "colours.onnx"),
    }


SERVER_FLAGS = ("--max-batch", "8", "--max-delay-ms", "3", "--threads", "1", "--max-body-bytes", str(MAX_BODY_BYTES))


@pytest.fixture(scope="module")
def server(triton_models):
    """The numeric models; the string ones have their own server, so each defect shows alone."""
    server = Server(str(triton_models["simple"]), str(triton_models["colours"]), *SERVER_FLAGS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def string_server(triton_models):
    server = Server(str(triton_models["simple_string"]), str(triton_models["simple_identity"]), *SERVER_FLAGS)
    yield server
    server.stop()


def _simple_inputs(module, input0: np.ndarray, input1: np.ndarray) -> list:
    """As the examples send them: INPUT0 as JSON data, INPUT1 as binary data."""
    inputs = [module.InferInput("INPUT0", list(input0.shape), "INT32"), module.InferInput("INPUT1", list(input1.shape), "INT32")]
    inputs[0].set_data_from_numpy(input0, binary_data=False)
    inputs[1].set_data_from_numpy(input1, binary_data=True)
    return inputs


def _simple_outputs(module) -> list:
    return [module.InferRequestedOutput("OUTPUT0", binary_data=True), module.InferRequestedOutput("OUTPUT1", binary_data=False)]


EXAMPLE_INPUT0 = np.arange(16, dtype=np.int32)[None, :]
EXAMPLE_INPUT1 = np.full((1, 16), -1, dtype=np.int32)


def _check_sum_and_difference(result, input0=EXAMPLE_INPUT0, input1=EXAMPLE_INPUT1) -> None:
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), input0 + input1)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), input0 - input1)


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_simple_infer_client_sync(server, compression):
    """simple_http_infer_client.py, with and without --request-compression-algorithm."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(server.url)
    try:
        kwargs = dict(query_params={"test_1": 1, "test_2": 2}, request_compression_algorithm=compression,
                      response_compression_algorithm=compression)
        result = client.infer("simple", _simple_inputs(httpclient, EXAMPLE_INPUT0, EXAMPLE_INPUT1), outputs=_simple_outputs(httpclient), **kwargs)
        _check_sum_and_difference(result)
        statistics = client.get_inference_statistics(model_name="simple")
        assert len(statistics["model_stats"]) == 1 and statistics["model_stats"][0]["name"] == "simple"
        result = client.infer("simple", _simple_inputs(httpclient, EXAMPLE_INPUT0, EXAMPLE_INPUT1), outputs=None, **kwargs)
        _check_sum_and_difference(result)
        with pytest.raises(InferenceServerException) as raised:
            client.infer("wrong_model_name", _simple_inputs(httpclient, EXAMPLE_INPUT0, EXAMPLE_INPUT1), outputs=_simple_outputs(httpclient))
        assert raised.value.message().startswith("Request for unknown model")
    finally:
        client.close()


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_simple_infer_client_aio(server, compression):
    """simple_http_aio_infer_client.py: the same through tritonclient.http.aio, two requests in parallel at the end."""
    import tritonclient.http.aio as aioclient
    from tritonclient.utils import InferenceServerException

    async def scenario():
        client = aioclient.InferenceServerClient(server.url)
        try:
            kwargs = dict(request_compression_algorithm=compression, response_compression_algorithm=compression)

            def infer(model="simple", outputs=True):
                return client.infer(model, _simple_inputs(aioclient, EXAMPLE_INPUT0, EXAMPLE_INPUT1),
                                    outputs=_simple_outputs(aioclient) if outputs else None, query_params={"test_1": 1}, **kwargs)

            _check_sum_and_difference(await infer())
            statistics = await client.get_inference_statistics(model_name="simple")
            assert len(statistics["model_stats"]) == 1
            _check_sum_and_difference(await infer(outputs=False))
            with pytest.raises(InferenceServerException) as raised:
                await infer("wrong_model_name")
            assert raised.value.message().startswith("Request for unknown model")
            for result in await asyncio.gather(infer(), infer(outputs=False)):
                _check_sum_and_difference(result)
        finally:
            await client.close()

    asyncio.run(scenario())


def test_health_and_metadata_client(server):
    """simple_http_health_metadata.py, except its check that the server calls itself "triton": bmc does not."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(server.url)
    try:
        assert client.is_server_live(query_params={"test_1": 1, "test_2": 2})
        assert client.is_server_ready() and client.is_model_ready("simple")
        metadata = client.get_server_metadata()
        assert metadata["name"] == "bmc"
        assert {"binary_tensor_data", "classification", "model_configuration", "statistics"} <= set(metadata["extensions"])
        assert client.get_model_metadata("simple", query_params={"test_1": 1})["name"] == "simple"
        with pytest.raises(InferenceServerException) as raised:
            client.get_model_metadata("wrong_model_name")
        assert "Request for unknown model" in raised.value.message() and "'wrong_model_name'" in raised.value.message()
    finally:
        client.close()


def test_unknown_models_get_tritons_wording_on_every_route(server):
    """tritonclient's examples look for the "Request for unknown model" prefix; the name and what is served follow."""
    infer = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": [0] * 16}]}).encode()
    for method, path, body in (("GET", "/v2/models/nope", None), ("POST", "/v2/models/nope/infer", infer),
                               ("GET", "/v2/models/nope/stats", None), ("GET", "/v2/models/nope/versions/1/config", None)):
        status, answer, _ = server.request(method, path, body)
        message = json.loads(answer)["error"]
        assert status == 404 and message.startswith("Request for unknown model 'nope' is not found"), (path, message)
        assert "serving simple, colours" in message


def _strings_inferred(client, httpclient, model: str, array: np.ndarray, binary: bool, outputs: tuple[str, ...]):
    tensor = httpclient.InferInput("INPUT0", list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array, binary_data=binary)
    requested = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in outputs]
    return client.infer(model, [tensor], outputs=requested)


def test_string_infer_client(string_server):
    """simple_http_string_infer_client.py: BYTES in binary and JSON form, NUL characters and raw 4-byte blobs."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(string_server.url)
    try:
        numbers0 = np.arange(16, dtype=np.int32)[None, :]
        numbers1 = np.ones((1, 16), dtype=np.int32)
        as_bytes = lambda a: np.array([str(x).encode() for x in a.ravel()], dtype=np.object_).reshape(a.shape)  # noqa: E731
        inputs = [httpclient.InferInput("INPUT0", [1, 16], "BYTES"), httpclient.InferInput("INPUT1", [1, 16], "BYTES")]
        inputs[0].set_data_from_numpy(as_bytes(numbers0), binary_data=True)
        inputs[1].set_data_from_numpy(as_bytes(numbers1), binary_data=False)
        outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=True), httpclient.InferRequestedOutput("OUTPUT1", binary_data=False)]
        result = client.infer("simple_string", inputs, outputs=outputs)
        assert result.get_output("OUTPUT0")["datatype"] == "BYTES"
        np.testing.assert_array_equal(np.vectorize(int)(result.as_numpy("OUTPUT0")), numbers0 + numbers1)
        np.testing.assert_array_equal(np.vectorize(int)(result.as_numpy("OUTPUT1")), numbers0 - numbers1)

        nul_strings = np.array(["he\x00llo".encode()] * 16, dtype=np.object_).reshape(1, 16)
        np.testing.assert_array_equal(_strings_inferred(client, httpclient, "simple_identity", nul_strings, True, ("OUTPUT0",)).as_numpy("OUTPUT0"), nul_strings)
        back = _strings_inferred(client, httpclient, "simple_identity", nul_strings, False, ("OUTPUT0",)).as_numpy("OUTPUT0")
        np.testing.assert_array_equal(np.array([str(x).encode() for x in back.ravel()], dtype=np.object_).reshape(1, 16), nul_strings)

        blobs = np.array([b"\x00\x01\x02\x03"] * 16, dtype=np.bytes_).reshape(1, 16)
        for binary in (True, False):
            back = _strings_inferred(client, httpclient, "simple_identity", blobs, binary, ("OUTPUT0",)).as_numpy("OUTPUT0")
            np.testing.assert_array_equal(np.char.encode(back.astype(str)) if not binary else back.astype(np.bytes_), blobs)
    finally:
        client.close()


def _binary_body(tensors: list[tuple[str, list[int], str, bytes]], outputs: list[dict] | None = None) -> tuple[bytes, dict]:
    header = {"inputs": [{"name": n, "shape": s, "datatype": t, "parameters": {"binary_data_size": len(raw)}} for n, s, t, raw in tensors]}
    if outputs is not None:
        header["outputs"] = outputs
    json_part = json.dumps(header).encode()
    body = json_part + b"".join(raw for *_, raw in tensors)
    return body, {"Inference-Header-Content-Length": str(len(json_part)), "Content-Type": "application/octet-stream"}


def _length_prefixed(items: list[bytes]) -> bytes:
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


STRING_FAULTS = [
    ("not UTF-8", _length_prefixed([b"\xff\xfe"] * 16), "element 0 is not UTF-8"),
    ("too few elements", _length_prefixed([b"1"] * 15), "ends before element 15's 4-byte length"),
    ("shorter than the lengths alone", _length_prefixed([b""] * 3), "needs at least 64 bytes"),
    ("length past the end", _length_prefixed([b"1"] * 15) + (50).to_bytes(4, "little") + b"1", "element 15 is 50 bytes"),
    ("bytes after the last", _length_prefixed([b"1"] * 16) + b"zz", "2 bytes follow the last of its 16 elements"),
]


@pytest.mark.parametrize("label,raw,fragment", STRING_FAULTS, ids=[f[0] for f in STRING_FAULTS])
def test_malformed_binary_strings_get_400(string_server, label, raw, fragment):
    body, headers = _binary_body([("INPUT0", [1, 16], "BYTES", raw)])
    status, answer, _ = string_server.request("POST", "/v2/models/simple_identity/infer", body, headers)
    assert status == 400 and fragment in json.loads(answer)["error"]


def test_json_strings_must_be_strings_and_round_trip_exactly(string_server):
    def infer(data):
        body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "BYTES", "data": data}]}).encode()
        status, answer, _ = string_server.request("POST", "/v2/models/simple_identity/infer", body, {"Content-Type": "application/json"})
        return status, json.loads(answer)

    status, answer = infer([1] * 16)
    assert status == 400 and "must hold strings only" in answer["error"]
    status, answer = infer([["a"] * 8, ["b"] * 7])
    assert status == 400
    # A trailing NUL and non-ASCII text survive (a numpy unicode array would drop the NUL).
    texts = [f"x{i}\x00" if i % 2 else f"é{i}" for i in range(16)]
    status, answer = infer([texts[:8], texts[8:]])
    assert status == 200 and answer["outputs"][0] == {"name": "OUTPUT0", "datatype": "BYTES", "shape": [1, 16], "data": texts}


def test_a_string_model_is_served_beside_numeric_ones(triton_models):
    """A BYTES model used to stop the whole server a second after it listened; now every model serves."""
    import tritonclient.http as httpclient

    server = Server(str(triton_models["simple"]), str(triton_models["simple_string"]), "--threads", "1")
    try:
        client = httpclient.InferenceServerClient(server.url)
        assert client.is_model_ready("simple") and client.is_model_ready("simple_string")
        _check_sum_and_difference(client.infer("simple", _simple_inputs(httpclient, EXAMPLE_INPUT0, EXAMPLE_INPUT1)))
        assert client.get_model_metadata("simple_string")["inputs"][0]["datatype"] == "BYTES"
        client.close()
    finally:
        server.stop()
    assert server.process.returncode == 0


def _model_config_proto():
    """tritonclient's own ModelConfig protobuf, loaded from its file (its grpc package needs grpcio to import)."""
    import tritonclient

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_configuration_is_tritons_model_config(server):
    """GET .../config parses as Triton's ModelConfig (no unknown field); image inputs say FORMAT_NCHW."""
    import tritonclient.http as httpclient
    from google.protobuf import json_format

    pb2 = _model_config_proto()
    client = httpclient.InferenceServerClient(server.url)
    try:
        config = client.get_model_config("colours")
        parsed = json_format.ParseDict(config, pb2.ModelConfig())
        assert parsed.max_batch_size == 8 and parsed.dynamic_batching.max_queue_delay_microseconds == 3000
        assert parsed.input[0].format == pb2.ModelInput.FORMAT_NCHW and list(parsed.input[0].dims) == [3, IMAGE_SIDE, IMAGE_SIDE]
        assert parsed.input[0].data_type == pb2.TYPE_FP32 and list(parsed.output[0].dims) == [len(IMAGE_CLASSES)]

        simple = json_format.ParseDict(client.get_model_config("simple", model_version="1"), pb2.ModelConfig())
        assert simple.input[0].format == pb2.ModelInput.FORMAT_NONE and simple.input[0].data_type == pb2.TYPE_INT32
        assert [i.name for i in simple.input] == ["INPUT0", "INPUT1"] and list(simple.output[1].dims) == [16]
    finally:
        client.close()


def _image(colour: tuple[int, int, int], side: int = 40) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_client_input(png: bytes, config: dict, metadata: dict) -> np.ndarray:
    """What image_client.py does to an image: read C, H, W and the format from the config, resize, no scaling."""
    from PIL import Image

    assert config["input"][0]["format"] == "FORMAT_NCHW"
    batching = config["max_batch_size"] > 0
    c, h, w = metadata["inputs"][0]["shape"][1:] if batching else metadata["inputs"][0]["shape"]
    image = Image.open(io.BytesIO(png)).convert("RGB" if c == 3 else "L").resize((w, h), Image.BILINEAR)
    return np.asarray(image).astype(np.float32).transpose(2, 0, 1)


def test_image_client_classification(server):
    """image_client.py: metadata and config, then a batch with class_count (binary BYTES "score:index:label")."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.url, concurrency=4)
    try:
        metadata, config = client.get_model_metadata("colours"), client.get_model_config("colours")
        input_name, output_name = metadata["inputs"][0]["name"], metadata["outputs"][0]["name"]
        batch = np.stack([_image_client_input(_image(colour), config, metadata) for colour in ((250, 10, 10), (20, 30, 200), (120, 120, 120))])
        expected_scores = batch.mean(axis=(2, 3)) @ IMAGE_WEIGHTS

        def request(binary: bool):
            tensor = httpclient.InferInput(input_name, list(batch.shape), metadata["inputs"][0]["datatype"])
            tensor.set_data_from_numpy(batch)
            return {"inputs": [tensor], "outputs": [httpclient.InferRequestedOutput(output_name, binary_data=binary, class_count=2)]}

        results = [client.infer("colours", **request(True), request_id="1"),
                   client.async_infer("colours", **request(True), request_id="2").get_result(),
                   client.infer("colours", **request(False), request_id="3")]
        for result in results:
            classes = result.as_numpy(output_name)
            assert classes.shape == (3, 2) and result.get_output(output_name)["datatype"] == "BYTES"
            for row, scores in zip(classes, expected_scores):
                fields = [(item.decode() if isinstance(item, bytes) else item).split(":") for item in row]
                best = np.argsort(-scores, kind="stable")[:2]
                assert [int(f[1]) for f in fields] == list(best)
                assert [f[2] for f in fields] == [IMAGE_CLASSES[i] for i in best]
                np.testing.assert_allclose([float(f[0]) for f in fields], scores[best], rtol=1e-5)
        assert [r.get_response()["id"] for r in results] == ["1", "2", "3"]
        assert [row[0].decode().split(":")[2] for row in results[0].as_numpy(output_name)] == ["red", "blue", "gray"]
    finally:
        client.close()


def test_classification_edges(server):
    def infer(outputs):
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, IMAGE_SIDE, IMAGE_SIDE], "datatype": "FP32",
                                       "data": [1.0] * (3 * IMAGE_SIDE * IMAGE_SIDE)}], "outputs": outputs}).encode()
        status, answer, _ = server.request("POST", "/v2/models/colours/infer", body, {"Content-Type": "application/json"})
        return status, json.loads(answer)

    # More classes than the output has: all of them (Triton caps the count the same way). A gray image:
    # gray first, then red, green and blue, equal, in index order.
    status, answer = infer([{"name": "output", "parameters": {"classification": 10}}])
    assert status == 200 and answer["outputs"][0]["shape"] == [1, 4]
    assert answer["outputs"][0]["data"] == ["1.020000:3:gray", "1.000000:0:red", "1.000000:1:green", "1.000000:2:blue"]
    status, answer = infer([{"name": "output", "parameters": {"classification": "3"}}])
    assert status == 400 and "'classification' must be a non-negative integer" in answer["error"]
    status, answer = infer([{"name": "output", "parameters": {"classification": 0}}])
    assert status == 200 and answer["outputs"][0]["datatype"] == "FP32"


def test_string_models_configuration_and_no_classification_of_strings(string_server):
    import tritonclient.http as httpclient
    from google.protobuf import json_format

    pb2 = _model_config_proto()
    client = httpclient.InferenceServerClient(string_server.url)
    try:
        strings = json_format.ParseDict(client.get_model_config("simple_string"), pb2.ModelConfig())
        assert strings.input[0].data_type == pb2.TYPE_STRING and strings.output[0].data_type == pb2.TYPE_STRING
    finally:
        client.close()
    body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "BYTES", "data": ["1"] * 16}],
                       "outputs": [{"name": "OUTPUT0", "parameters": {"classification": 2}}]}).encode()
    status, answer, _ = string_server.request("POST", "/v2/models/simple_identity/infer", body, {"Content-Type": "application/json"})
    assert status == 400 and "unsupported type 'BYTES'" in json.loads(answer)["error"]


def _stats(server, path: str) -> dict:
    status, body, _ = server.request("GET", path)
    assert status == 200, body
    return json.loads(body)


def test_statistics_count_requests_rows_and_batches(server):
    """The statistics extension: successes, failures, rows, runs and time, per model, in every URL form."""
    import tritonclient.http as httpclient

    before = _stats(server, "/v2/models/simple/stats")["model_stats"][0]
    client = httpclient.InferenceServerClient(server.url)
    rows = (1, 3, 2)
    try:
        for count in rows:  # one after another: each request runs as its own batch
            x = np.arange(16 * count, dtype=np.int32).reshape(count, 16)
            _check_sum_and_difference(client.infer("simple", _simple_inputs(httpclient, x, x)), x, x)
    finally:
        client.close()
    bad = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": [0] * 16}]}).encode()
    assert server.request("POST", "/v2/models/simple/infer", bad)[0] == 400  # INPUT1 missing: a failure
    after = _stats(server, "/v2/models/simple/versions/1/stats")["model_stats"][0]

    def delta(*keys):
        a, b = after, before
        for key in keys:
            a, b = a[key], b[key]
        return a - b

    assert after["name"] == "simple" and after["version"] == "1"
    assert delta("inference_count") == sum(rows) and delta("execution_count") == len(rows)
    assert delta("inference_stats", "success", "count") == len(rows) and delta("inference_stats", "fail", "count") == 1
    for stat in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert delta("inference_stats", stat, "count") == len(rows)
    assert delta("inference_stats", "success", "ns") > 0 and delta("inference_stats", "compute_infer", "ns") > 0
    assert delta("inference_stats", "fail", "ns") > 0 and after["last_inference"] >= before["last_inference"] > 0
    runs = {entry["batch_size"]: entry["compute_infer"]["count"] for entry in after["batch_stats"]}
    runs_before = {entry["batch_size"]: entry["compute_infer"]["count"] for entry in before["batch_stats"]}
    assert {size: runs.get(size, 0) - runs_before.get(size, 0) for size in rows} == {1: 1, 3: 1, 2: 1}

    every = _stats(server, "/v2/models/stats")["model_stats"]
    assert [entry["name"] for entry in every] == ["simple", "colours"]
    assert server.request("GET", "/v2/models/nope/stats")[0] == 404
    assert server.request("POST", "/v2/models/simple/stats")[0] == 405


def test_concurrent_requests_batch_and_the_statistics_say_so(server):
    """Requests that arrive together run together: execution_count grows by less than the request count."""
    import tritonclient.http as httpclient

    before = _stats(server, "/v2/models/simple/stats")["model_stats"][0]
    client = httpclient.InferenceServerClient(server.url, concurrency=16)
    try:
        pending = [client.async_infer("simple", _simple_inputs(httpclient, EXAMPLE_INPUT0, EXAMPLE_INPUT1)) for _ in range(48)]
        for request in pending:
            _check_sum_and_difference(request.get_result())
    finally:
        client.close()
    after = _stats(server, "/v2/models/simple/stats")["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == 48
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 48
    executions = after["execution_count"] - before["execution_count"]
    assert 1 <= executions <= 48
    sizes = {entry["batch_size"]: entry["compute_infer"]["count"] for entry in after["batch_stats"]}
    sizes_before = {entry["batch_size"]: entry["compute_infer"]["count"] for entry in before["batch_stats"]}
    assert sum((sizes[s] - sizes_before.get(s, 0)) * s for s in sizes) >= 48  # every row ran in some batch


def _raw_infer(server, body: bytes, encoding: str) -> tuple[int, dict]:
    status, answer, _ = server.request("POST", "/v2/models/simple/infer", body, {"Content-Encoding": encoding, "Content-Type": "application/json"})
    return status, json.loads(answer)


def _simple_json_body() -> bytes:
    return json.dumps({"inputs": [{"name": n, "shape": [1, 16], "datatype": "INT32", "data": list(range(16))} for n in ("INPUT0", "INPUT1")]}).encode()


def test_compressed_bodies_inflate_under_the_body_limit(server):
    body = _simple_json_body()
    for encoding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body)), ("identity", body)):
        status, answer = _raw_infer(server, packed, encoding)
        assert status == 200 and answer["outputs"][0]["data"] == [2 * i for i in range(16)], encoding
    # A zip bomb: 48 KiB that would inflate to 48 MiB is refused once it passes the 1 MiB limit.
    bomb = gzip.compress(b" " * (48 << 20), compresslevel=9)
    assert len(bomb) < MAX_BODY_BYTES
    status, answer = _raw_infer(server, bomb, "gzip")
    assert status == 413 and "inflates past 1048576 bytes" in answer["error"]
    # The limit is on the inflated size, not the size sent: JSON whitespace up to just under it is served, past it not.
    under = body + b" " * (MAX_BODY_BYTES - len(body) - 1)
    over = body + b" " * MAX_BODY_BYTES
    assert _raw_infer(server, gzip.compress(under), "gzip")[0] == 200
    assert _raw_infer(server, gzip.compress(over), "gzip")[0] == 413
    status, answer = _raw_infer(server, gzip.compress(body)[:-6], "gzip")
    assert status == 400 and "ends before its compressed stream" in answer["error"]
    status, answer = _raw_infer(server, b"not gzip at all", "gzip")
    assert status == 400 and "not valid gzip data" in answer["error"]
    status, answer = _raw_infer(server, body, "br")
    assert status == 415 and "'br' is not supported" in answer["error"]
    assert server.request("GET", "/v2/health/ready")[0] == 200


def _pbtxt(path: Path):
    from google.protobuf import text_format

    pb2 = _model_config_proto()
    return pb2, text_format.Parse(path.read_text(), pb2.ModelConfig())


def test_export_triton_writes_the_input_format_labels_and_full_dims_without_batching(tmp_path):
    from bmc.export import ExportConfig, export

    result = export(ExportConfig(model="seed-mlp", input_size=8, input_channels=1, num_classes=10, format="triton", out=tmp_path / "repo" / "digits"))
    model_dir = result.path.parent.parent
    pb2, config = _pbtxt(model_dir / "config.pbtxt")
    assert config.name == "digits" and config.max_batch_size == 64 and config.dynamic_batching.max_queue_delay_microseconds == 1000
    assert config.input[0].format == pb2.ModelInput.FORMAT_NCHW and list(config.input[0].dims) == [1, 8, 8]
    assert list(config.output[0].dims) == [10] and config.output[0].label_filename == "labels.txt"
    assert (model_dir / "labels.txt").read_text().splitlines() == [f"class_{i}" for i in range(10)]

    # Without a batch axis Triton wants max_batch_size 0 and the full shape, batch of 1 included.
    result = export(ExportConfig(model="seed-mlp", input_size=8, input_channels=1, num_classes=10, format="triton",
                                 dynamic_batch=False, out=tmp_path / "repo" / "fixed"))
    _, config = _pbtxt(result.path.parent.parent / "config.pbtxt")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [1, 1, 8, 8] and list(config.output[0].dims) == [1, 10]
