"""Every pruning strategy on torchvision models at 224 px, timed in onnxruntime against the dense model, one run.

    python benchmarks/prune_strategies_torchvision.py [--models resnet18 mobilenet_v2 shufflenet_v2_x1_0] [--prune 0.5]

Random weights, so this is a speed test only: which strategy's cut runs fastest at batch 1 for the
same MACs removed (`bmc compress --prune-strategy fastest` makes this choice per model). Block
ranking for `depth` sees random inputs here, as it would without training data.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402


def main() -> None:
    import torch
    import torchvision

    from bmc.compress.pipeline import _onnx_latency_ms, _onnx_scope_times_ms
    from bmc.compress.prune import prune_structured

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet18", "mobilenet_v2", "shufflenet_v2_x1_0"])
    parser.add_argument("--prune", type=float, default=0.5, help="fraction of MACs removed")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    results, rows = {}, []
    for name in args.models:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(num_classes=1000).eval()
        example = torch.zeros(1, 3, 224, 224)
        started = time.perf_counter()
        dense = _onnx_latency_ms(model, example, batch_sizes=(1,))[1]
        pruned, stats = prune_structured(
            model, example, args.prune, latency_ms=lambda m: _onnx_latency_ms(m, example, batch_sizes=(1,)), choose="fastest",
            block_time_ms=lambda m, scopes: _onnx_scope_times_ms(m, example, scopes),
        )
        candidates = {strategy: times[1] for strategy, times in stats.candidate_latency_ms.items()}
        if not candidates:  # one strategy only (shufflenet: by parts): compress does not time it, this does
            candidates = {stats.strategy: _onnx_latency_ms(pruned, example, batch_sizes=(1,))[1]}
        results[name] = {
            "dense_ms": dense,
            "candidate_ms": candidates,
            "speedup": {strategy: round(dense / ms, 3) for strategy, ms in candidates.items()},
            "fastest": stats.strategy,
            "macs_removed": round(stats.macs_removed, 4),
            "blocks_dropped": stats.blocks_dropped,
            "droppable_blocks": stats.droppable_blocks,
            "strategies_failed": stats.strategies_failed,
            "seconds": round(time.perf_counter() - started, 1),
        }
        rows += [[name, strategy, f"{ms:.3f}", f"{dense / ms:.2f}x", "*" if strategy == stats.strategy else ""] for strategy, ms in candidates.items()]
    print_table(f"pruning strategies at {args.prune:.0%} of MACs, onnxruntime CPU, batch 1 (speed-up against dense fp32)",
                ["model", "strategy", "ms", "speed-up", "fastest"], rows)
    write_results("prune_strategies_torchvision", {"prune": args.prune, "models": results}, args.out)


if __name__ == "__main__":
    main()
