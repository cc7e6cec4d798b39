"""Which layers int8 hurts most: a per-layer scan of the signal-to-noise ratio each loses once quantized."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from bmc.compress.quantize.calibration import Calibration, reader
from bmc.compress.quantize.recipes import QuantRecipe, quantize_with_recipe

QUANTIZABLE_OPS = ("Conv", "MatMul", "Gemm")


def sensitive_nodes(calibration: Calibration, recipe: QuantRecipe, work: Path) -> list[tuple[str, float]]:
    """Quantizable nodes ranked by the signal-to-noise ratio they lose locally once quantized, worst first.

    One QDQ model of the recipe's types and the float model run on a few calibration batches;
    onnxruntime's qdq_loss_debug matches every tensor's activations between the two. A node's
    damage is the SQNR (dB, against the float model) of its input minus that of its output: the
    noise this node adds, not what it inherited from the layers before it.
    """
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    per_sample = int(np.prod(calibration.batches[0].shape[1:]))
    samples = int(min(64, max(4, 2_000_000 // max(1, per_sample))))
    scan = calibration.using(batches=(np.concatenate(calibration.batches)[:samples],), cache_dir=None)
    qdq = work / "scan-qdq.onnx"
    # compact=False: onnxruntime's activation matching reads the quantizer's own names.
    quantize_with_recipe(scan, qdq, dataclasses.replace(recipe, quant_format="QDQ", gemm_convolutions=False), compact=False)
    activations = {}
    for name, path in (("float", calibration.model), ("qdq", qdq)):
        augmented = work / f"scan-{name}-augmented.onnx"
        modify_model_output_intermediate_tensors(str(path), str(augmented))
        activations[name] = collect_activations(str(augmented), reader(scan), execution_providers=["CPUExecutionProvider"])
    errors = compute_activation_error(create_activation_matching(activations["qdq"], activations["float"]))
    del activations

    def sqnr(tensor: str) -> float | None:
        value = errors.get(tensor, {}).get("xmodel_err")
        if value is None:
            return None
        return min(float(value), 100.0) if math.isfinite(value) else 100.0  # identical tensors: infinite SQNR

    graph = onnx.load(str(calibration.model), load_external_data=False).graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    ranked = []
    for node in graph.node:
        if node.op_type not in QUANTIZABLE_OPS or not node.name:
            continue
        before = sqnr(node.input[0])
        tensor, after = node.output[0], sqnr(node.output[0])
        while after is None and len(consumers.get(tensor, [])) == 1 and consumers[tensor][0].op_type in ("Relu", "Clip", "Add"):
            tensor = consumers[tensor][0].output[0]  # fused activations: the quantized tensor is further on
            after = sqnr(tensor)
        if after is not None:
            ranked.append((node.name, round((100.0 if before is None else before) - after, 3)))
    return sorted(ranked, key=lambda item: item[1], reverse=True)
