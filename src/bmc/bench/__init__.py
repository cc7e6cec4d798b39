"""Benchmark ONNX models on runtimes: size, latency, throughput and accuracy. Never imports torch.

`bench([Path("model.onnx")], BenchConfig(data="digits", runtimes=("onnxruntime", "openvino")))`
returns a Report with one row per model and runtime target; `describe_model(path)` is what
`bmc info MODEL.onnx` prints. Every file is opened through `model_file.open_model`, which checks it
(external data included) before any runtime sees it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from bmc.errors import BmcError, CheckpointError, DataError, UsageError
from bmc.runtime.target import Target

if TYPE_CHECKING:
    from bmc.bench.report import Report

DEVICES = ("cpu", "cuda", "auto")
MAX_BATCH_SIZE = 1 << 16


@dataclass(frozen=True)
class BenchConfig:
    """How to measure: batch sizes, device, how long, threads, and the data set for accuracy (if any)."""

    batch_sizes: tuple[int, ...] = (1, 32)
    device: str = "cpu"
    iters: int | None = None  # timed runs per batch size; with seconds None too: about 1 s each
    seconds: float | None = None
    warmup: int = 5
    threads: int | None = None  # onnxruntime intra-op threads; None: its default (one per physical core)
    data: str | None = None
    data_dir: Path | None = None
    cuda_graph: bool = False
    tensorrt: bool = False
    seed: int = 0
    # Time every model this many times in turn and keep each one's fastest round: a burst of other
    # work on a shared machine then hits one round, not one model (accuracy: first round only).
    rounds: int = 1
    # The runtimes every model runs on, in order (None: every runtime installed and working here
    # that has the device). The library default stays onnxruntime alone, so a caller that reads
    # report.models by file (compress does) gets one row per file; `bmc bench` asks for all.
    runtimes: tuple[str, ...] | None = ("onnxruntime",)
    # Float precisions (None: every one each runtime has on this machine). fp32 alone by default:
    # every row then computes the same function, so a ratio compares runtimes, not numerics; bf16
    # is asked for by name (and judged by its accuracy row) where a lower precision is acceptable.
    precisions: tuple[str, ...] | None = ("fp32",)
    # Exact targets instead of runtimes x precisions with `threads` (compress searches runtime
    # settings such as one thread against the default): each must be installed and working here.
    targets: tuple[Target, ...] | None = None

    def __post_init__(self) -> None:
        from bmc.runtime.registry import get_runtime
        from bmc.runtime.target import PRECISIONS

        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))  # a list from a caller stays hashable data
        for key in ("runtimes", "precisions"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, tuple(getattr(self, key)))
                if not getattr(self, key):
                    raise UsageError(f"{key} must name at least one, or be None for all")
        for name in self.runtimes or ():
            get_runtime(name)  # "unknown runtime 'x'; known: ..."
        for precision in self.precisions or ():
            if precision not in PRECISIONS:
                raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
        if not self.batch_sizes:
            raise UsageError("batch_sizes must name at least one batch size")
        for batch_size in self.batch_sizes:
            if not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH_SIZE:
                raise UsageError(f"batch sizes must be in [1, {MAX_BATCH_SIZE}]; got {batch_size!r}")
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise UsageError(f"batch sizes must differ; got {list(self.batch_sizes)}")
        if self.device not in DEVICES:
            raise UsageError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        if self.iters is not None and self.seconds is not None:
            raise UsageError("give iters or seconds, not both")
        if self.iters is not None and not 1 <= self.iters <= 10_000_000:
            raise UsageError(f"iters must be in [1, 10000000]; got {self.iters}")
        if self.seconds is not None and not 0 < self.seconds <= 3600:
            raise UsageError(f"seconds must be in (0, 3600]; got {self.seconds}")
        if not 0 <= self.warmup <= 100_000:
            raise UsageError(f"warmup must be in [0, 100000]; got {self.warmup}")
        if self.threads is not None and not 1 <= self.threads <= 1024:
            raise UsageError(f"threads must be in [1, 1024]; got {self.threads}")
        if self.cuda_graph and self.device == "cpu":
            raise UsageError("cuda_graph needs device cuda or auto")
        if self.tensorrt and self.device == "cpu":
            raise UsageError("tensorrt needs device cuda or auto")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or not 1 <= self.rounds <= 100:
            raise UsageError(f"rounds must be in [1, 100]; got {self.rounds!r}")
        if self.data_dir is not None and self.data is None:
            raise UsageError("data_dir needs data (--data NAME)")
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(dict.fromkeys(self.targets)))
            if not self.targets or not all(isinstance(t, Target) for t in self.targets):
                raise UsageError("targets must be one or more runtime targets, or None")

    def to_dict(self) -> dict:
        values = asdict(self)
        values["batch_sizes"] = list(self.batch_sizes)
        values["data_dir"] = str(self.data_dir) if self.data_dir is not None else None
        for key in ("runtimes", "precisions"):
            values[key] = list(values[key]) if values[key] is not None else None
        values["targets"] = [t.to_dict() for t in self.targets] if self.targets is not None else None
        return values


def bench(paths: list[Path] | tuple[Path, ...], config: BenchConfig = BenchConfig()) -> Report:
    """Measure each model file on each runtime target; returns a Report whose ratios are against the
    first file on the first target."""
    from bmc.bench.accuracy import load_eval_dataset, plan_preprocessing
    from bmc.bench.describe import model_facts
    from bmc.runtime.model_file import open_model
    from bmc.bench.report import Report
    from bmc.environment import environment
    from bmc.runtime.metadata import ModelMetadata
    from bmc.runtime.registry import get_runtime, plan_targets, require_runtime
    from bmc.runtime.sessions import UnsupportedModelError

    paths = [Path(p) for p in paths]
    if not paths:
        raise UsageError("no models to bench")
    # Which runtimes and precisions: settled before any file is read, so a missing runtime is one line at once.
    if config.targets is not None:
        targets = config.targets
        for target in targets:
            require_runtime(target.runtime)
    else:
        targets = plan_targets(config.runtimes, config.precisions, config.device, config.threads)
    if config.rounds > 1:
        return _bench_in_rounds(paths, config)
    names = _display_names(paths)
    # Every file is opened, checked and matched to the data before any is measured: a bad second
    # file fails in a second, not after the first file's minutes of timing.
    prepared = []
    datasets: dict[tuple, object] = {}  # one load per distinct data shape
    for path, name in zip(paths, names):
        model = open_model(path)
        metadata = ModelMetadata.from_props(model.metadata_props)
        shape = _model_shape(model, metadata)
        plan = dataset = None
        if config.data is not None:
            if len(model.inputs) != 1:
                raise DataError(f"{path}: accuracy needs a model with one input; it has {len(model.inputs)}")
            if any(not isinstance(d, int) for d in shape):
                raise DataError(f"{path}: input shape {list(shape)} has dynamic axes the metadata does not size")
            key = tuple(metadata.data_input_shape) or shape
            if key not in datasets:
                datasets[key] = load_eval_dataset(config.data, config.data_dir, metadata, shape)
            dataset = datasets[key]
            plan = plan_preprocessing(str(path), metadata, shape, dataset)
        prepared.append((path, name, model_facts(model), shape, plan, dataset))
        del model  # the parsed proto can be as large as the weights; the session loads its own copy

    results = []
    for path, name, facts, shape, plan, dataset in prepared:
        rows, failures = [], []
        for target in targets:
            try:
                rows.append(_bench_on(path, name, facts, shape, plan, dataset, target, config))
            except UnsupportedModelError as exc:
                # A runtime that cannot open a model another one runs is a row that says why; a
                # model no runtime asked for can open is an error, as it always was.
                failures.append(exc)
                rows.append(_unopened_result(name, facts, target, exc, config))
        if len(failures) == len(targets):
            raise failures[0]
        results += rows
    versions = {t.runtime: get_runtime(t.runtime).version() for t in targets}
    return Report(tuple(results), tuple(config.batch_sizes), config.to_dict(), {**environment(), "runtimes": versions})


def _bench_on(path: Path, name: str, facts, shape, plan, dataset, target, config: BenchConfig):
    """Time one file on one target at every batch size, then its accuracy (when data was given)."""
    from bmc.bench.accuracy import evaluate
    from bmc.bench.report import ModelResult
    from bmc.bench.timing import BatchSizeError, measure, random_inputs, runner
    from bmc.runtime.registry import open_session
    from bmc.runtime.sessions import SessionError

    options = _runtime_options(target, config)
    session = open_session(path, target, **options)
    timings = []
    skipped = []
    for batch_size in config.batch_sizes:
        timed = session
        if config.cuda_graph and session.device == "cuda":
            # A CUDA graph is captured for one set of shapes: one session per batch size.
            timed = open_session(path, session.target, **options, cuda_graph=True)
        try:
            feeds = random_inputs(timed, batch_size, _int_shape(shape), config.seed)
            run_once = runner(timed, feeds)
        except BatchSizeError as exc:
            skipped.append((batch_size, str(exc)))
            continue
        except SessionError as exc:
            raise SessionError(f"{path}: {exc}") from None
        timings.append(
            measure(
                run_once, batch_size, config.warmup, config.iters, config.seconds,
                label=str(path), runtime=session.runtime, message=session.error_message,
            )
        )
        del timed, feeds, run_once
    quality = evaluate(session, plan, dataset, str(path)) if plan is not None else None
    return ModelResult(
        name, facts, session.device, session.providers, tuple(timings), tuple(skipped), quality,
        runtime=session.runtime, precision=session.precision, details=session.details,
    )


def _runtime_options(target, config: BenchConfig) -> dict:
    """The runtime-specific options the config asks for that this target's runtime takes."""
    from bmc.runtime.registry import get_runtime

    wanted = {"tensorrt": True} if config.tensorrt else {}
    return {key: value for key, value in wanted.items() if key in get_runtime(target.runtime).options}


