"""Dynamic int8: when the search tries it, that its file really is dynamic int8 and is measured,
judged and handed over as every static recipe's, and the requests that refuse it.

Real models trained on digits, no mocks; decisions are asserted, not figures (min_speedup 0.01
accepts every candidate, so each test holds on any x86-64 CPU).
"""

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from bmc.artifact import sha256_file
from bmc.compress import CompressConfig, QuantizeConfig, QuantizeResult, compress
from bmc.compress.quantize.calibration import prepare
from bmc.compress.quantize.compute import MATMUL_HEAVY_SHARE, is_matmul_heavy, macs_by_op_type, matmul_share
from bmc.compress.quantize.recipes import candidate_recipes, dynamic_recipe, quantize_with_recipe, recipes_to_try
from bmc.compress.quantize.search import quantize_int8
from bmc.environment import cpu_info
from bmc.errors import BmcError, UsageError
from bmc.export import ExportConfig, export
from bmc.runtime.metadata import ModelMetadata
from bmc.runtime.target import Target
from bmc.train import TrainConfig, train

from conftest import assert_one_line_error, run_bmc

DYNAMIC_OPS = {"DynamicQuantizeLinear", "MatMulInteger"}
QUICK = QuantizeConfig(calib_samples=64, seconds_per_timing=0.2, runtimes=("onnxruntime",), threads=1)
ANY_SPEED = dataclasses.replace(QUICK, min_speedup=0.01, max_accuracy_drop_points=100)  # every candidate accepted
QUICK_TARGET = Target("onnxruntime", "cpu", "fp32", 1)


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory) -> dict[str, Path]:
    """Run directories of seed-mlp (2 epochs), seed-cifar-cnn and seed-transformer (preset tiny),
    each trained on digits and exported; trained once per module."""
    root = tmp_path_factory.mktemp("digits")
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("BMC_CACHE_DIR", str(root / "cache"))
        for name, model, args, epochs in (("mlp", "seed-mlp", {}, 2), ("cnn", "seed-cifar-cnn", {}, 1),
                                          ("transformer", "seed-transformer", {"preset": "tiny"}, 1)):
            run = train(TrainConfig(model=model, model_args=args, epochs=epochs))
            export(ExportConfig(run_dir=run.run_dir))
            runs[name] = root / run.run_dir
    return runs


@pytest.fixture
def mlp_run(workdir, digits_runs) -> Path:
    """A copy of the seed-mlp run in this test's directory."""
    return Path(shutil.copytree(digits_runs["mlp"], workdir / "mlp"))


def _dynamic_name() -> str:
    return dynamic_recipe(cpu_info()["flags"]).name


# ---- which models get it -----------------------------------------------------------------------


def test_compute_share_tells_matrix_product_models_from_conv_nets(digits_runs):
    mlp, transformer, cnn = (digits_runs[k] / "model.onnx" for k in ("mlp", "transformer", "cnn"))
    assert set(macs_by_op_type(mlp)) == {"Gemm"} and matmul_share(mlp) == 1.0
    assert matmul_share(transformer) >= MATMUL_HEAVY_SHARE and is_matmul_heavy(transformer)
    # Its fully connected layers hold most of its weights, but its convolutions do most of the work.
    macs = macs_by_op_type(cnn)
    assert macs["Conv"] > macs["Gemm"] and not is_matmul_heavy(cnn)


def test_recipes_to_try_put_dynamic_first_only_for_matrix_product_models():
    vnni, plain = ["avx2", "avx512_vnni"], ["avx2", "fma"]
    assert [r.name for r in recipes_to_try(vnni, "auto", True)] == ["dynamic-U8S8-per-channel"] + [r.name for r in candidate_recipes(vnni)]
    assert recipes_to_try(vnni, "auto", False) == candidate_recipes(vnni)
    assert recipes_to_try(vnni, "static", True) == candidate_recipes(vnni)
    # Without VNNI the integer kernels' 16-bit sums saturate unless weights use 7 bits, as for static recipes.
    assert [r.name for r in recipes_to_try(plain, "dynamic", False)] == ["dynamic-U8S8-per-channel-reduce-range"]


# ---- the search ---------------------------------------------------------------------------------


def test_int8_on_an_mlp_tries_the_dynamic_recipe_first_and_its_file_is_dynamic_int8(mlp_run, workdir):
    report = compress(CompressConfig(source=mlp_run, quantize="int8", quantization=ANY_SPEED))
    result = report.stage(QuantizeResult)
    assert result is not None
    names = [c.recipe for c in result.candidates]
    assert names[0] == _dynamic_name() and len(names) > 1  # the static recipes follow it
    dynamic = result.candidates[0]
    assert dynamic.accepted and dynamic.accuracy is not None and dynamic.accuracy_drop_points is not None
    assert set(dynamic.speedup) == {1, 32} and dynamic.size_bytes < result.baseline_size_bytes

    # The same recipe's file: dynamic int8 operators, and the fp32 model's outputs within int8's rounding.
    import onnxruntime as ort

    (workdir / "work").mkdir()
    calibration = prepare(mlp_run / "model.onnx", QUICK, workdir / "work")
    quantized = workdir / "dynamic.onnx"
    quantize_with_recipe(calibration, quantized, dynamic_recipe(cpu_info()["flags"]))
    ops = {node.op_type for node in onnx.load(quantized).graph.node}
    assert DYNAMIC_OPS <= ops and "Gemm" not in ops
    batch = np.concatenate(calibration.batches)
    fp32 = ort.InferenceSession(str(mlp_run / "model.onnx")).run(None, {calibration.input_name: batch})[0]
    int8 = ort.InferenceSession(str(quantized)).run(None, {calibration.input_name: batch})[0]
    assert not np.array_equal(fp32, int8) and np.abs(fp32 - int8).max() < 0.1 * np.abs(fp32).max()
    assert (fp32.argmax(1) == int8.argmax(1)).mean() > 0.95


