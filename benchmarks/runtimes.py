"""The same ONNX files on onnxruntime and OpenVINO: fp32, plain QDQ int8, and OpenVINO's precision hints.

Issue 18's first table, reproducible: each model is exported with `bmc export --model NAME`
(random weights), quantized to a plain QDQ int8 file with onnxruntime's quantize_static (U8S8,
per channel, MinMax, after quant_pre_process) on random calibration data, and both files are run
by onnxruntime's CPU provider and by OpenVINO with its f32 and (where the CPU has it) bf16 hints.
Every configuration is timed in each of --rounds interleaved rounds (sessions stay open, one
warm-up run per turn); a point's latency is the median of its rounds' medians, and speed is a
ratio against onnxruntime fp32 at the same batch size, measured in the same run. The largest
output difference from onnxruntime fp32 on one random batch of 32 (relative to the largest output)
says how far each configuration's numerics move (top-1 agreement is recorded too, but random
weights often give every input one class). The CPU's flags and each runtime's version and
settings are recorded with the figures.

    python benchmarks/runtimes.py                                  # resnet18 and mobilenet_v2 at 224 px
    python benchmarks/runtimes.py --models resnet20 --input-size 32 --num-classes 10 --out benchmarks/results/runtimes_resnet20.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from bmc.bench.timing import measure, random_inputs, runner  # noqa: E402
from bmc.runtime.registry import describe_runtimes, get_runtime, open_session, require_runtime  # noqa: E402
from bmc.runtime.target import Target  # noqa: E402

CALIBRATION_BATCHES = 4
CALIBRATION_BATCH_SIZE = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="torchvision:resnet18,torchvision:mobilenet_v2",
                        help="comma-separated bmc model names (torchvision:NAME exported at --input-size)")
    parser.add_argument("--input-size", type=int, default=224, help="image size every model is exported at")
    parser.add_argument("--num-classes", type=int, default=None, help="(default: bmc export's)")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per point, split over the rounds")
    parser.add_argument("--threads", type=int, default=None, help="per runtime (default: each runtime's own)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "bmc-runtimes-benchmark",
                        help="exported and quantized files, kept for the next run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    require_runtime("openvino")  # one line saying how to install it

    started, load_before = time.perf_counter(), os.getloadavg()[0]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    bf16 = "bf16" in get_runtime("openvino").precisions_here("cpu")
    results, rows = {}, []
    for model in args.models.split(","):
        fp32_path = export(model, args.input_size, args.num_classes, args.work_dir)
        qdq_path = quantize_qdq(fp32_path)
        configs = [
            ("onnxruntime fp32", fp32_path, Target("onnxruntime", threads=args.threads)),
            ("onnxruntime QDQ int8", qdq_path, Target("onnxruntime", threads=args.threads)),
            ("openvino QDQ int8 (f32 hint)", qdq_path, Target("openvino", threads=args.threads)),
            *([("openvino QDQ int8 (bf16 hint)", qdq_path, Target("openvino", precision="bf16", threads=args.threads))] if bf16 else []),
            *([("openvino fp32 file, bf16 hint", fp32_path, Target("openvino", precision="bf16", threads=args.threads))] if bf16 else []),
            ("openvino fp32 file, f32 hint", fp32_path, Target("openvino", threads=args.threads)),
        ]
        measured = time_interleaved(configs, batch_sizes, args.rounds, args.seconds)
        results[model] = measured
        for label, point in measured.items():
            cells = []
            for batch_size in batch_sizes:
                ms, ratio = point["latency_ms"][str(batch_size)], point["speedup_vs_onnxruntime_fp32"][str(batch_size)]
                cells.append(f"{ratio:.2f}x ({ms:.0f} ms)" if ms >= 100 else f"{ratio:.2f}x ({ms:.3g} ms)")
            rows.append([model, label, *cells, f"{point['max_relative_difference']:.1e}"])
    elapsed_s = time.perf_counter() - started
    from bmc.environment import environment

    cpu = environment()["cpu"]
    print_table(
        f"same ONNX files per runtime; ratio against onnxruntime fp32, median of {args.rounds} interleaved rounds "
        f"({cpu['model']}, {cpu['usable_cores']} cores, {' '.join(cpu['flags'])}; random weights)",
        ["model", "run by", *(f"batch {b}" for b in batch_sizes), "max |out - ort fp32| / max |ort fp32|"],
        rows,
    )
    print(f"\n{elapsed_s:.0f} s in all; 1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    write_results("runtimes", {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "weights": "random (bmc export of an untrained architecture)",
        "quantization": "onnxruntime quantize_static QDQ, activations uint8, weights int8 per channel, MinMax, "
                        f"{CALIBRATION_BATCHES} random-normal batches of {CALIBRATION_BATCH_SIZE}, after quant_pre_process",
        "input_size": args.input_size, "num_classes": args.num_classes,
        "batch_sizes": batch_sizes, "rounds": args.rounds, "seconds_per_point": args.seconds, "threads": args.threads,
        "runtimes": describe_runtimes(), "elapsed_s": round(elapsed_s, 1),
        # Other work on the machine: on 2 shared cores a load of 8 moves single points by 2x.
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "models": results,
    }, args.out)


def export(model: str, input_size: int, num_classes: int | None, work_dir: Path) -> Path:
    """MODEL.onnx in work_dir through `bmc export` itself (kept for the next run)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / f"{model.replace(':', '-')}-{input_size}px{f'-{num_classes}' if num_classes else ''}.onnx"
    if not path.exists():
        classes = ["--num-classes", str(num_classes)] if num_classes else []
        command = [sys.executable, "-m", "bmc", "export", "--model", model, "--input-size", str(input_size), *classes, "--out", str(path)]
        subprocess.run(command, check=True)
    return path


