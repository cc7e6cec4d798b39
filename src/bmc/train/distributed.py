"""Device choice and torchrun set-up, decided once before the loop."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from bmc.errors import UsageError


@dataclass(frozen=True)
class Placement:
    """Where this process trains and which share of the data it sees."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but no CUDA device is available; use --device cpu or auto")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup_placement(requested_device: str, threads: int | None) -> Placement:
    """Join the torchrun process group when launched by torchrun; otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = _pick_device(requested_device, local_rank)
    if device.type == "cpu":
        # Processes sharing a box split its cores; oversubscribed threads slow everyone down.
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if world_size > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Placement(device=device, rank=rank, world_size=world_size, local_rank=local_rank)


def all_reduce_sum(values: torch.Tensor, placement: Placement) -> torch.Tensor:
    """Sum a tensor over all processes (identity for a single process)."""
    if placement.distributed:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values


def barrier(placement: Placement) -> None:
    if placement.distributed:
        torch.distributed.barrier()


def teardown(placement: Placement) -> None:
    if placement.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
