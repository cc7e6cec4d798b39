"""torchvision's registry, tested as timm tests its own: the smallest classifier of each family goes
through bmc's whole path, the path benchmarks/zoo.py walks for every classifier: one training step,
`bmc export`, `bmc compress --prune 0.5 --finetune-epochs 0 --quantize int8`, `bmc bench`.

Minutes per model on 2 cores, so these run only when asked for: python -m pytest -q -m zoo.
"""

from __future__ import annotations

import json

import pytest

from bmc.data import DataConfig
from bmc.train import TrainConfig, train
from conftest import run_bmc

# Longest first ("efficientnet_v2" before "efficientnet"); a model matching none is a family of
# its own, so a torchvision release that brings a new family brings its test with it.
FAMILY_PREFIXES = (
    "efficientnet_v2", "efficientnet", "mobilenet_v3", "mobilenet_v2", "regnet_x", "regnet_y", "shufflenet_v2",
    "swin_v2", "swin", "wide_resnet", "resnext", "resnet", "convnext", "densenet", "mnasnet", "squeezenet", "vgg",
    "vit", "maxvit", "inception", "googlenet", "alexnet",
)
SAMPLES = 16  # one training step: the batch is the whole synthetic training set
# The smallest classifier of each family in torchvision 0.29 (the registry test below keeps this
# list in step with the installed torchvision), with the input size it runs at: the smallest of
# 32, 64, 128 and 224 px that the model both builds and exports at (benchmarks/zoo.py finds it;
# alexnet: too small to build at 32, and at 64 and 128 torch.onnx cannot export its adaptive
# pooling to 6x6; maxvit_t: its 7x7 partitions need 224).
SMALLEST: dict[str, int] = {
    "alexnet": 224, "convnext_tiny": 32, "densenet121": 32, "efficientnet_b0": 32, "efficientnet_v2_s": 32, "googlenet": 32,
    "inception_v3": 32, "maxvit_t": 224, "mnasnet0_5": 32, "mobilenet_v2": 32, "mobilenet_v3_small": 32, "regnet_x_400mf": 32,
    "regnet_y_400mf": 32, "resnet18": 32, "resnext50_32x4d": 32, "shufflenet_v2_x0_5": 32, "squeezenet1_1": 32, "swin_t": 32,
    "swin_v2_t": 32, "vgg11": 32, "vit_b_16": 32, "wide_resnet50_2": 32,
}
# Families that fail today, with the error: strict, so a fix turns the xfail into a failure to remove.
KNOWN_FAILURES: dict[str, str] = {
    # bmc.checkpoint loads safetensors into a plain dict, without the _metadata versions that
    # torchvision's MNASNet._load_from_state_dict requires (benchmarks/zoo.py, bmc export).
    "mnasnet0_5": "bmc export: internal error: ValueError: version should be set to 1 or 2 instead of None",
}


def _family(name: str) -> str:
    return next((prefix for prefix in FAMILY_PREFIXES if name.startswith(prefix)), name)


@pytest.mark.slow
@pytest.mark.zoo
def test_one_classifier_of_each_family_is_tested_the_smallest():
    import torchvision

    def parameters(name: str) -> int:  # torchvision's published count; nothing is downloaded
        return torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]

    smallest: dict[str, str] = {}
    for name in torchvision.models.list_models(module=torchvision.models):
        family = _family(name)
        if family not in smallest or parameters(name) < parameters(smallest[family]):
            smallest[family] = name
    assert sorted(smallest.values()) == sorted(SMALLEST)


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=pytest.mark.xfail(reason=KNOWN_FAILURES[name], strict=True)) if name in KNOWN_FAILURES else name
     for name in SMALLEST],
)
def test_the_smallest_classifier_of_each_family_trains_exports_compresses_and_benches(name, workdir):
    size = SMALLEST[name]
    model_args = {"image_size": size} if name.startswith("vit_") else {}  # a ViT is built for one size
    data = DataConfig(name="synthetic", synthetic_shape=(3, size, size), synthetic_train_samples=SAMPLES, synthetic_test_samples=SAMPLES)
    train(TrainConfig(data=data, model=f"torchvision:{name}", model_args=model_args, epochs=1, batch_size=SAMPLES, out=workdir / "run"))
    exported = run_bmc("export", "run", cwd=workdir, timeout=1800)
    assert exported.returncode == 0, exported.stderr[-2000:]
    compressed = run_bmc("compress", "run", "--prune", "0.5", "--finetune-epochs", "0", "--quantize", "int8", cwd=workdir, timeout=1800)
    assert compressed.returncode == 0, compressed.stderr[-2000:]

    files = sorted((workdir / "run" / "compressed").glob("*.onnx"))
    assert files, "compress wrote no model"
    benched = run_bmc("bench", "run/model.onnx", *map(str, files), "--batch-sizes", "1", "--iters", "2", "--warmup", "1", "--json",
                      cwd=workdir, timeout=1800)
    assert benched.returncode == 0, benched.stderr[-2000:]
    original, *results = json.loads(benched.stdout)["models"]
    assert len(results) == len(files) and all(model["timings"] for model in results)
    # Half the MACs went: some model compress wrote holds fewer parameters than the original.
    assert min(model["parameters"] for model in results) < original["parameters"]
