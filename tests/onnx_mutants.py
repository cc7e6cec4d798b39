"""Seeded mutations of an ONNX file's bytes and of its parsed message, and how the CLI meets each one.

A mutant is one of: byte flips, zeroed or repeated runs, truncation; or a deleted node, initializer,
input, output, attribute or opset, wrong dims, a wrong type or IR version. `run_case` runs one
command in its own subprocess with a timeout; its outcome is one of
  success        exit 0 (the mutation left a valid model)
  clean error    exit 1 or 2 and exactly one stderr line starting with "error: " (not an internal error)
  internal error one line, but "error: internal error: ..." -- an exception bmc did not expect
  crash          anything else: a signal, a traceback, stray output on stderr
  hang           the timeout passed
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Iterator

OUTCOMES = ("success", "clean error", "internal error", "crash", "hang")
BYTE_KINDS = ("flip", "flip-many", "flip-head", "flip-tail", "zero-run", "repeat-run", "truncate", "truncate-tail")
# The graph's nodes sit at the start of an exported file and its inputs, outputs, opsets and metadata
# at the end; the weights in between take most flips harmlessly.
STRUCTURE_BYTES = 2048
PROTO_KINDS = ("drop-node", "drop-initializer", "drop-input", "drop-output", "drop-attribute", "drop-opset", "bad-dims", "drop-node-input", "bad-type", "bad-ir")


def mutants(original: bytes, count: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """`count` seeded (kind, mutated bytes) pairs; about a third are message-level deletions."""
    rng = random.Random(seed)
    for _ in range(count):
        if rng.random() < 0.35:
            kind = rng.choice(PROTO_KINDS)
            mutated = _mutate_message(original, kind, rng)
            if mutated is not None:
                yield kind, mutated
                continue
        kind = rng.choice(BYTE_KINDS)
        yield kind, _mutate_bytes(original, kind, rng)


def run_case(args: list[str], cwd: Path, timeout_s: float) -> tuple[str, str]:
    """(outcome, stderr's first line) of `python -m bmc ARGS` in a subprocess."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "bmc", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    except subprocess.TimeoutExpired:
        return "hang", ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if result.returncode == 0:
        return ("success" if not lines else "crash"), first
    clean = result.returncode in (1, 2) and len(lines) == 1 and first.startswith("error: ") and "Traceback" not in result.stderr
    if clean and first.startswith("error: internal error"):
        return "internal error", first
    return ("clean error" if clean else "crash"), first or f"exit {result.returncode}"


def _mutate_bytes(data: bytes, kind: str, rng: random.Random) -> bytes:
    buffer = bytearray(data)
    size = len(buffer)
    if kind in ("flip", "flip-many"):
        for _ in range(1 if kind == "flip" else rng.randint(2, 32)):
            buffer[rng.randrange(size)] ^= rng.randint(1, 255)
    elif kind in ("flip-head", "flip-tail"):
        span = min(size, STRUCTURE_BYTES)
        for _ in range(rng.randint(1, 4)):
            offset = rng.randrange(span)
            buffer[offset if kind == "flip-head" else size - 1 - offset] ^= rng.randint(1, 255)
    elif kind == "zero-run":
        start = rng.randrange(size)
        end = min(size, start + rng.randint(1, 64))
        buffer[start:end] = bytes(end - start)
    elif kind == "repeat-run":
        start = rng.randrange(size)
        run = buffer[start : start + rng.randint(1, 256)]
        buffer[start:start] = run
    elif kind == "truncate":
        return bytes(buffer[: rng.randrange(size)])
    elif kind == "truncate-tail":  # a few bytes short: the cut most likely to still parse
        return bytes(buffer[: size - rng.randint(1, 16)])
    return bytes(buffer)


def _mutate_message(data: bytes, kind: str, rng: random.Random) -> bytes | None:
    import onnx

    model = onnx.load_model_from_string(data)
    graph = model.graph

    def drop(container) -> bool:
        if len(container) == 0:
            return False
        del container[rng.randrange(len(container))]
        return True

    if kind == "drop-node":
        changed = drop(graph.node)
    elif kind == "drop-initializer":
        changed = drop(graph.initializer)
    elif kind == "drop-input":
        changed = drop(graph.input)
    elif kind == "drop-output":
        changed = drop(graph.output)
    elif kind == "drop-opset":
        changed = drop(model.opset_import)
    elif kind == "drop-attribute":
        nodes = [n for n in graph.node if len(n.attribute)]
        changed = bool(nodes) and drop(rng.choice(nodes).attribute)
    elif kind == "drop-node-input":
        nodes = [n for n in graph.node if len(n.input)]
        changed = bool(nodes) and drop(rng.choice(nodes).input)
    elif kind == "bad-dims":
        tensors = [t for t in graph.initializer if len(t.dims)]
        if not tensors:
            return None
        tensor = rng.choice(tensors)
        tensor.dims[rng.randrange(len(tensor.dims))] = rng.choice([0, 1, 3, 7, 1 << 20, 1 << 40, -1])
        changed = True
    elif kind == "bad-type":
        tensors = list(graph.initializer)
        if not tensors:
            return None
        rng.choice(tensors).data_type = rng.choice([0, 2, 7, 8, 10, 11, 16, 99])
        changed = True
    elif kind == "bad-ir":
        model.ir_version = rng.choice([0, 1, 2, 99])
        changed = True
    else:
        raise ValueError(kind)
    return model.SerializeToString() if changed else None
