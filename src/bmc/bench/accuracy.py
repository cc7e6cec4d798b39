"""Accuracy (or MSE and R²) of an ONNX model on a bmc data set's test split, with the file's own preprocessing.

The samples go through `bmc.runtime.preprocess`, which repeats training's preprocessing exactly, so
bench's accuracy is the accuracy PyTorch measured, not an approximation of it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bmc.data import CLASSIFICATION, IMAGE, DataConfig, Dataset, load_dataset
from bmc.errors import BmcError, DataError
from bmc.runtime.metadata import ModelMetadata
from bmc.runtime.preprocess import EVAL_BATCH, Preprocessing, eval_batch_size, fold_normalization, preprocess

# The key of a model's normalization (metadata) that says who gave it, where no data set names it:
# written by bmc compress for an ONNX file bmc did not write (its --mean/--std/--scale, or what it assumed).
GIVEN_BY = "given_by"


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


def evaluate(session, plan: Preprocessing, dataset: Dataset, model_name: str, batch_size: int | None = None) -> Quality:
    """Run the test split through the session (any runtime's); accuracy for classifiers, MSE and R² for regression."""
    test_x, test_y = dataset.test_x, dataset.test_y
    classification = dataset.task == CLASSIFICATION
    input_info = session.inputs[0]
    first_axis = input_info.shape[0] if input_info.shape else None
    fixed_batch = first_axis if isinstance(first_axis, int) and first_axis > 0 else None
    model_sample = (*test_x.shape[1:-2], *plan.resize_to) if plan.resize_to else test_x.shape[1:]
    batch = fixed_batch or batch_size or eval_batch_size(math.prod(model_sample), EVAL_BATCH)
    input_name = input_info.name
    # fp16 models take half-precision inputs; the preprocessing itself stays in float32, as in training.
    try:
        input_dtype = np.dtype(input_info.dtype)
    except TypeError:
        input_dtype = np.dtype(np.float32)
    output_name = session.outputs[0].name
    correct = 0
    predictions: list[np.ndarray] = []
    for start in range(0, len(test_y), batch):
        stored = test_x[start : start + batch]
        count = len(stored)
        if fixed_batch is not None and count < fixed_batch:
            # Pad the last batch with copies of its final sample; their outputs are dropped.
            stored = np.concatenate([stored, np.repeat(stored[-1:], fixed_batch - count, axis=0)])
        inputs = preprocess(stored, plan).astype(input_dtype, copy=False)
        try:
            outputs = np.asarray(session.run({input_name: inputs}, [output_name])[output_name])[:count]
        except BmcError as exc:  # the session's one line: "PATH: RUNTIME failed running it (WHY)"
            raise DataError(f"{exc} on {dataset.name} test samples") from None
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


def _normalization_arrays(model_name: str, metadata: ModelMetadata, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    image = dataset.layout == IMAGE
    width = dataset.input_shape[0] if image else dataset.input_shape[-1]
    norm = metadata.normalization
    # A model exported from a bare architecture records placeholder preprocessing and no data set;
    # the data set's own normalization is then the only meaningful one. One that bmc compress was
    # told (or assumed, and said so) for a model bmc did not write is the model's own.
    if not norm or not (metadata.dataset or norm.get(GIVEN_BY)):
        norm = dataset.normalization.to_dict()
    try:
        return fold_normalization(norm, width, image)
    except ValueError as exc:
        raise DataError(f"{model_name}: {exc} (data set {dataset.name})") from None
