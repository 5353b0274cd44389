"""Device choice and ``torchrun`` (DDP) set-up: gloo on CPU, NCCL on CUDA."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from bidsapp.errors import UsageError

__all__ = ["DistContext", "resolve_device", "setup_distributed", "teardown_distributed"]

LOGGER = logging.getLogger("brainage.training")


@dataclass(frozen=True)
class DistContext:
    """Where this process runs and which rank it is."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes files)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when running under DDP with more than one process."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for all ranks (no-op without DDP)."""
        if self.distributed:
            torch.distributed.barrier()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> the local CUDA device when available, else CPU; validates explicit names."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"runtime.device is {name!r} but no CUDA device is available; use 'auto'")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name == "cpu":
        return torch.device("cpu")
    raise UsageError(f"unknown device {name!r}")


def setup_distributed(device_name: str = "auto") -> DistContext:
    """Initialise the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    Returns
    -------
    DistContext
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend)
        LOGGER.info("DDP rank %d/%d on %s (%s)", rank, world, device, backend)
    return DistContext(device=device, rank=rank, world_size=world, local_rank=local_rank)


def teardown_distributed() -> None:
    """Destroy the process group if one was created."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
