"""CompressConfig: which stages run on which input. Every check of a compress request lives here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bmc.compress.prune.strategies import get_strategy
from bmc.compress.quantize.config import FILE_SOURCES, QuantizeConfig
from bmc.errors import UsageError

# "auto" is the target's fast path: int8 on a CPU, fp16 on CUDA (where int8 QDQ models have no int8 kernels).
# "int8" tries static recipes, and dynamic int8 too where matrix products do most of the work;
# "int8-dynamic" dynamic int8 alone (weights quantized ahead, activations per batch: no calibration).
QUANTIZATIONS = ("auto", "none", "int8", "int8-dynamic", "fp16")
TARGETS = ("cpu", "cuda")


@dataclass(frozen=True)
class CompressConfig:
    """Which stages to run on which input. `source` is the teacher: a run directory (default
    runs/latest) or an ONNX file, which can only be quantized."""

    source: Path | None = None
    # Structured pruning: this fraction of the multiply-accumulates removed (speed), and at least
    # prune_params of the parameters (size), by whole channels and residual blocks.
    prune: float = 0.0
    prune_params: float = 0.0
    prune_strategy: str = "depth"  # a registered strategy (bmc.compress.prune.strategies)
    prune_iterations: int = 1  # gradual pruning: this many prune-then-fine-tune steps
    # Magnitude pruning: this fraction of the weights zeroed; smaller once gzipped, no faster.
    sparsity: float = 0.0
    # Training after a change: fine-tuning, distillation from the source, a student, QAT.
    finetune_epochs: int | None = None  # None: the data set's default
    finetune_lr: float | None = None  # peak rate of fine-tuning; None: the run's own (a hundredth of it for qat)
    distill: bool = True
    student: str | None = None  # an architecture trained from scratch, distilled from the source run
    kd_temperature: float = 4.0
    kd_alpha: float = 0.5  # weight of the teacher's soft targets against the labels
    qat: bool = False  # quantization-aware fine-tuning before int8
    # Quantization, kept only where measured faster on the target.
    quantize: str = "auto"
    target: str = "cpu"
    quantization: QuantizeConfig = field(default_factory=QuantizeConfig)
    out: Path | None = None  # default: RUN_DIR/compressed, or MODEL-compressed beside an ONNX file

    def __post_init__(self) -> None:
        if self.quantization is None:
            object.__setattr__(self, "quantization", QuantizeConfig())
        _check_range("prune", self.prune, 0, 0.95, "the fraction of multiply-accumulates removed")
        _check_range("prune_params", self.prune_params, 0, 0.95, "the fraction of parameters removed")
        _check_range("sparsity", self.sparsity, 0, 0.95, "the fraction of weights zeroed")
        if self.prune_params > 0 and self.prune == 0:
            raise UsageError("--prune-params goes with structured pruning: give --prune RATIO (the MACs) too")
        if self.prune > 0 and self.sparsity > 0:
            raise UsageError("--prune removes channels, --sparsity zeroes weights: give one of them")
        get_strategy(self.prune_strategy)
        if isinstance(self.prune_iterations, bool) or not isinstance(self.prune_iterations, int) or not 1 <= self.prune_iterations <= 20:
            raise UsageError(f"prune_iterations must be in [1, 20]; got {self.prune_iterations!r}")
        if self.prune_iterations > 1 and self.prune == 0:
            raise UsageError("--prune-iterations goes with --prune: the steps of structured pruning")
        if self.finetune_epochs is not None and not 0 <= self.finetune_epochs <= 1000:
            raise UsageError(f"finetune_epochs must be in [0, 1000]; got {self.finetune_epochs}")
        if self.finetune_lr is not None and not 0 < self.finetune_lr <= 10:
            raise UsageError(f"finetune_lr must be in (0, 10]; got {self.finetune_lr}")
        if not 0 < self.kd_temperature <= 100:
            raise UsageError(f"kd_temperature must be in (0, 100]; got {self.kd_temperature}")
        _check_range("kd_alpha", self.kd_alpha, 0, 1, "the weight of the teacher's soft targets")
        if self.quantize == "qat":
            raise UsageError(f"quantize must be one of {', '.join(QUANTIZATIONS)}; quantization-aware training is a training method: --qat (qat=True)")
        if self.quantize not in QUANTIZATIONS:
            raise UsageError(f"quantize must be one of {', '.join(QUANTIZATIONS)}; got {self.quantize!r}")
        if self.target not in TARGETS:
            raise UsageError(f"target must be one of {', '.join(TARGETS)}; got {self.target!r}")
        if self.target == "cuda" and self.quantize in ("int8", "int8-dynamic"):
            raise UsageError(f"{self.quantize} models run slower than fp16 on onnxruntime's CUDA provider; use --quantize fp16 for --target cuda")
        if self.qat and self.quantization_format != "int8":
            raise UsageError("--qat fine-tunes for int8 (static, calibrated): it goes with --quantize int8 (the default on --target cpu)")
        if self.finetune_epochs == 0 and (self.qat or self.student):
            what = "quantization-aware fine-tuning" if self.qat else "training the student"
            raise UsageError(f"--finetune-epochs 0 leaves nothing to train: {what} needs at least 1 epoch")
        if self.student is not None and (self.prune > 0 or self.sparsity > 0):
            raise UsageError("--student trains a new, smaller architecture; prune either the teacher or the student's run, not both at once")
        if self.student is not None:
            from bmc.models import model_entry

            model_entry(self.student)  # an unknown architecture fails here, naming the valid ones
        self._check_source()

    def _check_source(self) -> None:
        if self.source is None or not Path(self.source).is_file():
            # A run knows its data set and preprocessing; files without labels would leave its accuracy unmeasured.
            # (A missing MODEL.onnx is left to the error that says it is missing.)
            a_run = self.source is None or Path(self.source).suffix != ".onnx"
            if a_run and (self.quantization.calib_data in FILE_SOURCES or self.quantization.preprocessing is not None):
                given = f"--calib-data {self.quantization.calib_data}" if self.quantization.calib_data in FILE_SOURCES else "--input-size/--mean/--std/--scale"
                raise UsageError(f"{given} is for ONNX files bmc did not write; a run calibrates on its own data set (--calib-data NAME to change it)")
            return
        if Path(self.source).suffix != ".onnx":
            raise UsageError(f"{self.source}: compress takes a run directory or an .onnx file")
        needs_run = [what for what, asked in (
            ("pruning (--prune, --sparsity)", self.prune > 0 or self.sparsity > 0),
            ("a student (--student)", self.student is not None),
            ("quantization-aware fine-tuning (--qat)", self.qat),
            ("fp16 (the PyTorch model is exported again in half precision)", self.quantization_format == "fp16"),
        ) if asked]
        if needs_run:
            raise UsageError(f"{needs_run[0]} needs a bmc run directory (the PyTorch model); an ONNX file can only be quantized to int8")

    @property
    def source_is_onnx(self) -> bool:
        return self.source is not None and Path(self.source).is_file()

    @property
    def quantization_format(self) -> str:
        """int8, int8-dynamic, fp16 or none: "auto" resolved for the target."""
        if self.quantize == "auto":
            return "fp16" if self.target == "cuda" else "int8"
        return self.quantize


def _check_range(name: str, value: float, low: float, high: float, meaning: str) -> None:
    # Written as "not inside" so that NaN, which compares false with everything, is refused too.
    if not low <= value <= high:
        raise UsageError(f"{name} must be in [{low}, {high}] ({meaning}); got {value}")
