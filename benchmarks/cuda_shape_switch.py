"""What a change of batch size costs onnxruntime's CUDA provider, per cuDNN algorithm search mode.

    python benchmarks/cuda_shape_switch.py            # needs a GPU and onnxruntime-gpu

For each of EXHAUSTIVE (onnxruntime's default), HEURISTIC and DEFAULT: a resnet20 session warmed up
at every batch size 1..32, then the median latency at a steady batch size and while the batch size
keeps changing (as under dynamic batching). bmc serve chooses its CUDA setting from this.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from bmc.runtime.sessions import create_session, cuda_works  # noqa: E402
from bmc.export import ExportConfig, export  # noqa: E402


def median_ms(session, sizes: list[int]) -> tuple[float, float]:
    times = []
    for batch in sizes:
        x = np.random.rand(batch, 3, 32, 32).astype(np.float32)
        began = time.perf_counter()
        session.run(None, {"input": x})
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times), max(times)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not cuda_works():
        raise SystemExit("cuda_shape_switch needs a GPU that onnxruntime's CUDA provider runs on (onnxruntime-gpu)")
    with tempfile.TemporaryDirectory() as scratch:
        path = export(ExportConfig(model="resnet20", input_size=32, num_classes=10, out=Path(scratch) / "resnet20.onnx")).path
        rows, results = [], {}
        for mode in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
            session = create_session(path, "cuda", threads=1, conv_algo_search=mode).session
            began = time.perf_counter()
            for batch in range(1, 33):
                session.run(None, {"input": np.zeros((batch, 3, 32, 32), np.float32)})
            warm_s = time.perf_counter() - began
            steady = {b: median_ms(session, [b] * 30) for b in (1, 16, 32)}
            changing = median_ms(session, [3, 5, 7, 9, 11, 13] * 3)
            results[mode] = {"warm_up_1_to_32_s": round(warm_s, 2), "steady_median_ms": {b: round(v[0], 3) for b, v in steady.items()},
                             "changing_median_ms": round(changing[0], 3), "changing_max_ms": round(changing[1], 1)}
            rows.append([mode, f"{warm_s:.2f}", *(f"{steady[b][0]:.2f}" for b in (1, 16, 32)), f"{changing[0]:.2f}", f"{changing[1]:.1f}"])
    print_table("resnet20 on onnxruntime CUDA, ms per run", ["cuDNN search", "warm-up 1..32 (s)", "b1", "b16", "b32", "changing (median)", "changing (max)"], rows)
    write_results("cuda_shape_switch", {"modes": results}, args.out)


if __name__ == "__main__":
    main()