def _unopened_result(name: str, facts, target, error: BmcError, config: BenchConfig):
    from bmc.bench.report import ModelResult

    reason = str(error)
    reason = reason[len(facts.path) + 2 :] if reason.startswith(facts.path + ": ") else reason
    return ModelResult(
        name, facts, target.device, (), (), tuple((b, reason) for b in config.batch_sizes), None,
        runtime=target.runtime, precision=target.precision,
    )


def describe_model(path: Path | str) -> dict:
    """What `bmc info MODEL.onnx` shows: sizes, parameters, format, sparsity, opset, operators, I/O, metadata."""
    from bmc.bench.describe import model_facts
    from bmc.runtime.model_file import open_model

    return model_facts(open_model(path)).to_dict()


def default_model_paths() -> list[Path]:
    """The .onnx files of runs/latest and what `bmc compress` made of them (model.onnx first), for `bmc bench` with no paths."""
    from bmc.artifact import resolve_run_dir

    try:
        run_dir = resolve_run_dir(None)
    except CheckpointError:
        raise BmcError(
            "no models given and runs/latest does not exist; pass MODEL.onnx files, or run `bmc train` and `bmc export`"
        ) from None
    # compressed/ is where `bmc compress` writes: the original against what compression made of it.
    compressed = run_dir / "compressed"
    paths = (
        sorted(run_dir.glob("*.onnx"), key=lambda p: (p.name != "model.onnx", p.name))
        + sorted(compressed.glob("pruned-run/*.onnx"))
        + sorted(compressed.glob("*.onnx"))
    )
    if not paths:
        raise BmcError(f"no models given and no .onnx files in {run_dir}; run `bmc export` first")
    return paths


