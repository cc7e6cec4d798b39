"""What bmc writes into an ONNX file's metadata_props, and how it reads it back. No torch here.

Everything a box with only onnxruntime needs to use the model travels inside the file: class names,
input layout and shape, preprocessing, provenance; and, once compress has chosen them, the runtime
settings to run it with per batch size.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from bmc.errors import BmcError
from bmc.runtime.target import Target

PREFIX = "bmc."
PROTOBUF_LIMIT_BYTES = (1 << 31) - 1


@dataclass(frozen=True)
class ModelMetadata:
    """The bmc metadata of an exported model (all optional for ONNX files bmc did not write)."""

    bmc_version: str = ""
    model: str = ""
    dataset: str = ""
    task: str = "classification"
    class_names: tuple[str, ...] = ()
    input_layout: str = "NCHW"
    input_shape: tuple[int, ...] = ()  # what the model takes, batch excluded
    data_input_shape: tuple[int, ...] = ()  # what the data set stores; resized to input_shape when they differ
    normalization: dict = field(default_factory=dict)  # {"scale", "mean", "std"}
    source_sha256: str = ""
    precision: str = "fp32"
    # batch size -> the runtime, device, precision and threads chosen for it (by compress); empty
    # when nothing was chosen, and then not written at all, so older files and bmc read the same.
    runtime_targets: dict[int, Target] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for batch_size, target in self.runtime_targets.items():
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 or not isinstance(target, Target):
                raise BmcError(f"runtime_targets maps batch sizes (>= 1) to Targets; got {batch_size!r}: {target!r}")

    def target_for(self, batch_size: int) -> Target | None:
        """The target chosen for batch_size, else for the nearest batch size chosen (on a log scale); None if none."""
        if not self.runtime_targets:
            return None
        if batch_size in self.runtime_targets:
            return self.runtime_targets[batch_size]
        nearest = min(self.runtime_targets, key=lambda b: (abs(math.log2(b) - math.log2(max(batch_size, 1))), b))
        return self.runtime_targets[nearest]

    def to_props(self) -> dict[str, str]:
        """As ONNX metadata_props: string keys, JSON-encoded values."""
        props = self._base_props()
        if self.runtime_targets:
            props[PREFIX + "runtime_targets"] = json.dumps(
                {str(b): self.runtime_targets[b].to_dict() for b in sorted(self.runtime_targets)}, sort_keys=True
            )
        return props

    def _base_props(self) -> dict[str, str]:
        return {
            PREFIX + "version": self.bmc_version,
            PREFIX + "model": self.model,
            PREFIX + "dataset": self.dataset,
            PREFIX + "task": self.task,
            PREFIX + "class_names": json.dumps(list(self.class_names)),
            PREFIX + "input_layout": self.input_layout,
            PREFIX + "input_shape": json.dumps(list(self.input_shape)),
            PREFIX + "data_input_shape": json.dumps(list(self.data_input_shape)),
            PREFIX + "normalization": json.dumps(self.normalization),
            PREFIX + "source_sha256": self.source_sha256,
            PREFIX + "precision": self.precision,
        }

    @classmethod
    def from_props(cls, props: dict[str, str]) -> "ModelMetadata":
        """Read bmc's keys back; missing or malformed values fall back to the defaults."""

        def loaded(key: str, default):
            try:
                value = json.loads(props[PREFIX + key])
            except (KeyError, ValueError, TypeError):
                return default
            return value if isinstance(value, type(default)) else default

        return cls(
            bmc_version=props.get(PREFIX + "version", ""),
            model=props.get(PREFIX + "model", ""),
            dataset=props.get(PREFIX + "dataset", ""),
            task=props.get(PREFIX + "task", "classification"),
            class_names=tuple(str(n) for n in loaded("class_names", [])),
            input_layout=props.get(PREFIX + "input_layout", "NCHW"),
            input_shape=tuple(int(d) for d in loaded("input_shape", []) if isinstance(d, int)),
            data_input_shape=tuple(int(d) for d in loaded("data_input_shape", []) if isinstance(d, int)),
            normalization=loaded("normalization", {}),
            source_sha256=props.get(PREFIX + "source_sha256", ""),
            precision=props.get(PREFIX + "precision", "fp32"),
            runtime_targets=_runtime_targets(loaded("runtime_targets", {})),
        )


def _runtime_targets(values: dict) -> dict[int, Target]:
    """{"1": {target}, ...} -> {1: Target}; a malformed entry, or one naming a runtime or setting this
    bmc does not know, drops the whole choice (serve then uses its default) rather than half of it."""
    targets: dict[int, Target] = {}
    try:
        for key, value in values.items():
            batch_size = int(key)
            if batch_size < 1 or str(batch_size) != key:
                return {}
            targets[batch_size] = Target.from_dict(value)
    except (BmcError, ValueError, TypeError):
        return {}
    return targets


def write_with_metadata(source: Path, target: Path, metadata: ModelMetadata) -> None:
    """source's graph and weights at target (atomically) with bmc's metadata keys set from metadata
    (its other keys kept), and target's manifest written for every file it consists of."""
    import onnx

    from bmc.manifest import manifest_of_files, write_manifest

    proto = onnx.load(str(source), load_external_data=True)
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in metadata.to_props().items():
        entry = existing.get(key) or proto.metadata_props.add()
        entry.key, entry.value = key, value
    try:
        large = proto.ByteSize() > PROTOBUF_LIMIT_BYTES - (64 << 20)
    except ValueError:  # some protobuf builds refuse to even size a message over the limit
        large = True
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    onnx.save_model(proto, str(partial), save_as_external_data=large, all_tensors_to_one_file=True, location=f"{target.name}.data",
                    size_threshold=1024)
    os.replace(partial, target)
    write_manifest(target, manifest_of_files(target))
