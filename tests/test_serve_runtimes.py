"""`bmc serve` on the runtime each model's metadata names (onnxruntime, OpenVINO), per batch size, or
on the one --runtime names: the real server in a subprocess on 127.0.0.1, real HTTP, real runtimes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bmc.artifact import write_sidecar_sha256
from bmc.runtime import openvino_sessions
from bmc.runtime.metadata import ModelMetadata
from bmc.runtime.model_file import ModelBytes
from bmc.runtime.registry import available_runtimes, get_runtime
from bmc.runtime.sessions import UnsupportedModelError
from bmc.runtime.target import Target
from bmc.sealed import load_key, new_key, seal_files
from bmc.serve_edge import ServeConfig
from bmc.serve_edge import targets as serve_targets
from bmc.serve_edge.integrity import read_verified_model
from bmc.serve_edge.targets import ServingTargetError, plan_serving
from conftest import assert_one_line_error, run_bmc
from test_serve import Server, _free_port

HAS_OPENVINO = "openvino" in available_runtimes()
needs_openvino = pytest.mark.skipif(
    not HAS_OPENVINO, reason="needs the openvino package (pip install 'bmc[openvino]'), which is not installed or not working here"
)
OPENVINO = Target("openvino")
ONNXRUNTIME = Target("onnxruntime")


def _cnn(path: Path, runtime_targets: dict[int, Target] | None = None) -> Path:
    """A small random-weight CNN ([batch, 3, 8, 8] -> [batch, 10]) whose metadata names these targets, with its sidecar."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "conv_w"),
        numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "conv_b"),
        numpy_helper.from_array((rng.standard_normal((10, 8)) * 0.5).astype(np.float32), "fc_w"),
        numpy_helper.from_array((rng.standard_normal(10) * 0.1).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["output"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    metadata = ModelMetadata(model="test-cnn", input_shape=(3, 8, 8), runtime_targets=runtime_targets or {})
    for key, value in metadata.to_props().items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    write_sidecar_sha256(path)
    return path


def _scaler(path: Path, runtime_targets: dict[int, Target]) -> Path:
    """y = 2x with ai.onnx.ml's Scaler: onnxruntime runs it, OpenVINO's ONNX frontend cannot convert it."""
    node = helper.make_node("Scaler", ["input"], ["output"], domain="ai.onnx.ml", offset=[0.0] * 4, scale=[2.0] * 4)
    graph = helper.make_graph(
        [node], "scaler",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)], ir_version=8)
    for key, value in ModelMetadata(model="scaler", runtime_targets=runtime_targets).to_props().items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    write_sidecar_sha256(path)
    return path


