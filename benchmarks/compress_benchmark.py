"""bmc compress against what a user would try by hand, one run per table: ratios within the run only.

    --what int8 (default): fp32; `quantize_static` straight on the export (the obvious call); the
        grid after `quant_pre_process` (QDQ and QOperator x U8S8/U8U8/S8S8 x reduce_range,
        per-channel); and what `bmc compress --quantize int8` chose, measured together in rounds.
    --what strategies: every cut bmc's structured pruning can make at --prune, each timed against
        the dense model on this CPU (`--prune-strategy fastest` makes this choice per model).
    --what distill: the same pruned model fine-tuned with and without the unpruned teacher
        (`--no-distill`), same epochs and seed: what distillation is worth (a trained run only).

    python benchmarks/compress_benchmark.py --run RUN_DIR [--data-dir DIR]           # a trained model, with accuracy
    python benchmarks/compress_benchmark.py --torchvision resnet18 --input-size 224   # speed only, random weights
    python benchmarks/compress_benchmark.py --what strategies --torchvision mobilenet_v2 shufflenet_v2_x1_0
    python benchmarks/compress_benchmark.py --what distill --run RUN_DIR --prune 0.5 --finetune-epochs 15
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from bmc.compress import CompressConfig, PruneResult, compress  # noqa: E402
from bmc.compress.compare import Contender, Settings, compare  # noqa: E402
from bmc.compress.quantize.calibration import calibration_inputs, pre_process  # noqa: E402
from bmc.compress.quantize.config import QuantizeConfig  # noqa: E402
from bmc.compress.quantize.recipes import QuantRecipe, quantize_with_recipe  # noqa: E402
from bmc.compress.quantize.search import quantize_int8  # noqa: E402


def plain_grid() -> list[QuantRecipe]:
    return [
        QuantRecipe(fmt, activation, weight, per_channel=True, reduce_range=reduce_range)
        for fmt, (activation, weight), reduce_range in itertools.product(
            ("QOperator", "QDQ"), (("uint8", "int8"), ("uint8", "uint8"), ("int8", "int8")), (False, True)
        )
    ]


def int8_table(args, scratch: Path) -> None:
    """bmc's int8 choice against the obvious call and the plain grid, measured together."""
    from bmc.export import ExportConfig, export
    from bmc.runtime.metadata import ModelMetadata
    from bmc.runtime.model_file import open_model

    if args.run is not None:
        source = args.run / "model.onnx"
        if not source.is_file():
            export(ExportConfig(run_dir=args.run))
        data_name = None
    else:
        source = scratch / f"{args.torchvision[0]}.onnx"
        export(ExportConfig(model=f"torchvision:{args.torchvision[0]}", input_size=args.input_size, num_classes=1000, out=source, verify_samples=4))
        data_name = "synthetic"
    metadata = ModelMetadata.from_props(open_model(source).metadata_props)
    label = args.torchvision[0] if args.run is None else f"{metadata.model}-{metadata.dataset}"
    settings = QuantizeConfig(calib_data=data_name, calib_data_dir=args.data_dir, calib_samples=512 if args.run else 64,
                              threads=args.threads, measure_accuracy=args.run is not None)
    calibration = calibration_inputs(source, settings)
    entries = []
    obvious = scratch / "obvious.onnx"
    quantize_with_recipe(calibration, obvious, QuantRecipe("QDQ", "int8", "int8", per_channel=False), compact=False)
    entries.append(("quantize_static on the export (QDQ S8S8)", obvious))
    prepared = calibration.using(model=pre_process(source, scratch / "pre.onnx"))
    for recipe in plain_grid():
        path = scratch / f"{recipe.name}.onnx"
        quantize_with_recipe(prepared, path, recipe, compact=False)
        entries.append((f"pre-processed {recipe.name}", path))
    chosen = quantize_int8(source, scratch / "bmc", settings)
    if chosen.chosen:
        entries.append((f"bmc compress ({chosen.chosen_recipe})", Path(chosen.chosen)))

    from bmc.runtime.target import Target

    runtime = Target(threads=args.threads)
    comparison = compare(
        Contender(source, "fp32", runtime), [Contender(path, name, runtime) for name, path in entries],
        settings=Settings((1, 32), args.seconds, calibration.data if args.run else None, args.data_dir),
    )
    measured, rows = [], []
    for result in (comparison.baseline, *comparison.candidates):
        speedup = comparison.speedup(result)
        measured.append({"name": result.contender.label, "size_bytes": result.size_bytes, "accuracy": result.accuracy,
                         "latency_ms": result.latency_ms, "speedup": speedup})
        rows.append([result.contender.label, f"{comparison.size_ratio(result):.2f}x",
                     f"{result.accuracy:.4f}" if result.accuracy is not None else "-",
                     *(f"{speedup[b]:.2f}x" if b in speedup else "-" for b in (1, 32))])
    from bmc.environment import cpu_info

    print_table(f"int8 on {label} (CPU flags: {' '.join(cpu_info()['flags'])})", ["model", "smaller", "accuracy", "speed-up b1", "speed-up b32"], rows)
    plain = [m for m in measured if m["name"].startswith("pre-processed")]
    best_plain = max(plain, key=lambda m: m["speedup"].get(1, 0) * m["speedup"].get(32, 0))
    print(f"\nbest plain configuration: {best_plain['name']}  b1 {best_plain['speedup'][1]:.2f}x  b32 {best_plain['speedup'][32]:.2f}x")
    write_results(f"compress_{label}", {"model": label, "measurements": measured, "bmc_choice": dataclasses.asdict(chosen),
                                        "best_plain": best_plain["name"]}, args.out)


