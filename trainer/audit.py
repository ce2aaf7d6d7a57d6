"""The DDP audit: after training, were the parameters identical on every rank, and was the data disjoint?

``fingerprint`` turns a batch into one int64 per sample (scan, voxel); the
training loop keeps the first few thousand; ``audit`` gathers them and a
parameter checksum from every rank and writes ``ranks.json``.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from torch import distributed as dist

from shards.common.atomic import atomic_write_text

KEEP = 4096  # fingerprint batches kept per rank


def fingerprint(batch: dict) -> torch.Tensor:
    """One int64 per sample from (scan, voxel): to check that ranks saw disjoint data."""
    scans = torch.tensor([zlib.crc32(s.encode()) for s in batch["scan"]], dtype=torch.int64)
    loc = batch["loc"].to(torch.int64)
    return (scans << 24) ^ (loc[:, 0] << 16) ^ (loc[:, 1] << 8) ^ loc[:, 2]


def audit(raw, seen: list, world: int, out: Path | None) -> dict | None:
    """Under DDP: are the parameters identical on every rank, and was the data disjoint?

    Parameters only: buffers such as batch norm's running statistics are each
    rank's own (rank 0's are the ones saved).
    """
    if world == 1:
        return None
    params = torch.cat([p.detach().double().flatten().cpu() for p in raw.parameters()])
    checksum = torch.tensor(
        [params.sum().item(), (params * torch.arange(len(params), dtype=torch.float64)).sum().item()]
    )
    sums = [torch.zeros(2, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(sums, checksum.double())
    mine = torch.cat(seen) if seen else torch.zeros(0, dtype=torch.int64)
    length = torch.tensor([len(mine)])
    dist.all_reduce(length, op=dist.ReduceOp.MIN)
    mine = mine[: int(length)]
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    per_rank = [set(t.tolist()) for t in everyone]
    shared = sum(len(per_rank[i] & per_rank[j]) for i in range(world) for j in range(i))
    result = {
        "world_size": world,
        "identical_parameters": all(torch.equal(s, sums[0]) for s in sums),
        "parameter_checksums": [s.tolist() for s in sums],
        "samples_compared_per_rank": int(length),
        "samples_seen_by_two_ranks": shared,
    }
    if out is not None:
        atomic_write_text(out / "ranks.json", json.dumps(result, indent=1))
    return result
