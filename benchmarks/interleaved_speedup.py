"""Speed-ups of ONNX models over the first, timed in alternating rounds so a noisy machine hits all alike.

`bmc bench` times one model after the other; on a shared 2-core machine a burst of other work
during one model's turn moves its ratio by 5-10%. Here every model gets a short turn in each of
--rounds rounds (the sessions stay open), and the ratio of best-of-rounds and of median-of-rounds
are both reported: when the two disagree, the machine was busy.

    python benchmarks/interleaved_speedup.py RUN/model.onnx RUN/compressed/pruned-run/model.onnx RUN/compressed/model-int8.onnx
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from bmc.runtime.sessions import create_session  # noqa: E402
from bmc.bench.timing import random_inputs, runner  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="ONNX files; the first is the baseline")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=0.3, help="each model's turn per round")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    sessions = [create_session(path, "cpu", args.threads) for path in args.models]
    results = {}
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        # Fixed axes besides the batch (CNN exports); a dynamic one is a one-line SessionError.
        runs = [runner(s, random_inputs(s.session, batch_size, seed=0)) for s in sessions]
        medians: list[list[float]] = [[] for _ in runs]
        for _ in range(args.rounds):
            for index, run_once in enumerate(runs):
                for _ in range(3):
                    run_once()  # caches warm again after the other models' turns
                latencies = []
                deadline = time.perf_counter() + args.seconds
                while time.perf_counter() < deadline or len(latencies) < 5:
                    start = time.perf_counter_ns()
                    run_once()
                    latencies.append((time.perf_counter_ns() - start) / 1e6)
                medians[index].append(statistics.median(latencies))
        best = [min(m) for m in medians]
        typical = [statistics.median(m) for m in medians]
        results[batch_size] = [
            {"model": str(path), "best_ms": round(b, 4), "median_ms": round(t, 4),
             "speedup_best": round(best[0] / b, 3), "speedup_median": round(typical[0] / t, 3)}
            for path, b, t in zip(args.models, best, typical)
        ]
    rows = [
        [row["model"], batch_size, f"{row['best_ms']:.3f}", f"{row['speedup_best']:.2f}x", f"{row['median_ms']:.3f}", f"{row['speedup_median']:.2f}x"]
        for batch_size, batch_rows in results.items() for row in batch_rows
    ]
    print_table(f"interleaved timing, {args.rounds} rounds of {args.seconds} s per model",
                ["model", "batch", "best ms", "speed-up", "median ms", "speed-up"], rows)
    write_results("interleaved_speedup", {"rounds": args.rounds, "seconds": args.seconds, "threads": args.threads,
                                          "by_batch_size": results}, args.out)


if __name__ == "__main__":
    main()
