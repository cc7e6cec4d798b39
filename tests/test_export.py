import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bmc.artifact import sha256_file
from bmc.errors import CheckpointError, UsageError
from bmc.export import ExportConfig, ParityError, export
from bmc.export.metadata import ModelMetadata
from bmc.train import TrainConfig, train

from conftest import run_bmc


@pytest.fixture
def digits_run(workdir):
    return train(TrainConfig(epochs=3))


def test_run_exports_with_parity_metadata_and_sidecar(digits_run):
    result = export(ExportConfig())
    path = digits_run.run_dir / "model.onnx"
    assert result.path.resolve() == path.resolve()
    assert result.max_abs_diff <= 1e-4 and result.top1_agreement == 1.0
    assert result.verified_on == "64 test samples of digits"
    assert path.with_name("model.onnx.sha256").read_text() == f"{sha256_file(path)}  model.onnx\n"

    proto = onnx.load(str(path))
    metadata = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    assert metadata.class_names == tuple("0123456789")
    assert metadata.input_shape == (1, 8, 8) and metadata.input_layout == "NCHW"
    assert metadata.source_sha256 == digits_run.meta["weights"]["sha256"]
    assert metadata.normalization == digits_run.meta["data"]["normalization"]

    # The batch axis is dynamic: any batch size runs.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        assert session.run(None, {"input": np.zeros((batch, 1, 8, 8), np.float32)})[0].shape == (batch, 10)


def test_architecture_exports_directly_and_static_batch_is_fixed(workdir):
    result = export(ExportConfig(model="resnet20", input_size=32, num_classes=10, out=workdir / "r20.onnx", dynamic_batch=False))
    assert result.verified_on.endswith("random normal inputs") and result.max_abs_diff <= 1e-4
    graph_input = onnx.load(str(result.path)).graph.input[0]
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim] == [1, 3, 32, 32]


def test_triton_repository_layout(digits_run):
    result = export(ExportConfig(format="triton"))
    model_dir = result.path.parent.parent
    assert result.path.relative_to(model_dir).as_posix() == "1/model.onnx"
    config = (model_dir / "config.pbtxt").read_text()
    assert f'name: "{model_dir.name}"' in config and 'backend: "onnxruntime"' in config
    assert "dims: [ 1, 8, 8 ]" in config and "dims: [ 10 ]" in config and "dynamic_batching" in config


def test_parity_failure_writes_nothing(digits_run):
    with pytest.raises(ParityError, match=r"differs from PyTorch by .* \(tolerance 1e-12"):
        export(ExportConfig(atol=1e-12))
    assert not (digits_run.run_dir / "model.onnx").exists()
    assert not any(p.name.startswith(".bmc-export-") for p in digits_run.run_dir.iterdir())


def test_bad_export_requests_fail_clearly(workdir):
    with pytest.raises(CheckpointError, match="runs/latest does not exist"):
        export(ExportConfig())
    with pytest.raises(UsageError, match="format must be one of onnx, triton"):
        ExportConfig(format="tflite")
    with pytest.raises(UsageError, match="--checkpoint needs --model"):
        ExportConfig(checkpoint=workdir)


def test_cli_chains_train_then_export(workdir):
    assert run_bmc("train", "--epochs", "2", "--quiet", cwd=workdir).returncode == 0
    result = run_bmc("export", "--json", cwd=workdir)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["max_abs_diff"] <= 1e-4 and (workdir / "runs" / "latest" / "model.onnx").is_file()
    both = run_bmc("export", "runs/latest", "--model", "resnet20", cwd=workdir)
    assert both.returncode == 2 and both.stderr.startswith("error: give either RUN_DIR or --model")
