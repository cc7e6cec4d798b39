"""bmc compress: each stage through its public function, the plan end to end, the CLI as a user meets it.

Decisions are asserted, not figures: where a choice rests on timing, the config forces it both ways
(min_speedup 1000 keeps fp32, 0.01 accepts every candidate) so each test holds on any x86-64 CPU.
The long end-to-end runs are marked slow.
"""

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from bmc.artifact import sha256_file
from bmc.compress import CompressConfig, DistillResult, HalfResult, PruneResult, QatResult, QuantizeConfig, QuantizeResult, compress
from bmc.compress.prune.outcome import PruneOutcome
from bmc.compress.prune.search import PruneTarget, prune_structured
from bmc.compress.prune.strategies import CUTS, strategy_names
from bmc.compress.quantize.calibration import prepare
from bmc.compress.quantize.recipes import QuantRecipe, candidate_recipes, quantize_with_recipe
from bmc.compress.quantize.runtimes import FileChoice, choose_file
from bmc.compress.quantize.search import SPEED_TIE, Candidate, judge, lost_on_accuracy_only, quantize_int8
from bmc.runtime.target import Target
from bmc.compress.report import REPORT_FORMAT_VERSION, Metrics, SparsityResult, SummaryRow
from bmc.compress.summary import pruning_cost, pruning_paid_off
from bmc.data import DataConfig, dataset_recipe
from bmc.environment import cpu_info
from bmc.errors import BmcError, DataError, UsageError
from bmc.export import ExportConfig, export
from bmc.runtime.sessions import cuda_works
from bmc.train import TrainConfig, train

from conftest import assert_one_line_error, run_bmc

INT8_OPERATORS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QuantizeLinear", "DequantizeLinear"}
# One target (onnxruntime on one thread): these tests are about recipes and judging; the search
# over runtimes and settings has its own (test_compress_runtimes.py).
QUICK = QuantizeConfig(calib_samples=64, seconds_per_timing=0.2, runtimes=("onnxruntime",), threads=1)
ANY_SPEED = dataclasses.replace(QUICK, min_speedup=0.01, max_accuracy_drop_points=100)  # every candidate accepted
NO_SPEED = dataclasses.replace(QUICK, min_speedup=1000)  # none accepted
QUICK_TARGET = Target("onnxruntime", "cpu", "fp32", 1)
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory) -> Path:
    """runs/ holding a digits CNN trained for 3 epochs and exported, trained once per module."""
    root = tmp_path_factory.mktemp("digits")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("BMC_CACHE_DIR", str(root / "cache"))
        train(TrainConfig(epochs=3))
        export(ExportConfig())
    return root / "runs"


@pytest.fixture
def digits_onnx(workdir, digits_runs) -> Path:
    """A copy of that run as this test's runs/latest; returns its model.onnx."""
    shutil.copytree(digits_runs, workdir / "runs", symlinks=True)
    return Path("runs") / "latest" / "model.onnx"


def _stage(report, kind):
    found = report.stage(kind)
    assert found is not None, [type(s).__name__ for s in report.stages]
    return found


def _plain_recipes_here() -> list[str]:
    return [r.name for r in candidate_recipes(cpu_info()["flags"])]


# ---- int8: recipes, judgement, choice ----------------------------------------------------------


def test_recipes_follow_the_cpu():
    with_vnni = candidate_recipes(["avx2", "avx512_vnni"])
    without = candidate_recipes(["avx2", "fma"])
    with_amx = candidate_recipes(["avx2", "avx512_vnni", "amx_int8"])
    assert with_vnni[0].name == "QDQ-U8S8-per-channel-reduce-range"
    assert without[0].name == "QOperator-U8S8-per-channel-reduce-range"
    # Only AMX's int8 GEMM outruns onnxruntime's direct convolution kernels (see rewrites.route_convolutions_to_gemm).
    assert [r.name for r in with_amx] == [r.name for r in with_vnni] + ["QOperator-U8S8-per-channel-reduce-range-gemm-conv"]
    assert not any(r.gemm_convolutions for r in with_vnni + without)
    # S8S8 measured 2-25x slower than fp32 on both kinds of CPU: never a candidate.
    assert all(not (r.activation_type == "int8") for r in with_vnni + without)


def test_judge_applies_the_speed_guarantee_and_the_accuracy_budget():
    config = QuantizeConfig(max_accuracy_drop_points=0.3)
    fast = dict(recipe="r", path="", size_bytes=1, accuracy=0.8, latency_ms={}, speedup={1: 1.5, 32: 2.0})
    assert judge(Candidate(accuracy_drop_points=0.2, **fast), config) == (True, "faster everywhere and within the accuracy budget")
    accepted, reason = judge(Candidate(accuracy_drop_points=0.83, **fast), config)
    assert not accepted and reason == "loses 0.83 points (budget 0.3)"
    slow_at_32 = {**fast, "speedup": {1: 1.5, 32: 0.9}}
    assert judge(Candidate(accuracy_drop_points=0.0, **slow_at_32), config) == (False, "not faster than fp32: 0.90x at batch 32 (needs 1x)")


def test_a_candidate_within_timing_noise_of_the_fastest_wins_by_a_smaller_file():
    def choice(label, size, b1, b32, drop=0.0):
        return FileChoice(label, {1: Target(), 32: Target()}, {1: b1, 32: b32}, size, drop)

    qdq, qoperator = choice("QDQ", 162_821, 1.243, 1.679), choice("QOperator", 148_123, 1.229, 1.688)
    assert choose_file([qdq, qoperator], SPEED_TIE, Target()) is qoperator  # 0.2% slower, 9% smaller
    much_faster = choice("QDQ", 162_821, 1.40, 1.90)
    assert choose_file([much_faster, qoperator], SPEED_TIE, Target()) is much_faster  # 12% faster: speed decides
    same_size = choice("QOperator-U8U8", 148_123, 1.23, 1.69, drop=0.4)
    assert choose_file([same_size, qoperator], SPEED_TIE, Target()) is qoperator  # same size: the more accurate


