"""QuantizeConfig: how int8 is calibrated, measured and judged."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bmc.errors import UsageError

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class QuantizeConfig:
    """How to calibrate, what to measure and what a candidate must achieve to be accepted."""

    calib_data: str | None = None  # default: the data set named in the model's metadata
    calib_data_dir: Path | None = None
    calib_samples: int = 512
    calib_method: str = "minmax"
    max_accuracy_drop_points: float = 1.0
    min_speedup: float = 1.0  # the speed guarantee: faster than fp32 at every batch size
    batch_sizes: tuple[int, ...] = (1, 32)
    seconds_per_timing: float = 1.0
    threads: int | None = None
    seed: int = 0
    measure_accuracy: bool = True  # False: speed only (random-weight models, synthetic calibration data)

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
