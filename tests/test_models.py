import pytest
import torch

from bmc.errors import ModelError, UsageError
from bmc.models import create_model, list_models, model_input_shape

# Input shapes each model is meant for; a registry entry without one here fails the first test.
SHAPES = {
    "seed-cifar-cnn": (3, 32, 32),
    "seed-mlp": (1, 28, 28),
    "seed-iris-mlp": (4,),
    "seed-linear": (10,),
    "seed-transformer": (3, 32, 32),
    "seed-cnn224": (3, 32, 32),
    "resnet20": (3, 32, 32),
    "resnet56": (3, 32, 32),
    "resnet18": (3, 32, 32),
    "mobilenet_v2": (3, 32, 32),
}
SMALL_ARGS = {"seed-transformer": {"preset": "tiny"}}


def test_every_registered_model_has_a_test_shape():
    assert sorted(SHAPES) == list_models()


@pytest.mark.parametrize("name", [n for n in sorted(SHAPES) if n != "seed-cnn224"])
def test_registered_models_build_and_train_one_step(name):
    torch.manual_seed(0)
    model = create_model(name, SHAPES[name], 7, **SMALL_ARGS.get(name, {}))
    inputs = torch.randn(4, *SHAPES[name])
    loss = torch.nn.functional.cross_entropy(model(inputs), torch.arange(4) % 7)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_documents_networks_have_their_published_sizes():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(create_model("seed-cifar-cnn", (3, 32, 32), 10)) == 62_006  # the classic LeNet-5 for CIFAR
    assert count(create_model("seed-mlp", (1, 28, 28), 10)) == 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    assert count(create_model("seed-iris-mlp", (4,), 3)) == 4 * 10 + 10 + 10 * 8 + 8 + 8 * 3 + 3
    assert 0.26e6 < count(create_model("resnet20", (3, 32, 32), 10)) < 0.28e6
    assert 0.84e6 < count(create_model("resnet56", (3, 32, 32), 10)) < 0.87e6
    full = create_model("seed-transformer", (3, 32, 32), 10, check=False)
    assert sum(isinstance(m, torch.nn.TransformerEncoderLayer) for m in full.modules()) == 6
    assert full.head.in_features == 512


def test_seed_cnn224_is_the_documents_large_model_and_resizes_its_input():
    assert model_input_shape("seed-cnn224", (3, 32, 32)) == (3, 224, 224)
    with torch.device("meta"):  # 411 M parameters: count them without allocating 1.6 GB
        model = create_model("seed-cnn224", (3, 32, 32), 10, check=False)
    parameters = sum(p.numel() for p in model.parameters())
    assert 411e6 < parameters < 412e6
    assert model.classifier[1].in_features == 128 * 56 * 56


def test_small_inputs_get_the_cifar_stem():
    small = create_model("resnet18", (3, 32, 32), 10)
    large = create_model("resnet18", (3, 96, 96), 10)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, torch.nn.Identity)
    assert large.conv1.kernel_size == (7, 7)


def test_any_torchvision_classifier_by_name_even_for_grayscale():
    model = create_model("torchvision:shufflenet_v2_x0_5", (1, 64, 64), 5)
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 5)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UsageError, match="unknown model 'resnet2'; known: mobilenet_v2, resnet18, resnet20"):
        create_model("resnet2", (3, 32, 32), 10)
    with pytest.raises(UsageError, match="unknown torchvision classification model 'resnet1000'"):
        create_model("torchvision:resnet1000", (3, 32, 32), 10)


def test_a_model_that_cannot_take_the_input_fails_at_build_time():
    with pytest.raises(ModelError, match="CIFAR ResNets need image inputs"):
        create_model("resnet20", (4,), 10)
    with pytest.raises(ModelError, match="seed-cifar-cnn.*cannot take inputs of shape \\[3, 2, 2\\]"):
        create_model("seed-cifar-cnn", (3, 2, 2), 10)
    with pytest.raises(ModelError, match="torchvision:squeezenet1_0.*cannot take inputs of shape \\[3, 8, 8\\]"):
        create_model("torchvision:squeezenet1_0", (3, 8, 8), 10)
