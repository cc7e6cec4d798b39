"""Models by name. Input shape and class count come from the data set.

`create_model("resnet20", input_shape=(3, 32, 32), num_classes=10)` builds any registered model;
`torchvision:<name>` builds any torchvision classification model with random weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from bmc.errors import ModelError, UsageError

TORCHVISION_PREFIX = "torchvision:"


@dataclass(frozen=True)
class ModelRecipe:
    """What an architecture needs from training whatever the data set. Each value set here replaces
    the data set's recipe (bmc.data.Recipe) where the user gave none; None leaves it to the data set."""

    adamw_lr: float | None = None
    sgd_lr: float | None = None
    epochs: int | None = None
    warmup_fraction: float | None = None
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        # Registered in code, so a bad value is the registrant's mistake, found at import.
        for field_name, low, high in (
            ("adamw_lr", 0, 100), ("sgd_lr", 0, 100), ("epochs", 1, 100_000), ("warmup_fraction", 0, 1), ("weight_decay", 0, 1)
        ):
            value = getattr(self, field_name)
            rate = field_name.endswith("_lr")
            if value is not None and not (low < value <= high if rate else low <= value <= high):
                raise ValueError(f"ModelRecipe.{field_name} must be in {'(' if rate else '['}{low}, {high}]; got {value}")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., Any]
    description: str
    # Some architectures fix their input resolution (seed-cnn224's 224 px); the data is resized to it.
    input_size: int | None = None
    conv_net: bool = True
    # A ModelRecipe, or a function of the model's arguments giving one (presets of different widths
    # tolerate different rates).
    recipe: ModelRecipe | Callable[..., ModelRecipe] = ModelRecipe()


_MODELS: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    description: str = "",
    input_size: int | None = None,
    conv_net: bool = True,
    recipe: ModelRecipe | Callable[..., ModelRecipe] = ModelRecipe(),
):
    """Decorator: make factory(input_shape, num_classes, **kwargs) available as `--model NAME`,
    trained by its recipe over the data set's where it sets a value."""

    def decorate(factory):
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        doc = description or (factory.__doc__ or "").strip().splitlines()[0]
        _MODELS[name] = ModelEntry(name, factory, doc, input_size, conv_net, recipe)
        return factory

    return decorate


def list_models() -> list[str]:
    """Registered model names (torchvision models are reached as torchvision:<name>)."""
    _import_models()
    return sorted(_MODELS)


def describe_models() -> dict[str, str]:
    _import_models()
    return {name: entry.description for name, entry in sorted(_MODELS.items())}


def model_entry(name: str) -> ModelEntry:
    """The registry entry for name; torchvision:<name> gets an entry made on the fly."""
    _import_models()
    if name.startswith(TORCHVISION_PREFIX):
        from bmc.models.torchvision_adapter import torchvision_entry

        return torchvision_entry(name[len(TORCHVISION_PREFIX) :])
    entry = _MODELS.get(name)
    if entry is None:
        raise UsageError(
            f"unknown model {name!r}; known: {', '.join(sorted(_MODELS))}, or torchvision:<name>"
        )
    return entry


def model_recipe(name: str, model_args: dict | None = None) -> ModelRecipe:
    """The training settings model `name` built with model_args asks for (ModelRecipe() for none)."""
    recipe = model_entry(name).recipe
    return recipe if isinstance(recipe, ModelRecipe) else recipe(**(model_args or {}))


def model_input_shape(name: str, data_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the model sees: the data's, resized where the architecture fixes its resolution."""
    entry = model_entry(name)
    if entry.input_size is not None and len(data_shape) == 3:
        return (data_shape[0], entry.input_size, entry.input_size)
    return tuple(data_shape)


def create_model(name: str, input_shape: tuple[int, ...], num_classes: int, check: bool = True, **kwargs):
    """Build model `name` for inputs of input_shape (without batch) and num_classes outputs.

    With check=True a forward pass on a zero batch proves the architecture can take the input, so
    a mismatch fails here with a clear message rather than deep inside training.
    """
    import torch

    entry = model_entry(name)
    shape = model_input_shape(name, tuple(input_shape))
    try:
        model = entry.factory(input_shape=shape, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise UsageError(f"model {name!r}: bad model arguments {kwargs} ({exc})") from None
    except RuntimeError as exc:  # layer sizes computed from the input shape do not work out
        raise ModelError(f"model {name!r} cannot take inputs of shape {list(shape)}: {_first_line(exc)}") from None
    if check:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                output = model(torch.zeros(1, *shape))
        except RuntimeError as exc:
            raise ModelError(f"model {name!r} cannot take inputs of shape {list(shape)}: {_first_line(exc)}") from None
        finally:
            model.train(was_training)
        if tuple(output.shape) != (1, num_classes):
            raise ModelError(f"model {name!r} gives outputs of shape {list(output.shape)}, expected [1, {num_classes}]")
    return model


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _import_models() -> None:
    from bmc.models import resnet_cifar, seed, torchvision_adapter  # noqa: F401
