"""Batched augmentation and normalization on the training device.

Per-sample transforms in DataLoader workers cost more than the model itself for small networks on
a 2-core CPU; the same crop and flip done as one indexing operation per batch cost almost nothing.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from bmc.data import Augmentation, Normalization


def random_crop_flip(images: torch.Tensor, augmentation: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding and random horizontal flip, one draw per image; NCHW in and out."""
    if not augmentation.enabled:
        return images
    batch, channels, height, width = images.shape
    device = images.device
    if augmentation.crop_padding > 0:
        pad = augmentation.crop_padding
        padded = F.pad(images, (pad, pad, pad, pad))
        offset_y = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=generator.device).to(device)
        offset_x = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=generator.device).to(device)
        rows = (offset_y[:, None] + torch.arange(height, device=device))[:, None, :, None]
        cols = (offset_x[:, None] + torch.arange(width, device=device))[:, None, None, :]
        batch_index = torch.arange(batch, device=device)[:, None, None, None]
        channel_index = torch.arange(channels, device=device)[None, :, None, None]
        images = padded[batch_index, channel_index, rows, cols]
    if augmentation.horizontal_flip:
        flip = torch.rand(batch, generator=generator, device=generator.device).to(device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    return images


class Normalizer(torch.nn.Module):
    """Turns stored inputs (uint8 images, raw table rows) into what the model expects."""

    def __init__(self, normalization: Normalization, image: bool, resize_to: tuple[int, int] | None = None):
        super().__init__()
        shape = (1, -1, 1, 1) if image else (1, -1)
        mean = torch.tensor(normalization.mean, dtype=torch.float32).reshape(shape)
        std = torch.tensor(normalization.std, dtype=torch.float32).reshape(shape)
        # Folded into one multiply-add: x * (scale / std) - mean / std.
        self.register_buffer("multiplier", normalization.scale / std, persistent=False)
        self.register_buffer("offset", -mean / std, persistent=False)
        self.resize_to = resize_to

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        x = stored.float() * self.multiplier + self.offset
        if self.resize_to is not None and tuple(x.shape[-2:]) != self.resize_to:
            x = F.interpolate(x, size=self.resize_to, mode="bilinear", align_corners=False, antialias=False)
        return x
