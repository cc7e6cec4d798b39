"""Where and how a model runs: a runtime, a device, a float precision and threads, as data.

A Target is what compress records as its choice per batch size (in the model's metadata) and what
serve and bench open a session with. It serializes to plain JSON, so a choice made on one machine
travels inside the file to another.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from bmc.errors import UsageError

# The precision floating-point operators compute in. "fp32" lowers nothing: a file's float ops run
# in fp32 and its int8 operators stay int8, whichever runtime runs it. "bf16" and "fp16" let a
# runtime that supports the hint (OpenVINO) compute float ops in that type, which changes numerics.
PRECISIONS = ("fp32", "bf16", "fp16")
MAX_THREADS = 1024


@dataclass(frozen=True)
class Target:
    """A runtime, the device it runs on, the float precision it computes in and its threads (None: its default)."""

    runtime: str = "onnxruntime"
    device: str = "cpu"
    precision: str = "fp32"
    threads: int | None = None

    def __post_init__(self) -> None:
        from bmc.runtime.registry import get_runtime

        runtime = get_runtime(self.runtime)  # "unknown runtime 'x'; known: ..."
        if self.device not in runtime.devices:
            raise UsageError(f"runtime {self.runtime!r} has no device {self.device!r}; its devices: {', '.join(runtime.devices)}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.precision not in runtime.precisions:
            raise UsageError(
                f"runtime {self.runtime!r} takes no precision {self.precision!r}; its precisions: {', '.join(runtime.precisions)}"
            )
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int) or not 1 <= self.threads <= MAX_THREADS):
            raise UsageError(f"threads must be in [1, {MAX_THREADS}] or None; got {self.threads!r}")

    @property
    def label(self) -> str:
        """Short text for tables: 'openvino bf16', 'onnxruntime cuda', 'onnxruntime 1 thread'."""
        parts = [self.runtime]
        if self.device != "cpu":
            parts.append(self.device)
        if self.precision != "fp32":
            parts.append(self.precision)
        if self.threads is not None:
            parts.append(f"{self.threads} thread{'s' if self.threads > 1 else ''}")
        return " ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "Target":
        """A Target from to_dict()'s form; UsageError for unknown keys or bad values."""
        if not isinstance(values, dict):
            raise UsageError(f"a runtime target must be a JSON object; got {type(values).__name__}")
        unknown = sorted(set(values) - {"runtime", "device", "precision", "threads"})
        if unknown:
            raise UsageError(f"a runtime target has no field {unknown[0]!r}; its fields: runtime, device, precision, threads")
        for key in ("runtime", "device", "precision"):
            if key in values and not isinstance(values[key], str):
                raise UsageError(f"runtime target field {key!r} must be a string; got {values[key]!r}")
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> "Target":
        try:
            values = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"a runtime target is not JSON ({exc})") from None
        return cls.from_dict(values)
