"""Data sets that ship inside scikit-learn (no download) and synthetic tensors."""

from __future__ import annotations

import numpy as np

from bmc.data import (
    CLASSIFICATION,
    IMAGE,
    REGRESSION,
    TABLE,
    Augmentation,
    DataConfig,
    Dataset,
    Normalization,
    Recipe,
    register_dataset,
)

# The split is part of the data set's definition: every run, on every machine, sees the same one.
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def _split(x: np.ndarray, y: np.ndarray, stratify: bool) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    return train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y if stratify else None
    )


def _feature_normalization(train_x: np.ndarray) -> Normalization:
    std = train_x.std(axis=0)
    std[std == 0] = 1.0
    return Normalization(1.0, tuple(float(v) for v in train_x.mean(axis=0)), tuple(float(v) for v in std))


@register_dataset(
    "digits",
    "scikit-learn's 8x8 handwritten digits, 1,797 images (embedded default)",
    Recipe(epochs=30, batch_size=64, sgd_lr=0.1, adamw_lr=3e-3, finetune_epochs=20),
)
def load_digits(config: DataConfig) -> Dataset:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    # Pixel values are 0..16; stored as uint8 0..255 like every other image set.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    train_x, test_x, train_y, test_y = _split(images, labels, stratify=True)
    mean = float(train_x.mean() / 255.0)
    std = float(train_x.std() / 255.0)
    return Dataset(
        name="digits",
        train_x=np.ascontiguousarray(train_x),
        train_y=train_y,
        test_x=np.ascontiguousarray(test_x),
        test_y=test_y,
        input_shape=(1, 8, 8),
        normalization=Normalization(1 / 255, (round(mean, 6),), (round(std, 6),)),
        layout=IMAGE,
        class_names=tuple(str(d) for d in range(10)),
        # One pixel of shift is a lot at 8x8; flips would turn digits into other symbols.
        augmentation=Augmentation(crop_padding=1, horizontal_flip=False),
        default_model="seed-cifar-cnn",
        source="sklearn.datasets.load_digits",
    )


def _sklearn_table(name: str, bunch, task: str, default_model: str) -> Dataset:
    """A scikit-learn table as a Dataset: the fixed split, features standardized by the training rows."""
    classification = task == CLASSIFICATION
    targets = bunch.target.astype(np.int64 if classification else np.float32)
    train_x, test_x, train_y, test_y = _split(bunch.data.astype(np.float32), targets, stratify=classification)
    return Dataset(
        name=name,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        input_shape=tuple(train_x.shape[1:]),
        normalization=_feature_normalization(train_x),
        layout=TABLE,
        task=task,
        class_names=tuple(str(n) for n in bunch.target_names) if classification else (),
        default_model=default_model,
        source=f"sklearn.datasets.load_{name}",
    )


@register_dataset(
    "iris",
    "scikit-learn's iris table: 150 flowers, 4 features, 3 classes",
    Recipe(epochs=100, batch_size=16, sgd_lr=0.05, adamw_lr=1e-2, finetune_epochs=30),
)
def load_iris(config: DataConfig) -> Dataset:
    from sklearn.datasets import load_iris as sk_iris

    return _sklearn_table("iris", sk_iris(), CLASSIFICATION, "seed-iris-mlp")


@register_dataset(
    "diabetes",
    "scikit-learn's diabetes regression table: 442 patients, 10 features",
    Recipe(epochs=300, batch_size=32, sgd_lr=0.05, adamw_lr=0.5),
)
def load_diabetes(config: DataConfig) -> Dataset:
    from sklearn.datasets import load_diabetes as sk_diabetes

    return _sklearn_table("diabetes", sk_diabetes(), REGRESSION, "seed-linear")


@register_dataset(
    "synthetic",
    "random tensors of --input-shape, for smoke tests and latency work",
    Recipe(epochs=2, batch_size=64, sgd_lr=0.05, adamw_lr=1e-3),
)
def load_synthetic(config: DataConfig) -> Dataset:
    rng = np.random.default_rng(SPLIT_SEED)
    shape = tuple(config.synthetic_shape)
    is_image = len(shape) == 3
    n_train, n_test = config.synthetic_train_samples, config.synthetic_test_samples
    if is_image:
        train_x = rng.integers(0, 256, size=(n_train, *shape), dtype=np.uint8)
        test_x = rng.integers(0, 256, size=(n_test, *shape), dtype=np.uint8)
        normalization = Normalization(1 / 255, (0.5,) * shape[0], (0.25,) * shape[0])
    else:
        train_x = rng.standard_normal((n_train, *shape), dtype=np.float32)
        test_x = rng.standard_normal((n_test, *shape), dtype=np.float32)
        width = shape[-1]
        normalization = Normalization(1.0, (0.0,) * width, (1.0,) * width)
    classes = config.synthetic_classes
    return Dataset(
        name="synthetic",
        train_x=train_x,
        train_y=rng.integers(0, classes, size=n_train).astype(np.int64),
        test_x=test_x,
        test_y=rng.integers(0, classes, size=n_test).astype(np.int64),
        input_shape=shape,
        normalization=normalization,
        layout=IMAGE if is_image else TABLE,
        task=CLASSIFICATION,
        class_names=tuple(f"class_{i}" for i in range(classes)),
        default_model="seed-cifar-cnn" if is_image else "seed-mlp",
        source=f"synthetic {shape}",
    )
