"""Open an ONNX file safely: parse it without its external data, then prove every reference is sound.

onnxruntime follows a tensor's external-data `location` wherever it points. A file from elsewhere
could name `../../etc/shadow`, an absolute path or a symlink and make the runtime read it (the onnx
CVE-2022-25882 / CVE-2024-27318 family), so every location is checked here, before any file is
handed to onnxruntime: relative, no `..`, no symlink on the way, inside the model's folder, and
offset + length within the data file. `open_model_bytes` makes the same checks on a model already
read into memory (and verified), against the bytes held rather than the files on disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from bmc.errors import BmcError


class ModelFileError(BmcError):
    """An ONNX file is missing, unreadable, malformed or refers to data it must not read."""


# Bytes per element of the fixed-size ONNX element types (TensorProto.DataType values);
# 4-bit types pack two elements per byte and are handled apart.
ELEMENT_BYTES = {
    1: 4,  # FLOAT
    2: 1,  # UINT8
    3: 1,  # INT8
    4: 2,  # UINT16
    5: 2,  # INT16
    6: 4,  # INT32
    7: 8,  # INT64
    9: 1,  # BOOL
    10: 2,  # FLOAT16
    11: 8,  # DOUBLE
    12: 4,  # UINT32
    13: 8,  # UINT64
    14: 8,  # COMPLEX64
    15: 16,  # COMPLEX128
    16: 2,  # BFLOAT16
    17: 1,  # FLOAT8E4M3FN
    18: 1,  # FLOAT8E4M3FNUZ
    19: 1,  # FLOAT8E5M2
    20: 1,  # FLOAT8E5M2FNUZ
    24: 1,  # FLOAT8E8M0
}
FOUR_BIT_TYPES = {21, 22, 23, 25}  # UINT4, INT4, FLOAT4E2M1, (UINT2/INT2 round up the same way)
EXTERNAL = 1  # TensorProto.EXTERNAL


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output: name, element type and shape (ints, or names for dynamic axes)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ExternalTensor:
    """Where one tensor's bytes live outside the model file, already checked to be safe."""

    name: str
    data_path: Path
    offset_bytes: int
    length_bytes: int


@dataclass(frozen=True)
class ModelFile:
    """A parsed, checked ONNX file. `proto` holds no external data; `external` says where it is.

    `held`: for a model checked in memory (open_model_bytes), the bytes a runtime builds its session
    from, external data keyed by the locations exactly as the model names them.
    """

    path: Path
    proto: object  # onnx.ModelProto (typed loosely so this module imports onnx lazily)
    external: tuple[ExternalTensor, ...]
    held: "ModelBytes | None" = None

    @property
    def data_files(self) -> tuple[Path, ...]:
        """The distinct external data files, in first-use order."""
        return tuple(dict.fromkeys(t.data_path for t in self.external))

    @property
    def size_bytes(self) -> int:
        """The model file plus its external data files."""
        if self.held is not None:
            return self.held.size_bytes
        return self.path.stat().st_size + sum(p.stat().st_size for p in self.data_files)

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        """Graph inputs that are fed at run time (initializers listed as inputs excluded)."""
        graph = self.proto.graph
        constants = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
        return tuple(_tensor_info(v) for v in graph.input if v.name not in constants)

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return tuple(_tensor_info(v) for v in self.proto.graph.output)

    @property
    def metadata_props(self) -> dict[str, str]:
        return {p.key: p.value for p in self.proto.metadata_props}


@dataclass(frozen=True)
class ModelBytes:
    """A model held in memory: the ONNX file's bytes and each external data file's bytes by its location.

    A runtime builds its session from these bytes, never from the path again, so what was read (and
    verified) is what runs, whatever happens to the files afterwards.
    """

    path: Path  # where the bytes were read from: for messages only
    model: bytes
    # location as the model names it -> that file's bytes (a bytearray where it was decrypted in place)
    external_data: dict[str, bytes | bytearray]

    def __str__(self) -> str:
        return str(self.path)

    @property
    def size_bytes(self) -> int:
        """The model's bytes plus each distinct data file's."""
        distinct = {id(data): len(data) for data in self.external_data.values()}
        return len(self.model) + sum(distinct.values())


