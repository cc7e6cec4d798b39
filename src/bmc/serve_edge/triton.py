"""Triton's extensions of the v2 protocol that tritonclient users rely on: statistics, model
configuration, classification, and compressed request bodies.

bmc serve speaks these extensions; it does not call itself Triton (the server metadata says "bmc").
  GET v2/models[/NAME[/versions/1]]/stats   per-model counts and cumulative nanoseconds
  GET v2/models/NAME[/versions/1]/config    the model configuration as Triton's ModelConfig JSON
  "parameters": {"classification": K} on a requested output: BYTES "score:index[:label]", top K per row
  Content-Encoding: gzip / deflate request bodies, inflated under --max-body-bytes
"""

from __future__ import annotations

import json
import time
import zlib

import numpy as np

from bmc.serve_edge.codec import RequestError, TensorSpec

# What GET /v2 lists: only what this server implements.
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration", "statistics")
MODEL_VERSION = "1"


# ---- statistics -------------------------------------------------------------------------------


class ModelStatistics:
    """Triton's per-model statistics, as plain counters.

    Every update runs on the event loop thread (the batcher's scheduler and the request handlers),
    so plain integer additions need no lock: nothing here can contend with the hot path.
    """

    __slots__ = (
        "last_inference_ms", "inference_count", "execution_count",
        "success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "batches",
    )

    def __init__(self) -> None:
        self.last_inference_ms = 0
        self.inference_count = 0  # rows run, padding excluded
        self.execution_count = 0  # onnxruntime runs
        # [count, cumulative ns] per statistic; compute_* per request, each one charged its batch's time.
        self.success = [0, 0]
        self.fail = [0, 0]
        self.queue = [0, 0]
        self.compute_input = [0, 0]
        self.compute_infer = [0, 0]
        self.compute_output = [0, 0]
        # batch size run -> [runs, input ns, infer ns, output ns]
        self.batches: dict[int, list[int]] = {}

    def request_finished(self, succeeded: bool, seconds: float) -> None:
        """An infer (or classify) request was answered, successfully or not, after `seconds`."""
        stat = self.success if succeeded else self.fail
        stat[0] += 1
        stat[1] += int(seconds * 1e9)

    def batch_executed(self, requests: int, rows: int, batch_size: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One successful run of `requests` requests (`rows` rows, padded to `batch_size`); queue_ns summed over them."""
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.inference_count += rows
        self.execution_count += 1
        self.queue[0] += requests
        self.queue[1] += queue_ns
        for stat, ns in ((self.compute_input, input_ns), (self.compute_infer, infer_ns), (self.compute_output, output_ns)):
            stat[0] += requests
            stat[1] += ns * requests
        batch = self.batches.get(batch_size)
        if batch is None:
            batch = self.batches[batch_size] = [0, 0, 0, 0]
        batch[0] += 1
        batch[1] += input_ns
        batch[2] += infer_ns
        batch[3] += output_ns

    def to_json(self, name: str) -> dict:
        """One $model_stat object of Triton's statistics extension."""

        def duration(stat: list[int]) -> dict:
            return {"count": stat[0], "ns": stat[1]}

        return {
            "name": name,
            "version": MODEL_VERSION,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": duration(self.success),
                "fail": duration(self.fail),
                "queue": duration(self.queue),
                "compute_input": duration(self.compute_input),
                "compute_infer": duration(self.compute_infer),
                "compute_output": duration(self.compute_output),
                "cache_hit": {"count": 0, "ns": 0},
                "cache_miss": {"count": 0, "ns": 0},
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": {"count": runs, "ns": input_ns},
                    "compute_infer": {"count": runs, "ns": infer_ns},
                    "compute_output": {"count": runs, "ns": output_ns},
                }
                for size, (runs, input_ns, infer_ns, output_ns) in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }


def statistics_response(stats: dict[str, ModelStatistics], names: tuple[str, ...]) -> dict:
    """The statistics extension's response for these models, in the order given."""
    return {"model_stats": [stats[name].to_json(name) for name in names]}


# ---- model configuration ----------------------------------------------------------------------

_V2_TO_CONFIG_TYPE = {"BOOL": "TYPE_BOOL", "BYTES": "TYPE_STRING"}


def model_config(model, max_batch: int, max_delay_ms: float) -> dict:
    """Triton's ModelConfig JSON for a served model (bmc.serve_edge.models.ServedModel).

    Batching models (every input and output has a dynamic first axis) report max_batch_size and dims
    without the batch axis, as Triton does; the others report max_batch_size 0 and their full dims.
    An input bmc's metadata describes as an image (its layout and shape) says FORMAT_NCHW or
    FORMAT_NHWC, which image clients such as tritonclient's image_client.py read.
    """
    batching = model.can_merge
    drop = 1 if batching else 0

    def dims(spec: TensorSpec) -> list[int]:
        return [-1 if d is None else d for d in spec.dims[drop:]]

    config: dict = {
        "name": model.name,
        "platform": model.platform,
        "backend": model.runtime,
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": max_batch if batching else 0,
        "input": [
            {
                "name": spec.name,
                "data_type": config_type(spec.datatype),
                "format": _input_format(model, spec),
                "dims": dims(spec),
                "is_shape_tensor": False,
                "allow_ragged_batch": False,
                "optional": False,
            }
            for spec in model.inputs
        ],
        "output": [
            {"name": spec.name, "data_type": config_type(spec.datatype), "dims": dims(spec), "label_filename": "", "is_shape_tensor": False}
            for spec in model.outputs
        ],
        "batch_input": [],
        "batch_output": [],
        "instance_group": [{"name": model.name, "kind": "KIND_GPU" if model.device == "cuda" else "KIND_CPU", "count": 1}],
        "default_model_filename": model.path.name,
        # Which runtime runs which batch sizes ({"1-5": "onnxruntime 1 thread", "6+": "openvino"}), as a
        # ModelParameter: Triton's configuration has one platform per model, bmc may use two.
        "parameters": {"bmc_runtime_targets": {"string_value": json.dumps(model.plan.describe())}},
    }
    if batching and max_batch > 1:
        config["dynamic_batching"] = {
            "preferred_batch_size": list(model.buckets),
            "max_queue_delay_microseconds": int(round(max_delay_ms * 1000)),
            "preserve_ordering": False,
        }
    return config


