"""torch -> ONNX, then the proof: onnx.checker and onnxruntime against PyTorch on real inputs."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path

import numpy as np
import torch

from bmc import __version__
from bmc.artifact import resolve_run_dir
from bmc.export import ExportConfig, ExportError, ExportResult, ParityError
from bmc.export.publish import publish, staging_folder
from bmc.runtime.metadata import ModelMetadata
from bmc.sealed import load_key

INPUT_NAME = "input"
OUTPUT_NAME = "output"
# protobuf cannot serialize a message over 2 GiB: larger models keep their weights in a side file.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
VERIFY_BATCH = 32


def export_model(config: ExportConfig) -> ExportResult:
    # A bad key file fails before minutes of export, not after.
    encrypt_key = load_key(config.encrypt_key_file) if config.encrypt_key_file is not None else None
    model, metadata, inputs, verified_on, default_dir = _source(config)
    if config.format == "triton":
        name = (config.out.name if config.out else None) or _triton_name(metadata, default_dir)
        repository = config.out.parent if config.out else default_dir / "triton"
        target = repository / name / "1" / "model.onnx"
    else:
        target = Path(config.out) if config.out else default_dir / "model.onnx"
        if target.is_dir():
            target = target / "model.onnx"  # --out DIR: the file goes inside it, as its default name
    target.parent.mkdir(parents=True, exist_ok=True)

    with staging_folder(target.parent) as staging:
        staged = staging / target.name
        exported = copy.deepcopy(model).half() if config.fp16 else model
        torch_to_onnx(exported, inputs[:1].to(next(exported.parameters()).dtype), staged, config.opset, config.dynamic_batch)
        if config.fp16:
            metadata = dataclasses.replace(metadata, precision="fp16")
        _write_metadata(staged, metadata)
        _check(staged)
        # Always against the fp32 PyTorch model: an fp16 file is judged by how far it is from the original.
        max_abs_diff, agreement = _parity(model, inputs, staged, VERIFY_BATCH if config.dynamic_batch else 1)
        if not max_abs_diff <= config.tolerance:  # also catches NaN
            raise ParityError(target, max_abs_diff, config.tolerance, agreement)
        manifest = publish(staged, target, encrypt_key)
    if config.format == "triton":
        _write_triton_config(target.parent.parent, metadata, inputs.shape[1:], config)
    return ExportResult(
        path=target,
        sha256=manifest.digest,
        size_bytes=sum((target.parent / name).stat().st_size for name, _ in manifest.entries),
        max_abs_diff=max_abs_diff,
        top1_agreement=agreement,
        atol=config.tolerance,
        verified_on=verified_on,
        opset=config.opset,
        encrypted=encrypt_key is not None,
        files=dict(manifest.entries),
    )


def _source(config: ExportConfig):
    """(model, metadata, verification inputs, what they are, default output dir)."""
    from bmc.checkpoint import load_model
    from bmc.models import create_model, model_input_shape

    if config.model is None or config.checkpoint is not None:
        # --model NAME --checkpoint RUN is the run itself, once its architecture is checked: the
        # run's classes, normalization and test samples, not placeholders.
        run_dir = resolve_run_dir(config.checkpoint if config.checkpoint is not None else config.run_dir)
        model, meta = load_model(run_dir)
        if config.model is not None and meta["model"]["name"] != config.model:
            raise ExportError(f"{config.checkpoint} holds a {meta['model']['name']}, not a {config.model}")
        data = meta["data"]
        metadata = ModelMetadata(
            bmc_version=__version__,
            model=meta["model"]["name"],
            dataset=data["name"],
            task=data["task"],
            class_names=tuple(data["class_names"]),
            input_layout="NCHW" if data["layout"] == "image" else "NC",
            input_shape=tuple(meta["model"]["input_shape"]),
            data_input_shape=tuple(data["input_shape"]),
            normalization=data["normalization"],
            source_sha256=meta["weights"]["sha256"],
        )
        inputs, verified_on = _real_inputs(meta, config.verify_samples, run_dir)
        return model, metadata, inputs, verified_on, run_dir

    shape = (config.input_channels, config.input_size, config.input_size)
    torch.manual_seed(0)
    model = create_model(config.model, shape, config.num_classes).eval()
    model_shape = model_input_shape(config.model, shape)
    metadata = ModelMetadata(
        bmc_version=__version__,
        model=config.model,
        class_names=tuple(f"class_{i}" for i in range(config.num_classes)),
        input_shape=tuple(model_shape),
        data_input_shape=tuple(model_shape),
        normalization={"scale": 1.0, "mean": [0.0] * model_shape[0], "std": [1.0] * model_shape[0]},
    )
    generator = torch.Generator().manual_seed(0)
    samples = min(config.verify_samples, 8 if max(model_shape) > 128 else config.verify_samples)
    inputs = torch.randn(samples, *model_shape, generator=generator)
    return model, metadata, inputs, f"{samples} random normal inputs", Path(".")


def _real_inputs(meta: dict, count: int, run_dir: Path) -> tuple[torch.Tensor, str]:
    """The first `count` test samples of the run's data set, preprocessed exactly as in training."""
    from bmc.artifact import RUN_META
    from bmc.data import DataConfig, Normalization, load_dataset
    from bmc.errors import CheckpointError, UsageError
    from bmc.train.augment import Normalizer
    from bmc.train.config import TrainConfig

    try:
        data_config: DataConfig = TrainConfig.from_dict(meta["config"]).data
    except UsageError as exc:  # types are checked on read; TrainConfig checks the ranges
        raise CheckpointError(f"{run_dir / RUN_META}: field config: {exc}") from None
    dataset = load_dataset(data_config)
    norm = meta["data"]["normalization"]
    model_shape = tuple(meta["model"]["input_shape"])
    image = meta["data"]["layout"] == "image"
    normalizer = Normalizer(
        Normalization(norm["scale"], tuple(norm["mean"]), tuple(norm["std"])),
        image=image,
        resize_to=tuple(model_shape[1:]) if image and tuple(model_shape) != tuple(dataset.input_shape) else None,
    )
    with torch.no_grad():
        inputs = normalizer(torch.from_numpy(dataset.test_x[:count]))
    return inputs, f"{len(inputs)} test samples of {dataset.name}"


