"""Where a model's multiply-accumulates go, read from its ONNX graph: whether dynamic int8 (weights
quantized ahead, activations at run time) suits it.

onnxruntime's dynamic quantization has integer kernels for MatMul and LSTM, not for convolutions
(ConvInteger is slower than fp32 convolution), so it pays where the compute is matrix products:
MLPs, Transformers, recurrent nets. Weight counts alone would mislead: a LeNet's fully connected
layers hold 95% of its weights but its convolutions do most of the work, each weight once per
output position. So multiply-accumulates are counted, per sample, from the shapes ONNX infers.
No torch here.
"""

from __future__ import annotations

from pathlib import Path

# A model whose matrix products and recurrent layers do at least this share of the
# multiply-accumulates of its weighted layers gets the dynamic recipe among its candidates.
MATMUL_HEAVY_SHARE = 0.5
MATRIX_OPS = ("MatMul", "Gemm", "LSTM", "GRU", "RNN")
CONVOLUTION_OPS = ("Conv", "ConvTranspose")
# Initializers above this many elements lose their values before shape inference: shapes come from
# their dims, and a 1.6 GB model is not copied for it (small ones may be Reshape targets, kept).
_LARGE_CONSTANT_ELEMENTS = 1 << 16


def macs_by_op_type(model_path: Path) -> dict[str, int]:
    """Multiply-accumulates per sample of each weighted operator type (MATRIX_OPS, CONVOLUTION_OPS) in
    the model's main graph; dimensions ONNX cannot infer (batch, symbolic lengths) count as 1."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for constant in model.graph.initializer:
        if _elements(constant.dims) > _LARGE_CONSTANT_ELEMENTS:
            constant.ClearField("raw_data")
            constant.data_location = onnx.TensorProto.DEFAULT
            del constant.external_data[:]
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - onnx raises several types; fewer shapes only make the count coarser
        pass
    graph = model.graph
    shapes = {c.name: list(c.dims) for c in graph.initializer}
    for value in (*graph.input, *graph.value_info, *graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            shapes.setdefault(value.name, [d.dim_value if d.HasField("dim_value") else 0 for d in value.type.tensor_type.shape.dim])
    totals: dict[str, int] = {}
    for node in graph.node:
        if node.op_type in MATRIX_OPS or node.op_type in CONVOLUTION_OPS:
            count = _node_macs(node, shapes)
            if count:
                totals[node.op_type] = totals.get(node.op_type, 0) + count
    return totals


def matmul_share(model_path: Path) -> float:
    """The share of the weighted layers' multiply-accumulates done by matrix products and recurrent
    layers (0 for a model with neither, or none to count)."""
    totals = macs_by_op_type(model_path)
    everything = sum(totals.values())
    return sum(v for k, v in totals.items() if k in MATRIX_OPS) / everything if everything else 0.0


def is_matmul_heavy(model_path: Path) -> bool:
    """Whether matrix products do most of the model's compute: dynamic int8 is worth a candidate."""
    return matmul_share(model_path) >= MATMUL_HEAVY_SHARE


def _node_macs(node, shapes: dict[str, list[int]]) -> int:
    inputs = [shapes.get(name) for name in node.input]
    output = shapes.get(node.output[0]) if node.output else None
    if node.op_type == "MatMul" and inputs[0] and output:
        # Every output element is a dot product over the first input's last axis; the batch axis counts once.
        return _elements(output[1:] if len(output) > 2 else output[-1:]) * max(inputs[0][-1], 1)
    if node.op_type == "Gemm" and len(inputs) > 1 and inputs[1] and len(inputs[1]) == 2:
        return _elements(inputs[1])  # one row per sample: each weight used once
    if node.op_type in ("LSTM", "GRU", "RNN") and len(inputs) > 2 and inputs[1] and inputs[2]:
        steps = max(inputs[0][0], 1) if inputs[0] else 1
        return (_elements(inputs[1]) + _elements(inputs[2])) * steps
    if node.op_type in CONVOLUTION_OPS and len(inputs) > 1 and inputs[1]:
        # Each weight once per output position (ConvTranspose: per input position).
        positions = (output if node.op_type == "Conv" else inputs[0]) or []
        return _elements(inputs[1]) * _elements(positions[2:])
    return 0


def _elements(dims) -> int:
    count = 1
    for d in dims:
        count *= max(int(d), 1)
    return count
