"""Training after a change, as the stages that change a model share it: fine-tune (or save as it
is, at 0 epochs), then export the new run and prove the file against PyTorch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bmc.compress.report import Finetune, Metrics
from bmc.export import ExportConfig, ExportResult, export


def load_run(run_dir: Path):
    """(the run's model, its bmc.json, its TrainConfig): what a stage starts from."""
    from bmc.checkpoint import load_model
    from bmc.train import TrainConfig

    model, meta = load_model(run_dir)
    return model, meta, TrainConfig.from_dict(meta["config"])


def finetune(recipe, model, epochs: int, teacher=None) -> Finetune:
    """Train `model` for `epochs` by `recipe` (a TrainConfig; recipe.out: the new run's folder),
    with Hinton's loss against `teacher` when given. At 0 epochs the model is saved as it is: not
    one step, so not even BatchNorm's running statistics move."""
    from bmc.train import save_run, train

    if epochs > 0:
        run = train(dataclasses.replace(recipe, epochs=epochs), initial_model=model, teacher=teacher, point_latest=False)
    else:
        run = save_run(recipe, model)
    return Finetune(epochs, teacher is not None and epochs > 0, Metrics.of(run.final_metrics), run.run_dir)


def export_run(run_dir: Path) -> ExportResult:
    """The run exported to RUN_DIR/model.onnx, verified against PyTorch."""
    return export(ExportConfig(run_dir=run_dir))


def rewound_recipe(trained, config):
    """The original run's recipe for fine-tuning a pruned model: its own schedule, peak included,
    unless --finetune-lr says otherwise; the distillation settings asked.

    Learning-rate rewinding (Renda et al., 2020) recovers more than a small rate does. Measured
    against a tenth of the peak with SGD: resnet20 on CIFAR-10 without 4 blocks, 85.26% against
    85.03% after 15 epochs, 83.68% against 83.51% after 5; block-internal, 84.64% against 84.67%
    after 5; digits, seeds 1-3, 96.4/98.1/98.1% against 94.7/95.3/97.2%. AdamW: 94.4% against
    91.9% (digits MLP).
    """
    return dataclasses.replace(trained, lr=config.finetune_lr or trained.lr, kd_temperature=config.kd_temperature, kd_alpha=config.kd_alpha)


def finetune_epochs(config, trained) -> int:
    """--finetune-epochs, else the data set's default (its registry entry's recipe)."""
    from bmc.data import dataset_recipe

    return config.finetune_epochs if config.finetune_epochs is not None else dataset_recipe(trained.data.name).finetune_epochs
