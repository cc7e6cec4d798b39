"""The documents' large model through the whole pipeline: seed-cnn224 (411 M parameters, 1.6 GB fp32)
trained briefly on a 224 px CIFAR-10 slice, then `bmc compress --prune 0.5 --quantize int8`.

    python benchmarks/compress_large.py [--data-dir DIR] [--train-per-class 100] [--test-per-class 30]

Acceptance (set when compress was first built): the result >= 8x smaller and >= 3x faster at batch 1 than the
original on this CPU, with the compress command (calibration included) under 12 GiB of memory;
accuracy on the slice reported. Each command runs as a real `bmc` subprocess; peak memory is the
largest resident set of each command (wait4).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cifar_tree, print_table, write_results  # noqa: E402


def make_slice(source: Path, target: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """A smaller ImageFolder tree: the first `per_class[split]` images of each class, by a seeded shuffle."""
    rng = random.Random(seed)
    for split, count in per_class.items():
        for class_dir in sorted((source / split).iterdir()):
            files = sorted(class_dir.iterdir())
            rng.shuffle(files)
            (target / split / class_dir.name).mkdir(parents=True, exist_ok=True)
            for file in files[:count]:
                shutil.copy(file, target / split / class_dir.name / file.name)
    return target


def run(args: list[str], cwd: Path) -> tuple[float, float, str]:
    """(seconds, peak RSS GiB of this command alone, stdout) of one bmc command; exits on failure."""
    import os

    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen([sys.executable, "-m", "bmc", *args], cwd=cwd, stdout=out, stderr=err)
        # wait4 gives this child's own resource usage; getrusage(RUSAGE_CHILDREN) would keep the
        # largest of all children so far.
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"bmc {' '.join(args)} failed ({process.returncode}): {stderr.strip()}")
    return seconds, usage.ru_maxrss / (1 << 20), stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="unpacked CIFAR-10 JPEG tree (default: unpack the shared archive)")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    # No batch norm and a 411 M-weight linear layer: the CIFAR recipe's rate diverges (measured).
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    source = cifar_tree(args.data_dir)
    with tempfile.TemporaryDirectory(prefix="bmc-large-") as scratch:
        work = Path(scratch)
        data = make_slice(source, work / "data", {"train": args.train_per_class, "test": args.test_per_class})
        common = ["--dataset", "imagefolder", "--data-dir", str(data)]
        train_s, train_gib, _ = run(["train", "--model", "seed-cnn224", *common, "--epochs", str(args.epochs),
                                     "--batch-size", "32", "--lr", str(args.lr), "--out", str(work / "run"), "--quiet"], work)
        export_s, export_gib, _ = run(["export", str(work / "run")], work)
        compress_s, compress_gib, stdout = run(["compress", str(work / "run"), "--prune", "0.5", "--quantize", "int8",
                                                "--finetune-epochs", str(args.finetune_epochs), "--calib-samples", "256",
                                                "--calib-data-dir", str(data), "--json"], work)
        report = json.loads(stdout)
        result = Path(report["result"])
        bench_s, bench_gib, bench_out = run(["bench", str(work / "run" / "model.onnx"), str(result), "--batch-sizes", "1,8",
                                             "--data", "imagefolder", "--data-dir", str(data), "--json"], work)
        measured = json.loads(bench_out)
    original, compressed = measured["models"]
    size_ratio = original["size_bytes"] / compressed["size_bytes"]
    speed = {t["batch_size"]: t for t in compressed["timings"]}
    base = {t["batch_size"]: t for t in original["timings"]}
    speedup = {b: base[b]["latency_ms_median"] / speed[b]["latency_ms_median"] for b in speed}
    prune = next(s for s in report["stages"] if s["stage"] == "prune")
    quantize = next((s for s in report["stages"] if s["stage"] == "int8"), {})
    rows = [
        ["original (fp32)", f"{original['size_bytes'] / 1e9:.3f} GB", f"{base[1]['latency_ms_median']:.1f}", f"{base[8]['latency_ms_median']:.1f}",
         f"{100 * original['quality']['accuracy']:.1f}%"],
        [f"pruned {prune['macs_removed']:.0%} MACs + {quantize.get('chosen_recipe') or 'fp32'}", f"{compressed['size_bytes'] / 1e9:.3f} GB",
         f"{speed[1]['latency_ms_median']:.1f}", f"{speed[8]['latency_ms_median']:.1f}", f"{100 * compressed['quality']['accuracy']:.1f}%"],
    ]
    print_table("seed-cnn224 on a 224 px CIFAR-10 slice", ["model", "size", "b1 ms", "b8 ms", "test accuracy"], rows)
    print(f"\n{size_ratio:.1f}x smaller, {speedup[1]:.2f}x faster at batch 1, {speedup[8]:.2f}x at batch 8; "
          f"peak memory: train {train_gib:.1f} GiB, export {export_gib:.1f}, compress {compress_gib:.1f}, bench {bench_gib:.1f}; "
          f"seconds: train {train_s:.0f}, export {export_s:.0f}, compress {compress_s:.0f}, bench {bench_s:.0f}")
    write_results("compress_large", {
        "slice": {"train_per_class": args.train_per_class, "test_per_class": args.test_per_class},
        "epochs": args.epochs, "finetune_epochs": args.finetune_epochs,
        "size_ratio": round(size_ratio, 2), "speedup": {b: round(s, 2) for b, s in speedup.items()},
        "accuracy": {"original": original["quality"]["accuracy"], "compressed": compressed["quality"]["accuracy"]},
        "peak_rss_gib": {"train": round(train_gib, 2), "export": round(export_gib, 2), "compress": round(compress_gib, 2), "bench": round(bench_gib, 2)},
        "seconds": {"train": round(train_s), "export": round(export_s), "compress": round(compress_s), "bench": round(bench_s)},
        "compress_stages": report["stages"],
    }, args.out)


if __name__ == "__main__":
    main()
