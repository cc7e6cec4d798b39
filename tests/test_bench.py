"""bmc bench and bmc info MODEL.onnx: real exported models, real onnxruntime sessions, the real CLI."""

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from bmc.bench import BenchConfig, bench, bench_rounds, describe_model
from bmc.runtime.preprocess import EVAL_BATCH, bilinear_resize, eval_batch_size
from bmc.runtime.sessions import cuda_works
from bmc.data import DataConfig
from bmc.errors import UsageError
from bmc.export import ExportConfig, export
from bmc.train import TrainConfig, train
from conftest import assert_one_line_error, run_bmc
from onnx_mutants import mutants, run_case

needs_cuda = pytest.mark.skipif(not cuda_works(), reason="needs a CUDA GPU that onnxruntime's CUDA provider really runs on")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Random-weight models exported by bmc: two 8x8 digit-sized nets, a static-batch one, a 3x32x32 one."""
    folder = tmp_path_factory.mktemp("models")
    small = dict(input_size=8, input_channels=1, num_classes=10)
    return {
        "mlp": export(ExportConfig(model="seed-mlp", out=folder / "mlp.onnx", **small)).path,
        "cnn": export(ExportConfig(model="seed-cifar-cnn", out=folder / "cnn.onnx", **small)).path,
        "static": export(ExportConfig(model="seed-mlp", out=folder / "static.onnx", dynamic_batch=False, **small)).path,
        "cifar": export(ExportConfig(model="seed-cifar-cnn", input_size=32, num_classes=10, out=folder / "cifar.onnx")).path,
    }


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A folder holding runs/latest: seed-cifar-cnn trained on digits in fp32, exported to model.onnx."""
    folder = tmp_path_factory.mktemp("digits_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("BMC_CACHE_DIR", str(folder / "cache"))
        # fp32 evaluation: bf16 autocast (the CPU default) rounds logits that onnxruntime keeps in fp32.
        train(TrainConfig(epochs=3, precision="fp32"))
        export(ExportConfig())
    return folder


def test_two_models_side_by_side_with_ratios_against_the_first(models):
    report = bench([models["mlp"], models["cnn"]], BenchConfig(batch_sizes=(1, 4), iters=20, warmup=2, threads=1))
    mlp, cnn = report.models
    assert [m.name for m in report.models] == ["mlp.onnx", "cnn.onnx"]
    assert mlp.facts.parameters == 8 * 8 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    assert mlp.facts.numeric_format == "fp32" and mlp.facts.opset == 17 and mlp.facts.operators["Gemm"] == 3
    assert cnn.facts.operators["Conv"] == 2 and mlp.device == "cpu" and mlp.providers == ("CPUExecutionProvider",)
    for model in report.models:
        for timing in model.timings:
            assert timing.iterations == 20
            assert 0 < timing.latency_ms_median <= timing.latency_ms_p90 <= timing.latency_ms_p99
            assert timing.throughput_samples_per_s == pytest.approx(timing.batch_size * 20 / timing.elapsed_s)
    for batch_size in (1, 4):
        assert report.speedup(0, batch_size) == 1.0
        expected = mlp.timing(batch_size).latency_ms_median / cnn.timing(batch_size).latency_ms_median
        assert report.speedup(1, batch_size) == pytest.approx(expected)
    assert report.size_reduction(1) == pytest.approx(mlp.facts.size_bytes / cnn.facts.size_bytes)
    assert mlp.facts.size_bytes == models["mlp"].stat().st_size and 0 < mlp.facts.gzip_bytes < mlp.facts.size_bytes
    assert report.accuracy_change(1) is None  # no --data, no accuracy


def test_rounds_keep_each_models_fastest_round_and_the_accuracy_of_the_first(digits_run, tmp_path):
    onnx_path = digits_run / "runs" / "latest" / "model.onnx"
    result = run_bmc("bench", str(onnx_path), str(onnx_path), "--rounds", "3", "--iters", "30", "--data", "digits", "--json", cwd=digits_run)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["config"]["rounds"] == 3
    single = bench([onnx_path], BenchConfig(batch_sizes=(1, 32), iters=30, data="digits"))
    for model in report["models"]:
        assert model["quality"]["accuracy"] == single.models[0].quality.accuracy
        assert [t["batch_size"] for t in model["timings"]] == [1, 32] and all(t["iterations"] == 30 for t in model["timings"])
    rounds, fastest = bench_rounds([onnx_path, onnx_path], BenchConfig(batch_sizes=(1,), iters=30), 4)
    assert rounds.config["rounds"] == 4
    assert fastest == [{1: model.timing(1).latency_ms_median} for model in rounds.models]


def test_digits_accuracy_equals_pytorch_and_the_cli_defaults_to_runs_latest(digits_run):
    meta = json.loads((digits_run / "runs" / "latest" / "bmc.json").read_text())
    pytorch_accuracy = meta["history"][-1]["test_accuracy"]
    result = run_bmc("bench", "--data", "digits", "--iters", "3", "--batch-sizes", "1", "--runtime", "onnxruntime", "--json", cwd=digits_run)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    (model,) = report["models"]
    assert Path(model["path"]).name == "model.onnx"
    assert model["quality"]["dataset"] == "digits" and model["quality"]["samples"] == meta["data"]["test_samples"]
    assert abs(model["quality"]["accuracy"] - pytorch_accuracy) <= 0.001
    assert model["accuracy_change_vs_first"] == 0.0


def test_a_static_batch_model_skips_other_batch_sizes_and_still_scores_every_sample(digits_run):
    run_dir = digits_run / "runs" / "latest"
    static = export(ExportConfig(run_dir=run_dir, dynamic_batch=False, out=digits_run / "static.onnx")).path
    report = bench([run_dir / "model.onnx", static], BenchConfig(batch_sizes=(1, 32), iters=3, data="digits"))
    dynamic, fixed = report.models
    assert [t.batch_size for t in fixed.timings] == [1]
    assert fixed.skipped == ((32, "the model's batch axis is fixed at 1"),)
    assert fixed.quality.samples == dynamic.quality.samples == 360
    assert fixed.quality.accuracy == dynamic.quality.accuracy
    assert report.accuracy_change(1) == 0.0 and report.speedup(1, 32) is None


def test_regression_reports_mse_and_r2_equal_to_pytorch(tmp_path, monkeypatch):
    monkeypatch.setenv("BMC_CACHE_DIR", str(tmp_path / "cache"))
    run = train(TrainConfig(data=DataConfig(name="diabetes"), model="seed-linear", epochs=20, precision="fp32", out=tmp_path / "run"))
    path = export(ExportConfig(run_dir=run.run_dir)).path
    (model,) = bench([path], BenchConfig(batch_sizes=(1,), iters=2, data="diabetes")).models
    last = run.meta["history"][-1]
    assert model.quality.accuracy is None
    assert model.quality.mse == pytest.approx(last["test_mse"], abs=1e-3)
    assert model.quality.r2 == pytest.approx(last["test_r2"], abs=1e-5)


def test_bench_and_info_work_where_importing_torch_fails(digits_run, tmp_path):
    for name in ("torch", "torchvision"):
        (tmp_path / "blocked" / name).mkdir(parents=True)
        (tmp_path / "blocked" / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "blocked"), os.environ.get("PYTHONPATH", "")])}
    model = str(digits_run / "runs" / "latest" / "model.onnx")
    script = textwrap.dedent(
        f"""
        import pkgutil, sys
        import bmc.runtime
        for module in pkgutil.iter_modules(bmc.runtime.__path__):
            __import__("bmc.runtime." + module.name)
        from bmc.bench import BenchConfig, bench
        report = bench([{model!r}], BenchConfig(batch_sizes=(1, 8), iters=5, data="digits"))
        assert not any(m == "torch" or m.startswith(("torch.", "torchvision")) for m in sys.modules), "torch was imported"
        print(report.models[0].quality.accuracy, len(report.models[0].timings))
        """
    )
    direct = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert direct.returncode == 0, direct.stderr
    accuracy, timings = direct.stdout.split()
    meta = json.loads((digits_run / "runs" / "latest" / "bmc.json").read_text())
    assert abs(float(accuracy) - meta["history"][-1]["test_accuracy"]) <= 0.001 and timings == "2"

    cli = run_bmc("bench", model, "--iters", "5", cwd=tmp_path, env=env)
    assert cli.returncode == 0, cli.stderr
    assert "model.onnx" in cli.stdout and "batch 32" in cli.stdout
    info = run_bmc("info", model, cwd=tmp_path, env=env)
    assert info.returncode == 0 and "parameters 21,386" in info.stdout, info.stderr


