import dataclasses
import json
from pathlib import Path

import onnx
import pytest
import torch

from bmc.artifact import sha256_file
from bmc.runtime.sessions import cuda_works
from bmc.compress import CompressConfig, compress
from bmc.data import DataConfig
from bmc.compress.quantize import Candidate, QuantizeConfig, candidate_recipes, judge, quantize_int8
from bmc.environment import cpu_info
from bmc.errors import BmcError, DataError, UsageError
from bmc.export import ExportConfig, export
from bmc.train import TrainConfig, train

from conftest import run_bmc

INT8_OPERATORS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QuantizeLinear", "DequantizeLinear"}


@pytest.fixture
def digits_onnx(workdir):
    train(TrainConfig(epochs=3))
    return export(ExportConfig()).path


def test_every_candidate_holds_int8_operators_and_the_choice_obeys_the_speed_guarantee(digits_onnx, workdir):
    config = QuantizeConfig(calib_samples=128, seconds_per_timing=0.2)
    result = quantize_int8(digits_onnx, workdir / "q", config)
    # Routing convolutions to the GEMM kernels is a candidate only where one of them ran faster there.
    recipes = [r.name for r in candidate_recipes(cpu_info()["flags"])]
    assert [c.recipe for c in result.candidates] in (recipes, [r for r in recipes if not r.endswith("-gemm-conv")])
    assert result.calibration == {"data": "digits", "samples": 128, "method": "minmax"}
    for candidate in result.candidates:
        assert candidate.accuracy is not None and candidate.size_bytes < 0.5 * result.baseline_size_bytes
        assert candidate.accepted == judge(candidate, config)[0]
    if result.chosen is None:
        assert result.note.startswith("kept fp32") and not (workdir / "q" / "model-int8.onnx").exists()
    else:
        chosen = onnx.load(result.chosen)
        assert INT8_OPERATORS & {node.op_type for node in chosen.graph.node}
        winner = next(c for c in result.candidates if c.recipe == result.chosen_recipe)
        assert all(s >= 1.0 for s in winner.speedup.values())
    assert not (workdir / "q" / ".quantize").exists()


def test_compacted_int8_files_compute_the_same_and_keep_layer_names_and_metadata(digits_onnx, workdir):
    import numpy as np
    import onnxruntime as ort

    from bmc.compress.quantize import _prepare, quantize_with_recipe

    config = QuantizeConfig(calib_samples=64)
    prepared, input_name, calibration, _ = _prepare(digits_onnx, config, workdir)
    recipe = candidate_recipes(["avx512_vnni"])[0]
    paths = {}
    for compact in (False, True):
        paths[compact] = workdir / f"int8-{compact}.onnx"
        quantize_with_recipe(prepared, paths[compact], recipe, input_name, calibration, "minmax", compact=compact)
    full, compacted = onnx.load(paths[False]), onnx.load(paths[True])
    assert not compacted.graph.value_info and full.graph.value_info
    assert paths[True].stat().st_size < paths[False].stat().st_size
    assert all(len(c.name) <= 4 for c in compacted.graph.initializer)
    assert [n.name for n in compacted.graph.node] == [n.name for n in full.graph.node]
    assert [n.output for n in compacted.graph.node] == [n.output for n in full.graph.node]
    assert compacted.metadata_props == full.metadata_props
    batch = np.concatenate(calibration)[:32]
    outputs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {input_name: batch})[0] for p in paths.values()]
    assert np.array_equal(outputs[0], outputs[1])


def test_convolutions_routed_to_gemm_keep_their_values_and_depthwise_ones_stay_symmetric(workdir):
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import numpy_helper

    from bmc.compress.quantize import QuantRecipe, quantize_with_recipe, route_convolutions_to_gemm, route_convolutions_where_faster
    from bmc.export.onnx_export import torch_to_onnx

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.ReLU(),  # depthwise
        torch.nn.Conv2d(16, 32, 1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10),
    )
    torch_to_onnx(model, torch.zeros(1, 3, 16, 16), workdir / "m.onnx", 17)
    rng = np.random.default_rng(0)
    calibration = [rng.random((8, 3, 16, 16), dtype=np.float32) for _ in range(4)]
    batch = rng.random((16, 3, 16, 16), dtype=np.float32)
    for quant_format in ("QOperator", "QDQ"):
        plain, routed = workdir / f"{quant_format}.onnx", workdir / f"{quant_format}-gemm.onnx"
        recipe = QuantRecipe(quant_format, "uint8", "int8", reduce_range=True)
        quantize_with_recipe(workdir / "m.onnx", plain, recipe, "input", calibration, "minmax", compact=False)
        routed.write_bytes(plain.read_bytes())
        assert len(route_convolutions_to_gemm(routed)) == 2  # the 3x3 and the 1x1, not the depthwise one

        graph = onnx.load(routed).graph
        constants = {c.name: numpy_helper.to_array(c) for c in graph.initializer}
        producers = {o: n for n in graph.node for o in n.output}
        convolutions = [n for n in graph.node if n.op_type in ("QLinearConv", "Conv")]
        zero_points = []
        for node in convolutions:
            name = node.input[5] if node.op_type == "QLinearConv" else producers[node.input[1]].input[2]
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            zero_points.append((group, set(constants[name].tolist())))
        assert zero_points == [(1, {-1}), (16, {0}), (1, {-1})]

        outputs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": batch})[0] for p in (plain, routed)]
        # The same dequantized weights; only the kernel that multiplies them changes.
        assert np.abs(outputs[0] - outputs[1]).max() <= 0.01 * np.abs(outputs[0]).max()
        assert (outputs[0].argmax(1) == outputs[1].argmax(1)).all()
    assert QuantRecipe("QOperator", "uint8", "int8", reduce_range=True, gemm_convolutions=True).name == (
        "QOperator-U8S8-per-channel-reduce-range-gemm-conv"
    )

    # Routed by measurement: whichever convolutions the profiles found faster in GEMM form, and only those.
    chosen = workdir / "chosen.onnx"
    chosen.write_bytes((workdir / "QOperator.onnx").read_bytes())
    routed_names = route_convolutions_where_faster(chosen, (1, 4))
    graph = onnx.load(chosen).graph
    constants = {c.name: numpy_helper.to_array(c) for c in graph.initializer}
    shifted = {n.name for n in graph.node if n.op_type == "QLinearConv" and constants[n.input[5]].any()}
    assert shifted == set(routed_names) <= {n.name for n in graph.node if n.op_type == "QLinearConv"}
    assert not list(workdir.glob(".chosen*"))


