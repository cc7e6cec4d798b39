"""bmc.json's schema: every field a command reads, with its type and bounds, checked when the file is read.

A hand-edited or hostile bmc.json must fail as one line naming the file and the field, before any
of it reaches torch: not a TypeError deep in a stage, not a weights file outside the run directory,
not a skipped hash, not a model of 10**12 classes handed to the allocator. Fields no command reads
(history entries, environment) are left free; unknown fields are allowed, so older and newer runs of
the same format version still read. No torch here.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable

Check = Callable[[Any, str], None]

# The bounds export and the models accept anyway (ExportConfig: num_classes <= 1,000,000, input
# size <= 4096, channels <= 4096), with room: one sample of 3 x 4096 x 4096 is 50 M elements.
MAX_CLASSES = 1_000_000
MAX_DIM = 65_536
MAX_SAMPLE_ELEMENTS = 1 << 26
MAX_SAMPLES = 1 << 31
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class SchemaError(ValueError):
    """One field of bmc.json is missing, of the wrong type or out of bounds."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field {field}: {message}")
        self.field = field


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def integer(low: int, high: int) -> Check:
    def check(value, field):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise SchemaError(field, f"must be an integer in [{low}, {high}]; got {_describe(value)}")

    return check


def number(low: float = -math.inf, high: float = math.inf) -> Check:
    def check(value, field):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
            raise SchemaError(field, f"must be a finite number in [{low}, {high}]; got {_describe(value)}")

    return check


def text(value, field) -> None:
    if not isinstance(value, str):
        raise SchemaError(field, f"must be a string; got {_describe(value)}")


def name(value, field) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= 256:
        raise SchemaError(field, f"must be a non-empty string of at most 256 characters; got {_describe(value)}")


def boolean(value, field) -> None:
    if not isinstance(value, bool):
        raise SchemaError(field, f"must be true or false; got {_describe(value)}")


def sha256(value, field) -> None:
    if not isinstance(value, str) or not SHA256.match(value):
        raise SchemaError(field, f"must be a sha256 (64 lowercase hex digits); the hash is required; got {_describe(value)}")


def optional(check: Check) -> Check:
    def optional_check(value, field):
        if value is not None:
            check(value, field)

    return optional_check


def items(each: Check, max_items: int, min_items: int = 0) -> Check:
    def check(value, field):
        if not isinstance(value, list) or not min_items <= len(value) <= max_items:
            raise SchemaError(field, f"must be a list of {min_items} to {max_items} items; got {_describe(value)}")
        for index, item in enumerate(value):
            each(item, f"{field}[{index}]")

    return check


def shape(value, field) -> None:
    """A sample's shape: 1 to 4 positive dimensions, each and their product bounded."""
    items(integer(1, MAX_DIM), 4, 1)(value, field)
    if math.prod(value) > MAX_SAMPLE_ELEMENTS:
        raise SchemaError(field, f"{value} is {math.prod(value):,} elements per sample; at most {MAX_SAMPLE_ELEMENTS:,}")


def run_file(value, field) -> None:
    """A file of the run directory, by a relative name that cannot leave it."""
    if not isinstance(value, str) or not value or "\x00" in value:
        raise SchemaError(field, f"must be a file name inside the run directory; got {_describe(value)}")
    parts = value.replace("\\", "/").split("/")
    if value.startswith(("/", "\\")) or os.path.isabs(value) or (len(parts[0]) == 2 and parts[0][1] == ":") or ".." in parts:
        raise SchemaError(field, f"{value!r} points outside the run directory; it must be a file inside it")


def model_args(value, field) -> None:
    """Keyword arguments of a registered model: names to scalars or short lists of them (a preset, a width, hidden sizes)."""
    if not isinstance(value, dict):
        raise SchemaError(field, f"must be an object; got {_describe(value)}")
    for key, arg in value.items():
        where = f"{field}.{key}"
        if isinstance(arg, list):
            items(_model_arg_scalar, 64)(arg, where)
        else:
            _model_arg_scalar(arg, where)


def _model_arg_scalar(value, field) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        integer(-MAX_DIM, MAX_DIM)(value, field)
    elif isinstance(value, float):
        number(-1e9, 1e9)(value, field)
    else:
        raise SchemaError(field, f"must be a string, number, true/false, null or a list of them; got {_describe(value)}")


