"""The int8 search over runtimes and settings: every file on every target, the choice per batch
size, and the choice travelling in the handed-over file's metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bmc.compress import QuantizeConfig
from bmc.compress.quantize.runtimes import FP32, choose_file, file_choices, onnxruntime_only, search_targets
from bmc.compress.quantize.search import SPEED_TIE, quantize_int8
from bmc.errors import UsageError
from bmc.export import ExportConfig, export
from bmc.manifest import manifest_of_files, read_manifest
from bmc.runtime.metadata import ModelMetadata
from bmc.runtime.model_file import open_model
from bmc.runtime.registry import available_runtimes
from bmc.runtime.target import Target
from bmc.train import TrainConfig, train

ORT = Target()
ORT_1 = Target(threads=1)
OV = Target("openvino") if "openvino" in available_runtimes() else Target(threads=2)  # a second target either way
OV_BF16 = Target("openvino", precision="bf16") if "openvino" in available_runtimes() else Target(threads=3)
SIZES = (1, 32)


@dataclass
class Pair:
    """What file_choices reads of a measured (file, target) pair."""

    recipe: str
    target: Target
    speedup: dict[int, float]
    accuracy_drop_points: float | None = 0.0
    size_bytes: int = 100
    extra: dict = field(default_factory=dict)


def _choices(pairs, max_drop=1.0, min_speedup=1.0):
    return {c.label: c for c in file_choices(pairs, SIZES, max_drop, min_speedup, ORT, 400, SPEED_TIE)}


def test_each_batch_size_runs_on_the_fastest_pair_of_the_file_within_the_accuracy_budget():
    pairs = [
        Pair("QDQ", ORT, {1: 1.45, 32: 1.90}),
        Pair("QDQ", OV, {1: 1.26, 32: 5.16}),
        Pair("QDQ", OV_BF16, {1: 1.30, 32: 6.00}, accuracy_drop_points=2.5),  # faster, over the 1-point budget
    ]
    qdq = _choices(pairs)["QDQ"]
    assert qdq.targets == {1: ORT, 32: OV} and qdq.speedup == {1: 1.45, 32: 5.16}
    assert _choices(pairs, max_drop=3.0)["QDQ"].targets == {1: ORT, 32: OV_BF16}


def test_a_later_target_takes_a_batch_size_only_when_faster_than_timing_noise():
    pairs = [Pair("QDQ", ORT, {1: 1.50, 32: 2.00}), Pair("QDQ", OV, {1: 1.52, 32: 2.40})]
    assert _choices(pairs)["QDQ"].targets == {1: ORT, 32: OV}  # 1.3% is noise; 20% is not


def test_a_file_slower_than_the_guarantee_at_some_batch_size_on_every_target_is_no_choice():
    pairs = [Pair("QOperator", ORT, {1: 0.8, 32: 1.9}), Pair("QOperator", OV, {}, accuracy_drop_points=None)]  # OV could not open it
    choices = _choices(pairs)
    assert "QOperator" not in choices and set(choices) == {FP32}
    assert choose_file(list(choices.values()), SPEED_TIE, ORT).targets == {1: ORT, 32: ORT}  # fp32 as it was


def test_fp32_on_a_faster_runtime_beats_a_slower_int8_and_fp32_as_it_was_is_the_last_resort():
    pairs = [
        Pair(FP32, OV_BF16, {1: 2.28, 32: 4.75}, accuracy_drop_points=0.0, size_bytes=400),
        Pair("dynamic", ORT, {1: 2.51, 32: 3.54}, accuracy_drop_points=0.3, size_bytes=110),
    ]
    chosen = choose_file(list(_choices(pairs).values()), SPEED_TIE, ORT)
    assert chosen.label == FP32 and chosen.targets == {1: OV_BF16, 32: OV_BF16}
    # Within timing noise of each other, the smaller file wins.
    close = [Pair(FP32, OV_BF16, {1: 2.50, 32: 3.55}, size_bytes=400), Pair("dynamic", ORT, {1: 2.51, 32: 3.54}, size_bytes=110)]
    assert choose_file(list(_choices(close).values()), SPEED_TIE, ORT).label == "dynamic"
    # A min_speedup no pair meets leaves fp32 on onnxruntime everywhere.
    assert choose_file(list(_choices(pairs, min_speedup=10).values()), SPEED_TIE, ORT).targets == {1: ORT, 32: ORT}


def test_the_best_on_onnxruntime_defaults_alone_ignores_other_runtimes_and_settings():
    pairs = [
        Pair("QDQ", ORT, {1: 1.45, 32: 1.90}),
        Pair("QDQ", OV, {1: 1.26, 32: 5.16}),
        Pair("QOperator", ORT, {1: 1.50, 32: 0.9}),  # slower than fp32 at 32: not what onnxruntime alone would hand over
        Pair("QDQ", ORT_1, {1: 1.9, 32: 1.0}),
    ]
    assert onnxruntime_only(pairs, SIZES, 1.0, ORT) == {1: 1.45, 32: 1.90}


def test_the_targets_searched_start_with_the_baseline_and_add_one_thread_only_when_threads_are_free():
    targets = search_targets(None)
    assert targets[0] == ORT and ORT_1 in targets and len(set(targets)) == len(targets)
    assert {t.runtime for t in targets} == set(available_runtimes("cpu"))
    assert search_targets(("onnxruntime",), threads=2) == (Target(threads=2),)
    with pytest.raises(UsageError, match="unknown runtime 'tvm'"):
        QuantizeConfig(runtimes=("tvm",))


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits-runtimes")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("BMC_CACHE_DIR", str(root / "cache"))
        train(TrainConfig(epochs=2))
        export(ExportConfig())
    return (root / "runs" / "latest" / "model.onnx").resolve()


def test_every_recipe_is_timed_on_every_target_and_the_choice_travels_in_the_file(digits_onnx, tmp_path):
    config = QuantizeConfig(calib_samples=64, seconds_per_timing=0.2, min_speedup=0.01, max_accuracy_drop_points=100)
    result = quantize_int8(digits_onnx, tmp_path / "q", config)
    targets = result.targets_searched
    assert targets[0] == ORT and len(targets) >= 2
    recipes = [r for r in dict.fromkeys(c.recipe for c in result.candidates) if r != FP32]
    assert recipes
    pairs = {(c.recipe, c.target) for c in result.candidates}
    assert pairs == {(r, t) for r in recipes for t in targets} | {(FP32, t) for t in targets[1:]}
    for candidate in result.candidates:  # every pair ran and was scored, or says why not
        assert (candidate.accuracy is not None and set(candidate.speedup) == set(SIZES)) or "cannot run it" in candidate.reason

    # Every int8 pair meets min_speedup 0.01, so a file is handed over: an int8 one, or fp32 where
    # another target runs it faster than the int8 files run anywhere.
    assert result.chosen is not None and result.chosen_recipe in [*recipes, FP32]
    chosen = Path(result.chosen)
    written = ModelMetadata.from_props(open_model(chosen).metadata_props)
    assert written.runtime_targets == result.runtime_targets and set(written.runtime_targets) == set(SIZES)
    for batch_size, target in result.runtime_targets.items():  # each is the pair marked chosen for it
        marked = [(c.recipe, c.target) for c in result.candidates if batch_size in c.chosen_for]
        as_it_was = result.chosen_recipe == FP32 and target == ORT  # the baseline itself: no candidate pair
        assert marked == ([] if as_it_was else [(result.chosen_recipe, target)])
    assert read_manifest(chosen) == manifest_of_files(chosen)  # the manifest covers what was written


@pytest.mark.skipif("openvino" not in available_runtimes(), reason="needs the openvino package (pip install 'bmc[openvino]')")
def test_openvino_runs_the_qdq_file_with_its_accuracy_measured(digits_onnx, tmp_path):
    config = QuantizeConfig(calib_samples=64, seconds_per_timing=0.2, runtimes=("openvino",), threads=1, min_speedup=0.01,
                            max_accuracy_drop_points=100)
    result = quantize_int8(digits_onnx, tmp_path / "q", config)
    qdq = [c for c in result.candidates if c.recipe.startswith("QDQ") and c.target.runtime == "openvino"]
    assert qdq and all(c.accuracy is not None and c.accuracy_drop_points < 5 for c in qdq)
    # The fp32 file under OpenVINO's bf16 hint changes numerics: its accuracy is measured, not assumed.
    if any(t.precision == "bf16" for t in result.targets_searched):
        bf16 = next(c for c in result.candidates if c.recipe == FP32 and c.target.precision == "bf16")
        assert bf16.accuracy is not None
