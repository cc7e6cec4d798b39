"""bmc compress on ONNX files bmc did not write: every calibration source, the preprocessing the
flags give (or that is assumed, and said), accuracy only where labels fit the model, the metadata
written for bench and serve, and each bad input as one line.

The foreign models are small CNNs exported by plain torch.onnx.export, as torchvision or Hugging
Face users export theirs: no bmc metadata. Timing decisions are forced (min_speedup 0.01 accepts
every candidate) so that each test holds on any CPU.
"""

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from bmc.bench import BenchConfig, bench
from bmc.bench.accuracy import GIVEN_BY, load_eval_dataset, plan_preprocessing
from bmc.compress import CompressConfig, InputsResult, QuantizeConfig, QuantizeResult, compress
from bmc.compress.quantize.config import InputPreprocessing
from bmc.data.images import fitted_size, read_image, read_images
from bmc.errors import BmcError, DataError, UsageError
from bmc.runtime.metadata import ModelMetadata
from bmc.runtime.model_file import open_model

from conftest import assert_one_line_error, run_bmc

# One target: these tests are about inputs and calibration (the search over runtimes: test_compress_runtimes.py).
QUICK = QuantizeConfig(calib_samples=64, seconds_per_timing=0.2, min_speedup=0.01, max_accuracy_drop_points=100, runtimes=("onnxruntime",), threads=1)
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


class SmallCNN(torch.nn.Module):
    """A torchvision-like classifier: convolution, batch norm, ReLU, a strided stage, pooling, a linear head."""

    def __init__(self, classes: int, channels: int = 3) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        )
        self.fc = torch.nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


