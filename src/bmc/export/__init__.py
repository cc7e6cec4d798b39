"""ONNX export that proves itself: checker, then onnxruntime against PyTorch on real inputs.

`export(ExportConfig())` exports runs/latest to runs/latest/model.onnx. Importing this package
does not import torch; export() does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bmc.errors import BmcError, UsageError

FORMATS = ("onnx", "triton")
DEFAULT_OPSET = 17
FP32_ATOL = 1e-4
# fp16 keeps ~3 significant digits: logits of order 10 differ from fp32 by up to ~1e-2.
FP16_ATOL = 5e-2


class ExportError(BmcError):
    """The model could not be exported, or the exported file is not a valid ONNX model."""


class ParityError(ExportError):
    """onnxruntime's outputs differ from PyTorch's by more than the tolerance."""

    def __init__(self, path: Path, max_abs_diff: float, atol: float, top1_agreement: float | None):
        agreement = f", top-1 agreement {top1_agreement:.2%}" if top1_agreement is not None else ""
        super().__init__(
            f"{path}: onnxruntime differs from PyTorch by {max_abs_diff:.3g} (tolerance {atol:g}{agreement}); not written"
        )
        self.max_abs_diff = max_abs_diff
        self.atol = atol
        self.top1_agreement = top1_agreement


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how. With `model` set, an architecture is exported directly."""

    run_dir: Path | None = None
    model: str | None = None
    input_size: int = 224
    input_channels: int = 3
    num_classes: int = 1000
    checkpoint: Path | None = None  # with `model`: a run directory whose weights to load
    out: Path | None = None
    opset: int = DEFAULT_OPSET
    dynamic_batch: bool = True
    format: str = "onnx"
    fp16: bool = False
    atol: float | None = None  # default: FP32_ATOL, or FP16_ATOL with fp16
    verify_samples: int = 64
    encrypt_key_file: Path | None = None  # AES-256 key: write one encrypted file (bmc.sealed) instead of plaintext ONNX

    @property
    def tolerance(self) -> float:
        return self.atol if self.atol is not None else (FP16_ATOL if self.fp16 else FP32_ATOL)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UsageError(f"format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        if not 7 <= self.opset <= 23:
            raise UsageError(f"opset must be in [7, 23]; got {self.opset}")
        if not 1 <= self.input_size <= 4096:
            raise UsageError(f"input_size must be in [1, 4096]; got {self.input_size}")
        if self.atol is not None and not 0 < self.atol <= 1:
            raise UsageError(f"atol must be in (0, 1]; got {self.atol}")
        if not 1 <= self.num_classes <= 1_000_000:
            raise UsageError(f"num_classes must be in [1, 1000000]; got {self.num_classes}")
        if not 1 <= self.input_channels <= 4096:
            raise UsageError(f"input_channels must be in [1, 4096]; got {self.input_channels}")
        if not 1 <= self.verify_samples <= 4096:
            raise UsageError(f"verify_samples must be in [1, 4096]; got {self.verify_samples}")
        if self.checkpoint is not None and self.model is None:
            raise UsageError("--checkpoint needs --model (to export a run with its own architecture, give RUN_DIR)")
        if self.encrypt_key_file is not None and self.format == "triton":
            raise UsageError("--encrypt-key-file writes a bmc encrypted model, which Triton cannot load; use --format onnx")


@dataclass
class ExportResult:
    """An exported, verified model file."""

    path: Path
    sha256: str  # the model's digest (bmc serve --sha256): the file's own, or its manifest's with data files
    size_bytes: int  # every file of the model
    max_abs_diff: float
    top1_agreement: float | None
    atol: float
    verified_on: str
    opset: int
    encrypted: bool = False
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256 of each file, as MODEL.onnx.sha256 lists them

    def summary(self) -> dict:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "files": self.files,
            "encrypted": self.encrypted,
            "size_bytes": self.size_bytes,
            "max_abs_diff": self.max_abs_diff,
            "top1_agreement": self.top1_agreement,
            "atol": self.atol,
            "verified_on": self.verified_on,
            "opset": self.opset,
        }


def export(config: ExportConfig) -> ExportResult:
    """Export, verify and write the model; returns where it went and how closely it matches PyTorch."""
    from bmc.export.onnx_export import export_model

    return export_model(config)
