"""What an ONNX file is, read from the file alone: size, parameters, numeric format, sparsity, operators."""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bmc.runtime.model_file import EXTERNAL, ModelFile, element_count, iter_nodes
from bmc.runtime.metadata import PREFIX, ModelMetadata

GZIP_LEVEL = 6
CHUNK_BYTES = 1 << 20
# Operators that carry int8 arithmetic themselves (QOperator format) rather than Q/DQ pairs around float ops.
QOPERATOR_OPS = {
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "QLinearAdd",
    "QLinearMul",
    "QLinearAveragePool",
    "QLinearGlobalAveragePool",
    "QLinearConcat",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QGemm",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
FLOAT_TYPES = {1: "fp32", 10: "fp16", 11: "fp64", 16: "bf16"}
# Initializers of these types hold shapes and indices, not weights.
NON_WEIGHT_TYPES = {7, 9, 8}  # INT64, BOOL, STRING


@dataclass(frozen=True)
class ModelFacts:
    """The static description of one ONNX file."""

    path: str
    size_bytes: int
    gzip_bytes: int
    data_files: tuple[str, ...]
    parameters: int
    numeric_format: str
    weight_sparsity: float | None  # fraction of zero values among float initializers
    opset: int
    opsets: dict
    ir_version: int
    producer: str
    operators: dict
    inputs: tuple[dict, ...]
    outputs: tuple[dict, ...]
    metadata: dict  # bmc's metadata (ModelMetadata fields) when the file carries it
    other_metadata: dict  # metadata_props bmc did not write

    def to_dict(self) -> dict:
        """Plain JSON types: lists, not tuples."""
        values = asdict(self)
        for key in ("data_files", "inputs", "outputs"):
            values[key] = list(values[key])
        return values


def model_facts(model: ModelFile, with_gzip: bool = True) -> ModelFacts:
    """Size, gzip size, parameters, numeric format, sparsity, opset, operators, inputs/outputs, metadata."""
    proto = model.proto
    operators = Counter(node.op_type for node in iter_nodes(proto))
    opsets = {entry.domain or "ai.onnx": int(entry.version) for entry in proto.opset_import}
    props = model.metadata_props
    is_bmc = any(key.startswith(PREFIX) for key in props)
    files = (model.path, *model.data_files)
    return ModelFacts(
        path=str(model.path),
        size_bytes=model.size_bytes,
        gzip_bytes=sum(gzip_size_bytes(p) for p in files) if with_gzip else 0,
        data_files=tuple(str(p) for p in model.data_files),
        parameters=parameter_count(proto),
        numeric_format=numeric_format(proto, operators),
        weight_sparsity=weight_sparsity(model),
        opset=opsets.get("ai.onnx", 0),
        opsets=opsets,
        ir_version=int(proto.ir_version),
        producer=" ".join(p for p in (proto.producer_name, proto.producer_version) if p),
        operators=dict(operators.most_common()),
        inputs=tuple(t.to_dict() for t in model.inputs),
        outputs=tuple(t.to_dict() for t in model.outputs),
        metadata=_metadata_dict(ModelMetadata.from_props(props)) if is_bmc else {},
        other_metadata={k: v for k, v in props.items() if not k.startswith(PREFIX)},
    )


def gzip_size_bytes(path: Path) -> int:
    """Bytes of path compressed with gzip at level 6, streamed so large weights need no memory."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: gzip container
    total = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            total += len(compressor.compress(chunk))
    return total + len(compressor.flush())


def parameter_count(proto) -> int:
    """Elements of all initializers except shape and index constants (int64, bool, string)."""
    return sum(
        element_count(tensor)
        for tensor in _initializers(proto.graph)
        if tensor.data_type not in NON_WEIGHT_TYPES
    )


def numeric_format(proto, operators: Counter) -> str:
    """int8 QOperator, int8 QDQ, or the float type holding most weight elements (fp32, fp16, bf16)."""
    if QOPERATOR_OPS & operators.keys():
        return "int8 QOperator"
    if QDQ_OPS & operators.keys():
        return "int8 QDQ"
    elements: Counter = Counter()
    for tensor in _initializers(proto.graph):
        if tensor.data_type in FLOAT_TYPES:
            elements[FLOAT_TYPES[tensor.data_type]] += element_count(tensor)
    if elements:
        return elements.most_common(1)[0][0]
    # No float weights: the input's type is all that is left to go by.
    for value in proto.graph.input:
        elem_type = value.type.tensor_type.elem_type
        if elem_type in FLOAT_TYPES:
            return FLOAT_TYPES[elem_type]
    return "fp32"


def weight_sparsity(model: ModelFile) -> float | None:
    """Fraction of exactly-zero values among float initializers; None when there are none."""
    zeros = total = 0
    by_name = {t.name: t for t in model.external}
    for tensor in _initializers(model.proto.graph):
        if tensor.data_type not in FLOAT_TYPES:
            continue
        values = _float_bits(tensor, by_name.get(tensor.name) if tensor.data_location == EXTERNAL else None)
        if values is None:
            continue
        zeros += values[1]
        total += values[0]
    return zeros / total if total else None


def _float_bits(tensor, external) -> tuple[int, int] | None:
    """(elements, zeros) of a float tensor, read without decoding it to float64."""
    # Compare bit patterns with the sign masked: -0.0 is a pruned weight too.
    dtype, mask = {1: (np.uint32, 0x7FFFFFFF), 10: (np.uint16, 0x7FFF), 16: (np.uint16, 0x7FFF), 11: (np.uint64, 0x7FFFFFFFFFFFFFFF)}[
        tensor.data_type
    ]
    if external is not None:
        if external.length_bytes == 0:
            return None
        data = np.memmap(external.data_path, dtype=np.uint8, mode="r", offset=external.offset_bytes, shape=(external.length_bytes,))
        bits = data.view(dtype)
    elif tensor.HasField("raw_data"):
        bits = np.frombuffer(tensor.raw_data, dtype=dtype)
    elif tensor.data_type == 1:
        bits = np.asarray(tensor.float_data, dtype=np.float32).view(np.uint32)
    elif tensor.data_type == 11:
        bits = np.asarray(tensor.double_data, dtype=np.float64).view(np.uint64)
    else:  # fp16 and bf16 keep their bit patterns in int32_data
        bits = np.asarray(tensor.int32_data, dtype=np.int64).astype(np.uint16)
    if bits.size == 0:
        return None
    zeros = 0
    for start in range(0, bits.size, 1 << 24):
        zeros += int(np.count_nonzero((bits[start : start + (1 << 24)] & mask) == 0))
    return int(bits.size), zeros


def _initializers(graph):
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values


def _metadata_dict(metadata: ModelMetadata) -> dict:
    values = asdict(metadata)
    values["class_names"] = list(metadata.class_names)
    values["input_shape"] = list(metadata.input_shape)
    values["data_input_shape"] = list(metadata.data_input_shape)
    values["runtime_targets"] = {str(b): t.to_dict() for b, t in sorted(metadata.runtime_targets.items())}
    return values
