"""What the compress stages pass along: an Artifact in, an Artifact and a typed result out.

`for stage in plan: artifact, result = stage(artifact, config)`: a stage reads the model so far
(its fp32 ONNX file and, where there is one, its PyTorch run), writes what it makes into the run's
output folder, and hands on the model it leaves. A stage with nothing to do returns no result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from bmc.compress.config import CompressConfig
    from bmc.compress.report import QuantizeResult, StageResult


@dataclass(frozen=True)
class Artifact:
    """The model so far, and where this compress run writes."""

    out_dir: Path  # this run's output folder (staged: it replaces the previous results when the run finishes)
    onnx: Path  # the fp32 ONNX model the next stage starts from
    run_dir: Path | None  # its PyTorch run, where there is one: pruning, distillation, QAT and fp16 need it
    quantized: Path | None = None  # the int8 or fp16 file a stage made of it, once one was kept
    int8: QuantizeResult | None = None  # post-training int8's attempt, kept or not (QAT follows where it lost accuracy only)

    @property
    def result(self) -> Path:
        """The file to deploy: the quantized one where a stage kept one, else the fp32 model."""
        return self.quantized or self.onnx


Stage = Callable[["Artifact", "CompressConfig"], "tuple[Artifact, StageResult | None]"]