def test_histogram_calibration_takes_a_number_of_samples_that_is_no_multiple_of_the_batch(digits_onnx, workdir):
    from bmc.compress.quantize import QuantRecipe, _prepare, quantize_with_recipe

    prepared, input_name, calibration, _ = _prepare(digits_onnx, QuantizeConfig(calib_samples=100), workdir)
    assert [len(b) for b in calibration] == [32, 32, 32, 4]
    for method in ("entropy", "percentile"):
        target = workdir / f"{method}.onnx"
        quantize_with_recipe(prepared, target, QuantRecipe("QOperator", "uint8", "int8", reduce_range=True), input_name, calibration, method)
        assert "QLinearConv" in {n.op_type for n in onnx.load(target).graph.node}


def test_a_second_compress_into_the_same_directory_leaves_nothing_stale_and_a_failed_one_loses_nothing(digits_onnx, workdir):
    quick = QuantizeConfig(calib_samples=64, seconds_per_timing=0.1, min_speedup=0.01)
    first = compress(CompressConfig(quantize="int8", quantization=quick, out=Path("c")))
    assert first.result.endswith("model-int8.onnx")
    before = sorted(p.name for p in Path("c").iterdir())

    with pytest.raises(BmcError):
        compress(CompressConfig(quantize="int8", quantization=dataclasses.replace(quick, calib_data="iris"), out=Path("c")))
    assert sorted(p.name for p in Path("c").iterdir()) == before

    second = compress(CompressConfig(quantize="none", out=Path("c")))
    assert not second.result.endswith("model-int8.onnx")
    assert sorted(p.name for p in Path("c").iterdir()) == ["compress_report.json"]


def test_the_fallback_keeps_fp32_when_nothing_meets_the_bar(digits_onnx, workdir):
    report = compress(
        CompressConfig(
            source=digits_onnx,
            out=workdir / "c",
            quantization=QuantizeConfig(calib_samples=64, seconds_per_timing=0.2, min_speedup=1000),
        )
    )
    stage = report.stages[-1]
    assert stage["chosen"] is None and report.result == str(digits_onnx)
    assert all(not c["accepted"] and c["reason"].startswith("not faster than fp32") for c in stage["candidates"])
    written = json.loads((workdir / "c" / "compress_report.json").read_text())
    assert written["result"] == str(digits_onnx)


def test_accuracy_fallback_keeps_the_sensitive_layers_in_float(workdir):
    """A digits CNN made hostile to int8 without changing its function: conv1's first channel is scaled
    up 1000x and conv2 reads it scaled down, so one activation range swamps the others. Every plain
    recipe loses ~25 points; the scan must find the two convolutions and keeping them in float must
    bring the model back within budget."""
    import torch

    from bmc.checkpoint import load_model, save_checkpoint

    run = train(TrainConfig(epochs=3))
    model, meta = load_model(run.run_dir)
    with torch.no_grad():
        conv1, conv2 = model.features[0], model.features[3]
        conv1.weight[0] *= 1000
        conv1.bias[0] *= 1000
        conv2.weight[:, 0] /= 1000  # ReLU and max-pooling commute with a positive scale: same function
    save_checkpoint(run.run_dir, model, None, meta)
    path = export(ExportConfig(run_dir=run.run_dir)).path
    # Speed is not what this test is about: a tiny CNN is no faster in int8.
    result = quantize_int8(path, workdir / "q", QuantizeConfig(calib_samples=64, seconds_per_timing=0.2, min_speedup=0.01))
    plain = result.candidates[:3]
    assert all(c.accuracy_drop_points > 5 and not c.accepted for c in plain)
    fallback = result.candidates[3:]
    in_float = [c for c in fallback if "in float" in c.recipe]
    assert in_float and "/features/features.0/Conv" in in_float[1].recipe and "/features/features.3/Conv" in in_float[1].recipe
    assert result.chosen is not None and "in float" in result.chosen_recipe
    chosen = next(c for c in result.candidates if c.recipe == result.chosen_recipe)
    assert chosen.accuracy_drop_points <= 1.0 and "accuracy fallback" in result.note


def test_teacher_distills_into_another_architecture(digits_onnx, workdir):
    report = compress(CompressConfig(student="seed-mlp", quantize="none", finetune_epochs=10))
    stage = next(s for s in report.stages if s["stage"] == "distill")
    assert stage["teacher_model"] == "seed-cifar-cnn" and stage["student_model"] == "seed-mlp" and stage["epochs"] == 10
    assert stage["student_parameters"] < stage["teacher_parameters"]
    assert stage["test_metrics"]["test_accuracy"] >= 0.9
    student_run = Path(report.result).parent
    meta = json.loads((student_run / "bmc.json").read_text())
    assert meta["model"]["distilled"] and meta["config"]["model"] == "seed-mlp" and report.result.endswith("model.onnx")
    result = run_bmc("compress", "runs/latest", "--teacher", str(workdir), "--student", "seed-mlp", cwd=workdir)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: two teachers"), result.stderr
    result = run_bmc("compress", "--student", "no-such-net", cwd=workdir)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1 and "unknown model" in result.stderr


