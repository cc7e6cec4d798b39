"""Where a real `bmc train` epoch's wall time goes: torch.profiler around one whole epoch of train().

    python tools/train_epoch_profile.py --data-dir DIR --device cuda --model resnet18 --batch-size 512

train_step_profile.py times bmc's pieces alone; this runs train() itself (data set, schedule,
metrics, checkpoints) and profiles its last epoch through the progress hooks the CLI uses, so
nothing is re-implemented. It reports: images/s of each epoch, the share of the epoch's wall time
the GPU was busy, the idle gaps between kernels (count and total above 1 ms, the largest with the
CPU operation running when it began), the host synchronisations (cudaStreamSynchronize and
device-to-host copies: each one drains the queue of launched kernels) and the top CPU operations.
A chrome trace of the profiled epoch is written next to the JSON (gzip) for a closer look.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # common.py: results and tables
from common import cifar_tree, print_table, write_results  # noqa: E402

from bmc.data import DataConfig  # noqa: E402
from bmc.train import TrainConfig, train  # noqa: E402

SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense", "aten::nonzero", "aten::item")


class EpochProfiler:
    """A TrainProgress that profiles one epoch (the loop's own hooks; batches_done syncs as the CLI's does)."""

    def __init__(self, profiled_epoch: int, activities):
        self.profiled_epoch = profiled_epoch
        self.activities = activities
        self.profiler = None
        self.wall_seconds = None
        self._began = None

    def start(self, run_dir, config, first_epoch):
        pass

    def start_epoch(self, epoch, total_epochs, batches):
        if epoch == self.profiled_epoch:
            from torch.profiler import profile

            self.profiler = profile(activities=self.activities)
            self.profiler.__enter__()
            self._began = time.perf_counter()

    def batches_done(self, done, loss, accuracy, img_per_s):
        pass

    def end_epoch(self, metrics):
        if self.profiler is not None and self.wall_seconds is None:
            self.wall_seconds = time.perf_counter() - self._began  # includes the epoch's evaluation and checkpoint
            self.profiler.__exit__(None, None, None)


def kernel_gaps(events) -> dict:
    """Idle stretches of the GPU between consecutive kernels, from the profiler's event list."""
    kernels = sorted(
        (e.time_range.start, e.time_range.end) for e in events if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start
    )
    gaps = []
    for (_, previous_end), (start, _) in zip(kernels, kernels[1:]):
        if start - previous_end > 1000:
            gaps.append((start - previous_end, previous_end))
    cpu_ops = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type.name == "CPU")
    largest = []
    for length, began in sorted(gaps, reverse=True)[:8]:
        running = [name for start, end, name in cpu_ops if start <= began + length / 2 <= end]
        largest.append({"ms": round(length / 1000, 2), "cpu_ops_midway": running[-3:]})
    busy = sum(end - start for start, end in kernels)
    return {
        "kernels": len(kernels),
        "busy_ms": round(busy / 1000, 1),
        "gaps_over_1ms": len(gaps),
        "gaps_over_1ms_total_ms": round(sum(g for g, _ in gaps) / 1000, 1),
        "largest_gaps": largest,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="unpacked CIFAR-10 JPEG tree (default: unpack the shared archive)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2, help="the last one is profiled")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile-mode", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    data_dir = cifar_tree(args.data_dir)
    from torch.profiler import ProfilerActivity

    cuda = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    progress = EpochProfiler(args.epochs, activities)
    with tempfile.TemporaryDirectory() as scratch:
        config = TrainConfig(
            data=DataConfig(name="imagefolder", data_dir=data_dir),
            model=args.model,
            epochs=args.epochs,
            batch_size=args.batch_size,
            device=args.device,
            compile=args.compile_mode is not None,
            compile_mode=args.compile_mode or "auto",
            out=Path(scratch) / "run",
        )
        run = train(config, progress=progress)
    history = run.meta["history"]
    prof = progress.profiler
    events = prof.events()
    averages = prof.key_averages()
    syncs = {e.key: {"calls": e.count, "cpu_ms": round(e.cpu_time_total / 1000, 1)} for e in averages if e.key in SYNC_NAMES}
    copies = {e.key: {"calls": e.count, "cpu_ms": round(e.cpu_time_total / 1000, 1)} for e in averages if "Memcpy" in e.key or e.key == "aten::copy_"}
    top_cpu = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    profiled = history[-1]
    gaps = kernel_gaps(events) if cuda else {}

    print_table(
        f"bmc train, {args.model}, batch {args.batch_size}, {args.device}, compile {args.compile_mode}",
        ["epoch", "train s", "img/s"],
        [[e["epoch"], e["seconds"], f"{e['img_per_s']:,.0f}"] for e in history],
    )
    print_table("top CPU operations in the profiled epoch (self time)", ["op", "calls", "self ms"],
                [[e.key[:60], e.count, f"{e.self_cpu_time_total / 1000:.1f}"] for e in top_cpu])
    print(f"\nprofiled epoch: {progress.wall_seconds:.2f} s wall (with evaluation and checkpoint), train part {profiled['seconds']} s")
    print(f"synchronisations: {syncs}")
    if cuda:
        print(f"GPU: {gaps['busy_ms']} ms busy in {gaps['kernels']} kernels; {gaps['gaps_over_1ms']} gaps over 1 ms, {gaps['gaps_over_1ms_total_ms']} ms")
        for gap in gaps["largest_gaps"]:
            print(f"  gap {gap['ms']} ms during {gap['cpu_ops_midway']}")
    out = write_results(
        "train_epoch_profile",
        {
            "model": args.model,
            "batch_size": args.batch_size,
            "device": args.device,
            "compile_mode": args.compile_mode,
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "img_per_s_per_epoch": [e["img_per_s"] for e in history],
            "profiled_epoch_wall_s": round(progress.wall_seconds, 3),
            "profiled_epoch_train_s": profiled["seconds"],
            "synchronisations": syncs,
            "copies": copies,
            "gpu_timeline": gaps,
            "top_cpu_ops_ms": [[e.key, e.count, round(e.self_cpu_time_total / 1000, 2)] for e in top_cpu],
        },
        args.out,
    )
    trace = Path(out).with_suffix(".trace.json")
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as raw, gzip.open(str(trace) + ".gz", "wb") as packed:
        shutil.copyfileobj(raw, packed)
    trace.unlink()


if __name__ == "__main__":
    main()
