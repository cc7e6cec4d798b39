"""What calibration and accuracy read for an ONNX file, decided once before any stage runs.

A file bmc wrote names its data set and preprocessing in its metadata; a torchvision or Hugging
Face export says neither. For such a file (or for data other than its own) compress settles here:

- the calibration source (--calib-data): imagefolder (DIR/train/<class>/*, labelled), images (any
  tree of image files), npy (preprocessed inputs: a .npy file or a folder of them), a registered
  data set, or synthetic (random images; also what a file with no data named gets, with a warning);
- the input shape: the file's fixed sizes, else --input-size (images) or the arrays' (npy);
- the normalization, x = (pixel * scale - mean) / std: --mean/--std/--scale, else ImageNet's for
  three channels (what torchvision and most Hugging Face image models take), assumed and said so;
- whether accuracy is measured: only with labels whose class count is the model's output width.
  Otherwise int8 is judged on speed alone, and the report and the summary say so.

What was decided goes into the model's metadata, in a copy in the output folder (model.onnx) that
every stage reads, every file made from it inherits, and bench and serve use afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from bmc.compress.config import CompressConfig
from bmc.compress.quantize.config import DEFAULT_SCALE, FILE_SOURCES, NORMALIZATION_PRESETS, InputPreprocessing
from bmc.compress.report import InputsResult
from bmc.errors import DataError, UsageError

log = logging.getLogger("bmc")

ADOPTED = "model.onnx"  # the source with the decided preprocessing in its metadata, in the output folder
IMAGE_SOURCES = ("images", "imagefolder")
RANDOM_CALIBRATION = (
    "int8 is calibrated on random images: its activation ranges come from noise, not from the model's data, so "
    "its accuracy is unknown and can be far below fp32's; calibrate on real inputs (--calib-data images|imagefolder|npy "
    "--calib-data-dir PATH) before deploying it"
)


def resolve_inputs(config: CompressConfig, out_dir: Path) -> tuple[CompressConfig, InputsResult | None]:
    """config with the calibration data, preprocessing and accuracy decided for its ONNX source, and
    what was decided (None for a run, and for a file calibrated on the data set its metadata names:
    nothing to decide). Writes out_dir/model.onnx where the source's metadata did not say."""
    if not config.source_is_onnx:
        return config, None
    from bmc.bench.accuracy import GIVEN_BY
    from bmc.runtime.metadata import ModelMetadata, write_with_metadata
    from bmc.runtime.model_file import open_model

    source = Path(config.source)
    model = open_model(source)
    metadata = ModelMetadata.from_props(model.metadata_props)
    quantization = config.quantization
    says = bool(metadata.dataset or metadata.normalization.get(GIVEN_BY))
    if says and quantization.preprocessing is not None:
        raise UsageError(f"{source.name}'s metadata gives its preprocessing (input {list(metadata.input_shape)}, "
                         f"normalization {_plain_normalization(metadata.normalization)}); --input-size/--mean/--std/--scale "
                         "are for models whose metadata does not")
    data = quantization.calib_data or metadata.dataset or None
    if metadata.dataset and data == metadata.dataset:
        return dataclasses.replace(config, quantization=dataclasses.replace(quantization, calib_data=data)), None
    defaulted = data is None and config.quantize != "none"
    data = "synthetic" if defaulted else data
    name = source.name
    if len(model.inputs) != 1:
        raise DataError(f"{name} has {len(model.inputs)} inputs ({', '.join(i.name for i in model.inputs)}); compress calibrates models of one input")
    if model.inputs[0].dtype != "float32":
        raise DataError(f"{name}'s input {model.inputs[0].name!r} is {model.inputs[0].dtype}; compress calibrates models that take float32")
    dims = _known_dims(model.inputs[0].shape[1:], metadata.input_shape)
    preprocessing = quantization.preprocessing
    if data == "npy":
        from bmc.compress.quantize.sources import inspect_npy

        named = tuple(d if d is not None else axis for d, axis in zip(dims, model.inputs[0].shape[1:]))  # dynamic axes by name
        shape = inspect_npy(quantization.calib_data_dir, named, name).sample_shape
        if preprocessing is not None and preprocessing.input_size is not None and (len(shape) != 3 or shape[1:] != (preprocessing.input_size,) * 2):
            raise UsageError(f"--input-size {preprocessing.input_size}: the .npy arrays hold samples of shape {list(shape)}")
    else:
        shape = _input_shape(dims, preprocessing, data, name)
    if data in IMAGE_SOURCES:
        _check_images(data, quantization.calib_data_dir, shape[0], name)
    warnings: list[str] = []
    dataset = _registered_dataset(data, quantization.calib_data_dir, metadata, shape)
    if says:
        normalization, how = metadata.normalization, "from the model's metadata"
    else:
        normalization, how = _normalization(preprocessing, shape, data, dataset, name, warnings)
    class_names, reason = _labels(data, quantization.calib_data_dir, dataset, model.outputs, name, defaulted)
    measured = not reason and quantization.measure_accuracy
    reason = reason or ("" if measured else "measure_accuracy is off")
    if data == "synthetic" and config.quantize != "none":
        warnings.append(RANDOM_CALIBRATION)
    adopted = source
    if not says:
        adopted = out_dir / ADOPTED
        write_with_metadata(source, adopted, dataclasses.replace(
            metadata, bmc_version=_version(), model=metadata.model or source.stem, input_shape=shape, data_input_shape=shape,
            normalization=normalization or metadata.normalization, class_names=class_names if measured else metadata.class_names,
            source_sha256=_sha256(source), precision="fp32",
        ))
    if dataset is not None:
        _check_feeds(adopted, dataset, shape)
    for warning in warnings:  # once every check has passed: a refused request prints its error line alone
        log.warning("%s", warning)
    result = InputsResult(
        model=adopted, data=data, data_dir=quantization.calib_data_dir, input_shape=tuple(shape), normalization=dict(normalization),
        preprocessing=_describe(data, shape, normalization, how), accuracy_measured=measured, accuracy_not_measured=reason,
        class_names=tuple(class_names) if measured else (), warnings=tuple(warnings),
    )
    resolved = None if says else _resolved_preprocessing(shape, normalization)
    quantization = dataclasses.replace(quantization, calib_data=data, preprocessing=resolved, measure_accuracy=measured)
    return dataclasses.replace(config, quantization=quantization), result