def test_fake_quant_layers_keep_the_state_dict_and_simulate_int8():
    import torch

    from bmc.compress.qat import WEIGHT_QMAX, _fake_quant_weight, enable_fake_quant
    from bmc.models import create_model

    torch.manual_seed(0)
    model = create_model("seed-cifar-cnn", (1, 8, 8), 10)
    keys = list(model.state_dict())
    x = torch.randn(16, 1, 8, 8)
    float_out = model.eval()(x)
    enable_fake_quant(model)
    assert list(model.state_dict()) == keys  # checkpoints and export stay those of the plain model
    model.train()(x).sum().backward()  # observes ranges; straight-through gradients reach every weight
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    quant_out = model.eval()(x)
    assert not torch.equal(quant_out, float_out) and torch.allclose(quant_out, float_out, atol=0.1)
    weight = model.features[0].weight
    levels = (_fake_quant_weight(weight) / (weight.abs().amax(dim=(1, 2, 3), keepdim=True) / WEIGHT_QMAX)).detach()
    assert torch.allclose(levels, levels.round(), atol=1e-3) and levels.abs().max() <= WEIGHT_QMAX + 1


def test_quantization_aware_fine_tuning_then_measured_int8(workdir):
    train(TrainConfig())  # the digits recipe: ~97%
    report = compress(CompressConfig(
        quantize="qat", finetune_epochs=2, out=workdir / "c",
        quantization=QuantizeConfig(calib_samples=64, seconds_per_timing=0.2, min_speedup=0.01),
    ))
    stage = report.stages[-1]
    assert stage["method"] == "qat" and stage["finetune_epochs"] == 2 and stage["distilled"]
    assert stage["fake_quant_test_metrics"]["test_accuracy"] >= 0.9
    # judged against the model before fine-tuning: its accuracy is the baseline
    assert abs(stage["baseline_accuracy"] - report.summary[0]["accuracy"]) < 1e-9
    assert report.result == str(workdir / "c" / "model-int8.onnx") and Path(report.result).is_file()
    assert (workdir / "c" / "model-int8.onnx.sha256").is_file() and not (workdir / "c" / "qat").exists()
    assert [row["stage"] for row in report.summary] == ["original", "qat"]
    assert report.summary[1]["accuracy_change_points"] >= -1.0


def test_quantization_aware_fine_tuning_is_next_only_when_int8_lost_on_accuracy_alone():
    from bmc.compress.quantize import QuantizeResult, lost_on_accuracy_only

    config = QuantizeConfig(max_accuracy_drop_points=1.0)

    def result(drop, speedup, chosen=None):
        candidate = Candidate(recipe="r", path="", size_bytes=1, accuracy=0.9, accuracy_drop_points=drop, speedup=speedup, latency_ms={})
        return QuantizeResult(source="m", chosen=chosen, chosen_recipe=None, baseline_accuracy=0.9, baseline_latency_ms={},
                              baseline_size_bytes=1, candidates=[candidate])

    assert lost_on_accuracy_only(result(3.0, {1: 1.4, 32: 1.9}), config)
    assert not lost_on_accuracy_only(result(3.0, {1: 0.8, 32: 1.9}), config)  # slow too: fine-tuning cannot fix speed
    assert not lost_on_accuracy_only(result(0.2, {1: 0.8, 32: 1.9}), config)
    assert not lost_on_accuracy_only(result(3.0, {1: 1.4, 32: 1.9}, chosen="model-int8.onnx"), config)


def test_a_model_with_nan_weights_is_refused_in_one_line(digits_onnx, workdir):
    from onnx import numpy_helper

    model = onnx.load(str(digits_onnx))
    first = model.graph.initializer[0]
    broken = numpy_helper.to_array(first).copy()
    broken.flat[0] = float("nan")
    first.CopyFrom(numpy_helper.from_array(broken, first.name))
    path = workdir / "nan.onnx"
    onnx.save(model, str(path))
    with pytest.raises(BmcError, match=r"nan.onnx: the model's outputs on calibration samples are not finite"):
        quantize_int8(path, workdir / "q", QuantizeConfig(calib_samples=32))


def test_judge_applies_the_accuracy_budget():
    config = QuantizeConfig(max_accuracy_drop_points=0.3)
    fast = dict(recipe="r", path="", size_bytes=1, accuracy=0.8, latency_ms={}, speedup={1: 1.5, 32: 2.0})
    assert judge(Candidate(accuracy_drop_points=0.2, **fast), config) == (True, "faster everywhere and within the accuracy budget")
    accepted, reason = judge(Candidate(accuracy_drop_points=0.83, **fast), config)
    assert not accepted and reason == "loses 0.83 points (budget 0.3)"


def test_a_candidate_within_timing_noise_of_the_fastest_wins_by_a_smaller_file():
    from bmc.compress.quantize import choose_candidate

    def candidate(recipe, size, b1, b32, drop=0.0):
        return Candidate(recipe=recipe, path="", size_bytes=size, accuracy=0.85, accuracy_drop_points=drop,
                         speedup={1: b1, 32: b32}, latency_ms={})

    qdq, qoperator = candidate("QDQ", 162_821, 1.243, 1.679), candidate("QOperator", 148_123, 1.229, 1.688)
    assert choose_candidate([qdq, qoperator]) is qoperator  # 0.2% slower, 9% smaller
    much_faster = candidate("QDQ", 162_821, 1.40, 1.90)
    assert choose_candidate([much_faster, qoperator]) is much_faster  # 12% faster: speed decides
    same_size = candidate("QOperator-U8U8", 148_123, 1.23, 1.69, drop=0.4)
    assert choose_candidate([same_size, qoperator]) is qoperator  # same size: the more accurate
    assert choose_candidate([]) is None


