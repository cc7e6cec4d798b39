"""Latency and throughput of one session at one batch size: warm-up, then timed runs.

Each run is timed on its own with perf_counter_ns around nothing but the runtime call, so the
median is the runtime's, not the loop's. Each runtime's session supplies that call (its
`runner`): on CUDA, onnxruntime keeps inputs and outputs on the device (IO binding), so a run
measures the model, not two PCIe copies.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from bmc.runtime.model_file import TensorInfo
from bmc.runtime.sessions import SessionError, ort_message, tensor_infos

DEFAULT_SECONDS = 1.0
MIN_ITERATIONS = 5
# A corrupt shape (a flipped byte in a dimension) must fail here, not exhaust the machine's memory.
MAX_INPUT_BYTES = 4 << 30


class BatchSizeError(SessionError):
    """The model cannot take this batch size (a fixed batch axis)."""


@dataclass(frozen=True)
class Timing:
    """Latency percentiles and throughput of `iterations` timed runs at one batch size."""

    batch_size: int
    iterations: int
    elapsed_s: float
    latency_ms_median: float
    latency_ms_p90: float
    latency_ms_p99: float
    latency_ms_mean: float
    throughput_samples_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def input_shape(dims: list, batch_size: int, model_shape: tuple[int, ...] = ()) -> tuple[int, ...]:
    """A concrete shape for a session input: dynamic batch -> batch_size, other dynamic axes from model_shape."""
    shape: list[int] = []
    for index, dim in enumerate(dims):
        if isinstance(dim, int) and dim > 0:
            if index == 0 and dim != batch_size:
                raise BatchSizeError(f"the model's batch axis is fixed at {dim}")
            shape.append(dim)
        elif index == 0:
            shape.append(batch_size)
        elif len(model_shape) == len(dims) - 1:
            shape.append(int(model_shape[index - 1]))
        else:
            raise SessionError(f"input axis {index} is dynamic ({dim!r}) and the model's metadata gives no size for it")
    return tuple(shape)


def random_inputs(session, batch_size: int, model_shape: tuple[int, ...] = (), seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds of each session input's shape (batch axis = batch_size) and type.

    session: any runtime's Session, or a raw onnxruntime InferenceSession.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for index, node in enumerate(_input_infos(session)):
        try:
            dtype = np.dtype(node.dtype).type
        except TypeError:
            raise SessionError(f"input {node.name!r} has type {node.dtype}, which bench cannot generate") from None
        if not (np.issubdtype(dtype, np.number) or dtype is np.bool_):
            raise SessionError(f"input {node.name!r} has type {node.dtype}, which bench cannot generate")
        # The metadata's shape describes the first input only.
        shape = input_shape(list(node.shape), batch_size, model_shape if index == 0 else ())
        size_bytes = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
        if size_bytes > MAX_INPUT_BYTES:
            raise SessionError(
                f"input {node.name!r} of shape {list(shape)} would take {size_bytes / 2**30:.1f} GiB; "
                f"bench makes inputs up to {MAX_INPUT_BYTES >> 30} GiB"
            )
        if np.issubdtype(dtype, np.floating):
            feeds[node.name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
        elif dtype is np.bool_:
            feeds[node.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            # Small non-negative values: integer inputs are usually indices or token ids.
            feeds[node.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def _input_infos(session) -> tuple[TensorInfo, ...]:
    # compress hands over onnxruntime's own InferenceSession; everything else is a runtime Session.
    return tensor_infos(session.get_inputs()) if hasattr(session, "get_inputs") else tuple(session.inputs)


def runner(open_session, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    """A call that runs the session once on feeds, the fastest way its runtime has (onnxruntime on
    cuda: IO binding, inputs and outputs kept on the GPU)."""
    return open_session.runner(feeds)


def measure(
    run_once: Callable[[], object],
    batch_size: int,
    warmup: int,
    iters: int | None,
    seconds: float | None,
    label: str = "model",
    runtime: str = "onnxruntime",
    message: Callable[[BaseException], str] = ort_message,
) -> Timing:
    """Warm up, then time `iters` runs or as many as fit in `seconds` (default 1 s, at least 5 runs).

    runtime and message (its Session.error_message) word a failed run as one line.
    """
    try:
        for _ in range(warmup):
            run_once()
        latencies_ns = _timed_runs(run_once, iters, seconds)
    except SessionError:
        raise
    except Exception as exc:  # the runtime's run errors (bad shapes inside the graph, out of memory)
        raise SessionError(f"{label}: {runtime} failed running batch {batch_size} ({message(exc)})") from None
    latencies_ms = np.asarray(latencies_ns, dtype=np.float64) / 1e6
    median, p90, p99 = np.percentile(latencies_ms, [50, 90, 99])
    elapsed_s = float(latencies_ms.sum()) / 1e3
    return Timing(
        batch_size=batch_size,
        iterations=len(latencies_ms),
        elapsed_s=elapsed_s,
        latency_ms_median=float(median),
        latency_ms_p90=float(p90),
        latency_ms_p99=float(p99),
        latency_ms_mean=float(latencies_ms.mean()),
        throughput_samples_per_s=batch_size * len(latencies_ms) / elapsed_s if elapsed_s > 0 else float("inf"),
    )


def _timed_runs(run_once: Callable[[], object], iters: int | None, seconds: float | None) -> list[int]:
    clock = time.perf_counter_ns
    latencies_ns: list[int] = []
    append = latencies_ns.append
    if iters is not None:
        for _ in range(iters):
            start = clock()
            run_once()
            append(clock() - start)
        return latencies_ns
    deadline = clock() + int((seconds if seconds is not None else DEFAULT_SECONDS) * 1e9)
    minimum = MIN_ITERATIONS if seconds is None else 1
    while True:
        start = clock()
        run_once()
        end = clock()
        append(end - start)
        if end >= deadline and len(latencies_ns) >= minimum:
            return latencies_ns
