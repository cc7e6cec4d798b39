"""Where a model's time goes: onnxruntime's own per-node kernel times on the CPU. Never imports torch.

A whole-model timing of each variant (say, the model without one block) differs from the next by
a few percent on a shared machine, as much as the variants differ from each other; the kernel
times of one profiled session, summed by the ONNX name scope torch's exporter writes
("/layers/layers.4/conv1/Conv"), share one run's noise and rank layers reliably.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from bmc.runtime.sessions import SessionError, create_session
from bmc.bench.timing import random_inputs

KERNEL_SUFFIX = "_kernel_time"


def node_times_ms(path: Path, batch_size: int = 32, iterations: int = 20, threads: int | None = None) -> dict[str, float]:
    """Each node's median kernel time in ms over `iterations` runs at `batch_size` on the CPU,
    keyed by the name onnxruntime gives the node after its graph optimizations (fused nodes keep
    their scope: "/layers/layers.4/conv2/Conv_output_0_nchwc")."""
    if iterations < 1:
        raise SessionError(f"iterations must be >= 1; got {iterations}")
    with tempfile.TemporaryDirectory() as scratch:
        session = create_session(path, "cpu", threads, profile_prefix=str(Path(scratch) / "profile")).session
        feeds = random_inputs(session, batch_size)
        for _ in range(iterations + 1):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    durations: dict[str, list[float]] = defaultdict(list)
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith(KERNEL_SUFFIX):
            durations[name[: -len(KERNEL_SUFFIX)]].append(event["dur"] / 1000)
    # Each node's first run is the warm-up: dropped before the median.
    return {name: float(np.median(times[1:] or times)) for name, times in durations.items()}


def scope_times_ms(times: dict[str, float], scopes: list[str]) -> dict[str, float]:
    """The summed time of the nodes under each module scope: "layers.4" takes every node whose name
    holds "/layers.4/", as torch's exporter writes a module's qualified name into its nodes' names."""
    return {scope: sum(ms for node, ms in times.items() if f"/{scope}/" in node) for scope in scopes}
