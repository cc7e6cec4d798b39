"""The compress stages in order: (export) -> quantize -> report."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from bmc.artifact import atomic_write_json, resolve_run_dir
from bmc.compress import REPORT, CompressConfig, CompressReport
from bmc.compress.quantize import QuantizeConfig, quantize_int8
from bmc.errors import UsageError


def run_pipeline(config: CompressConfig) -> CompressReport:
    source = config.source
    if source is not None and Path(source).is_file():
        if Path(source).suffix != ".onnx":
            raise UsageError(f"{source}: compress takes a run directory or an .onnx file")
        onnx_path = Path(source)
        out_dir = Path(config.out) if config.out else onnx_path.with_name(f"{onnx_path.stem}-compressed")
        run_dir = None
    else:
        run_dir = resolve_run_dir(source)
        out_dir = Path(config.out) if config.out else run_dir / "compressed"
        onnx_path = run_dir / "model.onnx"
    out_dir.mkdir(parents=True, exist_ok=True)
    report = CompressReport(out_dir=str(out_dir), source_onnx=str(onnx_path))

    if run_dir is not None and (config.quantize == "fp16" or not onnx_path.is_file()):
        from bmc.export import ExportConfig, export  # torch is needed from here on only

        if not onnx_path.is_file():
            exported = export(ExportConfig(run_dir=run_dir))
            report.stages.append({"stage": "export", **exported.summary()})
        if config.quantize == "fp16":
            half = export(ExportConfig(run_dir=run_dir, fp16=True, out=out_dir / "model-fp16.onnx"))
            report.stages.append({"stage": "quantize", "method": "fp16", **half.summary()})
            report.result = str(half.path)
    elif config.quantize == "fp16":
        raise UsageError("--quantize fp16 needs a run directory (it re-exports the PyTorch model in half precision)")

    if config.quantize == "int8":
        quantization = config.quantization or QuantizeConfig()
        result = quantize_int8(onnx_path, out_dir, quantization)
        report.stages.append({"stage": "quantize", "method": "int8", **result.to_dict()})
        report.result = result.chosen or str(onnx_path)
    if not report.result:
        report.result = str(onnx_path)
    atomic_write_json(out_dir / REPORT, asdict(report))
    return report


def load_report(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / REPORT).read_text())
