"""The documents' large model (seed-cnn224, 411 M parameters, 1.6 GB fp32): export, verify, bench,
and peak memory, in one process. Acceptance: it fits this machine's 24 GiB.

    python benchmarks/export_large.py [--out DIR]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from bmc.bench import BenchConfig, bench  # noqa: E402
from bmc.export import ExportConfig, export  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=None, help="keep the ONNX file here")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        target = args.keep or Path(scratch) / "seed-cnn224.onnx"
        started = time.perf_counter()
        result = export(ExportConfig(model="seed-cnn224", input_size=224, num_classes=10, out=target, verify_samples=8))
        seconds = time.perf_counter() - started
        export_peak_gib = peak_rss_gib()
        started = time.perf_counter()
        report = bench([result.path], BenchConfig(batch_sizes=(1, 8), iters=10))
        bench_seconds = time.perf_counter() - started
    timings = {t.batch_size: t for t in report.models[0].timings}
    rows = [[
        "seed-cnn224",
        f"{result.size_bytes / 1e9:.2f} GB",
        f"{result.max_abs_diff:.2g}",
        f"{result.top1_agreement:.0%}",
        f"{seconds:.1f}",
        f"{timings[1].latency_ms_median:.1f}",
        f"{timings[8].latency_ms_median:.1f}",
        f"{bench_seconds:.1f}",
        f"{export_peak_gib:.1f} / {peak_rss_gib():.1f}",
    ]]
    print_table(
        "export and bench of the documents' large model",
        ["model", "ONNX size", "max |ORT-PyTorch|", "top-1 agree", "export s", "b1 ms", "b8 ms", "bench s", "peak RSS GiB (export / all)"],
        rows,
    )
    write_results(
        "export_large",
        {
            "model": "seed-cnn224",
            **result.summary(),
            "path": None,
            "export_seconds": round(seconds, 1),
            "export_peak_rss_gib": round(export_peak_gib, 2),
            "bench_seconds": round(bench_seconds, 1),
            "latency_ms_median": {b: t.latency_ms_median for b, t in timings.items()},
            "peak_rss_gib": round(peak_rss_gib(), 2),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
