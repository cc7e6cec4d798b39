"""Training images/s: bmc's loop against the design documents' loop, same model and batch size, one run.

The documents' loop is what their articles teach: torchvision ImageFolder over the JPEG files,
DataLoader with 2 workers, per-sample ToTensor and Normalize, fp32, SGD with momentum.
bmc's loop is `bmc train` itself (its images/s counts training steps only; with several epochs, the
best epoch after the first, which pays for cuDNN's kernel search and compilation).

    python benchmarks/train_throughput.py [--data-dir DIR] [--model seed-cifar-cnn] [--batch-sizes 64,4]
    python benchmarks/train_throughput.py --device cuda --model resnet18 --batch-sizes 512 --epochs 3

On CUDA it also measures the GPU's bf16 matmul peak in the same run and reports bmc's model FLOP
utilisation (MFU) against it: training FLOPs per image (forward and backward, counted by PyTorch's
FlopCounterMode) times images/s over that peak.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cifar_tree, print_table, write_results  # noqa: E402

from bmc.data import DataConfig  # noqa: E402
from bmc.models import create_model  # noqa: E402
from bmc.train import TrainConfig, train  # noqa: E402


def documents_loop_img_per_s(data_dir: Path, model_name: str, batch_size: int, images: int, device: str = "cpu") -> float:
    """The articles' loop, timed over `images` training images after a short warm-up (on CUDA: model and batches moved there)."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    dataset = datasets.ImageFolder(root=str(data_dir / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=2)
    torch.manual_seed(0)
    model = create_model(model_name, (3, 32, 32), len(dataset.classes)).to(device)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    warmup_batches = 10
    timed_batches = max(1, images // batch_size)
    seen = 0
    start = None
    for step, (inputs, labels) in enumerate(loader):
        if step == warmup_batches:
            start = time.perf_counter()
        inputs, labels = inputs.to(device), labels.to(device)
        optimizer.zero_grad()
        loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()
        if start is not None:
            seen += len(labels)
        if step + 1 >= warmup_batches + timed_batches:
            break
    if device == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def bmc_loop(data_dir: Path, model_name: str, batch_size: int, device: str = "cpu", epochs: int = 1, compile_mode: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        config = TrainConfig(
            data=DataConfig(name="imagefolder", data_dir=data_dir),
            model=model_name,
            epochs=epochs,
            batch_size=batch_size,
            device=device,
            compile=compile_mode is not None,
            compile_mode=compile_mode or "auto",
            out=Path(scratch) / "run",
        )
        run = train(config)
    history = run.meta["history"]
    timed = history[1:] if len(history) > 1 else history
    best = max(timed, key=lambda e: e["img_per_s"])
    return {
        "img_per_s": best["img_per_s"],
        "precision": run.meta["environment"]["precision"],
        "epoch_seconds": [e["seconds"] for e in history],
        "img_per_s_per_epoch": [e["img_per_s"] for e in history],
        "final_test_accuracy": history[-1].get("test_accuracy"),
        "compiled": compile_mode is not None,
        "compile_mode": compile_mode,
    }


def bf16_matmul_peak_tflops(size: int = 8192, iters: int = 50) -> float:
    """The GPU's measured bf16 matmul throughput: the denominator of MFU, measured, not a datasheet figure."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size**3 * iters / (start.elapsed_time(end) / 1000) / 1e12


def training_flops_per_image(model_name: str, batch_size: int, device: str) -> float:
    """Forward and backward FLOPs of one training step over its batch size, as PyTorch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model(model_name, (3, 32, 32), 10).to(device)
    inputs = torch.randn(batch_size, 3, 32, 32, device=device)
    with FlopCounterMode(display=False) as counter:
        model(inputs).sum().backward()
    return counter.get_total_flops() / batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="unpacked CIFAR-10 JPEG tree (default: unpack the shared archive)")
    parser.add_argument("--model", default="seed-cifar-cnn")
    parser.add_argument("--batch-sizes", default="64,4")
    parser.add_argument("--documents-images", type=int, default=6400, help="images timed in the documents' loop")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--epochs", type=int, default=1, help="bmc epochs per batch size (the best after the first counts)")
    parser.add_argument("--compile", action="store_true", help="also time bmc with --compile")
    parser.add_argument("--compile-modes", default="", help="also time bmc with each of these --compile-mode values (comma-separated)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    data_dir = cifar_tree(args.data_dir)
    # Decode and cache once, outside the timings (the documents' loop decodes every epoch by design).
    from bmc.data import load_dataset

    load_dataset(DataConfig(name="imagefolder", data_dir=data_dir))

    extra = {}
    if args.device == "cuda":
        extra["gpu"] = torch.cuda.get_device_name()
        extra["bf16_matmul_peak_tflops"] = round(bf16_matmul_peak_tflops(), 1)
    rows, measurements = [], []
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        runs = [bmc_loop(data_dir, args.model, batch_size, args.device, args.epochs)]
        compile_modes = (["auto"] if args.compile else []) + [m for m in args.compile_modes.split(",") if m]
        for mode in dict.fromkeys(compile_modes):  # each mode once, in the order asked
            runs.append(bmc_loop(data_dir, args.model, batch_size, args.device, args.epochs, compile_mode=mode))
        theirs = documents_loop_img_per_s(data_dir, args.model, batch_size, args.documents_images, args.device)
        flops = training_flops_per_image(args.model, batch_size, args.device) if args.device == "cuda" else None
        for ours in runs:
            ratio = ours["img_per_s"] / theirs
            if flops is not None:
                ours["train_gflops_per_image"] = round(flops / 1e9, 3)
                ours["mfu"] = round(ours["img_per_s"] * flops / (extra["bf16_matmul_peak_tflops"] * 1e12), 4)
            measurements.append({"batch_size": batch_size, "documents_img_per_s": round(theirs, 1), "bmc": ours, "speedup": round(ratio, 2)})
            label = ours["precision"] + (f", compiled ({ours['compile_mode']})" if ours["compiled"] else "")
            mfu = f"{ours['mfu']:.1%}" if "mfu" in ours else "-"
            rows.append([batch_size, f"{theirs:,.0f}", f"{ours['img_per_s']:,.0f}", label, f"{ratio:.2f}x", mfu])
    print_table(
        f"training throughput, {args.model} on CIFAR-10 (JPEG ImageFolder), {args.device}, images/s",
        ["batch", "documents' loop", "bmc", "bmc precision", "speed-up", "MFU"],
        rows,
    )
    write_results(
        "train_throughput",
        {"model": args.model, "device": args.device, "threads": torch.get_num_threads(), **extra, "measurements": measurements},
        args.out,
    )


if __name__ == "__main__":
    main()
