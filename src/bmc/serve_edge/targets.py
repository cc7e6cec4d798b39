"""Which runtime runs which batch: decided for each model before the server listens.

A model's metadata may name a target (runtime, device, precision, threads) per batch size: what
`bmc compress` measured fastest for it. Serve opens one session per distinct target and runs each
batch the batcher forms on the target chosen for its size (the nearest size chosen, on a log scale:
ModelMetadata.target_for). `--runtime` puts every batch of every model on one target instead, and
`--providers cuda|auto` keeps every batch on onnxruntime on that device (the metadata's choices were
timed on a CPU).

What the metadata names is a preference measured on another machine, so serving never fails over
it: a runtime not installed here, a precision this CPU lacks, a device not asked for, or a runtime
that cannot take this model (OpenVINO: strings; an encrypted model past 2 GiB, which OpenVINO would
read from a file) serves those batches on onnxruntime, or in fp32, with a warning. The same problems
with `--runtime` given are errors: the user asked for that runtime by name.

Each target is a copy of the model's weights in memory. A model is opened on at most as many
targets as TARGET_WEIGHTS_BUDGET_BYTES holds copies of it (at least one): the target of the largest
batch (what carries load) first, then batch 1's, then the others from the largest batch down; a batch
size whose target is dropped runs on the nearest kept one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bmc.errors import BmcError
from bmc.runtime.metadata import ModelMetadata
from bmc.runtime.registry import get_runtime, require_runtime, runtime_problem
from bmc.runtime.target import Target
from bmc.serve_edge import ServeConfig
from bmc.serve_edge.integrity import VerifiedModel

# Host memory the copies of one model's weights may take across its targets (one copy is always kept).
TARGET_WEIGHTS_BUDGET_BYTES = 1 << 30
FALLBACK_RUNTIME = "onnxruntime"


class ServingTargetError(BmcError):
    """--runtime asks for something that cannot serve this model here."""


@dataclass(frozen=True)
class ServingPlan:
    """The targets one model is opened on, and which of them runs a batch of each size."""

    targets: tuple[Target, ...]  # distinct, in order of the smallest batch each runs; one session each
    by_rows: tuple[int, ...]  # by_rows[r - 1]: the index in targets that runs a batch of r rows; larger: the last
    source: str  # "--runtime", "metadata" or "default"
    notes: tuple[str, ...] = field(default=(), compare=False)  # where the metadata's choice was not followed, and why

    def index_for(self, rows: int) -> int:
        """Which target runs a batch of `rows` rows."""
        return self.by_rows[min(max(rows, 1), len(self.by_rows)) - 1]

    def describe(self) -> dict[str, str]:
        """Batch sizes -> the label of the target that runs them: {"1-5": "onnxruntime", "6+": "openvino"}."""
        groups: list[list[int]] = []  # [first rows, last rows, target index]
        for rows, index in enumerate(self.by_rows, 1):
            if groups and groups[-1][2] == index:
                groups[-1][1] = rows
            else:
                groups.append([rows, rows, index])
        described = {}
        for position, (first, last, index) in enumerate(groups):
            key = f"{first}+" if position == len(groups) - 1 else (str(first) if first == last else f"{first}-{last}")
            described[key] = self.targets[index].label
        return described


def check_runtime_override(config: ServeConfig) -> None:
    """--runtime names a runtime that imports and runs here, with --precision on this machine; else one line.
    Checked before any model is read."""
    override = config.runtime_override
    if override is None:
        return
    runtime = require_runtime(override.runtime)  # "runtime 'openvino' is not installed here (pip install ...)"
    here = runtime.precisions_here(override.device)
    if override.precision not in here:
        raise ServingTargetError(f"--precision {override.precision}: {override.runtime} has none on this machine; its precisions here: {', '.join(here)}")


def plan_serving(
    name: str, verified: VerifiedModel, config: ServeConfig, unusable: dict[Target, str] | None = None
) -> ServingPlan:
    """The targets to open `verified` on and which serves each batch size; ServingTargetError when
    --runtime cannot serve it. unusable: targets that failed to open it, and why (served on onnxruntime)."""
    metadata = ModelMetadata.from_props(verified.metadata_props)
    rows_domain = _rows_domain(verified, config.max_batch)
    override = config.runtime_override
    if override is not None:
        problem = _cannot_serve(override, verified)
        if problem is not None:
            raise ServingTargetError(f"{verified.path}: --runtime {override.runtime} cannot serve it: {problem}")
        return _plan({1: override}, rows_domain, "--runtime", ())
    default = Target(FALLBACK_RUNTIME, config.providers, "fp32", config.intra_op_threads)
    if not metadata.runtime_targets:
        return _plan({1: default}, rows_domain, "default", ())
    if config.providers != "cpu":
        others = sorted({t.label for t in metadata.runtime_targets.values() if t.runtime != FALLBACK_RUNTIME})
        notes = (f"{name}: --providers {config.providers} serves every batch on onnxruntime; its metadata's "
                 f"choice of {', '.join(others)} is not used",) if others else ()
        return _plan({1: default}, rows_domain, "default", notes)
    departures: dict[tuple[str, str, str], list[int]] = {}  # (chosen, why not, served on) -> batch sizes
    resolved = {}
    for batch_size, chosen in sorted(metadata.runtime_targets.items()):
        target, reason = _usable_here(chosen, verified, config, unusable or {})
        resolved[batch_size] = target
        if reason is not None:
            departures.setdefault((chosen.label, reason, target.label), []).append(batch_size)
    messages = [
        f"{name}: its metadata chooses {chosen} for batch {', '.join(map(str, sizes))}, but {reason}; serving "
        f"{'that batch size' if len(sizes) == 1 else 'those batch sizes'} on {served}"
        for (chosen, reason, served), sizes in departures.items()
    ]
    return _bounded(resolved, rows_domain, verified.held.size_bytes, name, messages)


def _bounded(resolved: dict[int, Target], rows_domain: tuple[int, ...], model_bytes: int, name: str, notes: list[str]) -> ServingPlan:
    """The plan for these choices, keeping no more targets than TARGET_WEIGHTS_BUDGET_BYTES holds copies."""
    wanted = _table(resolved, rows_domain)
    priority = list(dict.fromkeys([wanted[-1], wanted[0], *reversed(wanted)]))
    copies = max(1, TARGET_WEIGHTS_BUDGET_BYTES // max(1, model_bytes))
    if len(priority) > copies:
        kept = set(priority[:copies])
        dropped = [t.label for t in priority[copies:]]
        resolved = {b: t for b, t in resolved.items() if t in kept}
        notes.append(
            f"{name}: {model_bytes / 2**20:.0f} MiB of weights; {copies} cop{'y' if copies == 1 else 'ies'} fit in "
            f"{TARGET_WEIGHTS_BUDGET_BYTES >> 20} MiB, so {', '.join(dropped)} is not opened and its batches run on the nearest kept target"
        )
    return _plan(resolved, rows_domain, "metadata", tuple(notes))


def _plan(choice: dict[int, Target], rows_domain: tuple[int, ...], source: str, notes: tuple[str, ...]) -> ServingPlan:
    wanted = _table(choice, rows_domain)
    targets = tuple(dict.fromkeys(wanted))
    return ServingPlan(targets, tuple(targets.index(t) for t in wanted), source, notes)


def _table(choice: dict[int, Target], rows_domain: tuple[int, ...]) -> list[Target]:
    """The target for each batch size in rows_domain: the one chosen for it, else for the nearest size chosen."""
    chooser = ModelMetadata(runtime_targets=choice)
    return [chooser.target_for(rows) for rows in rows_domain]


def _rows_domain(verified: VerifiedModel, max_batch: int) -> tuple[int, ...]:
    """The batch sizes the batcher can form: 1..max_batch when every input has a dynamic first axis,
    else the model's one fixed batch size (1 when it has none)."""
    firsts = [info.shape[0] if info.shape else 1 for info in verified.inputs]
    if firsts and all(isinstance(d, str) for d in firsts):
        return tuple(range(1, max_batch + 1))
    fixed = next((d for d in firsts if isinstance(d, int) and d >= 1), 1)
    return (fixed,)


