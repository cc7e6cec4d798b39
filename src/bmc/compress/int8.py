"""The post-training int8 stage: the artifact's fp32 model quantized by the best measured recipe."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bmc.compress.config import CompressConfig
from bmc.compress.quantize.search import quantize_int8
from bmc.compress.report import QuantizeResult
from bmc.compress.stage import Artifact


def int8(artifact: Artifact, config: CompressConfig) -> tuple[Artifact, QuantizeResult]:
    """int8 chosen by measurement against the artifact's fp32 model; kept only where it is faster
    everywhere and within the accuracy budget (--quantize int8-dynamic: dynamic recipes only)."""
    recipes_tried = "dynamic" if config.quantize == "int8-dynamic" else "auto"
    result = quantize_int8(artifact.onnx, artifact.out_dir, config.quantization, recipes_tried=recipes_tried)
    quantized = Path(result.chosen) if result.chosen else None
    return dataclasses.replace(artifact, quantized=quantized, int8=result), result
