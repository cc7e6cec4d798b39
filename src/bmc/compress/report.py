"""What compress found, typed: one result per stage, the closing summary, and their JSON.

Each stage returns one of these results; they stay typed until compress_report.json, which is
their serialization (`CompressReport.to_dict`) under a format version. No torch here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, Union

from bmc.compress.prune.outcome import BlockRank, PruneOutcome
from bmc.compress.quantize.search import CalibrationSummary, Candidate, QuantizeResult
from bmc.export import ExportResult

if TYPE_CHECKING:
    from bmc.compress.config import CompressConfig

REPORT = "compress_report.json"
# 2: typed stages named by kind ("prune", "int8", ...); 1 (unversioned): {"stage", "method"} dicts.
REPORT_FORMAT_VERSION = 2


@dataclass(frozen=True)
class Metrics:
    """A model's figures on the test split: accuracy and loss (classification), MSE and R² (regression)."""

    accuracy: float | None = None
    loss: float | None = None
    mse: float | None = None
    r2: float | None = None

    @classmethod
    def of(cls, history_entry: dict) -> Metrics:
        """From an entry of a run's history (test_accuracy, test_loss, test_mse, test_r2)."""
        return cls(*(history_entry.get(f"test_{name}") for name in ("accuracy", "loss", "mse", "r2")))

    def __str__(self) -> str:
        if self.accuracy is not None:
            return f"test accuracy {100 * self.accuracy:.2f}%"
        if self.r2 is not None:
            return f"test R² {self.r2:.3f}"
        return "no test figures"


@dataclass(frozen=True)
class InputsResult:
    """What calibration and accuracy read for an ONNX file, where that is not the data set its
    metadata names (a model bmc did not write, or other data), and the preprocessing written into
    its metadata for every later stage, bench and serve."""

    model: Path  # the fp32 model the stages read: a copy with that metadata, or the source where nothing changed
    data: str | None  # the calibration source: imagefolder, images, npy, synthetic or a data set; None: no data
    data_dir: Path | None
    input_shape: tuple[int, ...]  # batch excluded
    normalization: dict  # {"scale", "mean", "std", "given_by"} as written; empty where none was given (npy, synthetic)
    preprocessing: str  # in words: where the normalization came from and how images are sized
    accuracy_measured: bool
    accuracy_not_measured: str = ""  # why not, where it is not
    class_names: tuple[str, ...] = ()  # the labels accuracy is scored with, written into the metadata
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Finetune:
    """How a changed model was trained afterwards (0 epochs: saved as it was), and what it then scored."""

    epochs: int
    distilled: bool  # with the unchanged model as teacher
    metrics: Metrics
    run_dir: Path


@dataclass(frozen=True)
class PruneStep:
    """One step of gradual pruning: the MACs removed so far, then its share of fine-tuning."""

    step: int
    macs_removed: float
    finetune_epochs: int
    metrics: Metrics


@dataclass(frozen=True)
class PruneResult:
    """Structured pruning, from the original model to the fine-tuned, exported pruned run."""

    cut: PruneOutcome  # the last step's cut
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    finetune: Finetune  # over all steps
    original_metrics: Metrics
    exported: ExportResult
    steps: tuple[PruneStep, ...] = ()  # gradual pruning, one per step (only when there are several)
    macs_removed: float = field(init=False)
    params_removed: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "macs_removed", round(1 - self.macs_after / self.macs_before, 4) if self.macs_before else 0.0)
        object.__setattr__(self, "params_removed", round(1 - self.params_after / self.params_before, 4) if self.params_before else 0.0)


@dataclass(frozen=True)
class SparsityResult:
    """Magnitude pruning: the smallest weights zeroed. Smaller once gzipped; dense kernels do not
    skip zeros, so no faster."""

    weights_zeroed: float  # fraction of conv and linear weights
    finetune: Finetune
    original_metrics: Metrics
    exported: ExportResult


