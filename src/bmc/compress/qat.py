"""Quantization-aware fine-tuning: train under simulated int8 so onnxruntime's int8 loses less.

A training method before int8, not a format: asked (--qat), or the last of int8's fallbacks where
post-training int8 was fast enough but lost too much accuracy even with layers left in float.

Every Conv2d and Linear is switched in place to a subclass whose forward passes its input and its
weight through fake quantization shaped like the int8 recipes bmc measures in onnxruntime: inputs
per tensor, asymmetric, 8 bits (uint8), ranges from a running average of the observed min and max;
weights per output channel, symmetric, 7 bits (reduce_range). Gradients pass straight through.
The subclasses add no parameters or buffers, so the state dict, the checkpoint and the export are
those of the plain model: after fine-tuning, the weights go through the usual calibration and the
measured choice of recipe like any other model.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from bmc.compress.config import CompressConfig
from bmc.compress.finetune import export_run, finetune, load_run
from bmc.compress.outputs import relocated
from bmc.compress.quantize.search import INT8_FILE, lost_on_accuracy_only, quantize_int8
from bmc.compress.report import QatResult
from bmc.compress.stage import Artifact

QAT_RUN = "qat-run"
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


def fake_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the int8 recipes store it: per output channel, symmetric, 7 bits."""
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    scale = torch.clamp(flat.abs().amax(dim=1) / WEIGHT_QMAX, min=1e-12)
    zero_point = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(weight.float(), scale, zero_point, 0, -WEIGHT_QMAX - 1, WEIGHT_QMAX)


class FakeQuantConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(_fake_quant_input(self, x), fake_quant_weight(self.weight), self.bias)


class FakeQuantLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_fake_quant_input(self, x), fake_quant_weight(self.weight), self.bias)


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


def qat(artifact: Artifact, config: CompressConfig) -> tuple[Artifact, QatResult]:
    """Fine-tune under simulated int8, then int8 chosen by measurement against the model before it."""
    return _fine_tune_then_int8(artifact, config, fallback=False)


def qat_where_int8_lost_accuracy(artifact: Artifact, config: CompressConfig) -> tuple[Artifact, QatResult | None]:
    """QAT only where post-training int8 kept nothing, yet a recipe was fast enough and failed the
    accuracy budget alone: fine-tuning can recover accuracy, not speed."""
    if artifact.int8 is None or not lost_on_accuracy_only(artifact.int8, config.quantization):
        return artifact, None
    return _fine_tune_then_int8(artifact, config, fallback=True)


def _fine_tune_then_int8(artifact: Artifact, config: CompressConfig, fallback: bool) -> tuple[Artifact, QatResult]:
    from bmc.data import dataset_recipe

    model, _, trained = load_run(artifact.run_dir)
    epochs = config.finetune_epochs or max(1, dataset_recipe(trained.data.name).finetune_epochs // 2)
    # Near a good solution already: a small rate, the teacher being the model as it was.
    factor = 0.01 if trained.optimizer == "sgd" else 0.1
    recipe = dataclasses.replace(trained, lr=config.finetune_lr or trained.lr * factor, out=artifact.out_dir / QAT_RUN,
                                 kd_temperature=config.kd_temperature, kd_alpha=config.kd_alpha)
    tuned = finetune(recipe, enable_fake_quant(copy.deepcopy(model)), epochs, model if config.distill else None)
    exported = export_run(tuned.run_dir)
    scratch = artifact.out_dir / "qat"
    # Fine-tuned for calibrated ranges: static recipes only.
    quantized = quantize_int8(exported.path, scratch, config.quantization, baseline_path=artifact.onnx, recipes_tried="static")
    chosen = None
    if quantized.chosen is not None:
        chosen = artifact.out_dir / INT8_FILE
        shutil.move(quantized.chosen, chosen)
        shutil.move(f"{quantized.chosen}.sha256", f"{chosen}.sha256")
        quantized = relocated(quantized, Path(quantized.chosen), chosen)
    shutil.rmtree(scratch, ignore_errors=True)
    result = QatResult(tuned, quantized, fallback, chosen)
    return (dataclasses.replace(artifact, quantized=chosen) if chosen else artifact), result