def input_notes(inputs: InputsResult | None, config: CompressConfig) -> list[str]:
    """The report's notes on the data: warnings, and that accuracy was not measured (with why, and
    that the accuracy budget was then not applied)."""
    notes = list(inputs.warnings) if inputs is not None else []
    reason = accuracy_not_measured(inputs, config)
    if reason:
        notes.append(f"accuracy not measured: {reason}. Every figure here is speed and size only; the "
                     f"{config.quantization.max_accuracy_drop_points:g}-point accuracy budget (--max-accuracy-drop) was not applied")
    return notes


def accuracy_not_measured(inputs: InputsResult | None, config: CompressConfig) -> str:
    """Why accuracy was not measured; empty when it was."""
    if inputs is not None:
        return inputs.accuracy_not_measured
    return "" if config.quantization.measure_accuracy else "measure_accuracy is off"


# ---- the decisions


def _known_dims(dims: tuple, recorded: tuple[int, ...]) -> tuple[int | None, ...]:
    """The input's axes (batch excluded) as ints, None where dynamic; the metadata's sizes fill
    dynamic axes where it records as many."""
    known = tuple(d if isinstance(d, int) and d > 0 else None for d in dims)
    if len(recorded) == len(known):
        known = tuple(k if k is not None else r for k, r in zip(known, recorded))
    return known


def _input_shape(dims: tuple[int | None, ...], preprocessing: InputPreprocessing | None, data: str | None, name: str) -> tuple[int, ...]:
    """The input shape (batch excluded) calibration and timing feed: the file's fixed axes, --input-size for
    dynamic image sizes, three channels where the channel axis is dynamic."""
    from bmc.compress.quantize.sources import shown_shape

    size = preprocessing.input_size if preprocessing is not None else None
    if len(dims) != 3:
        if data in IMAGE_SOURCES or size is not None:
            raise DataError(f"{name} takes inputs of shape {shown_shape(dims)}, not images (N x C x H x W): give them as .npy arrays (--calib-data npy)")
        if None in dims:
            raise DataError(f"{name} takes inputs of shape {shown_shape(dims)} with dynamic axes: give calibration inputs as .npy arrays (--calib-data npy)")
        return tuple(dims)
    channels, rows, cols = dims
    if size is not None and None not in (rows, cols) and (rows, cols) != (size, size):
        raise UsageError(f"--input-size {size}: {name} takes {rows}x{cols} images (fixed in the file)")
    if None in (rows, cols) and size is None:
        raise UsageError(f"{name} takes images of any size ({shown_shape(dims)}): say which with --input-size N")
    if channels is None:
        given = [len(v) for v in (preprocessing.mean, preprocessing.std) if v is not None and len(v) > 1] if preprocessing else []
        channels = given[0] if given else 3
    return channels, rows or size, cols or size