def test_recipes_follow_the_cpu():
    with_vnni = candidate_recipes(["avx2", "avx512_vnni"])
    without = candidate_recipes(["avx2", "fma"])
    with_amx = candidate_recipes(["avx2", "avx512_vnni", "amx_int8"])
    assert with_vnni[0].name == "QDQ-U8S8-per-channel-reduce-range"
    assert without[0].name == "QOperator-U8S8-per-channel-reduce-range"
    # Only AMX's int8 GEMM outruns onnxruntime's direct convolution kernels (see route_convolutions_to_gemm).
    assert [r.name for r in with_amx] == [r.name for r in with_vnni] + ["QOperator-U8S8-per-channel-reduce-range-gemm-conv"]
    assert not any(r.gemm_convolutions for r in with_vnni + without)
    # S8S8 measured 2-25x slower than fp32 on both kinds of CPU: never a candidate.
    assert all(not (r.activation_type == "int8") for r in with_vnni + without)


def test_bad_requests_fail_with_one_line(digits_onnx, workdir):
    with pytest.raises(UsageError, match=r"prune must be in \[0, 0.95\]"):
        CompressConfig(prune=1.2)
    with pytest.raises(UsageError, match="quantize must be one of auto, none, int8, fp16, qat; got 'int3'"):
        CompressConfig(quantize="int3")
    with pytest.raises(BmcError, match="pruning and distillation need a bmc run directory"):
        compress(CompressConfig(source=digits_onnx, prune=0.5))
    with pytest.raises(DataError, match="data set iris has samples of shape \\[4\\]"):
        quantize_int8(digits_onnx, workdir / "q", QuantizeConfig(calib_data="iris"))
    with pytest.raises(UsageError, match=r"prune_params must be in \[0, 0.95\]"):
        CompressConfig(prune=0.5, prune_params=1.5)
    with pytest.raises(UsageError, match="--prune-params goes with structured pruning"):
        CompressConfig(prune_params=0.5)
    with pytest.raises(UsageError, match="--prune-params goes with structured pruning"):
        CompressConfig(prune=0.5, prune_method="magnitude", prune_params=0.5)
    with pytest.raises(UsageError, match=r"finetune_lr must be in \(0, 10\]; got -0.1"):
        CompressConfig(prune=0.5, finetune_lr=-0.1)
    result = run_bmc("compress", "--quantize", "int3", cwd=workdir)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == ["error: quantize must be one of auto, none, int8, fp16, qat; got 'int3'"]


def test_fp16_on_cpu_is_kept_only_when_measured_faster(digits_onnx, workdir):
    report = compress(CompressConfig(source=workdir / "runs" / "latest", quantize="fp16"))
    half = workdir / "runs" / "latest" / "compressed" / "model-fp16.onnx"
    stage = report.stages[-1]
    assert stage["method"] == "fp16" and stage["timed_on"] == "cpu" and stage["max_abs_diff"] <= 5e-2
    assert set(stage["speedup"]) == {1, 32} and stage["accuracy_drop_points"] is not None
    faster = all(s > 1 for s in stage["speedup"].values())
    assert stage["accepted"] == (faster and stage["accuracy_drop_points"] <= 1.0)
    if stage["accepted"]:
        assert report.result == str(half) and half.is_file()
    else:  # kept fp32, and the slower candidate is not left beside it
        assert Path(report.result).resolve() == digits_onnx.resolve() and not half.exists() and stage["note"].startswith("kept fp32")
        assert stage["path"] == ""  # the report does not name the file it deleted


needs_no_gpu = pytest.mark.skipif(cuda_works(), reason="checks what happens where onnxruntime has no CUDA provider")


@needs_no_gpu
def test_target_cuda_defaults_to_fp16_and_says_it_was_not_timed_here(digits_onnx, workdir):
    report = compress(CompressConfig(target="cuda"))
    stage = report.stages[-1]
    assert stage["method"] == "fp16" and stage["timed_on"] is None and "not timed" in stage["note"]
    assert report.result.endswith("model-fp16.onnx") and Path(report.result).is_file()


@needs_no_gpu
def test_bench_without_arguments_compares_the_original_with_what_compress_wrote(digits_onnx, workdir):
    compress(CompressConfig(target="cuda"))
    result = run_bmc("bench", "--iters", "3", "--batch-sizes", "1", "--runtime", "onnxruntime", "--json", cwd=workdir)
    assert result.returncode == 0, result.stderr
    names = [m["name"] for m in json.loads(result.stdout)["models"]]
    assert names == ["model.onnx", "model-fp16.onnx"]


