"""Knowledge distillation into another architecture: the student trained from scratch on the teacher
run's data, with Hinton's loss against the teacher's outputs, then exported."""

from __future__ import annotations

import dataclasses

from bmc.compress.config import CompressConfig
from bmc.compress.finetune import export_run, load_run
from bmc.compress.report import DistillResult, Finetune, Metrics
from bmc.compress.stage import Artifact

STUDENT_RUN = "student-run"


def distill(artifact: Artifact, config: CompressConfig) -> tuple[Artifact, DistillResult]:
    """Train config.student distilled from the artifact's run; the student's run and model are handed on."""
    from bmc.train import train

    teacher, meta, trained = load_run(artifact.run_dir)
    # The student's own recipe (optimizer, rate, epochs for this data set) unless --finetune-epochs says otherwise.
    student_config = dataclasses.replace(
        trained, model=config.student, model_args={}, epochs=config.finetune_epochs or None, lr=None, optimizer=None,
        label_smoothing=None, weight_decay=None, channels_last=None, out=artifact.out_dir / STUDENT_RUN,
        kd_temperature=config.kd_temperature, kd_alpha=config.kd_alpha,
    )
    run = train(student_config, teacher=teacher, point_latest=False)
    exported = export_run(run.run_dir)
    result = DistillResult(
        teacher_run=artifact.run_dir,
        teacher_model=meta["config"]["model"],
        student_model=config.student,
        teacher_parameters=sum(p.numel() for p in teacher.parameters()),
        student_parameters=run.meta["model"]["parameters"],
        kd_temperature=run.meta["config"]["kd_temperature"],
        kd_alpha=run.meta["config"]["kd_alpha"],
        teacher_metrics=Metrics.of(meta["history"][-1]),
        finetune=Finetune(run.meta["config"]["epochs"], True, Metrics.of(run.final_metrics), run.run_dir),
        exported=exported,
    )
    return dataclasses.replace(artifact, onnx=exported.path, run_dir=run.run_dir), result
