"""The pruning stages: structured pruning in steps, or magnitude pruning, each fine-tuned and exported."""

from __future__ import annotations

import dataclasses
import shutil

from bmc.compress.finetune import export_run, finetune, finetune_epochs, load_run, rewound_recipe
from bmc.compress.report import Finetune, Metrics, PruneResult, PruneStep, SparsityResult
from bmc.compress.stage import Artifact

PRUNED_RUN = "pruned-run"
RANKING_SAMPLES = 256  # training inputs depth pruning ranks blocks on


def prune(artifact: Artifact, config) -> tuple[Artifact, PruneResult]:
    """Remove config.prune of the MACs (and config.prune_params of the parameters) by whole
    channels and blocks in config.prune_iterations steps, each fine-tuned (distilled from the
    original), then export the pruned run."""
    import torch

    from bmc.compress.prune.blocks import residual_blocks
    from bmc.compress.prune.importance import KLPerMillisecond
    from bmc.compress.prune.latency import OnnxProbe
    from bmc.compress.prune.search import Counts, PruneTarget, fraction_left, prune_structured
    from bmc.compress.prune.strategies import get_strategy

    original, meta, trained = load_run(artifact.run_dir)
    example = torch.zeros(1, *meta["model"]["input_shape"])
    epochs, steps = finetune_epochs(config, trained), config.prune_iterations
    recipe, teacher = rewound_recipe(trained, config), original if config.distill else None
    # Gradual pruning: step k removes what is needed to reach k/steps of the target, then
    # fine-tunes its share of the epochs before the next step ranks channels again.
    step_epochs = [epochs // steps + (1 if k < epochs % steps else 0) for k in range(steps)]
    strategy = get_strategy(config.prune_strategy)
    # Depth pruning ranks blocks by what dropping each does to real inputs; drawn once for all steps.
    importance = None
    if strategy.ranks_blocks and residual_blocks(original):
        importance = KLPerMillisecond(_ranking_inputs(artifact.onnx, config.quantization))
    probe = OnnxProbe(example)
    before = Counts.of(original, example)
    current, done = original, []
    for step in range(1, steps + 1):
        now = Counts.of(current, example)
        target = PruneTarget(fraction_left(config.prune * step / steps, before.macs, now.macs),
                        fraction_left(config.prune_params * step / steps, before.params, now.params))
        pruned, cut = prune_structured(current, example, target, strategy, probe, importance)
        step_dir = artifact.out_dir / (PRUNED_RUN if step == steps else f"pruned-step{step}")
        tuned = finetune(dataclasses.replace(recipe, out=step_dir), pruned, step_epochs[step - 1], teacher)
        done.append(PruneStep(step, round(1 - cut.macs_after / before.macs, 4), step_epochs[step - 1], tuned.metrics))
        if step < steps:
            current = load_run(step_dir)[0]
            shutil.rmtree(step_dir, ignore_errors=True)
    after = Counts.of(pruned, example)
    exported = export_run(tuned.run_dir)
    result = PruneResult(
        cut=cut, macs_before=before.macs, macs_after=after.macs, params_before=before.params, params_after=after.params,
        finetune=Finetune(epochs, teacher is not None and epochs > 0, tuned.metrics, tuned.run_dir),
        original_metrics=Metrics.of(meta["history"][-1]), exported=exported, steps=tuple(done) if steps > 1 else (),
    )
    return dataclasses.replace(artifact, onnx=exported.path, run_dir=tuned.run_dir), result


def sparsify(artifact: Artifact, config) -> tuple[Artifact, SparsityResult]:
    """Zero config.sparsity of the weights by magnitude, fine-tune (the zeros stay), export."""
    from bmc.compress.prune.magnitude import prune_magnitude

    original, meta, trained = load_run(artifact.run_dir)
    sparse, zeroed = prune_magnitude(original, config.sparsity)
    recipe = dataclasses.replace(rewound_recipe(trained, config), out=artifact.out_dir / PRUNED_RUN)
    tuned = finetune(recipe, sparse, finetune_epochs(config, trained), original if config.distill else None)
    exported = export_run(tuned.run_dir)
    result = SparsityResult(round(zeroed, 4), tuned, Metrics.of(meta["history"][-1]), exported)
    return dataclasses.replace(artifact, onnx=exported.path, run_dir=tuned.run_dir), result


def _ranking_inputs(onnx_path, quantization):
    """RANKING_SAMPLES training inputs, preprocessed as the model expects."""
    import numpy as np
    import torch

    from bmc.compress.quantize.calibration import calibration_inputs

    calibration = calibration_inputs(onnx_path, dataclasses.replace(quantization, calib_samples=RANKING_SAMPLES))
    return torch.from_numpy(np.concatenate(calibration.batches))