def quantize_qdq(fp32_path: Path) -> Path:
    """The plain QDQ int8 file: quant_pre_process, then quantize_static U8S8 per channel on random data."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = fp32_path.with_name(fp32_path.stem + "-qdq-u8s8.onnx")
    if target.exists():
        return target
    prepared = fp32_path.with_name(fp32_path.stem + "-prepared.onnx")
    quant_pre_process(str(fp32_path), str(prepared))
    session = open_session(fp32_path)
    rng = np.random.default_rng(0)
    shape = [CALIBRATION_BATCH_SIZE, *session.inputs[0].shape[1:]]
    batches = [{session.inputs[0].name: rng.standard_normal(shape, dtype=np.float32)} for _ in range(CALIBRATION_BATCHES)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.remaining = iter(batches)

        def get_next(self):
            return next(self.remaining, None)

    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(
            str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        )
    os.unlink(prepared)
    return target


def time_interleaved(configs, batch_sizes: list[int], rounds: int, seconds: float) -> dict:
    """Each config's median-of-round-medians latency per batch size, its ratio against the first, and its top-1 agreement."""
    sessions = [(label, open_session(path, target)) for label, path, target in configs]
    agreement_feeds = random_inputs(sessions[0][1], 32, seed=1)
    reference = sessions[0][1].run(agreement_feeds)
    medians: dict[str, dict[int, list[float]]] = {label: {b: [] for b in batch_sizes} for label, _ in sessions}
    for batch_size in batch_sizes:
        runs = [(label, runner(session, random_inputs(session, batch_size, seed=0)), session) for label, session in sessions]
        for _ in range(rounds):
            for label, run_once, session in runs:
                timing = measure(run_once, batch_size, warmup=1, iters=None, seconds=seconds / rounds,
                                 runtime=session.runtime, message=session.error_message)
                medians[label][batch_size].append(timing.latency_ms_median)
    first = sessions[0][0]
    measured = {}
    for (label, session), (_, path, _) in zip(sessions, configs):
        latency = {b: statistics.median(medians[label][b]) for b in batch_sizes}
        outputs = session.run(agreement_feeds)
        name = session.outputs[0].name
        measured[label] = {
            "file": path.name,
            "target": session.target.to_dict(),
            "runtime_details": session.details,
            "latency_ms": {str(b): round(latency[b], 4) for b in batch_sizes},
            "round_medians_ms": {str(b): [round(m, 4) for m in medians[label][b]] for b in batch_sizes},
            "speedup_vs_onnxruntime_fp32": {
                str(b): round(statistics.median(medians[first][b]) / latency[b], 3) for b in batch_sizes
            },
            # Random weights often give every input the same class, so top-1 agreement says little:
            # the largest output difference, relative to the largest output, says how far numerics moved.
            "max_relative_difference": float(np.abs(outputs[name] - reference[name]).max() / max(np.abs(reference[name]).max(), 1e-30)),
            "top1_agreement": float((outputs[name].argmax(1) == reference[name].argmax(1)).mean()),
            "reference_top1_classes": int(len(np.unique(reference[name].argmax(1)))),
        }
    return measured


if __name__ == "__main__":
    main()
