"""torch.distributed for the loop: joined when started by torchrun (its environment variables), else one process."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def setup(device: str | torch.device) -> Context:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA), or use one already initialised.

    ``device`` is the requested device (``auto``, ``cpu``, ``cuda``, ``cuda:i``): it picks the backend."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    if not launched_by_torchrun():
        return Context()
    if not dist.is_available():
        raise RuntimeError("started by torchrun, but this torch has no torch.distributed")
    on_cuda = str(device).startswith("cuda") or (str(device) == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if on_cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    return Context(dist.get_rank(), dist.get_world_size(), local_rank)


def device_for(requested: str, context: Context) -> torch.device:
    """The device of this rank: ``auto`` is CUDA when there is one; each rank gets cuda:<local rank>."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", context.local_rank)
    elif device.type != "cpu":
        raise ValueError(f"--device must be auto, cpu or cuda[:i], got {requested!r}")
    return device


def mean(value: torch.Tensor, context: Context) -> torch.Tensor:
    """The mean of a tensor over the ranks (itself in one process)."""
    if not context.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / context.world


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()
