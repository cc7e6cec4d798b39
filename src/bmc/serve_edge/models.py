"""Loading a model to serve: sha256 first, then bmc's ONNX safety checks, then onnxruntime, then a warm-up."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bmc.bench.model_file import open_model
from bmc.bench.sessions import SessionError, create_session, ort_message
from bmc.export.metadata import ModelMetadata
from bmc.serve_edge.codec import ORT_TO_V2, V2_TO_NUMPY, TensorSpec
from bmc.serve_edge.integrity import verify_model_file

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

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.outputs)

    @property
    def can_merge(self) -> bool:
        """Requests can be concatenated when every input and output has a dynamic first (batch) axis."""
        return all(spec.dims and spec.dims[0] is None for spec in (*self.inputs, *self.outputs))

    def batch_buckets(self, max_batch: int) -> tuple[int, ...]:
        """The batch sizes the batcher pads to: powers of two up to max_batch on CUDA, none elsewhere.

        On CUDA, onnxruntime's first run at each new input shape searches cuDNN's algorithms
        (measured on an H100: dynamic batching with every size up to 32 served resnet20 at 29
        requests/s at concurrency 16 against 816 without batching). A few fixed shapes, each
        warmed up before ready, avoid that, and padding costs little on a GPU, where a batch of
        32 takes as long as a batch of 1 for small models. On a CPU a new shape costs nothing
        and padding would cost compute.
        """
        if self.device != "cuda" or not self.can_merge or max_batch <= 1:
            return ()
        return tuple(sorted({1 << i for i in range(max_batch.bit_length())} | {max_batch}))

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One onnxruntime run; called on the model's worker thread."""
        return dict(zip(self.output_names, self.session.run(list(self.output_names), feed)))

    def describe(self) -> dict:
        """The v2 model metadata response."""
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [spec.metadata() for spec in self.inputs],
            "outputs": [spec.metadata() for spec in self.outputs],
        }


def load_model(path: Path, name: str, expected_sha256: str | None, threads: int, device: str, max_batch: int = 1) -> ServedModel:
    """Verify, open, load and warm up one model; a BmcError naming the file when any step fails."""
    digest = verify_model_file(path, expected_sha256)
    model_file = open_model(path)  # no external data outside the model's folder, no malformed graph
    # onnxruntime's exhaustive cuDNN search runs again at every change of input shape, even to a
    # shape seen before (H100, resnet20: 0.66 ms per run at a steady batch size, 250 ms at every
    # change), and a batcher changes shape all the time; the heuristic choice does not search.
    opened = create_session(path, device=device, threads=threads, conv_algo_search="HEURISTIC")
    session = opened.session
    inputs = tuple(_spec(node) for node in session.get_inputs())
    outputs = tuple(_spec(node) for node in session.get_outputs())
    unsupported = [spec for spec in (*inputs, *outputs) if spec.datatype not in V2_TO_NUMPY]
    if unsupported:
        raise SessionError(f"{path}: {unsupported[0].name!r} is {unsupported[0].datatype}; bmc serve serves numeric tensors only")
    model = ServedModel(
        name=name,
        path=Path(path),
        sha256=digest,
        session=session,
        device=opened.device,
        inputs=inputs,
        outputs=outputs,
        metadata=ModelMetadata.from_props(model_file.metadata_props),
    )
    for batch in model.batch_buckets(max_batch) or (1,):
        _warm_up(model, batch)
    return model


def _spec(node) -> TensorSpec:
    datatype = ORT_TO_V2.get(node.type, node.type)
    dims = tuple(d if isinstance(d, int) and d >= 0 else None for d in (node.shape or ()))
    return TensorSpec(node.name, datatype, dims)


def _warm_up(model: ServedModel, batch: int = 1) -> None:
    """One run on zeros, so the first client does not pay for onnxruntime's lazy initialisation."""
    feed = {}
    for spec in model.inputs:
        # Dynamic dims other than the batch axis have no safe guess; such models warm up on first use.
        if any(d is None for d in spec.dims[1:]):
            return
        shape = tuple((batch if axis == 0 else 1) if d is None else d for axis, d in enumerate(spec.dims))
        feed[spec.name] = np.zeros(shape, dtype=V2_TO_NUMPY[spec.datatype])
    try:
        model.run(feed)
    except Exception as exc:  # onnxruntime's own error types
        raise SessionError(f"{model.path}: onnxruntime fails on a zero input ({ort_message(exc)})") from None