def test_json_csv_and_markdown_outputs_parse(models, tmp_path):
    result = run_bmc(
        "bench", str(models["mlp"]), str(models["cnn"]), "--iters", "3", "--batch-sizes", "1,2,4", "--runtime", "onnxruntime",
        "--json", "--csv", "out/r.csv", "--markdown", "out/r.md", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["batch_sizes"] == [1, 2, 4] and [m["name"] for m in report["models"]] == ["mlp.onnx", "cnn.onnx"]
    assert report["environment"]["cpu"]["logical_cores"] >= 1 and report["config"]["iters"] == 3

    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "r.csv").read_text())))
    assert [(r["model"], int(r["batch_size"])) for r in rows] == [(m, b) for m in ("mlp.onnx", "cnn.onnx") for b in (1, 2, 4)]
    by_json = {(m["name"], t["batch_size"]): t for m in report["models"] for t in m["timings"]}
    for row in rows:
        assert int(row["iterations"]) == 3 and float(row["latency_ms_median"]) > 0
        assert float(row["speedup_vs_first"]) == pytest.approx(by_json[(row["model"], int(row["batch_size"]))]["speedup_vs_first"])

    lines = (tmp_path / "out" / "r.md").read_text().splitlines()
    assert lines[0] == "|  | mlp.onnx | cnn.onnx |" and lines[1] == "|---|---|---|"
    cells = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert all(line.count("|") == 4 for line in lines)
    assert "batch 4 speed-up" in cells and "size reduction" in cells and "1.00×" in cells["size reduction"]


