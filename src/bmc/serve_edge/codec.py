"""The KServe v2 (Open Inference Protocol) wire format: JSON tensors and the binary tensor extension.

decode_infer_request turns a request body into validated numpy arrays for one model; every problem is
a RequestError that the app answers with 400 and `{"error": ...}` naming it. encode_infer_response
writes outputs as JSON data, or as raw little-endian bytes after the JSON header when the client asked
for binary outputs (what tritonclient does with binary_data=True).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import orjson

# v2 datatype -> numpy dtype, little-endian as the binary extension requires. BYTES (strings) is not served.
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
    requested, binary_outputs = _requested_outputs(request, output_names)
    request_id = request.get("id")
    return InferRequest(
        request_id=request_id if isinstance(request_id, str) else None,
        inputs=arrays,
        rows=rows,
        outputs=requested,
        binary_outputs=binary_outputs,
    )


def encode_infer_response(
    model_name: str, request: InferRequest, outputs: dict[str, np.ndarray], output_specs: tuple[TensorSpec, ...]
) -> tuple[bytes, int | None]:
    """(body, JSON header length or None): outputs as JSON data, or raw bytes after the header where asked."""
    entries = []
    binary_chunks: list[bytes] = []
    wanted = request.outputs if request.outputs is not None else tuple(spec.name for spec in output_specs)
    datatypes = {spec.name: spec.datatype for spec in output_specs}
    for name in wanted:
        array = np.ascontiguousarray(outputs[name])
        entry: dict = {"name": name, "datatype": datatypes[name], "shape": list(array.shape)}
        if name in request.binary_outputs:
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
        if binary_size != count * dtype.itemsize:
            raise RequestError(
                f"input {_shown(spec.name)}: shape {list(shape)} of {spec.datatype} needs {count * dtype.itemsize} bytes; "
                f"binary_data_size is {binary_size}"
            )
        if offset + binary_size > len(binary_part):
            raise RequestError(f"input {_shown(spec.name)}: the binary section ends before its {binary_size} bytes")
        array = np.frombuffer(binary_part[offset : offset + binary_size], dtype=dtype).reshape(shape)
        used = binary_size
    else:
        if "data" not in tensor:
            raise RequestError(f"input {_shown(spec.name)} has neither 'data' nor binary_data_size")
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


def _requested_outputs(request: dict, output_names: tuple[str, ...]) -> tuple[tuple[str, ...] | None, frozenset[str]]:
    parameters = request.get("parameters")
    all_binary = isinstance(parameters, dict) and parameters.get("binary_data_output") is True
    outputs = request.get("outputs")
    if outputs is None:
        return None, frozenset(output_names if all_binary else ())
    if not isinstance(outputs, list):
        raise RequestError("'outputs' must be a list of objects with a 'name'")
    names: list[str] = []
    binary: set[str] = set()
    for output in outputs:
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise RequestError("'outputs' must be a list of objects with a 'name'")
        name = output["name"]
        if name not in output_names:
            raise RequestError(f"unknown output {_shown(name)}; the model gives {', '.join(map(repr, output_names))}")
        names.append(name)
        own = output.get("parameters")
        wants_binary = own.get("binary_data") if isinstance(own, dict) else None
        if wants_binary is True or (wants_binary is None and all_binary):
            binary.add(name)
    return tuple(dict.fromkeys(names)), frozenset(binary)


def _names(specs: tuple[TensorSpec, ...]) -> str:
    return ", ".join(repr(spec.name) for spec in specs)


def _shown(value: object) -> str:
    """A client-supplied value for an error message: repr, cut short (it is echoed back, never logged)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
