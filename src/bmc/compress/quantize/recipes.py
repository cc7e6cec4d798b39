"""int8 recipes: which operator format and types to try on this CPU and model, and onnxruntime's quantizer run with one.

Which recipe is fast depends on the CPU (VNNI or not): without VNNI the 16-bit intermediate sums
of U8S8 saturate unless the weights use 7 bits (reduce_range); on a CPU with AMX, only
onnxruntime's int8 GEMM uses it, not the direct convolution kernels that symmetric weights select.
Static recipes fix activation ranges by calibration; the dynamic one measures them per batch at
run time, and suits models whose compute is matrix products (compute.is_matmul_heavy).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
from dataclasses import dataclass
from pathlib import Path

from bmc.compress.quantize.calibration import Calibration, first_line, reader
from bmc.compress.quantize.rewrites import compact_constants, route_convolutions_where_faster
from bmc.errors import BmcError

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# Which recipes a search tries: "auto" the static ones, with the dynamic one first for a model whose
# compute is matrix products; "static" or "dynamic" only those.
RECIPE_SETS = ("auto", "static", "dynamic")
# The operators dynamic int8 quantizes: those with integer kernels in onnxruntime that beat fp32
# (Gemm is rewritten to MatMul first); ConvInteger does not, nor does a quantized Gather save time.
DYNAMIC_OP_TYPES = ("MatMul", "Attention", "LSTM")
DYNAMIC_INT8_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention"}


@dataclass(frozen=True)
class QuantRecipe:
    """One way to quantize: operator format, activation/weight types, per-channel, 7-bit weights."""

    quant_format: str  # "QDQ" or "QOperator"
    activation_type: str  # "uint8" or "int8"
    weight_type: str
    per_channel: bool = True
    reduce_range: bool = False
    gemm_convolutions: bool = False  # see rewrites.route_convolutions_to_gemm
    # Activations quantized at run time from each batch's range (onnxruntime's quantize_dynamic, its
    # integer operators: QOperator format); needs no calibration.
    dynamic: bool = False

    @property
    def name(self) -> str:
        types = ("U8" if self.activation_type == "uint8" else "S8") + ("U8" if self.weight_type == "uint8" else "S8")
        return (
            f"{'dynamic' if self.dynamic else self.quant_format}-{types}"
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


def dynamic_recipe(cpu_flags: list[str] | tuple[str, ...]) -> QuantRecipe:
    """Dynamic int8 for a CPU with these flags: U8S8 per channel, weights in 7 bits without VNNI
    (onnxruntime's MatMulInteger saturates there as its static kernels do)."""
    vnni = any(flag in cpu_flags for flag in VNNI_FLAGS)
    return QuantRecipe("QOperator", "uint8", "int8", per_channel=True, reduce_range=not vnni, dynamic=True)


def recipes_to_try(cpu_flags: list[str] | tuple[str, ...], which: str, matmul_heavy: bool) -> list[QuantRecipe]:
    """The recipes a search tries (which: one of RECIPE_SETS), most promising first: on a model
    whose compute is matrix products, the dynamic recipe leads the static ones under "auto"."""
    if which not in RECIPE_SETS:
        raise ValueError(f"which must be one of {', '.join(RECIPE_SETS)}; got {which!r}")
    if which == "dynamic":
        return [dynamic_recipe(cpu_flags)]
    static = candidate_recipes(cpu_flags)
    return [dynamic_recipe(cpu_flags), *static] if which == "auto" and matmul_heavy else static


def plain_recipes() -> dict[str, QuantRecipe]:
    """Every recipe bmc can choose without routing convolutions, by name, on any CPU
    (candidate_recipes branches on VNNI alone)."""
    recipes = [r for flags in ((), VNNI_FLAGS) for r in (*candidate_recipes(flags), dynamic_recipe(flags))]
    return {r.name: r for r in recipes if not r.gemm_convolutions}


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
    if recipe.dynamic:
        _quantize_dynamic(calibration.model, target, recipe, exclude)
        if compact:
            compact_constants(target)
        return []
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
        with _quiet_quantizer():
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


def _quantize_dynamic(model: Path, target: Path, recipe: QuantRecipe, exclude: tuple[str, ...]) -> None:
    """onnxruntime's quantize_dynamic of model (pre-processed) with its Gemm nodes as MatMul + Add
    first: onnxruntime has no dynamic integer Gemm, and exporters write every nn.Linear on a
    flattened input as one."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from bmc.compress.quantize.rewrites import gemms_as_matmuls

    as_matmuls = target.with_name(f".{target.stem}-matmul{target.suffix}")
    try:
        gemms_as_matmuls(model, as_matmuls)
        with _quiet_quantizer():
            quantize_dynamic(
                str(as_matmuls),
                str(target),
                op_types_to_quantize=list(DYNAMIC_OP_TYPES),
                per_channel=recipe.per_channel,
                reduce_range=recipe.reduce_range,
                weight_type=QuantType.QInt8 if recipe.weight_type == "int8" else QuantType.QUInt8,
                nodes_to_exclude=list(exclude),
                # Activation-by-activation products (attention scores) would quantize both sides per batch
                # for no saved weight bytes; their float kernels stay.
                extra_options={"MatMulConstBOnly": True},
            )
    except Exception as exc:  # onnxruntime's quantizer raises many types
        raise BmcError(f"{model.name}: int8 quantization ({recipe.name}) failed: {first_line(exc)}") from None
    finally:
        as_matmuls.unlink(missing_ok=True)
    import onnx

    # A graph without a product of constant weights comes back unchanged: no int8 file to measure.
    if not DYNAMIC_INT8_OPS & {node.op_type for node in onnx.load(str(target), load_external_data=False).graph.node}:
        target.unlink(missing_ok=True)
        raise BmcError(f"{model.name}: int8 quantization ({recipe.name}) found no {', '.join(DYNAMIC_OP_TYPES)} with constant weights to quantize")


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime's quantizer prints progress to stdout and logs a warning on the root logger for
    every tensor it leaves alone (hundreds on a Transformer: its shape-computing Gathers); what it
    found is reported by the search, so neither reaches the user."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)