def _usable_here(chosen: Target, verified: VerifiedModel, config: ServeConfig, unusable: dict[Target, str]) -> tuple[Target, str | None]:
    """(the target to serve a metadata choice on here, why it differs from the choice or None)."""
    threads = config.threads if config.threads is not None else (chosen.threads or config.intra_op_threads)
    fallback = Target(FALLBACK_RUNTIME, "cpu", "fp32", threads)
    problem = runtime_problem(chosen.runtime)
    if problem is not None:
        runtime = get_runtime(chosen.runtime)
        if runtime.version() is None:
            return fallback, f"{chosen.runtime} is not installed here ({runtime.install_hint})"
        return fallback, f"{chosen.runtime} does not work here ({problem})"
    target = Target(chosen.runtime, "cpu", chosen.precision, threads)
    reason = None
    if chosen.device == "cuda":
        reason = "bmc serve runs on the CPU unless --providers says otherwise"
    here = get_runtime(chosen.runtime).precisions_here("cpu")
    if target.precision not in here:
        target = Target(chosen.runtime, "cpu", "fp32", threads)
        reason = f"{chosen.runtime} has no {chosen.precision} on this CPU"
    for candidate in (target, chosen):
        if candidate in unusable:
            return fallback, unusable[candidate]
    problem = _cannot_serve(target, verified)
    if problem is not None:
        return fallback, problem
    return target, reason


def _cannot_serve(target: Target, verified: VerifiedModel) -> str | None:
    """Why `target` cannot serve this model in bmc serve, decided from the file alone; None if it can."""
    if target.runtime != "openvino":
        return None
    if any(info.dtype == "object" for info in (*verified.inputs, *verified.outputs)):
        return "bmc serve runs string (BYTES) tensors on onnxruntime only"
    if verified.encrypted:
        from bmc.runtime.openvino_sessions import needs_file_copy

        if needs_file_copy(verified.held):
            return (f"openvino reads a model of {verified.held.size_bytes / 2**30:.1f} GiB from files only, and a "
                    "decrypted model never touches the disk")
    return None


__all__ = ["ServingPlan", "ServingTargetError", "TARGET_WEIGHTS_BUDGET_BYTES", "check_runtime_override", "plan_serving"]
