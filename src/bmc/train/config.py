"""TrainConfig: how a run is trained; resolve_recipe fills what the user left open from the model's
recipe (bmc.models) over the data set's (bmc.data)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from bmc.data import CLASSIFICATION, DataConfig, Recipe, dataset_recipe
from bmc.errors import UsageError
from bmc.models import model_entry, model_recipe

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# torch.compile's modes; reduce-overhead also replays each step as CUDA graphs (one launch instead of
# hundreds); auto picks it on a single GPU and default elsewhere.
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune")
# A fifth of the steps at a rising rate unless the model's recipe says otherwise: Adam's early
# second-moment estimates rest on few gradients and its first steps overshoot (Liu et al., 2020).
DEFAULT_WARMUP_FRACTION = 0.2


def _check_choice(field_name: str, value, allowed) -> None:
    if value is not None and value not in allowed:
        raise UsageError(f"{field_name} must be one of {', '.join(allowed)}; got {value!r}")


def _check_range(field_name: str, value, low, high, *, low_open: bool = False) -> None:
    if value is None:
        return
    # Written as "not inside" so that NaN, which compares false with everything, is refused too.
    if not low <= value <= high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise UsageError(f"{field_name} must be in {bracket}{low}, {high}]; got {value}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run. None means 'the model's recipe, else the data set's, decides'."""

    data: DataConfig = field(default_factory=DataConfig)
    model: str | None = None
    model_args: dict = field(default_factory=dict)
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    schedule: str = "onecycle"
    warmup_fraction: float | None = None
    label_smoothing: float | None = None
    weight_decay: float | None = None
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    compile_mode: str = "auto"
    seed: int = 0
    threads: int | None = None
    out: Path | None = None
    # Distillation, used when train() is given a teacher: Hinton's loss, weight kd_alpha on the soft targets.
    kd_temperature: float = 4.0
    kd_alpha: float = 0.5

    def __post_init__(self) -> None:
        _check_range("epochs", self.epochs, 1, 100_000)
        _check_range("batch_size", self.batch_size, 1, 1 << 20)
        _check_range("lr", self.lr, 0, 100, low_open=True)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_range("warmup_fraction", self.warmup_fraction, 0, 1)
        _check_range("label_smoothing", self.label_smoothing, 0, 0.99)
        _check_range("weight_decay", self.weight_decay, 0, 1)
        _check_choice("device", self.device, DEVICES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("compile_mode", self.compile_mode, COMPILE_MODES)
        _check_range("threads", self.threads, 1, 1024)
        _check_range("seed", self.seed, 0, 2**31 - 1)
        _check_range("kd_temperature", self.kd_temperature, 0, 100, low_open=True)
        _check_range("kd_alpha", self.kd_alpha, 0, 1)

    def to_dict(self) -> dict:
        raw = dataclasses.asdict(self)
        raw["data"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in raw["data"].items()}
        raw["data"]["synthetic_shape"] = list(self.data.synthetic_shape)
        raw["out"] = str(self.out) if self.out is not None else None
        return raw

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainConfig":
        data = dict(raw["data"])
        for key in ("data_dir", "cache_dir"):
            data[key] = Path(data[key]) if data.get(key) else None
        data["synthetic_shape"] = tuple(data["synthetic_shape"])
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in fields and k != "data"}
        values["out"] = Path(values["out"]) if values.get("out") else None
        return cls(data=DataConfig(**data), **values)


def __getattr__(name: str) -> dict[str, Recipe]:
    # RECIPES, as callers named the table before the recipes moved into the data registry's entries.
    if name == "RECIPES":
        from bmc.data import list_datasets

        return {dataset: dataset_recipe(dataset) for dataset in list_datasets()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_recipe(config: TrainConfig, dataset_name: str, task: str, default_model: str) -> TrainConfig:
    """Fill every None of config, so bmc.json records the exact settings: the user's value, else the
    model's recipe (its registry entry), else the data set's recipe, else a default for the kind of model."""
    recipe = dataset_recipe(dataset_name)
    model = config.model or default_model
    conv_net = model_entry(model).conv_net
    for_model = model_recipe(model, config.model_args)
    optimizer = config.optimizer or ("sgd" if conv_net else "adamw")
    batch_size = config.batch_size or recipe.batch_size
    if config.lr is not None:
        lr = config.lr
    elif optimizer == "sgd":
        # The linear scaling rule (Goyal et al.): the recipe's rate is for its batch size; a smaller
        # batch at the same rate takes proportionally larger steps (lr 0.4 at batch 32 diverged
        # seed-cnn224, which has no batch norm to absorb it).
        lr = _first_set(for_model.sgd_lr, recipe.sgd_lr) * min(1.0, batch_size / recipe.batch_size)
    else:
        lr = _first_set(for_model.adamw_lr, recipe.adamw_lr)
    classification = task == CLASSIFICATION
    default_weight_decay = 5e-4 if optimizer == "sgd" else 0.01 if classification else 0.0
    return dataclasses.replace(
        config,
        model=model,
        epochs=_first_set(config.epochs, for_model.epochs, recipe.epochs),
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        warmup_fraction=_first_set(config.warmup_fraction, for_model.warmup_fraction, DEFAULT_WARMUP_FRACTION),
        label_smoothing=_first_set(config.label_smoothing, 0.1 if classification and conv_net else 0.0),
        weight_decay=_first_set(config.weight_decay, for_model.weight_decay, default_weight_decay),
        channels_last=_first_set(config.channels_last, conv_net),
    )


def _first_set(*values):
    return next(value for value in values if value is not None)
