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
        # Rows, then columns, one slice copy per possible offset: 2 * (2 * pad + 1) block copies
        # instead of a gather over every pixel (5x faster on a CIFAR-sized chunk).
        rows = torch.empty((batch, channels, height, width + 2 * pad), dtype=images.dtype, device=device)
        for shift in range(2 * pad + 1):
            chosen = (offset_y == shift).nonzero().squeeze(1)
            rows[chosen] = padded[chosen, :, shift : shift + height, :]
        images = torch.empty_like(images)
        for shift in range(2 * pad + 1):
            chosen = (offset_x == shift).nonzero().squeeze(1)
            images[chosen] = rows[chosen, :, :, shift : shift + width]
    if augmentation.horizontal_flip:
        if augmentation.crop_padding == 0:
            images = images.clone()  # flipped in place below; the caller's tensor stays as it was
        flip = torch.rand(batch, generator=generator, device=generator.device).to(device) < 0.5
        chosen = flip.nonzero().squeeze(1)
        images[chosen] = images[chosen].flip(3)
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
        x = torch.addcmul(self.offset, stored.float(), self.multiplier)
        if self.resize_to is not None and tuple(x.shape[-2:]) != self.resize_to:
            x = F.interpolate(x, size=self.resize_to, mode="bilinear", align_corners=False, antialias=False)
        return x


# Augmenting many batches in one pass, and normalizing a few at a time, removes a dozen small tensor
# operations per step (most of a step's cost for small models at small batches on a CPU) while the
# float copies stay small enough to live in cache.
AUGMENT_CHUNK_BYTES = 64 << 20
NORMALIZE_GROUP_BYTES = 2 << 20


def epoch_batches(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    order: torch.Tensor,
    batch_size: int,
    share: slice,
    augmentation: Augmentation | None,
    normalizer: Normalizer,
    generator: torch.Generator,
    memory_format: torch.memory_format,
):
    """Yield (inputs, targets) of each full global batch of one epoch, this process's share only.

    Augmentation is drawn over whole global batches, so every process of a distributed run sees
    the same images a single process would, and keeps its own slice of them.
    """
    steps = max(1, len(order) // batch_size)
    stored_bytes = inputs[:1].numel() * inputs.element_size()
    sample = normalizer(inputs[:1])
    normalized_bytes = sample.numel() * sample.element_size()
    batches_per_chunk = max(1, AUGMENT_CHUNK_BYTES // (stored_bytes * batch_size))
    batches_per_group = max(1, NORMALIZE_GROUP_BYTES // (normalized_bytes * batch_size))
    for chunk_start in range(0, steps, batches_per_chunk):
        chunk_steps = min(batches_per_chunk, steps - chunk_start)
        chunk_indices = order[chunk_start * batch_size : (chunk_start + chunk_steps) * batch_size]
        chunk = inputs[chunk_indices]
        if augmentation is not None:
            chunk = random_crop_flip(chunk, augmentation, generator)
        chunk_targets = targets[chunk_indices]
        for group_start in range(0, chunk_steps, batches_per_group):
            group_steps = min(batches_per_group, chunk_steps - group_start)
            rows = slice(group_start * batch_size, (group_start + group_steps) * batch_size)
            group = normalizer(chunk[rows]).contiguous(memory_format=memory_format)
            group_targets = chunk_targets[rows]
            for step in range(group_steps):
                first = step * batch_size
                mine = slice(first + share.start, first + share.stop)
                yield group[mine], group_targets[mine]