@dataclass(frozen=True)
class DistillResult:
    """A smaller architecture trained from scratch against the teacher run's outputs."""

    teacher_run: Path
    teacher_model: str
    student_model: str
    teacher_parameters: int
    student_parameters: int
    kd_temperature: float
    kd_alpha: float
    teacher_metrics: Metrics
    finetune: Finetune  # the student's training
    exported: ExportResult


@dataclass(frozen=True)
class HalfResult:
    """fp16, kept only where measured faster than fp32 on the target and within the accuracy budget."""

    target: str
    timed_on: str | None  # the device really timed on; None where the target is absent here
    accepted: bool
    note: str
    path: Path | None = None  # the fp16 file kept; None when rejected (it is deleted)
    max_abs_diff: float | None = None  # against PyTorch, at export
    speedup: dict[int, float] = field(default_factory=dict)
    latency_ms: dict[int, float] = field(default_factory=dict)
    baseline_latency_ms: dict[int, float] = field(default_factory=dict)
    accuracy_drop_points: float | None = None


@dataclass(frozen=True)
class QatResult:
    """Quantization-aware fine-tuning, then int8 chosen by measurement against the model before it."""

    finetune: Finetune  # its metrics: the fake-quantized model's
    quantized: QuantizeResult
    fallback: bool  # run because post-training int8 was fast enough but lost too much accuracy
    chosen: Path | None  # the int8 file kept


StageResult = Union[InputsResult, ExportResult, PruneResult, SparsityResult, DistillResult, HalfResult, QuantizeResult, QatResult]
_KINDS = {InputsResult: "inputs", ExportResult: "export", PruneResult: "prune", SparsityResult: "sparsity", DistillResult: "distill",
          HalfResult: "fp16", QuantizeResult: "int8", QatResult: "qat"}


@dataclass(frozen=True)
class SummaryRow:
    """The original, or a model a stage made, as the closing summary measured it."""

    stage: str
    path: Path
    format: str
    device: str
    parameters: int
    size_bytes: int
    gzip_bytes: int
    weight_sparsity: float | None
    accuracy: float | None
    latency_ms: dict[int, float]
    size_ratio: float  # against the original: > 1 is smaller
    speedup: dict[int, float]  # against the original: > 1 is faster
    accuracy_change_points: float | None  # against the original: negative is a loss
    runtime: str = "onnxruntime"  # the runtime target it ran on (Target.label)


R = TypeVar("R")


@dataclass(frozen=True)
class CompressReport:
    """Where each stage's artifact went and what it measured; `result` is the file to deploy."""

    out_dir: Path
    source_onnx: Path
    result: Path
    stages: tuple[StageResult, ...]
    summary: tuple[SummaryRow, ...] = ()  # the original and every model a stage made, measured together
    notes: tuple[str, ...] = ()  # what a user should know that the figures alone do not say
    config: CompressConfig | None = None  # every setting the stages ran with: what reproduces the figures
    # Why accuracy was not measured (speed only: no labelled data that fits the model), and the
    # accuracy budget then not applied; empty when it was measured.
    accuracy_not_measured: str = ""

    def stage(self, kind: type[R]) -> R | None:
        """The last result of this type, or None."""
        return next((s for s in reversed(self.stages) if isinstance(s, kind)), None)

    def to_dict(self) -> dict:
        """The report as compress_report.json holds it."""
        return {
            "format_version": REPORT_FORMAT_VERSION,
            "out_dir": str(self.out_dir),
            "source_onnx": str(self.source_onnx),
            "result": str(self.result),
            "stages": [{"stage": _KINDS[type(stage)], **_plain(stage)} for stage in self.stages],
            "summary": [_plain(row) for row in self.summary],
            "notes": list(self.notes),
            "config": _plain(self.config) if self.config is not None else {},
            "accuracy_not_measured": self.accuracy_not_measured,
        }


def _plain(value):
    """JSON-ready data: dataclasses as dicts, paths as strings, no NaN or infinity."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {(k if isinstance(k, (str, int, float, bool)) or k is None else str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
