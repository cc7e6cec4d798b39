"""Loading a model to serve: its files read once and verified (integrity.py), bmc's ONNX checks on
those bytes, then one session per target of its serving plan (targets.py: onnxruntime or OpenVINO,
per batch size) or per CUDA bucket, all built from the same bytes, then a warm-up of each."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bmc.errors import BmcError
from bmc.runtime.metadata import ModelMetadata
from bmc.runtime.model_file import TensorInfo
from bmc.runtime.registry import open_session
from bmc.runtime.sessions import SessionError, UnsupportedModelError, ort_message
from bmc.runtime.target import Target
from bmc.serve_edge import ServeConfig
from bmc.serve_edge.codec import V2_TO_NUMPY, TensorSpec
from bmc.serve_edge.integrity import VerifiedModel
from bmc.serve_edge.targets import ServingPlan, plan_serving
from bmc.serve_edge.testing import wait_for_test_gate

log = logging.getLogger("bmc.serve")

# A runtime's element type names (numpy's, and onnxruntime's own for strings) -> v2 datatypes.
DTYPE_TO_V2 = {dtype.name: v2 for v2, dtype in V2_TO_NUMPY.items() if dtype.kind != "O"} | {
    "object": "BYTES",  # the ONNX file's string tensors, as onnx names their numpy type
    "tensor(string)": "BYTES",  # onnxruntime's
}
# Triton's platform names, by runtime (Triton's OpenVINO backend has no platform; bmc says which it is).
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino"}
_OPENVINO_RUN_FAILURE = re.compile(r"openvino failed running it \((.*)\)$", re.DOTALL)


class UnservableModelError(BmcError):
    """A model whose inputs or outputs bmc serve cannot carry over the protocol."""


@dataclass(frozen=True)
class ServedModel:
    """A verified, loaded and warmed-up model: its sessions, its protocol signature and its bmc metadata."""

    name: str
    path: Path
    sha256: str
    sessions: tuple  # bmc.runtime Sessions (onnxruntime's or OpenVINO's), one copy of the weights each
    session_by_rows: tuple[int, ...]  # session_by_rows[r - 1]: the session that runs a batch of r rows; larger: the last
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    metadata: ModelMetadata
    plan: ServingPlan
    # On CUDA, the batch sizes the batcher pads to (see serving_buckets), one session each; empty elsewhere.
    buckets: tuple[int, ...] = ()
    # Runs per session, counted on the model's worker thread once each has succeeded (metrics read them).
    executions: list[int] = field(default_factory=list, compare=False)

    def __post_init__(self) -> None:
        if not self.executions:
            self.executions.extend([0] * len(self.sessions))

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.outputs)

    @property
    def can_merge(self) -> bool:
        """Requests can be concatenated when every input and output has a dynamic first (batch) axis."""
        return _can_merge(self.inputs, self.outputs)

    @property
    def device(self) -> str:
        """"cuda" when any session runs on the GPU, else "cpu"."""
        return "cuda" if any(session.device == "cuda" for session in self.sessions) else "cpu"

    @property
    def runtime(self) -> str:
        """The runtime of the session that runs the largest batches (what carries the load)."""
        return self.sessions[self.session_by_rows[-1]].runtime

    @property
    def platform(self) -> str:
        return PLATFORMS.get(self.runtime, self.runtime)

    def session_index(self, feed: dict[str, np.ndarray]) -> int:
        """Which session runs this feed: by its rows (the first input's first axis)."""
        if len(self.session_by_rows) == 1:
            return 0
        rows = next(iter(feed.values())).shape[0]
        return self.session_by_rows[min(max(rows, 1), len(self.session_by_rows)) - 1]

    def run(self, feed: dict[str, np.ndarray], run_options: object = None) -> dict[str, np.ndarray]:
        """One run on the session for this batch size; called on the model's worker thread.

        run_options: onnxruntime's RunOptions, for an onnxruntime session (ignored by the others).
        """
        wait_for_test_gate()
        index = self.session_index(feed)
        session = self.sessions[index]
        names = list(self.output_names)
        if session.runtime == "onnxruntime":  # its own handle: no per-run wrapping on the hot path
            outputs = dict(zip(names, session.session.run(names, feed, run_options)))
        else:
            outputs = session.run(feed, names)
        self.executions[index] += 1
        return outputs

    def describe_error(self, exc: Exception) -> str:
        """Why a run failed, for the client, on one line, without the server's paths."""
        if isinstance(exc, SessionError):
            failure = _OPENVINO_RUN_FAILURE.search(str(exc))
            if failure is not None:
                return f"openvino rejected the inputs: {failure.group(1)}"
            return str(exc).removeprefix(f"{self.path}: ")
        return f"onnxruntime rejected the inputs: {ort_message(exc)}"

    def describe(self) -> dict:
        """The v2 model metadata response."""
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": self.platform,
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


def check_servable(verified: VerifiedModel) -> None:
    """UnservableModelError naming the first input or output whose type the protocol cannot carry
    (a sequence or map, such as a ZipMap's; bfloat16; 4-bit): decided from the file, before listening."""
    for kind, infos in (("input", verified.inputs), ("output", verified.outputs)):
        for info in infos:
            if info.dtype not in DTYPE_TO_V2:
                shown = info.dtype.removesuffix("_type") if info.dtype.endswith("_type") else info.dtype
                raise UnservableModelError(
                    f"{verified.path}: {kind} {info.name!r} is {shown}; bmc serve serves tensors of numbers or strings only"
                )


def load_model(
    verified: VerifiedModel,
    name: str,
    config: ServeConfig,
    plan: ServingPlan | None = None,
    buckets: tuple[int, ...] | None = None,
) -> ServedModel:
    """Open, load and warm up one model, read and verified (integrity.read_verified_model), on its plan's
    targets (targets.py; default: plan_serving's), every session built from the verified bytes; a
    BmcError naming the file when any step fails. A target the metadata chose that cannot open the
    model (an operator OpenVINO lacks) is replaced by onnxruntime, with a warning; one --runtime named is not.

    config: the ServeConfig. buckets: on CUDA, the batch sizes to keep a session each for (default:
    serving_buckets for the device).
    """
    check_servable(verified)
    metadata = ModelMetadata.from_props(verified.metadata_props)
    unusable: dict[Target, str] = {}
    opened: dict[Target, object] = {}
    plan = plan or plan_serving(name, verified, config)
    while True:
        try:
            for target in plan.targets:
                if target not in opened:
                    opened[target] = _open(verified, target)
            break
        except UnsupportedModelError as exc:
            if plan.source != "metadata" or target.runtime == "onnxruntime":
                raise
            unusable[target] = f"{target.runtime} cannot open it ({_reason(exc, verified.path)})"
            known = set(plan.notes)
            plan = plan_serving(name, verified, config, unusable)
            for note in plan.notes:
                if note not in known:
                    log.warning("%s", note)
    sessions = [opened[target] for target in plan.targets]
    by_rows, digest, path = plan.by_rows, verified.digest, verified.path
    inputs, outputs = _signature(verified.path, sessions)
    if len(sessions) > 1:  # several targets: the CPU, where a new shape costs nothing (no buckets)
        buckets = ()
    elif buckets is None:
        buckets = serving_buckets(sessions[0].device, _can_merge(inputs, outputs), config.max_batch, verified.held.size_bytes)
    if buckets:
        # One session per bucket, each only ever sees its one shape; the largest bucket's is the one
        # opened already, and also takes any other shape (a request of more rows than --max-batch).
        target = plan.targets[-1]
        sessions = [*(_open(verified, target) for _ in buckets[:-1]), sessions[-1]]
        by_rows = tuple(next(i for i, size in enumerate(buckets) if size >= rows) for rows in range(1, buckets[-1] + 1))
    del verified, opened  # the runtimes hold their own copies of the weights now
    model = ServedModel(
        name=name,
        path=Path(path),
        sha256=digest,
        sessions=tuple(sessions),
        session_by_rows=by_rows,
        inputs=inputs,
        outputs=outputs,
        metadata=metadata,
        plan=plan,
        buckets=tuple(buckets),
    )
    for index in range(len(model.sessions)):
        _warm_up(model, index)
    model.executions[:] = [0] * len(model.sessions)  # warm-ups are not served runs
    return model


def _open(verified: VerifiedModel, target: Target):
    """A session for the verified bytes on `target`."""
    if target.runtime == "onnxruntime":
        # On CUDA each bucket's session sees one shape, but a request of more rows than --max-batch
        # still changes the largest bucket's shape: the heuristic choice makes that cost 46 ms, not 245.
        return open_session(verified.held, target, conv_algo_search="HEURISTIC")
    if target.runtime == "openvino":
        # One batch at a time per model (the batcher's one worker thread): the latency hint's single stream.
        return open_session(verified.held, target, performance_hint="latency", memory_only=verified.encrypted)
    return open_session(verified.held, target)


def _reason(exc: BaseException, path: Path) -> str:
    """A runtime's one-line error without the file's name in front, and its "<runtime> cannot open it" wrapper."""
    text = str(exc).removeprefix(f"{path}: ")
    opened = re.match(r"\w+ cannot (?:open|load|compile) it(?: for the CPU)? \((.*)\)$", text, re.DOTALL)
    return opened.group(1) if opened else text


def _signature(path: Path, sessions: list) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The model's inputs and outputs as the protocol shows them, the same whichever session runs a
    batch: names and types must agree across runtimes; a dim any runtime leaves dynamic is dynamic."""
    inputs = tuple(_spec(info) for info in sessions[0].inputs)
    outputs = tuple(_spec(info) for info in sessions[0].outputs)
    for session in sessions[1:]:
        other_inputs = tuple(_spec(info) for info in session.inputs)
        other_outputs = tuple(_spec(info) for info in session.outputs)
        for mine, theirs in ((inputs, other_inputs), (outputs, other_outputs)):
            if [(s.name, s.datatype, len(s.dims)) for s in mine] != [(s.name, s.datatype, len(s.dims)) for s in theirs]:
                raise SessionError(
                    f"{path}: {sessions[0].runtime} and {session.runtime} see different inputs or outputs "
                    f"({_shown(mine)} against {_shown(theirs)}); serve it on one runtime (--runtime)"
                )
        inputs, outputs = _merged(inputs, other_inputs), _merged(outputs, other_outputs)
    unsupported = [spec for spec in (*inputs, *outputs) if spec.datatype not in V2_TO_NUMPY]
    if unsupported:
        raise UnservableModelError(f"{path}: {unsupported[0].name!r} is {unsupported[0].datatype}; bmc serve serves tensors of numbers or strings only")
    return inputs, outputs


def _merged(mine: tuple[TensorSpec, ...], theirs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(a.name, a.datatype, tuple(x if x == y else None for x, y in zip(a.dims, b.dims))) for a, b in zip(mine, theirs)
    )


def _shown(specs: tuple[TensorSpec, ...]) -> str:
    return ", ".join(f"{s.name} {s.datatype}{list(s.dims)}" for s in specs)


def _can_merge(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> bool:
    return all(spec.dims and spec.dims[0] is None for spec in (*inputs, *outputs))


def _spec(info: TensorInfo) -> TensorSpec:
    datatype = DTYPE_TO_V2.get(info.dtype, info.dtype)
    dims = tuple(d if isinstance(d, int) and d >= 0 else None for d in info.shape)
    return TensorSpec(info.name, datatype, dims)


def _warm_up(model: ServedModel, index: int) -> None:
    """One run of session `index` on zeros, at the largest batch it serves, so the first client does not
    pay for the runtime's lazy initialisation (onnxruntime's arena, OpenVINO's kernels for the shape)."""
    rows = max((r for r, i in enumerate(model.session_by_rows, 1) if i == index), default=1)
    feed = {}
    for spec in model.inputs:
        # Dynamic dims other than the batch axis, and strings, have no safe guess; such models warm up on first use.
        if any(d is None for d in spec.dims[1:]) or spec.datatype == "BYTES":
            return
        shape = tuple((rows if axis == 0 else 1) if d is None else d for axis, d in enumerate(spec.dims))
        feed[spec.name] = np.zeros(shape, dtype=V2_TO_NUMPY[spec.datatype])
    try:
        model.run(feed)
    except Exception as exc:  # the runtime's own error types
        runtime = model.sessions[index].runtime
        raise SessionError(f"{model.path}: {runtime} fails on a zero input ({model.describe_error(exc).split(': ', 1)[-1]})") from None
