"""Several training processes under torchrun: who this process is, and the few
collectives the loop needs. A single process (no RANK/WORLD_SIZE) gets
Dist() and every helper is a no-op, so the loop reads the same either way.
torch.distributed is imported only when a process group is used."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .. import cli
from .errors import UsageError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_from_env() -> Dist:
    """Rank and world size as torchrun sets them, known before the process group starts."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    try:
        return Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise UsageError("RANK/WORLD_SIZE", "the torchrun environment variables are not integers") from None


def init_distributed(parser, device_name: str) -> tuple[Dist, torch.device]:
    """This process's Dist and device; starts the process group (gloo on CPU, nccl on CUDA) under torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(), cli.resolve_device(parser, device_name)
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    device = cli.resolve_device(parser, device_name, d.local_rank)
    if d.enabled:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum `t` over the processes, in place."""
    if d.enabled:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


def shutdown(d: Dist) -> None:
    """End the process group, if one was started."""
    if d.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