def _check_images(data: str, data_dir: Path, channels: int, name: str) -> None:
    """Image files that cannot feed the model fail before any work: a model of other than 1 or 3
    channels, a folder without images or with none readable (images: probed until one reads)."""
    if data == "imagefolder":
        if channels != 3:
            raise DataError(f"an image folder is read in RGB; {name} takes {channels} channel{'s' if channels != 1 else ''}"
                            + (": --calib-data images converts to grayscale" if channels == 1 else ": give its inputs as .npy arrays"))
        return
    from bmc.data.images import IMAGE_MODES, image_files, read_image

    if channels not in IMAGE_MODES:
        raise DataError(f"images decode to 1 (grayscale) or 3 (RGB) channels; {name} takes {channels}: give its inputs as .npy arrays (--calib-data npy)")
    files = image_files(data_dir)
    first_failure = None
    for path in files:
        decoded = read_image(path, channels, (8, 8))
        if not isinstance(decoded, str):
            return
        first_failure = first_failure or f"{path.name}: {decoded}"
    raise DataError(f"{data_dir}: none of its {len(files)} image files could be read (first: {first_failure})")


def _registered_dataset(data: str | None, data_dir: Path | None, metadata, shape: tuple[int, ...]):
    """The registered data set `data` (not imagefolder: read later, at the model's size) loaded for
    its class names and normalization; None for files, imagefolder and no data."""
    if data is None or data in FILE_SOURCES or data == "imagefolder":
        return None
    from bmc.bench.accuracy import load_eval_dataset

    return load_eval_dataset(data, data_dir, dataclasses.replace(metadata, input_shape=shape, data_input_shape=shape), shape)


def _normalization(preprocessing: InputPreprocessing | None, shape: tuple[int, ...], data: str | None, dataset,
                   name: str, warnings: list[str]) -> tuple[dict, str]:
    """({"scale", "mean", "std", "given_by"}, in words) for a model whose metadata does not say;
    ({}, why none) where nothing turns pixels into inputs (npy, random images, no data)."""
    from bmc.bench.accuracy import GIVEN_BY

    given = preprocessing is not None and (preprocessing.mean, preprocessing.std, preprocessing.scale) != (None, None, None)
    if given:
        if len(shape) != 3:
            raise UsageError(f"--mean/--std/--scale normalize image channels; {name} takes inputs of shape {list(shape)}")
        for flag, values in (("--mean", preprocessing.mean), ("--std", preprocessing.std)):
            if values is not None and len(values) not in (1, shape[0]):
                channels = f"{shape[0]} channels: give {shape[0]} (or 1 for all)" if shape[0] > 1 else "1 channel: give 1"
                raise UsageError(f"{flag} has {len(values)} values; {name} takes {channels}")
        mean, std = preprocessing.mean or (0.0,), preprocessing.std or (1.0,)
        scale = preprocessing.scale if preprocessing.scale is not None else DEFAULT_SCALE
        return _normalization_dict(scale, mean, std, shape[0], "bmc compress --mean/--std/--scale"), "as given"
    if dataset is not None and data != "synthetic":
        norm = dataset.normalization.to_dict()
        warnings.append(f"{name}'s metadata gives no preprocessing and no --mean/--std was given: normalizing as data set {data} is "
                        f"normalized ({_plain_normalization(norm)}); pass --mean/--std/--scale if the model takes other inputs")
        return {**norm, GIVEN_BY: f"assumed by bmc compress: data set {data}'s"}, f"assumed: data set {data}'s"
    if data not in IMAGE_SOURCES:
        return {}, "none"
    channels = shape[0]
    mean, std = NORMALIZATION_PRESETS["imagenet"] if channels == 3 else ((0.0,), (1.0,))
    what = "ImageNet's mean and std" if channels == 3 else "pixels scaled to [0, 1], no mean or std"
    warnings.append(f"{name}'s metadata gives no preprocessing and no --mean/--std was given: assuming {what} "
                    f"({_plain_normalization(_normalization_dict(DEFAULT_SCALE, mean, std, channels, ''))}), what torchvision's and "
                    "most Hugging Face image models take; pass --mean/--std/--scale if yours differs")
    return _normalization_dict(DEFAULT_SCALE, mean, std, channels, f"assumed by bmc compress: {what}"), f"assumed: {what}"