def dropped_block(value, field) -> None:
    """[block name, "relu" or "identity"], as depth pruning records a block it replaced."""
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and 0 < len(value[0]) <= 256):
        raise SchemaError(field, f"must be [block name, kind]; got {_describe(value)}")
    if value[1] not in ("relu", "identity"):
        raise SchemaError(f"{field}[1]", f"must be 'relu' or 'identity'; got {_describe(value[1])}")


def obj(fields: dict[str, tuple[Check, bool]]) -> Check:
    """An object with these fields: (check, required). Fields not listed are not checked."""

    def check(value, field):
        if not isinstance(value, dict):
            raise SchemaError(field, f"must be an object; got {_describe(value)}")
        for key, (field_check, required) in fields.items():
            where = f"{field}.{key}" if field else key
            if key not in value:
                if required:
                    raise SchemaError(where, "is missing")
                continue
            field_check(value[key], where)

    return check


def _required(check: Check) -> tuple[Check, bool]:
    return check, True


def _optional(check: Check) -> tuple[Check, bool]:
    return check, False


NORMALIZATION = obj({
    "scale": _required(number(1e-12, 1e12)),
    "mean": _required(items(number(-1e12, 1e12), MAX_DIM, 1)),
    "std": _required(items(number(1e-12, 1e12), MAX_DIM, 1)),
})

MODEL = obj({
    "name": _required(name),
    "args": _required(model_args),
    "data_input_shape": _required(shape),
    "input_shape": _required(shape),
    "num_classes": _required(integer(1, MAX_CLASSES)),
    "parameters": _optional(integer(0, 1 << 40)),
    "pruned": _optional(boolean),
    "distilled": _optional(boolean),
    "dropped_blocks": _optional(items(dropped_block, 4096)),
})

WEIGHTS = obj({
    "file": _required(run_file),
    "sha256": _required(sha256),
    "bytes": _optional(integer(0, 1 << 50)),
})

DATA = obj({
    "name": _required(name),
    "layout": _required(name),
    "task": _required(name),
    "input_shape": _required(shape),
    "class_names": _required(items(text, MAX_CLASSES)),
    "normalization": _required(NORMALIZATION),
    "train_samples": _optional(integer(0, MAX_SAMPLES)),
    "test_samples": _optional(integer(0, MAX_SAMPLES)),
})

# TrainConfig.to_dict(); TrainConfig itself checks the ranges once the types are right.
CONFIG = obj({
    "data": _required(obj({
        "name": _required(name),
        "data_dir": _optional(optional(text)),
        "download": _optional(boolean),
        "image_size": _optional(optional(integer(4, 4096))),
        "synthetic_shape": _optional(shape),
        "synthetic_classes": _optional(integer(1, MAX_CLASSES)),
        "synthetic_train_samples": _optional(integer(1, 10_000_000)),
        "synthetic_test_samples": _optional(integer(1, 10_000_000)),
        "cache_dir": _optional(optional(text)),
    })),
    "model": _optional(optional(name)),
    "model_args": _optional(model_args),
    "epochs": _optional(optional(integer(1, 100_000))),
    "batch_size": _optional(optional(integer(1, 1 << 20))),
    "lr": _optional(optional(number())),
    "optimizer": _optional(optional(name)),
    "schedule": _optional(name),
    "warmup_fraction": _optional(number()),
    "label_smoothing": _optional(optional(number())),
    "weight_decay": _optional(optional(number())),
    "device": _optional(name),
    "precision": _optional(name),
    "channels_last": _optional(optional(boolean)),
    "compile": _optional(boolean),
    "compile_mode": _optional(name),
    "seed": _optional(integer(0, 2**31 - 1)),
    "threads": _optional(optional(integer(1, 1024))),
    "out": _optional(optional(text)),
    "kd_temperature": _optional(number()),
    "kd_alpha": _optional(number()),
})

RUN_META_SCHEMA = obj({
    "model": _required(MODEL),
    "weights": _required(WEIGHTS),
    "data": _required(DATA),
    "config": _required(CONFIG),
    "history": _optional(items(obj({}), 1_000_000)),
    "completed_epochs": _optional(integer(0, 1 << 31)),
    "epochs": _optional(optional(integer(0, 1 << 31))),
    "status": _optional(text),
})


def validate_meta(meta: Any) -> None:
    """SchemaError naming the first field of a bmc.json that does not fit its schema."""
    RUN_META_SCHEMA(meta, "")
