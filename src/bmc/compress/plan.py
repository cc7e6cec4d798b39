"""compress as a plan: the config resolved against its source, the stage list built once from it,
then `for stage in plan: artifact, result = stage(artifact, config)`, and the closing report.

    export (where the run has no model.onnx) -> prune | sparsify -> distill -> fp16 | int8 (-> qat where int8 lost accuracy only) | int8-dynamic | qat
    an ONNX file: its data and preprocessing decided (inputs.py), then int8

Stage modules are imported where the plan needs them: quantizing an ONNX file never imports torch.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

from bmc.artifact import atomic_write_json, read_meta, resolve_run_dir
from bmc.compress.config import CompressConfig
from bmc.compress.inputs import accuracy_not_measured, input_notes, resolve_inputs
from bmc.compress.outputs import Staging, relocate_runs, relocated
from bmc.compress.report import REPORT, CompressReport, StageResult
from bmc.compress.stage import Artifact, Stage
from bmc.compress.summary import summarize


def run_compress(config: CompressConfig) -> CompressReport:
    """Run the plan for config; its results replace the output folder's only once every stage is done."""
    config = resolve_config(config)
    source_onnx, run_dir = _source_files(config)
    with Staging(config.out, REPORT, (source_onnx,)) as staging:
        # An ONNX file's data and preprocessing, decided once the output folder is known to be ours;
        # a file bmc did not write is read from here on as a copy with them in its metadata.
        config, inputs = resolve_inputs(config, staging.path)
        original = inputs.model if inputs is not None else source_onnx
        artifact = Artifact(out_dir=staging.path, onnx=original, run_dir=run_dir)
        results: list[StageResult] = [inputs] if inputs is not None else []
        for stage in build_plan(config):
            artifact, result = stage(artifact, config)
            if result is not None:
                results.append(result)
            gc.collect()  # pruned and fine-tuned models sit in reference cycles; the next stage needs the memory
        summary, notes = summarize(original, results, config, staging.path)
        notes = [*input_notes(inputs, config), *notes]
        report = CompressReport(staging.path, source_onnx, artifact.result, tuple(results), tuple(summary), tuple(notes), config,
                                accuracy_not_measured=accuracy_not_measured(inputs, config))
        report = relocated(report, staging.path, config.out)
        relocate_runs(staging.path, config.out)
        atomic_write_json(staging.path / REPORT, report.to_dict())
        staging.commit()
    return report


def build_plan(config: CompressConfig) -> list[Stage]:
    """The stages config asks for, in order (config resolved: see resolve_config)."""
    plan: list[Stage] = []
    if not config.source_is_onnx:
        plan.append(export_if_missing)
    if config.prune > 0:
        from bmc.compress.pruning import prune

        plan.append(prune)
    if config.sparsity > 0:
        from bmc.compress.pruning import sparsify

        plan.append(sparsify)
    if config.student:
        from bmc.compress.distill import distill

        plan.append(distill)
    if config.quantize == "fp16":
        from bmc.compress.half import fp16

        plan.append(fp16)
    elif config.quantize == "int8" and config.qat:
        from bmc.compress.qat import qat

        plan.append(qat)
    elif config.quantize in ("int8", "int8-dynamic"):
        from bmc.compress.int8 import int8

        plan.append(int8)
        if config.quantize == "int8" and not config.source_is_onnx:
            # Post-training int8 fast enough but short on accuracy, even with layers left in float:
            # the next of its fallbacks is quantization-aware fine-tuning.
            from bmc.compress.qat import qat_where_int8_lost_accuracy

            plan.append(qat_where_int8_lost_accuracy)
    return plan


def resolve_config(config: CompressConfig) -> CompressConfig:
    """config with what the source decides filled in, so the report records exactly what ran: the
    source's path (runs/latest resolved), the output folder, the quantization for the target, and
    the data set (and folder) calibration and accuracy read: --calib-data, else the run's own. An
    ONNX file's data and preprocessing are decided once the output folder is ours (inputs.py)."""
    if config.source_is_onnx:
        source = Path(config.source)
        out = config.out or source.with_name(f"{source.stem}-compressed")
    else:
        source = resolve_run_dir(config.source)
        out = config.out or source / "compressed"
    quantization = config.quantization
    data, data_dir = quantization.calib_data, quantization.calib_data_dir
    if data is None and not config.source_is_onnx:
        # An imagefolder run fine-tuned for minutes must not then fail for want of --calib-data-dir.
        trained = read_meta(source)["config"]["data"]
        data = trained["name"]
        data_dir = data_dir or (Path(trained["data_dir"]) if trained.get("data_dir") else None)
    return dataclasses.replace(
        config, source=source, out=Path(out), quantize=config.quantization_format,
        quantization=dataclasses.replace(quantization, calib_data=data, calib_data_dir=data_dir),
    )


def export_if_missing(artifact: Artifact, config: CompressConfig):
    """The run exported to RUN_DIR/model.onnx where it has none yet: every later stage measures against it."""
    if artifact.onnx.is_file():
        return artifact, None
    from bmc.compress.finetune import export_run

    return artifact, export_run(artifact.run_dir)


def _source_files(config: CompressConfig) -> tuple[Path, Path | None]:
    """(the source's fp32 ONNX file, its run directory or None)."""
    if config.source_is_onnx:
        return Path(config.source), None
    return Path(config.source) / "model.onnx", Path(config.source)
