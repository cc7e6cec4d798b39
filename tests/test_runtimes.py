"""Runtimes as a choice: the registry, Targets, one session interface on onnxruntime and OpenVINO,
the metadata that carries a choice, and bench/info across runtimes. Real models, real runtimes."""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bmc.bench import BenchConfig, bench
from bmc.errors import BmcError, UsageError
from bmc.export import ExportConfig, export
from bmc.runtime.metadata import PREFIX, ModelMetadata
from bmc.runtime.model_file import ModelBytes, ModelFileError, open_model
from bmc.runtime.registry import (
    UnknownRuntimeError,
    available_runtimes,
    get_runtime,
    list_runtimes,
    open_session,
    plan_targets,
)
from bmc.runtime.sessions import UnsupportedModelError
from bmc.runtime.target import Target
from bmc.train import TrainConfig, train
from conftest import assert_one_line_error, run_bmc

HAS_OPENVINO = "openvino" in available_runtimes()
needs_openvino = pytest.mark.skipif(
    not HAS_OPENVINO, reason="needs the openvino package (pip install 'bmc[openvino]'), which is not installed or not working here"
)


@pytest.fixture(scope="module")
def small_models(tmp_path_factory) -> dict[str, Path]:
    """Random-weight digit-sized nets exported by bmc."""
    folder = tmp_path_factory.mktemp("runtime_models")
    small = dict(input_size=8, input_channels=1, num_classes=10)
    return {
        "mlp": export(ExportConfig(model="seed-mlp", out=folder / "mlp.onnx", **small)).path,
        "cnn": export(ExportConfig(model="seed-cifar-cnn", out=folder / "cnn.onnx", **small)).path,
    }


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory) -> Path:
    """seed-cifar-cnn trained on digits in fp32 for 3 epochs, exported: a model whose top-1 means something."""
    folder = tmp_path_factory.mktemp("runtime_digits")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("BMC_CACHE_DIR", str(folder / "cache"))
        train(TrainConfig(epochs=3, precision="fp32"))
        return export(ExportConfig()).path


def _scaler_model(path: Path) -> Path:
    """y = 2x with ai.onnx.ml's Scaler: onnxruntime runs it, OpenVINO's ONNX frontend has no conversion for it."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])
    node = helper.make_node("Scaler", ["input"], ["output"], domain="ai.onnx.ml", offset=[0.0] * 4, scale=[2.0] * 4)
    graph = helper.make_graph([node], "scaler", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)], ir_version=8)
    path.write_bytes(model.SerializeToString())
    return path


def _external_matmul(folder: Path) -> Path:
    """input [batch, 16] @ w [16, 8] + b, its weights in model.onnx.data next to it."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 16])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 8])
    initializers = [
        numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
    ]
    nodes = [helper.make_node("MatMul", ["input", "w"], ["product"]), helper.make_node("Add", ["product", "b"], ["output"])]
    model = helper.make_model(helper.make_graph(nodes, "matmul", [x], [y], initializers), opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    folder.mkdir(parents=True)
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    return path


# --- the registry and Targets ---------------------------------------------------------------


def test_the_registry_knows_both_runtimes_and_names_them_for_an_unknown_one():
    assert list_runtimes() == ("onnxruntime", "openvino")
    assert available_runtimes()[0] == "onnxruntime" and set(available_runtimes()) <= set(list_runtimes())
    assert available_runtimes("cuda") == ("onnxruntime",)  # OpenVINO has no CUDA device
    with pytest.raises(UnknownRuntimeError, match=r"^unknown runtime 'tensorflow'; known: onnxruntime, openvino$"):
        get_runtime("tensorflow")
    with pytest.raises(UnknownRuntimeError):
        BenchConfig(runtimes=("onnxruntime", "tensorflow"))


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"runtime": "tvm"}, "unknown runtime 'tvm'; known: onnxruntime, openvino"),
        ({"runtime": "openvino", "device": "cuda"}, "runtime 'openvino' has no device 'cuda'; its devices: cpu, auto"),
        ({"precision": "bf16"}, "runtime 'onnxruntime' takes no precision 'bf16'; its precisions: fp32"),
        ({"runtime": "openvino", "precision": "int4"}, "precision must be one of fp32, bf16, fp16; got 'int4'"),
        ({"threads": 0}, "threads must be in [1, 1024] or None; got 0"),
        ({"threads": True}, "threads must be in [1, 1024] or None; got True"),
    ],
)
def test_a_target_rejects_bad_values_naming_the_field(values, fragment):
    with pytest.raises(UsageError) as caught:
        Target(**values)
    assert fragment in str(caught.value)


