"""Distillation's worth after pruning: the same pruned model fine-tuned with and without the unpruned teacher.

    python benchmarks/distill_compare.py --run RUN_DIR [--prune 0.5] [--prune-strategy depth] [--finetune-epochs 15]

Both arms prune the run's model identically (bmc compress's --prune-strategy), fine-tune for the same epochs
from the same seed; the only difference is Hinton's loss against the original model. Reports each
arm's test accuracy and the difference, in one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from bmc.compress import CompressConfig, compress  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a trained bmc run directory")
    parser.add_argument("--prune", type=float, default=0.5)
    parser.add_argument("--prune-strategy", default="depth", help="as bmc compress --prune-strategy")
    parser.add_argument("--finetune-epochs", type=int, default=15)
    parser.add_argument("--work", type=Path, default=None, help="where the two arms write (default: RUN/distill-compare)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or args.run / "distill-compare"
    arms = {}
    for distill in (True, False):
        began = time.perf_counter()
        report = compress(CompressConfig(
            source=args.run, prune=args.prune, prune_strategy=args.prune_strategy, finetune_epochs=args.finetune_epochs, distill=distill, quantize="none",
            out=work / ("distilled" if distill else "plain"),
        ))
        stage = next(s for s in report.stages if s["stage"] == "prune")
        arms["distilled" if distill else "plain"] = {
            "test_accuracy": stage["test_metrics"]["test_accuracy"],
            "original_test_accuracy": stage["original_test_metrics"]["test_accuracy"],
            "macs_removed": stage["macs_removed"],
            "strategy": stage["strategy"],
            "seconds": round(time.perf_counter() - began, 1),
        }
        print(f"{'distilled' if distill else 'plain'}: {arms['distilled' if distill else 'plain']}", flush=True)
    original = arms["plain"]["original_test_accuracy"]
    difference = round(100 * (arms["distilled"]["test_accuracy"] - arms["plain"]["test_accuracy"]), 2)
    rows = [[name, f"{100 * arm['test_accuracy']:.2f}%", f"{100 * (arm['test_accuracy'] - original):+.2f}", f"{arm['seconds']:.0f}"] for name, arm in arms.items()]
    print_table(f"pruned {arms['plain']['macs_removed']:.0%} of MACs, {args.finetune_epochs} fine-tuning epochs (original {100 * original:.2f}%)",
                ["fine-tuning", "test accuracy", "vs original (pt)", "seconds"], rows)
    print(f"\ndistillation: {difference:+.2f} points")
    write_results("distill_compare", {"run": str(args.run), "prune": args.prune, "finetune_epochs": args.finetune_epochs,
                                      "arms": arms, "distillation_gain_points": difference}, args.out)


if __name__ == "__main__":
    main()
