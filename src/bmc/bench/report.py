"""The bench report: models (each on each runtime) side by side, ratios against the first, and its
JSON, CSV, Markdown and plot forms."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from bmc.artifact import atomic_write_bytes
from bmc.bench.accuracy import Quality
from bmc.bench.describe import ModelFacts
from bmc.bench.timing import Timing
from bmc.errors import BmcError

CSV_COLUMNS = (
    "model",
    "path",
    "numeric_format",
    "device",
    "providers",
    "runtime",
    "precision",
    "batch_size",
    "iterations",
    "latency_ms_median",
    "latency_ms_p90",
    "latency_ms_p99",
    "throughput_samples_per_s",
    "speedup_vs_first",
    "size_bytes",
    "gzip_bytes",
    "size_reduction_vs_first",
    "parameters",
    "weight_sparsity",
    "dataset",
    "accuracy",
    "accuracy_change_vs_first",
    "mse",
    "r2",
    "skipped",
)


@dataclass(frozen=True)
class ModelResult:
    """Everything bench measured for one model file on one runtime target."""

    name: str
    facts: ModelFacts
    device: str
    providers: tuple[str, ...]
    timings: tuple[Timing, ...]
    skipped: tuple[tuple[int, str], ...] = ()  # (batch size, why it could not run)
    quality: Quality | None = None
    runtime: str = "onnxruntime"
    precision: str = "fp32"  # the float precision the runtime really computed in
    details: dict = field(default_factory=dict)  # what the runtime reported it set (threads, streams, ...)

    def timing(self, batch_size: int) -> Timing | None:
        return next((t for t in self.timings if t.batch_size == batch_size), None)

    @property
    def runtime_label(self) -> str:
        return self.runtime if self.precision == "fp32" else f"{self.runtime} {self.precision}"


@dataclass(frozen=True)
class Report:
    """Bench results of several models; the first is the baseline every ratio is taken against."""

    models: tuple[ModelResult, ...]
    batch_sizes: tuple[int, ...]
    config: dict
    environment: dict

    def speedup(self, index: int, batch_size: int) -> float | None:
        """Baseline median latency / this model's, at one batch size (>1 means faster)."""
        first, this = self.models[0].timing(batch_size), self.models[index].timing(batch_size)
        if first is None or this is None or this.latency_ms_median <= 0:
            return None
        return first.latency_ms_median / this.latency_ms_median

    def size_reduction(self, index: int) -> float | None:
        """Baseline bytes / this model's bytes (>1 means smaller)."""
        size = self.models[index].facts.size_bytes
        return self.models[0].facts.size_bytes / size if size else None

    def accuracy_change(self, index: int) -> float | None:
        """This model's accuracy minus the baseline's (a fraction; x100 for points)."""
        first, this = self.models[0].quality, self.models[index].quality
        if first is None or this is None or first.accuracy is None or this.accuracy is None:
            return None
        return this.accuracy - first.accuracy

    def r2_change(self, index: int) -> float | None:
        first, this = self.models[0].quality, self.models[index].quality
        if first is None or this is None or first.r2 is None or this.r2 is None:
            return None
        return this.r2 - first.r2

    def to_dict(self) -> dict:
        models = []
        for index, model in enumerate(self.models):
            models.append(
                {
                    "name": model.name,
                    **model.facts.to_dict(),
                    "device": model.device,
                    "providers": list(model.providers),
                    "runtime": model.runtime,
                    "precision": model.precision,
                    "runtime_details": model.details,
                    "size_reduction_vs_first": self.size_reduction(index),
                    "timings": [
                        {**t.to_dict(), "speedup_vs_first": self.speedup(index, t.batch_size)} for t in model.timings
                    ],
                    "skipped": [{"batch_size": b, "reason": why} for b, why in model.skipped],
                    "quality": model.quality.to_dict() if model.quality else None,
                    "accuracy_change_vs_first": self.accuracy_change(index),
                    "r2_change_vs_first": self.r2_change(index),
                }
            )
        return {
            "batch_sizes": list(self.batch_sizes),
            "config": self.config,
            "models": models,
            "environment": self.environment,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def rows(self) -> list[dict]:
        """One flat row per model and batch size (the CSV's rows)."""
        rows = []
        for index, model in enumerate(self.models):
            quality = model.quality
            skipped = dict(model.skipped)
            for batch_size in self.batch_sizes:
                timing = model.timing(batch_size)
                rows.append(
                    {
                        "model": model.name,
                        "path": model.facts.path,
                        "numeric_format": model.facts.numeric_format,
                        "device": model.device,
                        "providers": " ".join(model.providers),
                        "runtime": model.runtime,
                        "precision": model.precision,
                        "batch_size": batch_size,
                        "iterations": timing.iterations if timing else None,
                        "latency_ms_median": timing.latency_ms_median if timing else None,
                        "latency_ms_p90": timing.latency_ms_p90 if timing else None,
                        "latency_ms_p99": timing.latency_ms_p99 if timing else None,
                        "throughput_samples_per_s": timing.throughput_samples_per_s if timing else None,
                        "speedup_vs_first": self.speedup(index, batch_size),
                        "size_bytes": model.facts.size_bytes,
                        "gzip_bytes": model.facts.gzip_bytes,
                        "size_reduction_vs_first": self.size_reduction(index),
                        "parameters": model.facts.parameters,
                        "weight_sparsity": model.facts.weight_sparsity,
                        "dataset": quality.dataset if quality else None,
                        "accuracy": quality.accuracy if quality else None,
                        "accuracy_change_vs_first": self.accuracy_change(index),
                        "mse": quality.mse if quality else None,
                        "r2": quality.r2 if quality else None,
                        "skipped": skipped.get(batch_size, ""),
                    }
                )
        return rows

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows():
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        return buffer.getvalue()

    def table_cells(self) -> tuple[list[str], list[list[str]]]:
        """(header, rows) of the side-by-side table: one column per model, one row per measure."""
        header = ["", *self.column_names()]
        rows: list[list[str]] = []

        def add(label: str, values: list[str]) -> None:
            rows.append([label, *values])

        indices = range(len(self.models))
        add("format", [m.facts.numeric_format for m in self.models])
        add("runtime", [m.runtime_label for m in self.models])
        add("device", [_device_text(m) for m in self.models])
        add("size", [_megabytes(m.facts.size_bytes) for m in self.models])
        add("gzip size", [_megabytes(m.facts.gzip_bytes) for m in self.models])
        add("size reduction", [_ratio(self.size_reduction(i)) for i in indices])
        add("parameters", [f"{m.facts.parameters:,}" for m in self.models])
        add("weight sparsity", [_percent(m.facts.weight_sparsity) for m in self.models])
        for batch_size in self.batch_sizes:
            timings = [m.timing(batch_size) for m in self.models]
            skipped = [dict(m.skipped).get(batch_size, "n/a") for m in self.models]
            add(
                f"batch {batch_size} ms p50/p90/p99",
                [
                    f"{t.latency_ms_median:.3f} / {t.latency_ms_p90:.3f} / {t.latency_ms_p99:.3f}" if t else why
                    for t, why in zip(timings, skipped)
                ],
            )
            add(f"batch {batch_size} throughput", [f"{t.throughput_samples_per_s:,.0f} samples/s" if t else "" for t in timings])
            add(f"batch {batch_size} speed-up", [_ratio(self.speedup(i, batch_size)) for i in indices])
        qualities = [m.quality for m in self.models]
        if any(q and q.accuracy is not None for q in qualities):
            dataset = next(q.dataset for q in qualities if q)
            add(f"accuracy ({dataset} test)", [_percent(q.accuracy if q else None, 2) for q in qualities])
            add("accuracy change", [_points(self.accuracy_change(i)) for i in indices])
        if any(q and q.r2 is not None for q in qualities):
            dataset = next(q.dataset for q in qualities if q)
            add(f"MSE ({dataset} test)", [f"{q.mse:.4g}" if q and q.mse is not None else "" for q in qualities])
            add("R²", [f"{q.r2:.4f}" if q and q.r2 is not None else "" for q in qualities])
            add("R² change", [f"{c:+.4f}" if (c := self.r2_change(i)) is not None else "" for i in indices])
        return header, rows

    def column_names(self) -> list[str]:
        """Each result's model name, with its runtime when the report holds more than one runtime or precision."""
        if len({m.runtime_label for m in self.models}) <= 1:
            return [m.name for m in self.models]
        return [f"{m.name} on {m.runtime_label}" for m in self.models]

    def to_markdown(self) -> str:
        header, rows = self.table_cells()
        lines = ["| " + " | ".join(_md(c) for c in header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
        return "\n".join(lines) + "\n"

    def rich_table(self):
        """The side-by-side table as a rich Table."""
        from rich.table import Table
        from rich.text import Text

        header, rows = self.table_cells()
        # Text, not markup: a file named "[red]x.onnx" is shown as it is named.
        table = Table(title=Text(f"bmc bench ({self.config.get('device', 'cpu')}; ratios against {header[1]})"))
        table.add_column(Text(header[0]), style="bold")
        for name in header[1:]:
            table.add_column(Text(name), justify="right", overflow="fold")
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        return table

    def write_plot(self, path: Path) -> None:
        """Latency against size on log axes: a colour per file, a marker per batch size, a fill per
        runtime; each file labelled once with its short name and accuracy (needs matplotlib)."""
        matplotlib = require_matplotlib()
        matplotlib.use("Agg")
        from matplotlib import pyplot
        from matplotlib.lines import Line2D

        timed = [m for m in self.models if m.timings]
        if not timed:
            raise BmcError("nothing to plot: no model produced a timing")
        # Sizes and latencies of a pruned, quantized and original model span orders of magnitude:
        # on linear axes the small ones sit on one dot at the origin.
        figure, axes = pyplot.subplots(figsize=(7.2, 4.8))
        axes.set_xscale("log")
        axes.set_yscale("log")
        files = list(dict.fromkeys(m.facts.path for m in timed))
        names = dict(zip(files, short_names(files)))
        colours = {f: pyplot.cm.tab10(i % 10) for i, f in enumerate(files)}
        markers = dict(zip(self.batch_sizes, "o^sDvP*X"))
        runtimes = list(dict.fromkeys(m.runtime_label for m in timed))
        hollow = {r: i % 2 == 1 for i, r in enumerate(runtimes)}  # a second runtime drawn hollow
        labelled: set[str] = set()
        for model in timed:
            size_mb = model.facts.size_bytes / 1e6
            colour = colours[model.facts.path]
            for timing in model.timings:
                axes.scatter(
                    [size_mb], [timing.latency_ms_median], marker=markers.get(timing.batch_size, "o"), s=46,
                    facecolors="none" if hollow[model.runtime_label] else [colour], edgecolors=[colour], linewidths=1.4,
                )
            if model.facts.path in labelled:
                continue
            labelled.add(model.facts.path)
            label = names[model.facts.path]
            if model.quality and model.quality.accuracy is not None:
                label += f" {model.quality.accuracy:.1%}"
            elif model.quality and model.quality.r2 is not None:
                label += f" R² {model.quality.r2:.3f}"
            first = model.timings[0]
            # Neighbouring files often sit at one latency: alternate above and below the point.
            below = len(labelled) % 2 == 0
            axes.annotate(
                label, (size_mb, first.latency_ms_median), textcoords="offset points", xytext=(7, -13 if below else 6),
                fontsize=8, color=colour,
            )
        legend = [Line2D([], [], marker=markers.get(b, "o"), linestyle="", color="0.3", label=f"batch {b}") for b in self.batch_sizes]
        if len(runtimes) > 1:
            legend += [
                Line2D([], [], marker="o", linestyle="", color="0.3", markerfacecolor="none" if hollow[r] else "0.3",
                       label=f"{'hollow' if hollow[r] else 'filled'}: {r}")
                for r in runtimes
            ]
        axes.legend(handles=legend, fontsize=8, loc="best")
        axes.margins(0.25)  # room for the labels of the outermost points
        axes.set_xlabel("model size (MB, log)")
        axes.set_ylabel("median latency (ms, log)")
        axes.set_title(f"bmc bench on {self.config.get('device', 'cpu')}")
        axes.grid(True, which="both", alpha=0.25)
        buffer = io.BytesIO()
        figure.tight_layout()
        figure.savefig(buffer, format="png", dpi=120)
        pyplot.close(figure)
        atomic_write_bytes(Path(path), buffer.getvalue())


def short_names(paths: list) -> list[str]:
    """Short distinct labels: each file's stem; where stems repeat, the shallowest file keeps it and
    the others take the folder that tells them apart (model.onnx and its pruned-run/model.onnx: 'model', 'pruned-run')."""
    stems = [Path(p).stem for p in paths]
    names = list(stems)
    for stem in set(stems):
        same = [i for i, s in enumerate(stems) if s == stem]
        if len(same) < 2:
            continue
        keeper = min(same, key=lambda i: len(Path(paths[i]).parts))
        for index in same:
            parts = Path(paths[index]).with_suffix("").parts
            if index != keeper:
                names[index] = parts[-2] if len(parts) > 1 else parts[-1]
        repeated = [i for i in same if [names[j] for j in same].count(names[i]) > 1]
        for index in repeated:  # two folders of one name: the whole path tells them apart
            names[index] = str(Path(paths[index]).with_suffix(""))
    return names


def require_matplotlib():
    """The matplotlib module, or a one-line error saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise BmcError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    return matplotlib


def _device_text(model: ModelResult) -> str:
    # onnxruntime's provider names, shortened; OpenVINO's execution devices are short already.
    short = {"CPUExecutionProvider": "CPU", "CUDAExecutionProvider": "CUDA", "TensorrtExecutionProvider": "TensorRT"}
    if not model.providers:
        return f"{model.device} (not opened)"
    return f"{model.device} ({'+'.join(short.get(p, p) for p in model.providers)})"


def _megabytes(size_bytes: int) -> str:
    return f"{size_bytes / 1e6:.3f} MB" if size_bytes < 10e6 else f"{size_bytes / 1e6:.1f} MB"


def _ratio(value: float | None) -> str:
    return f"{value:.2f}×" if value is not None else ""


def _percent(value: float | None, digits: int = 1) -> str:
    return f"{value:.{digits}%}" if value is not None else ""


def _points(change: float | None) -> str:
    return f"{change * 100:+.2f} pt" if change is not None else ""


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")
