"""This process's place in a torchrun group: its device, its share of the cases, and gathering every rank's results.

Training (DistributedDataParallel) and folder runs (`torchrun ... -m DiffSegCore segment DIR`) join the
group the same way: NCCL with one GPU per process, gloo on the CPU; one process without torchrun.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from DiffSegCore.errors import InputError

_Item = TypeVar("_Item")
# A folder run's rank that has finished its cases waits this long for the others (torch's default is 30 min).
RANK_TIMEOUT = timedelta(days=2)


@dataclass
class Distributed:
    """This process's place in a torchrun group (rank 0 of 1 without torchrun) and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    local_world: int = 1  # processes on this machine

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list[_Item]) -> list[_Item]:
        """This rank's items: every world-th one from its rank on (ranks get equal counts within one)."""
        return items[self.rank :: self.world]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable, small), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values


def setup_distributed(device: str, timeout: timedelta | None = None) -> Distributed:
    """Join the torchrun process group when launched by torchrun, else a single process.

    `timeout` bounds how long a collective waits for the slowest rank (torch's default when None).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if world == 1:
        return Distributed(device=torch.device("cuda" if use_cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    device_of_rank = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    return Distributed(dist.get_rank(), world, device_of_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def leave_group() -> None:
    """Leave the process group this process joined (nothing without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