def strategies_table(args) -> None:
    """Every cut that reaches --prune on each model, timed at batch 1 against the dense model."""
    import torch
    import torchvision

    from bmc.compress.prune.latency import OnnxProbe
    from bmc.compress.prune.search import PruneTarget, prune_structured

    models = {}
    if args.run is not None:
        from bmc.checkpoint import load_model

        model, meta = load_model(args.run)
        models[meta["config"]["model"]] = (model, torch.zeros(1, *meta["model"]["input_shape"]))
    for name in args.torchvision:
        torch.manual_seed(0)
        models[name] = (getattr(torchvision.models, name)(num_classes=1000).eval(), torch.zeros(1, 3, args.input_size, args.input_size))
    results, rows = {}, []
    for name, (model, example) in models.items():
        started = time.perf_counter()
        probe = OnnxProbe(example, batch_sizes=(1,))
        dense = probe.latency_ms(model)[1]
        pruned, cut = prune_structured(model, example, PruneTarget(args.prune), "fastest", probe)
        timed = {strategy: times[1] for strategy, times in cut.candidate_latency_ms.items()}
        if not timed:  # one candidate only (shufflenet: by parts): compress does not time it, this does
            timed = {cut.strategy: probe.latency_ms(pruned)[1]}
        results[name] = {"dense_ms": dense, "candidate_ms": timed, "speedup": {s: round(dense / ms, 3) for s, ms in timed.items()},
                         "fastest": cut.strategy, "macs_removed": round(cut.macs_removed, 4), "blocks_dropped": cut.blocks_dropped,
                         "droppable_blocks": cut.droppable_blocks, "strategies_failed": cut.strategies_failed,
                         "seconds": round(time.perf_counter() - started, 1)}
        rows += [[name, strategy, f"{ms:.3f}", f"{dense / ms:.2f}x", "*" if strategy == cut.strategy else ""] for strategy, ms in timed.items()]
    print_table(f"pruning cuts at {args.prune:.0%} of MACs, onnxruntime CPU, batch 1 (speed-up against dense fp32)",
                ["model", "cut", "ms", "speed-up", "fastest"], rows)
    write_results("prune_strategies", {"prune": args.prune, "models": results}, args.out)


def distill_table(args, scratch: Path) -> None:
    """The same pruning fine-tuned with and without the unpruned model as teacher."""
    if args.run is None:
        raise SystemExit("--what distill needs --run RUN_DIR (a trained model)")
    arms = {}
    for distill in (True, False):
        began = time.perf_counter()
        report = compress(CompressConfig(source=args.run, prune=args.prune, prune_strategy=args.prune_strategy, finetune_epochs=args.finetune_epochs,
                                         distill=distill, quantize="none", out=scratch / ("distilled" if distill else "plain")))
        prune = report.stage(PruneResult)
        arms["distilled" if distill else "plain"] = {
            "test_accuracy": prune.finetune.metrics.accuracy, "original_test_accuracy": prune.original_metrics.accuracy,
            "macs_removed": prune.macs_removed, "strategy": prune.cut.strategy, "seconds": round(time.perf_counter() - began, 1),
        }
    original = arms["plain"]["original_test_accuracy"]
    difference = round(100 * (arms["distilled"]["test_accuracy"] - arms["plain"]["test_accuracy"]), 2)
    rows = [[name, f"{100 * arm['test_accuracy']:.2f}%", f"{100 * (arm['test_accuracy'] - original):+.2f}", f"{arm['seconds']:.0f}"]
            for name, arm in arms.items()]
    print_table(f"pruned {arms['plain']['macs_removed']:.0%} of MACs, {args.finetune_epochs} fine-tuning epochs (original {100 * original:.2f}%)",
                ["fine-tuning", "test accuracy", "vs original (pt)", "seconds"], rows)
    print(f"\ndistillation: {difference:+.2f} points")
    write_results("distill_compare", {"run": str(args.run), "prune": args.prune, "prune_strategy": args.prune_strategy,
                                      "finetune_epochs": args.finetune_epochs, "arms": arms, "distillation_gain_points": difference}, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=("int8", "strategies", "distill"), default="int8")
    parser.add_argument("--run", type=Path, help="a trained run directory (its model.onnx is exported if missing)")
    parser.add_argument("--data-dir", type=Path, default=None, help="where the run's data set lives (imagefolder)")
    parser.add_argument("--torchvision", nargs="*", default=[], help="torchvision model names, random weights (speed only)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=1.0, help="int8: timing per model and batch size, over 3 rounds")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prune", type=float, default=0.5, help="strategies, distill: the fraction of MACs removed")
    parser.add_argument("--prune-strategy", default="depth", help="distill: as bmc compress --prune-strategy")
    parser.add_argument("--finetune-epochs", type=int, default=15, help="distill: fine-tuning epochs of each arm")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.run is None and not args.torchvision:
        parser.error("give --run RUN_DIR or --torchvision NAME")
    scratch = Path(tempfile.mkdtemp(prefix="bmc-compress-bench-"))
    try:
        if args.what == "int8":
            int8_table(args, scratch)
        elif args.what == "strategies":
            strategies_table(args)
        else:
            distill_table(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