def test_plot_writes_a_png_or_says_matplotlib_is_missing(models, tmp_path):
    result = run_bmc("bench", str(models["mlp"]), str(models["cnn"]), "--iters", "2", "--plot", "p.png", cwd=tmp_path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert result.returncode == 1
        assert_one_line_error(result, "--plot needs matplotlib")
        assert not (tmp_path / "p.png").exists()
        return
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_info_describes_an_onnx_file(models, tmp_path):
    text = run_bmc("info", str(models["cnn"]), cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "opset 17" in text.stdout and "fp32" in text.stdout and "Conv 2" in text.stdout
    assert "input  float32 [batch, 1, 8, 8]" in text.stdout and "model seed-cifar-cnn" in text.stdout
    described = json.loads(run_bmc("info", str(models["cnn"]), "--json", cwd=tmp_path).stdout)
    assert described == json.loads(json.dumps(describe_model(models["cnn"])))
    assert described["metadata"]["class_names"] == [f"class_{i}" for i in range(10)]


def _external_copy(source: Path, folder: Path) -> Path:
    """The model saved with its weights in model.onnx.data next to it, as bmc does for large models."""
    folder.mkdir(parents=True)
    proto = onnx.load(str(source))
    target = folder / "model.onnx"
    onnx.save_model(proto, str(target), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    return target


def _relocate_first(path: Path, location: str) -> str:
    proto = onnx.load(str(path), load_external_data=False)
    tensor = proto.graph.initializer[0]
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save_model(proto, str(path))
    return tensor.name


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("not-onnx", ["bad.onnx: not an ONNX model, or a truncated one"]),
        ("truncated", ["bad.onnx: not an ONNX model, or a truncated one"]),
        ("dotdot", ["points outside the model's folder", "'../secret.data'"]),
        ("sub-dotdot", ["points outside the model's folder", "'sub/../../secret.data'"]),
        ("absolute", ["is an absolute path"]),
        ("symlinked-file", ["goes through a symlinked file"]),
        ("symlinked-folder", ["goes through a symlinked folder"]),
        ("unfeedable", ["takes inputs of shape [3, 32, 32]", "data set digits has samples of shape [1, 8, 8]"]),
    ],
)
def test_bad_input_is_one_line_and_exit_1(models, tmp_path, case, fragments):
    model_dir = tmp_path / "m"
    extra: list[str] = []
    secret = tmp_path / "secret.data"
    if case in ("not-onnx", "truncated"):
        model_dir.mkdir()
        target = model_dir / "bad.onnx"
        whole = models["cnn"].read_bytes()
        target.write_bytes(b"\x00not an onnx file\xff" * 40 if case == "not-onnx" else whole[: len(whole) // 3])
    elif case == "unfeedable":
        target, extra = models["cifar"], ["--data", "digits"]
    else:
        target = _external_copy(models["mlp"], model_dir)
        secret.write_bytes((model_dir / "model.onnx.data").read_bytes())
        location = {
            "dotdot": "../secret.data",
            "sub-dotdot": "sub/../../secret.data",
            "absolute": str(secret),
            "symlinked-file": "linked.data",
            "symlinked-folder": "up/secret.data",
        }[case]
        (model_dir / "sub").mkdir()
        os.symlink(secret, model_dir / "linked.data")
        os.symlink(tmp_path, model_dir / "up")
        tensor = _relocate_first(target, location)
        fragments = [*fragments, f"tensor {tensor!r}"]
    for command in (["bench", str(target), "--iters", "2", *extra], ["info", str(target)]):
        if case == "unfeedable" and command[0] == "info":
            continue  # the file itself is fine
        result = run_bmc(*command, cwd=tmp_path)
        assert result.returncode == 1, (command, result.returncode, result.stderr)
        assert_one_line_error(result, *fragments)
        assert result.stdout == ""


def test_the_good_external_data_copy_benches(models, tmp_path):
    target = _external_copy(models["mlp"], tmp_path / "m")
    (model,) = bench([target], BenchConfig(batch_sizes=(2,), iters=3)).models
    assert model.facts.data_files == (str(tmp_path / "m" / "model.onnx.data"),)
    assert model.facts.size_bytes == target.stat().st_size + (tmp_path / "m" / "model.onnx.data").stat().st_size
    assert model.facts.parameters == describe_model(models["mlp"])["parameters"]


def test_no_models_and_no_runs_is_one_line(workdir):
    result = run_bmc("bench", cwd=workdir)
    assert result.returncode == 1
    assert_one_line_error(result, "no models given and runs/latest does not exist")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"batch_sizes": ()}, "batch_sizes must name at least one"),
        ({"batch_sizes": (0,)}, "batch sizes must be in [1, 65536]"),
        ({"batch_sizes": (4, 4)}, "batch sizes must differ"),
        ({"device": "tpu"}, "device must be one of cpu, cuda, auto"),
        ({"iters": 5, "seconds": 1.0}, "iters or seconds, not both"),
        ({"seconds": 0.0}, "seconds must be in (0, 3600]"),
        ({"threads": 0}, "threads must be in [1, 1024]"),
        ({"cuda_graph": True}, "cuda_graph needs device cuda or auto"),
        ({"rounds": 0}, "rounds must be in [1, 100]; got 0"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, fragment):
    with pytest.raises(UsageError) as caught:
        BenchConfig(**kwargs)
    assert fragment in str(caught.value)


def test_bad_flags_exit_2(models, tmp_path):
    result = run_bmc("bench", str(models["mlp"]), "--batch-sizes", "1,x", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, "--batch-sizes expects comma-separated integers")


def test_bilinear_resize_matches_torch_interpolate():
    import torch
    from torch.nn import functional as F

    images = np.random.default_rng(0).standard_normal((2, 3, 8, 11)).astype(np.float32)
    for size in ((32, 32), (5, 7), (8, 11), (224, 224)):
        expected = F.interpolate(torch.from_numpy(images), size=size, mode="bilinear", align_corners=False).numpy()
        np.testing.assert_allclose(bilinear_resize(images, size), expected, rtol=0, atol=2e-6)


def test_evaluation_batches_shrink_with_the_input_the_model_sees():
    # CIFAR and digits keep the full batch; at 224 px a batch holds ~16 MB of input, which kept
    # seed-cnn224's evaluation from needing gigabytes for one convolution's output.
    assert eval_batch_size(3 * 32 * 32, EVAL_BATCH) == EVAL_BATCH
    assert eval_batch_size(64, EVAL_BATCH) == EVAL_BATCH
    assert eval_batch_size(3 * 224 * 224, EVAL_BATCH) == 27
    assert eval_batch_size(3 * 4096 * 4096, EVAL_BATCH) == 1


@pytest.mark.slow
def test_mutated_models_always_give_a_clean_outcome(models, tmp_path):
    outcomes = []
    for index, (kind, data) in enumerate(mutants(models["cnn"].read_bytes(), 30, seed=0)):
        target = tmp_path / f"mutant_{index:02d}.onnx"
        target.write_bytes(data)
        for command in (["info", target.name], ["bench", target.name, "--iters", "2", "--warmup", "1", "--threads", "1"]):
            outcome, line = run_case(command, tmp_path, timeout_s=60)
            outcomes.append((outcome, kind, command[0], line))
    bad = [o for o in outcomes if o[0] not in ("success", "clean error")]
    assert not bad, bad
    # Mutations that never break anything would make this test pass vacuously.
    assert sum(o[0] == "clean error" for o in outcomes) >= 20


@needs_cuda
def test_cuda_with_io_binding_and_cuda_graph_matches_cpu_accuracy(digits_run):
    model = digits_run / "runs" / "latest" / "model.onnx"
    cpu = bench([model], BenchConfig(batch_sizes=(1, 32), iters=20, data="digits")).models[0]
    for cuda_graph in (False, True):
        (gpu,) = bench([model], BenchConfig(batch_sizes=(1, 32), iters=20, device="cuda", cuda_graph=cuda_graph, data="digits")).models
        assert gpu.device == "cuda" and "CUDAExecutionProvider" in gpu.providers
        assert [t.batch_size for t in gpu.timings] == [1, 32] and all(t.iterations == 20 for t in gpu.timings)
        assert abs(gpu.quality.accuracy - cpu.quality.accuracy) <= 1 / 360


@pytest.mark.skipif(cuda_works(), reason="a machine with a CUDA GPU may really have TensorRT; this checks the refusal where it cannot")
def test_tensorrt_without_a_gpu_is_one_clear_line(workdir):
    from bmc.runtime.sessions import SessionError, create_session

    export(ExportConfig(model="seed-mlp", input_size=8, input_channels=1, num_classes=10, out=workdir / "m.onnx"))
    with pytest.raises(SessionError, match="--tensorrt, but onnxruntime runs this session on CPUExecutionProvider only"):
        create_session(workdir / "m.onnx", "auto", tensorrt=True)
    result = run_bmc("bench", "m.onnx", "--device", "auto", "--tensorrt", "--iters", "2", cwd=workdir)
    assert result.returncode == 1
    assert_one_line_error(result, "m.onnx: --tensorrt, but onnxruntime runs this session on")
