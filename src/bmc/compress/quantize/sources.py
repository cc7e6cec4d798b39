"""Calibration samples from files that are no bmc data set: a tree of images, or .npy arrays.

- images: any tree of image files, decoded at the model's input size by bmc.data.images (shorter
  side scaled, centre crop) and normalized as the model's metadata says.
- npy: already preprocessed model inputs, used as they are: a .npy file or a folder of them
  (any depth), each holding N samples (N x C x H x W, or the model's input shape with a batch
  axis) or one (the model's input shape). Floats only; every fixed axis must be the model's.
Neither carries labels: they calibrate, they do not score.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bmc.errors import DataError

log = logging.getLogger("bmc")

CALIBRATION_BATCH = 32


def shown_shape(dims: tuple) -> str:
    """[N, 3, 224, 224], with dynamic axes by name."""
    return "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else (d if isinstance(d, str) and d else "?") for d in ("N", *dims)) + "]"


# ---- .npy arrays


@dataclass(frozen=True)
class NpyArrays:
    """The .npy files of a calibration source, checked against the model: one sample shape for all."""

    files: tuple[Path, ...]
    sample_shape: tuple[int, ...]
    counts: tuple[int, ...]  # samples in each file

    @property
    def samples(self) -> int:
        return sum(self.counts)


def npy_files(path: Path) -> list[Path]:
    """path itself (a .npy file) or every .npy file under it (any depth, in order); DataError if none."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() != ".npy":
            raise DataError(f"{path} is no .npy file; --calib-data npy takes a .npy file or a folder of them")
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    files = sorted(p for p in path.rglob("*.npy") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"{path} holds no .npy files at any depth")
    return files


def inspect_npy(path: Path, model_dims: tuple, model_name: str) -> NpyArrays:
    """The .npy files at path, checked to hold float samples the model takes (model_dims: its input
    shape without the batch axis, a dynamic axis as a name or None). Reads headers only."""
    files = npy_files(path)
    sample_shape, counts = None, []
    for file in files:
        array = _open_npy(file)
        if not np.issubdtype(array.dtype, np.floating):
            hint = " (raw pixels? give the images: --calib-data images)" if array.dtype == np.uint8 else ""
            raise DataError(f"{file} holds {array.dtype} values; --calib-data npy takes preprocessed float inputs (float32){hint}")
        if array.ndim == len(model_dims):
            shape, count = tuple(array.shape), 1
        elif array.ndim == len(model_dims) + 1:
            shape, count = tuple(array.shape[1:]), int(array.shape[0])
        else:
            raise DataError(f"{file} holds an array of shape {list(array.shape)}; {model_name} takes {shown_shape(model_dims)} "
                            "(one sample without the batch axis, or N of them)")
        wrong = [axis for axis, (got, wanted) in enumerate(zip(shape, model_dims), start=1) if isinstance(wanted, int) and wanted > 0 and got != wanted]
        if wrong:
            axis = wrong[0]
            got, wanted = shape[axis - 1], model_dims[axis - 1]
            what = f"{got} channel{'s' if got != 1 else ''}" if axis == 1 and len(model_dims) == 3 else f"{got} on axis {axis}"
            raise DataError(f"{file} holds samples of shape {shown_shape(shape)}; {model_name} takes {shown_shape(model_dims)} "
                            f"({what} where it takes {wanted})")
        if sample_shape is not None and shape != sample_shape:
            raise DataError(f"{file} holds samples of shape {shown_shape(shape)}, {files[0]} of {shown_shape(sample_shape)}: one shape for all")
        if count == 0:
            raise DataError(f"{file} holds no samples (shape {list(array.shape)})")
        sample_shape = shape
        counts.append(count)
    return NpyArrays(tuple(files), sample_shape, tuple(counts))


def npy_batches(arrays: NpyArrays, samples: int, seed: int) -> list[np.ndarray]:
    """`samples` of the arrays' samples, drawn with `seed`, as float32 batches; DataError on NaN or inf."""
    count = min(samples, arrays.samples)
    chosen = np.sort(np.random.default_rng(seed).choice(arrays.samples, size=count, replace=False))
    starts = np.cumsum((0, *arrays.counts))
    rows = []
    for index, file in enumerate(arrays.files):
        wanted = chosen[(chosen >= starts[index]) & (chosen < starts[index + 1])] - starts[index]
        if len(wanted):
            array = _open_npy(file)
            taken = array[None] if array.ndim == len(arrays.sample_shape) else array[wanted]
            taken = np.asarray(taken, dtype=np.float32)
            if not np.isfinite(taken).all():
                raise DataError(f"{file} holds NaN or infinite values; calibration needs finite inputs")
            rows.append(taken)
    inputs = np.concatenate(rows)
    return [np.ascontiguousarray(inputs[i : i + CALIBRATION_BATCH]) for i in range(0, len(inputs), CALIBRATION_BATCH)]


def _open_npy(file: Path) -> np.ndarray:
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # pickled objects, a truncated or foreign file
        text = str(exc).strip().splitlines()
        raise DataError(f"{file}: not a readable .npy array ({text[0] if text else type(exc).__name__})") from None


# ---- a tree of images


def image_batches(root: Path, input_shape: tuple[int, ...], normalization: dict, samples: int, seed: int, model_name: str) -> list[np.ndarray]:
    """`samples` images drawn with `seed` from the tree at root, decoded at input_shape (C, H, W) and
    normalized by `normalization` ({"scale", "mean", "std"}), in float32 batches. Unreadable files
    are skipped with a warning; DataError when none of those drawn can be read."""
    from bmc.data.images import image_files, read_images
    from bmc.runtime.preprocess import Preprocessing, fold_normalization, preprocess

    if len(input_shape) != 3:
        raise DataError(f"{model_name} takes inputs of shape {shown_shape(input_shape)}, not images (N x C x H x W): give them as .npy arrays")
    if not normalization:
        raise DataError(f"{model_name}: its metadata gives no normalization to turn images into its inputs; "
                        "bmc compress writes one (--mean/--std/--scale)")
    try:
        plan = Preprocessing(*fold_normalization(normalization, input_shape[0], image=True))
    except ValueError as exc:
        raise DataError(f"{model_name}: {exc}") from None
    files = image_files(root)
    count = min(samples, len(files))
    chosen = [files[i] for i in np.sort(np.random.default_rng(seed).choice(len(files), size=count, replace=False))]
    pixels, failed = read_images(chosen, input_shape[0], tuple(input_shape[1:]))
    if not len(pixels):
        path, why = failed[0]
        raise DataError(f"{root}: none of the {len(chosen)} images drawn could be read (first: {path.name}: {why})")
    if failed:
        shown = ", ".join(path.name for path, _ in failed[:3]) + (" ..." if len(failed) > 3 else "")
        log.warning("skipped %d unreadable image(s) of %d in %s: %s", len(failed), len(chosen), root, shown)
    return [preprocess(pixels[i : i + CALIBRATION_BATCH], plan) for i in range(0, len(pixels), CALIBRATION_BATCH)]
