"""Opening ONNX files safely, and what bench reads from a file alone (size, parameters, format, sparsity)."""

import gzip
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bmc.bench import describe_model
from bmc.bench.describe import model_facts
from bmc.runtime.model_file import ModelFileError, open_model


def _matmul_model(weight: np.ndarray, bias: np.ndarray | None = None) -> onnx.ModelProto:
    """input [batch, K] @ w [K, N] (+ b): small enough to read, large enough to store externally."""
    rows, cols = weight.shape
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", rows])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", cols])
    initializers = [numpy_helper.from_array(weight, "w")]
    nodes = [helper.make_node("MatMul", ["input", "w"], ["output" if bias is None else "product"])]
    if bias is not None:
        initializers.append(numpy_helper.from_array(bias, "b"))
        nodes.append(helper.make_node("Add", ["product", "b"], ["output"]))
    graph = helper.make_graph(nodes, "matmul", [x], [y], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _save_external(model: onnx.ModelProto, folder: Path, location: str = "model.onnx.data") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0)
    return path


def _relocate(path: Path, tensor: str, location: str) -> None:
    """Point one tensor's external data at `location`, leaving the rest of the file as it was."""
    proto = onnx.load(str(path), load_external_data=False)
    for initializer in proto.graph.initializer:
        if initializer.name == tensor:
            for entry in initializer.external_data:
                if entry.key == "location":
                    entry.value = location
    onnx.save_model(proto, str(path))