def test_structured_pruning_shrinks_layers_and_fine_tuning_recovers_accuracy(workdir):
    import torch

    from bmc.checkpoint import load_model

    original = train(TrainConfig())
    report = compress(CompressConfig(prune=0.5, quantize="none"))
    prune = next(s for s in report.stages if s["stage"] == "prune")
    assert 0.5 <= prune["macs_removed"] < 0.6 and prune["params_removed"] > 0.3
    assert prune["left_dense"] == ["classifier.5"] and prune["distilled"] and prune["finetune_epochs"] == 20
    pruned_dir = workdir / "runs" / "latest" / "compressed" / "pruned-run"
    assert (workdir / "runs" / "latest").resolve() == original.run_dir.resolve()  # fine-tuning does not move latest
    # The pruned run loads from safetensors (layers shrunk to the saved shapes) and matches its ONNX file.
    model, meta = load_model(pruned_dir)
    assert meta["model"]["pruned"] and model.features[0].out_channels < 6
    assert Path(report.result).resolve() == (pruned_dir / "model.onnx").resolve()
    drop = original.final_metrics["test_accuracy"] - prune["test_metrics"]["test_accuracy"]
    assert drop <= 0.015, (original.final_metrics, prune)
    dense = torch.zeros(1, 1, 8, 8)
    assert model(dense).shape == (1, 10)
    # The closing summary measures the original and the pruned model together.
    original_row, pruned_row = report.summary
    assert (original_row["stage"], pruned_row["stage"]) == ("original", "pruned + kd")
    assert pruned_row["parameters"] < original_row["parameters"] and pruned_row["size_ratio"] > 1.5
    assert abs(pruned_row["accuracy"] - prune["test_metrics"]["test_accuracy"]) < 1e-5 and set(pruned_row["speedup"]) == {1, 32}


def test_pruned_int8_is_compared_with_int8_alone_and_the_note_says_when_pruning_bought_no_speed(workdir):
    original = train(TrainConfig(epochs=5))
    report = compress(CompressConfig(prune=0.5, finetune_epochs=2, quantization=QuantizeConfig(calib_samples=64, seconds_per_timing=0.2, min_speedup=0.01)))
    stages = [row["stage"] for row in report.summary]
    assert stages == ["original", "pruned + kd", "int8", "int8, not pruned"]
    result, unpruned = report.summary[-2:]
    reference = original.run_dir / "compressed" / "model-int8-unpruned.onnx"
    assert Path(unpruned["path"]).resolve() == reference.resolve() and Path(f"{reference}.sha256").read_text().split()[0] == sha256_file(reference)
    # Same recipe on both: the unpruned int8 model keeps every channel, in the same format.
    assert unpruned["parameters"] > result["parameters"] and unpruned["format"] == result["format"]
    assert unpruned["size_bytes"] > result["size_bytes"]
    assert not (original.run_dir / "compressed" / ".model-int8-unpruned").exists()
    no_gain = any(ms >= unpruned["latency_ms"][b] for b, ms in result["latency_ms"].items())
    assert no_gain == any(note.startswith("pruning bought no speed over int8 alone") for note in report.notes)
    written = json.loads((original.run_dir / "compressed" / "compress_report.json").read_text())
    assert written["notes"] == report.notes


def test_gradual_pruning_reaches_the_target_in_steps(workdir):
    from bmc.checkpoint import load_model

    original = train(TrainConfig())
    report = compress(CompressConfig(prune=0.5, prune_iterations=3, finetune_epochs=8, quantize="none"))
    prune = next(s for s in report.stages if s["stage"] == "prune")
    steps = prune["iterations"]
    assert [s["step"] for s in steps] == [1, 2, 3] and [s["finetune_epochs"] for s in steps] == [3, 3, 2]
    removed = [s["macs_removed"] for s in steps]
    # A 6- and 16-channel CNN moves in coarse steps: the first step already overshoots its third.
    assert removed == sorted(removed) and 0.12 <= removed[0] < removed[-1] and 0.5 <= removed[-1] < 0.62
    assert prune["macs_removed"] == removed[-1] and prune["finetune_epochs"] == 8
    assert sorted(p.name for p in (workdir / "runs" / "latest" / "compressed").iterdir() if p.name.startswith("pruned")) == ["pruned-run"]
    model, meta = load_model(workdir / "runs" / "latest" / "compressed" / "pruned-run")
    assert meta["model"]["pruned"]
    assert original.final_metrics["test_accuracy"] - prune["test_metrics"]["test_accuracy"] <= 0.03


def test_magnitude_pruning_zeroes_weights_and_says_it_does_not_speed_up(workdir):
    from bmc.checkpoint import load_model

    train(TrainConfig(epochs=5))
    for epochs in (0, 1):
        report = compress(CompressConfig(prune=0.5, prune_method="magnitude", quantize="none", finetune_epochs=epochs, out=Path(f"c{epochs}")))
        prune = next(s for s in report.stages if s["stage"] == "prune")
        assert 0.49 <= prune["weights_zeroed"] <= 0.51 and "speed is unchanged" in prune["note"]
        # Fine-tuning keeps the zeros: the saved model is as sparse as the report says, layer by layer.
        model, _ = load_model(Path(f"c{epochs}") / "pruned-run")
        weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        assert 0.49 <= sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights) <= 0.51
        assert all((w == 0).any() for w in weights)


def test_a_transformer_keeps_its_model_width_and_loses_feed_forward_channels_so_the_pruned_run_loads(workdir, capfd):
    from bmc.checkpoint import load_model

    train(TrainConfig(model="seed-transformer", model_args={"preset": "tiny"}, epochs=1))
    report = compress(CompressConfig(prune=0.5, quantize="none", finetune_epochs=1))
    model, _ = load_model(Path(report.out_dir) / "pruned-run")  # failed before: LayerNorm and attention were cut
    original, _ = load_model(Path("runs/latest"))
    layers = {name: m for name, m in model.named_modules() if name.endswith("linear1")}
    assert layers and all(m.out_features < original.get_submodule(name).out_features for name, m in layers.items())
    assert all(m.normalized_shape == original.get_submodule(n).normalized_shape for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm))
    prune = next(s for s in report.stages if s["stage"] == "prune")
    assert 0 < prune["macs_removed"] < 0.5 and any("not the 50% asked" in note for note in report.notes)
    assert "Torch-Pruning" not in capfd.readouterr().err


