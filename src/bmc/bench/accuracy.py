"""Accuracy (or MSE and R²) of an ONNX model on a bmc data set's test split, with the file's own preprocessing.

The preprocessing repeats training's exactly, in float32: x = stored * (scale / std) - mean / std per
channel (images, NCHW) or per feature (tables), then a bilinear resize with PyTorch's
`interpolate(mode="bilinear", align_corners=False)` arithmetic when the model takes another size.
So bench's accuracy is the accuracy PyTorch measured, not an approximation of it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bmc.bench.timing import NUMPY_TYPES
from bmc.data import CLASSIFICATION, IMAGE, DataConfig, Dataset, load_dataset
from bmc.errors import DataError
from bmc.export.metadata import ModelMetadata

EVAL_BATCH = 256
# Activations grow with the input: at 224 px, 256 images through seed-cnn224's first convolution
# (64 channels at full size) are 3.3 GB per tensor. About 16 MB of fp32 input per batch keeps that
# near 350 MB and leaves small inputs (CIFAR, digits) at EVAL_BATCH.
EVAL_INPUT_ELEMENTS = 1 << 22


def eval_batch_size(input_elements: int, largest: int) -> int:
    """How many samples of input_elements values each to evaluate at once: at most `largest`."""
    return max(1, min(largest, EVAL_INPUT_ELEMENTS // max(1, input_elements)))


@dataclass(frozen=True)
class Quality:
    """How well a model does on a data set's test split."""

    dataset: str
    samples: int
    task: str
    accuracy: float | None = None
    mse: float | None = None
    r2: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Preprocessing:
    """Stored samples -> model inputs: a folded multiply-add and an optional resize."""

    multiplier: np.ndarray  # float32, broadcastable over a batch
    offset: np.ndarray
    resize_to: tuple[int, int] | None = None


def load_eval_dataset(name: str, data_dir: Path | None, metadata: ModelMetadata, model_shape: tuple[int, ...]) -> Dataset:
    """Load data set `name` the way this model needs it (image size for imagefolder, shape for synthetic)."""
    shape = tuple(metadata.data_input_shape) or tuple(model_shape)
    config = DataConfig(
        name=name,
        data_dir=data_dir,
        image_size=shape[-1] if name == "imagefolder" and len(shape) == 3 and 4 <= shape[-1] <= 4096 else None,
        synthetic_shape=shape if name == "synthetic" and shape and all(d > 0 for d in shape) else (3, 32, 32),
    )
    try:
        return load_dataset(config)
    except ImportError as exc:
        raise DataError(
            f"data set {name!r} needs {exc.name or 'a package'} to load, which is not importable here; "
            "for image trees use --data imagefolder --data-dir DIR"
        ) from None


def plan_preprocessing(
    model_name: str, metadata: ModelMetadata, model_shape: tuple[int, ...], dataset: Dataset
) -> Preprocessing:
    """How to turn the data set's stored samples into this model's inputs; DataError if they cannot feed it."""
    data_shape = tuple(dataset.input_shape)
    model_shape = tuple(model_shape)
    made_for = tuple(metadata.data_input_shape)
    cannot = (
        f"{model_name} takes inputs of shape {list(model_shape)}"
        + (f" (made for data of shape {list(made_for)})" if made_for and made_for != model_shape else "")
        + f"; data set {dataset.name} has samples of shape {list(data_shape)}"
    )
    resize_to = None
    if data_shape != model_shape:
        # Resizing is what training did when the model's input differs from the data it was made for;
        # anything else (other channel counts, another table width) cannot feed the model.
        image_pair = dataset.layout == IMAGE and len(model_shape) == 3 and len(data_shape) == 3
        if not image_pair or data_shape[0] != model_shape[0] or (made_for and made_for != data_shape):
            raise DataError(cannot)
        resize_to = (int(model_shape[1]), int(model_shape[2]))
    return Preprocessing(*_normalization_arrays(model_name, metadata, dataset), resize_to)


def preprocess(stored: np.ndarray, plan: Preprocessing) -> np.ndarray:
    """Model inputs (float32) from stored samples (uint8 images or float32 table rows)."""
    x = stored.astype(np.float32) * plan.multiplier + plan.offset
    if plan.resize_to is not None and tuple(x.shape[-2:]) != plan.resize_to:
        x = bilinear_resize(x, plan.resize_to)
    return np.ascontiguousarray(x, dtype=np.float32)


def bilinear_resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """NCHW float32 resized like torch's interpolate(mode="bilinear", align_corners=False, antialias=False)."""
    rows0, rows1, row_weight = _source_index(images.shape[2], size[0])
    cols0, cols1, col_weight = _source_index(images.shape[3], size[1])
    top = images[:, :, rows0, :]
    bottom = images[:, :, rows1, :]
    row_weight = row_weight[:, None]
    # The same order of operations as PyTorch's CPU kernel: columns within a row, then rows.
    upper = top[..., cols0] * (1 - col_weight) + top[..., cols1] * col_weight
    lower = bottom[..., cols0] * (1 - col_weight) + bottom[..., cols1] * col_weight
    return (upper * (1 - row_weight) + lower * row_weight).astype(np.float32, copy=False)


