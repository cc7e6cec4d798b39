"""Stored samples -> model inputs, exactly as training made them. No torch here.

x = stored * (scale / std) - mean / std per channel (images, NCHW) or per feature (tables), in
float32, then a bilinear resize with PyTorch's `interpolate(mode="bilinear", align_corners=False)`
arithmetic when the model takes another size. bench's accuracy and serve's /classify both feed
models through this, so what they measure is what PyTorch measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EVAL_BATCH = 256
# Activations grow with the input: at 224 px, 256 images through seed-cnn224's first convolution
# (64 channels at full size) are 3.3 GB per tensor. About 16 MB of fp32 input per batch keeps that
# near 350 MB and leaves small inputs (CIFAR, digits) at EVAL_BATCH.
EVAL_INPUT_ELEMENTS = 1 << 22


def eval_batch_size(input_elements: int, largest: int) -> int:
    """How many samples of input_elements values each to evaluate at once: at most `largest`."""
    return max(1, min(largest, EVAL_INPUT_ELEMENTS // max(1, input_elements)))


@dataclass(frozen=True)
class Preprocessing:
    """Stored samples -> model inputs: a folded multiply-add and an optional resize."""

    multiplier: np.ndarray  # float32, broadcastable over a batch
    offset: np.ndarray
    resize_to: tuple[int, int] | None = None


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


def _source_index(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's area_pixel_compute_source_index for align_corners=False, in float32."""
    scale = np.float32(in_size / out_size)
    source = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    source = np.maximum(source, np.float32(0.0))
    index0 = source.astype(np.int64)
    index1 = np.minimum(index0 + 1, in_size - 1)
    weight = (source - index0).astype(np.float32)
    return index0, index1, weight