def test_pruning_that_costs_more_than_the_budget_says_so():
    from bmc.compress.pipeline import _pruning_cost

    stage = {"original_test_metrics": {"test_accuracy": 0.98}, "test_metrics": {"test_accuracy": 0.805}}
    assert _pruning_cost(stage, 1.0) == [
        "pruning cost 17.50 points of test accuracy, more than the 1-point budget (--max-accuracy-drop): "
        "fine-tune longer (--finetune-epochs) or prune less"
    ]
    assert _pruning_cost(stage, 20.0) == []
    regression = {"original_test_metrics": {"test_r2": 0.098}, "test_metrics": {"test_r2": -0.19}}
    assert _pruning_cost(regression, 1.0) == ["pruning lowered the test R² from 0.098 to -0.190: fine-tune longer (--finetune-epochs) or prune less"]


def test_pruning_strategies_are_timed_and_fastest_picks_by_latency(workdir):
    train(TrainConfig(model="resnet20", data=DataConfig(name="synthetic"), epochs=1))
    report = compress(CompressConfig(prune=0.5, prune_strategy="fastest", quantize="none", finetune_epochs=1))
    prune = next(s for s in report.stages if s["stage"] == "prune")
    timed = prune["candidate_latency_ms"]
    assert len(timed) >= 2 and prune["strategy"] in timed
    product = {name: times[1] * times[32] for name, times in timed.items()}
    assert prune["strategy"] == min(product, key=product.get)


def test_block_internal_pruning_keeps_the_residual_streams_and_rounds_to_eights():
    import torch

    from bmc.compress.prune import prune_structured
    from bmc.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", (3, 32, 32), 10).eval()
    example = torch.randn(4, 3, 32, 32)
    pruned, stats = prune_structured(model, example[:1], 0.5, choose="block-internal")
    assert stats.strategy == "block-internal channels only" and 0.5 <= stats.macs_removed < 0.6
    for (name, before), after in zip(
        ((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)),
        (m for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)),
    ):
        inside_a_block = name.endswith(".conv1")
        # The streams that additions join keep their width; the channels inside blocks shrink to eights.
        assert after.out_channels == before.out_channels or inside_a_block, name
        assert after.out_channels % 8 == 0 and (after.out_channels < before.out_channels or not inside_a_block), name
    with torch.no_grad():
        assert pruned(example).shape == (4, 10)


def test_a_parameter_target_cuts_the_channels_that_hold_the_most_parameters():
    import torch

    from bmc.compress.measure import count_macs_and_params
    from bmc.compress.prune import prune_structured
    from bmc.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", (3, 32, 32), 10).eval()
    example = torch.zeros(1, 3, 32, 32)

    def internal_widths(pruned):
        return {name: m.out_channels for name, m in pruned.named_modules() if name.endswith(".conv1")}

    _, macs_only = prune_structured(model, example, 0.3, choose="block-internal")
    pruned, both = prune_structured(model, example, 0.3, choose="block-internal", params_fraction=0.6)
    macs, params = count_macs_and_params(pruned, example)
    assert macs_only.macs_removed >= 0.3 and 1 - macs_only.params_after / macs_only.params_before < 0.6
    assert 1 - macs / both.macs_before >= 0.3 and 0.6 <= 1 - params / both.params_before < 0.7
    widths = internal_widths(pruned)
    # One stage-3 channel inside a block holds 4x the parameters of a stage-1 one (64 against 16
    # inputs and outputs, 3x3): the last stage loses the most of its width, the first the least.
    kept = {stage: min(w for name, w in widths.items() if int(name.split(".")[1]) // 3 == stage) / (16 << stage) for stage in range(3)}
    assert kept[2] < kept[1] < kept[0] and all(w % 8 == 0 for w in widths.values())
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_uniform_pruning_rounds_wide_layers_to_the_nearest_eight_and_narrow_ones_down():
    import torch
    from torch import nn

    from bmc.compress.prune import UNIFORM, _plan, _pruned_copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 100), nn.ReLU(), nn.Linear(100, 10)).eval()
    example = torch.randn(1, 16)
    plan, left_dense = _plan(model, example, 0.3, 8, UNIFORM)
    pruned = _pruned_copy(model, example, plan)
    # 70% of 12 is 8.4: down to 8; 70% of 100 is 70: to the nearest eight, 72 (down would be 64).
    assert [m.out_features for m in pruned if isinstance(m, nn.Linear)] == [8, 72, 10] and left_dense == ["4"]
    with torch.no_grad():
        assert pruned(torch.randn(3, 16)).shape == (3, 10)


def test_residual_blocks_are_found_by_tracing_and_dropping_one_equals_zeroing_its_branch():
    import torch
    import torchvision

    from bmc.compress.depth import residual_blocks
    from bmc.models import create_model
    from bmc.models.blocks import DroppedBlock, drop_blocks

    torch.manual_seed(0)
    resnet20 = create_model("resnet20", (3, 32, 32), 10).eval()
    blocks = residual_blocks(resnet20)
    # Nine blocks, of which the first of stages 2 and 3 project their shortcut: not droppable.
    assert [name for name, _ in blocks] == ["layers.0", "layers.1", "layers.2", "layers.4", "layers.5", "layers.7", "layers.8"]
    assert {kind for _, kind in blocks} == {"relu"}
    mobilenet = torchvision.models.mobilenet_v2(num_classes=10).eval()
    assert len(residual_blocks(mobilenet)) == 10 and {kind for _, kind in residual_blocks(mobilenet)} == {"identity"}

    example = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for module in (resnet20.layers[1], resnet20.layers[5]):
            module.bn2.weight.zero_()
            module.bn2.bias.zero_()
        expected = resnet20(example)
        drop_blocks(resnet20, [b for b in blocks if b[0] in ("layers.1", "layers.5")])
        assert torch.equal(resnet20(example), expected)
    assert isinstance(resnet20.layers[1], DroppedBlock) and len(residual_blocks(resnet20)) == 5