def test_quantization_aware_fine_tuning_is_next_only_when_int8_lost_on_accuracy_alone():
    config = QuantizeConfig(max_accuracy_drop_points=1.0)

    def result(drop, speedup, chosen=None):
        candidate = Candidate(recipe="r", path="", size_bytes=1, accuracy=0.9, accuracy_drop_points=drop, speedup=speedup, latency_ms={})
        return QuantizeResult(source="m", chosen=chosen, chosen_recipe="r" if chosen else None, baseline_accuracy=0.9, baseline_latency_ms={},
                              baseline_size_bytes=1, candidates=[candidate])

    assert lost_on_accuracy_only(result(3.0, {1: 1.4, 32: 1.9}), config)
    assert not lost_on_accuracy_only(result(3.0, {1: 0.8, 32: 1.9}), config)  # slow too: fine-tuning cannot fix speed
    assert not lost_on_accuracy_only(result(0.2, {1: 0.8, 32: 1.9}), config)
    assert not lost_on_accuracy_only(result(3.0, {1: 1.4, 32: 1.9}, chosen="model-int8.onnx"), config)


def test_int8_keeps_fp32_when_no_candidate_is_fast_enough_and_chooses_by_the_rule_when_all_are(digits_onnx, workdir):
    kept = quantize_int8(digits_onnx, workdir / "kept", NO_SPEED)
    assert kept.chosen is None and kept.chosen_recipe is None and kept.note.startswith("kept fp32")
    assert all(not c.accepted and c.reason.startswith("not faster than fp32") for c in kept.candidates)
    assert not (workdir / "kept" / "model-int8.onnx").exists() and not (workdir / "kept" / ".quantize").exists()

    chosen = quantize_int8(digits_onnx, workdir / "chosen", ANY_SPEED)
    # Routing convolutions to the GEMM kernels is a candidate only where one of them ran faster there.
    recipes = _plain_recipes_here()
    assert [c.recipe for c in chosen.candidates] in (recipes, [r for r in recipes if not r.endswith("-gemm-conv")])
    assert all(c.accepted and c.accuracy is not None and c.size_bytes < 0.5 * chosen.baseline_size_bytes for c in chosen.candidates)
    assert chosen.chosen_recipe in recipes and chosen.runtime_targets == {1: QUICK_TARGET, 32: QUICK_TARGET}
    assert chosen.calibration.data == "digits" and chosen.calibration.samples == 64 and chosen.calibration.method == "minmax"
    path = Path(chosen.chosen)
    assert path == workdir / "chosen" / "model-int8.onnx" and INT8_OPERATORS & {n.op_type for n in onnx.load(path).graph.node}
    assert Path(f"{path}.sha256").read_text().split()[0] == sha256_file(path)
    assert [c.path for c in chosen.candidates if c.path] == [str(path)]  # the losers' files are gone with the scratch
    assert not (workdir / "chosen" / ".quantize").exists()


def test_compacted_int8_files_compute_the_same_and_keep_layer_names_and_metadata(digits_onnx, workdir):
    import onnxruntime as ort

    calibration = prepare(digits_onnx, QuantizeConfig(calib_samples=64), workdir)
    recipe = candidate_recipes(["avx512_vnni"])[0]
    paths = {}
    for compact in (False, True):
        paths[compact] = workdir / f"int8-{compact}.onnx"
        quantize_with_recipe(calibration, paths[compact], recipe, compact=compact)
    full, compacted = onnx.load(paths[False]), onnx.load(paths[True])
    assert not compacted.graph.value_info and full.graph.value_info
    assert paths[True].stat().st_size < paths[False].stat().st_size
    assert all(len(c.name) <= 4 for c in compacted.graph.initializer)
    assert [n.name for n in compacted.graph.node] == [n.name for n in full.graph.node]
    assert [n.output for n in compacted.graph.node] == [n.output for n in full.graph.node]
    assert compacted.metadata_props == full.metadata_props
    batch = np.concatenate(calibration.batches)[:32]
    outputs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {calibration.input_name: batch})[0] for p in paths.values()]
    assert np.array_equal(outputs[0], outputs[1])


def test_histogram_calibration_takes_a_number_of_samples_that_is_no_multiple_of_the_batch(digits_onnx, workdir):
    calibration = prepare(digits_onnx, QuantizeConfig(calib_samples=100), workdir)
    assert [len(b) for b in calibration.batches] == [32, 32, 32, 4] and calibration.samples == 100
    for method in ("entropy", "percentile"):
        target = workdir / f"{method}.onnx"
        quantize_with_recipe(calibration.using(method=method), target, QuantRecipe("QOperator", "uint8", "int8", reduce_range=True))
        assert "QLinearConv" in {n.op_type for n in onnx.load(target).graph.node}


def test_convolutions_routed_to_gemm_keep_their_values_and_depthwise_ones_stay_symmetric(workdir):
    import onnxruntime as ort
    from onnx import numpy_helper

    from bmc.compress.quantize.calibration import Calibration
    from bmc.compress.quantize.rewrites import route_convolutions_to_gemm, route_convolutions_where_faster
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
    calibration = Calibration(workdir / "m.onnx", "input", tuple(rng.random((8, 3, 16, 16), dtype=np.float32) for _ in range(4)), "random")
    batch = rng.random((16, 3, 16, 16), dtype=np.float32)
    for quant_format in ("QOperator", "QDQ"):
        plain, routed = workdir / f"{quant_format}.onnx", workdir / f"{quant_format}-gemm.onnx"
        quantize_with_recipe(calibration, plain, QuantRecipe(quant_format, "uint8", "int8", reduce_range=True), compact=False)
        routed.write_bytes(plain.read_bytes())
        assert len(route_convolutions_to_gemm(routed)) == 2  # the 3x3 and the 1x1, not the depthwise one

        graph = onnx.load(routed).graph
        constants = {c.name: numpy_helper.to_array(c) for c in graph.initializer}
        producers = {o: n for n in graph.node for o in n.output}
        zero_points = []
        for node in (n for n in graph.node if n.op_type in ("QLinearConv", "Conv")):
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