def config_type(datatype: str) -> str:
    """The model configuration's TYPE_* name for a v2 datatype (FP32 -> TYPE_FP32, BYTES -> TYPE_STRING)."""
    return _V2_TO_CONFIG_TYPE.get(datatype, "TYPE_" + datatype)


def _input_format(model, spec: TensorSpec) -> str:
    metadata = model.metadata
    image_dims = tuple(spec.dims[1:])
    if len(model.inputs) == 1 and len(metadata.input_shape) == 3 and image_dims == tuple(metadata.input_shape):
        if metadata.input_layout == "NCHW":
            return "FORMAT_NCHW"
        if metadata.input_layout == "NHWC":
            return "FORMAT_NHWC"
    return "FORMAT_NONE"


# ---- classification ---------------------------------------------------------------------------


def classify_output(spec: TensorSpec, array: np.ndarray, top_k: int, labels: tuple[str, ...]) -> np.ndarray:
    """The top `top_k` elements of each row as str "value:index[:label]", best first (Triton's classification).

    Rows are along the batch axis when the output has one (a dynamic first dimension); otherwise the
    whole output is one row. The result is [rows, k] or [k], k = min(top_k, elements per row).
    """
    if spec.datatype in ("BYTES", "BOOL"):
        raise RequestError(f"output {spec.name!r}: class result not available for output due to unsupported type '{spec.datatype}'")
    values = np.asarray(array)
    batched = bool(spec.dims) and spec.dims[0] is None and values.ndim >= 1
    rows = values.reshape(values.shape[0], -1) if batched else values.reshape(1, -1)
    k = min(top_k, rows.shape[1])
    # Descending and, among equal values, the lower index first: a stable ascending sort of the
    # reversed row, read backwards.
    width = rows.shape[1]
    order = (width - 1 - np.argsort(rows[:, ::-1], axis=1, kind="stable"))[:, ::-1][:, :k]
    floating = values.dtype.kind == "f"
    result = np.empty(order.shape, dtype=object)
    for r in range(order.shape[0]):
        for c in range(k):
            index = int(order[r, c])
            value = rows[r, index]
            text = f"{float(value):f}:{index}" if floating else f"{int(value)}:{index}"
            result[r, c] = f"{text}:{labels[index]}" if index < len(labels) else text
    return result if batched else result.reshape(k)


# ---- compressed request bodies ----------------------------------------------------------------


class RequestInflater:
    """Inflates a gzip or deflate request body as it streams in, never holding more than `limit_bytes`
    of inflated data: a body that would inflate past it is refused (413) as soon as it does."""

    def __init__(self, encoding: str, limit_bytes: int):
        self._encoding = encoding
        # gzip: the gzip wrapper; deflate means the zlib format (RFC 9110), what tritonclient sends.
        self._wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
        self._inflater = zlib.decompressobj(self._wbits)
        self._limit_bytes = limit_bytes
        self._inflated_bytes = 0

    def feed(self, chunk: bytes) -> bytes:
        """The inflated bytes this chunk of the body gives."""
        pieces: list[bytes] = []
        data = chunk
        try:
            while data:
                if self._inflater.eof:
                    self._next_member(data)
                # At most one byte past the limit: enough to know it was passed, never the whole bomb.
                piece = self._inflater.decompress(data, self._limit_bytes - self._inflated_bytes + 1)
                self._inflated_bytes += len(piece)
                if self._inflated_bytes > self._limit_bytes:
                    raise RequestError(
                        f"the body inflates past {self._limit_bytes} bytes; at most that many are accepted (--max-body-bytes)", 413
                    )
                pieces.append(piece)
                data = self._inflater.unused_data if self._inflater.eof else self._inflater.unconsumed_tail
        except zlib.error as exc:
            raise RequestError(f"the body is not valid {self._encoding} data ({exc})") from None
        return b"".join(pieces)

    def _next_member(self, data: bytes) -> None:
        if self._encoding != "gzip":
            raise RequestError(f"the body holds {len(data)} bytes after the end of its {self._encoding} stream")
        self._inflater = zlib.decompressobj(self._wbits)  # gzip allows several members, one after another

    def finish(self) -> None:
        """The body is complete: a stream cut short is refused (400)."""
        if not self._inflater.eof:
            raise RequestError(f"the {self._encoding} body ends before its compressed stream does")


def request_inflater(content_encoding: str | None, limit_bytes: int) -> RequestInflater | None:
    """An inflater for this Content-Encoding, None when the body is not compressed; 415 for an encoding not served."""
    if content_encoding is None:
        return None
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return RequestInflater("gzip", limit_bytes)
    if encoding == "deflate":
        return RequestInflater("deflate", limit_bytes)
    shown = repr(content_encoding) if len(content_encoding) <= 40 else repr(content_encoding[:37] + "...")
    raise RequestError(f"Content-Encoding {shown} is not supported; send gzip, deflate or an uncompressed body", 415)
