"""Shared by the benchmark scripts: the real CIFAR-10 tree, environment records, tables and JSON."""

from __future__ import annotations

import json
import tarfile
import tempfile
from pathlib import Path

from bmc.artifact import atomic_write_json
from bmc.environment import environment

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = PROJECT_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
RESULTS = PROJECT_ROOT / "benchmarks" / "results"


def cifar_tree(data_dir: Path | None) -> Path:
    """A directory holding train/ and test/ of the shared CIFAR-10 JPEGs, unpacked on demand."""
    if data_dir is not None:
        return data_dir
    if not SHARED_CIFAR.is_file():
        raise SystemExit(f"no --data-dir given and {SHARED_CIFAR} is missing")
    target = Path(tempfile.gettempdir()) / "bmc-cifar10-jpeg"
    if not (target / "train").is_dir() or not (target / "test").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(SHARED_CIFAR) as archive:
            archive.extractall(target, filter="data")
    return target


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))


def write_results(name: str, results: dict, out: Path | None = None) -> Path:
    """Write results plus the environment they were measured in; returns the JSON path."""
    path = out or RESULTS / f"{name}.json"
    atomic_write_json(path, {"benchmark": name, "environment": environment(), **results})
    print(f"\nwrote {path}")
    return path


def print_compress(report) -> None:
    """What a compress run decided: each int8 candidate on each runtime target (the search's own
    timing, against fp32 on onnxruntime), the choice against the best on onnxruntime alone, and the
    summary's rows measured together in one closing run."""
    from bmc.compress import QuantizeResult

    quantized = report.stage(QuantizeResult)
    if quantized is not None:
        rows = [[c.recipe, c.target.label, *(f"{c.speedup.get(b, 0):.2f}x" for b in (1, 32)),
                 f"{-c.accuracy_drop_points:+.2f}" if c.accuracy_drop_points is not None else "-",
                 f"chosen for batch {', '.join(map(str, c.chosen_for))}" if c.chosen_for else c.reason[:70]]
                for c in quantized.candidates]
        print_table("candidates (search timing, against fp32 on onnxruntime)", ["file", "runtime", "b1", "b32", "accuracy pt", "decision"], rows)
        print(f"\nchosen: {quantized.note}")
        if quantized.onnxruntime_only_speedup:
            print("best on onnxruntime's defaults alone: " + ", ".join(f"{s:.2f}x at batch {b}" for b, s in quantized.onnxruntime_only_speedup.items()))
    summary = [[row.stage, row.runtime, f"{row.size_bytes / 1e6:.2f} MB ({row.size_ratio:.2f}x)",
                f"{row.accuracy:.2%}" if row.accuracy is not None else "-",
                *(f"{row.latency_ms[b]:.3f} ms ({row.speedup.get(b, 1.0):.2f}x)" for b in (1, 32))]
               for row in report.summary]
    print_table("compress summary (ratios to the fp32 original on onnxruntime, same run)", ["model", "runtime", "size", "accuracy", "batch 1", "batch 32"], summary)
    for note in report.notes:
        print(f"note: {note}")


def dump(obj) -> str:
    return json.dumps(obj, indent=2)
