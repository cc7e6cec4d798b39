"""Images bmc did not store: any tree of image files, decoded to uint8 NCHW at a model's input size.

The resize policy is torchvision's `Resize(size)` + `CenterCrop(size)` on PIL images, which is what
users of torchvision and Hugging Face models expect: the shorter side is scaled to the target
(Pillow's bilinear filter, antialiased when shrinking), then the centre is cut out, so no image is
stretched. A square image is simply resized, as bench and serve resize theirs. Modes are converted
to the channels the model takes (grayscale, palette, RGBA or CMYK to RGB; colour to luminance for a
one-channel model); a model of any other channel count cannot be fed from image files.
No labels are read: these images calibrate, they do not score.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bmc.data.imagefolder import IMAGE_SUFFIXES
from bmc.errors import DataError

IMAGE_MODES = {1: "L", 3: "RGB"}


def image_files(root: Path) -> list[Path]:
    """Every image file under root, at any depth (hidden files and folders skipped), in a stable
    order; DataError when there is none."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory" if not root.exists() else f"{root} is a file; give the folder that holds the images")
    files = sorted(
        path for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in path.relative_to(root).parts)
        and path.is_file()
    )
    if not files:
        raise DataError(f"{root} holds no images at any depth ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def fitted_size(width: int, height: int, target: tuple[int, int]) -> tuple[int, int]:
    """(width, height) an image is resized to before its centre is cut to target (rows, cols): the
    smallest size that covers the target without changing the aspect ratio. For a square target it
    is torchvision's Resize(size): the shorter side becomes size, the longer int(size * long / short)."""
    rows, cols = target
    if cols * height >= rows * width:  # relatively taller than the target: the width binds
        return cols, max(rows, height * cols // width)
    return max(cols, width * rows // height), rows


def fit_image(image, target: tuple[int, int]):
    """The PIL image resized to cover target (rows, cols) and centre-cropped to it, as torchvision's
    CenterCrop rounds the offsets."""
    from PIL import Image

    rows, cols = target
    width, height = fitted_size(*image.size, target)
    if (width, height) != image.size:
        image = image.resize((width, height), Image.BILINEAR)
    top, left = int(round((height - rows) / 2.0)), int(round((width - cols) / 2.0))
    if (width, height) != (cols, rows):
        image = image.crop((left, top, left + cols, top + rows))
    return image


def read_image(path: Path, channels: int, target: tuple[int, int]) -> np.ndarray | str:
    """uint8 [channels, rows, cols] from an image file, or the reason it could not be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = np.asarray(fit_image(image.convert(IMAGE_MODES[channels]), target), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        text = str(exc).strip().splitlines()
        return text[0] if text else type(exc).__name__
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def read_images(paths: list[Path], channels: int, target: tuple[int, int]) -> tuple[np.ndarray, list[tuple[Path, str]]]:
    """(uint8 [N, channels, rows, cols] of the readable images, (path, why) of the others)."""
    if channels not in IMAGE_MODES:
        raise DataError(f"images decode to 1 (grayscale) or 3 (RGB) channels; the model takes {channels}: give its inputs as .npy arrays")
    # Pillow releases the GIL while decoding, so threads use every core without pickling arrays.
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        decoded = list(pool.map(lambda path: read_image(path, channels, target), paths))
    images = [d for d in decoded if isinstance(d, np.ndarray)]
    failed = [(path, d) for path, d in zip(paths, decoded) if isinstance(d, str)]
    stacked = np.stack(images) if images else np.zeros((0, channels, *target), dtype=np.uint8)
    return stacked, failed
