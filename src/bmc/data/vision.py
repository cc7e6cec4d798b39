"""CIFAR-10, MNIST and Fashion-MNIST in torchvision's on-disk layout, read with numpy alone.

torchvision is used only to download (`--download`); reading needs no torch, so bench can score a
model on these sets on a box with onnxruntime and numpy. CIFAR-10's python batches are pickles:
they are read with an unpickler that admits numpy arrays and plain containers and nothing else,
so a tampered batch file cannot run code.
"""

from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path

import numpy as np

from bmc.data import IMAGE, Augmentation, DataConfig, Dataset, Normalization, Recipe, register_dataset
from bmc.errors import DataError

DEFAULT_DATA_DIR = Path("data")

# Published per-channel statistics of each set's training split (pixel values in [0, 1]).
CIFAR10_NORMALIZATION = Normalization(1 / 255, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
MNIST_NORMALIZATION = Normalization(1 / 255, (0.1307,), (0.3081,))
FASHION_NORMALIZATION = Normalization(1 / 255, (0.2860,), (0.3530,))

MNIST_CLASSES = ("0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_FOLDER = "cifar-10-batches-py"


def _root(config: DataConfig) -> Path:
    return Path(config.data_dir) if config.data_dir is not None else DEFAULT_DATA_DIR


def _download(dataset_class_name: str, root: Path, label: str) -> None:
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, dataset_class_name)
    try:
        for train in (True, False):
            dataset_class(root=str(root), train=train, download=True)
    except (RuntimeError, OSError) as exc:
        raise DataError(f"could not download {label} into {root}: {exc}") from None


def _missing(label: str, root: Path, expected: Path) -> DataError:
    # Read by train and bench (--data-dir) and by compress's calibration (--calib-data-dir); only train downloads.
    return DataError(
        f"no {label} in {root} (expected {expected}); point --data-dir (compress: --calib-data-dir) at it, "
        "or fetch it once with `bmc train --dataset NAME --download`"
    )


# ---- MNIST and Fashion-MNIST: IDX files


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array of unsigned bytes."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    dims = raw[3]
    header = 4 + 4 * dims
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(f"{path}: truncated IDX file ({len(raw) - header} bytes of data for shape {list(shape)})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_split(raw_dir: Path, prefix: str, label: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        plain = raw_dir / f"{prefix}-{kind}"
        path = plain if plain.is_file() else plain.with_name(plain.name + ".gz")
        if not path.is_file():
            raise _missing(label, root, plain)
        arrays.append(read_idx(path))
    images, labels = arrays
    if len(images) != len(labels):
        raise DataError(f"{raw_dir}: {len(images)} {prefix} images but {len(labels)} labels")
    return np.ascontiguousarray(images[:, None, :, :]), labels.astype(np.int64)


def _load_idx_set(config: DataConfig, folder: str, label: str, class_names, normalization, augmentation, name) -> Dataset:
    root = _root(config)
    raw_dir = root / folder / "raw"
    if config.download and not (raw_dir / "t10k-labels-idx1-ubyte").is_file():
        _download(folder, root, label)
    train_x, train_y = _idx_split(raw_dir, "train", label, root)
    test_x, test_y = _idx_split(raw_dir, "t10k", label, root)
    return Dataset(
        name=name,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        input_shape=tuple(train_x.shape[1:]),
        normalization=normalization,
        layout=IMAGE,
        class_names=class_names,
        augmentation=augmentation,
        default_model="seed-cifar-cnn",
        source=f"{label} IDX files in {raw_dir}",
    )


@register_dataset(
    "mnist",
    "MNIST in torchvision's layout under --data-dir (28x28 grayscale digits)",
    Recipe(epochs=5, batch_size=256, sgd_lr=0.2, adamw_lr=2e-3, finetune_epochs=2),
)
def load_mnist(config: DataConfig) -> Dataset:
    return _load_idx_set(config, "MNIST", "MNIST", MNIST_CLASSES, MNIST_NORMALIZATION, Augmentation(2, False), "mnist")


@register_dataset(
    "fashion-mnist",
    "Fashion-MNIST in torchvision's layout under --data-dir (28x28 clothing)",
    Recipe(epochs=10, batch_size=256, sgd_lr=0.2, adamw_lr=2e-3, finetune_epochs=3),
)
def load_fashion_mnist(config: DataConfig) -> Dataset:
    return _load_idx_set(
        config, "FashionMNIST", "Fashion-MNIST", FASHION_CLASSES, FASHION_NORMALIZATION, Augmentation(2, True), "fashion-mnist"
    )


# ---- CIFAR-10: python batches (pickles of dicts of bytes and numpy arrays)


class _BatchUnpickler(pickle.Unpickler):
    """Admits what CIFAR-10's batches hold (numpy arrays and plain containers) and refuses the rest."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            batch = _BatchUnpickler(io.BytesIO(handle.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: not a CIFAR-10 batch ({exc})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: not a CIFAR-10 batch (holds a {type(batch).__name__})")
    return batch


def _cifar_split(folder: Path, names: list[str], root: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise _missing("CIFAR-10", root, path)
        batch = _read_batch(path)
        try:
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            batch_labels = np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64)
        except (KeyError, ValueError, TypeError) as exc:
            raise DataError(f"{path}: not a CIFAR-10 batch ({exc})") from None
        images.append(data)
        labels.append(batch_labels)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


@register_dataset(
    "cifar10",
    "CIFAR-10 in torchvision's layout under --data-dir (32x32 RGB, 10 classes)",
    Recipe(epochs=20, batch_size=256, sgd_lr=0.4, adamw_lr=2e-3, finetune_epochs=5),
)
def load_cifar10(config: DataConfig) -> Dataset:
    root = _root(config)
    folder = root / CIFAR10_FOLDER
    if config.download and not (folder / "test_batch").is_file():
        _download("CIFAR10", root, "CIFAR-10")
    train_x, train_y = _cifar_split(folder, [f"data_batch_{i}" for i in range(1, 6)], root)
    test_x, test_y = _cifar_split(folder, ["test_batch"], root)
    meta_path = folder / "batches.meta"
    class_names = tuple(_read_batch(meta_path)["label_names"]) if meta_path.is_file() else tuple(str(i) for i in range(10))
    return Dataset(
        name="cifar10",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        input_shape=(3, 32, 32),
        normalization=CIFAR10_NORMALIZATION,
        layout=IMAGE,
        class_names=class_names,
        augmentation=Augmentation(4, True),
        default_model="resnet20",
        source=f"CIFAR-10 python batches in {folder}",
    )