def _display_names(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    # Two runs' model.onnx side by side need their folders to tell them apart.
    return [str(p) if names.count(p.name) > 1 else p.name for p in paths]


def bench_rounds(paths: list[Path] | tuple[Path, ...], config: BenchConfig, rounds: int = 3) -> tuple[Report, list[dict[int, float]]]:
    """bench() in `rounds` rounds: (the report, each model's best median latency per batch size)."""
    report = bench(paths, replace(config, rounds=rounds))
    return report, _best_medians(report)


def _bench_in_rounds(paths: list[Path], config: BenchConfig) -> Report:
    """Every model timed config.rounds times in turn; each model's fastest round per batch size.

    The machine is shared: a burst of other work during one model's slot would decide a ratio or a
    choice made on one pass (resnet20 pruned at batch 32: 1.77-1.82x in one pass of 0.5 s per model,
    1.74-1.77x as the best of 3 rounds; alternating rounds of 0.3 s, 1.77x).
    """
    first = bench(paths, replace(config, rounds=1))
    fastest = [{t.batch_size: t for t in model.timings} for model in first.models]
    timing_only = replace(config, rounds=1, data=None, data_dir=None)
    for _ in range(config.rounds - 1):
        for best, model in zip(fastest, bench(paths, timing_only).models):
            for timing in model.timings:
                if timing.batch_size in best and timing.latency_ms_median < best[timing.batch_size].latency_ms_median:
                    best[timing.batch_size] = timing
    models = tuple(replace(model, timings=tuple(best[t.batch_size] for t in model.timings)) for model, best in zip(first.models, fastest))
    return replace(first, models=models, config=config.to_dict())


def _best_medians(report: Report) -> list[dict[int, float]]:
    return [{t.batch_size: t.latency_ms_median for t in model.timings} for model in report.models]


def _model_shape(model, metadata) -> tuple[int | str, ...]:
    """The first input's shape without the batch axis; dynamic axes sized from the metadata where it can."""
    inputs = model.inputs
    if not inputs:
        raise BmcError(f"{model.path}: the model has no inputs to feed")
    dims = tuple(inputs[0].shape[1:])
    known = tuple(metadata.input_shape)
    if len(known) == len(dims):
        dims = tuple(k if not isinstance(d, int) else d for d, k in zip(dims, known))
    return dims


def _int_shape(shape: tuple) -> tuple[int, ...]:
    return tuple(shape) if all(isinstance(d, int) for d in shape) else ()


__all__ = ["BenchConfig", "bench", "bench_rounds", "describe_model", "default_model_paths"]
