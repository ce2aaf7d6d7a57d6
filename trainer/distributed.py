"""This process among the others under torchrun: its rank and device, and what all ranks must agree on.

Detect torchrun by ``RANK``/``WORLD_SIZE`` (nanoGPT's way), start the process
group (gloo on the CPU, NCCL on GPUs), one device per local rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process among the others: its rank, the world size, its device."""

    rank: int
    world: int
    device: torch.device
    ddp: bool

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(chosen: torch.device) -> Ranks:
    """DDP when torchrun started us (``RANK``, ``WORLD_SIZE`` > 1): the process group, a device per local rank."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks(0, 1, chosen, ddp=False)
    cuda = chosen.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Ranks(dist.get_rank(), dist.get_world_size(), device, ddp=True)


def finite_everywhere(loss: torch.Tensor, world: int) -> bool:
    """Is the loss finite on every rank? (All ranks must stop together, or DDP would hang.)"""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if world > 1:
        dist.all_reduce(bad)
    return bad.item() == 0
