"""torchvision classification models: resnet18, mobilenet_v2 and any other as torchvision:<name>.

Weights are always random here: nothing is downloaded at run time.
"""

from __future__ import annotations

from torch import nn

from bmc.errors import ModelError, UsageError
from bmc.models import ModelEntry, register_model

# At or below this size the ImageNet stem (stride-2 7x7 conv and max-pooling) throws away most of
# the image, so CIFAR-sized inputs get the 3x3 stride-1 stem of the CIFAR literature.
SMALL_INPUT_PX = 64


class RepeatChannels(nn.Module):
    """Feeds grayscale images to a network built for RGB."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x):
        return x.expand(-1, self.channels, -1, -1)


def _adapt_channels(model: nn.Module, input_shape) -> nn.Module:
    if len(input_shape) != 3:
        raise ModelError(f"torchvision models need image inputs (C, H, W), not {list(input_shape)}")
    if input_shape[0] == 3:
        return model
    if input_shape[0] == 1:
        return nn.Sequential(RepeatChannels(3), model)
    raise ModelError(f"torchvision models take 1 or 3 channels, not {input_shape[0]}")


def _is_small(input_shape) -> bool:
    return len(input_shape) == 3 and max(input_shape[1:]) <= SMALL_INPUT_PX


@register_model("resnet18", "torchvision ResNet-18 (CIFAR stem at <= 64 px)")
def resnet18(input_shape, num_classes):
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    if _is_small(input_shape):
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return _adapt_channels(model, input_shape)


@register_model("mobilenet_v2", "torchvision MobileNetV2 (stride-1 stem at <= 64 px)")
def mobilenet_v2(input_shape, num_classes):
    from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

    model = tv_mobilenet_v2(weights=None, num_classes=num_classes)
    if _is_small(input_shape):
        model.features[0][0].stride = (1, 1)
    return _adapt_channels(model, input_shape)


def torchvision_entry(name: str) -> ModelEntry:
    """A registry entry for torchvision's classification model `name`."""
    import torchvision.models as tv_models

    known = tv_models.list_models(module=tv_models)
    if name not in known:
        raise UsageError(f"unknown torchvision classification model {name!r}; known: {', '.join(known)}")

    def factory(input_shape, num_classes, **kwargs):
        model = tv_models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        return _adapt_channels(model, input_shape)

    fixed = 299 if name == "inception_v3" else None
    return ModelEntry(f"torchvision:{name}", factory, f"torchvision {name}", fixed, True)
