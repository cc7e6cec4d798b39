"""`bmc info`: what this bmc knows (data sets, models, machine), or what a run directory holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def info_command(
    target: Optional[Path] = typer.Argument(None, help="A run directory or an ONNX file; omit to list data sets, models and the machine."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List data sets, models and this machine's capabilities, or describe a run directory or an ONNX file."""
    if target is not None and (target.is_file() or target.suffix.lower() == ".onnx"):
        _describe_onnx(target, json_output)
        return
    if target is not None:
        from bmc.artifact import read_meta, resolve_run_dir

        meta = read_meta(resolve_run_dir(target))
        if json_output:
            typer.echo(json.dumps(meta, indent=2))
            return
        last = meta["history"][-1] if meta.get("history") else {}
        typer.echo(f"run        {target}  ({meta.get('status', '?')}, {meta.get('completed_epochs', 0)}/{meta.get('epochs', '?')} epochs)")
        typer.echo(f"model      {meta['model']['name']}  {meta['model']['parameters']:,} parameters, input {meta['model']['input_shape']}")
        typer.echo(f"data       {meta['data']['name']}  {meta['data']['train_samples']} train / {meta['data']['test_samples']} test")
        typer.echo(f"weights    {meta['weights']['file']}  sha256 {meta['weights']['sha256'][:16]}…")
        typer.echo("metrics    " + ", ".join(f"{k} {v}" for k, v in last.items() if k.startswith("test_")))
        return

    from bmc.data import describe_datasets
    from bmc.environment import environment
    from bmc.runtime.registry import describe_runtimes

    report = {"datasets": describe_datasets(), "models": _models_if_installed(), "runtimes": describe_runtimes(), "environment": environment()}
    if json_output:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo("data sets:")
    for name, text in report["datasets"].items():
        typer.echo(f"  {name:<16} {text}")
    if not report["models"]:
        typer.echo("models: none here (the edge install runs models; pip install 'bmc[full]' to train and compress)")
    else:
        typer.echo("models (and any torchvision classifier as torchvision:<name>):")
    for name, text in report["models"].items():
        typer.echo(f"  {name:<16} {text}")
    typer.echo("runtimes (bmc bench --runtime NAME):")
    for runtime in report["runtimes"]:
        if runtime["available"]:
            typer.echo(f"  {runtime['name']:<16} {_runtime_text(runtime)}")
    for runtime in report["runtimes"]:
        if not runtime["available"]:
            typer.echo(f"  {runtime['name']:<16} {runtime['note']}")
    cpu = report["environment"]["cpu"]
    typer.echo(f"cpu: {cpu['model']}, {cpu['usable_cores']} cores, flags: {' '.join(cpu['flags']) or 'none of interest'}")


def _models_if_installed() -> dict[str, str]:
    """The model registry, or nothing on the edge install, where torch (which builds every model) is absent."""
    from bmc.models import describe_models

    try:
        return describe_models()
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("torch", "torchvision"):
            raise
        return {}


def _runtime_text(runtime: dict) -> str:
    """'1.31.1: devices cpu; precisions fp32' and, for OpenVINO, what its CPU plugin sees."""
    text = f"{runtime['version']}: devices {', '.join(runtime['devices'])}; precisions {', '.join(runtime['precisions'])}"
    for device in runtime.get("openvino_devices", []):
        text += f"; {device['name']} {device['full_name']} ({', '.join(device['capabilities'])})"
    if runtime.get("plugin_default_precision"):
        text += f"; plugin default {runtime['plugin_default_precision']} (bmc asks fp32 unless told)"
    return text


def _describe_onnx(path: Path, json_output: bool) -> None:
    from bmc.bench import describe_model
    from bmc.runtime.model_file import printable

    facts = describe_model(path)
    if json_output:
        typer.echo(json.dumps(facts, indent=2))
        return

    def echo(line: str) -> None:
        # Names and metadata come from the file: no terminal escapes from it reach the screen.
        typer.echo(printable(line))

    sparsity = f"{facts['weight_sparsity']:.1%} zero weights" if facts["weight_sparsity"] is not None else "no float weights"
    extra = f" + {len(facts['data_files'])} external data file(s)" if facts["data_files"] else ""
    echo(f"model      {path}  (ONNX IR {facts['ir_version']}, opset {facts['opset']}, producer {facts['producer'] or '?'})")
    echo(f"size       {facts['size_bytes'] / 1e6:.3f} MB{extra}, gzip {facts['gzip_bytes'] / 1e6:.3f} MB")
    echo(f"parameters {facts['parameters']:,}  {facts['numeric_format']}, {sparsity}")
    for label, values in (("inputs", facts["inputs"]), ("outputs", facts["outputs"])):
        for index, value in enumerate(values):
            shape = "[" + ", ".join(str(d) for d in value["shape"]) + "]"
            echo(f"{label if index == 0 else '':<10} {value['name']}  {value['dtype']} {shape}")
    echo("operators  " + ", ".join(f"{op} {count}" for op, count in facts["operators"].items()))
    metadata = facts["metadata"]
    if metadata:
        classes = metadata["class_names"]
        shown = ", ".join(classes[:10]) + (", …" if len(classes) > 10 else "")
        echo(f"metadata   bmc {metadata['bmc_version']}: model {metadata['model']}, data set {metadata['dataset'] or '-'}, task {metadata['task']}")
        echo(f"           input {metadata['input_layout']} {metadata['input_shape']} (data {metadata['data_input_shape']}), normalization {json.dumps(metadata['normalization'])}")
        echo(f"           {len(classes)} classes: {shown}")
        if metadata["source_sha256"]:
            echo(f"           source sha256 {metadata['source_sha256'][:16]}…")
        for batch_size, target in metadata.get("runtime_targets", {}).items():
            threads = f", threads {target['threads']}" if target["threads"] else ""
            echo(f"           batch {batch_size}: {target['runtime']} on {target['device']}, {target['precision']}{threads}")
    for key, value in facts["other_metadata"].items():
        echo(f"metadata   {key} = {value[:200]}")


def register(app: typer.Typer) -> None:
    app.command("info")(info_command)