def test_an_image_folder_run_is_calibrated_on_its_own_folder_without_being_told(workdir, cifar_slice):
    # The run records where its images live; calibration after pruning used to need --calib-data-dir
    # and failed only after the fine-tuning had run.
    train(TrainConfig(data=DataConfig(name="imagefolder", data_dir=cifar_slice), model="seed-cifar-cnn", epochs=2, batch_size=50))
    report = compress(CompressConfig(prune=0.3, quantize="int8", finetune_epochs=1, quantization=QuantizeConfig(calib_samples=64)))
    quantize = next(s for s in report.stages if s["stage"] == "quantize")
    assert quantize["candidates"] and quantize["baseline_accuracy"] is not None
    assert all(row["accuracy"] is not None for row in report.summary)


def test_depth_pruning_drops_whole_blocks_and_the_pruned_run_reloads_without_them(workdir):
    import torch

    from bmc.checkpoint import load_model
    from bmc.compress.depth import residual_blocks
    from bmc.models.blocks import DroppedBlock

    train(TrainConfig(model="resnet20", data=DataConfig(name="synthetic"), epochs=1))
    result = run_bmc("compress", "--prune", "0.5", "--prune-strategy", "depth", "--quantize", "none", "--finetune-epochs", "1",
                     "--finetune-lr", "0.03", cwd=workdir)
    assert result.returncode == 0, result.stderr
    report = json.loads((workdir / "runs" / "latest" / "compressed" / "compress_report.json").read_text())
    prune = next(s for s in report["stages"] if s["stage"] == "prune")
    assert prune["strategy"].startswith("residual blocks dropped") and 0.5 <= prune["macs_removed"] < 0.6
    assert f"residual blocks dropped whole: {', '.join(prune['blocks_dropped'])}" in result.stdout
    # Each block is about a ninth of resnet20's MACs: up to four go whole, channels make up the rest.
    assert 1 <= len(prune["blocks_dropped"]) <= 4
    # Blocks go cheapest first, by their prediction shift per millisecond their kernels took in onnxruntime.
    ranking = prune["block_ranking"]
    assert len(ranking) == 7 and all(r["time_ms"] > 0 for r in ranking)
    assert {r["block"] for r in ranking[: len(prune["blocks_dropped"])]} == set(prune["blocks_dropped"])
    assert f"blocks ranked by prediction shift (KL) per ms they save, first dropped first: {ranking[0]['block']} " in result.stdout
    costs = [r["prediction_shift_kl"] / r["time_ms"] for r in ranking]
    assert costs == sorted(costs) or max(abs(a - b) for a, b in zip(costs, sorted(costs))) < 1e-3
    model, meta = load_model(workdir / "runs" / "latest" / "compressed" / "pruned-run")
    assert [name for name, _ in meta["model"]["dropped_blocks"]] == prune["blocks_dropped"]
    assert meta["config"]["lr"] == 0.03 and meta["config"]["epochs"] == 1
    assert all(isinstance(model.get_submodule(name), DroppedBlock) for name in prune["blocks_dropped"])
    assert len(residual_blocks(model)) == 7 - len(prune["blocks_dropped"])
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_depth_pruning_drops_the_blocks_that_cost_least_per_millisecond_they_save():
    import torch

    from bmc.compress.prune import prune_structured
    from bmc.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", input_shape=(3, 32, 32), num_classes=10).eval()
    for module in model.modules():  # resnet20 starts each residual branch at zero: give every block a say
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    example = torch.zeros(1, 3, 32, 32)
    _, by_macs = prune_structured(model, example, 0.2, choose="depth")
    first = by_macs.block_ranking[-1]["block"]  # the block whose loss moves the predictions most
    # The same model where that block's kernels take 100x the time of the others: it goes first.
    slow = lambda m, scopes: {name: 100.0 if name == first else 1.0 for name in scopes}
    _, by_time = prune_structured(model, example, 0.2, choose="depth", block_time_ms=slow)
    assert first in by_time.blocks_dropped and by_time.block_ranking[0] == {**by_macs.block_ranking[-1], "time_ms": 100.0}
    assert first not in by_macs.blocks_dropped and all(r["time_ms"] is None for r in by_macs.block_ranking)
    # A block the profile could not place is not taken for free: the ranking falls back to MACs.
    partial = lambda m, scopes: {name: 100.0 for name in scopes if name != first}
    _, fallback = prune_structured(model, example, 0.2, choose="depth", block_time_ms=partial)
    assert fallback.blocks_dropped == by_macs.blocks_dropped and fallback.block_ranking[0]["time_ms"] is None


def test_profiled_kernel_times_fall_under_each_residual_blocks_scope(workdir):
    import torch

    from bmc.bench.profile import node_times_ms, scope_times_ms
    from bmc.export import DEFAULT_OPSET
    from bmc.export.onnx_export import torch_to_onnx
    from bmc.models import create_model

    path = workdir / "resnet20.onnx"
    torch_to_onnx(create_model("resnet20", input_shape=(3, 32, 32), num_classes=10).eval(), torch.zeros(1, 3, 32, 32), path, DEFAULT_OPSET)
    times = node_times_ms(path, batch_size=4, iterations=3)
    scopes = scope_times_ms(times, [f"layers.{i}" for i in range(9)])
    assert all(ms > 0 for ms in scopes.values())
    assert sum(scopes.values()) < sum(times.values())  # the stem and the classifier are outside every block
    assert scope_times_ms(times, ["layers.1"])["layers.1"] != scope_times_ms(times, ["layers.10"])["layers.10"] == 0


