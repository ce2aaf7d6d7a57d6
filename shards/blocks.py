"""Blocks: the compact shard format's tiles, and the cut of pairs from them.

A scan's grid is tiled into N^3 *blocks*; block b covers voxels
``[b*N, b*N + N)`` per axis. Its record stores the padded pair volume
(``shards.patches.padded_pair``, shape ``(2, X+P-1, Y+P-1, Z+P-1)``) over
``[origin, origin + S)`` with ``S = N + P - 1``, zero past the volume's end.
The pair of a sample at voxel ``origin + off`` is then the ``P^3`` window of
the block at ``off``: exactly what ``PairCutter`` cuts from the whole volume.

Two cuts, one result:

- ``cut_pairs`` (numpy): the reader's CPU path, run in DataLoader workers.
- ``cut_pairs_torch`` and ``DeviceCutter`` (torch, any device): the GPU path;
  the pool of blocks lives on the training device, so each block crosses the
  host-to-device bus once, and batches are cut there.
"""

from __future__ import annotations

import numpy as np

from shards.patches import padded_pair


def block_size(block_side: int, patch: int) -> int:
    """S, the edge of a stored block: its N voxels plus the patch's reach either side."""
    return block_side + patch - 1


def group_by_block(locs: np.ndarray, shape: tuple[int, int, int], block: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples grouped by the block they fall in.

    Args:
        locs: ``(K, 3)`` voxel indices.
    Returns:
        ``order (K,)``: sample indices grouped by block (stable, so each
        block keeps its samples' order), and ``starts (B+1,)``: block b holds
        ``order[starts[b]:starts[b+1]]``. Blocks come in grid (C) order.
    """
    grid = [-(-n // block) for n in shape]
    bid = np.ravel_multi_index(tuple((np.asarray(locs, np.int64) // block).T), grid)
    order = np.argsort(bid, kind="stable")
    _, starts = np.unique(bid[order], return_index=True)
    return order, np.append(starts, len(order))


class BlockCutter:
    """Cuts stored blocks out of one scan's normalised volume (the build side)."""

    def __init__(self, volume: np.ndarray, mirror_index: float, patch: int, block: int):
        self.size = block_size(block, patch)
        pair = padded_pair(volume, mirror_index, patch)
        # Zero past the end, so the last (partial) blocks have the full size too.
        self._padded = np.pad(pair, ((0, 0), (0, block), (0, block), (0, block)))

    def __call__(self, origin) -> np.ndarray:
        """``(2, S, S, S)`` uint8 block whose first voxel is ``origin (3,)``."""
        i, j, k = (int(v) for v in origin)
        s = self.size
        return np.ascontiguousarray(self._padded[:, i : i + s, j : j + s, k : k + s])


def _rows(blocks: np.ndarray, patch: int) -> np.ndarray:
    """View of ``blocks (M,2,S,S,S)`` as ``(M, 2, N, N, N, P, P)`` elements of P bytes.

    Element ``[m, c, i, j, k, a, b]`` is the run ``blocks[m, c, i+a, j+b, k:k+P]``:
    a pair is P*P runs of P contiguous bytes, and numpy copies one such element
    per step (faster than indexing a uint8 window view).
    """
    m, _, s = blocks.shape[:3]
    n = s - patch + 1
    st = blocks.strides
    return np.ndarray(
        shape=(m, 2, n, n, n, patch, patch),
        dtype=np.dtype((np.void, patch)),
        buffer=blocks,
        strides=(st[0], st[1], st[2], st[3], st[4], st[2], st[3]),
    )


def cut_pairs(blocks: np.ndarray, slot: np.ndarray, off: np.ndarray, patch: int) -> np.ndarray:
    """``(K, 2, P, P, P)`` pairs: sample k is block ``slot[k]``'s window at ``off[k]``.

    Args:
        blocks: ``(M, 2, S, S, S)`` uint8, C-contiguous.
        slot: ``(K,)`` block indices; off: ``(K, 3)`` offsets in ``[0, S-P]``.
    """
    if not blocks.flags.c_contiguous:
        blocks = np.ascontiguousarray(blocks)
    off = np.asarray(off, dtype=np.intp)
    out = _rows(blocks, patch)[np.asarray(slot, dtype=np.intp), :, off[:, 0], off[:, 1], off[:, 2]]
    return out.view(np.uint8).reshape(len(off), 2, patch, patch, patch)


def cut_pairs_torch(blocks, slot, off, patch: int):
    """``cut_pairs`` on torch tensors, on their device: ``(K, 2, P, P, P)``."""
    windows = blocks.unfold(2, patch, 1).unfold(3, patch, 1).unfold(4, patch, 1)  # (M, 2, N, N, N, P, P, P)
    off = off.long()
    return windows[slot.long(), :, off[:, 0], off[:, 1], off[:, 2]]


class DeviceCutter:
    """The device end of ``ShardStream(..., device_cut=True)``: keeps each reader's pool of blocks on ``device``.

    Each batch of such a stream carries the blocks that entered its reader's
    pool since the previous batch (``blocks (n,2,S,S,S)``, ``block_slots (n,)``)
    and, per sample, the pool slot and the offset of its block (``slot (B,)``,
    ``off (B,3)``). ``__call__`` copies the new blocks into their slots on the
    device and cuts ``x (B,2,P,P,P)`` there. Batches that already hold ``x``
    (pairs shards, or a CPU-cut stream) are just moved to the device.
    """

    def __init__(self, device, patch: int):
        import torch

        self.device, self.patch, self._torch = torch.device(device), patch, torch
        self._pools: dict[int, object] = {}  # one per reader (DataLoader worker)

    def load(self, batch: dict) -> None:
        """Copy the batch's new blocks into its reader's pool (also for batches that are skipped)."""
        if "blocks" not in batch or not len(batch["block_slots"]):
            return
        torch, worker = self._torch, int(batch["worker"])
        slots = batch["block_slots"].to(self.device, torch.long)
        new = batch["blocks"].to(self.device, non_blocking=True)
        pool = self._pools.get(worker)
        need = int(batch["block_slots"].max()) + 1
        if pool is None or pool.shape[0] < need or pool.shape[1:] != new.shape[1:]:
            grown = torch.zeros(
                (max(need, 2 * (0 if pool is None else pool.shape[0])),) + tuple(new.shape[1:]),
                dtype=new.dtype,
                device=self.device,
            )
            if pool is not None and pool.shape[1:] == new.shape[1:]:
                grown[: pool.shape[0]] = pool
            pool = self._pools[worker] = grown
        pool[slots] = new

    def __call__(self, batch: dict):
        """``x (B, 2, P, P, P)`` uint8 on the device."""
        if "x" in batch:
            return batch["x"].to(self.device, non_blocking=True)
        self.load(batch)
        pool = self._pools[int(batch["worker"])]
        return cut_pairs_torch(pool, batch["slot"].to(self.device), batch["off"].to(self.device), self.patch)
