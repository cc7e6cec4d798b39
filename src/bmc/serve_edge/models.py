"""Loading a model to serve: its files read once and verified (integrity.py), bmc's ONNX checks on
those bytes, then onnxruntime sessions built from the same bytes, then a warm-up."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bmc.runtime.sessions import SessionError, create_session, ort_message
from bmc.runtime.metadata import ModelMetadata
from bmc.serve_edge.codec import ORT_TO_V2, V2_TO_NUMPY, TensorSpec
from bmc.serve_edge.integrity import VerifiedModel, read_verified_model
from bmc.serve_edge.testing import wait_for_test_gate

log = logging.getLogger("bmc.serve")


@dataclass(frozen=True)
class ServedModel:
    """A verified, loaded and warmed-up model: its session, its protocol signature and its bmc metadata."""

    name: str
    path: Path
    sha256: str
    session: object  # onnxruntime.InferenceSession
    device: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    metadata: ModelMetadata
    # On CUDA, one session per batch size the batcher pads to (see serving_buckets); empty elsewhere.
    bucket_sessions: dict = field(default_factory=dict)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.outputs)

    @property
    def buckets(self) -> tuple[int, ...]:
        return tuple(sorted(self.bucket_sessions))

    @property
    def can_merge(self) -> bool:
        """Requests can be concatenated when every input and output has a dynamic first (batch) axis."""
        return _can_merge(self.inputs, self.outputs)

    def session_for(self, feed: dict[str, np.ndarray]):
        """The session kept for this batch size, or the main one."""
        if not self.bucket_sessions:  # only batchable models have buckets: every input has a batch axis
            return self.session
        return self.bucket_sessions.get(next(iter(feed.values())).shape[0], self.session)

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One onnxruntime run; called on the model's worker thread."""
        wait_for_test_gate()
        return dict(zip(self.output_names, self.session_for(feed).run(list(self.output_names), feed)))

    def describe(self) -> dict:
        """The v2 model metadata response."""
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [spec.metadata() for spec in self.inputs],
            "outputs": [spec.metadata() for spec in self.outputs],
        }


# GPU memory the copies of one model's weights may take across its bucket sessions.
BUCKET_WEIGHTS_BUDGET_BYTES = 1 << 30


def serving_buckets(device: str, can_merge: bool, max_batch: int, model_bytes: int = 0) -> tuple[int, ...]:
    """The batch sizes the batcher pads to on CUDA: powers of 4 up to max_batch, and max_batch; none elsewhere.

    onnxruntime's CUDA provider rebuilds its convolutions' cuDNN set-up whenever a session's input
    shape changes, even to a shape it ran before (H100, resnet20, measured by a retired script, see docs/experiments.md:
    0.54-0.81 ms per run at a steady batch size; 245 ms at every change with the exhaustive
    search, 46 ms with the heuristic one). A batcher changes shape all the time, so each bucket gets
    its own session, which only ever sees its one shape. Padding costs little on a GPU, where
    a batch of 32 takes about as long as a batch of 1 for small models; on a CPU a new shape costs
    nothing and padding would cost compute. Powers of 4 keep the copies of the weights to a few, and
    a model too large for BUCKET_WEIGHTS_BUDGET_BYTES in copies keeps fewer: batch 1 and
    max_batch, or max_batch alone (every batch padded to it: one shape, one copy).
    """
    if device != "cuda" or not can_merge or max_batch <= 1:
        return ()
    sizes = sorted({4**i for i in range(max_batch.bit_length()) if 4**i <= max_batch} | {max_batch})
    copies = max(1, BUCKET_WEIGHTS_BUDGET_BYTES // max(1, model_bytes))
    if len(sizes) > copies:
        sizes = sizes[: copies - 1] + sizes[-1:]
    return tuple(sizes)


def load_model(
    path: Path | VerifiedModel,
    name: str,
    expected_sha256: str | None,
    threads: int,
    device: str,
    max_batch: int = 1,
    buckets: tuple[int, ...] | None = None,
) -> ServedModel:
    """Verify, open, load and warm up one model; a BmcError naming the file when any step fails.

    path: a model file (read and verified here against expected_sha256 or its sidecar), or a model
    already read and verified (read_verified_model), whose bytes are what every session is built from.
    buckets: the batch sizes to keep a session each for (default: serving_buckets for the device).
    """
    verified = path if isinstance(path, VerifiedModel) else read_verified_model(path, expected_sha256)
    path, held, digest = verified.path, verified.held, verified.digest
    metadata = ModelMetadata.from_props(verified.metadata_props)
    model_bytes = held.size_bytes
    # Each bucket's session sees one shape, but a request of more rows than --max-batch still
    # changes the largest bucket's shape: the heuristic choice makes that cost 46 ms, not 245.
    def open_session():
        return create_session(held, device=device, threads=threads, conv_algo_search="HEURISTIC")

    opened = open_session()
    session = opened.session
    inputs = tuple(_spec(node) for node in session.get_inputs())
    outputs = tuple(_spec(node) for node in session.get_outputs())
    unsupported = [spec for spec in (*inputs, *outputs) if spec.datatype not in V2_TO_NUMPY]
    if unsupported:
        raise SessionError(f"{path}: {unsupported[0].name!r} is {unsupported[0].datatype}; bmc serve serves tensors of numbers or strings only")
    if buckets is None:
        buckets = serving_buckets(opened.device, _can_merge(inputs, outputs), max_batch, model_bytes)
    # The largest bucket's session also takes any other shape (a request of more rows than --max-batch).
    bucket_sessions = {size: open_session().session for size in buckets[:-1]} | ({buckets[-1]: session} if buckets else {})
    del verified, held, open_session  # onnxruntime holds its own copy of the weights now
    model = ServedModel(
        name=name,
        path=Path(path),
        sha256=digest,
        session=session,
        device=opened.device,
        inputs=inputs,
        outputs=outputs,
        metadata=metadata,
        bucket_sessions=bucket_sessions,
    )
    for batch in model.buckets or (1,):
        _warm_up(model, batch)
    return model


def _can_merge(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> bool:
    return all(spec.dims and spec.dims[0] is None for spec in (*inputs, *outputs))


def _spec(node) -> TensorSpec:
    datatype = ORT_TO_V2.get(node.type, node.type)
    dims = tuple(d if isinstance(d, int) and d >= 0 else None for d in (node.shape or ()))
    return TensorSpec(node.name, datatype, dims)


def _warm_up(model: ServedModel, batch: int = 1) -> None:
    """One run on zeros, so the first client does not pay for onnxruntime's lazy initialisation."""
    feed = {}
    for spec in model.inputs:
        # Dynamic dims other than the batch axis, and strings, have no safe guess; such models warm up on first use.
        if any(d is None for d in spec.dims[1:]) or spec.datatype == "BYTES":
            return
        shape = tuple((batch if axis == 0 else 1) if d is None else d for axis, d in enumerate(spec.dims))
        feed[spec.name] = np.zeros(shape, dtype=V2_TO_NUMPY[spec.datatype])
    try:
        model.run(feed)
    except Exception as exc:  # onnxruntime's own error types
        raise SessionError(f"{model.path}: onnxruntime fails on a zero input ({ort_message(exc)})") from None
