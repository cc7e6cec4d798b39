"""QuantizeConfig: how int8 is calibrated, measured and judged; InputPreprocessing: how images
become inputs of a model whose metadata does not say."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from bmc.errors import UsageError

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Calibration sources that are no registered data set: files read as they are, without labels.
FILE_SOURCES = {
    "images": "a folder of images, any tree of .jpg/.png/... files",
    "npy": "a .npy file or a folder of them, holding preprocessed model inputs",
}
# torchvision's and most Hugging Face image models' normalization (pixels in [0, 1] first).
NORMALIZATION_PRESETS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
DEFAULT_SCALE = 1 / 255


@dataclass(frozen=True)
class InputPreprocessing:
    """How images become inputs of a model whose metadata does not say (an ONNX file bmc did not
    write): x = (pixel * scale - mean) / std per channel, at input_size x input_size pixels.
    A field left None is taken from the model (its fixed input size) or assumed (ImageNet's mean and
    std for 3 channels, scale 1/255), and the report says which."""

    input_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None:
                values = tuple(float(v) for v in values)
                object.__setattr__(self, name, values)
                if not values or not all(math.isfinite(v) for v in values):
                    raise UsageError(f"{name} must be finite numbers, one per channel or one for all; got {list(values)}")
        if self.std is not None and not all(v > 0 for v in self.std):
            raise UsageError(f"std must be > 0 for every channel; got {list(self.std)}")
        if self.mean is not None and self.std is not None and 1 not in (len(self.mean), len(self.std)) and len(self.mean) != len(self.std):
            raise UsageError(f"--mean has {len(self.mean)} values and --std {len(self.std)}: give one per channel (or one for all)")
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise UsageError(f"scale must be a finite number > 0 (pixels 0-255 times scale; 1/255 for [0, 1]); got {self.scale}")
        if self.input_size is not None and (isinstance(self.input_size, bool) or not isinstance(self.input_size, int)
                                            or not 4 <= self.input_size <= 4096):
            raise UsageError(f"input_size must be in [4, 4096] pixels; got {self.input_size!r}")

    @classmethod
    def from_flags(cls, input_size: int | None, mean: str | None, std: str | None, scale: str | None) -> InputPreprocessing | None:
        """From the CLI's spellings: `--mean imagenet` (its std too, unless --std is given), or
        numbers separated by commas; `--scale 1/255`. None when no flag was given."""
        if input_size is None and mean is None and std is None and scale is None:
            return None
        presets = {flag: NORMALIZATION_PRESETS.get(text.strip().lower()) for flag, text in (("mean", mean), ("std", std)) if text is not None}
        preset = presets.get("mean") or presets.get("std")
        return cls(
            input_size=input_size,
            mean=_channel_values("--mean", mean, 0) if mean is not None else preset[0] if preset else None,
            std=_channel_values("--std", std, 1) if std is not None else preset[1] if preset else None,
            scale=_number("--scale", scale) if scale is not None else None,
        )


def _channel_values(flag: str, text: str, preset_index: int) -> tuple[float, ...]:
    preset = NORMALIZATION_PRESETS.get(text.strip().lower())
    if preset is not None:
        return preset[preset_index]
    try:
        return tuple(_number(flag, part) for part in text.split(","))
    except UsageError:
        raise UsageError(
            f"{flag} takes {' or '.join(repr(p) for p in NORMALIZATION_PRESETS)} or numbers separated by commas "
            f"(one per channel, e.g. 0.485,0.456,0.406); got {text!r}"
        ) from None


def _number(flag: str, text: str) -> float:
    """A float, or a fraction such as 1/255."""
    try:
        numerator, _, denominator = text.strip().partition("/")
        return float(numerator) / float(denominator) if denominator else float(numerator)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"{flag} takes a number or a fraction such as 1/255; got {text!r}") from None


@dataclass(frozen=True)
class QuantizeConfig:
    """How to calibrate, what to measure and what a candidate must achieve to be accepted."""

    calib_data: str | None = None  # default: the data set named in the model's metadata
    calib_data_dir: Path | None = None  # for "npy": a .npy file or a folder of them
    calib_samples: int = 512
    calib_method: str = "minmax"
    max_accuracy_drop_points: float = 1.0
    min_speedup: float = 1.0  # the speed guarantee: faster than fp32 at every batch size
    batch_sizes: tuple[int, ...] = (1, 32)
    seconds_per_timing: float = 1.0
    threads: int | None = None  # fixed threads for every target; None: the runtimes' defaults, and one thread tried too
    # The runtimes int8 and fp32 files are timed on (None: every one installed and working here);
    # the handed-over file records its fastest per batch size.
    runtimes: tuple[str, ...] | None = None
    seed: int = 0
    measure_accuracy: bool = True  # False: speed only (random-weight models, synthetic calibration data)
    # How images become inputs of an ONNX file whose metadata does not say (compress resolves every field).
    preprocessing: InputPreprocessing | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.calib_samples <= 100_000:
            raise UsageError(f"calib_samples must be in [1, 100000]; got {self.calib_samples}")
        if self.calib_method not in CALIBRATION_METHODS:
            raise UsageError(f"calib_method must be one of {', '.join(CALIBRATION_METHODS)}; got {self.calib_method!r}")
        if not 0 <= self.max_accuracy_drop_points <= 100:
            raise UsageError(f"max_accuracy_drop must be in [0, 100] points; got {self.max_accuracy_drop_points}")
        if not 0 < self.min_speedup <= 1000:
            raise UsageError(f"min_speedup must be in (0, 1000]; got {self.min_speedup}")
        if not 0 < self.seconds_per_timing <= 60:
            raise UsageError(f"seconds_per_timing must be in (0, 60]; got {self.seconds_per_timing}")
        if self.threads is not None and not 1 <= self.threads <= 1024:
            raise UsageError(f"threads must be in [1, 1024]; got {self.threads}")
        if self.runtimes is not None:
            from bmc.runtime.registry import get_runtime

            object.__setattr__(self, "runtimes", tuple(dict.fromkeys(self.runtimes)))
            if not self.runtimes:
                raise UsageError("runtimes must name at least one runtime, or be None for every one installed")
            for name in self.runtimes:
                get_runtime(name)  # "unknown runtime 'x'; known: ..."
        if self.calib_data is not None and self.calib_data not in FILE_SOURCES:
            from bmc.data import list_datasets

            if self.calib_data not in list_datasets():
                raise UsageError(f"unknown calibration data {self.calib_data!r}; known: {', '.join([*FILE_SOURCES, *list_datasets()])}")
        if self.calib_data in FILE_SOURCES and self.calib_data_dir is None:
            raise UsageError(f"--calib-data {self.calib_data} needs --calib-data-dir PATH ({FILE_SOURCES[self.calib_data]})")
