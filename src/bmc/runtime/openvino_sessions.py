"""OpenVINO sessions: ONNX files (QDQ int8 included) compiled by the `openvino` package for the CPU.

Why the `openvino` package and not onnxruntime's OpenVINO execution provider: `onnxruntime-openvino`
and `onnxruntime-gpu` both install the module `onnxruntime`, so one environment cannot hold both,
and that build trails onnxruntime by several releases. `openvino` reads ONNX files itself and
installs beside onnxruntime; the same file then runs on either, in one process.

OpenVINO's CPU plugin defaults to bf16 on CPUs that have it (AVX-512 BF16, AMX), which changes
numerics; bmc always sets the precision hint, fp32 unless a Target asks for bf16 or fp16, and
reports the precision the compiled model really got.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import threading
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import numpy as np

from bmc.errors import UsageError
from bmc.runtime.model_file import EXTERNAL, ModelBytes, ModelFileError, TensorInfo, iter_tensors, printable
from bmc.runtime.registry import Runtime, register_runtime
from bmc.runtime.sessions import SessionError, UnsupportedModelError
from bmc.runtime.target import PRECISIONS, Target

OV_TYPES = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
# OPTIMIZATION_CAPABILITIES names -> bmc precisions: what the device computes natively.
CAPABILITIES = {"FP32": "fp32", "BF16": "bf16", "FP16": "fp16"}
PERFORMANCE_HINTS = ("latency", "throughput")
# A serialized ONNX protobuf cannot pass 2 GiB; a larger model with its data inlined does not fit.
PROTOBUF_LIMIT_BYTES = (1 << 31) - 1


@dataclass(frozen=True)
class OpenVinoSession:
    """A model compiled by OpenVINO, and what the plugin really set: devices, precision, threads, streams."""

    session: object  # openvino.CompiledModel
    path: Path
    device: str
    providers: tuple[str, ...]  # the compiled model's EXECUTION_DEVICES, e.g. ("CPU",)
    threads: int | None
    precision: str
    settings: dict = field(default_factory=dict, compare=False)
    # One infer request per calling thread: a request runs one inference at a time.
    _requests: threading.local = field(default_factory=threading.local, repr=False, compare=False)

    runtime: ClassVar[str] = "openvino"

    @cached_property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return tuple(_port_info(port) for port in self.session.inputs)

    @cached_property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return tuple(_port_info(port) for port in self.session.outputs)

    @property
    def target(self) -> Target:
        return Target(self.runtime, self.device, self.precision, self.threads)

    @property
    def details(self) -> dict:
        return {"execution_devices": list(self.providers), **self.settings}

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Outputs by name (all, or output_names) for numpy feeds; SessionError on failure."""
        self.check_feeds(feeds)
        try:
            results = self._request().infer(feeds)
        except Exception as exc:  # openvino raises RuntimeError and TypeError with multi-line texts
            raise SessionError(f"{self.path}: openvino failed running it ({ov_message(exc)})") from None
        values = {info.name: results[index] for index, info in enumerate(self.outputs)}
        return values if output_names is None else {name: values[name] for name in output_names}

    def runner(self, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
        """One synchronous inference on feeds, copied in as every served request is.

        Not share_inputs=True: OpenVINO 2026.4 then corrupted the heap on a later inference of the
        same compiled model at another batch size (timing at 1 and 32, then the accuracy pass at 10:
        "corrupted double-linked list" or SIGSEGV in most runs; none with copies)."""
        self.check_feeds(feeds)
        infer = self.session.create_infer_request().infer

        def run_once() -> object:
            return infer(feeds, share_inputs=False)

        return run_once

    @staticmethod
    def error_message(exc: BaseException) -> str:
        return ov_message(exc)

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        """SessionError unless feeds are exactly the inputs, each of its type and shape.

        OpenVINO 2026.4's CPU plugin checks shapes only in some configurations: compiled with one
        inference thread, a [2, 3, 8, 8] feed to a [?, 1, 8, 8] input returned the previous run's
        outputs, or crashed the process. So nothing reaches it unchecked.
        """
        expected = {info.name: info for info in self.inputs}
        if set(feeds) != set(expected):
            raise SessionError(f"{self.path}: openvino failed running it (fed {sorted(feeds)}; the model's inputs are {sorted(expected)})")
        for name, value in feeds.items():
            info = expected[name]
            dtype = getattr(value, "dtype", None)
            if dtype is None or np.dtype(dtype).name != info.dtype:
                raise SessionError(f"{self.path}: openvino failed running it (input {name!r} is {dtype}; the model takes {info.dtype})")
            shape = tuple(value.shape)
            if info.shape and (len(shape) != len(info.shape) or any(isinstance(d, int) and d != s for d, s in zip(info.shape, shape))):
                raise SessionError(
                    f"{self.path}: openvino failed running it (input {name!r} has shape {list(shape)}; the model takes {list(info.shape)})"
                )

    def _request(self):
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.session.create_infer_request()
        return request


@register_runtime
class OpenVinoRuntime(Runtime):
    """OpenVINO's CPU plugin, with its precision hint (fp32, or bf16/fp16 where the CPU has them)."""

    name = "openvino"
    package = "openvino"
    module = "openvino"
    install_hint = "pip install 'bmc[openvino]'"
    # "auto" is the CPU: OpenVINO's GPU and NPU plugins are not validated by bmc yet.
    devices = ("cpu", "auto")
    precisions = PRECISIONS
    options = ("performance_hint", "streams", "memory_only")

    def problem(self) -> str | None:
        try:
            core = _core()
            from bmc.runtime.sessions import _tiny_model_bytes

            core.compile_model(core.read_model(_tiny_model_bytes()), "CPU")
        except Exception as exc:  # an ImportError, a missing plugin, an unsupported CPU
            return f"{type(exc).__name__}: {ov_message(exc)}"
        return None

    def precisions_here(self, device: str) -> tuple[str, ...]:
        capabilities = set(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        return tuple(p for p in PRECISIONS if p == "fp32" or any(CAPABILITIES.get(c) == p for c in capabilities))

    def describe(self) -> dict:
        core = _core()
        devices = []
        for name in core.available_devices:
            devices.append({
                "name": name,
                "full_name": str(core.get_property(name, "FULL_DEVICE_NAME")),
                "capabilities": [str(c) for c in core.get_property(name, "OPTIMIZATION_CAPABILITIES")],
            })
        return {
            "version": self.version(),
            "devices": ["cpu"],
            "precisions": list(self.precisions_here("cpu")),
            # What OpenVINO would pick with no hint; bmc always sets one.
            "plugin_default_precision": _bmc_precision(core.get_property("CPU", "INFERENCE_PRECISION_HINT")),
            "openvino_devices": devices,
        }

    def open(
        self,
        model: Path | ModelBytes,
        target: Target,
        performance_hint: str = "latency",
        streams: int | None = None,
        memory_only: bool = False,
    ) -> OpenVinoSession:
        """Read the ONNX model, compile it for the CPU with the target's precision and threads.

        memory_only: the model's bytes must never be written anywhere (a model decrypted in memory):
        one OpenVINO could read only from a file (needs_file_copy) is refused instead.
        """
        if performance_hint not in PERFORMANCE_HINTS:
            raise UsageError(f"performance_hint must be one of {', '.join(PERFORMANCE_HINTS)}; got {performance_hint!r}")
        if streams is not None and (isinstance(streams, bool) or not isinstance(streams, int) or streams < 1):
            raise UsageError(f"streams must be a positive integer or None; got {streams!r}")
        if memory_only and isinstance(model, ModelBytes) and needs_file_copy(model):
            raise UnsupportedModelError(
                f"{model}: openvino reads a model of {model.size_bytes / 2**30:.1f} GiB from files only, and this one "
                "must not touch the disk (it was decrypted in memory); run it on onnxruntime"
            )
        here = self.precisions_here("cpu")
        if target.precision not in here:
            raise SessionError(f"{model}: openvino has no {target.precision} on this CPU; its precisions here: {', '.join(here)}")
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        config = {
            hints.performance_mode: {"latency": hints.PerformanceMode.LATENCY, "throughput": hints.PerformanceMode.THROUGHPUT}[performance_hint],
            hints.inference_precision: getattr(ov.Type, OV_TYPES[target.precision]),
        }
        if target.threads is not None:
            config[props.inference_num_threads] = target.threads
        if streams is not None:
            config[props.num_streams] = streams
        core = _core()
        with _readable(model) as source:
            try:
                ov_model = core.read_model(source)
            except Exception as exc:  # the ONNX frontend's conversion failures: unknown operators, bad graphs
                raise UnsupportedModelError(f"{model}: openvino cannot open it ({ov_message(exc)})") from None
            try:
                compiled = core.compile_model(ov_model, "CPU", config)
            except Exception as exc:
                raise UnsupportedModelError(f"{model}: openvino cannot compile it for the CPU ({ov_message(exc)})") from None
        precision = _bmc_precision(compiled.get_property("INFERENCE_PRECISION_HINT"))
        if precision != target.precision:
            raise SessionError(f"{model}: openvino compiled it in {precision}, not the {target.precision} asked")
        settings = {
            "inference_precision": precision,
            "inference_num_threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
            "num_streams": int(compiled.get_property("NUM_STREAMS")),
            "performance_hint": str(compiled.get_property("PERFORMANCE_HINT")),
        }
        return OpenVinoSession(
            session=compiled,
            path=model.path if isinstance(model, ModelBytes) else Path(model),
            device="cpu",
            providers=tuple(str(d) for d in compiled.get_property("EXECUTION_DEVICES")),
            threads=target.threads,
            precision=precision,
            settings=settings,
        )


@lru_cache(maxsize=1)
def _core():
    """One OpenVINO Core per process: it loads its plugins once."""
    import openvino as ov

    return ov.Core()


def _bmc_precision(ov_type) -> str:
    name = str(getattr(ov_type, "get_type_name", lambda: ov_type)())
    return next((bmc for bmc, ov in OV_TYPES.items() if ov == name), name)


def _port_info(port) -> TensorInfo:
    try:
        dtype = np.dtype(port.get_element_type().to_dtype()).name
    except Exception:  # element types numpy lacks (bf16, 4-bit): shown by OpenVINO's name
        dtype = str(port.get_element_type().get_type_name())
    partial = port.get_partial_shape()
    shape: tuple[int | str, ...] = ()
    if partial.rank.is_static:
        shape = tuple(d.get_length() if d.is_static else f"dim{i}" for i, d in enumerate(partial))
    return TensorInfo(port.get_any_name(), dtype, shape)


@contextlib.contextmanager
def _readable(model: Path | ModelBytes) -> Iterator[str | bytes]:
    """What Core.read_model takes for this model: its path, its bytes, or (bytes with external data
    past protobuf's 2 GiB) a private copy on disk that lives until the model is compiled."""
    if not isinstance(model, ModelBytes):
        yield str(model)
        return
    # OpenVINO reads ONNX external data from files only, and from bytes it would look for them
    # relative to the working directory: inlined, the bytes that were read need no file at all.
    if not needs_file_copy(model):
        yield inline_external_data(model).SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="bmc-openvino-") as folder:  # mode 0700: this user only
        yield str(_write_private_copy(model, Path(folder)))


def needs_file_copy(model: ModelBytes) -> bool:
    """Whether OpenVINO can read this model only from a file: with its data inlined it would pass
    protobuf's 2 GiB, and OpenVINO takes ONNX external data from files alone."""
    return len(model.model) + sum(len(data) for data in model.external_data.values()) >= PROTOBUF_LIMIT_BYTES


def inline_external_data(model: ModelBytes):
    """The model's ONNX proto with every external tensor's bytes (from model.external_data) inlined."""
    import onnx

    try:
        proto = onnx.load_model_from_string(model.model)
    except Exception as exc:  # protobuf's DecodeError
        raise ModelFileError(f"{model.path}: not an ONNX model, or a truncated one ({type(exc).__name__})") from None
    for tensor, where in iter_tensors(proto):
        if tensor.data_location != EXTERNAL:
            continue
        fields = {entry.key: entry.value for entry in tensor.external_data}
        location = fields.get("location", "")
        data = model.external_data.get(location)
        label = f"{model.path}: tensor {printable(tensor.name)!r} in {printable(where)}"
        if data is None:
            raise ModelFileError(f"{label} names external data {printable(location)!r}, which was not read with the model")
        try:
            offset = int(fields.get("offset", "0"))
            length = int(fields["length"]) if "length" in fields else len(data) - offset
        except ValueError:
            raise ModelFileError(f"{label}: external data offset or length is not an integer") from None
        if offset < 0 or length < 0 or offset + length > len(data):
            raise ModelFileError(f"{label}: external data {printable(location)!r} is {len(data)} bytes, the tensor needs bytes {offset}..{offset + length}")
        tensor.raw_data = data[offset : offset + length]
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    return proto


def _write_private_copy(model: ModelBytes, folder: Path) -> Path:
    target = folder / "model.onnx"
    target.write_bytes(model.model)
    for location, data in model.external_data.items():
        parts = location.replace("\\", "/").split("/")
        if location.startswith(("/", "\\")) or ".." in parts or not location:
            raise ModelFileError(f"{model.path}: external data location {printable(location)!r} is not a plain relative path")
        path = folder.joinpath(*[p for p in parts if p not in ("", ".")])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return target


def ov_message(exc: BaseException) -> str:
    """OpenVINO's reason on one line: the operators it cannot convert, else its text without source locations."""
    text = str(exc)
    unconverted = re.search(r"No conversion rule found for operations?: ([^\n]+)", text)
    if unconverted is not None:
        operators = unconverted.group(1).strip().rstrip(".")
        return printable(f"no conversion rule for operator{'s' if ',' in operators else ''} {operators}")[:300]
    kept = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("Exception from src/") or "docs.openvino.ai" in line:
            continue
        # "Check 'x' failed at src/plugins/...cpp:123:" says where in OpenVINO, not what.
        line = re.sub(r"^Check '.*' failed at \S+:\d+:?\s*", "", line)
        line = re.sub(r"\bsrc/\S+\.(?:cpp|hpp|h):\d+:?\s*", "", line)
        if line:
            kept.append(line)
    return printable(" ".join(kept)[:300]) or type(exc).__name__