def _labels(data: str | None, data_dir: Path | None, dataset, outputs, name: str, defaulted: bool) -> tuple[tuple[str, ...], str]:
    """(the data's class names, why they cannot score the model: empty when they can)."""
    if data is None:
        return (), "no calibration data given (--calib-data)"
    if data == "synthetic":
        prefix = f"no --calib-data given, and {name}'s metadata names no data set: " if defaulted else ""
        return (), prefix + "calibrated on random images (synthetic), whose labels mean nothing"
    if data in FILE_SOURCES:
        return (), f"the {'images' if data == 'images' else '.npy arrays'} in {data_dir} carry no labels"
    if data == "imagefolder":
        from bmc.data.imagefolder import list_split

        if data_dir is None:
            raise UsageError("--calib-data imagefolder needs --calib-data-dir DIR holding train/<class>/* and test/<class>/*")
        class_names, _ = list_split(Path(data_dir), "train", None)
        where = str(data_dir)
    else:
        class_names, where = (dataset.class_names if dataset.task == "classification" else ("value",)), f"data set {data}"
    first = outputs[0].shape if outputs else ()
    if len(first) != 2 or not isinstance(first[1], int):
        return tuple(class_names), f"{name}'s first output has shape {list(first)}, not [batch, classes] with a fixed width"
    if first[1] != len(class_names):
        what = "classes" if len(class_names) != 1 or dataset is None or dataset.task == "classification" else "target"
        return tuple(class_names), f"{where} has {len(class_names)} {what} and {name} gives {first[1]} outputs: its labels cannot score it"
    return tuple(class_names), ""


def _check_feeds(model: Path, dataset, shape: tuple[int, ...]) -> None:
    """A registered data set that cannot feed the model (other channels, another table width) fails now, not after calibration."""
    from bmc.bench.accuracy import plan_preprocessing
    from bmc.runtime.metadata import ModelMetadata
    from bmc.runtime.model_file import open_model

    plan_preprocessing(str(model), ModelMetadata.from_props(open_model(model).metadata_props), shape, dataset)


# ---- what is written


def _describe(data: str | None, shape: tuple[int, ...], normalization: dict, how: str) -> str:
    """What calibration feeds the model, in words."""
    size = f"{shape[1]}x{shape[2]}" if len(shape) == 3 else ""
    feed = {
        "images": f"images with the shorter side scaled to cover {size} and the centre cut out, {'RGB' if shape[:1] == (3,) else 'grayscale'}",
        "imagefolder": f"images resized to {size}, as bench reads an image folder",
        "npy": "the .npy arrays as they are (already preprocessed)",
        "synthetic": "random images (synthetic)",
    }.get(data or "", "no data")
    if not normalization:
        return feed + (", normalized as that set is" if data == "synthetic" else "")
    applied = "the metadata records the normalization" if data == "npy" else "normalized"
    return f"{feed}; {applied}: {_plain_normalization(normalization)} ({how})"


def _normalization_dict(scale: float, mean, std, channels: int, given_by: str) -> dict:
    from bmc.bench.accuracy import GIVEN_BY

    full = lambda values: [float(v) for v in (values if len(values) == channels else tuple(values) * channels)]  # noqa: E731
    norm = {"scale": float(scale), "mean": full(mean), "std": full(std)}
    return {**norm, GIVEN_BY: given_by} if given_by else norm


def _plain_normalization(norm: dict) -> str:
    if not norm:
        return "none"
    numbers = lambda values: ",".join(f"{float(v):.4g}" for v in values)  # noqa: E731
    scale = float(norm.get("scale", 1.0))
    shown_scale = "1/255" if abs(scale - 1 / 255) < 1e-12 else f"{scale:g}"
    return f"pixels x {shown_scale}, then mean {numbers(norm.get('mean', []))} and std {numbers(norm.get('std', []))}"


def _resolved_preprocessing(shape: tuple[int, ...], norm: dict) -> InputPreprocessing:
    """The preprocessing flags that reproduce what was decided (the report's config)."""
    square = len(shape) == 3 and shape[1] == shape[2] and 4 <= shape[1] <= 4096
    if not norm:
        return InputPreprocessing(input_size=shape[1] if square else None)
    return InputPreprocessing(input_size=shape[1] if square else None, mean=tuple(norm["mean"]), std=tuple(norm["std"]), scale=norm["scale"])


def _sha256(path: Path) -> str:
    from bmc.artifact import sha256_file

    return sha256_file(path)


def _version() -> str:
    from bmc import __version__

    return __version__
