"""What int8 is calibrated on: a model pre-processed once, and training samples preprocessed as it expects."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bmc.compress.quantize.config import QuantizeConfig
from bmc.errors import BmcError, UsageError

log = logging.getLogger("bmc")


@dataclass(frozen=True)
class Calibration:
    """A model ready to quantize and the samples its activation ranges are measured on."""

    model: Path  # pre-processed by prepare(); as given by calibration_inputs()
    input_name: str
    batches: tuple[np.ndarray, ...]
    data: str  # the data set the samples come from
    method: str = "minmax"
    # Calibrated ranges depend on the model, the samples and the method only: kept here per method,
    # calibration runs once per method rather than once per recipe. None: not kept.
    cache_dir: Path | None = None

    @property
    def samples(self) -> int:
        return sum(len(b) for b in self.batches)

    @property
    def ranges_file(self) -> Path | None:
        return self.cache_dir / f"ranges-{self.method}.json" if self.cache_dir is not None else None

    def using(self, **changes) -> Calibration:
        """The same calibration with some fields changed (another method, fewer batches, no cache)."""
        return dataclasses.replace(self, **changes)


def calibration_inputs(model_path: Path, config: QuantizeConfig) -> Calibration:
    """config.calib_samples training samples of the model's data set (or config.calib_data: a data
    set, or files: images, npy), preprocessed as model_path expects, in batches; the model itself
    is not pre-processed."""
    from bmc.bench.accuracy import load_eval_dataset, plan_preprocessing
    from bmc.compress.quantize import sources
    from bmc.runtime.metadata import ModelMetadata
    from bmc.runtime.model_file import open_model

    model = open_model(model_path)
    metadata = ModelMetadata.from_props(model.metadata_props)
    data_name = config.calib_data or metadata.dataset
    if not data_name:
        raise UsageError(f"{model_path} names no data set in its metadata; pass --calib-data NAME")
    dims = tuple(model.inputs[0].shape[1:]) if model.inputs else ()
    shape = tuple(d if isinstance(d, int) and d > 0 else 0 for d in dims)
    model_shape = tuple(metadata.input_shape) or shape
    if data_name == "npy":
        arrays = sources.inspect_npy(config.calib_data_dir, tuple(metadata.input_shape) or dims, str(model_path))
        batches = sources.npy_batches(arrays, config.calib_samples, config.seed)
    elif data_name == "images":
        batches = sources.image_batches(config.calib_data_dir, model_shape, metadata.normalization, config.calib_samples, config.seed, str(model_path))
    else:
        dataset = load_eval_dataset(data_name, config.calib_data_dir, metadata, model_shape)
        plan = plan_preprocessing(str(model_path), metadata, model_shape, dataset)
        batches = calibration_batches(dataset, plan, config.calib_samples, config.seed)
    return Calibration(Path(model_path), model.inputs[0].name, tuple(batches), data_name, config.calib_method)


def prepare(model_path: Path, config: QuantizeConfig, work: Path) -> Calibration:
    """model_path pre-processed into work (ranges cached there too) with its calibration samples,
    checked to give finite outputs on them."""
    calibration = calibration_inputs(model_path, config)
    prepared = pre_process(Path(model_path), work / "preprocessed.onnx")
    _check_finite_outputs(prepared, calibration.input_name, calibration.batches[0], model_path)
    return calibration.using(model=prepared, cache_dir=work)


def calibration_batches(dataset, plan, samples: int, seed: int, batch: int = 32) -> list[np.ndarray]:
    """`samples` training samples, drawn with `seed` and preprocessed as the model expects, in batches."""
    from bmc.runtime.preprocess import preprocess

    count = min(samples, len(dataset.train_x))
    chosen = np.sort(np.random.default_rng(seed).choice(len(dataset.train_x), size=count, replace=False))
    return [preprocess(dataset.train_x[chosen[i : i + batch]], plan) for i in range(0, count, batch)]


def pre_process(source: Path, target: Path) -> Path:
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
            raise BmcError(f"{source}: onnxruntime's quantization pre-processing failed: {first_line(exc)}") from None
    return target


def reader(calibration: Calibration):
    """onnxruntime's calibration reader over the batches; len and set_range let it calibrate in strides."""
    from onnxruntime.quantization import CalibrationDataReader

    batches = calibration.batches if calibration.method == "minmax" else _equal_batches(calibration.batches)
    input_name = calibration.input_name

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


def _equal_batches(batches) -> list[np.ndarray]:
    """The same samples in batches of one size: onnxruntime's histogram calibrators (entropy,
    percentile) stack every batch's outputs into one array, which fails on a shorter last batch."""
    if len({len(b) for b in batches}) <= 1:
        return list(batches)
    samples = np.concatenate(batches)
    size = max(d for d in range(1, len(batches[0]) + 1) if len(samples) % d == 0)
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def _check_finite_outputs(model_path: Path, input_name: str, batch: np.ndarray, shown: Path) -> None:
    """Calibration on NaN activations fails deep inside the quantizer ('scale issue'): say what is wrong instead."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {input_name: batch[:8]})
    if not all(np.isfinite(out).all() for out in outputs if np.issubdtype(out.dtype, np.floating)):
        raise BmcError(f"{shown}: the model's outputs on calibration samples are not finite (NaN or inf): its weights are broken, "
                       "for instance by a diverged training; nothing to quantize")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