@pytest.fixture
def external_model(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    model = _matmul_model(rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal(8).astype(np.float32))
    path = _save_external(model, tmp_path / "model")
    # What a hostile location would read: a real file outside the model's folder, of the right size.
    (tmp_path / "outside.data").write_bytes((tmp_path / "model" / "model.onnx.data").read_bytes())
    return path


def test_external_data_inside_the_folder_opens_and_counts_its_bytes(external_model):
    model = open_model(external_model)
    data_file = external_model.parent / "model.onnx.data"
    assert model.data_files == (data_file,)
    assert model.size_bytes == external_model.stat().st_size + data_file.stat().st_size
    assert [(t.name, t.offset_bytes, t.length_bytes) for t in model.external][0][0] == "w"
    facts = model_facts(model)
    assert facts.parameters == 16 * 8 + 8
    expected_gzip = len(gzip.compress(external_model.read_bytes(), 6)) + len(gzip.compress(data_file.read_bytes(), 6))
    # gzip headers carry a timestamp and name; the deflate stream is the same size either way.
    assert abs(facts.gzip_bytes - expected_gzip) <= 16


@pytest.mark.parametrize(
    "location, fragment",
    [
        ("../outside.data", "points outside the model's folder"),
        ("sub/../../outside.data", "points outside the model's folder"),
        ("ABSOLUTE", "is an absolute path"),
        ("linked.data", "goes through a symlinked file"),
        ("linked_dir/model.onnx.data", "goes through a symlinked folder"),
        ("missing.data", "does not exist next to the model"),
    ],
)
def test_external_data_that_would_leave_the_folder_is_refused(external_model, location, fragment):
    folder = external_model.parent
    outside = folder.parent / "outside.data"
    if location == "ABSOLUTE":
        location = str(outside.resolve())
    (folder / "sub").mkdir()
    os.symlink(outside, folder / "linked.data")
    os.symlink(folder.parent, folder / "linked_dir")
    _relocate(external_model, "w", location)
    with pytest.raises(ModelFileError) as caught:
        open_model(external_model)
    message = str(caught.value)
    assert message.startswith(f"{external_model}: tensor 'w'") and fragment in message, message
    assert repr(location) in message and "\n" not in message


def test_truncated_external_data_and_wrong_lengths_are_refused(external_model):
    data_file = external_model.parent / "model.onnx.data"
    full = data_file.read_bytes()
    data_file.write_bytes(full[:100])
    with pytest.raises(ModelFileError, match="truncated data file"):
        open_model(external_model)
    data_file.write_bytes(full)
    proto = onnx.load(str(external_model), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "length":
            entry.value = "8"
    onnx.save_model(proto, str(external_model))
    with pytest.raises(ModelFileError, match=r"external data length 8 bytes, its shape needs 512"):
        open_model(external_model)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "no graph nodes"),
        (b"hello, not a model\n", "not an ONNX model, or a truncated one"),
        ("TRUNCATED", "not an ONNX model, or a truncated one"),
    ],
)
def test_not_onnx_and_truncated_files_are_one_line_errors(tmp_path, content, fragment):
    path = tmp_path / "bad.onnx"
    if content == "TRUNCATED":
        whole = _matmul_model(np.ones((16, 8), np.float32)).SerializeToString()
        content = whole[: len(whole) * 2 // 3]
    path.write_bytes(content)
    with pytest.raises(ModelFileError) as caught:
        open_model(path)
    assert str(caught.value).startswith(f"{path}: ") and fragment in str(caught.value)


def test_missing_file_and_folder_are_named(tmp_path):
    with pytest.raises(ModelFileError, match="nowhere.onnx: no such file"):
        open_model(tmp_path / "nowhere.onnx")
    with pytest.raises(ModelFileError, match="not a file"):
        open_model(tmp_path)


def test_invalid_utf8_in_a_name_is_malformed_not_a_crash(tmp_path):
    whole = bytearray(_matmul_model(np.ones((16, 8), np.float32)).SerializeToString())
    at = whole.index(b"MatMul")
    whole[at] = 0xFF  # op_type is no longer UTF-8 text
    path = tmp_path / "bad.onnx"
    path.write_bytes(bytes(whole))
    with pytest.raises(ModelFileError, match="is not valid UTF-8 text"):
        open_model(path)


def test_sparsity_and_parameters_count_real_zeros(tmp_path):
    weight = np.arange(1, 129, dtype=np.float32).reshape(16, 8)
    weight[:, ::2] = 0.0
    weight[0, 1] = -0.0  # a pruned weight whatever its sign
    path = tmp_path / "sparse.onnx"
    onnx.save_model(_matmul_model(weight, np.ones(8, np.float32)), str(path))
    facts = describe_model(path)
    assert facts["parameters"] == 136
    assert facts["weight_sparsity"] == pytest.approx(65 / 136)
    assert facts["numeric_format"] == "fp32" and facts["opset"] == 17
    assert facts["operators"] == {"MatMul": 1, "Add": 1}
    assert facts["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 16]}]


def test_numeric_format_fp16_qdq_and_qoperator(tmp_path):
    half = _matmul_model(np.ones((16, 8), np.float32))
    half.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((16, 8), np.float16), "w"))
    onnx.save_model(half, str(tmp_path / "half.onnx"))
    facts = describe_model(tmp_path / "half.onnx")
    assert facts["numeric_format"] == "fp16" and facts["weight_sparsity"] == 1.0

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(0, np.int8), "zero")
    qdq = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["input", "scale", "zero"], ["q"]), helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["output"])],
        "qdq", [x], [y], [scale, zero],
    )
    onnx.save_model(helper.make_model(qdq, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(tmp_path / "qdq.onnx"))
    assert describe_model(tmp_path / "qdq.onnx")["numeric_format"] == "int8 QDQ"

    a = helper.make_tensor_value_info("a", TensorProto.UINT8, ["batch", 4])
    out = helper.make_tensor_value_info("out", TensorProto.INT32, ["batch", 4])
    weight = numpy_helper.from_array(np.ones((4, 4), np.uint8), "w")
    qop = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["out"])], "qop", [a], [out], [weight])
    onnx.save_model(helper.make_model(qop, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(tmp_path / "qop.onnx"))
    facts = describe_model(tmp_path / "qop.onnx")
    assert facts["numeric_format"] == "int8 QOperator" and facts["parameters"] == 16 and facts["weight_sparsity"] is None


def test_external_data_of_a_constant_node_is_checked_too(tmp_path):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])
    value = numpy_helper.from_array(np.ones(4, np.float32), "offset")
    value.ClearField("raw_data")
    value.data_location = TensorProto.EXTERNAL
    for key, text in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "16")):
        entry = value.external_data.add()
        entry.key, entry.value = key, text
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["offset"], value=value), helper.make_node("Add", ["input", "offset"], ["output"])],
        "constant", [x], [y],
    )
    path = tmp_path / "constant.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString())
    with pytest.raises(ModelFileError, match=r"tensor 'offset': external data location '../../etc/passwd' points outside"):
        open_model(path)


def test_a_session_built_from_bytes_runs_what_was_read_not_what_the_files_hold_later(external_model):
    from bmc.runtime.model_file import ModelBytes
    from bmc.runtime.sessions import create_session

    data_file = external_model.with_name("model.onnx.data")
    held = ModelBytes(external_model, external_model.read_bytes(), {"model.onnx.data": data_file.read_bytes()})
    feed = {"input": np.ones((2, 16), dtype=np.float32)}
    expected = create_session(external_model).session.run(None, feed)[0]
    # Negated weights on disk after the bytes were read: the session must not see them.
    weights = np.frombuffer(data_file.read_bytes(), dtype=np.float32)
    data_file.write_bytes((-weights).tobytes())
    opened = create_session(held)
    del held
    assert opened.path == external_model
    np.testing.assert_array_equal(opened.session.run(None, feed)[0], expected)
    assert not np.allclose(create_session(external_model).session.run(None, feed)[0], expected)