@pytest.fixture(scope="module")
def cnns(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("serve_runtimes")
    return {
        "plain": _cnn(folder / "plain.onnx"),
        "ov": _cnn(folder / "ov.onnx", {1: OPENVINO}),
        "mixed": _cnn(folder / "mixed.onnx", {1: ONNXRUNTIME, 32: OPENVINO}),
    }


@pytest.fixture(scope="module")
def server(cnns):
    if not HAS_OPENVINO:
        pytest.skip("needs the openvino package (pip install 'bmc[openvino]'), which is not installed or not working here")
    served = Server(str(cnns["plain"]), str(cnns["ov"]), str(cnns["mixed"]), "--max-batch", "32", "--threads", "1")
    yield served
    served.stop()
    assert served.process.returncode == 0  # drained and exited cleanly with both runtimes loaded


def _infer(server: Server, model: str, array: np.ndarray) -> np.ndarray:
    """Outputs of one binary-tensor request (what tritonclient sends with binary_data=True)."""
    header = json.dumps({
        "inputs": [{"name": "input", "shape": list(array.shape), "datatype": "FP32", "parameters": {"binary_data_size": array.nbytes}}],
        "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
    }).encode()
    status, body, headers = server.request(
        "POST", f"/v2/models/{model}/infer", header + array.tobytes(),
        {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 200, body
    json_bytes = int({k.lower(): v for k, v in headers.items()}["inference-header-content-length"])
    shape = json.loads(body[:json_bytes])["outputs"][0]["shape"]
    return np.frombuffer(body[json_bytes:], dtype="<f4").reshape(shape)


def _executions(server: Server, model: str) -> dict[str, float]:
    """bmc_serve_executions_total of one model, by runtime."""
    text = server.request("GET", "/metrics")[1].decode()
    found = re.findall(rf'^bmc_serve_executions_total{{model="{model}",runtime="(\w+)",target="[^"]*"}} (\S+)$', text, re.MULTILINE)
    counts: dict[str, float] = {}
    for runtime, value in found:
        counts[runtime] = counts.get(runtime, 0.0) + float(value)
    return counts


def _config(server: Server, model: str) -> dict:
    status, body, _ = server.request("GET", f"/v2/models/{model}/config")
    assert status == 200, body
    return json.loads(body)


def _batch_sizes_run(server: Server, model: str) -> dict[int, int]:
    stats = json.loads(server.request("GET", f"/v2/models/{model}/stats")[1])["model_stats"][0]
    return {entry["batch_size"]: entry["compute_infer"]["count"] for entry in stats["batch_stats"]}


# --- the same model on both runtimes ---------------------------------------------------------------


@needs_openvino
def test_openvino_and_onnxruntime_give_the_same_answers(server, cnns):
    x = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)
    on_onnxruntime, on_openvino = _infer(server, "plain", x), _infer(server, "ov", x)
    reference = ort.InferenceSession(str(cnns["plain"]), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(on_onnxruntime, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(on_openvino, on_onnxruntime, rtol=1e-4, atol=1e-5)
    assert (on_openvino.argmax(1) == on_onnxruntime.argmax(1)).all()
    assert _executions(server, "plain") == {"onnxruntime": 1.0} and _executions(server, "ov") == {"openvino": 1.0}
    # What each model says it runs on: Triton's platform names, in the metadata and the configuration.
    for name, platform in (("plain", "onnxruntime_onnx"), ("ov", "openvino")):
        assert json.loads(server.request("GET", f"/v2/models/{name}")[1])["platform"] == platform
        assert _config(server, name)["platform"] == platform
    # The statistics extension times OpenVINO's runs as it does onnxruntime's.
    stats = json.loads(server.request("GET", "/v2/models/ov/stats")[1])["model_stats"][0]
    assert stats["execution_count"] == 1 and stats["inference_stats"]["compute_infer"]["ns"] > 0


@needs_openvino
def test_each_batch_size_runs_on_the_runtime_its_metadata_chose(server):
    config = _config(server, "mixed")
    assert json.loads(config["parameters"]["bmc_runtime_targets"]["string_value"]) == {
        "1-5": "onnxruntime 1 thread", "6+": "openvino 1 thread",
    }
    assert config["platform"] == "openvino"  # the runtime of the largest batches, which carry the load
    assert _executions(server, "mixed") == {"onnxruntime": 0.0, "openvino": 0.0}  # warm-ups are not counted
    x = np.random.default_rng(2).standard_normal((32, 3, 8, 8)).astype(np.float32)
    # One client, one request at a time: each request is a batch of its own rows.
    alone = _infer(server, "mixed", x[:1])
    assert _executions(server, "mixed") == {"onnxruntime": 1.0, "openvino": 0.0}
    together = _infer(server, "mixed", x)
    assert _executions(server, "mixed") == {"onnxruntime": 1.0, "openvino": 1.0}
    _infer(server, "mixed", x[:5])
    _infer(server, "mixed", x[:6])
    assert _executions(server, "mixed") == {"onnxruntime": 2.0, "openvino": 2.0}
    assert _batch_sizes_run(server, "mixed") == {1: 1, 5: 1, 6: 1, 32: 1}
    np.testing.assert_allclose(together[:1], alone, rtol=1e-4, atol=1e-5)


@needs_openvino
def test_runtime_flag_puts_every_batch_on_one_runtime(cnns):
    served = Server(str(cnns["mixed"]), "--runtime", "onnxruntime", "--max-batch", "32", "--threads", "1")
    try:
        x = np.random.default_rng(3).standard_normal((32, 3, 8, 8)).astype(np.float32)
        _infer(served, "mixed", x[:1])
        _infer(served, "mixed", x)
        assert _executions(served, "mixed") == {"onnxruntime": 2.0}
        config = _config(served, "mixed")
        assert config["platform"] == "onnxruntime_onnx" and config["backend"] == "onnxruntime"
        assert json.loads(config["parameters"]["bmc_runtime_targets"]["string_value"]) == {"1+": "onnxruntime 1 thread"}
    finally:
        served.stop()
    assert served.process.returncode == 0


# --- fallbacks and refusals -----------------------------------------------------------------------


def _block_openvino(tmp_path: Path) -> dict:
    """An environment where `import openvino` fails as it does where the package is not installed."""
    blocked = tmp_path / "blocked" / "openvino"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'openvino'\", name='openvino')\n")
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path / "blocked"), os.environ.get("PYTHONPATH", "")])}