@slow
def test_accuracy_fallback_keeps_the_sensitive_layers_in_float(workdir):
    """A digits CNN made hostile to int8 without changing its function: conv1's first channel is scaled
    up 1000x and conv2 reads it scaled down, so one activation range swamps the others. Every plain
    recipe fails the budget on accuracy; the scan must find the two convolutions and keeping them in
    float must bring the model back within budget."""
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
    result = quantize_int8(path, workdir / "q", dataclasses.replace(QUICK, min_speedup=0.01))
    plain = [c for c in result.candidates if c.recipe in _plain_recipes_here()]
    assert plain and all(not c.accepted and c.reason.startswith("loses") for c in plain)
    two_in_float = next(c for c in result.candidates if "2 sensitive layers in float" in c.recipe)
    assert "/features/features.0/Conv" in two_in_float.recipe and "/features/features.3/Conv" in two_in_float.recipe
    assert result.chosen is not None and "in float" in result.chosen_recipe and "accuracy fallback" in result.note
    chosen = next(c for c in result.candidates if c.recipe == result.chosen_recipe)
    assert chosen.accepted and chosen.accuracy_drop_points <= 1.0


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


# ---- the plan end to end, and its output folder -------------------------------------------------


def test_compress_of_an_onnx_file_keeps_fp32_when_nothing_meets_the_bar_and_reports_it(digits_onnx, workdir):
    report = compress(CompressConfig(source=digits_onnx, out=workdir / "c", quantization=NO_SPEED))
    quantized = _stage(report, QuantizeResult)
    assert quantized.chosen is None and report.result == digits_onnx and [type(s) for s in report.stages] == [QuantizeResult]
    assert all(not c.accepted and c.reason.startswith("not faster than fp32") for c in quantized.candidates)
    written = json.loads((workdir / "c" / "compress_report.json").read_text())
    assert written == json.loads(json.dumps(report.to_dict()))  # the file is the serialization of the typed report
    assert written["format_version"] == REPORT_FORMAT_VERSION and written["result"] == str(digits_onnx)
    assert [s["stage"] for s in written["stages"]] == ["int8"] and written["config"]["quantization"]["calib_data"] == "digits"
    assert [row.stage for row in report.summary] == ["original"]


def test_a_second_compress_into_the_same_folder_leaves_nothing_stale_and_a_failed_one_loses_nothing(digits_onnx, workdir):
    first = compress(CompressConfig(quantization=ANY_SPEED, out=Path("c")))
    assert first.result.name == "model-int8.onnx"
    before = {p.name: p.read_bytes() for p in Path("c").iterdir()}

    with pytest.raises(DataError):
        compress(CompressConfig(quantization=dataclasses.replace(QUICK, calib_data="iris"), out=Path("c")))
    assert {p.name: p.read_bytes() for p in Path("c").iterdir()} == before
    assert sorted(p.name for p in workdir.iterdir() if p.name.startswith(".c.")) == []  # no staging left behind

    second = compress(CompressConfig(quantize="none", out=Path("c")))
    assert second.result.name == "model.onnx" and second.stages == ()
    assert sorted(p.name for p in Path("c").iterdir()) == ["compress_report.json"]


def test_the_output_folder_is_compress_own_and_a_kill_during_the_swap_is_repaired(workdir):
    fake = workdir / "m.onnx"
    fake.write_bytes(b"not read: the folder is refused first")
    config = CompressConfig(source=fake, quantize="none", quantization=QuantizeConfig(calib_data="digits"))
    (workdir / "notes").mkdir()
    (workdir / "notes" / "mine.txt").write_text("a user's file")
    with pytest.raises(UsageError, match="notes holds files that no compress run wrote"):
        compress(dataclasses.replace(config, out=workdir / "notes"))
    assert (workdir / "notes" / "mine.txt").read_text() == "a user's file"
    (workdir / "compress_report.json").write_text("{}")
    with pytest.raises(UsageError, match="m.onnx lies in the output folder"):
        compress(dataclasses.replace(config, out=workdir))

    # A kill between the swap's two renames: the results are set aside, the new ones not yet in place.
    aside = workdir / ".c.previous-999999999"
    aside.mkdir()
    (aside / "compress_report.json").write_text('{"from": "the run before"}')
    (workdir / ".c.staging-999999999").mkdir()
    with pytest.raises(BmcError):  # fails after the folder is prepared: the fake model cannot be opened
        compress(dataclasses.replace(config, out=workdir / "c"))
    assert json.loads((workdir / "c" / "compress_report.json").read_text()) == {"from": "the run before"}
    assert not aside.exists() and not (workdir / ".c.staging-999999999").exists()