def test_the_no_speed_note_points_to_depth_pruning_only_where_blocks_could_go():
    from bmc.compress.pipeline import _pruning_paid_off

    unpruned = {"latency_ms": {1: 0.275, 32: 4.99}, "accuracy": 0.8658, "size_bytes": 1_000_000, "path": "u.onnx"}
    result = {"latency_ms": {1: 0.295, 32: 4.80}, "accuracy": 0.8552, "size_bytes": 470_000}
    (note,) = _pruning_paid_off(result, unpruned, {"droppable_blocks": 7, "blocks_dropped": []})
    assert note.startswith("pruning bought no speed over int8 alone (batch 1: 0.295 against 0.275 ms) and cost 1.06 points")
    assert "--prune-strategy depth" in note and "7 of this model's" in note
    (note,) = _pruning_paid_off(result, unpruned, {"droppable_blocks": 0, "blocks_dropped": []})
    assert "depth" not in note
    (note,) = _pruning_paid_off(result, unpruned, {"droppable_blocks": 7, "blocks_dropped": ["layers.4"]})
    assert "depth" not in note
    assert _pruning_paid_off({**result, "latency_ms": {1: 0.2, 32: 3.0}}, unpruned, {}) == []


def test_a_strategy_torch_pruning_cannot_cut_gives_way_to_the_next_and_none_at_all_is_one_clear_error():
    import torch
    import torchvision

    from bmc.compress.prune import prune_structured

    torch.manual_seed(0)
    example = torch.randn(1, 3, 64, 64)
    # regnet's grouped convolutions defeat block-internal rounding but not uniform pruning.
    regnet = torchvision.models.regnet_x_400mf(num_classes=10).eval()
    pruned, stats = prune_structured(regnet, example, 0.5, choose="block-internal")
    assert stats.strategy == "uniform" and 0.5 <= stats.macs_removed < 0.65
    assert "Invalid channel dimensions" in stats.strategies_failed["block-internal channels only"]
    with torch.no_grad():
        assert pruned(example).shape == (1, 10)
    # Channel shuffles between layers of the model itself defeat Torch-Pruning's graph, and no part
    # of the model holds a layer whose channels could go alone.
    shuffle = torchvision.models.shufflenetv2.channel_shuffle

    class Shuffled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.first, self.second = (torch.nn.Conv2d(3, 16, 3), torch.nn.Conv2d(8, 8, 3, padding=1),
                                                  torch.nn.Conv2d(8, 8, 3, padding=1))
            self.head = torch.nn.Linear(16, 10)

        def forward(self, x):
            x = self.stem(x)
            for conv in (self.first, self.second):
                kept, changed = x.chunk(2, dim=1)
                x = shuffle(torch.cat((kept, conv(changed)), dim=1), 2)
            return self.head(x.mean((2, 3)))

    with pytest.raises(BmcError, match="no channel could go.*every strategy.*--prune-method magnitude") as caught:
        prune_structured(Shuffled().eval(), example, 0.5)
    assert "\n" not in str(caught.value)


def test_shufflenet_is_pruned_inside_its_blocks_where_its_channel_shuffle_breaks_the_models_graph():
    import torch
    import torchvision

    from bmc.compress.prune import PARTS, prune_structured

    torch.manual_seed(0)
    example = torch.randn(2, 3, 64, 64)
    model = torchvision.models.shufflenet_v2_x1_0(num_classes=10).eval()
    blocks = {name: block for name, block in model.named_modules() if type(block).__name__ == "InvertedResidual"}
    widths = {name: block.branch2[-3].out_channels for name, block in blocks.items()}
    pruned, stats = prune_structured(model, example[:1], 0.5)
    # The ZeroDivisionError in every whole-model strategy; then one graph per block.
    assert stats.strategy == PARTS.name and "ZeroDivisionError" in stats.strategies_failed["uniform"]
    assert 0.5 <= stats.macs_removed < 0.6 and stats.left_dense == ["fc"]
    for name, width in widths.items():
        branch = pruned.get_submodule(name).branch2
        assert branch[-3].out_channels == width  # each block's outputs keep their width: the shuffle needs them
        assert branch[0].out_channels < branch[-3].in_channels + 1 and branch[0].out_channels % 8 == 0
        assert branch[0].out_channels < model.get_submodule(name).branch2[0].out_channels
    with torch.no_grad():
        assert pruned(example).shape == (2, 10)


def test_compress_says_so_when_less_than_the_asked_fraction_of_macs_could_go(workdir):
    # shufflenet_v2_x0_5: only the channels inside each block can go, short of half the MACs.
    train(TrainConfig(model="torchvision:shufflenet_v2_x0_5", data=DataConfig(name="synthetic"), epochs=1))
    result = run_bmc("compress", "--prune", "0.5", "--prune-params", "0.9", "--quantize", "none", "--finetune-epochs", "0", cwd=workdir)
    assert result.returncode == 0, result.stderr
    report = json.loads((workdir / "runs" / "latest" / "compressed" / "compress_report.json").read_text())
    prune = next(s for s in report["stages"] if s["stage"] == "prune")
    assert prune["strategy"].startswith("channels inside the parts") and 0.3 < prune["macs_removed"] < 0.495
    assert report["config"]["prune_params"] == 0.9 and report["config"]["quantization"]["calib_data"] == "synthetic"
    macs_note, params_note = [n for n in report["notes"] if n.startswith("pruning removed")]
    assert macs_note.startswith(f"pruning removed {prune['macs_removed']:.1%} of the MACs, not the 50% asked") and "fc" in macs_note
    assert params_note.startswith(f"pruning removed {prune['params_removed']:.1%} of the parameters, not the 90% asked")
    assert macs_note in result.stdout.replace("\n", " ") or macs_note[:60] in result.stdout
