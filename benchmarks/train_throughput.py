"""Training images/s: bmc's loop against the design documents' loop, same model and batch size, one run.

The documents' loop is what their articles teach: torchvision ImageFolder over the JPEG files,
DataLoader with 2 workers, per-sample ToTensor and Normalize, fp32, SGD with momentum.
bmc's loop is `bmc train` itself (one epoch; its images/s counts training steps only).

    python benchmarks/train_throughput.py [--data-dir DIR] [--model seed-cifar-cnn] [--batch-sizes 64,4]
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


def documents_loop_img_per_s(data_dir: Path, model_name: str, batch_size: int, images: int) -> float:
    """The articles' loop, timed over `images` training images after a short warm-up."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    dataset = datasets.ImageFolder(root=str(data_dir / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=2)
    torch.manual_seed(0)
    model = create_model(model_name, (3, 32, 32), len(dataset.classes))
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    warmup_batches = 10
    timed_batches = max(1, images // batch_size)
    seen = 0
    start = None
    for step, (inputs, labels) in enumerate(loader):
        if step == warmup_batches:
            start = time.perf_counter()
        optimizer.zero_grad()
        loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()
        if start is not None:
            seen += len(labels)
        if step + 1 >= warmup_batches + timed_batches:
            break
    return seen / (time.perf_counter() - start)


def bmc_loop(data_dir: Path, model_name: str, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        config = TrainConfig(
            data=DataConfig(name="imagefolder", data_dir=data_dir), model=model_name, epochs=1, batch_size=batch_size, out=Path(scratch) / "run"
        )
        run = train(config)
    epoch = run.meta["history"][0]
    return {"img_per_s": epoch["img_per_s"], "precision": run.meta["environment"]["precision"], "epoch_seconds": epoch["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="unpacked CIFAR-10 JPEG tree (default: unpack the shared archive)")
    parser.add_argument("--model", default="seed-cifar-cnn")
    parser.add_argument("--batch-sizes", default="64,4")
    parser.add_argument("--documents-images", type=int, default=6400, help="images timed in the documents' loop")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    data_dir = cifar_tree(args.data_dir)
    # Decode and cache once, outside the timings (the documents' loop decodes every epoch by design).
    from bmc.data import load_dataset

    load_dataset(DataConfig(name="imagefolder", data_dir=data_dir))

    rows, measurements = [], []
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        ours = bmc_loop(data_dir, args.model, batch_size)
        theirs = documents_loop_img_per_s(data_dir, args.model, batch_size, args.documents_images)
        ratio = ours["img_per_s"] / theirs
        measurements.append({"batch_size": batch_size, "documents_img_per_s": round(theirs, 1), "bmc": ours, "speedup": round(ratio, 2)})
        rows.append([batch_size, f"{theirs:,.0f}", f"{ours['img_per_s']:,.0f}", ours["precision"], f"{ratio:.2f}x"])
    print_table(f"training throughput, {args.model} on CIFAR-10 (JPEG ImageFolder), images/s", ["batch", "documents' loop", "bmc", "bmc precision", "speed-up"], rows)
    write_results("train_throughput", {"model": args.model, "threads": torch.get_num_threads(), "measurements": measurements}, args.out)


if __name__ == "__main__":
    main()
