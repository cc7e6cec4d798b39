"""torchvision's CIFAR-10, MNIST and Fashion-MNIST, read from --data-dir; downloaded only with --download."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bmc.data import IMAGE, Augmentation, DataConfig, Dataset, Normalization, register_dataset
from bmc.errors import DataError

DEFAULT_DATA_DIR = Path("data")

# Published per-channel statistics of each set's training split (pixel values in [0, 1]).
CIFAR10_NORMALIZATION = Normalization(1 / 255, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
MNIST_NORMALIZATION = Normalization(1 / 255, (0.1307,), (0.3081,))
FASHION_NORMALIZATION = Normalization(1 / 255, (0.2860,), (0.3530,))


def _torchvision_split(dataset_class, config: DataConfig, train: bool, label: str):
    root = Path(config.data_dir) if config.data_dir is not None else DEFAULT_DATA_DIR
    try:
        return dataset_class(root=str(root), train=train, download=config.download)
    except RuntimeError as exc:
        if config.download:
            raise DataError(f"could not download {label} into {root}: {exc}") from None
        raise DataError(
            f"no {label} in {root} (torchvision layout); pass --data-dir DIR, or --download to fetch it"
        ) from None


def _to_nchw_uint8(data) -> np.ndarray:
    array = data.numpy() if hasattr(data, "numpy") else np.asarray(data)
    if array.ndim == 3:  # N,H,W grayscale
        return np.ascontiguousarray(array[:, None, :, :]).astype(np.uint8, copy=False)
    return np.ascontiguousarray(array.transpose(0, 3, 1, 2)).astype(np.uint8, copy=False)


def _load(config: DataConfig, name: str, dataset_class, normalization: Normalization, augmentation, label) -> Dataset:
    train = _torchvision_split(dataset_class, config, True, label)
    test = _torchvision_split(dataset_class, config, False, label)
    train_x, test_x = _to_nchw_uint8(train.data), _to_nchw_uint8(test.data)
    return Dataset(
        name=name,
        train_x=train_x,
        train_y=np.asarray(train.targets, dtype=np.int64),
        test_x=test_x,
        test_y=np.asarray(test.targets, dtype=np.int64),
        input_shape=tuple(train_x.shape[1:]),
        normalization=normalization,
        layout=IMAGE,
        class_names=tuple(train.classes),
        augmentation=augmentation,
        default_model="resnet20" if train_x.shape[1] == 3 else "seed-cifar-cnn",
        source=f"torchvision.datasets.{dataset_class.__name__}",
    )


@register_dataset("cifar10", "CIFAR-10 through torchvision (32x32 RGB, 10 classes)")
def load_cifar10(config: DataConfig) -> Dataset:
    from torchvision.datasets import CIFAR10

    return _load(config, "cifar10", CIFAR10, CIFAR10_NORMALIZATION, Augmentation(4, True), "CIFAR-10")


@register_dataset("mnist", "MNIST through torchvision (28x28 grayscale digits)")
def load_mnist(config: DataConfig) -> Dataset:
    from torchvision.datasets import MNIST

    return _load(config, "mnist", MNIST, MNIST_NORMALIZATION, Augmentation(2, False), "MNIST")


@register_dataset("fashion-mnist", "Fashion-MNIST through torchvision (28x28 grayscale clothing)")
def load_fashion_mnist(config: DataConfig) -> Dataset:
    from torchvision.datasets import FashionMNIST

    return _load(config, "fashion-mnist", FashionMNIST, FASHION_NORMALIZATION, Augmentation(2, True), "Fashion-MNIST")