def test_without_openvino_a_model_that_chose_it_serves_on_onnxruntime_with_a_warning(cnns, tmp_path):
    env = _block_openvino(tmp_path)
    served = Server(str(cnns["mixed"]), "--max-batch", "32", "--threads", "1", env=env)
    try:
        x = np.random.default_rng(4).standard_normal((32, 3, 8, 8)).astype(np.float32)
        _infer(served, "mixed", x)
        assert _executions(served, "mixed") == {"onnxruntime": 1.0}
        assert _config(served, "mixed")["platform"] == "onnxruntime_onnx"
    finally:
        served.stop()
    assert served.process.returncode == 0
    warnings = [line for line in served.process.stderr.read().splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, warnings
    assert "openvino for batch 32" in warnings[0] and "not installed here (pip install 'bmc[openvino]')" in warnings[0]
    assert warnings[0].endswith("on onnxruntime 1 thread")

    # Asked for by name, it is an error: one line naming the runtime and how to install it, before any model is read.
    result = run_bmc("serve", str(cnns["plain"]), "--runtime", "openvino", "--port", str(_free_port()), cwd=tmp_path, env=env, timeout=60)
    assert result.returncode == 1
    assert_one_line_error(result, "runtime 'openvino' is not installed here", "pip install 'bmc[openvino]'")


@pytest.mark.parametrize("args, fragments", [
    (("--runtime", "tensorrt"), ("unknown runtime 'tensorrt'", "onnxruntime, openvino")),
    (("--precision", "bf16"), ("--precision goes with --runtime",)),
    (("--runtime", "onnxruntime", "--precision", "bf16"), ("takes no precision 'bf16'",)),
    (("--runtime", "openvino", "--providers", "cuda"), ("--runtime openvino serves on the CPU",)),
], ids=["unknown runtime", "precision alone", "precision the runtime lacks", "openvino on cuda"])
def test_bad_runtime_flags_are_one_line_and_exit_2(cnns, tmp_path, args, fragments):
    result = run_bmc("serve", str(cnns["plain"]), *args, "--port", str(_free_port()), cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result, *fragments)


@needs_openvino
def test_a_model_openvino_cannot_open_falls_back_when_chosen_and_fails_when_asked_for(tmp_path):
    model = _scaler(tmp_path / "scaler.onnx", {1: OPENVINO})
    served = Server(str(model), "--threads", "1")
    try:
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode()
        status, answer, _ = served.request("POST", "/v2/models/scaler/infer", body, {"Content-Type": "application/json"})
        assert status == 200 and json.loads(answer)["outputs"][0]["data"] == [2, 4, 6, 8]
        assert _executions(served, "scaler") == {"onnxruntime": 1.0}
    finally:
        served.stop()
    warnings = [line for line in served.process.stderr.read().splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "openvino cannot open it" in warnings[0] and "Scaler" in warnings[0], warnings

    result = run_bmc("serve", str(model), "--runtime", "openvino", "--port", str(_free_port()), cwd=tmp_path, timeout=60)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(model) in errors[0] and "openvino" in errors[0] and "Scaler" in errors[0]


def _zipmap(path: Path) -> Path:
    """A classifier with a sklearn-style ZipMap output: a sequence of maps, which the protocol cannot carry."""
    graph = helper.make_graph(
        [helper.make_node("ZipMap", ["input"], ["probabilities"], domain="ai.onnx.ml", classlabels_int64s=[0, 1])],
        "zipmap",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_value_info("probabilities", helper.make_sequence_type_proto(
            helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)], ir_version=8)
    onnx.save(model, path)
    write_sidecar_sha256(path)
    return path


def _bfloat16_input(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input"], ["output"], to=TensorProto.FLOAT)],
        "bf16",
        [helper.make_tensor_value_info("input", TensorProto.BFLOAT16, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    write_sidecar_sha256(path)
    return path


@pytest.mark.parametrize("make, fragment", [
    (_zipmap, "output 'probabilities' is sequence"),
    (_bfloat16_input, "input 'input' is bfloat16"),
], ids=["zipmap output", "bfloat16 input"])
def test_a_model_bmc_cannot_serve_stops_it_before_it_listens(cnns, tmp_path, make, fragment):
    bad = make(tmp_path / "bad.onnx")
    assert ort.InferenceSession(str(bad), providers=["CPUExecutionProvider"])  # onnxruntime would load it
    result = run_bmc("serve", str(cnns["plain"]), str(bad), "--port", str(_free_port()), cwd=tmp_path, timeout=60)
    assert result.returncode == 1
    line = assert_one_line_error(result, str(bad), fragment, "tensors of numbers or strings only")
    assert "listening" not in result.stderr, line


# --- what serve writes and imports ----------------------------------------------------------------


@needs_openvino
def test_an_encrypted_model_on_both_runtimes_leaves_nothing_in_tmpdir_or_home(cnns, tmp_path):
    key_path = new_key(tmp_path / "model.key")
    sealed = tmp_path / "sealed" / "mixed.onnx"
    sealed.parent.mkdir()
    digest = seal_files(sealed, [("model.onnx", cnns["mixed"])], load_key(key_path))
    scratch, home = tmp_path / "tmp", tmp_path / "home"
    scratch.mkdir()
    home.mkdir()
    served = Server(
        str(sealed), "--sha256", digest, "--decrypt-key-file", str(key_path), "--max-batch", "32", "--threads", "1",
        env={"TMPDIR": str(scratch), "HOME": str(home)},
    )
    try:
        x = np.random.default_rng(5).standard_normal((32, 3, 8, 8)).astype(np.float32)
        _infer(served, "mixed", x[:1])
        _infer(served, "mixed", x)
        assert _executions(served, "mixed") == {"onnxruntime": 1.0, "openvino": 1.0}
    finally:
        served.stop()
    # Not onnxruntime's telemetry (.ses, ~/.cache/Microsoft), not OpenVINO, not a decrypted copy.
    assert list(scratch.rglob("*")) == [] and list(home.rglob("*")) == []


@needs_openvino
def test_openvino_never_reads_a_decrypted_model_from_a_file(tmp_path, monkeypatch):
    """A model past protobuf's 2 GiB reaches OpenVINO only through a file: for one decrypted in memory,
    serve refuses OpenVINO (named by --runtime) or keeps it on onnxruntime (named by its metadata).
    The 2 GiB limit is lowered here so that a 1 KB model stands for a 2 GiB one."""
    key = load_key(new_key(tmp_path / "model.key"))
    plain = _cnn(tmp_path / "plain.onnx", {1: OPENVINO, 32: OPENVINO})
    sealed = tmp_path / "sealed.onnx"
    digest = seal_files(sealed, [("model.onnx", plain)], key)
    monkeypatch.setattr(openvino_sessions, "PROTOBUF_LIMIT_BYTES", 1000)
    verified = read_verified_model(sealed, digest, decrypt_key=key)
    assert verified.encrypted and openvino_sessions.needs_file_copy(verified.held)

    plan = plan_serving("sealed", verified, ServeConfig(models=(sealed,), threads=1))
    assert plan.targets == (Target("onnxruntime", threads=1),)
    assert len(plan.notes) == 1 and "never touches the disk" in plan.notes[0] and "openvino for batch 1, 32" in plan.notes[0]
    with pytest.raises(ServingTargetError, match="--runtime openvino cannot serve it: .*never touches the disk"):
        plan_serving("sealed", verified, ServeConfig(models=(sealed,), runtime="openvino"))
    # The plaintext model of the same size is served on OpenVINO as its metadata says.
    plain_plan = plan_serving("plain", read_verified_model(plain), ServeConfig(models=(plain,), threads=1))
    assert plain_plan.targets == (Target("openvino", threads=1),)

    # And the runtime itself refuses to write it, whoever asks; a plaintext model it copies to a private folder.
    with pytest.raises(UnsupportedModelError, match="must not touch the disk"):
        get_runtime("openvino").open(verified.held, Target("openvino"), memory_only=True)
    held = ModelBytes(plain, plain.read_bytes(), {})
    assert get_runtime("openvino").open(held, Target("openvino")).run({"input": np.zeros((1, 3, 8, 8), np.float32)})["output"].shape == (1, 10)


def test_serve_never_imports_torch_on_either_runtime(cnns, tmp_path):
    marker = tmp_path / "torch-was-imported"
    for package in ("torch", "torchvision"):
        (tmp_path / "blocked" / package).mkdir(parents=True)
        # A marker file as well as the ImportError: an import inside a try/except would still leave it.
        (tmp_path / "blocked" / package / "__init__.py").write_text(
            f"open({str(marker)!r}, 'a').write({package!r})\nraise ImportError('{package} is not allowed here')\n"
        )
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "blocked"), os.environ.get("PYTHONPATH", "")])}
    served = Server(str(cnns["mixed"]), "--max-batch", "32", "--threads", "1", env=env)
    try:
        x = np.random.default_rng(6).standard_normal((32, 3, 8, 8)).astype(np.float32)
        _infer(served, "mixed", x[:1])
        _infer(served, "mixed", x)
        expected = {"onnxruntime": 1.0, "openvino": 1.0} if HAS_OPENVINO else {"onnxruntime": 2.0}
        assert _executions(served, "mixed") == expected
    finally:
        served.stop()
    assert not marker.exists(), marker.read_text()


# --- the plan: which target serves which batch, and how many copies of the weights ---------------------


def test_the_plan_follows_the_metadata_threads_unless_given_and_keeps_within_the_weights_budget(tmp_path, monkeypatch):
    chosen = {1: Target("onnxruntime", threads=1), 8: Target("onnxruntime", threads=2), 32: Target("onnxruntime", threads=3)}
    model = _cnn(tmp_path / "three.onnx", chosen)
    verified = read_verified_model(model)
    plan = plan_serving("three", verified, ServeConfig(models=(model,)))
    assert plan.targets == tuple(chosen.values()) and plan.source == "metadata" and plan.notes == ()
    assert [plan.index_for(rows) for rows in (1, 2, 3, 4, 5, 16, 17, 32, 500)] == [0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert plan.describe() == {"1-2": "onnxruntime 1 thread", "3-16": "onnxruntime 2 threads", "17+": "onnxruntime 3 threads"}
    # --threads wins over the metadata's threads: the three choices become one target, one copy.
    given = plan_serving("three", verified, ServeConfig(models=(model,), threads=4))
    assert given.targets == (Target("onnxruntime", threads=4),) and given.describe() == {"1+": "onnxruntime 4 threads"}
    # Room for two copies of the weights: the target of the largest batch and batch 1's are kept.
    monkeypatch.setattr(serve_targets, "TARGET_WEIGHTS_BUDGET_BYTES", 2 * verified.held.size_bytes + 1)
    bounded = plan_serving("three", verified, ServeConfig(models=(model,)))
    assert bounded.targets == (chosen[1], chosen[32]) and len(bounded.notes) == 1 and "onnxruntime 2 threads is not opened" in bounded.notes[0]
    assert [bounded.index_for(rows) for rows in (1, 5, 6, 8, 32)] == [0, 0, 1, 1, 1]  # batch 8: the nearest size kept
    monkeypatch.setattr(serve_targets, "TARGET_WEIGHTS_BUDGET_BYTES", 1)  # never fewer than one
    assert plan_serving("three", verified, ServeConfig(models=(model,))).targets == (chosen[32],)


def test_a_plan_for_a_model_with_a_fixed_batch_size_has_one_target(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["output"])], "fixed",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [4, 2])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [4, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for key, value in ModelMetadata(runtime_targets={1: Target("onnxruntime", threads=1), 4: Target("onnxruntime", threads=2)}).to_props().items():
        model.metadata_props.add(key=key, value=value)
    path = tmp_path / "fixed.onnx"
    onnx.save(model, path)
    write_sidecar_sha256(path)
    plan = plan_serving("fixed", read_verified_model(path), ServeConfig(models=(path,)))
    assert plan.targets == (Target("onnxruntime", threads=2),) and plan.index_for(4) == plan.index_for(1) == 0