def test_a_target_round_trips_through_json_and_rejects_unknown_fields():
    for target in (Target(), Target("openvino", "cpu", "bf16", 2), Target("onnxruntime", "cuda", threads=1)):
        assert Target.from_json(target.to_json()) == target
        assert json.loads(target.to_json()) == {"runtime": target.runtime, "device": target.device, "precision": target.precision, "threads": target.threads}
    with pytest.raises(UsageError, match="has no field 'streams'"):
        Target.from_dict({"runtime": "openvino", "streams": 2})
    with pytest.raises(UsageError, match="not JSON"):
        Target.from_json("{runtime")
    assert Target("openvino", precision="bf16", threads=1).label == "openvino bf16 1 thread"


def test_plan_targets_keeps_fp32_by_default_and_refuses_a_precision_no_runtime_has():
    assert plan_targets(("onnxruntime",)) == (Target(),)
    everything = plan_targets(None, None)
    assert [t.runtime for t in everything][0] == "onnxruntime" and {t.runtime for t in everything} == set(available_runtimes())
    # bf16 appears exactly where the runtime reports it on this CPU: never asserted as present.
    for name in available_runtimes():
        assert {t.precision for t in everything if t.runtime == name} == set(get_runtime(name).precisions_here("cpu"))
    with pytest.raises(UsageError, match=r"no runtime asked runs precision 'fp16' on cpu here; precisions here: onnxruntime fp32"):
        plan_targets(("onnxruntime",), ("fp16",))


# --- the metadata that carries a choice ------------------------------------------------------


