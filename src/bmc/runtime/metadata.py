"""What bmc writes into an ONNX file's metadata_props, and how it reads it back. No torch here.

Everything a box with only onnxruntime needs to use the model travels inside the file: class names,
input layout and shape, preprocessing, provenance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

PREFIX = "bmc."


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

    def to_props(self) -> dict[str, str]:
        """As ONNX metadata_props: string keys, JSON-encoded values."""
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
        )
