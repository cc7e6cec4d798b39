"""The KServe v2 (Open Inference Protocol) wire format: JSON tensors and the binary tensor extension.

decode_infer_request turns a request body into validated numpy arrays for one model; every problem is
a RequestError that the app answers with 400 and `{"error": ...}` naming it. encode_infer_response
writes outputs as JSON data, or as raw little-endian bytes after the JSON header when the client asked
for binary outputs (what tritonclient does with binary_data=True).

BYTES tensors (ONNX string tensors) travel as JSON strings, or in binary form as each element's
length (4 bytes, little-endian) followed by its bytes. onnxruntime's string tensors hold text: the
elements go to it as Python str, so a binary element must be valid UTF-8.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np
import orjson

# v2 datatype -> numpy dtype, little-endian as the binary extension requires. BYTES are object arrays of
# str: what onnxruntime takes for a string tensor (it would str() a bytes object: b'...').
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
ORT_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
# Which numpy kinds JSON data may parse to for each datatype family: JSON writes 0 for 0.0, so
# integers are fine in float tensors; floats in integer tensors and strings anywhere are not.
_ALLOWED_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}
HEADER_LENGTH = "inference-header-content-length"
_LENGTH_PREFIX = struct.Struct("<I")


class RequestError(Exception):
    """A request the server cannot run; answered with `status` and {"error": message}."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the protocol shows it: dims are ints, None where the model's is dynamic."""

    name: str
    datatype: str
    dims: tuple[int | None, ...]

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": [-1 if d is None else d for d in self.dims]}


@dataclass(frozen=True)
class InferRequest:
    """A decoded, validated request: one array per model input, `rows` along the batch axis."""

    request_id: str | None
    inputs: dict[str, np.ndarray]
    rows: int
    outputs: tuple[str, ...] | None  # requested output names, None for all
    binary_outputs: frozenset[str]  # names to send as raw bytes
    classification: dict[str, int] = field(default_factory=dict)  # output name -> top-k, Triton's classification extension


