"""Quantization-aware fine-tuning: train under simulated int8 so onnxruntime's int8 loses less.

Every Conv2d and Linear is switched in place to a subclass whose forward passes its input and its
weight through fake quantization shaped like the int8 recipes bmc measures in onnxruntime: inputs
per tensor, asymmetric, 8 bits (uint8), ranges from a running average of the observed min and max;
weights per output channel, symmetric, 7 bits (reduce_range). Gradients pass straight through.
The subclasses add no parameters or buffers, so the state dict, the checkpoint and the export are
those of the plain model: after fine-tuning, the weights go through the usual calibration and the
measured choice of recipe like any other model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

RANGE_MOMENTUM = 0.9
WEIGHT_QMAX = 63  # 7-bit symmetric weights: the reduce_range recipes bmc measures


def _fake_quant_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    if module.training:
        low = torch.clamp(x.detach().amin(), max=0.0)
        high = torch.clamp(x.detach().amax(), min=0.0)
        if module._fq_low is None:
            module._fq_low, module._fq_high = low, high
        else:
            module._fq_low = RANGE_MOMENTUM * module._fq_low + (1 - RANGE_MOMENTUM) * low
            module._fq_high = RANGE_MOMENTUM * module._fq_high + (1 - RANGE_MOMENTUM) * high
    if module._fq_low is None:  # never trained: nothing observed yet
        return x
    scale = torch.clamp((module._fq_high - module._fq_low) / 255.0, min=1e-8).reshape(1)
    zero_point = torch.clamp(torch.round(-module._fq_low / scale), 0, 255).to(torch.int32).reshape(1)
    return torch.fake_quantize_per_tensor_affine(x, scale.to(x.device), zero_point.to(x.device), 0, 255)


def _fake_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    scale = torch.clamp(flat.abs().amax(dim=1) / WEIGHT_QMAX, min=1e-12)
    zero_point = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(weight.float(), scale, zero_point, 0, -WEIGHT_QMAX - 1, WEIGHT_QMAX)


class FakeQuantConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(_fake_quant_input(self, x), _fake_quant_weight(self.weight), self.bias)


class FakeQuantLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_fake_quant_input(self, x), _fake_quant_weight(self.weight), self.bias)


SWAPS = {nn.Conv2d: FakeQuantConv2d, nn.Linear: FakeQuantLinear}


def enable_fake_quant(model: nn.Module) -> nn.Module:
    """Switch model's Conv2d and Linear layers (exact types only) to their fake-quantizing subclasses, in place."""
    for module in model.modules():
        swapped = SWAPS.get(type(module))
        if swapped is not None:
            module.__class__ = swapped
            module._fq_low = None
            module._fq_high = None
    return model
