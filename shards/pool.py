"""The shuffle pool: records in, batches of samples out (numpy; no torch).

``SamplePool`` is pure bookkeeping (after TorchIO's split of sampler and
queue): each record entering the pool takes a numbered *slot*; every sample
still to be drawn is one row of small per-sample columns (its slot, label,
voxel, scan, and its place in the record). A batch is a uniform draw without
replacement over those rows, or the first rows in stream order when there is
no shuffling. A slot frees once all its samples are drawn.

The sample data itself is turned into ``x`` by the format's *store*,
vectorised (``columns(record)``, ``put(slot, record)``, ``fill(out, taken)``):

- ``shards.pairs.PairStore``: ``x`` gathered from the records' ``x``;
- ``shards.block_records.BlockStore``: pairs cut from the blocks
  (``shards.blocks.cut_pairs``), or, for the device path, the new blocks and
  each sample's (slot, offset) handed on so the consumer cuts on its device.

A pool of blocks holds many records cheaply (one block is ~350 KB at 32^3,
however many samples it carries), so its fill target also counts blocks: a batch then
draws from many blocks and scans.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np


class SamplePool:
    """Which samples are left to draw, and from which slot (record) each comes.

    Rows live in preallocated column buffers (grown by doubling): adding a
    record and drawing a batch cost O(record) and O(batch), not O(pool). A
    random draw fills its holes with rows from the end; a stream-order draw
    advances a head.
    """

    def __init__(self):
        self.left = np.zeros(0, dtype=np.int64)  # samples still to draw, per slot
        self.cols: dict[str, np.ndarray] = {}  # rows [head, n) are the samples left
        self.head = self.n = 0

    @property
    def available(self) -> int:
        return self.n - self.head

    @property
    def records(self) -> int:
        return int(np.count_nonzero(self.left))

    def add(self, columns: dict[str, np.ndarray]) -> int:
        """Take a record's per-sample ``columns`` (equal lengths, > 0); return its slot."""
        k = len(columns["y"])
        free = np.flatnonzero(self.left == 0)
        slot = int(free[0]) if len(free) else len(self.left)
        if slot == len(self.left):
            self.left = np.append(self.left, 0)
        self.left[slot] = k
        columns = {**columns, "slot": np.full(k, slot, dtype=np.int64)}
        if self.head:  # stream order: move the rows left to the front (few: about a batch)
            for v in self.cols.values():
                v[: self.available] = v[self.head : self.n]
            self.n, self.head = self.available, 0
        if not self.cols or self.n + k > len(self.cols["y"]):
            size = max(1024, 2 * (self.n + k))
            grown = {
                name: np.empty((size,) + np.shape(v)[1:], dtype=np.asarray(v).dtype) for name, v in columns.items()
            }
            for name, v in self.cols.items():
                grown[name][: self.n] = v[: self.n]
            self.cols = grown
        for name, v in columns.items():
            self.cols[name][self.n : self.n + k] = v
        self.n += k
        return slot

    def draw(self, size: int, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        """``size`` rows: a uniform random subset grouped by slot, or (no ``rng``) the oldest ones."""
        if rng is None:
            taken = {k: v[self.head : self.head + size].copy() for k, v in self.cols.items()}
            self.head += size
        else:
            n, cut = self.n, self.n - size
            sel = rng.choice(n, size, replace=False)
            # A batch is a set: its rows go out grouped by record, which made the
            # cut that follows faster than random order does.
            sel = sel[np.argsort(self.cols["slot"][sel], kind="stable")]
            taken = {k: v[sel] for k, v in self.cols.items()}
            drawn_tail = np.zeros(size, dtype=bool)
            drawn_tail[sel[sel >= cut] - cut] = True
            holes, movers = sel[sel < cut], cut + np.flatnonzero(~drawn_tail)
            for v in self.cols.values():
                v[holes] = v[movers]
            self.n = cut
        self.left -= np.bincount(taken["slot"], minlength=len(self.left))
        return taken


class ScanCodes:
    """Scan ids as small integers inside the pool (no object arrays to move), names on the way out."""

    def __init__(self):
        self.codes: dict[str, int] = {}
        self.names = np.zeros(0, dtype=object)

    def __call__(self, scans: list[str]) -> np.ndarray:
        for s in set(scans) - self.codes.keys():
            self.codes[s] = len(self.codes)
            self.names = np.append(self.names, np.array([s], dtype=object))
        return np.array([self.codes[s] for s in scans], dtype=np.int32)


def batch_samples(
    records: Iterable[dict],
    batch_size: int,
    shuffle: int,
    rng: np.random.Generator,
    drop_last: bool,
    pool_blocks: int = 128,
    device_cut: bool = False,
    *,
    store_for: Callable[[dict, bool], object],
) -> Iterator[dict]:
    """Batches of ``batch_size`` samples (numpy), shuffled through a pool of at least ``shuffle`` samples.

    Records are pairs records (``x``, ``y``, ``loc``, ``scan``) or blocks
    records (``block``, ``off``, ``y``, ``loc``, ``scan``), not mixed (see
    ``shards.schema``). With ``shuffle`` > 0 the pool also holds at least
    ``pool_blocks`` blocks records. Every sample is yielded once; a batch is
    ``x (B,2,P,P,P) uint8``, ``y (B,)``, ``loc (B,3)``, ``scan (B,)`` (or the
    device-cut fields instead of ``x``, see ``BlockStore``). ``store_for(first record, device_cut)``: the
    store of the stream's records (``shards.formats.store_for``).
    """
    pool, store, stream, exhausted = SamplePool(), None, iter(records), False
    target = max(shuffle, batch_size)
    draw_rng = rng if shuffle > 0 else None
    while True:
        while not exhausted and (
            pool.available < target
            or (draw_rng is not None and store is not None and store.pools_records and pool.records < pool_blocks)
        ):
            rec = next(stream, None)
            if rec is None:
                exhausted = True
                continue
            if not len(rec["y"]):
                continue
            if store is None:
                store = store_for(rec, device_cut)
            store.put(pool.add(store.columns(rec)), rec)
        size = min(batch_size, pool.available)
        if size == 0 or (size < batch_size and drop_last):
            return
        taken = pool.draw(size, draw_rng)
        out = {"y": taken["y"], "loc": taken["loc"], "scan": store.scans.names[taken["scan"]]}
        store.fill(out, taken)
        yield out