def open_model(path: Path | str) -> ModelFile:
    """Parse and check an ONNX file; any problem is a one-line ModelFileError naming the file."""
    import onnx

    from bmc.sealed import is_sealed_file, sealed_message

    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if not path.is_file():
        raise ModelFileError(f"{path}: not a file")
    if is_sealed_file(path):
        raise ModelFileError(sealed_message(path))
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except Exception as exc:  # protobuf's DecodeError and friends: all mean "not a whole ONNX file"
        raise ModelFileError(f"{path}: not an ONNX model, or a truncated one ({_first_line(exc)})") from None
    try:
        _check_structure(path, proto)
        external = tuple(_checked_external_tensors(path, proto))
        _run_checker(path, proto, bool(external))
    except BmcError:
        raise
    except Exception as exc:  # a mangled message can break the inspection itself; still one line
        raise ModelFileError(f"{path}: malformed ONNX model ({type(exc).__name__}: {_first_line(exc)})") from None
    return ModelFile(path=path, proto=proto, external=external)


def open_model_bytes(held: ModelBytes) -> ModelFile:
    """Parse and check a model already in memory, as open_model checks a file, without reading the disk.

    held.external_data may key each data file by its normalized location (as a manifest lists it:
    `model.onnx.data`, not `./model.onnx.data`); every location the model names must find its bytes
    there and every file held must be used. The ModelFile's `held` keys them as the model names them.
    """
    import onnx

    path = Path(held.path)
    try:
        proto = onnx.load_model_from_string(held.model)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelFileError(f"{path}: not an ONNX model, or a truncated one ({_first_line(exc)})") from None
    try:
        _check_structure(path, proto)
        external, by_location = _held_external_tensors(path, proto, held.external_data)
        _run_checker_on_bytes(path, proto, held.model, bool(external))
    except BmcError:
        raise
    except Exception as exc:  # a mangled message can break the inspection itself; still one line
        raise ModelFileError(f"{path}: malformed ONNX model ({type(exc).__name__}: {_first_line(exc)})") from None
    return ModelFile(path=path, proto=proto, external=external, held=ModelBytes(path, held.model, by_location))


def normalized_location(label: str, location: str) -> str:
    """An external data location as a plain relative name (`a/b.data`); ModelFileError if it could leave the folder."""
    shown = f"external data location {location!r}"
    if not location:
        raise ModelFileError(f"{label} is stored externally but names no location")
    if "\x00" in location:
        raise ModelFileError(f"{label}: {shown} contains a NUL byte")
    # Windows separators and drive letters count too: the same file may be read on another system.
    parts = location.replace("\\", "/").split("/")
    if location.startswith(("/", "\\")) or os.path.isabs(location) or (len(parts[0]) == 2 and parts[0][1] == ":"):
        raise ModelFileError(f"{label}: {shown} is an absolute path; it must be a file next to the model")
    if ".." in parts:
        raise ModelFileError(f"{label}: {shown} points outside the model's folder ('..')")
    steps = [p for p in parts if p not in ("", ".")]
    if not steps:
        raise ModelFileError(f"{label}: {shown} names no file")
    return "/".join(steps)


def data_file_path(model_path: Path, location: str) -> Path:
    """The file a data location names next to the model, refused if it is missing or could leave the folder."""
    model_path = Path(model_path)
    return _safe_data_path(f"{model_path}", location, model_path.parent, model_path.parent.resolve())


def iter_tensors(proto) -> Iterator[tuple[object, str]]:
    """Every TensorProto in a model, with where it sits: initializers, Constant/attribute tensors, subgraphs, functions."""
    yield from _graph_tensors(proto.graph, proto.graph.name or "graph")
    for function in proto.functions:
        for node in function.node:
            yield from _node_tensors(node, f"function {function.name}")


def iter_nodes(proto) -> Iterator[object]:
    """Every node of the main graph, its subgraphs and the model's functions."""
    yield from _graph_nodes(proto.graph)
    for function in proto.functions:
        for node in function.node:
            yield node
            yield from _subgraph_nodes(node)


def element_count(tensor) -> int:
    count = 1
    for dim in tensor.dims:
        count *= int(dim)
    return count


def expected_bytes(tensor) -> int | None:
    """The byte length of a tensor's data from its dims and type; None for strings and unknown types."""
    count = element_count(tensor)
    if tensor.data_type in ELEMENT_BYTES:
        return count * ELEMENT_BYTES[tensor.data_type]
    if tensor.data_type in FOUR_BIT_TYPES:
        return (count + 1) // 2
    return None


