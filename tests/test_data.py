import logging
import struct

import numpy as np
import pytest

from bmc.data import DataConfig, list_datasets, load_dataset
from bmc.errors import DataError, UsageError


def test_registry_lists_every_dataset_the_cli_offers():
    assert list_datasets() == sorted(
        ["cifar10", "diabetes", "digits", "fashion-mnist", "imagefolder", "iris", "mnist", "synthetic"]
    )


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(UsageError, match="unknown data set 'digitz'; known: cifar10, diabetes, digits"):
        load_dataset("digitz")


def test_digits_split_is_fixed_stratified_and_uint8():
    first, second = load_dataset("digits"), load_dataset("digits")
    assert first.train_x.shape == (1437, 1, 8, 8) and first.test_x.shape == (360, 1, 8, 8)
    assert first.train_x.dtype == np.uint8 and first.train_x.max() == 255
    np.testing.assert_array_equal(first.test_y, second.test_y)
    np.testing.assert_array_equal(first.train_x, second.train_x)
    counts = np.bincount(first.test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 of each digit
    assert first.class_names == tuple("0123456789")
    assert not first.augmentation.horizontal_flip


def test_tables_are_standardized_by_their_normalization():
    iris = load_dataset("iris")
    assert iris.input_shape == (4,) and iris.num_classes == 3 and len(iris.test_y) == 30
    standardized = (iris.train_x - np.array(iris.normalization.mean)) / np.array(iris.normalization.std)
    np.testing.assert_allclose(standardized.mean(0), 0, atol=1e-5)
    diabetes = load_dataset("diabetes")
    assert diabetes.task == "regression" and diabetes.num_classes == 1 and diabetes.train_y.dtype == np.float32


def test_synthetic_takes_its_shape_from_the_config():
    images = load_dataset(DataConfig(name="synthetic", synthetic_shape=(3, 16, 16), synthetic_classes=4))
    assert images.train_x.shape == (512, 3, 16, 16) and images.num_classes == 4
    table = load_dataset(DataConfig(name="synthetic", synthetic_shape=(20,)))
    assert table.layout == "table" and table.train_x.dtype == np.float32


def test_imagefolder_decodes_real_jpegs_and_caches_them(workdir, cifar_slice, tmp_path):
    import os
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(cifar_slice, tree)
    config = DataConfig(name="imagefolder", data_dir=tree, image_size=32, cache_dir=workdir / "cache")
    data = load_dataset(config)
    assert data.train_x.shape == (300, 3, 32, 32) and data.test_x.shape == (100, 3, 32, 32)
    assert data.class_names[0] == "airplane" and data.class_names[-1] == "truck"
    assert np.bincount(data.train_y).tolist() == [30] * 10
    assert 0.3 < data.normalization.mean[0] < 0.7

    # The second load must not decode a single image: every file now holds bytes no decoder takes,
    # with the size and modification time the cache was keyed on.
    for image in tree.rglob("*.jpg"):
        stat = image.stat()
        image.write_bytes(b"\x00" * stat.st_size)
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = load_dataset(config)
    np.testing.assert_array_equal(again.train_x, data.train_x)
    np.testing.assert_array_equal(again.test_y, data.test_y)


def test_imagefolder_cache_notices_a_changed_file(workdir, cifar_slice, tmp_path):
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(cifar_slice, tree)
    config = DataConfig(name="imagefolder", data_dir=tree, cache_dir=workdir / "cache")
    load_dataset(config)
    victim = next((tree / "test" / "cat").iterdir())
    victim.unlink()
    assert len(load_dataset(config).test_y) == 99
    assert len(list((workdir / "cache" / "imagefolder").iterdir())) == 2


def test_undecodable_images_are_skipped_and_counted(workdir, cifar_slice, tmp_path, caplog):
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(cifar_slice, tree)
    (tree / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (tree / "train" / "cat" / "empty.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="bmc"):
        data = load_dataset(DataConfig(name="imagefolder", data_dir=tree, cache_dir=workdir / "cache"))
    assert len(data.train_y) == 300
    assert "skipped 2 undecodable image(s)" in caplog.text


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "no such directory"),
        ("empty", "no train/ folder in"),
        ("no_test", "no test/ folder in"),
        ("no_images", "holds no images"),
        ("empty_class", "class folders without images: b "),
    ],
)
def test_imagefolder_bad_trees_fail_clearly(tmp_path, layout, message):
    root = tmp_path / "tree"
    if layout != "missing":
        root.mkdir()
    if layout in ("no_test", "no_images"):
        (root / "train" / "a").mkdir(parents=True)
        (root / "train" / "a" / "notes.txt").write_text("x")
    if layout == "no_images":
        (root / "test" / "a").mkdir(parents=True)
    if layout == "empty_class":
        from PIL import Image

        for split in ("train", "test"):
            (root / split / "a").mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / "a" / "1.png")
        (root / "train" / "b").mkdir()
    with pytest.raises(DataError, match=message):
        load_dataset(DataConfig(name="imagefolder", data_dir=root, cache_dir=tmp_path / "cache"))


def test_imagefolder_needs_a_data_dir():
    with pytest.raises(UsageError, match="needs --data-dir"):
        load_dataset(DataConfig(name="imagefolder"))


def _write_idx(path, array: np.ndarray) -> None:
    dims = struct.pack(">" + "I" * array.ndim, *array.shape)
    magic = struct.pack(">HBB", 0, 0x08, array.ndim)
    path.write_bytes(magic + dims + array.astype(np.uint8).tobytes())


def test_mnist_reads_torchvision_files_without_downloading(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 20), ("t10k", 8)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (count,)))
    data = load_dataset(DataConfig(name="mnist", data_dir=tmp_path))
    assert data.train_x.shape == (20, 1, 28, 28) and data.test_x.shape == (8, 1, 28, 28)
    assert data.num_classes == 10


def test_missing_torchvision_set_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="no CIFAR-10 in .*--download"):
        load_dataset(DataConfig(name="cifar10", data_dir=tmp_path))


def _write_cifar(folder, rng, per_batch=4):
    import pickle

    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


def test_cifar10_reads_torchvision_batches_with_numpy_alone(tmp_path):
    rng = np.random.default_rng(0)
    _write_cifar(tmp_path / "cifar-10-batches-py", rng)
    data = load_dataset(DataConfig(name="cifar10", data_dir=tmp_path))
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    assert data.class_names[0] == "c0" and data.train_x.dtype == np.uint8


def test_a_tampered_cifar_batch_cannot_run_code(tmp_path):
    import pickle

    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder, rng)

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (folder / "test_batch").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(DataError, match="test_batch: not a CIFAR-10 batch .*refusing to load"):
        load_dataset(DataConfig(name="cifar10", data_dir=tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_vision_sets_load_where_torch_cannot_be_imported(tmp_path):
    import subprocess
    import sys

    blocker = tmp_path / "blocked"
    for name in ("torch", "torchvision"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text("raise ImportError('torch is not available here')\n")
    _write_cifar(tmp_path / "data" / "cifar-10-batches-py", np.random.default_rng(1))
    code = (
        "from bmc.data import load_dataset, DataConfig; from pathlib import Path; import sys; "
        f"d = load_dataset(DataConfig(name='cifar10', data_dir=Path({str(tmp_path / 'data')!r}))); "
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None; print(d.train_x.shape)"
    )
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(20, 3, 32, 32)"
