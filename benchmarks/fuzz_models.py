"""Mutated copies of a bmc-exported model through `bmc info` and `bmc bench`: a clean error every time, no crash, no hang.

Each copy is a seeded mutation of the original bytes (byte flips, zeroed or repeated runs, truncation)
or of its parsed message (deleted nodes, initializers, inputs, attributes, opsets; wrong dims). Every
command runs in its own subprocess with a timeout, and its outcome is one of
  success        exit 0 (the mutation left a valid model)
  clean error    exit 1 or 2 and exactly one stderr line starting with "error: " (not an internal error)
  internal error one line, but "error: internal error: ..." -- an exception bmc did not expect
  crash          anything else: a signal, a traceback, stray output on stderr
  hang           the timeout passed

    python benchmarks/fuzz_models.py [--count 300] [--seed 0] [--model PATH.onnx] [--timeout 30]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

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


def _export_default_model(folder: Path) -> Path:
    from bmc.export import ExportConfig, export

    return export(ExportConfig(model="seed-cifar-cnn", input_size=8, input_channels=1, num_classes=10, out=folder / "model.onnx")).path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="mutated copies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, default=None, help="a bmc-exported model (default: export a seed-cifar-cnn at 8 px)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per command before it counts as a hang")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/fuzz_models.json)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bmc-fuzz-") as scratch:
        folder = Path(scratch)
        model = args.model.resolve() if args.model else _export_default_model(folder)
        original = model.read_bytes()
        outcomes = {"info": Counter(), "bench": Counter()}
        by_kind: dict[str, Counter] = {}
        problems = []
        started = time.perf_counter()
        for index, (kind, data) in enumerate(mutants(original, args.count, args.seed)):
            target = folder / f"mutant_{index:04d}.onnx"
            target.write_bytes(data)
            for command, extra in (("info", []), ("bench", ["--iters", "2", "--warmup", "1", "--threads", "1"])):
                outcome, line = run_case([command, target.name, *extra], folder, args.timeout)
                outcomes[command][outcome] += 1
                by_kind.setdefault(kind, Counter())[outcome] += 1
                if outcome not in ("success", "clean error"):
                    problems.append({"index": index, "kind": kind, "command": command, "outcome": outcome, "stderr": line})
            target.unlink()
        elapsed_s = time.perf_counter() - started

    rows = [[command, *(counts[o] for o in OUTCOMES)] for command, counts in outcomes.items()]
    print_table(f"{args.count} mutated copies of {model.name} (seed {args.seed}, {elapsed_s:.0f} s)", ["command", *OUTCOMES], rows)
    print_table("by mutation", ["mutation", *OUTCOMES], [[k, *(c[o] for o in OUTCOMES)] for k, c in sorted(by_kind.items())])
    for problem in problems[:20]:
        print(f"  {problem}")
    write_results(
        "fuzz_models",
        {
            "command": " ".join(["python", "benchmarks/fuzz_models.py", *sys.argv[1:]]),
            "count": args.count,
            "seed": args.seed,
            "timeout_s": args.timeout,
            "elapsed_s": round(elapsed_s, 1),
            "outcomes": {command: dict(counts) for command, counts in outcomes.items()},
            "by_mutation": {kind: dict(counts) for kind, counts in sorted(by_kind.items())},
            "problems": problems,
        },
        args.out,
    )
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
