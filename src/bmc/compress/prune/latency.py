"""How fast a candidate cut runs where the model will run: a PyTorch model exported to a scratch
ONNX file and timed in onnxruntime on this CPU, as a whole or per residual block."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch
from torch import nn


class Probe(Protocol):
    """What pruning measures on the target: a model's latency per batch size, and the time of each
    module scope (a residual block's name) inside it."""

    def latency_ms(self, model: nn.Module) -> dict[int, float]: ...

    def scope_times_ms(self, model: nn.Module, scopes: list[str]) -> dict[str, float]: ...


@dataclass(frozen=True)
class OnnxProbe:
    """Times models in onnxruntime on this CPU: the median latency per batch size, best of a few
    short rounds; and the kernel time under each scope from one profiled session at profile_batch."""

    example: torch.Tensor
    batch_sizes: tuple[int, ...] = (1, 32)
    rounds: int = 3
    seconds: float = 0.2
    profile_batch: int = 32

    def latency_ms(self, model: nn.Module) -> dict[int, float]:
        from bmc.bench.timing import measure, random_inputs, runner
        from bmc.runtime.sessions import create_session

        with exported(model, self.example) as path:
            session = create_session(path, "cpu")
            best: dict[int, float] = {}
            for _ in range(self.rounds):
                for batch in self.batch_sizes:
                    timing = measure(runner(session, random_inputs(session.session, batch)), batch, warmup=3, iters=None, seconds=self.seconds)
                    best[batch] = min(best.get(batch, float("inf")), timing.latency_ms_median)
        return best

    def scope_times_ms(self, model: nn.Module, scopes: list[str]) -> dict[str, float]:
        from bmc.bench.profile import node_times_ms, scope_times_ms

        with exported(model, self.example) as path:
            return scope_times_ms(node_times_ms(path, self.profile_batch), scopes)


@contextmanager
def exported(model: nn.Module, example: torch.Tensor) -> Iterator[Path]:
    """The model exported to a temporary ONNX file, gone after the block: what a candidate is timed on."""
    from bmc.export import DEFAULT_OPSET
    from bmc.export.onnx_export import torch_to_onnx

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "candidate.onnx"
        torch_to_onnx(model.eval(), example, path, DEFAULT_OPSET)
        yield path
