"""int8 quantization: bmc compress against the plain onnxruntime configurations a user would try, one run.

For each model: fp32; `quantize_static` straight on the export (the obvious call); the grid after
`quant_pre_process` (QDQ and QOperator x U8S8/U8U8/S8S8 x reduce_range, per-channel); and what
`bmc compress --quantize int8` chose. All are benched together (same session options, same run),
so every ratio is against the fp32 model measured minutes apart at most.

    python benchmarks/compress_benchmark.py --run RUN_DIR --data-dir DIR     # a trained model, with accuracy
    python benchmarks/compress_benchmark.py --torchvision resnet18 --input-size 224   # speed only, random weights
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from bmc.bench import BenchConfig, bench  # noqa: E402
from bmc.compress.quantize import QuantizeConfig, QuantRecipe, calibration_batches, quantize_with_recipe, quantize_int8  # noqa: E402


def plain_grid() -> list[QuantRecipe]:
    return [
        QuantRecipe(fmt, activation, weight, per_channel=True, reduce_range=reduce_range)
        for fmt, (activation, weight), reduce_range in itertools.product(
            ("QOperator", "QDQ"), (("uint8", "int8"), ("uint8", "uint8"), ("int8", "int8")), (False, True)
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained run directory (its model.onnx is exported if missing)")
    parser.add_argument("--data-dir", type=Path, default=None, help="where the run's data set lives (imagefolder)")
    parser.add_argument("--torchvision", default=None, help="a torchvision model name, random weights (speed only)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per model and batch size")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from bmc.bench.accuracy import load_eval_dataset, plan_preprocessing
    from bmc.runtime.model_file import open_model
    from bmc.export import ExportConfig, export
    from bmc.runtime.metadata import ModelMetadata

    scratch = Path(tempfile.mkdtemp(prefix="bmc-compress-bench-"))
    try:
        if args.run is not None:
            source = args.run / "model.onnx"
            if not source.is_file():
                export(ExportConfig(run_dir=args.run))
            label, data_name, data_dir = None, None, args.data_dir
        else:
            source = scratch / f"{args.torchvision}.onnx"
            export(ExportConfig(model=f"torchvision:{args.torchvision}", input_size=args.input_size, num_classes=1000, out=source, verify_samples=4))
            label, data_name, data_dir = args.torchvision, "synthetic", None

        model = open_model(source)
        metadata = ModelMetadata.from_props(model.metadata_props)
        data_name = data_name or metadata.dataset
        label = label or f"{metadata.model}-{metadata.dataset}"
        dataset = load_eval_dataset(data_name, data_dir, metadata, tuple(metadata.input_shape))
        plan = plan_preprocessing(str(source), metadata, tuple(metadata.input_shape), dataset)
        batches = calibration_batches(dataset, plan, 512 if args.run else 64, seed=0)
        input_name = model.inputs[0].name

        from onnxruntime.quantization.shape_inference import quant_pre_process

        prepared = scratch / "pre.onnx"
        quant_pre_process(str(source), str(prepared))
        entries = [("fp32", source)]
        obvious = scratch / "obvious.onnx"
        quantize_with_recipe(source, obvious, QuantRecipe("QDQ", "int8", "int8", per_channel=False), input_name, batches, "minmax", compact=False)
        entries.append(("quantize_static on the export (QDQ S8S8)", obvious))
        for recipe in plain_grid():
            path = scratch / f"{recipe.name}.onnx"
            quantize_with_recipe(prepared, path, recipe, input_name, batches, "minmax", compact=False)
            entries.append((f"pre-processed {recipe.name}", path))
        chosen = quantize_int8(
            source,
            scratch / "bmc",
            QuantizeConfig(
                calib_data=data_name,
                calib_data_dir=data_dir,
                calib_samples=512 if args.run else 64,
                threads=args.threads,
                measure_accuracy=args.run is not None,
            ),
        )
        if chosen.chosen:
            entries.append((f"bmc compress ({chosen.chosen_recipe})", Path(chosen.chosen)))

        report = bench(
            [p for _, p in entries],
            BenchConfig(batch_sizes=(1, 32), seconds=args.seconds, threads=args.threads, data=data_name if args.run else None, data_dir=data_dir),
        )
        rows, measured = [], []
        base = report.models[0]
        for index, ((name, path), result) in enumerate(zip(entries, report.models)):
            accuracy = result.quality.accuracy if result.quality else None
            speedups = {b: report.speedup(index, b) for b in (1, 32)}
            measured.append({
                "name": name,
                "size_bytes": result.facts.size_bytes,
                "accuracy": accuracy,
                "latency_ms": {t.batch_size: t.latency_ms_median for t in result.timings},
                "speedup": speedups,
            })
            rows.append([
                name,
                f"{base.facts.size_bytes / result.facts.size_bytes:.2f}x",
                f"{accuracy:.4f}" if accuracy is not None else "-",
                f"{speedups[1]:.2f}x" if speedups[1] else "-",
                f"{speedups[32]:.2f}x" if speedups[32] else "-",
            ])
        print_table(f"int8 on {label} (CPU flags: {' '.join(report.environment['cpu']['flags'])})", ["model", "smaller", "accuracy", "speed-up b1", "speed-up b32"], rows)
        plain = [m for m in measured[2:] if m["name"].startswith("pre-processed")]
        best_plain = max(plain, key=lambda m: (m["speedup"][1] or 0) * (m["speedup"][32] or 0))
        print(f"\nbest plain configuration: {best_plain['name']}  b1 {best_plain['speedup'][1]:.2f}x  b32 {best_plain['speedup'][32]:.2f}x")
        write_results(
            f"compress_{label}",
            {"model": label, "measurements": measured, "bmc_choice": chosen.to_dict(), "best_plain": best_plain["name"]},
            args.out,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