def decode_infer_request(
    body: bytes, header_length: str | None, inputs: tuple[TensorSpec, ...], output_names: tuple[str, ...], reject_nonfinite: bool
) -> InferRequest:
    """Parse and check a v2 infer body against the model's inputs; RequestError on any mismatch."""
    json_part, binary_part = _split_body(body, header_length)
    try:
        # orjson parses without recursing on the C stack; newer releases refuse nesting past 1024 levels.
        request = orjson.loads(json_part)
    except (orjson.JSONDecodeError, RecursionError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON ({_short(exc)})") from None
    if not isinstance(request, dict):
        raise RequestError("the request body must be a JSON object with an 'inputs' list")
    tensors = request.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise RequestError("the request needs a non-empty 'inputs' list")
    by_name = {spec.name: spec for spec in inputs}
    arrays: dict[str, np.ndarray] = {}
    binary_offset = 0
    for tensor in tensors:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise RequestError("each input must be an object with a 'name'")
        name = tensor["name"]
        spec = by_name.get(name)
        if spec is None:
            raise RequestError(f"unknown input {_shown(name)}; the model takes {_names(inputs)}")
        if name in arrays:
            raise RequestError(f"input {_shown(name)} is given twice")
        shape = _checked_shape(tensor, spec)
        array, used_bytes = _tensor_data(tensor, spec, shape, binary_part, binary_offset, reject_nonfinite)
        binary_offset += used_bytes
        arrays[name] = array
    missing = [spec.name for spec in inputs if spec.name not in arrays]
    if missing:
        raise RequestError(f"missing input {_shown(missing[0])}; the model takes {_names(inputs)}")
    if binary_part is not None and binary_offset != len(binary_part):
        raise RequestError(
            f"the binary section holds {len(binary_part)} bytes, the inputs' binary_data_size add up to {binary_offset}"
        )
    rows_per_input = {int(array.shape[0]) if array.ndim else 1 for array in arrays.values()}
    if len(rows_per_input) != 1:
        raise RequestError(f"inputs disagree on the batch size (first dimensions {sorted(rows_per_input)})")
    rows = rows_per_input.pop()
    if rows < 1:
        raise RequestError("the batch is empty (first dimension 0)")
    requested, binary_outputs, classification = _requested_outputs(request, output_names)
    request_id = request.get("id")
    return InferRequest(
        request_id=request_id if isinstance(request_id, str) else None,
        inputs=arrays,
        rows=rows,
        outputs=requested,
        binary_outputs=binary_outputs,
        classification=classification,
    )


def encode_infer_response(
    model_name: str,
    request: InferRequest,
    outputs: dict[str, np.ndarray],
    output_specs: tuple[TensorSpec, ...],
    class_labels: tuple[str, ...] = (),
) -> tuple[bytes, int | None]:
    """(body, JSON header length or None): outputs as JSON data, or raw bytes after the header where asked.

    An output asked for with the classification parameter goes out as BYTES "score:index[:label]",
    its label from `class_labels`."""
    entries = []
    binary_chunks: list[bytes] = []
    wanted = request.outputs if request.outputs is not None else tuple(spec.name for spec in output_specs)
    specs = {spec.name: spec for spec in output_specs}
    for name in wanted:
        array = outputs[name]
        datatype = specs[name].datatype
        if request.classification and name in request.classification:
            from bmc.serve_edge.triton import classify_output

            array = classify_output(specs[name], array, request.classification[name], class_labels)
            datatype = "BYTES"
        array = np.ascontiguousarray(array)
        entry: dict = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if datatype == "BYTES":
            if name in request.binary_outputs:
                raw = _length_prefixed(array.reshape(-1))
                entry["parameters"] = {"binary_data_size": len(raw)}
                binary_chunks.append(raw)
            else:
                entry["data"] = [_text(item) for item in array.reshape(-1).tolist()]
        elif name in request.binary_outputs:
            raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            binary_chunks.append(raw)
        else:
            # orjson writes numpy arrays natively; float16 goes out as float32 (same values).
            flat = array.reshape(-1)
            entry["data"] = flat.astype(np.float32) if flat.dtype == np.float16 else flat
        entries.append(entry)
    response: dict = {"model_name": model_name, "model_version": "1", "outputs": entries}
    if request.request_id is not None:
        response["id"] = request.request_id
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not binary_chunks:
        return header, None
    return b"".join([header, *binary_chunks]), len(header)


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview | None]:
    if header_length is None:
        return body, None
    try:
        length = int(header_length)
    except ValueError:
        raise RequestError(f"Inference-Header-Content-Length must be an integer; got {_shown(header_length)}") from None
    if not 0 < length <= len(body):
        raise RequestError(f"Inference-Header-Content-Length {length} is outside the body's {len(body)} bytes")
    view = memoryview(body)
    return body[:length], view[length:]


def _checked_shape(tensor: dict, spec: TensorSpec) -> tuple[int, ...]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise RequestError(f"input {_shown(spec.name)} needs a 'shape' list of integers")
    if any(d < 0 for d in shape):
        raise RequestError(f"input {_shown(spec.name)} has a negative dimension in shape {shape}")
    expected = [-1 if d is None else d for d in spec.dims]
    if len(shape) != len(spec.dims) or any(want is not None and want != got for want, got in zip(spec.dims, shape)):
        raise RequestError(f"input {_shown(spec.name)} has shape {shape}; the model takes {expected} (-1: any)")
    datatype = tensor.get("datatype")
    if datatype != spec.datatype:
        raise RequestError(f"input {_shown(spec.name)} is {_shown(datatype)}; the model takes {spec.datatype}")
    return tuple(shape)


