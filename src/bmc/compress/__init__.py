"""bmc compress: make a model smaller and faster, and prove it on held-out data.

`compress(CompressConfig(prune=0.5))` resolves the config (config.py) against its source, builds
the plan of stages it asks for and runs them (plan.py): structured pruning or sparsity
(pruning.py over prune/), fine-tuning with distillation from the original (finetune.py), a
distilled student (distill.py), then int8 chosen by measurement on this CPU (int8.py over
quantize/), quantization-aware fine-tuning (qat.py) or fp16 (half.py), each kept only where
measured faster. Every stage returns a typed result (report.py) and hands on an Artifact
(stage.py); compare.py measures models together, summary.py closes the run; the output folder is
replaced only by a finished run (outputs.py).
Importing this package imports neither torch nor numpy: `bmc --help` reads the strategies from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bmc.compress.config import QUANTIZATIONS, TARGETS, CompressConfig
from bmc.compress.quantize.config import QuantizeConfig

if TYPE_CHECKING:
    from bmc.compress.report import CompressReport

# The report's types, imported on first use (report.py reaches numpy through the int8 search's types).
_REPORT_TYPES = ("REPORT", "CompressReport", "DistillResult", "HalfResult", "InputsResult", "Metrics", "PruneResult", "QatResult",
                 "QuantizeResult", "SparsityResult", "SummaryRow")


def __getattr__(name: str):
    if name in _REPORT_TYPES:
        from bmc.compress import report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def compress(config: CompressConfig) -> CompressReport:
    """Run the requested stages; writes their artifacts and compress_report.json into the output
    folder, which a finished run replaces whole. Returns the report."""
    from bmc.compress.plan import run_compress

    return run_compress(config)


__all__ = [
    "QUANTIZATIONS", "REPORT", "TARGETS", "CompressConfig", "CompressReport", "DistillResult", "HalfResult", "InputsResult", "Metrics",
    "PruneResult", "QatResult", "QuantizeConfig", "QuantizeResult", "SparsityResult", "SummaryRow", "compress",
]