def export_foreign(path: Path, classes: int, channels: int = 3, size: int = 32, dynamic_size: bool = False) -> Path:
    """A plain torch.onnx.export, no bmc metadata; dynamic_size: height and width dynamic, as Hugging Face exports them."""
    torch.manual_seed(classes)
    axes = {"pixel_values": {0: "batch", **({2: "height", 3: "width"} if dynamic_size else {})}, "logits": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation: still what most users export with
        torch.onnx.export(SmallCNN(classes, channels).eval(), torch.randn(1, channels, size, size), str(path), dynamo=False,
                          input_names=["pixel_values"], output_names=["logits"], dynamic_axes=axes, opset_version=17)
    return path


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Path:
    """A folder of foreign models: cnn1000.onnx, cnn5.onnx, dynamic1000.onnx (any image size), gray5.onnx (one channel), four.onnx (four channels)."""
    root = tmp_path_factory.mktemp("foreign")
    export_foreign(root / "cnn1000.onnx", 1000)
    export_foreign(root / "cnn5.onnx", 5)
    export_foreign(root / "dynamic1000.onnx", 1000, dynamic_size=True)
    export_foreign(root / "gray5.onnx", 5, channels=1)
    export_foreign(root / "four.onnx", 5, channels=4)
    for model in root.glob("*.onnx"):
        assert not ModelMetadata.from_props(open_model(model).metadata_props).bmc_version  # really foreign
    return root


def write_images(folder: Path, count: int, seed: int = 0) -> Path:
    """count images of varied sizes and modes (RGB, grayscale, RGBA, palette), nested, with a stripe
    per class so that a folder of them has something to learn."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index in range(count):
        width, height = (int(v) for v in rng.integers(12, 70, size=2))
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert(("RGB", "L", "RGBA", "P")[index % 4])
        target = folder / ("nested/deeper" if index % 3 == 0 else "") / f"image{index}.{'png' if index % 2 else 'jpg'}"
        target.parent.mkdir(parents=True, exist_ok=True)
        image.convert("RGB").save(target) if target.suffix == ".jpg" else image.save(target)
    return folder


def labelled_folder(root: Path, classes: int = 5, per_class: tuple[int, int] = (8, 4)) -> Path:
    """root/train/<class>/*.png and root/test/<class>/*.png, made with Pillow."""
    for split, count in zip(("train", "test"), per_class):
        for label in range(classes):
            write_images(root / split / f"class{label}", count, seed=label * 100 + len(split))
    return root


def _inputs(report) -> InputsResult:
    found = report.stage(InputsResult)
    assert found is not None, [type(s).__name__ for s in report.stages]
    return found


def _metadata(path: Path) -> ModelMetadata:
    return ModelMetadata.from_props(open_model(path).metadata_props)


# ---- each calibration source, end to end ---------------------------------------------------------


def test_an_image_folder_scores_the_model_when_its_classes_are_the_outputs_and_the_preprocessing_travels(foreign, workdir):
    folder = labelled_folder(workdir / "five")
    config = CompressConfig(source=foreign / "cnn5.onnx", out=workdir / "c", quantization=dataclasses.replace(
        QUICK, calib_data="imagefolder", calib_data_dir=folder, preprocessing=InputPreprocessing(mean=(0.5,), std=(0.25,))))
    report = compress(config)
    inputs = _inputs(report)
    assert inputs.accuracy_measured and inputs.class_names == tuple(f"class{i}" for i in range(5)) and report.accuracy_not_measured == ""
    quantized = report.stage(QuantizeResult)
    assert quantized.baseline_accuracy is not None and all(c.accuracy_drop_points is not None for c in quantized.candidates)
    assert report.summary[0].accuracy is not None and not any(n.startswith("accuracy not measured") for n in report.notes)
    # The preprocessing given travels in the metadata of every file handed over: the fp32 copy and the int8 result.
    assert report.result.name == "model-int8.onnx" and inputs.model == workdir / "c" / "model.onnx"
    for path in (inputs.model, report.result):
        metadata = _metadata(path)
        assert metadata.normalization["mean"] == [0.5] * 3 and metadata.normalization["std"] == [0.25] * 3
        assert metadata.normalization["scale"] == pytest.approx(1 / 255) and metadata.normalization[GIVEN_BY]
        assert metadata.input_shape == metadata.data_input_shape == (3, 32, 32) and metadata.class_names == inputs.class_names
    assert (workdir / "c" / "model.onnx.sha256").is_file()  # serve verifies what it serves
    written = json.loads((workdir / "c" / "compress_report.json").read_text())
    assert written["stages"][0]["stage"] == "inputs" and written["config"]["quantization"]["preprocessing"]["mean"] == [0.5] * 3
    # bench reads the folder afterwards with the model's own preprocessing, and finds compress's figure.
    later = bench([report.result], BenchConfig(data="imagefolder", data_dir=folder, iters=2))
    assert later.models[0].quality.accuracy == pytest.approx(report.summary[-1].accuracy)


def test_an_image_folder_whose_classes_are_not_the_outputs_calibrates_only_and_says_so(foreign, workdir, cifar_slice):
    report = compress(CompressConfig(source=foreign / "cnn1000.onnx", out=workdir / "c",
                                     quantization=dataclasses.replace(QUICK, calib_data="imagefolder", calib_data_dir=cifar_slice)))
    inputs = _inputs(report)
    assert not inputs.accuracy_measured and "10 classes" in inputs.accuracy_not_measured and "1000 outputs" in inputs.accuracy_not_measured
    assert report.accuracy_not_measured == inputs.accuracy_not_measured and report.config.quantization.measure_accuracy is False
    assert all(row.accuracy is None for row in report.summary)
    assert all(c.accuracy_drop_points is None for c in report.stage(QuantizeResult).candidates)
    note = next(n for n in report.notes if n.startswith("accuracy not measured"))
    assert "budget (--max-accuracy-drop) was not applied" in note
    # Nothing said how the model takes its inputs: ImageNet's normalization, assumed and said so.
    metadata = _metadata(report.result)
    assert (metadata.normalization["mean"], metadata.normalization["std"]) == IMAGENET and "assumed" in metadata.normalization[GIVEN_BY]
    assert any("assuming ImageNet's mean and std" in n for n in report.notes) and metadata.class_names == ()


def test_unlabeled_images_of_any_size_and_mode_calibrate_a_model_of_any_size(foreign, workdir):
    images = write_images(workdir / "pictures", 24)
    (images / "notes.txt").write_text("not an image: not listed")
    (images / "broken.png").write_bytes(b"\x89PNG not really")  # skipped with a warning
    report = compress(CompressConfig(source=foreign / "dynamic1000.onnx", out=workdir / "c", quantization=dataclasses.replace(
        QUICK, calib_data="images", calib_data_dir=images, preprocessing=InputPreprocessing(input_size=48, mean=(0.5, 0.5, 0.5), std=(0.5,)))))
    inputs = _inputs(report)
    assert inputs.input_shape == (3, 48, 48) and not inputs.accuracy_measured and "carry no labels" in inputs.accuracy_not_measured
    calibration = report.stage(QuantizeResult).calibration
    assert calibration.data == "images" and calibration.samples == 24  # every readable image: 25 drawn, the broken one skipped
    metadata = _metadata(report.result)
    assert metadata.input_shape == (3, 48, 48) and metadata.normalization["std"] == [0.5] * 3
    # The dynamic axes are sized from the metadata: bench times the file handed over without being told.
    assert bench([report.result], BenchConfig(iters=2, batch_sizes=(2,))).models[0].timings[0].batch_size == 2


def test_npy_arrays_in_a_file_or_a_folder_calibrate_as_they_are(foreign, workdir):
    rng = np.random.default_rng(0)
    single = workdir / "inputs.npy"
    np.save(single, rng.standard_normal((40, 3, 32, 32), dtype=np.float32))
    folder = workdir / "arrays"
    (folder / "more").mkdir(parents=True)
    np.save(folder / "a.npy", rng.standard_normal((10, 3, 40, 40)).astype(np.float64))  # float64 is read as float32
    for index in range(3):
        np.save(folder / "more" / f"sample{index}.npy", rng.standard_normal((3, 40, 40), dtype=np.float32))  # one sample each
    first = compress(CompressConfig(source=foreign / "cnn1000.onnx", out=workdir / "a",
                                    quantization=dataclasses.replace(QUICK, calib_data="npy", calib_data_dir=single)))
    assert _inputs(first).input_shape == (3, 32, 32) and first.stage(QuantizeResult).calibration.samples == 40
    assert _inputs(first).normalization == {} and "carry no labels" in first.accuracy_not_measured
    # A model of any image size takes the arrays' size, and records it.
    second = compress(CompressConfig(source=foreign / "dynamic1000.onnx", out=workdir / "b",
                                     quantization=dataclasses.replace(QUICK, calib_data="npy", calib_data_dir=folder)))
    assert second.stage(QuantizeResult).calibration.samples == 13 and _metadata(second.result).input_shape == (3, 40, 40)


def test_synthetic_calibrates_a_bare_1000_class_export_for_speed_only_and_warns(workdir):
    # `bmc export --model ARCH` of an untrained architecture: bmc metadata with placeholder
    # preprocessing, 1000 class_N names and no data set, as the r18.onnx.
    from bmc.export import ExportConfig, export

    source = export(ExportConfig(model="seed-cifar-cnn", input_size=32, num_classes=1000, out=workdir / "bare.onnx", verify_samples=4)).path
    placeholder = _metadata(source)
    assert not placeholder.dataset and len(placeholder.class_names) == 1000
    report = compress(CompressConfig(source=source, out=workdir / "c", quantization=dataclasses.replace(QUICK, calib_data="synthetic")))
    inputs = _inputs(report)
    assert inputs.data == "synthetic" and not inputs.accuracy_measured and "random images" in inputs.accuracy_not_measured
    assert report.stage(QuantizeResult).calibration.data == "synthetic" and all(row.accuracy is None for row in report.summary)
    assert any(n.startswith("int8 is calibrated on random images") for n in report.notes)
    assert _metadata(report.result).class_names == placeholder.class_names  # nothing scored: the names stay as they were


def test_a_foreign_model_with_no_data_named_compresses_on_random_images_and_the_cli_says_accuracy_was_not_measured(foreign, workdir):
    result = run_bmc("compress", str(foreign / "cnn1000.onnx"), "--calib-samples", "32", "-o", "c", "--runtime", "onnxruntime", "--threads", "1",
                     cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "warning: int8 is calibrated on random images" in result.stderr
    assert "note: accuracy not measured: no --calib-data given" in result.stdout and "was not applied" in result.stdout
    assert "inputs: synthetic" in result.stdout
    report = json.loads((workdir / "c" / "compress_report.json").read_text())
    assert report["accuracy_not_measured"].startswith("no --calib-data given") and report["config"]["quantization"]["calib_data"] == "synthetic"


# ---- images as a model takes them ----------------------------------------------------------------


def test_images_have_their_shorter_side_scaled_and_centre_cut_out_exactly_as_torchvision_does(workdir):
    from PIL import Image
    from torchvision import transforms

    rng = np.random.default_rng(1)
    for width, height, size in ((64, 40, 32), (30, 90, 32), (32, 32, 224), (17, 61, 24), (224, 300, 224)):
        path = workdir / f"{width}x{height}.png"
        Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(path)
        ours = read_image(path, 3, (size, size))
        with Image.open(path) as image:
            expected = np.asarray(transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])(image.convert("RGB")))
        assert np.array_equal(ours, expected.transpose(2, 0, 1)), (width, height, size)
    assert fitted_size(100, 50, (20, 40)) == (40, 20) and fitted_size(50, 100, (20, 40)) == (40, 80)  # covers, keeps the aspect


def test_image_modes_are_converted_to_the_model_channels_and_other_counts_refused(workdir):
    from PIL import Image

    gray = workdir / "gray.png"
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(gray)
    rgb = read_image(gray, 3, (16, 16))
    assert rgb.shape == (3, 16, 16) and np.array_equal(rgb[0], rgb[1]) and np.array_equal(rgb[0], rgb[2])
    assert read_image(gray, 1, (16, 16)).shape == (1, 16, 16)
    with pytest.raises(DataError, match="the model takes 4: give its inputs as .npy arrays"):
        read_images([gray], 4, (16, 16))


def test_bench_uses_a_normalization_compress_was_given_but_not_a_bare_export_placeholder(cifar_slice):
    dataset = load_eval_dataset("imagefolder", cifar_slice, ModelMetadata(), (3, 32, 32))
    given = {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3}
    placeholder = plan_preprocessing("m", ModelMetadata(normalization=given), (3, 32, 32), dataset)
    adopted = plan_preprocessing("m", ModelMetadata(normalization={**given, GIVEN_BY: "bmc compress --mean/--std/--scale"}), (3, 32, 32), dataset)
    np.testing.assert_allclose(adopted.multiplier.reshape(-1), [1 / 255 / 0.25] * 3, rtol=1e-6)
    np.testing.assert_allclose(adopted.offset.reshape(-1), [-2.0] * 3, rtol=1e-6)
    assert not np.allclose(placeholder.offset, adopted.offset)  # without a data set or given_by: the folder's own statistics


def test_preprocessing_flags_are_read_as_users_write_them():
    assert InputPreprocessing.from_flags(None, None, None, None) is None
    imagenet = InputPreprocessing.from_flags(224, "imagenet", None, None)
    assert (list(imagenet.mean), list(imagenet.std), imagenet.input_size, imagenet.scale) == (*IMAGENET, 224, None)
    assert InputPreprocessing.from_flags(None, None, "ImageNet", "1").mean == tuple(IMAGENET[0])
    mixed = InputPreprocessing.from_flags(None, "imagenet", "0.5", "1/255")
    assert mixed.std == (0.5,) and mixed.scale == pytest.approx(1 / 255)
    assert InputPreprocessing.from_flags(None, "0.1, 0.2,0.3", None, None).mean == (0.1, 0.2, 0.3)


# ---- bad input: one line each, before the work -----------------------------------------------------


@pytest.fixture
def bad_inputs(workdir) -> Path:
    """Calibration data of each wrong kind, in workdir."""
    (workdir / "empty").mkdir()
    (workdir / "unreadable").mkdir()
    (workdir / "unreadable" / "a.jpg").write_bytes(b"not a jpeg")
    (workdir / "unreadable" / "b.png").write_bytes(b"\x89PNG truncated")
    write_images(workdir / "pictures", 4)
    np.save(workdir / "gray.npy", np.zeros((4, 1, 32, 32), np.float32))
    np.save(workdir / "ints.npy", np.zeros((4, 3, 32, 32), np.int64))
    np.save(workdir / "pixels.npy", np.zeros((4, 3, 32, 32), np.uint8))
    np.save(workdir / "flat.npy", np.zeros((4, 3072), np.float32))
    np.save(workdir / "small.npy", np.zeros((4, 3, 16, 16), np.float32))
    np.save(workdir / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(workdir / "nan.npy", np.full((2, 3, 32, 32), np.nan, np.float32))
    (workdir / "mixed").mkdir()
    np.save(workdir / "mixed" / "a.npy", np.zeros((2, 3, 32, 32), np.float32))
    np.save(workdir / "mixed" / "b.npy", np.zeros((2, 3, 40, 40), np.float32))
    return workdir


BAD_INPUTS = [
    # (model, quantization settings, error type, message fragment)
    ("cnn1000", dict(calib_data="images", calib_data_dir="empty"), DataError, "empty holds no images at any depth"),
    ("cnn1000", dict(calib_data="images", calib_data_dir="unreadable"), DataError, "none of its 2 image files could be read (first: a.jpg"),
    ("cnn1000", dict(calib_data="images", calib_data_dir="nowhere"), DataError, "nowhere: no such directory"),
    ("four", dict(calib_data="images", calib_data_dir="pictures"), DataError, "images decode to 1 (grayscale) or 3 (RGB) channels; four.onnx takes 4"),
    ("gray5", dict(calib_data="imagefolder", calib_data_dir="pictures"), DataError, "an image folder is read in RGB; gray5.onnx takes 1 channel"),
    ("cnn1000", dict(calib_data="npy", calib_data_dir="gray.npy"), DataError, "gray.npy holds samples of shape [N, 1, 32, 32]; cnn1000.onnx takes [N, 3, 32, 32] (1 channel where it takes 3)"),
    ("cnn1000", dict(calib_data="npy", calib_data_dir="small.npy"), DataError, "(16 on axis 2 where it takes 32)"),
    ("cnn1000", dict(calib_data="npy", calib_data_dir="flat.npy"), DataError, "flat.npy holds an array of shape [4, 3072]"),
    ("cnn1000", dict(calib_data="npy", calib_data_dir="ints.npy"), DataError, "ints.npy holds int64 values; --calib-data npy takes preprocessed float inputs"),
    ("cnn1000", dict(calib_data="npy", calib_data_dir="pixels.npy"), DataError, "raw pixels? give the images: --calib-data images"),
    ("cnn1000", dict(calib_data="npy", calib_data_dir="objects.npy"), DataError, "objects.npy: not a readable .npy array"),
    ("cnn1000", dict(calib_data="npy", calib_data_dir="nan.npy"), DataError, "nan.npy holds NaN or infinite values"),
    ("dynamic1000", dict(calib_data="npy", calib_data_dir="mixed"), DataError, "one shape for all"),
    ("cnn1000", dict(calib_data="npy", calib_data_dir="empty"), DataError, "empty holds no .npy files"),
    ("cnn1000", dict(calib_data="images", calib_data_dir="pictures", preprocessing=InputPreprocessing(mean=(0.5, 0.5))), UsageError,
     "--mean has 2 values; cnn1000.onnx takes 3 channels: give 3 (or 1 for all)"),
    ("gray5", dict(calib_data="images", calib_data_dir="pictures", preprocessing=InputPreprocessing(std=IMAGENET[1])), UsageError,
     "--std has 3 values; gray5.onnx takes 1 channel: give 1"),
    ("cnn1000", dict(calib_data="images", calib_data_dir="pictures", preprocessing=InputPreprocessing(input_size=64)), UsageError,
     "--input-size 64: cnn1000.onnx takes 32x32 images (fixed in the file)"),
    ("dynamic1000", dict(calib_data="images", calib_data_dir="pictures"), UsageError, "takes images of any size ([N, 3, ?, ?]): say which with --input-size N"),
    ("cnn1000", dict(calib_data="imagefolder"), UsageError, "--calib-data imagefolder needs --calib-data-dir DIR"),
]


@pytest.mark.parametrize("model, settings, error, fragment", BAD_INPUTS, ids=[f"{m}-{s.get('calib_data_dir') or s['calib_data']}-{f[:24]}" for m, s, _, f in BAD_INPUTS])
def test_bad_calibration_input_is_one_error_before_any_work(foreign, bad_inputs, model, settings, error, fragment):
    if settings.get("calib_data_dir"):
        settings = {**settings, "calib_data_dir": bad_inputs / settings["calib_data_dir"]}
    with pytest.raises(error) as raised:
        compress(CompressConfig(source=foreign / f"{model}.onnx", out=bad_inputs / "c", quantization=dataclasses.replace(QUICK, **settings)))
    assert fragment in str(raised.value) and "\n" not in str(raised.value)
    assert not (bad_inputs / "c").exists()  # refused before anything was written


def test_bad_requests_are_refused_when_the_config_is_built(foreign, workdir):
    for settings, message in (
        (dict(calib_data="images"), r"--calib-data images needs --calib-data-dir PATH"),
        (dict(calib_data="pictures"), r"unknown calibration data 'pictures'; known: images, npy, .*imagefolder"),
    ):
        with pytest.raises(UsageError, match=message):
            QuantizeConfig(**settings)
    for flags, message in (
        (dict(mean="0.5,x"), "--mean takes 'imagenet' or numbers separated by commas"),
        (dict(std="-1"), r"std must be > 0 for every channel"),
        (dict(scale="1/0"), "--scale takes a number or a fraction such as 1/255"),
        (dict(mean="1,2", std="1,2,3"), "--mean has 2 values and --std 3"),
    ):
        with pytest.raises(UsageError, match=message):
            InputPreprocessing.from_flags(**{"input_size": None, "mean": None, "std": None, "scale": None, **flags})
    with pytest.raises(UsageError, match="input_size must be in"):
        InputPreprocessing(input_size=2)
    # A run knows its data and preprocessing.
    for settings in (dict(calib_data="npy", calib_data_dir=workdir), dict(preprocessing=InputPreprocessing(mean=(0.5,)))):
        with pytest.raises(UsageError, match="is for ONNX files bmc did not write"):
            CompressConfig(source=workdir, quantization=QuantizeConfig(**settings))


def test_a_model_whose_metadata_gives_its_preprocessing_refuses_other_flags(foreign, workdir):
    first = compress(CompressConfig(source=foreign / "cnn1000.onnx", out=workdir / "a", quantize="none",
                                    quantization=QuantizeConfig(preprocessing=InputPreprocessing(mean=(0.5,), std=(0.5,)))))
    with pytest.raises(UsageError, match="metadata gives its preprocessing"):
        compress(CompressConfig(source=_inputs(first).model, out=workdir / "b", quantization=QuantizeConfig(preprocessing=InputPreprocessing(std=(1.0,)))))


def test_the_cli_refuses_bad_calibration_input_in_one_line(foreign, bad_inputs):
    model = str(foreign / "cnn1000.onnx")
    for flags, fragment, code in (
        (["--calib-data", "images", "--calib-data-dir", "empty"], "empty holds no images at any depth", 1),
        (["--calib-data", "images", "--calib-data-dir", "unreadable"], "none of its 2 image files could be read", 1),
        (["--calib-data", "npy", "--calib-data-dir", "gray.npy"], "(1 channel where it takes 3)", 1),
        (["--calib-data", "images", "--calib-data-dir", "pictures", "--mean", "0.5,0.5"], "--mean has 2 values", 2),
        (["--calib-data", "images", "--calib-data-dir", "pictures", "--mean", "imagenet", "--std", "0"], "std must be > 0", 2),
    ):
        result = run_bmc("compress", model, *flags, "-o", "c", cwd=bad_inputs)
        assert result.returncode == code, (flags, result.stderr)
        assert_one_line_error(result, fragment)
