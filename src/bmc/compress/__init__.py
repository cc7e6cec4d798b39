"""bmc compress: make a model smaller and faster, and prove it on held-out data.

Stages, in order: structured (or magnitude) pruning, fine-tuning with distillation from the
unpruned model, export, and quantization (int8 measured against fp32 on this CPU with a speed
guarantee, or fp16). Importing this package does not import torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bmc.errors import BmcError, UsageError

if TYPE_CHECKING:  # quantize imports onnxruntime's quantizer lazily; the config type is enough here
    from bmc.compress.quantize import QuantizeConfig

# "auto" is the target's fast path: int8 on a CPU, fp16 on CUDA (where int8 QDQ models have no int8 kernels).
QUANTIZATIONS = ("auto", "none", "int8", "fp16", "qat")
PRUNE_METHODS = ("l1-structured", "magnitude")
PRUNE_CHOICES = ("block-internal", "depth", "uniform", "fastest")
# Fine-tuning epochs after pruning when --finetune-epochs is not given.
FINETUNE_EPOCHS = {"digits": 20, "iris": 30, "cifar10": 5, "imagefolder": 5, "mnist": 2, "fashion-mnist": 3}
TARGETS = ("cpu", "cuda")
REPORT = "compress_report.json"


@dataclass(frozen=True)
class CompressConfig:
    """Which stages to run on which input. `source` is a run directory or an ONNX file (default runs/latest)."""

    source: Path | None = None
    prune: float = 0.0
    prune_method: str = "l1-structured"
    # depth: the residual blocks that cost least per millisecond they save go whole, then channels
    # inside the remaining blocks (block-internal where none can go, uniform where a model has no
    # residual streams); uniform: every layer by the same ratio; fastest: the lowest measured latency.
    prune_strategy: str = "depth"
    prune_iterations: int = 1  # gradual pruning: this many prune-then-fine-tune steps
    # Also this fraction of the parameters removed (size; `prune` counts MACs, speed), taken where
    # one channel holds the most parameters: l1-structured only.
    prune_params: float = 0.0
    finetune_epochs: int | None = None
    finetune_lr: float | None = None  # peak rate of fine-tuning; None: the run's own (a hundredth of it for qat)
    distill: bool = True
    quantize: str = "auto"
    target: str = "cpu"
    out: Path | None = None
    quantization: QuantizeConfig | None = None  # None: QuantizeConfig's defaults
    student: str | None = None  # an architecture trained from scratch, distilled from the source run
    kd_temperature: float = 4.0
    kd_alpha: float = 0.5  # weight of the teacher's soft targets against the labels

    def __post_init__(self) -> None:
        if not 0 <= self.prune <= 0.95:
            raise UsageError(f"prune must be in [0, 0.95] (the fraction of multiply-accumulates removed); got {self.prune}")
        if not 0 <= self.prune_params <= 0.95:
            raise UsageError(f"prune_params must be in [0, 0.95] (the fraction of parameters removed); got {self.prune_params}")
        if self.prune_params > 0 and (self.prune == 0 or self.prune_method != "l1-structured"):
            raise UsageError("--prune-params goes with structured pruning: give --prune RATIO (the MACs) with --prune-method l1-structured")
        if self.prune_method not in PRUNE_METHODS:
            raise UsageError(f"prune_method must be one of {', '.join(PRUNE_METHODS)}; got {self.prune_method!r}")
        if self.prune_strategy not in PRUNE_CHOICES:
            raise UsageError(f"prune_strategy must be one of {', '.join(PRUNE_CHOICES)}; got {self.prune_strategy!r}")
        if isinstance(self.prune_iterations, bool) or not isinstance(self.prune_iterations, int) or not 1 <= self.prune_iterations <= 20:
            raise UsageError(f"prune_iterations must be in [1, 20]; got {self.prune_iterations!r}")
        if self.finetune_epochs is not None and not 0 <= self.finetune_epochs <= 1000:
            raise UsageError(f"finetune_epochs must be in [0, 1000]; got {self.finetune_epochs}")
        if self.finetune_lr is not None and not 0 < self.finetune_lr <= 10:
            raise UsageError(f"finetune_lr must be in (0, 10]; got {self.finetune_lr}")
        if self.quantize not in QUANTIZATIONS:
            raise UsageError(f"quantize must be one of {', '.join(QUANTIZATIONS)}; got {self.quantize!r}")
        if self.target not in TARGETS:
            raise UsageError(f"target must be one of {', '.join(TARGETS)}; got {self.target!r}")
        if not 0 < self.kd_temperature <= 100:
            raise UsageError(f"kd_temperature must be in (0, 100]; got {self.kd_temperature}")
        if not 0 <= self.kd_alpha <= 1:
            raise UsageError(f"kd_alpha must be in [0, 1]; got {self.kd_alpha}")
        if self.finetune_epochs == 0 and (self.quantize == "qat" or self.student):
            what = "quantization-aware fine-tuning" if self.quantize == "qat" else "training the student"
            raise UsageError(f"--finetune-epochs 0 leaves nothing to train: {what} needs at least 1 epoch")
        if self.student is not None and self.prune > 0:
            raise UsageError("--student trains a new, smaller architecture; prune either the teacher or the student's run, not both at once")


@dataclass
class CompressReport:
    """Where each stage's artifact went and what it measured."""

    out_dir: str
    source_onnx: str
    stages: list[dict] = field(default_factory=list)
    result: str = ""
    # The original and every model a stage produced, measured together at the end: parameters,
    # size (raw and gzip), sparsity, accuracy, latency at batch 1 and 32, ratios to the original.
    summary: list[dict] = field(default_factory=list)
    # What a user should know about the result that the figures alone do not say.
    notes: list[str] = field(default_factory=list)
    # Every setting the stages ran with, defaults and the calibration data found included: what
    # reproduces the figures.
    config: dict = field(default_factory=dict)


def compress(config: CompressConfig) -> CompressReport:
    """Run the requested stages; writes their artifacts and compress_report.json into the output directory."""
    from bmc.compress.pipeline import run_pipeline

    if (config.prune > 0 or config.student) and config.source is not None and Path(config.source).is_file():
        raise BmcError("pruning and distillation need a bmc run directory (the PyTorch model); an ONNX file can only be quantized")
    if config.quantize == "qat" and config.source is not None and Path(config.source).is_file():
        raise BmcError("quantization-aware fine-tuning needs a bmc run directory (the PyTorch model), not an ONNX file")
    if config.target == "cuda" and config.quantize in ("int8", "qat"):
        raise UsageError("int8 QDQ models run slower than fp16 on onnxruntime's CUDA provider; use --quantize fp16 for --target cuda")
    if config.quantize == "auto":
        config = dataclasses.replace(config, quantize="fp16" if config.target == "cuda" else "int8")
    return run_pipeline(config)