def _check_structure(path: Path, proto) -> None:
    _check_text(path, proto)
    # protobuf happily parses an empty or cut-off file into a message with fields missing.
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise ModelFileError(f"{path}: not an ONNX model, or a truncated one (no graph nodes)")
    if proto.ir_version <= 0:
        raise ModelFileError(f"{path}: not an ONNX model, or a truncated one (no ir_version)")
    if not proto.opset_import:
        raise ModelFileError(f"{path}: not an ONNX model, or a truncated one (no opset_import)")
    for tensor, where in iter_tensors(proto):
        for dim in tensor.dims:
            if dim < 0:
                raise ModelFileError(f"{path}: tensor {tensor.name!r} in {where} has a negative dimension {dim}")
        if tensor.data_location != EXTERNAL and tensor.HasField("raw_data"):
            expected = expected_bytes(tensor)
            if expected is not None and len(tensor.raw_data) != expected:
                raise ModelFileError(
                    f"{path}: tensor {tensor.name!r} holds {len(tensor.raw_data)} bytes, its shape needs {expected}"
                    " (truncated or corrupt)"
                )


def _check_text(path: Path, message) -> None:
    """Every string field must be UTF-8: protobuf hands back bytes for one that is not, and names,
    operator types and metadata must be text everywhere after this."""
    # Only string and message fields are read: reading a bytes field (raw_data) would copy the weights.
    for field in message.DESCRIPTOR.fields:
        if field.type not in (field.TYPE_STRING, field.TYPE_MESSAGE):
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            values = getattr(message, field.name)
        elif message.HasField(field.name):
            values = (getattr(message, field.name),)
        else:
            continue
        if field.type == field.TYPE_STRING:
            if any(isinstance(v, bytes) for v in values):
                raise ModelFileError(f"{path}: malformed ONNX model (field {field.full_name} is not valid UTF-8 text)")
        else:
            for child in values:
                _check_text(path, child)


def _checked_external_tensors(path: Path, proto) -> Iterator[ExternalTensor]:
    model_dir = path.parent
    real_model_dir = model_dir.resolve()
    for tensor, where in iter_tensors(proto):
        if tensor.data_location != EXTERNAL:
            continue
        fields = {entry.key: entry.value for entry in tensor.external_data}
        label = f"{path}: tensor {tensor.name!r}"
        location = fields.get("location", "")
        if not location:
            raise ModelFileError(f"{label} is stored externally but names no location")
        data_path = _safe_data_path(label, location, model_dir, real_model_dir)
        offset = _non_negative_int(label, "offset", fields.get("offset", "0"))
        size = data_path.stat().st_size
        if "length" in fields:
            length = _non_negative_int(label, "length", fields["length"])
        else:
            length = size - offset
        if offset + length > size or length < 0:
            raise ModelFileError(
                f"{label}: external data {location!r} is {size} bytes, the tensor needs bytes "
                f"{offset}..{offset + max(length, 0)} (truncated data file?)"
            )
        expected = expected_bytes(tensor)
        if expected is not None and length != expected:
            raise ModelFileError(f"{label}: external data length {length} bytes, its shape needs {expected}")
        yield ExternalTensor(tensor.name, data_path, offset, length)


def _safe_data_path(label: str, location: str, model_dir: Path, real_model_dir: Path) -> Path:
    """The data file for `location`, or an error if reading it could leave the model's folder."""
    shown = f"external data location {location!r}"
    steps = normalized_location(label, location).split("/")
    current = model_dir
    for index, part in enumerate(steps):
        current = current / part
        if current.is_symlink():
            kind = "file" if index == len(steps) - 1 else "folder"
            raise ModelFileError(f"{label}: {shown} goes through a symlinked {kind} ({current}); refusing to follow it")
    if not current.is_file():
        raise ModelFileError(f"{label}: {shown} does not exist next to the model ({current})")
    if not current.resolve().is_relative_to(real_model_dir):
        raise ModelFileError(f"{label}: {shown} resolves outside the model's folder")
    return current