@slow
def test_a_killed_compress_leaves_the_previous_results_as_they_were(workdir):
    train(TrainConfig(epochs=3))
    first = run_bmc("compress", "--prune", "0.5", "--finetune-epochs", "1", "--quantize", "none", cwd=workdir)
    assert first.returncode == 0, first.stderr
    compressed = (workdir / "runs" / "latest").resolve() / "compressed"
    before = {str(p.relative_to(compressed)): sha256_file(p) for p in sorted(compressed.rglob("*")) if p.is_file()}
    assert "pruned-run/model.onnx" in before

    process = subprocess.Popen([sys.executable, "-m", "bmc", "compress", "--prune", "0.5", "--finetune-epochs", "500", "--quantize", "none"],
                               cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Killed once its fine-tuning has saved a first epoch into the staging folder.
        deadline = time.monotonic() + 240
        while not list(compressed.parent.glob(".compressed.staging-*/pruned-run/bmc.json")):
            assert process.poll() is None and time.monotonic() < deadline, "the run ended or never reached fine-tuning"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    after = {str(p.relative_to(compressed)): sha256_file(p) for p in sorted(compressed.rglob("*")) if p.is_file()}
    assert after == before
    assert list(compressed.parent.glob(".compressed.staging-*"))  # the kill left its staging folder ...

    third = run_bmc("compress", "--quantize", "none", cwd=workdir)
    assert third.returncode == 0, third.stderr
    assert not list(compressed.parent.glob(".compressed.*"))  # ... which the next run cleared, never read
    assert sorted(p.name for p in compressed.iterdir()) == ["compress_report.json"]  # replaced by a finished run


# ---- structured pruning ---------------------------------------------------------------------------


def test_every_registered_strategy_is_a_cli_choice_and_an_unknown_one_lists_them(workdir):
    assert strategy_names()[0] == "depth" and set(strategy_names()) == {"depth", "block-internal", "uniform", "fastest"}
    with pytest.raises(UsageError, match="unknown pruning strategy 'deep'; known: depth, block-internal, uniform, fastest"):
        CompressConfig(prune=0.5, prune_strategy="deep")
    shown = run_bmc("compress", "--help", cwd=workdir, env={"COLUMNS": "200"})
    assert shown.returncode == 0
    for panel in ("Pruning", "Training after the change", "Quantization", "Output"):
        assert panel in shown.stdout
    assert all(f"{name}:" in shown.stdout for name in strategy_names())
    assert "--prune-method" not in shown.stdout and "--teacher" not in shown.stdout  # old spellings, hidden


class _Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(2 * width)
        self.conv2, self.bn2 = torch.nn.Conv2d(2 * width, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class _TinyResNet(torch.nn.Module):
    """Three residual blocks of 16 channels (32 inside): a third of the MACs each."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU())
        self.blocks = torch.nn.Sequential(*[_Block(16) for _ in range(3)])
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("strategy", strategy_names())
def test_every_registered_strategy_reaches_the_target_and_the_pruned_model_runs(strategy):
    torch.manual_seed(0)
    model = _TinyResNet().eval()
    example = torch.zeros(1, 3, 16, 16)
    pruned, cut = prune_structured(model, example, PruneTarget(0.4), strategy)
    assert cut.macs_removed >= 0.4 and cut.strategy in {c.name for c in CUTS}
    assert cut.droppable_blocks == 3 and (strategy in ("depth", "fastest")) == bool(cut.block_ranking)
    if strategy == "depth":  # a third of the MACs in one block: one goes whole, channels make up the rest
        assert len(cut.blocks_dropped) == 1 and cut.blocks_dropped[0] == cut.block_ranking[0].name
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_uniform_pruning_rounds_wide_layers_to_the_nearest_eight_and_narrow_ones_down():
    from torch import nn

    from bmc.compress.prune.channels import ChannelRequest, plan_channels
    from bmc.compress.prune.graph import pruned_copy
    from bmc.compress.prune.strategies import UNIFORM

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 100), nn.ReLU(), nn.Linear(100, 10)).eval()
    example = torch.randn(1, 16)
    plan = plan_channels(model, example, ChannelRequest(0.3, 8, UNIFORM))
    pruned = pruned_copy(model, example, plan.cuts)
    # 70% of 12 is 8.4: down to 8; 70% of 100 is 70: to the nearest eight, 72 (down would be 64).
    assert [m.out_features for m in pruned if isinstance(m, nn.Linear)] == [8, 72, 10] and plan.left_dense == ["4"]
    with torch.no_grad():
        assert pruned(torch.randn(3, 16)).shape == (3, 10)


def test_block_internal_pruning_keeps_the_residual_streams_and_rounds_to_eights():
    from bmc.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", (3, 32, 32), 10).eval()
    example = torch.randn(4, 3, 32, 32)
    pruned, cut = prune_structured(model, example[:1], PruneTarget(0.5), "block-internal")
    assert cut.strategy == "block-internal channels only" and cut.macs_removed >= 0.5
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


@slow
def test_a_parameter_target_cuts_the_channels_that_hold_the_most_parameters():
    from bmc.compress.prune.measure import count_macs_and_params
    from bmc.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", (3, 32, 32), 10).eval()
    example = torch.zeros(1, 3, 32, 32)
    _, macs_only = prune_structured(model, example, PruneTarget(0.3), "block-internal")
    pruned, both = prune_structured(model, example, PruneTarget(0.3, params=0.6), "block-internal")
    macs, params = count_macs_and_params(pruned, example)
    assert macs_only.macs_removed >= 0.3 and macs_only.params_removed < 0.6
    assert 1 - macs / both.macs_before >= 0.3 and 1 - params / both.params_before >= 0.6
    widths = {name: m.out_channels for name, m in pruned.named_modules() if name.endswith(".conv1")}
    # One stage-3 channel inside a block holds 4x the parameters of a stage-1 one (64 against 16
    # inputs and outputs, 3x3): the last stage loses the most of its width, the first the least.
    kept = {stage: min(w for name, w in widths.items() if int(name.split(".")[1]) // 3 == stage) / (16 << stage) for stage in range(3)}
    assert kept[2] < kept[1] < kept[0] and all(w % 8 == 0 for w in widths.values())
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_residual_blocks_are_found_by_tracing_and_dropping_one_equals_zeroing_its_branch():
    import torchvision

    from bmc.compress.prune.blocks import residual_blocks
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


class _SlowBlock:
    """A target where one residual block's kernels take 100x the others' time (all, where given none)."""

    def __init__(self, slow_block: str | None, unplaced: str | None = None):
        self.slow_block, self.unplaced = slow_block, unplaced

    def latency_ms(self, model):
        return {1: 1.0}

    def scope_times_ms(self, model, scopes):
        return {name: 100.0 if self.slow_block in (None, name) else 1.0 for name in scopes if name != self.unplaced}


@slow
def test_depth_pruning_drops_the_blocks_that_cost_least_per_millisecond_they_save():
    from bmc.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", input_shape=(3, 32, 32), num_classes=10).eval()
    for module in model.modules():  # resnet20 starts each residual branch at zero: give every block a say
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    example = torch.zeros(1, 3, 32, 32)
    _, by_macs = prune_structured(model, example, PruneTarget(0.2), "depth")
    most_moving = by_macs.block_ranking[-1]  # the block whose loss moves the predictions most
    # The same model where that block's kernels take 100x the time of the others: it goes first.
    _, by_time = prune_structured(model, example, PruneTarget(0.2), "depth", probe=_SlowBlock(most_moving.name))
    assert most_moving.name in by_time.blocks_dropped and by_time.block_ranking[0] == dataclasses.replace(most_moving, time_ms=100.0)
    assert most_moving.name not in by_macs.blocks_dropped and all(r.time_ms is None for r in by_macs.block_ranking)
    # A block the profile could not place is not taken for free: the ranking falls back to MACs.
    _, fallback = prune_structured(model, example, PruneTarget(0.2), "depth", probe=_SlowBlock(None, unplaced=most_moving.name))
    assert fallback.blocks_dropped == by_macs.blocks_dropped and fallback.block_ranking[0].time_ms is None


def test_profiled_kernel_times_fall_under_each_residual_blocks_scope(workdir):
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


@slow
def test_a_cut_torch_pruning_cannot_make_gives_way_to_the_next_and_none_at_all_is_one_clear_error():
    import torchvision

    torch.manual_seed(0)
    example = torch.randn(1, 3, 64, 64)
    # regnet's grouped convolutions defeat block-internal rounding but not uniform pruning.
    regnet = torchvision.models.regnet_x_400mf(num_classes=10).eval()
    pruned, cut = prune_structured(regnet, example, PruneTarget(0.5), "block-internal")
    assert cut.strategy == "uniform" and cut.macs_removed >= 0.5
    assert cut.strategies_failed["block-internal channels only"].startswith("structured pruning failed on this architecture")
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

    with pytest.raises(BmcError, match="no channel could go.*every strategy.*--sparsity") as caught:
        prune_structured(Shuffled().eval(), example, PruneTarget(0.5))
    assert "\n" not in str(caught.value)


@slow
def test_shufflenet_is_pruned_inside_its_blocks_where_its_channel_shuffle_breaks_the_models_graph():
    import torchvision

    from bmc.compress.prune.strategies import PARTS

    torch.manual_seed(0)
    example = torch.randn(2, 3, 64, 64)
    model = torchvision.models.shufflenet_v2_x1_0(num_classes=10).eval()
    blocks = {name: block for name, block in model.named_modules() if type(block).__name__ == "InvertedResidual"}
    widths = {name: block.branch2[-3].out_channels for name, block in blocks.items()}
    pruned, cut = prune_structured(model, example[:1], PruneTarget(0.5))
    # Torch-Pruning fails with ZeroDivisionError on the whole model; then one graph per block.
    assert cut.strategy == PARTS.name and "ZeroDivisionError" in cut.strategies_failed["uniform"]
    assert cut.macs_removed >= 0.5 and cut.left_dense == ["fc"]
    for name, width in widths.items():
        branch = pruned.get_submodule(name).branch2
        assert branch[-3].out_channels == width  # each block's outputs keep their width: the shuffle needs them
        assert branch[0].out_channels < branch[-3].in_channels + 1 and branch[0].out_channels % 8 == 0
        assert branch[0].out_channels < model.get_submodule(name).branch2[0].out_channels
    with torch.no_grad():
        assert pruned(example).shape == (2, 10)


# ---- notes ------------------------------------------------------------------------------------------


def test_pruning_that_costs_more_than_the_budget_says_so():
    before, after = Metrics(accuracy=0.98), Metrics(accuracy=0.805)
    assert pruning_cost(before, after, 1.0) == [
        "pruning cost 17.50 points of test accuracy, more than the 1-point budget (--max-accuracy-drop): "
        "fine-tune longer (--finetune-epochs) or prune less"
    ]
    assert pruning_cost(before, after, 20.0) == []
    assert pruning_cost(Metrics(r2=0.098), Metrics(r2=-0.19), 1.0) == [
        "pruning lowered the test R² from 0.098 to -0.190: fine-tune longer (--finetune-epochs) or prune less"
    ]


def test_the_no_speed_note_points_to_depth_pruning_only_where_blocks_could_go():
    def row(b1, b32, accuracy, size, path=""):
        return SummaryRow("s", Path(path), "int8", "cpu", 1, size, size, 0.0, accuracy, {1: b1, 32: b32}, 1.0, {}, None)

    def cut(droppable, dropped=()):
        return PruneOutcome("uniform", 2, 1, 2, 1, 0.3, [], 8, droppable_blocks=droppable, blocks_dropped=list(dropped))

    unpruned, pruned = row(0.275, 4.99, 0.8658, 1_000_000, "u.onnx"), row(0.295, 4.80, 0.8552, 470_000)
    (note,) = pruning_paid_off(pruned, unpruned, cut(7))
    assert note.startswith("pruning bought no speed over int8 alone (batch 1: 0.295 against 0.275 ms) and cost 1.06 points")
    assert "--prune-strategy depth" in note and "7 of this model's" in note and "u.onnx" in note
    (note,) = pruning_paid_off(pruned, unpruned, cut(0))
    assert "depth" not in note
    (note,) = pruning_paid_off(pruned, unpruned, cut(7, ["layers.4"]))
    assert "depth" not in note
    assert pruning_paid_off(row(0.2, 3.0, 0.85, 470_000), unpruned, cut(7)) == []


# ---- training after the change: fine-tuning, students, QAT ------------------------------------------


def test_fake_quant_layers_keep_the_state_dict_and_simulate_int8():
    from bmc.compress.qat import WEIGHT_QMAX, enable_fake_quant, fake_quant_weight
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
    levels = (fake_quant_weight(weight) / (weight.abs().amax(dim=(1, 2, 3), keepdim=True) / WEIGHT_QMAX)).detach()
    assert torch.allclose(levels, levels.round(), atol=1e-3) and levels.abs().max() <= WEIGHT_QMAX + 1


@slow
def test_pruning_with_no_fine_tuning_saves_the_pruned_model_untouched_and_fine_tuning_recovers_accuracy(workdir):
    from bmc.checkpoint import load_model

    original = train(TrainConfig())
    untuned = compress(CompressConfig(prune=0.5, finetune_epochs=0, quantize="none", out=workdir / "untuned"))
    model, meta = load_model(workdir / "untuned" / "pruned-run")
    # Not one step: even BatchNorm's running statistics are those of the pruned copy.
    source, _ = load_model(original.run_dir)
    expected, _ = prune_structured(source, torch.zeros(1, 1, 8, 8), PruneTarget(0.5), "depth")
    assert model.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(model.state_dict()[k], expected.state_dict()[k]) for k in expected.state_dict())
    assert meta["completed_epochs"] == 0 and _stage(untuned, PruneResult).finetune.epochs == 0

    report = compress(CompressConfig(prune=0.5, quantize="none"))
    prune = _stage(report, PruneResult)
    assert prune.macs_removed >= 0.5 and prune.cut.left_dense == ["classifier.5"]
    assert prune.finetune.distilled and prune.finetune.epochs == dataset_recipe("digits").finetune_epochs
    assert (workdir / "runs" / "latest").resolve() == original.run_dir.resolve()  # fine-tuning does not move latest
    pruned_dir = workdir / "runs" / "latest" / "compressed" / "pruned-run"
    model, meta = load_model(pruned_dir)  # from safetensors, layers shrunk to the saved shapes
    assert meta["model"]["pruned"] and model.features[0].out_channels < 6 and meta["config"]["out"] == str(pruned_dir.resolve())
    assert report.result.resolve() == (pruned_dir / "model.onnx").resolve()
    assert prune.finetune.metrics.accuracy > _stage(untuned, PruneResult).finetune.metrics.accuracy
    # The closing summary measures the original and the pruned model together.
    original_row, pruned_row = report.summary
    assert (original_row.stage, pruned_row.stage) == ("original", "pruned + kd")
    assert pruned_row.parameters < original_row.parameters and pruned_row.size_ratio > 1.5
    assert abs(pruned_row.accuracy - prune.finetune.metrics.accuracy) < 1e-5 and set(pruned_row.speedup) == {1, 32}


@slow
def test_pruned_int8_is_compared_with_int8_alone_and_the_note_says_when_pruning_bought_no_speed(workdir):
    original = train(TrainConfig(epochs=5))
    report = compress(CompressConfig(prune=0.5, finetune_epochs=2, quantization=ANY_SPEED))
    assert [row.stage for row in report.summary] == ["original", "pruned + kd", "int8", "int8, not pruned"]
    result, unpruned = report.summary[-2:]
    reference = original.run_dir / "compressed" / "model-int8-unpruned.onnx"
    assert unpruned.path.resolve() == reference.resolve() and Path(f"{reference}.sha256").read_text().split()[0] == sha256_file(reference)
    # Same recipe on both: the unpruned int8 model keeps every channel, in the same format.
    assert unpruned.parameters > result.parameters and unpruned.format == result.format and unpruned.size_bytes > result.size_bytes
    assert not (original.run_dir / "compressed" / ".model-int8-unpruned").exists()
    no_gain = any(ms >= unpruned.latency_ms[b] for b, ms in result.latency_ms.items())
    assert no_gain == any(note.startswith("pruning bought no speed over int8 alone") for note in report.notes)
    written = json.loads((original.run_dir / "compressed" / "compress_report.json").read_text())
    assert written["notes"] == list(report.notes)


@slow
def test_gradual_pruning_reaches_the_target_in_steps(workdir):
    from bmc.checkpoint import load_model

    train(TrainConfig(epochs=5))
    report = compress(CompressConfig(prune=0.5, prune_iterations=3, finetune_epochs=8, quantize="none"))
    prune = _stage(report, PruneResult)
    assert [s.step for s in prune.steps] == [1, 2, 3] and [s.finetune_epochs for s in prune.steps] == [3, 3, 2]
    removed = [s.macs_removed for s in prune.steps]
    # Each step reaches its share of the target, and the last one the target.
    assert all(r >= 0.5 * k / 3 for k, r in enumerate(removed, start=1)) and removed == sorted(removed)
    assert prune.macs_removed == removed[-1] >= 0.5 and prune.finetune.epochs == 8
    assert prune.finetune.metrics == prune.steps[-1].metrics
    compressed = workdir / "runs" / "latest" / "compressed"
    assert sorted(p.name for p in compressed.iterdir() if p.name.startswith("pruned")) == ["pruned-run"]
    assert load_model(compressed / "pruned-run")[1]["model"]["pruned"]


@slow
def test_sparsity_zeroes_weights_and_says_it_does_not_speed_up(workdir):
    from bmc.checkpoint import load_model

    train(TrainConfig(epochs=5))
    for epochs in (0, 1):
        report = compress(CompressConfig(sparsity=0.5, quantize="none", finetune_epochs=epochs, out=Path(f"c{epochs}")))
        sparse = _stage(report, SparsityResult)
        assert 0.49 <= sparse.weights_zeroed <= 0.51 and sparse.finetune.epochs == epochs
        # Fine-tuning keeps the zeros: the saved model is as sparse as the report says, layer by layer.
        model, _ = load_model(Path(f"c{epochs}") / "pruned-run")
        weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        assert 0.49 <= sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights) <= 0.51
        assert all((w == 0).any() for w in weights)
        assert report.summary[1].weight_sparsity >= 0.49


@slow
def test_a_transformer_keeps_its_model_width_and_loses_feed_forward_channels_so_the_pruned_run_loads(workdir, capfd):
    from bmc.checkpoint import load_model

    train(TrainConfig(model="seed-transformer", model_args={"preset": "tiny"}, epochs=1))
    report = compress(CompressConfig(prune=0.5, quantize="none", finetune_epochs=1))
    model, _ = load_model(report.out_dir / "pruned-run")  # failed before: LayerNorm and attention were cut
    original, _ = load_model(Path("runs/latest"))
    layers = {name: m for name, m in model.named_modules() if name.endswith("linear1")}
    assert layers and all(m.out_features < original.get_submodule(name).out_features for name, m in layers.items())
    assert all(m.normalized_shape == original.get_submodule(n).normalized_shape for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm))
    assert 0 < _stage(report, PruneResult).macs_removed < 0.5 and any("not the 50% asked" in note for note in report.notes)
    assert "Torch-Pruning" not in capfd.readouterr().err


@slow
def test_the_fastest_strategy_keeps_the_cut_with_the_lowest_measured_latency(workdir):
    train(TrainConfig(model="resnet20", data=DataConfig(name="synthetic"), epochs=1))
    report = compress(CompressConfig(prune=0.5, prune_strategy="fastest", quantize="none", finetune_epochs=1))
    cut = _stage(report, PruneResult).cut
    timed = cut.candidate_latency_ms
    assert len(timed) >= 2 and cut.strategy in timed
    product = {name: times[1] * times[32] for name, times in timed.items()}
    assert cut.strategy == min(product, key=product.get)


@slow
def test_depth_pruning_drops_whole_blocks_and_the_pruned_run_reloads_without_them(workdir):
    from bmc.checkpoint import load_model
    from bmc.compress.prune.blocks import residual_blocks
    from bmc.models.blocks import DroppedBlock

    train(TrainConfig(model="resnet20", data=DataConfig(name="synthetic"), epochs=1))
    result = run_bmc("compress", "--prune", "0.5", "--prune-strategy", "depth", "--quantize", "none", "--finetune-epochs", "1",
                     "--finetune-lr", "0.03", cwd=workdir)
    assert result.returncode == 0, result.stderr
    report = json.loads((workdir / "runs" / "latest" / "compressed" / "compress_report.json").read_text())
    prune = next(s for s in report["stages"] if s["stage"] == "prune")
    cut = prune["cut"]
    assert cut["strategy"].startswith("residual blocks dropped") and prune["macs_removed"] >= 0.5
    assert f"residual blocks dropped whole: {', '.join(cut['blocks_dropped'])}" in result.stdout
    # Each block is about a ninth of resnet20's MACs: up to four go whole, channels make up the rest.
    assert 1 <= len(cut["blocks_dropped"]) <= 4
    # Blocks go cheapest first, by their prediction shift per millisecond their kernels took in onnxruntime.
    ranking = cut["block_ranking"]
    assert len(ranking) == 7 and all(r["time_ms"] > 0 for r in ranking)
    assert {r["name"] for r in ranking[: len(cut["blocks_dropped"])]} == set(cut["blocks_dropped"])
    assert f"blocks ranked by prediction shift (KL) per ms they save, first dropped first: {ranking[0]['name']} " in result.stdout
    costs = [r["prediction_shift_kl"] / r["time_ms"] for r in ranking]
    assert costs == sorted(costs)
    model, meta = load_model(workdir / "runs" / "latest" / "compressed" / "pruned-run")
    assert [name for name, _ in meta["model"]["dropped_blocks"]] == cut["blocks_dropped"]
    assert meta["config"]["lr"] == 0.03 and meta["config"]["epochs"] == 1
    assert all(isinstance(model.get_submodule(name), DroppedBlock) for name in cut["blocks_dropped"])
    assert len(residual_blocks(model)) == 7 - len(cut["blocks_dropped"])
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@slow
def test_compress_says_so_when_less_than_the_asked_fraction_of_macs_could_go(workdir):
    # shufflenet_v2_x0_5: only the channels inside each block can go, short of half the MACs.
    train(TrainConfig(model="torchvision:shufflenet_v2_x0_5", data=DataConfig(name="synthetic"), epochs=1))
    result = run_bmc("compress", "--prune", "0.5", "--prune-params", "0.9", "--quantize", "none", "--finetune-epochs", "0", cwd=workdir)
    assert result.returncode == 0, result.stderr
    report = json.loads((workdir / "runs" / "latest" / "compressed" / "compress_report.json").read_text())
    prune = next(s for s in report["stages"] if s["stage"] == "prune")
    assert prune["cut"]["strategy"].startswith("channels inside the parts") and prune["macs_removed"] < 0.495
    assert report["config"]["prune_params"] == 0.9 and report["config"]["quantization"]["calib_data"] == "synthetic"
    macs_note, params_note = [n for n in report["notes"] if n.startswith("pruning removed")]
    assert macs_note.startswith(f"pruning removed {prune['macs_removed']:.1%} of the MACs, not the 50% asked") and "fc" in macs_note
    assert params_note.startswith(f"pruning removed {prune['params_removed']:.1%} of the parameters, not the 90% asked")
    assert macs_note[:60] in result.stdout


@slow
def test_an_image_folder_run_is_calibrated_on_its_own_folder_without_being_told(workdir, cifar_slice):
    # The run records where its images live; calibration after pruning used to need --calib-data-dir
    # and failed only after the fine-tuning had run.
    train(TrainConfig(data=DataConfig(name="imagefolder", data_dir=cifar_slice), model="seed-cifar-cnn", epochs=2, batch_size=50))
    report = compress(CompressConfig(prune=0.3, quantize="int8", finetune_epochs=1, quantization=QUICK))
    quantized = _stage(report, QuantizeResult)
    assert quantized.candidates and quantized.baseline_accuracy is not None
    assert all(row.accuracy is not None for row in report.summary)


@slow
def test_teacher_distills_into_another_architecture(digits_onnx, workdir):
    report = compress(CompressConfig(student="seed-mlp", quantize="none", finetune_epochs=10))
    distilled = _stage(report, DistillResult)
    assert distilled.teacher_model == "seed-cifar-cnn" and distilled.student_model == "seed-mlp" and distilled.finetune.epochs == 10
    assert distilled.student_parameters < distilled.teacher_parameters
    assert distilled.finetune.metrics.accuracy > 0.5  # learned: ten classes, chance is 0.1
    meta = json.loads((report.result.parent / "bmc.json").read_text())
    assert meta["model"]["distilled"] and meta["config"]["model"] == "seed-mlp" and report.result.name == "model.onnx"
    assert [row.stage for row in report.summary] == ["original", "student seed-mlp"]


@slow
def test_quantization_aware_fine_tuning_then_measured_int8(workdir):
    train(TrainConfig(epochs=5))
    report = run_bmc("compress", "--quantize", "qat", "--finetune-epochs", "2", "--calib-samples", "64", "--json",
                     "--runtime", "onnxruntime", "--threads", "1", cwd=workdir)
    assert report.returncode == 0, report.stderr  # --quantize qat, QAT's spelling before --qat, still means it
    written = json.loads(report.stdout)
    # The run had no model.onnx yet: exported first, as every later stage measures against it.
    assert [s["stage"] for s in written["stages"]] == ["export", "qat"] and written["config"]["qat"] and written["config"]["quantize"] == "int8"
    qat = written["stages"][1]
    assert qat["finetune"]["epochs"] == 2 and qat["finetune"]["distilled"] and not qat["fallback"]
    # Judged against the model before fine-tuning: its accuracy is the baseline.
    assert abs(qat["quantized"]["baseline_accuracy"] - written["summary"][0]["accuracy"]) < 1e-9
    compressed = workdir / "runs" / "latest" / "compressed"
    assert not (compressed / "qat").exists() and (compressed / "qat-run" / "model.onnx").is_file()
    if qat["chosen"] is not None:  # kept only where measured faster on this CPU: both outcomes are valid here
        assert written["result"] == qat["chosen"] == str(compressed / "model-int8.onnx") == qat["quantized"]["chosen"]
        assert [row["stage"] for row in written["summary"]] == ["original", "qat"]
    else:
        assert written["result"].endswith("model.onnx") and not (compressed / "model-int8.onnx").exists()


@slow
def test_quantization_aware_fine_tuning_accepts_by_the_same_bar_as_int8(workdir):
    train(TrainConfig(epochs=5))
    report = compress(CompressConfig(qat=True, finetune_epochs=1, out=workdir / "c", quantization=ANY_SPEED))
    qat = _stage(report, QatResult)
    assert qat.chosen == workdir / "c" / "model-int8.onnx" and report.result == qat.chosen and qat.chosen.is_file()
    assert Path(qat.quantized.chosen) == qat.chosen and Path(f"{qat.chosen}.sha256").is_file()
    assert [row.stage for row in report.summary] == ["original", "qat"]


# ---- fp16 ---------------------------------------------------------------------------------------------


@slow
def test_fp16_is_kept_only_where_it_meets_the_speed_guarantee(digits_onnx, workdir):
    kept = compress(CompressConfig(quantize="fp16", out=workdir / "kept", quantization=dataclasses.replace(QUICK, min_speedup=1000)))
    half = _stage(kept, HalfResult)
    assert half.timed_on == "cpu" and not half.accepted and half.note.startswith("kept fp32") and half.path is None
    assert kept.result.resolve() == digits_onnx.resolve() and not (workdir / "kept" / "model-fp16.onnx").exists()
    assert half.max_abs_diff <= 5e-2 and set(half.speedup) == {1, 32} and half.accuracy_drop_points is not None

    taken = compress(CompressConfig(quantize="fp16", out=workdir / "taken", quantization=ANY_SPEED))
    half = _stage(taken, HalfResult)
    assert half.accepted and half.note.startswith("fp16 on cpu") and taken.result == half.path == workdir / "taken" / "model-fp16.onnx"
    assert half.path.is_file() and [row.stage for row in taken.summary] == ["original", "fp16"]


needs_no_gpu = pytest.mark.skipif(cuda_works(), reason="checks what happens where onnxruntime has no CUDA provider")


@needs_no_gpu
def test_target_cuda_defaults_to_fp16_and_says_it_was_not_timed_here(digits_onnx, workdir):
    report = compress(CompressConfig(target="cuda"))
    half = _stage(report, HalfResult)
    assert half.timed_on is None and half.accepted and "not timed" in half.note
    assert report.result.name == "model-fp16.onnx" and report.result.is_file()
    # bench without arguments compares the original with what compress wrote.
    result = run_bmc("bench", "--iters", "3", "--batch-sizes", "1", "--runtime", "onnxruntime", "--json", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert [m["name"] for m in json.loads(result.stdout)["models"]] == ["model.onnx", "model-fp16.onnx"]


# ---- the request: one-line errors, old spellings ---------------------------------------------------


def test_bad_requests_fail_with_one_line_before_any_work(workdir):
    model = workdir / "m.onnx"
    model.write_bytes(b"checked by name: refused before it is read")
    (workdir / "model.pt").write_bytes(b"")
    for config, message in (
        (dict(prune=1.2), r"prune must be in \[0, 0.95\]"),
        (dict(quantize="int3"), "quantize must be one of auto, none, int8, int8-dynamic, fp16; got 'int3'"),
        (dict(quantize="qat"), "quantization-aware training is a training method: --qat"),
        (dict(prune=0.5, prune_params=1.5), r"prune_params must be in \[0, 0.95\]"),
        (dict(prune_params=0.5), "--prune-params goes with structured pruning"),
        (dict(prune=0.5, sparsity=0.5), "--prune removes channels, --sparsity zeroes weights"),
        (dict(prune_iterations=3), "--prune-iterations goes with --prune"),
        (dict(prune=0.5, finetune_lr=-0.1), r"finetune_lr must be in \(0, 10\]; got -0.1"),
        (dict(qat=True, quantize="fp16"), "--qat fine-tunes for int8"),
        (dict(qat=True, finetune_epochs=0), "--finetune-epochs 0 leaves nothing to train"),
        (dict(target="cuda", quantize="int8"), "use --quantize fp16 for --target cuda"),
        (dict(student="seed-mlp", prune=0.5), "--student trains a new, smaller architecture"),
        (dict(student="no-such-net"), "unknown model 'no-such-net'"),
        (dict(source=model, prune=0.5), r"pruning \(--prune, --sparsity\) needs a bmc run directory"),
        (dict(source=model, quantize="fp16"), "fp16 .* needs a bmc run directory"),
        (dict(source=workdir / "model.pt"), "compress takes a run directory or an .onnx file"),
    ):
        with pytest.raises(UsageError, match=message):
            CompressConfig(**config)
    assert_one_line_error(run_bmc("compress", "--quantize", "int3", cwd=workdir), "quantize must be one of auto, none, int8, int8-dynamic, fp16; got 'int3'")


def test_the_old_spellings_still_mean_what_they_meant_or_say_what_replaced_them(workdir):
    model = workdir / "m.onnx"
    model.write_bytes(b"refused before it is read")
    # Each is refused for an ONNX file by the config's own check, which shows how the flag was read.
    for flags, fragment in (
        (["--quantize", "qat"], "quantization-aware fine-tuning (--qat) needs a bmc run directory"),
        (["--prune-method", "magnitude", "--prune", "0.5"], "pruning (--prune, --sparsity) needs a bmc run directory"),
        (["--prune-method", "taylor"], "--prune-method is gone: --prune removes channels, --sparsity zeroes weights"),
        (["--teacher", "runs/a", "runs/b"], "two teachers"),
    ):
        source = [] if "--teacher" in flags else [str(model)]
        assert_one_line_error(run_bmc("compress", *source, *flags, cwd=workdir), fragment)
