"""The shuffle pool: records in, batches of samples out (numpy; no torch).

``SamplePool`` is pure bookkeeping (after TorchIO's split of sampler and
queue): each record entering the pool takes a numbered *slot*; every sample
still to be drawn is one row of small per-sample columns (its slot, label,
voxel, scan, and its place in the record). A batch is a uniform draw without
replacement over those rows, or the first rows in stream order when there is
no shuffling. A slot frees once all its samples are drawn.

The sample data itself is turned into ``x`` by a *store*, vectorised:

- ``PairStore`` (pairs records): ``x`` gathered from the records' ``x``;
- ``BlockStore`` (blocks records): pairs cut from the blocks
  (``shards.blocks.cut_pairs``), or, for the device path, the new blocks and
  each sample's (slot, offset) handed on so the consumer cuts on its device.

A pool of blocks holds many records cheaply (one block is ~350 KB at 32^3,
however many samples it carries), so its fill target also counts blocks: a batch then
draws from many blocks and scans.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from shards.blocks import cut_pairs


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
            # cut that follows about 1.3x faster than random order (BENCHMARKS.md).
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


class PairStore:
    """Pairs records by slot; ``x`` of drawn samples is gathered from them."""

    pools_records = False  # a record is a few samples: the pool is sized by samples alone

    def __init__(self):
        self.records: dict[int, np.ndarray] = {}
        self.scans = ScanCodes()

    def columns(self, rec: dict) -> dict[str, np.ndarray]:
        return {"y": rec["y"], "loc": rec["loc"], "scan": self.scans(rec["scan"]), "item": np.arange(len(rec["y"]))}

    def put(self, slot: int, rec: dict) -> None:
        self.records[slot] = rec["x"]

    def fill(self, out: dict, taken: dict) -> None:
        slot, item = taken["slot"], taken["item"]
        first = self.records[int(slot[0])]
        x = np.empty((len(slot),) + first.shape[1:], dtype=first.dtype)
        bounds = [0, *(np.flatnonzero(np.diff(slot)) + 1), len(slot)]  # draws come grouped by record
        for a, b in zip(bounds[:-1], bounds[1:]):  # one copy per sample, one numpy call per record
            x[a:b] = self.records[int(slot[a])][item[a:b]]
        out["x"] = x


class BlockStore:
    """Blocks records by slot in one ``(M, 2, S, S, S)`` array; pairs cut from it.

    With ``device_cut`` the cut is left to ``shards.blocks.DeviceCutter``: a
    batch carries the blocks that entered the pool since the previous batch,
    and each sample's slot and offset.
    """

    pools_records = True  # each record is one block: the pool also holds ``pool_blocks`` of them, for mixing

    def __init__(self, patch: int, device_cut: bool = False):
        self.patch, self.device_cut = patch, device_cut
        self.blocks: np.ndarray | None = None
        self.new: list[tuple[int, np.ndarray]] = []  # device cut: blocks not yet handed on
        self.shape: tuple = ()
        self.scans = ScanCodes()

    def columns(self, rec: dict) -> dict[str, np.ndarray]:
        code = self.scans([rec["scan"]])[0]
        return {"y": rec["y"], "loc": rec["loc"], "scan": np.full(len(rec["y"]), code, np.int32), "off": rec["off"]}

    def put(self, slot: int, rec: dict) -> None:
        block = rec["block"]
        self.shape = block.shape
        if self.device_cut:
            self.new.append((slot, block))
            return
        if self.blocks is None or slot >= len(self.blocks) or self.blocks.shape[1:] != block.shape:
            grown = np.zeros(
                (max(slot + 1, 2 * (0 if self.blocks is None else len(self.blocks))),) + block.shape, dtype=block.dtype
            )
            if self.blocks is not None and self.blocks.shape[1:] == block.shape:
                grown[: len(self.blocks)] = self.blocks
            self.blocks = grown
        self.blocks[slot] = block

    def fill(self, out: dict, taken: dict) -> None:
        if not self.device_cut:
            out["x"] = cut_pairs(self.blocks, taken["slot"], taken["off"], self.patch)
            return
        out["blocks"] = np.stack([b for _, b in self.new]) if self.new else np.zeros((0, *self.shape), np.uint8)
        out["block_slots"] = np.array([s for s, _ in self.new], dtype=np.int64)
        out["slot"], out["off"] = taken["slot"], taken["off"]
        self.new = []


def batch_samples(
    records: Iterable[dict],
    batch_size: int,
    shuffle: int,
    rng: np.random.Generator,
    drop_last: bool,
    pool_blocks: int = 128,
    device_cut: bool = False,
    *,
    store_for: Callable[[dict, bool], PairStore | BlockStore],
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
