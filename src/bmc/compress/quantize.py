"""Post-training int8 quantization in onnxruntime, chosen by measurement on the CPU it runs on.

The obvious call (`quantize_static` on a fresh export) often gives a slower model, or one that
silently loses accuracy: which format and types are fast depends on the CPU (VNNI or not), and
without VNNI the 16-bit intermediate sums of U8S8 saturate unless the weights use 7 bits
(reduce_range); on a CPU with AMX, only onnxruntime's int8 GEMM uses it, not the direct
convolution kernels that symmetric weights select. So bmc pre-processes the graph once, quantizes
a short list of recipes that suit this CPU, measures every candidate against the fp32 model in the
same run (speed at each batch size, accuracy on held-out data) and returns the fastest one that is
faster everywhere and within the accuracy budget (the smallest file among those within timing noise
of it), or keeps fp32 and says why. No torch here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import math
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bmc.artifact import sha256_file, write_sidecar_sha256
from bmc.errors import BmcError, UsageError

log = logging.getLogger("bmc")

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
TIMING_ROUNDS = 3
# Speed-ups closer than this are not told apart: rounds of the same model differ by 2-3% here.
SPEED_TIE = 0.03
# Runs per profiled session when choosing each convolution's kernel (route_convolutions_where_faster).
PROFILE_ITERATIONS = 10


@dataclass(frozen=True)
class QuantRecipe:
    """One way to quantize: operator format, activation/weight types, per-channel, 7-bit weights."""

    quant_format: str  # "QDQ" or "QOperator"
    activation_type: str  # "uint8" or "int8"
    weight_type: str
    per_channel: bool = True
    reduce_range: bool = False
    gemm_convolutions: bool = False  # see route_convolutions_to_gemm

    @property
    def name(self) -> str:
        types = ("U8" if self.activation_type == "uint8" else "S8") + ("U8" if self.weight_type == "uint8" else "S8")
        return (
            f"{self.quant_format}-{types}"
            + ("-per-channel" if self.per_channel else "")
            + ("-reduce-range" if self.reduce_range else "")
            + ("-gemm-conv" if self.gemm_convolutions else "")
        )


def candidate_recipes(cpu_flags: list[str] | tuple[str, ...]) -> list[QuantRecipe]:
    """The recipes worth trying on a CPU with these flags, most promising first.

    Measured on resnet20 (BENCHMARKS.md): with VNNI/AMX, QDQ U8S8 and QOperator U8U8 per-channel
    run 1.4x (batch 1) and 1.9x (batch 32) faster than fp32 while QOperator U8S8 is 2x slower at
    batch 32 and S8S8 is 2-25x slower; reduce_range kept accuracy (86.58% against 86.42%).
    Without VNNI (the issue's anchors): QOperator U8S8 per-channel with reduce_range is the fast
    and accurate one (1.45x / 1.71x, no accuracy loss), QDQ U8S8 next. With AMX, one more: the
    convolutions routed to onnxruntime's int8 GEMM, the only kernel of its that uses AMX tiles
    (route_convolutions_to_gemm).
    """
    if any(flag in cpu_flags for flag in VNNI_FLAGS):
        recipes = [
            QuantRecipe("QDQ", "uint8", "int8", reduce_range=True),
            QuantRecipe("QOperator", "uint8", "uint8", reduce_range=True),
            QuantRecipe("QOperator", "uint8", "int8", reduce_range=True),
        ]
        if "amx_int8" in cpu_flags:
            recipes.append(QuantRecipe("QOperator", "uint8", "int8", reduce_range=True, gemm_convolutions=True))
        return recipes
    return [
        QuantRecipe("QOperator", "uint8", "int8", reduce_range=True),
        QuantRecipe("QDQ", "uint8", "int8", reduce_range=True),
        QuantRecipe("QOperator", "uint8", "uint8"),
    ]


@dataclass(frozen=True)
class QuantizeConfig:
    """How to calibrate, what to measure and what a candidate must achieve to be accepted."""

    calib_data: str | None = None  # default: the data set named in the model's metadata
    calib_data_dir: Path | None = None
    calib_samples: int = 512
    calib_method: str = "minmax"
    max_accuracy_drop_points: float = 1.0
    min_speedup: float = 1.0  # the speed guarantee: faster than fp32 at every batch size
    batch_sizes: tuple[int, ...] = (1, 32)
    seconds_per_timing: float = 1.0
    threads: int | None = None
    seed: int = 0
    measure_accuracy: bool = True  # False: speed only (random-weight models, synthetic calibration data)

    def __post_init__(self) -> None:
        if not 1 <= self.calib_samples <= 100_000:
            raise UsageError(f"calib_samples must be in [1, 100000]; got {self.calib_samples}")
        if self.calib_method not in CALIBRATION_METHODS:
            raise UsageError(f"calib_method must be one of {', '.join(CALIBRATION_METHODS)}; got {self.calib_method!r}")
        if not 0 <= self.max_accuracy_drop_points <= 100:
            raise UsageError(f"max_accuracy_drop must be in [0, 100] points; got {self.max_accuracy_drop_points}")
        if not 0 < self.min_speedup <= 1000:
            raise UsageError(f"min_speedup must be in (0, 1000]; got {self.min_speedup}")
        if not 0 < self.seconds_per_timing <= 60:
            raise UsageError(f"seconds_per_timing must be in (0, 60]; got {self.seconds_per_timing}")
        if self.threads is not None and not 1 <= self.threads <= 1024:
            raise UsageError(f"threads must be in [1, 1024]; got {self.threads}")


@dataclass
class Candidate:
    """A quantized model as measured against fp32 in the same run."""

    recipe: str
    path: str
    size_bytes: int
    accuracy: float | None
    accuracy_drop_points: float | None
    speedup: dict[int, float]  # batch size -> fp32 latency / this latency
    latency_ms: dict[int, float]
    accepted: bool = False
    reason: str = ""

    @property
    def mean_speedup(self) -> float:
        """The geometric mean of the speed-ups over the timed batch sizes."""
        return math.prod(self.speedup.values()) ** (1 / len(self.speedup))


@dataclass
class QuantizeResult:
    """What quantization produced: the chosen file (None when fp32 is kept) and every candidate's figures."""

    source: str
    chosen: str | None
    chosen_recipe: str | None
    baseline_accuracy: float | None
    baseline_latency_ms: dict[int, float]
    baseline_size_bytes: int
    candidates: list[Candidate] = field(default_factory=list)
    cpu_flags: list[str] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def judge(candidate: Candidate, config: QuantizeConfig) -> tuple[bool, str]:
    """Accept a candidate only if it is faster than fp32 at every batch size and within the accuracy budget."""
    slow = {b: s for b, s in candidate.speedup.items() if not s >= config.min_speedup}
    if slow:
        worst = min(slow, key=slow.get)
        return False, f"not faster than fp32: {slow[worst]:.2f}x at batch {worst} (needs {config.min_speedup:g}x)"
    if candidate.accuracy_drop_points is not None and candidate.accuracy_drop_points > config.max_accuracy_drop_points:
        return False, f"loses {candidate.accuracy_drop_points:.2f} points (budget {config.max_accuracy_drop_points:g})"
    return True, "faster everywhere and within the accuracy budget"


def choose_candidate(accepted: list[Candidate]) -> Candidate | None:
    """The fastest accepted candidate (geometric mean of its speed-ups), except that among those
    within SPEED_TIE of it the smallest file wins: closer than that is timing noise on a shared
    machine, while size is exact (resnet20 pruned: three recipes at 1.68-1.69x, QDQ chosen by 0.5%
    at 162.8 kB where QOperator's 148.1 kB was as fast)."""
    if not accepted:
        return None
    fastest = max(c.mean_speedup for c in accepted)
    near = [c for c in accepted if c.mean_speedup >= fastest * (1 - SPEED_TIE)]
    return min(near, key=lambda c: (c.size_bytes, c.accuracy_drop_points or 0.0, -c.mean_speedup))


def quantize_int8(model_path: Path, out_dir: Path, config: QuantizeConfig, baseline_path: Path | None = None) -> QuantizeResult:
    """Quantize model_path to int8 by the best measured recipe; writes out_dir/model-int8.onnx when one is accepted.

    Speed and accuracy are judged against baseline_path (default: model_path itself); quantization-aware
    fine-tuning passes the original model here, so its budget is the original's accuracy.
    """
    from bmc.environment import cpu_info

    model_path = Path(model_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / ".quantize"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        prepared, input_name, calibration, data_name = _prepare(model_path, config, work)
        flags = cpu_info()["flags"]
        paths = []
        for recipe in candidate_recipes(flags):
            path = work / f"int8-{recipe.name}.onnx"
            routed = quantize_with_recipe(
                prepared, path, recipe, input_name, calibration, config.calib_method,
                ranges_cache=_ranges_file(work, config.calib_method), batch_sizes=config.batch_sizes, threads=config.threads,
            )
            if recipe.gemm_convolutions and not routed:
                continue  # no convolution ran faster as a GEMM: the same file as the recipe without it
            paths.append((recipe, path))

        reference = Path(baseline_path) if baseline_path is not None else model_path
        candidates, baseline, base_ms = _measure(reference, [(r.name, p) for r, p in paths], config, data_name)
        fallback_note = ""
        if not any(c.accepted for c in candidates) and config.measure_accuracy:
            more, fallback_note = _accuracy_fallback(
                reference, prepared, {r.name: r for r, _ in paths}, candidates, input_name, calibration, work, config, data_name
            )
            candidates.extend(more)
        base_accuracy = baseline.quality.accuracy if baseline.quality else None
        accepted = [c for c in candidates if c.accepted]
        chosen = choose_candidate(accepted)
        chosen_path = None
        if chosen is not None:
            chosen_path = out_dir / "model-int8.onnx"
            os.replace(chosen.path, chosen_path)
            write_sidecar_sha256(chosen_path, sha256_file(chosen_path))
            note = f"int8 by {chosen.recipe}: " + ", ".join(f"{s:.2f}x at batch {b}" for b, s in chosen.speedup.items())
        else:
            note = "kept fp32: no int8 recipe was faster at every batch size within the accuracy budget"
        if fallback_note:
            note += f" ({fallback_note})"
        for candidate in candidates:
            candidate.path = str(chosen_path) if candidate is chosen else ""
        return QuantizeResult(
            source=str(model_path),
            chosen=str(chosen_path) if chosen_path else None,
            chosen_recipe=chosen.recipe if chosen else None,
            baseline_accuracy=base_accuracy,
            baseline_latency_ms={b: round(ms, 4) for b, ms in base_ms.items()},
            baseline_size_bytes=baseline.facts.size_bytes,
            candidates=candidates,
            cpu_flags=flags,
            calibration={"data": data_name, "samples": sum(len(b) for b in calibration), "method": config.calib_method},
            note=note,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def quantize_like(model_path: Path, target: Path, recipe_name: str, config: QuantizeConfig) -> Path | None:
    """model_path quantized by the named recipe with config's calibration, no candidates and no
    judging: a reference to compare a result with. None when the name is no plain recipe."""
    # candidate_recipes branches on VNNI alone: these two lists hold every recipe bmc can choose.
    recipes = {r.name: r for flags in ((), VNNI_FLAGS) for r in candidate_recipes(flags)}
    if recipe_name not in recipes:
        return None
    work = target.parent / f".{target.stem}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        prepared, input_name, calibration, _ = _prepare(Path(model_path), config, work)
        quantize_with_recipe(
            prepared, work / "quantized.onnx", recipes[recipe_name], input_name, calibration, config.calib_method,
            batch_sizes=config.batch_sizes, threads=config.threads,
        )
        os.replace(work / "quantized.onnx", target)
        write_sidecar_sha256(target, sha256_file(target))
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _prepare(model_path: Path, config: QuantizeConfig, work: Path):
    """(the pre-processed model in work, its input name, calibration batches, the data set's name)."""
    calibration, input_name, data_name = calibration_inputs(model_path, config)
    prepared = _pre_process(model_path, work / "preprocessed.onnx")
    _check_finite_outputs(prepared, input_name, calibration[0], model_path)
    return prepared, input_name, calibration, data_name


def calibration_inputs(model_path: Path, config: QuantizeConfig) -> tuple[list[np.ndarray], str, str]:
    """config.calib_samples training samples of the model's data set (or config.calib_data), preprocessed
    as model_path expects, in batches; the model's input name; the data set's name."""
    from bmc.bench.accuracy import load_eval_dataset, plan_preprocessing
    from bmc.runtime.model_file import open_model
    from bmc.runtime.metadata import ModelMetadata

    model = open_model(model_path)
    metadata = ModelMetadata.from_props(model.metadata_props)
    data_name = config.calib_data or metadata.dataset
    if not data_name:
        raise UsageError(f"{model_path} names no data set in its metadata; pass --calib-data NAME")
    shape = tuple(d if isinstance(d, int) and d > 0 else 0 for d in model.inputs[0].shape[1:]) if model.inputs else ()
    model_shape = tuple(metadata.input_shape) or shape
    dataset = load_eval_dataset(data_name, config.calib_data_dir, metadata, model_shape)
    plan = plan_preprocessing(str(model_path), metadata, model_shape, dataset)
    return calibration_batches(dataset, plan, config.calib_samples, config.seed), model.inputs[0].name, data_name


def _measure(model_path: Path, labelled: list[tuple[str, Path]], config: QuantizeConfig, data_name: str):
    """Bench fp32 and every labelled int8 file in one run; (judged candidates, fp32's result, fp32's best latencies)."""
    from bmc.bench import BenchConfig, bench_rounds

    report, best_ms = bench_rounds(
        [model_path, *(path for _, path in labelled)],
        BenchConfig(
            batch_sizes=config.batch_sizes,
            seconds=config.seconds_per_timing / TIMING_ROUNDS,
            threads=config.threads,
            data=data_name if config.measure_accuracy else None,
            data_dir=config.calib_data_dir,
        ),
        TIMING_ROUNDS,
    )
    baseline = report.models[0]
    base_accuracy = baseline.quality.accuracy if baseline.quality else None
    candidates = []
    for index, (label, path) in enumerate(labelled, start=1):
        measured = report.models[index]
        accuracy = measured.quality.accuracy if measured.quality else None
        candidate = Candidate(
            recipe=label,
            path=str(path),
            size_bytes=path.stat().st_size,
            accuracy=accuracy,
            accuracy_drop_points=round(100 * (base_accuracy - accuracy), 4) if None not in (accuracy, base_accuracy) else None,
            speedup={b: round(best_ms[0][b] / best_ms[index][b], 3) for b in best_ms[index] if b in best_ms[0]},
            latency_ms={b: round(ms, 4) for b, ms in best_ms[index].items()},
        )
        candidate.accepted, candidate.reason = judge(candidate, config)
        candidates.append(candidate)
    return candidates, baseline, best_ms[0]


def lost_on_accuracy_only(result: QuantizeResult, config: QuantizeConfig) -> bool:
    """No candidate accepted, but one was fast enough and failed only the accuracy budget."""
    return result.chosen is None and any(
        _fast_enough(c, config) and c.accuracy_drop_points > config.max_accuracy_drop_points for c in result.candidates
    )


def _fast_enough(candidate: Candidate, config: QuantizeConfig) -> bool:
    """Meets the speed guarantee and has a measured accuracy to judge."""
    return candidate.accuracy_drop_points is not None and all(v >= config.min_speedup for v in candidate.speedup.values())


# Sensitive layers kept in float, tried in this order until one meets the budget.
FALLBACK_FLOAT_LAYERS = (1, 2, 4, 8)


def _accuracy_fallback(model_path, prepared, recipes, candidates, input_name, calibration, work, config, data_name):
    """When every recipe fast enough loses too much accuracy: the fastest one again with another
    calibration method, and with its most sensitive layers left in float. Returns (new candidates, note)."""
    fast_enough = [c for c in candidates if _fast_enough(c, config)]
    if not fast_enough:
        return [], ""
    best = max(fast_enough, key=lambda c: c.mean_speedup)
    recipe = recipes[best.recipe]
    labelled = []
    other_method = "percentile" if config.calib_method != "percentile" else "entropy"
    path = work / f"int8-{recipe.name}-{other_method}.onnx"
    try:
        quantize_with_recipe(
            prepared, path, recipe, input_name, calibration, other_method,
            ranges_cache=_ranges_file(work, other_method), batch_sizes=config.batch_sizes, threads=config.threads,
        )
        labelled.append((f"{recipe.name}, {other_method} calibration", path))
    except BmcError as exc:
        log.info("%s", exc)
    ranked = sensitive_nodes(prepared, recipe, input_name, calibration, work, config.calib_method)
    for count in FALLBACK_FLOAT_LAYERS:
        if count > len(ranked):
            break
        excluded = tuple(name for name, _ in ranked[:count])
        path = work / f"int8-{recipe.name}-float{count}.onnx"
        quantize_with_recipe(
            prepared, path, recipe, input_name, calibration, config.calib_method, excluded,
            _ranges_file(work, config.calib_method), batch_sizes=config.batch_sizes, threads=config.threads,
        )
        labelled.append((f"{recipe.name}, {count} sensitive layer{'s' if count > 1 else ''} in float: {', '.join(excluded)}", path))
    if not labelled:
        return [], ""
    more, _, _ = _measure(model_path, labelled, config, data_name)
    scanned = ", ".join(f"{name} {drop:.1f} dB" for name, drop in ranked[:4])
    return more, f"accuracy fallback on {recipe.name}: {other_method} calibration and up to {len(labelled) - 1} sensitivity-ranked layer sets in float; most sensitive: {scanned}"


QUANTIZABLE_OPS = ("Conv", "MatMul", "Gemm")


def sensitive_nodes(prepared: Path, recipe: QuantRecipe, input_name: str, calibration, work: Path, method: str) -> list[tuple[str, float]]:
    """Quantizable nodes ranked by the signal-to-noise ratio they lose locally once quantized, worst first.

    One QDQ model of the recipe's types and the float model run on a few calibration batches;
    onnxruntime's qdq_loss_debug matches every tensor's activations between the two. A node's
    damage is the SQNR (dB, against the float model) of its input minus that of its output: the
    noise this node adds, not what it inherited from the layers before it.
    """
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    per_sample = int(np.prod(calibration[0].shape[1:]))
    samples = int(min(64, max(4, 2_000_000 // max(1, per_sample))))
    batches = [np.concatenate(calibration)[:samples]]
    qdq = work / "scan-qdq.onnx"
    # compact=False: onnxruntime's activation matching reads the quantizer's own names.
    quantize_with_recipe(prepared, qdq, dataclasses.replace(recipe, quant_format="QDQ", gemm_convolutions=False), input_name, batches, method, compact=False)
    activations = {}
    for name, path in (("float", prepared), ("qdq", qdq)):
        augmented = work / f"scan-{name}-augmented.onnx"
        modify_model_output_intermediate_tensors(str(path), str(augmented))
        activations[name] = collect_activations(str(augmented), _reader(input_name, batches), execution_providers=["CPUExecutionProvider"])
    errors = compute_activation_error(create_activation_matching(activations["qdq"], activations["float"]))
    del activations

    def sqnr(tensor: str) -> float | None:
        value = errors.get(tensor, {}).get("xmodel_err")
        if value is None:
            return None
        return min(float(value), 100.0) if math.isfinite(value) else 100.0  # identical tensors: infinite SQNR

    graph = onnx.load(str(prepared), load_external_data=False).graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    ranked = []
    for node in graph.node:
        if node.op_type not in QUANTIZABLE_OPS or not node.name:
            continue
        before = sqnr(node.input[0])
        tensor, after = node.output[0], sqnr(node.output[0])
        while after is None and len(consumers.get(tensor, [])) == 1 and consumers[tensor][0].op_type in ("Relu", "Clip", "Add"):
            tensor = consumers[tensor][0].output[0]  # fused activations: the quantized tensor is further on
            after = sqnr(tensor)
        if after is not None:
            ranked.append((node.name, round((100.0 if before is None else before) - after, 3)))
    return sorted(ranked, key=lambda item: item[1], reverse=True)


def _pre_process(source: Path, target: Path) -> Path:
    """onnxruntime's quant_pre_process: shape inference and graph fusion, so int8 kernels actually run.

    Its symbolic shape inference fails on some exports (a Transformer encoder among them); the
    ONNX shape inference alone then still gives the quantizer what it needs.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(source), str(target))
    except Exception:  # onnxruntime raises plain Exceptions from its symbolic shape inference
        log.info("symbolic shape inference failed on %s; pre-processing without it", source.name)
        try:
            quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
        except Exception as exc:
            raise BmcError(f"{source}: onnxruntime's quantization pre-processing failed: {_first_line(exc)}") from None
    return target


def calibration_batches(dataset, plan, samples: int, seed: int, batch: int = 32) -> list[np.ndarray]:
    """`samples` training samples, drawn with `seed` and preprocessed as the model expects, in batches."""
    from bmc.runtime.preprocess import preprocess

    count = min(samples, len(dataset.train_x))
    chosen = np.sort(np.random.default_rng(seed).choice(len(dataset.train_x), size=count, replace=False))
    return [preprocess(dataset.train_x[chosen[i : i + batch]], plan) for i in range(0, count, batch)]


def _equal_batches(batches: list[np.ndarray]) -> list[np.ndarray]:
    """The same samples in batches of one size: onnxruntime's histogram calibrators (entropy,
    percentile) stack every batch's outputs into one array, which fails on a shorter last batch."""
    if len({len(b) for b in batches}) <= 1:
        return batches
    samples = np.concatenate(batches)
    size = max(d for d in range(1, len(batches[0]) + 1) if len(samples) % d == 0)
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def _reader(input_name: str, batches):
    """onnxruntime's calibration reader over our batches; len and set_range let it calibrate in strides."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.position, self.end = 0, len(batches)

        def __len__(self) -> int:
            return len(batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.position, self.end = start_index, min(end_index, len(batches))

        def get_next(self):
            if self.position >= self.end:
                return None
            self.position += 1
            return {input_name: batches[self.position - 1]}

    return Reader()


def quantize_with_recipe(
    source: Path,
    target: Path,
    recipe: QuantRecipe,
    input_name: str,
    batches,
    method: str,
    nodes_to_exclude: tuple[str, ...] = (),
    ranges_cache: Path | None = None,
    compact: bool = True,
    batch_sizes: tuple[int, ...] = (1, 32),
    threads: int | None = None,
) -> list[str]:
    """onnxruntime's quantize_static with one recipe, calibrated on `batches`; excluded nodes stay in float.
    Returns the convolutions routed to the GEMM kernels (recipe.gemm_convolutions; else none).

    ranges_cache, a JSON file, keeps the calibrated ranges of `source` for the next recipe: they
    depend on the model, data and method only, so calibration runs once per method, not per recipe.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    # onnxruntime's calibrators keep every intermediate tensor of every batch until the end (9.8 GB
    # for 256 samples of seed-cnn224); min-max in strides of one batch merges ranges as it goes,
    # with identical results.
    extra_options = {"CalibStridedMinMax": 1} if method == "minmax" else {}
    cache = {}
    if ranges_cache is not None and "calibration_cache_path" in inspect.signature(quantize_static).parameters:
        cache = {"calibration_cache_path": str(ranges_cache)}
    try:
        # Its histogram calibrators print their settings to stdout; bmc's output stays bmc's.
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(source),
                str(target),
                _reader(input_name, batches if method == "minmax" else _equal_batches(batches)),
                nodes_to_exclude=list(nodes_to_exclude),
                quant_format=QuantFormat.QDQ if recipe.quant_format == "QDQ" else QuantFormat.QOperator,
                per_channel=recipe.per_channel,
                reduce_range=recipe.reduce_range,
                activation_type=types[recipe.activation_type],
                weight_type=types[recipe.weight_type],
                calibrate_method={
                    "minmax": CalibrationMethod.MinMax,
                    "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile,
                }[method],
                extra_options=extra_options,
                **cache,
            )
    except Exception as exc:  # onnxruntime's quantizer raises many types
        raise BmcError(f"{source.name}: int8 quantization ({recipe.name}) failed: {_first_line(exc)}") from None
    routed = route_convolutions_where_faster(target, batch_sizes, threads) if recipe.gemm_convolutions else []
    if compact:
        compact_constants(target)
    return routed


def route_convolutions_to_gemm(path: Path, only: set[str] | None = None) -> list[str]:
    """Rewrite each int8 convolution with symmetric int8 weights (zero point 0, group 1) to the same
    weights minus one and a zero point of -1: the same dequantized values, bit for bit, but
    onnxruntime then runs the convolution through its int8 GEMM instead of its direct symmetric
    convolution kernels, and on a CPU with AMX only the GEMM uses AMX tiles. Depthwise and grouped
    convolutions keep zero points of 0: their kernels have no GEMM form and the fallback is 20x
    slower. `only`: the names of the nodes to rewrite (default: every one that can be). Returns
    the names of the nodes rewritten.
    """
    import onnx
    from onnx import numpy_helper

    from bmc.artifact import atomic_write_bytes

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    constants = {c.name: c for c in graph.initializer if c.data_location != onnx.TensorProto.EXTERNAL}
    producers = {output: node for node in graph.node for output in node.output}
    users = Counter(name for node in graph.node for name in node.input)
    rewritten = []
    for node in graph.node:
        if next((a.i for a in node.attribute if a.name == "group"), 1) != 1 or (only is not None and node.name not in only):
            continue
        if node.op_type == "QLinearConv" and len(node.input) > 5:
            weights, zero_point = node.input[3], node.input[5]
        elif node.op_type == "Conv" and getattr(producers.get(node.input[1]), "op_type", "") == "DequantizeLinear":
            dequantize = producers[node.input[1]]
            if len(dequantize.input) < 3:
                continue
            weights, zero_point = dequantize.input[0], dequantize.input[2]
        else:
            continue
        if weights not in constants or zero_point not in constants or users[weights] > 1 or users[zero_point] > 1:
            continue  # a shared constant would change under another node too
        values = numpy_helper.to_array(constants[weights])
        zeros = numpy_helper.to_array(constants[zero_point])
        if values.dtype != np.int8 or zeros.any() or values.size == 0 or values.min() < -127:
            continue
        constants[weights].CopyFrom(numpy_helper.from_array((values.astype(np.int16) - 1).astype(np.int8), weights))
        constants[zero_point].CopyFrom(numpy_helper.from_array(np.full(zeros.shape, -1, np.int8), zero_point))
        rewritten.append(node.name)
    if rewritten:
        atomic_write_bytes(path, model.SerializeToString())
    return rewritten


def route_convolutions_where_faster(path: Path, batch_sizes: tuple[int, ...] = (1, 32), threads: int | None = None) -> list[str]:
    """Route to onnxruntime's int8 GEMM only the convolutions that run faster there, by the kernel
    times of one profiled session of each form at each batch size; returns the routed nodes' names.

    Which form wins depends on the layer's shape: with AMX on this Xeon (BENCHMARKS.md), every
    convolution routed made torchvision resnet18 at 224 px 4.1x faster than fp32 at batch 32
    instead of 2.9x, but mobilenet_v2's 1x1 convolutions and resnet20's 16-64 channel ones slower.
    """
    import re

    from bmc.bench.profile import node_times_ms

    everywhere = path.with_name(f".{path.stem}-gemm{path.suffix}")
    shutil.copyfile(path, everywhere)
    try:
        candidates = route_convolutions_to_gemm(everywhere)
        gain = dict.fromkeys(candidates, 0.0)
        for batch in batch_sizes if candidates else ():
            direct = node_times_ms(path, batch, PROFILE_ITERATIONS, threads)
            gemm = node_times_ms(everywhere, batch, PROFILE_ITERATIONS, threads)
            total = sum(direct.values()) or 1.0
            for kernel, ms in direct.items():
                # onnxruntime's layout pass renames "/conv1/Conv_quant" to "/conv1/Conv_quant_token_3".
                node = re.sub(r"_token_\d+$", "", kernel)
                if node in gain and kernel in gemm:
                    gain[node] += (ms - gemm[kernel]) / total
    finally:
        everywhere.unlink(missing_ok=True)
    faster = {node for node, share in gain.items() if share > 0}
    return route_convolutions_to_gemm(path, only=faster) if faster else []


def compact_constants(path: Path) -> None:
    """Rewrite an ONNX file without the bytes that are neither weights nor structure: the shapes
    inferred for pre-processing (value_info, which onnxruntime infers again) and the quantizer's long
    names for constants ("/layers/layers.0/conv1/Conv_output_0_zero_point", one per scale, zero point
    and weight), renamed c0, c1, ... Node and activation names stay, so profiles still name layers.

    On resnet20 those bytes were 5% of the int8 file (304.6 against 289.8 kB): 3.60x smaller than
    fp32 before, 3.79x after, where 4x is the limit of one byte per weight.
    """
    import onnx

    from bmc.artifact import atomic_write_bytes

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    if any(c.data_location == onnx.TensorProto.EXTERNAL for c in graph.initializer):
        return  # weights beside the file (over 2 GB): the names are a rounding error there
    del graph.value_info[:]
    # A subgraph (If, Loop) may name an outer constant: renaming is only safe without any.
    has_subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute)
    if not has_subgraphs:
        interface = {v.name for v in (*graph.input, *graph.output)}
        taken = interface | {c.name for c in graph.initializer} | {name for node in graph.node for name in node.output}
        renamed = {}
        for index, constant in enumerate(graph.initializer):
            short = f"c{index}"
            if constant.name not in interface and short not in taken:
                renamed[constant.name] = short
                constant.name = short
        for node in graph.node:
            node.input[:] = [renamed.get(name, name) for name in node.input]
    atomic_write_bytes(path, model.SerializeToString())


def _ranges_file(work: Path, method: str) -> Path:
    return work / f"ranges-{method}.json"


def _check_finite_outputs(model_path: Path, input_name: str, batch: np.ndarray, shown: Path) -> None:
    """Calibration on NaN activations fails deep inside the quantizer ('scale issue'): say what is wrong instead."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {input_name: batch[:8]})
    if not all(np.isfinite(out).all() for out in outputs if np.issubdtype(out.dtype, np.floating)):
        raise BmcError(f"{shown}: the model's outputs on calibration samples are not finite (NaN or inf): its weights are broken, "
                       "for instance by a diverged training; nothing to quantize")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
