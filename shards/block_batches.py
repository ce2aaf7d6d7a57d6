"""Batches of whole blocks, for dense training: every voxel of a block's core is a label.

``batch_blocks`` turns blocks records (``shards.block_records``, schema
version 3: with their core's voxel labels) into batches of ``batch_size``
blocks, shuffled through a pool of ``shuffle`` blocks (a uniform draw; stream
order with 0). A batch is::

    block   (B, 2, S, S, S) uint8   the blocks' padded pairs (S = N + P - 1)
    labels  (B, 2, N, N, N) uint8   their cores' lesion (row 0) and brain (row 1) masks
    draws   (B, N, N, N) float32    (version 4 records) each labelled voxel's expected
                                    draws by the build's sampling, 0 where unlabelled
    off     (K, 3) int64            the blocks' sampled voxels (the per-sample
    owner   (K,) int64              build's draw): offset in the core, and which
    y       (K,) uint8              block of the batch holds it; label
    loc     (K, 3), scan (K,)       voxel and scan of each sampled voxel

so a dense loss can cover every labelled voxel, or only the sampled ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


class NoVoxelLabels(ValueError):
    """A blocks record without voxel labels (schema version 2) in a stream for dense training."""


def batch_blocks(
    records: Iterable[dict],
    batch_size: int,
    shuffle: int,
    rng: np.random.Generator,
    drop_last: bool,
    heavy: tuple[int, float] | None = None,
) -> Iterator[dict]:
    """Batches of ``batch_size`` blocks records (numpy), each record once, shuffled through ``shuffle`` of them.

    ``heavy``: ``(most, mean)``: a block whose expected draws sum to k times ``mean`` enters the pool
    ``min(most, round(k))`` times, each copy's weights divided by that count (``repeats``): the same
    expected loss, with a rare heavy block (a small lesion under sampling by component) spread over many
    batches instead of dominating one.
    """
    pool: list[dict] = []
    stream, exhausted = iter(records), False
    while True:
        while not exhausted and len(pool) < max(shuffle, batch_size):
            rec = next(stream, None)
            if rec is None:
                exhausted = True
            elif "labels" not in rec:
                raise NoVoxelLabels(f"a record of {rec.get('scan')} has no voxel labels (pairs, or blocks before v3)")
            else:
                copies = repeats(rec, *heavy) if heavy is not None else 1
                pool += [rec] * copies if copies == 1 else [{**rec, "weight_scale": 1 / copies}] * copies
        size = min(batch_size, len(pool))
        if size == 0 or (size < batch_size and drop_last):
            return
        if shuffle > 0:
            picks = sorted(rng.choice(len(pool), size, replace=False).tolist(), reverse=True)
            taken = [pool[i] for i in picks]
            for i in picks:  # largest index first: each removal leaves the others' places
                pool[i] = pool[-1]
                pool.pop()
        else:
            taken, pool = pool[:size], pool[size:]
        yield _stack(taken)


def _stack(records: list[dict]) -> dict:
    counts = [len(r["y"]) for r in records]
    out = {
        "block": np.stack([r["block"] for r in records]),
        "labels": np.stack([r["labels"] for r in records]),
        "off": np.concatenate([r["off"] for r in records]).astype(np.int64),
        "owner": np.repeat(np.arange(len(records)), counts),
        "y": np.concatenate([r["y"] for r in records]),
        "loc": np.concatenate([r["loc"] for r in records]),
        "scan": np.array([r["scan"] for r, k in zip(records, counts) for _ in range(k)], dtype=object),
    }
    if all("draws" in r for r in records):
        out["draws"] = np.stack([draws_plane(r) for r in records])
    return out


def repeats(record: dict, most: int, mean: float) -> int:
    """How many times a block enters the pool: its expected draws over ``mean``, rounded, from 1 to ``most``."""
    if "draws" not in record or most <= 1 or mean <= 0:
        return 1
    background = int((record["labels"][1].astype(bool) & ~record["labels"][0].astype(bool)).sum())
    weight = float(record["draws"].sum()) + record["background_draws"] * background
    return int(min(most, max(1, round(weight / mean))))


def draws_plane(record: dict) -> np.ndarray:
    """``(N, N, N) float32``: a block record's expected draws at every voxel of its core (0 outside the brain)."""
    lesion, brain = record["labels"][0].astype(bool), record["labels"][1].astype(bool)
    plane = np.where(brain & ~lesion, np.float32(record["background_draws"]), np.float32(0))
    plane[lesion] = record["draws"]
    return plane * np.float32(record.get("weight_scale", 1.0))
