"""Where to take the MACs from: a CIFAR ResNet pruned stage by stage, timed in fp32 and int8, one run.

    python benchmarks/prune_allocation.py --run RUN_DIR [--finetune-epochs 5] [--configs NAME ...]

The pruning issue asks to choose what to remove by its measured latency on the target, not by MAC
counts alone. This measures the ground truth behind that choice on a trained resnet20 (or resnet56):
each configuration keeps a fraction of the residual channels (shared by a stage's additions) and
of the block-internal channels, per stage, rounded to multiples of 8 and ranked by L1 norm; each
is exported, quantized by the recipe bmc tries first on this CPU, and timed with the dense model
in the same run. With --finetune-epochs, each is also fine-tuned as `bmc compress` does (the run's own
schedule rewound, distilled from the dense model; --finetune-lr-scale 0.1 for the tenth of the rate
compress used before) and its test accuracy reported.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from bmc.bench import BenchConfig, bench_rounds  # noqa: E402
from bmc.checkpoint import load_model  # noqa: E402
from bmc.compress.depth import residual_blocks  # noqa: E402
from bmc.compress.measure import count_macs_and_params  # noqa: E402
from bmc.compress.prune import _joins_outputs  # noqa: E402
from bmc.models.blocks import drop_blocks  # noqa: E402
from bmc.compress.quantize import _pre_process, candidate_recipes, quantize_with_recipe  # noqa: E402
from bmc.environment import cpu_info  # noqa: E402
from bmc.export.onnx_export import torch_to_onnx  # noqa: E402

# name -> (residual channels kept per stage, block-internal channels kept per stage[, residual blocks dropped per stage])
CONFIGS = {
    "dense": ((1, 1, 1), (1, 1, 1)),
    "uniform (bmc's default: 16->8, 32->24, 64->56)": ((0.5, 0.75, 0.875), (0.5, 0.75, 0.875)),
    "block-internal only, 1/2, 3/8, 3/8": ((1, 1, 1), (0.5, 0.375, 0.375)),
    "block-internal only, stages 2-3 to 1/4": ((1, 1, 1), (1, 0.25, 0.25)),
    "residual 3/4 in stages 2-3, internal 1/2": ((1, 0.75, 0.75), (0.5, 0.5, 0.5)),
    "residual 1/2 in stages 2-3, internal 1/2": ((1, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "everything 1/2": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "1 block dropped per stage": ((1, 1, 1), (1, 1, 1), (1, 1, 1)),
    "2 blocks dropped in stage 1, 1 in 2-3": ((1, 1, 1), (1, 1, 1), (2, 1, 1)),
    "3 blocks dropped in stage 1": ((1, 1, 1), (1, 1, 1), (3, 0, 0)),
    "1 block dropped per stage, internal 1/2": ((1, 1, 1), (0.5, 0.5, 0.5), (1, 1, 1)),
    "2+1+1 blocks dropped, internal 3/4 in 2-3": ((1, 1, 1), (1, 0.75, 0.75), (2, 1, 1)),
    "2+2+2 blocks dropped": ((1, 1, 1), (1, 1, 1), (2, 2, 2)),
    # Towards the size goal (10x smaller with int8): stage 3 holds 82% of the parameters for a third of the MACs.
    "size: 2+1+1 dropped, stage-3 internal 1/4": ((1, 1, 1), (1, 1, 0.25), (2, 1, 1)),
    "size: 2+2+0 dropped, stage-3 internal 1/4": ((1, 1, 1), (1, 1, 0.25), (2, 2, 0)),
    "size: 2+2+1 dropped, stage-3 internal 1/2": ((1, 1, 1), (1, 1, 0.5), (2, 2, 1)),
    "size: 2+1+0 dropped, internal 1/2 in 2, 1/4 in 3": ((1, 1, 1), (1, 0.5, 0.25), (2, 1, 0)),
    "size: 2+0+0 dropped, stage-3 internal 1/4": ((1, 1, 1), (1, 1, 0.25), (2, 0, 0)),
    "size: 1+1+0 dropped, stage-3 internal 1/4": ((1, 1, 1), (1, 1, 0.25), (1, 1, 0)),
    "size: 2+0+0 dropped, stage-3 internal 3/8": ((1, 1, 1), (1, 1, 0.375), (2, 0, 0)),
}


def prune_by_stage(model, example, residual_keep, internal_keep, dropped=(0, 0, 0), round_to: int = 8):
    """A copy of model with each channel group cut to its stage's kept fraction (L1-ranked), and the
    last `dropped` residual blocks of each stage replaced by what they add to (their shortcut)."""
    import torch
    import torch_pruning as tp
    from torch import nn

    model = copy.deepcopy(model).eval()
    blocks = residual_blocks(model)
    stage_of = {}
    for name, _ in blocks:
        stage_of.setdefault(model.get_submodule(name).conv2.out_channels, []).append(name)
    drop = [name for stage, names in enumerate(stage_of.values()) for name in names[len(names) - dropped[stage]:]]
    model = drop_blocks(model, [b for b in blocks if b[0] in drop])
    graph = tp.DependencyGraph().build_dependency(model, example)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    groups = list(graph.get_all_groups(ignored_layers=[classifier], root_module_types=(nn.Conv2d,)))
    widths = sorted({g[0].dep.target.module.out_channels for g in groups})
    importance = tp.importance.MagnitudeImportance(p=1)
    cuts = []
    for group in groups:
        root = group[0].dep.target.module
        stage = widths.index(root.out_channels)
        keep_fraction = (residual_keep if _joins_outputs(group) else internal_keep)[stage]
        keep = max(round_to, int(round(root.out_channels * keep_fraction / round_to)) * round_to)
        if keep < root.out_channels:
            order = torch.argsort(importance(group))
            cuts.append((root, order[: root.out_channels - keep].tolist()))
    for root, drop in cuts:
        graph.get_pruning_group(root, tp.prune_conv_out_channels, drop).prune()
    return model


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a trained resnet20/resnet56 run directory")
    parser.add_argument("--configs", nargs="*", default=None, help=f"a subset of: {', '.join(CONFIGS)}")
    parser.add_argument("--finetune-epochs", type=int, default=0, help="0: latency only")
    parser.add_argument("--finetune-lr-scale", type=float, default=1.0, help="peak rate against the run's own (1: rewound, as compress)")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per model and batch size")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    names = args.configs or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s): {unknown}; choose from {list(CONFIGS)}")

    model, meta = load_model(args.run)
    example = torch.zeros(1, *meta["model"]["input_shape"])
    macs_dense, params_dense = count_macs_and_params(model, example)
    flags = cpu_info()["flags"]
    recipe = candidate_recipes(flags)[0]
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((32, *meta["model"]["input_shape"])).astype(np.float32) for _ in range(4)]
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        files = []
        for index, name in enumerate(names):
            pruned = prune_by_stage(model, example, *CONFIGS[name])
            fp32 = Path(scratch) / f"{index}.onnx"
            torch_to_onnx(pruned, example, fp32, 17)
            int8 = Path(scratch) / f"{index}-int8.onnx"
            quantize_with_recipe(_pre_process(fp32, Path(scratch) / f"{index}-pre.onnx"), int8, recipe, "input", calibration, "minmax")
            files += [fp32, int8]
            macs, params = count_macs_and_params(pruned, example)
            results[name] = {"macs_removed": round(1 - macs / macs_dense, 4), "params_removed": round(1 - params / params_dense, 4),
                             "int8_smaller": round(files[0].stat().st_size / int8.stat().st_size, 2),
                             "channels": [m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]}
            if args.finetune_epochs and results[name]["macs_removed"] == 0:
                results[name]["test_accuracy"] = meta["history"][-1]["test_accuracy"]  # nothing pruned: the run's own
            elif args.finetune_epochs:
                results[name]["test_accuracy"] = _finetune(pruned, model, meta, args.finetune_epochs, args.finetune_lr_scale,
                                                          Path(scratch) / f"run-{index}")
                print(f"{name}: {results[name]}", flush=True)
        # Every model in one bench, several rounds, each model's best median: ratios within one run.
        _, best = bench_rounds(files, BenchConfig(batch_sizes=(1, 32), seconds=args.seconds / 3), 3)
    base = best[0]
    for index, name in enumerate(names):
        fp32_ms, int8_ms = best[2 * index], best[2 * index + 1]
        results[name].update(fp32_ms=fp32_ms, int8_ms=int8_ms,
                             fp32_speedup={b: round(base[b] / ms, 3) for b, ms in fp32_ms.items()},
                             int8_speedup={b: round(base[b] / ms, 3) for b, ms in int8_ms.items()})
    rows = [[name, f"{r['macs_removed']:.0%}", f"{r['params_removed']:.0%}", f"{r['int8_smaller']:.1f}x",
             *(f"{r['fp32_speedup'][b]:.2f}x" for b in (1, 32)),
             *(f"{r['int8_speedup'][b]:.2f}x" for b in (1, 32)),
             f"{100 * r['test_accuracy']:.2f}%" if "test_accuracy" in r else "-"] for name, r in results.items()]
    print_table(f"{meta['model']['name']} pruned by stage (speed-ups against the first configuration's fp32; int8 {recipe.name})",
                ["configuration", "MACs removed", "params removed", "int8 smaller", "fp32 b1", "fp32 b32", "int8 b1", "int8 b32",
                 "test accuracy"], rows)
    write_results("prune_allocation", {"run": str(args.run), "recipe": recipe.name, "finetune_epochs": args.finetune_epochs, "finetune_lr_scale": args.finetune_lr_scale,
                                       "reference": names[0], "configs": results}, args.out)


def _finetune(pruned, teacher, meta, epochs: int, lr_scale: float, out: Path) -> float:
    from bmc.train import TrainConfig, train

    trained = TrainConfig.from_dict(meta["config"])
    shutil.rmtree(out, ignore_errors=True)
    config = dataclasses.replace(trained, lr=trained.lr * lr_scale, kd_temperature=4.0, kd_alpha=0.5, epochs=epochs, out=out)
    return train(config, initial_model=pruned, teacher=teacher, point_latest=False).final_metrics["test_accuracy"]


if __name__ == "__main__":
    main()