def evaluate(session, plan: Preprocessing, dataset: Dataset, model_name: str, batch_size: int | None = None) -> Quality:
    """Run the test split through the session; accuracy for classifiers, MSE and R² for regression."""
    test_x, test_y = dataset.test_x, dataset.test_y
    classification = dataset.task == CLASSIFICATION
    input_node = session.get_inputs()[0]
    fixed_batch = input_node.shape[0] if input_node.shape and isinstance(input_node.shape[0], int) and input_node.shape[0] > 0 else None
    model_sample = (*test_x.shape[1:-2], *plan.resize_to) if plan.resize_to else test_x.shape[1:]
    batch = fixed_batch or batch_size or eval_batch_size(math.prod(model_sample), EVAL_BATCH)
    input_name = input_node.name
    # fp16 models take half-precision inputs; the preprocessing itself stays in float32, as in training.
    input_dtype = NUMPY_TYPES.get(input_node.type, np.float32)
    output_name = session.get_outputs()[0].name
    correct = 0
    predictions: list[np.ndarray] = []
    for start in range(0, len(test_y), batch):
        stored = test_x[start : start + batch]
        count = len(stored)
        if fixed_batch is not None and count < fixed_batch:
            # Pad the last batch with copies of its final sample; their outputs are dropped.
            stored = np.concatenate([stored, np.repeat(stored[-1:], fixed_batch - count, axis=0)])
        try:
            inputs = preprocess(stored, plan).astype(input_dtype, copy=False)
            outputs = np.asarray(session.run([output_name], {input_name: inputs})[0])[:count]
        except Exception as exc:  # onnxruntime's own error types
            from bmc.bench.sessions import ort_message

            raise DataError(f"{model_name}: onnxruntime failed on {dataset.name} test samples ({ort_message(exc)})") from None
        targets = test_y[start : start + count]
        if classification:
            if outputs.ndim != 2 or outputs.shape[1] != dataset.num_classes:
                raise DataError(
                    f"{model_name} gives outputs of shape {list(outputs.shape)}; data set {dataset.name} "
                    f"has {dataset.num_classes} classes"
                )
            correct += int((outputs.argmax(1) == targets).sum())
        else:
            values = outputs.reshape(count, -1)
            if values.shape[1] != 1:
                raise DataError(f"{model_name} gives {values.shape[1]} outputs per sample; regression needs 1")
            predictions.append(values[:, 0].astype(np.float64))
    samples = len(test_y)
    if classification:
        return Quality(dataset.name, samples, dataset.task, accuracy=correct / samples if samples else None)
    predicted = np.concatenate(predictions) if predictions else np.zeros(0)
    targets = test_y.astype(np.float64)
    squared_error = float(((predicted - targets) ** 2).sum())
    variance_sum = float(((targets - targets.mean()) ** 2).sum()) if samples else 0.0
    return Quality(
        dataset.name,
        samples,
        dataset.task,
        mse=squared_error / samples if samples else None,
        r2=1 - squared_error / max(variance_sum, 1e-12) if samples else None,
    )


def fold_normalization(norm: dict, width: int, image: bool) -> tuple[np.ndarray, np.ndarray]:
    """(multiplier, offset) folded as training folds them: scale / std and -mean / std, in float32.

    ValueError names what is wrong when the normalization is malformed or does not fit `width`
    channels (images) or features (tables).
    """
    try:
        scale = float(norm["scale"])
        mean = np.asarray(norm["mean"], dtype=np.float32).reshape(-1)
        std = np.asarray(norm["std"], dtype=np.float32).reshape(-1)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"its metadata's normalization is malformed: {norm!r}") from None
    if mean.size not in (1, width) or std.size not in (1, width) or not np.all(std > 0):
        raise ValueError(
            f"its normalization has {mean.size} means and {std.size} stds (all > 0 needed); "
            f"the input has {width} {'channels' if image else 'features'}"
        )
    shape = (1, -1, 1, 1) if image else (1, -1)
    multiplier = (np.float32(1.0) / std * np.float32(scale)).astype(np.float32)
    offset = (-mean / std).astype(np.float32)
    return multiplier.reshape(shape), offset.reshape(shape)


def _normalization_arrays(model_name: str, metadata: ModelMetadata, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    image = dataset.layout == IMAGE
    width = dataset.input_shape[0] if image else dataset.input_shape[-1]
    norm = metadata.normalization
    # A model exported from a bare architecture records placeholder preprocessing and no data set;
    # the data set's own normalization is then the only meaningful one.
    if not metadata.dataset or not norm:
        norm = dataset.normalization.to_dict()
    try:
        return fold_normalization(norm, width, image)
    except ValueError as exc:
        raise DataError(f"{model_name}: {exc} (data set {dataset.name})") from None


def _source_index(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's area_pixel_compute_source_index for align_corners=False, in float32."""
    scale = np.float32(in_size / out_size)
    source = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    source = np.maximum(source, np.float32(0.0))
    index0 = source.astype(np.int64)
    index1 = np.minimum(index0 + 1, in_size - 1)
    weight = (source - index0).astype(np.float32)
    return index0, index1, weight