def test_int8_dynamic_tries_only_dynamic_recipes_and_hands_the_file_over_as_static_ones_are(mlp_run, workdir):
    result = quantize_int8(mlp_run / "model.onnx", workdir / "q", ANY_SPEED, recipes_tried="dynamic")
    assert [c.recipe for c in result.candidates] == [_dynamic_name()]
    assert result.chosen_recipe == _dynamic_name() and result.runtime_targets == {1: QUICK_TARGET, 32: QUICK_TARGET}
    path = Path(result.chosen)
    assert path == workdir / "q" / "model-int8.onnx" and DYNAMIC_OPS <= {n.op_type for n in onnx.load(path).graph.node}
    assert Path(f"{path}.sha256").read_text().split()[0] == sha256_file(path)
    metadata = ModelMetadata.from_props({p.key: p.value for p in onnx.load(path).metadata_props})
    assert metadata.dataset == "digits" and metadata.runtime_targets == {1: QUICK_TARGET, 32: QUICK_TARGET}
    assert not (workdir / "q" / ".quantize").exists()


def test_a_conv_net_gets_no_dynamic_candidate_under_int8(digits_runs, workdir):
    result = quantize_int8(digits_runs["cnn"] / "model.onnx", workdir / "q", ANY_SPEED)
    static = [r.name for r in candidate_recipes(cpu_info()["flags"])]
    assert result.candidates and result.candidates[0].recipe == static[0]
    assert all(c.recipe in static for c in result.candidates)  # no dynamic one


def test_a_model_without_matrix_products_rejects_the_dynamic_candidate_in_one_line(workdir):
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv"), helper.make_node("GlobalAveragePool", ["y"], ["p"]),
         helper.make_node("Flatten", ["p"], ["out"])],
        "conv_only", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])], [weights],
    )
    path = workdir / "conv_only.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    config = dataclasses.replace(QUICK, calib_data="synthetic", measure_accuracy=False, calib_samples=32)
    result = quantize_int8(path, workdir / "q", config, recipes_tried="dynamic")
    [candidate] = result.candidates
    assert not candidate.accepted and candidate.speedup == {}
    assert candidate.reason.startswith("could not be made:") and "found no MatMul" in candidate.reason and "\n" not in candidate.reason
    assert result.chosen is None and result.note.startswith("kept fp32")
    (workdir / "work").mkdir()
    with pytest.raises(BmcError, match="found no MatMul"):
        quantize_with_recipe(prepare(path, config, workdir / "work"), workdir / "d.onnx", dynamic_recipe(cpu_info()["flags"]))


# ---- the request --------------------------------------------------------------------------------


def test_int8_dynamic_is_refused_for_cuda_and_with_qat(workdir):
    with pytest.raises(UsageError, match="int8-dynamic models run slower than fp16 .* use --quantize fp16 for --target cuda"):
        CompressConfig(quantize="int8-dynamic", target="cuda")
    with pytest.raises(UsageError, match="--qat fine-tunes for int8 \\(static"):
        CompressConfig(quantize="int8-dynamic", qat=True)
    assert CompressConfig(quantize="int8-dynamic").quantization_format == "int8-dynamic"
    assert_one_line_error(run_bmc("compress", "--quantize", "int8-dynamic", "--target", "cuda", cwd=workdir),
                          "use --quantize fp16 for --target cuda")


def test_cli_int8_dynamic_prints_the_dynamic_recipe(mlp_run, workdir):
    result = run_bmc("compress", str(mlp_run), "--quantize", "int8-dynamic", "--runtime", "onnxruntime", "--threads", "1",
                     "--calib-samples", "64", "--max-accuracy-drop", "100", cwd=workdir)
    assert result.returncode == 0, result.stderr
    candidate_lines = [line for line in result.stdout.splitlines() if line.startswith("  ") and "at batch 1" in line]
    assert len(candidate_lines) == 1 and candidate_lines[0].split()[0] == _dynamic_name(), result.stdout
    assert "pt  [" in candidate_lines[0]  # its accuracy was measured


def test_quantizing_a_transformer_writes_nothing_to_the_terminal(digits_runs, workdir, capfd, caplog):
    """onnxruntime's quantizer logs a root warning per tensor it leaves alone (hundreds on a
    Transformer's shape Gathers) and prints progress; the search reports what matters instead."""
    calibration = prepare(digits_runs["transformer"] / "model.onnx", QUICK, workdir)
    capfd.readouterr()
    for recipe in (dynamic_recipe(cpu_info()["flags"]), candidate_recipes(cpu_info()["flags"])[0]):
        quantize_with_recipe(calibration, workdir / f"{recipe.name}.onnx", recipe)
        assert (workdir / f"{recipe.name}.onnx").is_file()
    out, err = capfd.readouterr()
    assert out == "" and err == "" and not caplog.records, (out[:300], err[:300], caplog.records[:3])
