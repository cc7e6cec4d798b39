"""int8 recipes: which operator format and types to try on this CPU, and onnxruntime's quantizer run with one.

Which recipe is fast depends on the CPU (VNNI or not): without VNNI the 16-bit intermediate sums
of U8S8 saturate unless the weights use 7 bits (reduce_range); on a CPU with AMX, only
onnxruntime's int8 GEMM uses it, not the direct convolution kernels that symmetric weights select.
"""

from __future__ import annotations

import contextlib
import inspect
import io
from dataclasses import dataclass
from pathlib import Path

from bmc.compress.quantize.calibration import Calibration, first_line, reader
from bmc.compress.quantize.rewrites import compact_constants, route_convolutions_where_faster
from bmc.errors import BmcError

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class QuantRecipe:
    """One way to quantize: operator format, activation/weight types, per-channel, 7-bit weights."""

    quant_format: str  # "QDQ" or "QOperator"
    activation_type: str  # "uint8" or "int8"
    weight_type: str
    per_channel: bool = True
    reduce_range: bool = False
    gemm_convolutions: bool = False  # see rewrites.route_convolutions_to_gemm

    @property
    def name(self) -> str:
        types = ("U8" if self.activation_type == "uint8" else "S8") + ("U8" if self.weight_type == "uint8" else "S8")
        return (
            f"{self.quant_format}-{types}"
            + ("-per-channel" if self.per_channel else "")
            + ("-reduce-range" if self.reduce_range else "")
            + ("-gemm-conv" if self.gemm_convolutions else "")
        )


def candidate_recipes(cpu_flags: list[str] | tuple[str, ...]) -> list[QuantRecipe]:
    """The recipes worth trying on a CPU with these flags, most promising first.

    With VNNI/AMX, QDQ U8S8 and QOperator U8U8 per-channel lead; S8S8 is never a candidate (slower
    than fp32 on resnet20); 7-bit weights (reduce_range) cost no accuracy. Without VNNI, QOperator
    U8S8 with reduce_range leads. With AMX, one more: the convolutions routed to onnxruntime's int8
    GEMM, the only kernel of its that uses AMX tiles. Figures: docs/experiments.md, 4.14.
    """
    if any(flag in cpu_flags for flag in VNNI_FLAGS):
        recipes = [
            QuantRecipe("QDQ", "uint8", "int8", reduce_range=True),
            QuantRecipe("QOperator", "uint8", "uint8", reduce_range=True),
            QuantRecipe("QOperator", "uint8", "int8", reduce_range=True),
        ]
        if "amx_int8" in cpu_flags:
            recipes.append(QuantRecipe("QOperator", "uint8", "int8", reduce_range=True, gemm_convolutions=True))
        return recipes
    return [
        QuantRecipe("QOperator", "uint8", "int8", reduce_range=True),
        QuantRecipe("QDQ", "uint8", "int8", reduce_range=True),
        QuantRecipe("QOperator", "uint8", "uint8"),
    ]


def plain_recipes() -> dict[str, QuantRecipe]:
    """Every recipe bmc can choose without routing convolutions, by name, on any CPU
    (candidate_recipes branches on VNNI alone)."""
    return {r.name: r for flags in ((), VNNI_FLAGS) for r in candidate_recipes(flags) if not r.gemm_convolutions}


def quantize_with_recipe(
    calibration: Calibration,
    target: Path,
    recipe: QuantRecipe,
    exclude: tuple[str, ...] = (),
    *,
    compact: bool = True,
    batch_sizes: tuple[int, ...] = (1, 32),
    threads: int | None = None,
) -> list[str]:
    """onnxruntime's quantize_static of calibration.model with one recipe; the excluded nodes stay in
    float. Returns the convolutions routed to the GEMM kernels (recipe.gemm_convolutions, chosen by
    profiles at batch_sizes on `threads`; else none). compact: the file rewritten without the bytes
    that are neither weights nor structure."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    # onnxruntime's calibrators keep every intermediate tensor of every batch until the end (9.8 GB
    # for 256 samples of seed-cnn224); min-max in strides of one batch merges ranges as it goes,
    # with identical results.
    extra_options = {"CalibStridedMinMax": 1} if calibration.method == "minmax" else {}
    cache = {}
    if calibration.ranges_file is not None and "calibration_cache_path" in inspect.signature(quantize_static).parameters:
        cache = {"calibration_cache_path": str(calibration.ranges_file)}
    try:
        # Its histogram calibrators print their settings to stdout; bmc's output stays bmc's.
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(calibration.model),
                str(target),
                reader(calibration),
                nodes_to_exclude=list(exclude),
                quant_format=QuantFormat.QDQ if recipe.quant_format == "QDQ" else QuantFormat.QOperator,
                per_channel=recipe.per_channel,
                reduce_range=recipe.reduce_range,
                activation_type=types[recipe.activation_type],
                weight_type=types[recipe.weight_type],
                calibrate_method={
                    "minmax": CalibrationMethod.MinMax,
                    "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile,
                }[calibration.method],
                extra_options=extra_options,
                **cache,
            )
    except Exception as exc:  # onnxruntime's quantizer raises many types
        raise BmcError(f"{calibration.model.name}: int8 quantization ({recipe.name}) failed: {first_line(exc)}") from None
    routed = route_convolutions_where_faster(target, batch_sizes, threads) if recipe.gemm_convolutions else []
    if compact:
        compact_constants(target)
    return routed