def _tensor_data(
    tensor: dict, spec: TensorSpec, shape: tuple[int, ...], binary_part: memoryview | None, offset: int, reject_nonfinite: bool
) -> tuple[np.ndarray, int]:
    """The tensor's array and how many bytes of the binary section it used."""
    dtype = V2_TO_NUMPY.get(spec.datatype)
    if dtype is None:
        raise RequestError(f"input {_shown(spec.name)}: datatype {spec.datatype} is not supported by this server")
    count = math.prod(shape)
    strings = spec.datatype == "BYTES"
    parameters = tensor.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise RequestError(f"input {_shown(spec.name)}: 'parameters' must be an object")
    binary_size = (parameters or {}).get("binary_data_size")
    if binary_size is not None:
        if "data" in tensor:
            raise RequestError(f"input {_shown(spec.name)} has both 'data' and binary_data_size")
        if binary_part is None:
            raise RequestError(f"input {_shown(spec.name)} has binary_data_size but the request has no Inference-Header-Content-Length")
        if not isinstance(binary_size, int) or isinstance(binary_size, bool) or binary_size < 0:
            raise RequestError(f"input {_shown(spec.name)}: binary_data_size must be a non-negative integer")
        if not strings and binary_size != count * dtype.itemsize:
            raise RequestError(
                f"input {_shown(spec.name)}: shape {list(shape)} of {spec.datatype} needs {count * dtype.itemsize} bytes; "
                f"binary_data_size is {binary_size}"
            )
        if offset + binary_size > len(binary_part):
            raise RequestError(f"input {_shown(spec.name)}: the binary section ends before its {binary_size} bytes")
        section = binary_part[offset : offset + binary_size]
        if strings:
            array = _binary_strings(section, spec, shape, count)
        else:
            array = np.frombuffer(section, dtype=dtype).reshape(shape)
        used = binary_size
    else:
        if "data" not in tensor:
            raise RequestError(f"input {_shown(spec.name)} has neither 'data' nor binary_data_size")
        if strings:
            array = _json_strings(tensor["data"], spec, shape, count)
        else:
            array = _json_data(tensor["data"], spec, dtype, shape, count)
        used = 0
    if reject_nonfinite and dtype.kind == "f" and not np.isfinite(array).all():
        raise RequestError(f"input {_shown(spec.name)} holds NaN or infinite values (--reject-nonfinite)")
    return array, used


