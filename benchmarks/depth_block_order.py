"""Experiment: `bmc compress --prune-strategy depth` with the residual blocks dropped in an order given by hand.

Depth pruning ranks blocks by the KL divergence their absence causes before any fine-tuning, per
millisecond of their kernels' time. This harness replaces only that order (the blocks go in
--order, as many as the MACs target allows, then channels as usual; the measured ranking is
printed) and runs the real pipeline, so two orders can be compared by accuracy after fine-tuning
and by speed.

    python benchmarks/depth_block_order.py --run RUN_DIR --order layers.4,layers.5,layers.2,layers.0,layers.7,layers.1,layers.8 --finetune-epochs 15
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

import bmc.compress.prune as prune  # noqa: E402
from bmc.compress import CompressConfig, compress  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a trained bmc run directory")
    parser.add_argument("--order", required=True, help="comma-separated block names, first dropped first")
    parser.add_argument("--prune", type=float, default=0.5)
    parser.add_argument("--finetune-epochs", type=int, default=15)
    parser.add_argument("--work", type=Path, default=None, help="compress's --out (default: RUN/depth-order)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    order = args.order.split(",")

    measured = prune.rank_blocks

    def ranked_by_hand(model, example, blocks, ranking_inputs, block_time_ms):
        ranking = measured(model, example, blocks, ranking_inputs, block_time_ms)
        missing = [block.name for block in ranking if block.name not in order]
        if missing:
            raise SystemExit(f"error: --order leaves out the droppable blocks {', '.join(missing)}")
        print("bmc's ranking (KL when dropped alone, ms):", [(b.name, round(b.prediction_shift, 4), b.time_ms) for b in ranking])
        return sorted(ranking, key=lambda block: order.index(block.name))

    prune.rank_blocks = ranked_by_hand
    began = time.perf_counter()
    report = compress(CompressConfig(
        source=args.run, prune=args.prune, prune_strategy="depth", quantize="int8",
        finetune_epochs=args.finetune_epochs, out=args.work or args.run / "depth-order",
    ))
    seconds = time.perf_counter() - began
    stage = next(s for s in report.stages if s["stage"] == "prune")
    rows = [[r["stage"], f"{100 * r['accuracy']:.2f}%" if r["accuracy"] is not None else "-", f"{r['size_ratio']:.2f}x",
             *(f"{r['speedup'].get(b, 0):.2f}x" for b in (1, 32))] for r in report.summary]
    print_table(f"depth pruning, blocks dropped: {', '.join(stage['blocks_dropped'])}",
                ["stage", "accuracy", "smaller", "speed-up b1", "speed-up b32"], rows)
    write_results("depth_block_order", {"order": order, "blocks_dropped": stage["blocks_dropped"], "seconds": round(seconds),
                                        "prune": stage, "summary": report.summary}, args.out)


if __name__ == "__main__":
    main()
