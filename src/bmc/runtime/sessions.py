"""onnxruntime sessions for cpu or cuda, and the providers a session really got.

onnxruntime-gpu lists CUDAExecutionProvider whether or not a GPU and its libraries are there, and
quietly falls back to the CPU when they are not; the only truth is `session.get_providers()` of a
session that was actually created.

Registered as the runtime "onnxruntime": `registry.open_session(path, Target())` lands in
`create_session` here, and OpenSession offers the interface every runtime's session has (inputs,
outputs, run, runner) beside the raw InferenceSession in `.session`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from bmc.errors import BmcError
from bmc.runtime.model_file import ModelBytes, TensorInfo, printable
from bmc.runtime.registry import Runtime, register_runtime
from bmc.runtime.target import Target

DEVICES = ("cpu", "cuda", "auto")
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
# Fatal messages only. onnxruntime's errors reach the caller as exceptions too (and become one line);
# logged as well, they would be a second, colored copy on stderr. The CUDA provider's failed library
# loads on CPU-only machines are logged at error level, and are expected.
LOG_SEVERITY_FATAL = 4
# onnxruntime's tensor type names -> numpy dtypes for the numpy arrays that feed them.
NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


class SessionError(BmcError):
    """A runtime could not create a session, or not on the requested device, or failed running it."""


class UnsupportedModelError(SessionError):
    """This runtime cannot load or compile this model (an operator it lacks, a graph it rejects);
    another runtime may still run it."""


@dataclass(frozen=True)
class OpenSession:
    """A created session, the device it runs on and the providers it really got."""

    session: object  # onnxruntime.InferenceSession
    path: Path
    device: str  # "cpu" or "cuda"
    providers: tuple[str, ...]
    threads: int | None = None
    cuda_graph: bool = False

    runtime: ClassVar[str] = "onnxruntime"
    # onnxruntime has no precision hint: float ops run in the file's own types.
    precision: ClassVar[str] = "fp32"

    @cached_property
    def inputs(self) -> tuple[TensorInfo, ...]:
        """The inputs to feed, with numpy dtype names."""
        return tensor_infos(self.session.get_inputs())

    @cached_property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return tensor_infos(self.session.get_outputs())

    @property
    def target(self) -> Target:
        """The target this session really runs on (the device it got, not the one asked)."""
        return Target(self.runtime, self.device, self.precision, self.threads)

    @property
    def details(self) -> dict:
        """What onnxruntime really gave this session."""
        return {"providers": list(self.providers), "cuda_graph": self.cuda_graph}

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Outputs by name (all, or output_names) for host numpy feeds; SessionError on failure."""
        names = list(output_names) if output_names is not None else [o.name for o in self.outputs]
        try:
            values = self.session.run(names, feeds)
        except Exception as exc:  # onnxruntime's own error types (bad shapes, types, out of memory)
            raise SessionError(f"{self.path}: onnxruntime failed running it ({ort_message(exc)})") from None
        return dict(zip(names, values))

    def runner(self, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
        """A call that runs the session once on feeds: session.run on cpu, IO binding on cuda."""
        session = self.session
        if self.device != "cuda":
            output_names = [o.name for o in session.get_outputs()]

            def run_cpu() -> object:
                return session.run(output_names, feeds)

            return run_cpu
        try:
            return _cuda_runner(self, feeds)
        except SessionError:
            raise
        except Exception as exc:  # device allocation and binding errors from onnxruntime
            raise SessionError(f"could not bind inputs and outputs on the GPU ({ort_message(exc)})") from None

    @staticmethod
    def error_message(exc: BaseException) -> str:
        return ort_message(exc)


def tensor_infos(nodes) -> tuple[TensorInfo, ...]:
    """onnxruntime NodeArgs as TensorInfo: numpy dtype names, and names for dynamic axes."""
    infos = []
    for node in nodes:
        known = NUMPY_TYPES.get(node.type)
        dtype = np.dtype(known).name if known is not None else node.type
        shape = tuple(d if isinstance(d, (int, str)) else f"dim{i}" for i, d in enumerate(node.shape or ()))
        infos.append(TensorInfo(node.name, dtype, shape))
    return tuple(infos)


@register_runtime
class OnnxRuntime(Runtime):
    """onnxruntime: its CPU provider everywhere, CUDA and TensorRT where a GPU really runs them."""

    name = "onnxruntime"
    package = "onnxruntime"
    module = "onnxruntime"
    install_hint = "pip install onnxruntime"
    devices = DEVICES
    precisions = ("fp32",)
    options = ("cuda_graph", "tensorrt", "conv_algo_search", "profile_prefix")

    def version(self) -> str | None:
        from importlib import metadata

        if not self.installed():
            return None
        for package in ("onnxruntime-gpu", "onnxruntime"):
            try:
                return metadata.version(package)
            except metadata.PackageNotFoundError:
                continue
        return None

    def problem(self) -> str | None:
        try:
            import onnxruntime as ort

            ort.InferenceSession(_tiny_model_bytes(), session_options(1), providers=[CPU_PROVIDER])
        except Exception as exc:  # an ImportError, or a broken build
            return f"{type(exc).__name__}: {ort_message(exc)}"
        return None

    def describe(self) -> dict:
        import onnxruntime as ort

        devices = ["cpu", *(["cuda"] if cuda_works() else [])]
        return {
            "version": self.version(),
            "devices": devices,
            "precisions": list(self.precisions_here("cpu")),
            "providers_listed": list(ort.get_available_providers()),
        }

    def open(self, model: Path | ModelBytes, target: Target, **options) -> "OpenSession":
        return create_session(model, target.device, target.threads, **options)


def session_options(threads: int | None, profile_prefix: str | None = None):
    """The SessionOptions every bench session uses: sequential execution, `threads` intra-op threads;
    with profile_prefix, onnxruntime's profiler writes its events under that prefix."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = LOG_SEVERITY_FATAL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One operator at a time: the models bench measures are chains, and a second pool only adds jitter.
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = threads
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def create_session(
    path: Path | ModelBytes,
    device: str = "cpu",
    threads: int | None = None,
    cuda_graph: bool = False,
    tensorrt: bool = False,
    conv_algo_search: str = "EXHAUSTIVE",
    profile_prefix: str | None = None,
) -> OpenSession:
    """A session for the model (a file, or bytes already read) on `device` (cpu, cuda or auto); cuda
    fails unless the GPU really runs it.

    With tensorrt, TensorRT goes first (CUDA then takes what TensorRT cannot), and the session must
    really have it.
    """
    import onnxruntime as ort

    if device not in DEVICES:
        raise SessionError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    ort.set_default_logger_severity(LOG_SEVERITY_FATAL)
    if device == "cpu":
        session = _new_session(ort, path, threads, [CPU_PROVIDER], profile_prefix)
        return OpenSession(session, _path_of(path), "cpu", tuple(session.get_providers()), threads)

    _prepare_cuda(ort)
    cuda_options = {"device_id": "0", "cudnn_conv_algo_search": conv_algo_search}
    if cuda_graph:
        cuda_options["enable_cuda_graph"] = "1"
    requested = [(CUDA_PROVIDER, cuda_options), CPU_PROVIDER]
    if tensorrt:
        requested.insert(0, TENSORRT_PROVIDER)
    session = _new_session(ort, path, threads, requested, profile_prefix)
    providers = tuple(session.get_providers())
    if tensorrt and TENSORRT_PROVIDER not in providers:
        raise SessionError(
            f"{path}: --tensorrt, but onnxruntime runs this session on {', '.join(providers)} only "
            "(no GPU, or the TensorRT libraries are missing)"
        )
    if CUDA_PROVIDER in providers:
        return OpenSession(session, _path_of(path), "cuda", providers, threads, cuda_graph)
    if device == "cuda":
        raise SessionError(
            f"{path}: --device cuda, but onnxruntime runs this session on {', '.join(providers)} only "
            "(no GPU, or the CUDA 13 / cuDNN 9 libraries are missing)"
        )
    if cuda_graph:
        # The fallback session was made with CUDA options; a plain CPU one keeps the numbers comparable.
        return create_session(path, "cpu", threads, profile_prefix=profile_prefix)
    return OpenSession(session, _path_of(path), "cpu", providers, threads)


@lru_cache(maxsize=1)
def cuda_works() -> bool:
    """Whether a session on a tiny model really gets the CUDA provider on this machine."""
    import onnxruntime as ort

    if CUDA_PROVIDER not in ort.get_available_providers():
        return False
    ort.set_default_logger_severity(LOG_SEVERITY_FATAL)
    _prepare_cuda(ort)
    try:
        session = ort.InferenceSession(_tiny_model_bytes(), session_options(1), providers=[CUDA_PROVIDER, CPU_PROVIDER])
    except Exception:  # any failure to build it means no usable GPU
        return False
    return CUDA_PROVIDER in session.get_providers()


def _path_of(model: Path | ModelBytes) -> Path:
    return model.path if isinstance(model, ModelBytes) else Path(model)


def _new_session(ort, path: Path | ModelBytes, threads: int | None, providers: list, profile_prefix: str | None = None):
    options = session_options(threads, profile_prefix)
    source: str | bytes = str(path)
    if isinstance(path, ModelBytes):
        source = path.model
        if path.external_data:
            # onnxruntime resolves each tensor's `location` among these in-memory files, not on disk.
            locations = list(path.external_data)
            buffers = [np.frombuffer(path.external_data[name], dtype=np.uint8) for name in locations]
            options.add_external_initializers_from_files_in_memory(locations, buffers, [len(b) for b in buffers])
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types; one line each
        raise UnsupportedModelError(f"{path}: onnxruntime cannot load it ({ort_message(exc)})") from None


def _prepare_cuda(ort) -> None:
    # The CUDA and cuDNN libraries come from pip's nvidia-* wheels; without torch imported first,
    # onnxruntime finds them only when asked to preload them.
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception:  # missing wheels: session creation then reports what it lacks
            pass


def _tiny_model_bytes() -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()


def ort_message(exc: Exception) -> str:
    """onnxruntime's reason on one line, without its error-code prefix and C++ source location."""
    text = " ".join(str(exc).split())
    if text.startswith("[ONNXRuntimeError]"):
        text = text.split(" : ", 3)[-1]
    location = re.search(r"/onnxruntime_src/\S+:\d+ ", text)
    if location is not None:
        text = text[: location.start()] + _after_signature(text[location.end() :])
    return printable(text[:300]) or type(exc).__name__


def _after_signature(text: str) -> str:
    """What follows a C++ function signature like `ns::f(const T&, U) `."""
    depth = 0
    for index, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return text[index + 1 :].strip()
    return text


def _cuda_runner(open_session: OpenSession, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    import onnxruntime as ort

    session = open_session.session
    binding = session.io_binding()
    # Kept referenced for the binding's lifetime: the device buffers must not move under a CUDA graph.
    device_values = []
    for name, array in feeds.items():
        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0)
        device_values.append(value)
        binding.bind_ortvalue_input(name, value)
    if open_session.cuda_graph:
        # A captured graph replays fixed addresses, so outputs are preallocated once, shaped by a
        # plain run of the same feeds.
        for output, example in zip(session.get_outputs(), _output_examples(open_session, feeds)):
            value = ort.OrtValue.ortvalue_from_numpy(np.empty_like(example), "cuda", 0)
            device_values.append(value)
            binding.bind_ortvalue_output(output.name, value)
    else:
        for output in session.get_outputs():
            binding.bind_output(output.name, "cuda", 0)
    binding.synchronize_inputs()
    return _BoundRun(session, binding, device_values)


@dataclass(frozen=True)
class _BoundRun:
    """One IO-bound run; holds the device buffers the binding points at, so they outlive it."""

    session: object
    binding: object
    device_values: list

    def __call__(self) -> object:
        # onnxruntime synchronizes the CUDA stream before run_with_iobinding returns, so the
        # caller's clock sees the whole run.
        self.session.run_with_iobinding(self.binding)
        return self.binding


def _output_examples(open_session: OpenSession, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Output arrays of one run, from a graph-free twin session (a capture session must not run on host inputs)."""
    twin = create_session(open_session.path, "cuda", open_session.threads, cuda_graph=False)
    return twin.session.run(None, feeds)
