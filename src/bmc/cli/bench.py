"""`bmc bench`: ONNX models on every runtime here, side by side. Runtimes, numpy and rich load inside the command."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def bench_command(
    models: Optional[List[Path]] = typer.Argument(None, help="ONNX files; the first is the baseline (default: the .onnx files of runs/latest)."),
    batch_sizes: str = typer.Option("1,32", "--batch-sizes", help="Comma-separated batch sizes to time."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda (fails unless a GPU really runs the session) or auto."),
    runtime: str = typer.Option("all", "--runtime", help="onnxruntime, openvino, a comma-separated list, or all (every runtime installed here that has the device)."),
    precision: str = typer.Option("fp32", "--precision", help="Float precision per runtime: fp32, bf16, fp16, a comma-separated list, or all (each runtime's precisions on this machine; bf16 changes numerics)."),
    iters: Optional[int] = typer.Option(None, "--iters", help="Timed runs per batch size (default: about 1 s of runs)."),
    seconds: Optional[float] = typer.Option(None, "--seconds", help="Time each batch size for this long instead of --iters."),
    warmup: int = typer.Option(5, "--warmup", help="Untimed runs before timing."),
    rounds: int = typer.Option(1, "--rounds", help="Time all models this many times in turn and keep each one's fastest round (steadier ratios on a busy machine)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads per inference (onnxruntime intra-op, OpenVINO inference threads; default: each runtime's)."),
    data: Optional[str] = typer.Option(None, "--data", help="Also measure accuracy on this bmc data set's test split."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where --data reads from (imagefolder, cifar10, ...)."),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="On CUDA, capture and replay a CUDA graph."),
    tensorrt: bool = typer.Option(False, "--tensorrt", help="On CUDA, put the TensorRT provider first (fails unless the session gets it)."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Also write one CSV row per model and batch size."),
    markdown_path: Optional[Path] = typer.Option(None, "--markdown", help="Also write the table as Markdown."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Also plot latency against size (PNG; needs matplotlib)."),
) -> None:
    """Measure ONNX models on each runtime: size, latency, throughput and accuracy, with ratios against the first."""
    from bmc.artifact import atomic_write_bytes
    from bmc.bench import BenchConfig, bench, default_model_paths
    from bmc.bench.report import require_matplotlib
    from bmc.cli.options import name_list
    from bmc.errors import UsageError

    config = BenchConfig(
        batch_sizes=_batch_sizes(batch_sizes),
        device=device,
        iters=iters,
        seconds=seconds,
        warmup=warmup,
        threads=threads,
        data=data,
        data_dir=data_dir,
        cuda_graph=cuda_graph,
        tensorrt=tensorrt,
        rounds=rounds,
        runtimes=name_list(runtime, "--runtime"),
        precisions=name_list(precision, "--precision"),
    )
    if plot_path is not None:
        require_matplotlib()  # before minutes of measuring, not after
    for path in filter(None, (csv_path, markdown_path, plot_path)):
        # Checked before minutes of measuring: missing folders are made, but a file cannot hold one.
        if path.is_dir():
            raise UsageError(f"{path}: a directory; give a file path")
        if (blocking := next((p for p in path.parents if p.exists()), None)) and not blocking.is_dir():
            raise UsageError(f"{path}: {blocking} is a file, not a directory")
    report = bench(list(models) if models else default_model_paths(), config)

    written = []
    if csv_path is not None:
        atomic_write_bytes(csv_path, report.to_csv().encode())
        written.append(csv_path)
    if markdown_path is not None:
        atomic_write_bytes(markdown_path, report.to_markdown().encode())
        written.append(markdown_path)
    if plot_path is not None:
        report.write_plot(plot_path)
        written.append(plot_path)
    if json_output:
        typer.echo(report.to_json())
        return
    from rich.console import Console

    console = Console(soft_wrap=False)
    console.print(report.rich_table())
    for path in written:
        console.print(f"wrote {path}")


def _batch_sizes(text: str) -> tuple[int, ...]:
    from bmc.errors import UsageError

    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--batch-sizes expects comma-separated integers like 1,32; got {text!r}") from None
    if not values:
        raise UsageError(f"--batch-sizes expects comma-separated integers like 1,32; got {text!r}")
    return values


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