def _json_data(data: object, spec: TensorSpec, dtype: np.dtype, shape: tuple[int, ...], count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise RequestError(f"input {_shown(spec.name)}: 'data' must be a list")
    try:
        parsed = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise RequestError(f"input {_shown(spec.name)}: 'data' is ragged or holds values of mixed types") from None
    if parsed.size != count:
        raise RequestError(f"input {_shown(spec.name)}: shape {list(shape)} needs {count} values; 'data' holds {parsed.size}")
    if count and parsed.dtype.kind not in _ALLOWED_KINDS[dtype.kind]:
        kind = {"U": "strings", "S": "strings", "O": "non-numbers or huge integers", "b": "booleans", "f": "floats"}.get(
            parsed.dtype.kind, parsed.dtype.name
        )
        raise RequestError(f"input {_shown(spec.name)} is {spec.datatype}; 'data' holds {kind}")
    limits = np.iinfo(dtype) if dtype.kind in "iu" else np.finfo(dtype) if dtype.kind == "f" else None
    # Beyond the range, the cast would give wrapped integers or infinities (1e39 as FP32): refused instead.
    if limits is not None and count and (parsed.min() < limits.min or parsed.max() > limits.max):
        raise RequestError(f"input {_shown(spec.name)}: values outside the range of {spec.datatype}")
    return parsed.astype(dtype, copy=False).reshape(shape)


def _binary_strings(section: memoryview, spec: TensorSpec, shape: tuple[int, ...], count: int) -> np.ndarray:
    """`count` length-prefixed UTF-8 elements filling `section` exactly, as an object array of str."""
    if count * _LENGTH_PREFIX.size > len(section):  # before the loop: a huge shape costs nothing
        raise RequestError(
            f"input {_shown(spec.name)}: shape {list(shape)} of BYTES needs at least {count * _LENGTH_PREFIX.size} bytes; "
            f"binary_data_size is {len(section)}"
        )
    items: list[str] = []
    offset, end = 0, len(section)
    for index in range(count):
        if offset + _LENGTH_PREFIX.size > end:
            raise RequestError(f"input {_shown(spec.name)}: the binary data ends before element {index}'s 4-byte length")
        (length,) = _LENGTH_PREFIX.unpack_from(section, offset)
        offset += _LENGTH_PREFIX.size
        if offset + length > end:
            raise RequestError(f"input {_shown(spec.name)}: element {index} is {length} bytes; the binary data ends before")
        try:
            items.append(str(section[offset : offset + length], "utf-8"))
        except UnicodeDecodeError:
            raise RequestError(f"input {_shown(spec.name)}: element {index} is not UTF-8 (the model's string tensors hold text)") from None
        offset += length
    if offset != end:
        raise RequestError(f"input {_shown(spec.name)}: {end - offset} bytes follow the last of its {count} elements")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


def _json_strings(data: object, spec: TensorSpec, shape: tuple[int, ...], count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise RequestError(f"input {_shown(spec.name)}: 'data' must be a list")
    try:
        # dtype=object keeps each str whole (a numpy unicode array would drop trailing NUL characters).
        parsed = np.array(data, dtype=object)
    except (ValueError, TypeError, RecursionError):
        raise RequestError(f"input {_shown(spec.name)}: 'data' is ragged") from None
    flat = parsed.reshape(-1)
    if flat.size != count:
        raise RequestError(f"input {_shown(spec.name)}: shape {list(shape)} needs {count} values; 'data' holds {flat.size}")
    if not all(type(item) is str for item in flat):
        raise RequestError(f"input {_shown(spec.name)} is BYTES; 'data' must hold strings only (nested lists of equal length)")
    return flat.reshape(shape)


def _length_prefixed(flat: np.ndarray) -> bytes:
    """BYTES elements in the binary tensor form: each one's length (uint32, little-endian), then its bytes."""
    parts: list[bytes] = []
    for item in flat.tolist():
        raw = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH_PREFIX.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _text(item: object) -> str:
    return item if isinstance(item, str) else bytes(item).decode("utf-8", "replace")


def _requested_outputs(
    request: dict, output_names: tuple[str, ...]
) -> tuple[tuple[str, ...] | None, frozenset[str], dict[str, int]]:
    parameters = request.get("parameters")
    all_binary = isinstance(parameters, dict) and parameters.get("binary_data_output") is True
    outputs = request.get("outputs")
    if outputs is None:
        return None, frozenset(output_names if all_binary else ()), {}
    if not isinstance(outputs, list):
        raise RequestError("'outputs' must be a list of objects with a 'name'")
    names: list[str] = []
    binary: set[str] = set()
    classification: dict[str, int] = {}
    for output in outputs:
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise RequestError("'outputs' must be a list of objects with a 'name'")
        name = output["name"]
        if name not in output_names:
            raise RequestError(f"unknown output {_shown(name)}; the model gives {', '.join(map(repr, output_names))}")
        names.append(name)
        own = output.get("parameters")
        if own is not None and not isinstance(own, dict):
            raise RequestError(f"output {_shown(name)}: 'parameters' must be an object")
        wants_binary = own.get("binary_data") if own else None
        if wants_binary is True or (wants_binary is None and all_binary):
            binary.add(name)
        top_k = own.get("classification") if own else None
        if top_k is not None:
            if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
                raise RequestError(f"output {_shown(name)}: 'classification' must be a non-negative integer; got {_shown(top_k)}")
            if top_k:  # 0: no classification, as tritonclient's class_count=0 means
                classification[name] = top_k
    return tuple(dict.fromkeys(names)), frozenset(binary), classification


def _names(specs: tuple[TensorSpec, ...]) -> str:
    return ", ".join(repr(spec.name) for spec in specs)


def _shown(value: object) -> str:
    """A client-supplied value for an error message: repr, cut short (it is echoed back, never logged)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