def torch_to_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_batch: bool = True) -> None:
    """torch.onnx.export with bmc's input/output names; ExportError with the exporter's first line on failure."""
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of dynamo; it stays the default here
            # because it exports these models in a fraction of the time and handles every torchvision classifier.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model.eval(),
                (example,),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
            )
    except Exception as exc:  # the exporter raises many types; all mean the same to a user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch.onnx.export failed for {path.name}: {first}") from None


def _write_metadata(path: Path, metadata: ModelMetadata) -> None:
    import onnx

    proto = onnx.load(str(path), load_external_data=True)
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in metadata.to_props().items():
        entry = existing.get(key) or proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "bmc"
    proto.producer_version = __version__
    for stale in path.parent.iterdir():
        if stale != path:
            stale.unlink()
    large = _serialized_bytes(proto) > PROTOBUF_LIMIT_BYTES - (64 << 20)
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
        size_threshold=1024,
    )


def _serialized_bytes(proto) -> int:
    try:
        return proto.ByteSize()
    except ValueError:  # some protobuf builds refuse to even size a message over the limit
        return PROTOBUF_LIMIT_BYTES + 1


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ExportError(f"{path.name}: onnx.checker rejects the exported model: {first}") from None


def _parity(model: torch.nn.Module, inputs: torch.Tensor, path: Path, batch_size: int) -> tuple[float, float | None]:
    """Max |onnxruntime - PyTorch| over the inputs, and how often their top-1 classes agree."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
    max_abs_diff = 0.0
    agree = total = 0
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start : start + batch_size].contiguous()
            expected = model(batch).float().numpy()
            actual = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy().astype(input_dtype)})[0].astype(np.float32)
            if actual.shape != expected.shape:
                raise ExportError(f"{path.name}: onnxruntime output shape {actual.shape}, PyTorch {expected.shape}")
            max_abs_diff = max(max_abs_diff, float(np.max(np.abs(actual - expected))) if actual.size else 0.0)
            if expected.ndim == 2 and expected.shape[1] > 1:
                agree += int((actual.argmax(1) == expected.argmax(1)).sum())
                total += len(expected)
    return max_abs_diff, (agree / total if total else None)


def _triton_name(metadata: ModelMetadata, default_dir: Path) -> str:
    stem = default_dir.resolve().name if default_dir != Path(".") else metadata.model
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem) or "model"


def _write_triton_config(model_dir: Path, metadata: ModelMetadata, input_shape, config: ExportConfig) -> None:
    """config.pbtxt for Triton's onnxruntime backend, and labels.txt for its classification extension.

    An image input says FORMAT_NCHW, which image clients (tritonclient's image_client.py) require.
    Without a dynamic batch axis, Triton wants max_batch_size 0 and the full shapes, batch of 1 included.
    """
    from bmc.artifact import atomic_write_bytes

    classes = len(metadata.class_names) or 1
    data_type = "TYPE_FP16" if metadata.precision == "fp16" else "TYPE_FP32"
    batch_axis = () if config.dynamic_batch else (1,)
    input_dims = ", ".join(str(int(d)) for d in (*batch_axis, *input_shape))
    output_dims = ", ".join(str(d) for d in (*batch_axis, classes))
    batching = "max_batch_size: 64\ndynamic_batching {\n  max_queue_delay_microseconds: 1000\n}\n" if config.dynamic_batch else "max_batch_size: 0\n"
    image = metadata.input_layout in ("NCHW", "NHWC") and len(input_shape) == 3
    input_format = f"    format: FORMAT_{metadata.input_layout}\n" if image else ""
    # Triton reads one label per line: a class name holding a line break would shift every label after it.
    labeled = bool(metadata.class_names) and not any("\n" in name or "\r" in name for name in metadata.class_names)
    label_file = '    label_filename: "labels.txt"\n' if labeled else ""
    text = (
        f'name: "{model_dir.name}"\n'
        'backend: "onnxruntime"\n'
        f"{batching}"
        f'input [\n  {{\n    name: "{INPUT_NAME}"\n    data_type: {data_type}\n{input_format}    dims: [ {input_dims} ]\n  }}\n]\n'
        f'output [\n  {{\n    name: "{OUTPUT_NAME}"\n    data_type: {data_type}\n    dims: [ {output_dims} ]\n{label_file}  }}\n]\n'
    )
    if labeled:
        atomic_write_bytes(model_dir / "labels.txt", "".join(f"{name}\n" for name in metadata.class_names).encode())
    atomic_write_bytes(model_dir / "config.pbtxt", text.encode())
