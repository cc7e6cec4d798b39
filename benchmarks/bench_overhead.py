"""bmc bench's median latency against a bare `session.run` loop: same model, same session options, one run.

For each model and batch size, repeats alternate between the two, so drift in the machine's load
falls on both alike:
  bare   a new InferenceSession with bmc.runtime.sessions.session_options(threads), `session.run(None,
         feeds)` timed with perf_counter around each call
  bench  `bmc.bench.bench([model], BenchConfig(batch_sizes=(b,), iters=n, warmup=w, threads=threads))`,
         the public function, session creation included (outside the timed runs, as in bare)
Both report the median of n timed runs after w warm-up runs. The figure is the median, over
repeats, of bench's median divided by bare's median from the same repeat (goal: within 3%): on a
shared machine the load shifts between repeats, and a ratio of neighbours cancels the shift.

    python benchmarks/bench_overhead.py [--repeats 5] [--threads 1] [--batch-sizes 1,32] [--model PATH.onnx ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from bmc.bench import BenchConfig, bench  # noqa: E402
from bmc.runtime.sessions import session_options  # noqa: E402

TARGET_SECONDS_PER_MEASURE = 1.0
MIN_ITERS = 50


def bare_median_ms(path: Path, batch_size: int, iters: int, warmup: int, threads: int | None) -> float:
    """The loop a user would write: one session, one input, session.run timed call by call."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    node = session.get_inputs()[0]
    shape = [batch_size, *(int(d) for d in node.shape[1:])]
    feeds = {node.name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    for _ in range(warmup):
        session.run(None, feeds)
    latencies_s = []
    for _ in range(iters):
        start = time.perf_counter()
        session.run(None, feeds)
        latencies_s.append(time.perf_counter() - start)
    return statistics.median(latencies_s) * 1e3


def bench_median_ms(path: Path, batch_size: int, iters: int, warmup: int, threads: int | None) -> float:
    config = BenchConfig(batch_sizes=(batch_size,), iters=iters, warmup=warmup, threads=threads)
    return bench([path], config).models[0].timings[0].latency_ms_median


def iterations_for(path: Path, batch_size: int, threads: int | None) -> int:
    """Timed runs that take about TARGET_SECONDS_PER_MEASURE, from a short probe."""
    probe_ms = bare_median_ms(path, batch_size, iters=10, warmup=3, threads=threads)
    return max(MIN_ITERS, int(TARGET_SECONDS_PER_MEASURE * 1e3 / max(probe_ms, 1e-3)))


def default_models(folder: Path) -> list[Path]:
    """resnet20 at CIFAR size and the digits-sized seed-cifar-cnn, exported by bmc (random weights time the same)."""
    from bmc.export import ExportConfig, export

    return [
        export(ExportConfig(model="resnet20", input_size=32, num_classes=10, out=folder / "resnet20.onnx")).path,
        export(ExportConfig(model="seed-cifar-cnn", input_size=8, input_channels=1, num_classes=10, out=folder / "digits-seed-cifar-cnn.onnx")).path,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", default=None, help="ONNX model (repeatable); default: resnet20 and digits seed-cifar-cnn")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for both (1: least disturbed by other work on a shared machine)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/bench_overhead.json)")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    with tempfile.TemporaryDirectory(prefix="bmc-bench-overhead-") as scratch:
        paths = args.model or default_models(Path(scratch))
        results = []
        for path in paths:
            for batch_size in batch_sizes:
                iters = iterations_for(path, batch_size, args.threads)
                bare, ours = [], []
                for _ in range(args.repeats):
                    bare.append(bare_median_ms(path, batch_size, iters, args.warmup, args.threads))
                    ours.append(bench_median_ms(path, batch_size, iters, args.warmup, args.threads))
                bare_ms, bench_ms = statistics.median(bare), statistics.median(ours)
                ratio = statistics.median(b / a for a, b in zip(bare, ours))
                results.append(
                    {
                        "model": path.name,
                        "batch_size": batch_size,
                        "iters": iters,
                        "repeats": args.repeats,
                        "bare_median_ms": round(bare_ms, 5),
                        "bench_median_ms": round(bench_ms, 5),
                        "bench_over_bare": round(ratio, 4),
                        "bare_medians_ms": [round(v, 5) for v in bare],
                        "bench_medians_ms": [round(v, 5) for v in ours],
                    }
                )
                print(f"  {path.name} batch {batch_size}: bare {bare_ms:.4f} ms, bench {bench_ms:.4f} ms (paired ratio {ratio:.3f})", flush=True)

    rows = [
        [r["model"], r["batch_size"], r["iters"], r["repeats"], f"{r['bare_median_ms']:.4f}", f"{r['bench_median_ms']:.4f}", f"{r['bench_over_bare']:.3f}"]
        for r in results
    ]
    print_table(
        f"bench median / bare session.run median (threads {args.threads}; goal within 3%)",
        ["model", "batch", "iters", "repeats", "bare ms", "bench ms", "bench / bare (paired)"],
        rows,
    )
    worst = max(abs(r["bench_over_bare"] - 1) for r in results)
    print(f"\nlargest deviation from the bare loop: {worst:.1%}")
    write_results(
        "bench_overhead",
        {
            "command": " ".join(["python", "benchmarks/bench_overhead.py", *sys.argv[1:]]),
            "threads": args.threads,
            "warmup": args.warmup,
            "results": results,
            "largest_deviation": round(worst, 4),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
