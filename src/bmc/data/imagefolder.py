"""Any DIR/train/<class>/* and DIR/test/<class>/* tree, decoded once and cached as uint8 arrays.

The cache key covers every file's relative path, size and mtime plus the target image size, so an
added, removed or rewritten image invalidates it, while later epochs and later runs never decode
JPEG again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bmc.data import IMAGE, Augmentation, DataConfig, Dataset, Normalization, Recipe, register_dataset
from bmc.errors import DataError, UsageError

log = logging.getLogger("bmc")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
CACHE_FORMAT = 1
SPLITS = ("train", "test")


def default_cache_dir() -> Path:
    return Path(os.environ.get("BMC_CACHE_DIR", Path.home() / ".cache" / "bmc"))


def list_split(root: Path, split: str, class_names: list[str] | None) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and (file, class index) pairs of one split, in a stable order."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"no {split}/ folder in {root}: expected {root}/{split}/<class>/*.jpg")
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DataError(f"{split_dir} has no class folders: expected {split_dir}/<class>/*.jpg")
    if class_names is None:
        class_names = found
    else:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise DataError(f"{split_dir} has classes that train/ lacks: {', '.join(unknown)}")
    files: list[tuple[Path, int]] = []
    for index, name in enumerate(class_names):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                files.append((path, index))
    if not files:
        raise DataError(f"{split_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if class_names is found:
        # Every folder of train/ becomes a class: an empty one would be a class the model can never learn.
        empty = sorted(set(found) - {found[index] for _, index in files})
        if empty:
            raise DataError(f"{split_dir} has class folders without images: {', '.join(empty)} (remove them or add images)")
    return class_names, files


def _cache_key(root: Path, listing: dict[str, list[tuple[Path, int]]], image_size: int | None) -> str:
    digest = hashlib.sha256(f"v{CACHE_FORMAT}|size={image_size}".encode())
    for split in SPLITS:
        for path, label in listing[split]:
            stat = path.stat()
            digest.update(f"{split}|{path.relative_to(root)}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _decode(path: Path, size: int | None) -> np.ndarray | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def _decode_split(files: list[tuple[Path, int]], size: int) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    # Pillow releases the GIL while decoding, so threads use every core without pickling arrays.
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = list(pool.map(lambda item: _decode(item[0], size), files, chunksize=64))
    images = np.empty((sum(d is not None for d in decoded), 3, size, size), dtype=np.uint8)
    labels = np.empty(len(images), dtype=np.int64)
    skipped: list[Path] = []
    row = 0
    for (path, label), array in zip(files, decoded):
        if array is None:
            skipped.append(path)
            continue
        images[row] = array
        labels[row] = label
        row += 1
    return images, labels, skipped


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    channels = images.shape[1]
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    for start in range(0, len(images), 4096):
        chunk = images[start : start + 4096].astype(np.float64) / 255.0
        total += chunk.sum(axis=(0, 2, 3))
        total_sq += (chunk**2).sum(axis=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def _first_image_size(files: list[tuple[Path, int]]) -> int:
    from PIL import Image

    for path, _ in files:
        try:
            with Image.open(path) as image:
                width, height = image.size
                return max(width, height)
        except (OSError, ValueError, SyntaxError):
            continue
    raise DataError("no decodable image found to take the image size from; pass --image-size")


def _write_cache(cache_dir: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=cache_dir.parent))
    try:
        for name, array in arrays.items():
            np.save(staging / f"{name}.npy", array, allow_pickle=False)
        (staging / "meta.json").write_text(json.dumps(meta))
        os.replace(staging, cache_dir)  # atomic: another run sees the whole cache or none of it
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (cache_dir / "meta.json").is_file():
            log.warning("could not write the decode cache in %s; images will be decoded again next run", cache_dir)


def _read_cache(cache_dir: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
        arrays = {name: np.load(cache_dir / f"{name}.npy", allow_pickle=False) for name in meta["arrays"]}
        return arrays, meta
    except (OSError, ValueError, KeyError):
        return None


@register_dataset(
    "imagefolder",
    "any DIR/train/<class>/* and DIR/test/<class>/* image tree (--data-dir)",
    Recipe(epochs=20, batch_size=256, sgd_lr=0.4, adamw_lr=2e-3, finetune_epochs=5),
)
def load_imagefolder(config: DataConfig) -> Dataset:
    if config.data_dir is None:
        raise UsageError("--dataset imagefolder needs --data-dir DIR holding train/<class>/* and test/<class>/*")
    root = Path(config.data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory")
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DataError(f"no {split}/ folder in {root}: expected {root}/{split}/<class>/*.jpg")
    class_names, train_files = list_split(root, "train", None)
    _, test_files = list_split(root, "test", class_names)
    listing = {"train": train_files, "test": test_files}

    # Keyed by the resolved size, so "native size" and an explicit equal size share one cache.
    size = config.image_size or _first_image_size(train_files)
    cache_dir = (config.cache_dir or default_cache_dir()) / "imagefolder" / _cache_key(root, listing, size)
    cached = _read_cache(cache_dir)
    if cached is None:
        log.info("decoding %d images from %s (once; cached in %s)", len(train_files) + len(test_files), root, cache_dir)
        arrays: dict[str, np.ndarray] = {}
        skipped: list[Path] = []
        for split in SPLITS:
            images, labels, split_skipped = _decode_split(listing[split], size)
            if len(images) == 0:
                raise DataError(f"{root / split}: none of its {len(listing[split])} images could be decoded")
            arrays[f"{split}_x"], arrays[f"{split}_y"] = images, labels
            skipped += split_skipped
        mean, std = _channel_stats(arrays["train_x"])
        meta = {
            "arrays": sorted(arrays),
            "class_names": class_names,
            "mean": mean,
            "std": std,
            "skipped": [str(p.relative_to(root)) for p in skipped],
        }
        _write_cache(cache_dir, arrays, meta)
    else:
        arrays, meta = cached
    if meta["skipped"]:
        shown = ", ".join(meta["skipped"][:3]) + (" ..." if len(meta["skipped"]) > 3 else "")
        log.warning("skipped %d undecodable image(s) in %s: %s", len(meta["skipped"]), root, shown)

    train_x = arrays["train_x"]
    image_size = train_x.shape[-1]
    return Dataset(
        name="imagefolder",
        train_x=train_x,
        train_y=arrays["train_y"],
        test_x=arrays["test_x"],
        test_y=arrays["test_y"],
        input_shape=tuple(train_x.shape[1:]),
        normalization=Normalization(1 / 255, tuple(meta["mean"]), tuple(meta["std"])),
        layout=IMAGE,
        class_names=tuple(meta["class_names"]),
        augmentation=Augmentation(crop_padding=max(1, image_size // 8), horizontal_flip=True),
        default_model="resnet20" if image_size <= 64 else "resnet18",
        source=f"imagefolder {root.resolve()}",
    )