def test_runtime_targets_round_trip_in_the_metadata_and_old_files_read_as_absent(small_models, tmp_path):
    # A file exported today (no choice made) carries no key at all, and reads back as no choice.
    props = open_model(small_models["mlp"]).metadata_props
    assert PREFIX + "runtime_targets" not in props
    old = ModelMetadata.from_props(props)
    assert old.runtime_targets == {} and old.target_for(1) is None

    chosen = {1: Target("onnxruntime", threads=1), 32: Target("openvino", precision="fp32", threads=2)}
    metadata = ModelMetadata(model="seed-mlp", runtime_targets=chosen)
    assert ModelMetadata.from_props(metadata.to_props()) == metadata
    assert metadata.target_for(1) == chosen[1] and metadata.target_for(32) == chosen[32]
    assert metadata.target_for(2) == chosen[1] and metadata.target_for(16) == chosen[32] and metadata.target_for(256) == chosen[32]

    # Written into a real ONNX file, read back by open_model and shown by bmc info.
    proto = onnx.load(str(small_models["mlp"]))
    del proto.metadata_props[:]
    for key, value in replace(old, runtime_targets=chosen).to_props().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    chosen_path = tmp_path / "chosen.onnx"
    onnx.save_model(proto, str(chosen_path))
    assert ModelMetadata.from_props(open_model(chosen_path).metadata_props).runtime_targets == chosen
    info = run_bmc("info", str(chosen_path), cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    assert "batch 1: onnxruntime on cpu, fp32, threads 1" in info.stdout and "batch 32: openvino on cpu, fp32, threads 2" in info.stdout
    described = json.loads(run_bmc("info", str(chosen_path), "--json", cwd=tmp_path).stdout)
    assert described["metadata"]["runtime_targets"]["32"] == chosen[32].to_dict()


@pytest.mark.parametrize(
    "stored",
    [
        "not json",
        json.dumps([1, 2]),
        json.dumps({"0": Target().to_dict()}),
        json.dumps({"01": Target().to_dict()}),
        json.dumps({"1": {"runtime": "tensorflow", "device": "cpu", "precision": "fp32", "threads": None}}),
        json.dumps({"1": Target().to_dict(), "32": {"runtime": "openvino", "streams": 4}}),
    ],
)
def test_a_malformed_runtime_choice_reads_as_none_not_half_of_one(stored):
    metadata = ModelMetadata.from_props({PREFIX + "model": "m", PREFIX + "runtime_targets": stored})
    assert metadata.model == "m" and metadata.runtime_targets == {}


def test_metadata_refuses_runtime_targets_that_are_not_batch_sizes_to_targets():
    with pytest.raises(BmcError, match="runtime_targets maps batch sizes"):
        ModelMetadata(runtime_targets={0: Target()})
    with pytest.raises(BmcError, match="runtime_targets maps batch sizes"):
        ModelMetadata(runtime_targets={1: {"runtime": "onnxruntime"}})


# --- one session interface on every runtime ---------------------------------------------------


@pytest.mark.parametrize("runtime", available_runtimes())
def test_every_runtime_offers_the_same_session_interface(small_models, runtime):
    reference = open_session(small_models["cnn"], Target())
    session = open_session(small_models["cnn"], Target(runtime, threads=1))
    assert session.runtime == runtime and session.device == "cpu" and session.providers and session.precision == "fp32"
    assert session.target == Target(runtime, "cpu", "fp32", 1)
    assert [(i.name, i.dtype) for i in session.inputs] == [("input", "float32")]
    assert session.inputs[0].shape[1:] == (1, 8, 8) and not isinstance(session.inputs[0].shape[0], int)
    assert [(o.name, o.dtype) for o in session.outputs] == [(o.name, o.dtype) for o in reference.outputs]
    feeds = {"input": np.random.default_rng(0).standard_normal((5, 1, 8, 8), dtype=np.float32)}
    outputs = session.run(feeds)
    assert list(outputs) == [o.name for o in session.outputs] and outputs["output"].shape == (5, 10)
    np.testing.assert_allclose(outputs["output"], reference.run(feeds)["output"], rtol=1e-4, atol=1e-4)
    assert list(session.run(feeds, ["output"])) == ["output"]
    session.runner(feeds)()  # the timed call runs too
    assert json.dumps(session.details)  # what the runtime reports it set, as JSON
    with pytest.raises(BmcError, match=f"{runtime} failed running it"):
        session.run({"input": np.zeros((2, 3, 8, 8), dtype=np.float32)})


def test_onnxruntime_sessions_keep_their_raw_session_for_serve_and_compress(small_models):
    opened = open_session(small_models["mlp"])
    assert opened.session.get_inputs()[0].name == "input"  # the InferenceSession itself
    from bmc.bench.timing import random_inputs

    # compress hands random_inputs the raw InferenceSession; bench hands it a Session: the same feeds.
    raw, wrapped = random_inputs(opened.session, 3), random_inputs(opened, 3)
    assert raw.keys() == wrapped.keys() and all(np.array_equal(raw[k], wrapped[k]) for k in raw)


def test_a_runtime_refuses_options_it_does_not_take(small_models):
    with pytest.raises(UsageError, match=r"runtime 'onnxruntime' takes no option 'streams'; its options: cuda_graph, tensorrt"):
        open_session(small_models["mlp"], Target(), streams=2)


@needs_openvino
def test_openvino_refuses_options_it_does_not_take_and_bad_values(small_models):
    with pytest.raises(UsageError, match=r"runtime 'openvino' takes no option 'cuda_graph'; its options: performance_hint, streams"):
        open_session(small_models["mlp"], Target("openvino"), cuda_graph=True)
    with pytest.raises(UsageError, match="performance_hint must be one of latency, throughput"):
        open_session(small_models["mlp"], Target("openvino"), performance_hint="fastest")
    session = open_session(small_models["mlp"], Target("openvino", threads=1), performance_hint="throughput", streams=2)
    # What the plugin really set: one thread cannot feed two streams, and the details say so.
    assert session.details["inference_num_threads"] == 1 and 1 <= session.details["num_streams"] <= 2
    assert session.details["performance_hint"] == "THROUGHPUT"


@needs_openvino
def test_openvino_precision_is_what_the_compiled_model_really_got(small_models):
    session = open_session(small_models["cnn"], Target("openvino"))
    # OpenVINO's own default is bf16 on CPUs that have it; bmc asks fp32 unless told.
    assert session.precision == "fp32" and session.details["inference_precision"] == "fp32"
    here = get_runtime("openvino").precisions_here("cpu")
    if "bf16" in here:
        assert open_session(small_models["cnn"], Target("openvino", precision="bf16")).precision == "bf16"
    else:
        with pytest.raises(BmcError, match="openvino has no bf16 on this CPU"):
            open_session(small_models["cnn"], Target("openvino", precision="bf16"))


# --- the same answers on both runtimes --------------------------------------------------------


@needs_openvino
def test_both_runtimes_give_the_same_top1_on_the_digits_model(digits_model, tmp_path):
    from bmc.bench.accuracy import load_eval_dataset, plan_preprocessing
    from bmc.runtime.preprocess import preprocess

    metadata = ModelMetadata.from_props(open_model(digits_model).metadata_props)
    dataset = load_eval_dataset("digits", None, metadata, tuple(metadata.input_shape))
    inputs = preprocess(dataset.test_x, plan_preprocessing("m", metadata, tuple(metadata.input_shape), dataset))
    top1 = {}
    for runtime in ("onnxruntime", "openvino"):
        session = open_session(digits_model, Target(runtime))
        top1[runtime] = session.run({"input": inputs})["output"].argmax(1)
    assert np.array_equal(top1["onnxruntime"], top1["openvino"])
    # Better than chance and spread over classes: agreement on a constant answer would mean nothing.
    assert (top1["onnxruntime"] == dataset.test_y).mean() > 0.2 and len(np.unique(top1["onnxruntime"])) >= 5

    # bench: one row per runtime, accuracy per row, ratios against the first model on its first runtime.
    report = bench([digits_model], BenchConfig(batch_sizes=(1, 8), iters=5, data="digits", runtimes=("onnxruntime", "openvino")))
    assert [(m.runtime, m.precision) for m in report.models] == [("onnxruntime", "fp32"), ("openvino", "fp32")]
    assert report.models[0].quality.accuracy == report.models[1].quality.accuracy == pytest.approx((top1["openvino"] == dataset.test_y).mean())
    assert report.models[1].providers == ("CPU",) and report.models[1].details["inference_precision"] == "fp32"
    assert report.speedup(0, 8) == 1.0 and report.speedup(1, 8) == pytest.approx(
        report.models[0].timing(8).latency_ms_median / report.models[1].timing(8).latency_ms_median
    )
    assert report.environment["runtimes"] == {"onnxruntime": get_runtime("onnxruntime").version(), "openvino": get_runtime("openvino").version()}


@needs_openvino
def test_bench_cli_runs_every_runtime_by_default_and_writes_it_in_every_output(small_models, tmp_path):
    result = run_bmc(
        "bench", str(small_models["mlp"]), str(small_models["cnn"]), "--iters", "3", "--batch-sizes", "1,4", "--precision", "all",
        "--data", "digits", "--json", "--csv", "r.csv", "--markdown", "r.md", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    targets = plan_targets(None, None)
    expected = [(model, t.runtime, t.precision) for model in ("mlp.onnx", "cnn.onnx") for t in targets]
    assert [(m["name"], m["runtime"], m["precision"]) for m in report["models"]] == expected
    assert report["config"]["runtimes"] is None and report["config"]["precisions"] is None
    assert all(m["quality"]["accuracy"] is not None for m in report["models"])
    assert report["models"][0]["timings"][0]["speedup_vs_first"] == 1.0
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert rows[0].split(",")[5:7] == ["runtime", "precision"] and len(rows) == 1 + 2 * len(expected)
    header = (tmp_path / "r.md").read_text().splitlines()[0]
    assert "| mlp.onnx on onnxruntime | mlp.onnx on openvino |" in header
    runtime_row = next(line for line in (tmp_path / "r.md").read_text().splitlines() if line.startswith("| runtime |"))
    assert runtime_row.count("openvino") == 2 * sum(t.runtime == "openvino" for t in targets)


# --- what a runtime cannot do is one line ----------------------------------------------------


@needs_openvino
def test_a_model_openvino_cannot_open_is_one_line_naming_the_runtime_and_the_operator(tmp_path):
    model = _scaler_model(tmp_path / "scaler.onnx")
    with pytest.raises(UnsupportedModelError, match=r"scaler.onnx: openvino cannot open it \(no conversion rule for operator ai.onnx.ml.Scaler\)"):
        open_session(model, Target("openvino"))
    alone = run_bmc("bench", "scaler.onnx", "--runtime", "openvino", "--iters", "2", cwd=tmp_path)
    assert alone.returncode == 1
    assert_one_line_error(alone, "scaler.onnx: openvino cannot open it", "ai.onnx.ml.Scaler")
    # Beside a runtime that runs it, the model is timed there and the other row says why it is empty.
    both = run_bmc("bench", "scaler.onnx", "--iters", "2", "--batch-sizes", "1,2", "--json", cwd=tmp_path)
    assert both.returncode == 0, both.stderr
    ort_row, ov_row = json.loads(both.stdout)["models"]
    assert ort_row["runtime"] == "onnxruntime" and [t["batch_size"] for t in ort_row["timings"]] == [1, 2]
    assert ov_row["runtime"] == "openvino" and ov_row["timings"] == []
    assert [s["batch_size"] for s in ov_row["skipped"]] == [1, 2]
    assert ov_row["skipped"][0]["reason"] == "openvino cannot open it (no conversion rule for operator ai.onnx.ml.Scaler)"


def test_an_unknown_runtime_or_precision_on_the_cli_is_one_line_exit_2(small_models, tmp_path):
    for flags, fragment in (
        (["--runtime", "tensorflow"], "unknown runtime 'tensorflow'; known: onnxruntime, openvino"),
        (["--runtime", "all,onnxruntime"], "--runtime all stands alone"),
        (["--precision", "int3"], "precision must be one of fp32, bf16, fp16; got 'int3'"),
        (["--runtime", "onnxruntime", "--precision", "bf16"], "no runtime asked runs precision 'bf16' on cpu here"),
    ):
        result = run_bmc("bench", str(small_models["mlp"]), "--iters", "2", *flags, cwd=tmp_path)
        assert result.returncode == 2, (flags, result.stderr)
        assert_one_line_error(result, fragment)


# --- model bytes with external data -------------------------------------------------------------


@needs_openvino
def test_model_bytes_with_external_data_open_in_openvino_and_run_what_was_read(tmp_path, monkeypatch):
    import bmc.runtime.openvino_sessions as openvino_sessions

    path = _external_matmul(tmp_path / "m")
    data_file = path.with_name("model.onnx.data")
    held = ModelBytes(path, path.read_bytes(), {"model.onnx.data": data_file.read_bytes()})
    feed = {"input": np.random.default_rng(1).standard_normal((3, 16), dtype=np.float32)}
    expected = open_session(path).run(feed)["output"]
    # Negated weights on disk after the bytes were read: the session must not see them.
    data_file.write_bytes((-np.frombuffer(data_file.read_bytes(), dtype=np.float32)).tobytes())
    session = open_session(held, Target("openvino"))
    assert session.path == path
    np.testing.assert_allclose(session.run(feed)["output"], expected, rtol=1e-5, atol=1e-5)
    # Past protobuf's 2 GiB the bytes go through a private copy on disk instead; the same answer.
    monkeypatch.setattr(openvino_sessions, "PROTOBUF_LIMIT_BYTES", 0)
    np.testing.assert_allclose(open_session(held, Target("openvino")).run(feed)["output"], expected, rtol=1e-5, atol=1e-5)


@needs_openvino
def test_model_bytes_missing_their_external_data_are_one_line(tmp_path, monkeypatch):
    path = _external_matmul(tmp_path / "m")
    # Where a data file of that name does exist: what was not read with the model must not be read now.
    monkeypatch.chdir(path.parent)
    with pytest.raises(ModelFileError, match=r"names external data 'model.onnx.data', which was not read with the model"):
        open_session(ModelBytes(path, path.read_bytes(), {}), Target("openvino"))
    short = ModelBytes(path, path.read_bytes(), {"model.onnx.data": b"\x00" * 8})
    with pytest.raises(ModelFileError, match=r"is 8 bytes, the tensor needs bytes"):
        open_session(short, Target("openvino"))


# --- without OpenVINO, everything as before -------------------------------------------------------


def test_without_openvino_bench_info_and_the_runtime_list_behave_as_before(small_models, tmp_path):
    # An `openvino` that Python reports as missing, exactly as when the package is not installed.
    blocked = tmp_path / "blocked" / "openvino"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'openvino'\", name='openvino')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "blocked"), os.environ.get("PYTHONPATH", "")])}
    model = str(small_models["cnn"])
    script = textwrap.dedent(
        f"""
        import json
        from bmc.runtime.registry import available_runtimes, list_runtimes, plan_targets, require_runtime
        from bmc.bench import BenchConfig, bench
        try:
            require_runtime("openvino")
        except Exception as exc:
            error = str(exc)
        report = bench([{model!r}], BenchConfig(batch_sizes=(1,), iters=2, runtimes=None, precisions=None))
        print(json.dumps([list_runtimes(), available_runtimes(), error, [m.runtime for m in report.models]]))
        """
    )
    direct = run_bmc_python(script, tmp_path, env)
    known, available, error, rows = json.loads(direct)
    assert known == ["onnxruntime", "openvino"] and available == ["onnxruntime"] and rows == ["onnxruntime"]
    assert error == "runtime 'openvino' is not installed here (pip install 'bmc[openvino]')"

    bench_all = run_bmc("bench", model, "--iters", "2", "--precision", "all", "--json", cwd=tmp_path, env=env)
    assert bench_all.returncode == 0, bench_all.stderr
    assert [(m["name"], m["runtime"]) for m in json.loads(bench_all.stdout)["models"]] == [("cnn.onnx", "onnxruntime")]
    table = run_bmc("bench", model, "--iters", "2", cwd=tmp_path, env=env)
    assert table.returncode == 0 and "ratios against cnn.onnx)" in table.stdout, table.stderr
    asked = run_bmc("bench", model, "--runtime", "openvino", "--iters", "2", cwd=tmp_path, env=env)
    assert asked.returncode == 1
    assert_one_line_error(asked, "runtime 'openvino' is not installed here (pip install 'bmc[openvino]')")
    info = run_bmc("info", cwd=tmp_path, env=env)
    assert info.returncode == 0, info.stderr
    assert "openvino         not installed (pip install 'bmc[openvino]')" in info.stdout
    assert f"onnxruntime      {get_runtime('onnxruntime').version()}: devices cpu" in info.stdout
    described = json.loads(run_bmc("info", "--json", cwd=tmp_path, env=env).stdout)["runtimes"]
    assert [(r["name"], r["available"]) for r in described] == [("onnxruntime", True), ("openvino", False)]


def run_bmc_python(script: str, cwd: Path, env: dict) -> str:
    result = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return result.stdout


@needs_openvino
def test_info_lists_openvino_with_its_devices_and_precisions(tmp_path):
    info = run_bmc("info", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    line = next(line for line in info.stdout.splitlines() if line.strip().startswith("openvino"))
    here = get_runtime("openvino").precisions_here("cpu")
    assert f"{get_runtime('openvino').version()}: devices cpu; precisions {', '.join(here)}" in line and "CPU " in line
    described = {r["name"]: r for r in json.loads(run_bmc("info", "--json", cwd=tmp_path).stdout)["runtimes"]}
    assert described["openvino"]["available"] and described["openvino"]["precisions"] == list(here)
    assert described["openvino"]["openvino_devices"][0]["name"] == "CPU"


@needs_openvino
def test_openvino_sessions_never_import_torch(small_models, tmp_path):
    for name in ("torch", "torchvision"):
        (tmp_path / "blocked" / name).mkdir(parents=True)
        (tmp_path / "blocked" / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "blocked"), os.environ.get("PYTHONPATH", "")])}
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from bmc.runtime.registry import open_session
        from bmc.runtime.target import Target
        session = open_session({str(small_models["cnn"])!r}, Target("openvino"))
        print(session.run({{"input": np.zeros((2, 1, 8, 8), np.float32)}})["output"].shape)
        assert not any(m == "torch" or m.startswith(("torch.", "torchvision")) for m in sys.modules), "torch was imported"
        """
    )
    assert run_bmc_python(script, tmp_path, env).strip() == "(2, 10)"
