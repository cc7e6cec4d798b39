"""Where a training step's time goes: bmc's step timed with and without its data pipeline, and its top kernels.

    python tools/train_step_profile.py --device cuda --model resnet18 --batch-size 512

Uses bmc's own pieces (model registry, batched augmentation, normalizer, precision and memory-format
choices as `bmc train` makes them on that device) on random uint8 CIFAR-shaped images, so no data set
is needed. Reports images/s for: the full step, the step without augmentation, and the model step
alone on one resident batch; then the profiler's top kernels and the share of wall time the device
was busy (low: the step is bound by Python and kernel launches; high: by the kernels themselves).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # common.py: results and tables
from common import print_table, write_results  # noqa: E402

from bmc.data import Augmentation, Normalization  # noqa: E402
from bmc.models import create_model  # noqa: E402
from bmc.train.augment import Normalizer, epoch_batches  # noqa: E402


def make_step(model, optimizer, dtype):
    def step(inputs, targets):
        with torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype is not None):
            outputs = model(inputs)
        loss = F.cross_entropy(outputs.float(), targets, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per step over `steps` calls, after the device has caught up."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - began) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dtype = torch.bfloat16 if device.type == "cuda" or args.batch_size >= 32 else None
    memory_format = torch.channels_last

    torch.manual_seed(0)
    images = args.batch_size * (args.steps + 10)
    stored = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (images,), device=device)
    normalizer = Normalizer(Normalization(mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), scale=1 / 255), True).to(device)
    augmentation = Augmentation(crop_padding=4, horizontal_flip=True)
    model = create_model(args.model, (3, 32, 32), 10).to(device=device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, fused=True)
    step = make_step(model, optimizer, dtype)
    generator = torch.Generator(device=device).manual_seed(0)

    def batches(augment: bool):
        order = torch.randperm(images, generator=generator, device=device)
        return epoch_batches(stored, labels, order, args.batch_size, slice(0, args.batch_size),
                             augmentation if augment else None, normalizer, generator, memory_format)

    def run_epoch(augment: bool):
        count = 0
        for inputs, targets in batches(augment):
            step(inputs, targets)
            count += 1
        return count

    for _ in range(2):  # warm-up: cuDNN's kernel search, allocator growth
        run_epoch(True)
    steps_per_epoch = images // args.batch_size
    results = {}
    results["full step (augment, normalize, train)"] = timed(lambda: run_epoch(True), 1, device) / steps_per_epoch
    results["without augmentation"] = timed(lambda: run_epoch(False), 1, device) / steps_per_epoch
    resident_inputs, resident_targets = next(iter(batches(False)))
    results["model step only, one resident batch"] = timed(lambda: step(resident_inputs, resident_targets), args.steps, device)
    flat_model = create_model(args.model, (3, 32, 32), 10).to(device=device).train()
    flat_step = make_step(flat_model, torch.optim.SGD(flat_model.parameters(), lr=0.01, momentum=0.9, fused=True), dtype)
    flat_inputs = resident_inputs.contiguous()
    timed(lambda: flat_step(flat_inputs, resident_targets), 5, device)
    results["model step only, NCHW instead of channels_last"] = timed(lambda: flat_step(flat_inputs, resident_targets), args.steps, device)
    rows = [[name, f"{seconds * 1000:.2f}", f"{args.batch_size / seconds:,.0f}"] for name, seconds in results.items()]
    print_table(f"{args.model}, batch {args.batch_size}, {device.type}, {dtype or 'fp32'}", ["variant", "ms/step", "img/s"], rows)

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall = timed(lambda: step(resident_inputs, resident_targets), 10, device) * 10
    events = prof.key_averages()
    busy_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") if device.type == "cuda" else 0
    top = sorted(events, key=lambda e: e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total, reverse=True)[:15]
    kernel_rows = [[e.key[:70], e.count, f"{(e.self_device_time_total if device.type == 'cuda' else e.self_cpu_time_total) / 1000:.2f}"] for e in top]
    print_table("top kernels over 10 model steps", ["kernel", "calls", "ms"], kernel_rows)
    busy = busy_us / 1e6 / wall if device.type == "cuda" else None
    if busy is not None:
        print(f"\ndevice busy {busy:.0%} of the wall time of those 10 steps")
    write_results(
        "train_step_profile",
        {
            "model": args.model,
            "batch_size": args.batch_size,
            "device": str(device),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "precision": str(dtype or "fp32"),
            "img_per_s": {name: round(args.batch_size / s, 1) for name, s in results.items()},
            "device_busy_fraction": round(busy, 3) if busy is not None else None,
            "top_kernels_ms": [[row[0], row[1], float(row[2])] for row in kernel_rows],
        },
        args.out,
    )


if __name__ == "__main__":
    main()