def _held_external_tensors(path: Path, proto, files: dict) -> tuple[tuple[ExternalTensor, ...], dict]:
    """The external tensors checked against the bytes held, and those bytes keyed as the model names them."""
    external: list[ExternalTensor] = []
    by_location: dict = {}
    used: set[str] = set()
    for tensor, _where in iter_tensors(proto):
        if tensor.data_location != EXTERNAL:
            continue
        fields = {entry.key: entry.value for entry in tensor.external_data}
        label = f"{path}: tensor {tensor.name!r}"
        location = fields.get("location", "")
        name = normalized_location(label, location)
        key = location if location in files else name
        if key not in files:
            held = ", ".join(repr(k) for k in files) or "none"
            raise ModelFileError(
                f"{label}: external data {location!r} is not among the files read and verified with the model "
                f"({held}); its manifest must list every file the model uses"
            )
        used.add(key)
        by_location[location] = files[key]
        size = len(files[key])
        offset = _non_negative_int(label, "offset", fields.get("offset", "0"))
        length = _non_negative_int(label, "length", fields["length"]) if "length" in fields else size - offset
        if offset + length > size or length < 0:
            raise ModelFileError(
                f"{label}: external data {location!r} is {size} bytes, the tensor needs bytes "
                f"{offset}..{offset + max(length, 0)} (truncated data file?)"
            )
        expected = expected_bytes(tensor)
        if expected is not None and length != expected:
            raise ModelFileError(f"{label}: external data length {length} bytes, its shape needs {expected}")
        external.append(ExternalTensor(tensor.name, path.parent / name, offset, length))
    unused = sorted(set(files) - used)
    if unused:
        raise ModelFileError(f"{path}: {unused[0]!r} was given as its data, but the model uses no such file")
    return tuple(external), by_location


def _run_checker_on_bytes(path: Path, proto, model: bytes, has_external: bool) -> None:
    import onnx

    if has_external:
        # The checker looks for each external location on disk (relative to the working directory when
        # given bytes); its bytes are held and already checked, so it sees inline placeholders instead.
        proto = _with_inline_placeholders(proto)
        model = proto.SerializeToString()
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise ModelFileError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from None


def _with_inline_placeholders(proto):
    """A copy of a model whose weights all live externally (so the copy is small), each external tensor
    turned into a one-element inline one: the checker sizes inline data against its dims, and the real
    lengths were checked against the bytes held already."""
    copy = type(proto)()
    copy.CopyFrom(proto)
    for tensor, _where in iter_tensors(copy):
        if tensor.data_location == EXTERNAL:
            del tensor.external_data[:]
            del tensor.dims[:]
            tensor.dims.append(1)
            tensor.data_location = 0  # TensorProto.DEFAULT
            tensor.raw_data = b"\0" * (expected_bytes(tensor) or 1)
    return copy


def _non_negative_int(label: str, key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ModelFileError(f"{label}: external data {key} {value!r} is not an integer") from None
    if number < 0:
        raise ModelFileError(f"{label}: external data {key} {number} is negative")
    return number


def _run_checker(path: Path, proto, has_external: bool) -> None:
    import onnx

    try:
        if has_external:
            # The checker resolves locations against the model's folder only when given the path;
            # the proto is small here, since its weights live in the data file.
            onnx.checker.check_model(str(path), full_check=False)
        else:
            onnx.checker.check_model(proto, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise ModelFileError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from None


def _tensor_info(value) -> TensorInfo:
    from onnx import helper

    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return TensorInfo(value.name, kind or "unknown", ())
    tensor_type = value.type.tensor_type
    try:
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    except (KeyError, ValueError, TypeError):
        dtype = f"onnx type {tensor_type.elem_type}"
    shape: list[int | str] = []
    if tensor_type.HasField("shape"):
        for index, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            else:
                shape.append(dim.dim_param or f"dim{index}")
    return TensorInfo(value.name, dtype, tuple(shape))


def _graph_tensors(graph, where: str) -> Iterator[tuple[object, str]]:
    for tensor in graph.initializer:
        yield tensor, where
    for sparse in graph.sparse_initializer:
        yield sparse.values, where
        yield sparse.indices, where
    for node in graph.node:
        yield from _node_tensors(node, where)


def _node_tensors(node, where: str) -> Iterator[tuple[object, str]]:
    here = f"{where}, node {node.name or node.op_type}"
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t, here
        yield from ((t, here) for t in attribute.tensors)
        if attribute.HasField("sparse_tensor"):
            yield attribute.sparse_tensor.values, here
            yield attribute.sparse_tensor.indices, here
        for sparse in attribute.sparse_tensors:
            yield sparse.values, here
            yield sparse.indices, here
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g, here)
        for subgraph in attribute.graphs:
            yield from _graph_tensors(subgraph, here)


def _graph_nodes(graph) -> Iterator[object]:
    for node in graph.node:
        yield node
        yield from _subgraph_nodes(node)


def _subgraph_nodes(node) -> Iterator[object]:
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield from _graph_nodes(attribute.g)
        for subgraph in attribute.graphs:
            yield from _graph_nodes(subgraph)


def printable(text: str) -> str:
    """text with control characters (terminal escapes, newlines) from a file's names shown as '?'."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return printable(text.splitlines()[0]) if text else type(exc).__name__
