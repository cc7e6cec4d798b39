"""The CIFAR ResNets of the pruning literature (He et al. 2016, section 4.2): 6n+2 layers, 16/32/64 channels.

Shortcuts that change shape use a 1x1 convolution with BatchNorm (option B) rather than zero
padding, so that every layer is a plain module a dependency graph (pruning) and ONNX export can follow.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from bmc.errors import ModelError
from bmc.models import register_model


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages = []
        channels = width
        for stage, stage_width in enumerate((width, 2 * width, 4 * width)):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                stages.append(BasicBlock(channels, stage_width, stride))
                channels = stage_width
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each block: every block starts as identity, which lets a short
        # schedule use a high learning rate from the first epoch (Goyal et al. 2017).
        for block in stages:
            nn.init.zeros_(block.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return self.fc(torch.flatten(self.pool(out), 1))


def _image_channels(input_shape) -> int:
    if len(input_shape) != 3:
        raise ModelError(f"CIFAR ResNets need image inputs (C, H, W), not {list(input_shape)}")
    return input_shape[0]


@register_model("resnet20", "CIFAR ResNet-20 (0.27 M parameters)")
def resnet20(input_shape, num_classes, width: int = 16):
    return CifarResNet(3, _image_channels(input_shape), num_classes, width)


@register_model("resnet56", "CIFAR ResNet-56 (0.85 M parameters)")
def resnet56(input_shape, num_classes, width: int = 16):
    return CifarResNet(9, _image_channels(input_shape), num_classes, width)
