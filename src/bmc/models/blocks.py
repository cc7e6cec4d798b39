"""Residual blocks removed from an architecture, recorded so a saved model can be rebuilt.

A block computing act(x + branch(x)) is dropped by replacing it with act(x): what its addition
started from. The replacement is a `DroppedBlock`, so a checkpoint can list which blocks are gone
and loading can remove the same ones from the registry architecture before the weights go in.
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

KINDS = ("relu", "identity")


class DroppedBlock(nn.Module):
    """Where a residual block was: its shortcut, followed by the ReLU the block ended with (if any)."""

    def __init__(self, kind: str):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"a dropped block is one of {KINDS}; got {kind!r}")
        self.kind = kind

    def forward(self, x):
        return F.relu(x) if self.kind == "relu" else x

    def extra_repr(self) -> str:
        return self.kind


def drop_blocks(model: nn.Module, blocks: list[tuple[str, str]]) -> nn.Module:
    """Replace each named block, (name, "relu" or "identity"), by a DroppedBlock, in place."""
    for name, kind in blocks:
        replace_module(model, name, DroppedBlock(kind))
    return model


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put module where the submodule `name` is, in place; returns the one it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    replaced = getattr(parent, child)  # an unknown name fails here, before anything is replaced
    setattr(parent, child, module)
    return replaced


def dropped_blocks(model: nn.Module) -> list[list[str]]:
    """[name, kind] of every block dropped from model (what a checkpoint records)."""
    return [[name, module.kind] for name, module in model.named_modules() if isinstance(module, DroppedBlock)]
