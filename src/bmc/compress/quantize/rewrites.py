"""Rewrites of a quantized ONNX file that change no value: convolutions routed to onnxruntime's
int8 GEMM where that kernel is faster, and the bytes that are neither weights nor structure dropped."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np

# Runs per profiled session when choosing each convolution's kernel (route_convolutions_where_faster).
PROFILE_ITERATIONS = 10


def route_convolutions_to_gemm(path: Path, only: set[str] | None = None) -> list[str]:
    """Rewrite each int8 convolution with symmetric int8 weights (zero point 0, group 1) to the same
    weights minus one and a zero point of -1: the same dequantized values, bit for bit, but
    onnxruntime then runs the convolution through its int8 GEMM instead of its direct symmetric
    convolution kernels, and on a CPU with AMX only the GEMM uses AMX tiles. Depthwise and grouped
    convolutions keep zero points of 0: their kernels have no GEMM form and the fallback is 20x
    slower. `only`: the names of the nodes to rewrite (default: every one that can be). Returns
    the names of the nodes rewritten.
    """
    import onnx
    from onnx import numpy_helper

    from bmc.artifact import atomic_write_bytes

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    constants = {c.name: c for c in graph.initializer if c.data_location != onnx.TensorProto.EXTERNAL}
    producers = {output: node for node in graph.node for output in node.output}
    users = Counter(name for node in graph.node for name in node.input)
    rewritten = []
    for node in graph.node:
        if next((a.i for a in node.attribute if a.name == "group"), 1) != 1 or (only is not None and node.name not in only):
            continue
        if node.op_type == "QLinearConv" and len(node.input) > 5:
            weights, zero_point = node.input[3], node.input[5]
        elif node.op_type == "Conv" and getattr(producers.get(node.input[1]), "op_type", "") == "DequantizeLinear":
            dequantize = producers[node.input[1]]
            if len(dequantize.input) < 3:
                continue
            weights, zero_point = dequantize.input[0], dequantize.input[2]
        else:
            continue
        if weights not in constants or zero_point not in constants or users[weights] > 1 or users[zero_point] > 1:
            continue  # a shared constant would change under another node too
        values = numpy_helper.to_array(constants[weights])
        zeros = numpy_helper.to_array(constants[zero_point])
        if values.dtype != np.int8 or zeros.any() or values.size == 0 or values.min() < -127:
            continue
        constants[weights].CopyFrom(numpy_helper.from_array((values.astype(np.int16) - 1).astype(np.int8), weights))
        constants[zero_point].CopyFrom(numpy_helper.from_array(np.full(zeros.shape, -1, np.int8), zero_point))
        rewritten.append(node.name)
    if rewritten:
        atomic_write_bytes(path, model.SerializeToString())
    return rewritten


def route_convolutions_where_faster(path: Path, batch_sizes: tuple[int, ...] = (1, 32), threads: int | None = None) -> list[str]:
    """Route to onnxruntime's int8 GEMM only the convolutions that run faster there, by the kernel
    times of one profiled session of each form at each batch size; returns the routed nodes' names.

    Which form wins depends on the layer's shape: with AMX, most of resnet18's convolutions run
    faster as a GEMM, but mobilenet_v2's 1x1 ones and resnet20's 16-64 channel ones slower
    (docs/experiments.md, 4.2 and 4.3).
    """
    import re

    from bmc.bench.profile import node_times_ms

    everywhere = path.with_name(f".{path.stem}-gemm{path.suffix}")
    shutil.copyfile(path, everywhere)
    try:
        candidates = route_convolutions_to_gemm(everywhere)
        gain = dict.fromkeys(candidates, 0.0)
        for batch in batch_sizes if candidates else ():
            direct = node_times_ms(path, batch, PROFILE_ITERATIONS, threads)
            gemm = node_times_ms(everywhere, batch, PROFILE_ITERATIONS, threads)
            total = sum(direct.values()) or 1.0
            for kernel, ms in direct.items():
                # onnxruntime's layout pass renames "/conv1/Conv_quant" to "/conv1/Conv_quant_token_3".
                node = re.sub(r"_token_\d+$", "", kernel)
                if node in gain and kernel in gemm:
                    gain[node] += (ms - gemm[kernel]) / total
    finally:
        everywhere.unlink(missing_ok=True)
    faster = {node for node, share in gain.items() if share > 0}
    return route_convolutions_to_gemm(path, only=faster) if faster else []


def compact_constants(path: Path) -> None:
    """Rewrite an ONNX file without the bytes that are neither weights nor structure: the shapes
    inferred for pre-processing (value_info, which onnxruntime infers again) and the quantizer's long
    names for constants ("/layers/layers.0/conv1/Conv_output_0_zero_point", one per scale, zero point
    and weight), renamed c0, c1, ... Node and activation names stay, so profiles still name layers.

    On resnet20 those bytes were 5% of the int8 file, where 4x smaller than fp32 is the limit of
    one byte per weight (docs/experiments.md, 4.1).
    """
    import onnx

    from bmc.artifact import atomic_write_bytes

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    if any(c.data_location == onnx.TensorProto.EXTERNAL for c in graph.initializer):
        return  # weights beside the file (over 2 GB): the names are a rounding error there
    del graph.value_info[:]
    # A subgraph (If, Loop) may name an outer constant: renaming is only safe without any.
    has_subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute)
    if not has_subgraphs:
        interface = {v.name for v in (*graph.input, *graph.output)}
        taken = interface | {c.name for c in graph.initializer} | {name for node in graph.node for name in node.output}
        renamed = {}
        for index, constant in enumerate(graph.initializer):
            short = f"c{index}"
            if constant.name not in interface and short not in taken:
                renamed[constant.name] = short
                constant.name = short
        for node in graph.node:
            node.input[:] = [renamed.get(name, name) for name in node.input]
    atomic_write_bytes(path, model.SerializeToString())


def gemms_as_matmuls(source: Path, target: Path) -> int:
    """source written to target with each Gemm that is a plain product (alpha = beta = 1, A not
    transposed, B a constant only it reads) as MatMul, then Add of its bias: the same values, in
    the operator onnxruntime's dynamic quantization has an integer kernel for. Returns how many were
    rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    constants = {c.name: c for c in graph.initializer}
    users = Counter(name for node in graph.node for name in node.input)
    nodes, rewritten = [], 0
    for node in graph.node:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (node.op_type == "Gemm" and attributes.get("alpha", 1.0) == 1.0 and attributes.get("beta", 1.0) == 1.0
                 and not attributes.get("transA", 0) and node.input[1] in constants and users[node.input[1]] == 1)
        if not plain:
            nodes.append(node)
            continue
        if attributes.get("transB", 0):
            weights = constants[node.input[1]]
            weights.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weights).T), weights.name))
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = f"{node.output[0]}_MatMul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], node.input[1]], [product], name=f"{node.name}_MatMul" if node.name else ""))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_Add" if node.name else ""))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(target))
    return rewritten
