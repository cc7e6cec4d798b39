"""Data sets by name, all behind one interface.

Loaders return numpy arrays (images as uint8 NCHW, tables as float32), so the evaluation side
(bench) can read them on a box without torch; training wraps them as tensors without a copy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bmc.errors import UsageError

IMAGE = "image"
TABLE = "table"
CLASSIFICATION = "classification"
REGRESSION = "regression"


@dataclass(frozen=True)
class Normalization:
    """x_model = (x_stored * scale - mean) / std, per channel (images) or per feature (tables)."""

    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"scale": self.scale, "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation, applied per batch on the training device."""

    crop_padding: int = 0
    horizontal_flip: bool = False

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.horizontal_flip


@dataclass(frozen=True)
class DataConfig:
    """Which data set to load and from where."""

    name: str = "digits"
    data_dir: Path | None = None
    download: bool = False
    image_size: int | None = None  # imagefolder: resize every image to this square size
    synthetic_shape: tuple[int, ...] = (3, 32, 32)
    synthetic_classes: int = 10
    synthetic_train_samples: int = 512
    synthetic_test_samples: int = 128
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.image_size is not None and not 4 <= self.image_size <= 4096:
            raise UsageError(f"image_size must be in [4, 4096], got {self.image_size}")
        if any(d < 1 for d in self.synthetic_shape):
            raise UsageError(f"synthetic_shape must be positive, got {self.synthetic_shape}")
        if self.synthetic_classes < 1 or self.synthetic_train_samples < 1 or self.synthetic_test_samples < 1:
            raise UsageError("synthetic classes and sample counts must be >= 1")


@dataclass
class Dataset:
    """A train/test split with everything a model and an exported file need to know about it."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    input_shape: tuple[int, ...]
    normalization: Normalization
    layout: str = IMAGE
    task: str = CLASSIFICATION
    class_names: tuple[str, ...] = ()
    augmentation: Augmentation = field(default_factory=Augmentation)
    default_model: str = "seed-cifar-cnn"
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.task == CLASSIFICATION else 1

    def describe(self) -> dict:
        """What a checkpoint or exported model records about its data."""
        return {
            "name": self.name,
            "source": self.source,
            "layout": self.layout,
            "task": self.task,
            "input_shape": list(self.input_shape),
            "class_names": list(self.class_names),
            "normalization": self.normalization.to_dict(),
            "augmentation": asdict(self.augmentation),
            "train_samples": int(len(self.train_y)),
            "test_samples": int(len(self.test_y)),
        }


@dataclass(frozen=True)
class Recipe:
    """A data set's defaults wherever the user leaves a setting open: training epochs, batch size
    and peak rate per optimizer, and the epochs `bmc compress` fine-tunes a pruned model for.
    Each registered one was chosen by measurement on the 2-core project machine (BENCHMARKS.md)."""

    epochs: int
    batch_size: int
    sgd_lr: float
    adamw_lr: float
    finetune_epochs: int = 5


# For a data set registered without a recipe: short, as for random tensors.
DEFAULT_RECIPE = Recipe(epochs=2, batch_size=64, sgd_lr=0.05, adamw_lr=1e-3)

DatasetLoader = Callable[[DataConfig], Dataset]
_LOADERS: dict[str, DatasetLoader] = {}
_DESCRIPTIONS: dict[str, str] = {}
_RECIPES: dict[str, Recipe] = {}


def register_dataset(name: str, description: str = "", recipe: Recipe = DEFAULT_RECIPE) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator: make a loader available as `--dataset NAME`, with its default recipe."""

    def decorate(loader: DatasetLoader) -> DatasetLoader:
        if name in _LOADERS:
            raise ValueError(f"data set {name!r} registered twice")
        _LOADERS[name] = loader
        _DESCRIPTIONS[name] = description or (loader.__doc__ or "").strip().splitlines()[0]
        _RECIPES[name] = recipe
        return loader

    return decorate


def dataset_recipe(name: str) -> Recipe:
    """The registered data set's recipe (DEFAULT_RECIPE for a name not registered)."""
    _import_loaders()
    return _RECIPES.get(name, DEFAULT_RECIPE)


def list_datasets() -> list[str]:
    """Names of all registered data sets."""
    _import_loaders()
    return sorted(_LOADERS)


def describe_datasets() -> dict[str, str]:
    """Name -> one-line description."""
    _import_loaders()
    return dict(sorted(_DESCRIPTIONS.items()))


def load_dataset(config: DataConfig | str) -> Dataset:
    """Load a registered data set; an unknown name lists the known ones."""
    if isinstance(config, str):
        config = DataConfig(name=config)
    _import_loaders()
    loader = _LOADERS.get(config.name)
    if loader is None:
        raise UsageError(f"unknown data set {config.name!r}; known: {', '.join(sorted(_LOADERS))}")
    return loader(config)


def _import_loaders() -> None:
    # Importing the modules runs their @register_dataset decorators.
    from bmc.data import imagefolder, tabular, vision  # noqa: F401
