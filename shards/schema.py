"""The sample schema: the one home of the shard keys, dtypes and shapes.

A shard is a POSIX tar file of *records* (WebDataset samples), in one of two
formats; the manifest's ``format`` says which (``pairs`` when absent).

**pairs**: a record holds a micro-batch of K samples under one key, as four
members::

    <key>.x.npy      (K, 2, P, P, P) uint8   cube A (around the voxel) and
                                             cube B (around its mirror voxel,
                                             taken from the left-right flipped
                                             volume, so A and B are aligned)
    <key>.y.npy      (K,) uint8              label: 1 lesion, 0 not lesion
    <key>.loc.npy    (K, 3) int16            voxel (i, j, k) in the store's
                                             canonical RAS grid
    <key>.scan.json  list of K str           scan id of each sample

**blocks** (the default): a record holds one block of the scan's grid, an
N^3 tile of voxels, with every sample that lies in it::

    <key>.block.npy  (2, S, S, S) uint8      S = N + P - 1: the normalised volume
                                             (channel 0) and its mirrored volume
                                             (channel 1) over the block's padded
                                             extent, i.e. ``padded_pair`` (see
                                             ``shards.patches``) from padded
                                             index ``origin`` on; zero past its end
    <key>.off.npy    (K, 3) int16            each sample's offset in the block,
                                             0 <= off < N; its voxel is origin + off
    <key>.y.npy      (K,) uint8              labels, as in pairs
    <key>.meta.json  {"scan": str, "origin": [i, j, k], "patch": P,
                      "background_draws": r}: the block's scan, its first
                                             voxel (canonical RAS indices), P,
                                             and (version 4) how often the
                                             build's sampling draws each of
                                             the scan's background voxels,
                                             in expectation
    <key>.labels.npy (2, ceil(N^3/8)) uint8  every voxel of the block's N^3 core
                                             (voxels origin .. origin + N - 1):
                                             its lesion label (row 0) and brain
                                             mask (row 1), bit-packed in C order
                                             (``numpy.packbits``); zero past the
                                             volume's end. Since version 3: what
                                             dense training learns from
    <key>.draws.npy  (L,) float32            since version 4: how often the
                                             build's sampling draws each of the
                                             core's L lesion voxels (row 0's
                                             ones, C order), in expectation
                                             (sampling by component: its
                                             component's draws / its size)

The pair of sample k is ``block[:, o0:o0+P, o1:o1+P, o2:o2+P]`` with
``o = off[k]``: byte-identical to the pair a pairs build stores for it.

Each format is one module: ``shards.pairs`` and ``shards.block_records``
(codec, validation, the shuffle pool's store), registered in
``shards.formats``.

``.npy`` members are plain NumPy format (never object dtype, so never pickle);
plain ``webdataset.WebDataset(url).decode()`` reads every member.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SCHEMA = "atlas-patch-pairs"
SCHEMA_VERSION = 4  # 2 added the blocks format, 3 the voxel labels of a block's core, 4 their expected draws
READABLE_VERSIONS = (1, 2, 3, 4)
PATCH = 25
BLOCK = 32  # the default core edge N (bytes per sample by block size: BENCHMARKS.md, "Blocks against pairs")
MANIFEST = "manifest.json"
RECORD_OVERHEAD = 3 * 1024  # tar headers, padding and .npy headers of one record (about)

X, Y, LOC, SCAN = "x.npy", "y.npy", "loc.npy", "scan.json"
FIELDS = (X, Y, LOC, SCAN)
BLOCK_NPY, OFF, META, LABELS, DRAWS = "block.npy", "off.npy", "meta.json", "labels.npy", "draws.npy"
BLOCK_FIELDS = (BLOCK_NPY, OFF, Y, META)  # LABELS too, since version 3; DRAWS since version 4
X_DTYPE, Y_DTYPE, LOC_DTYPE = np.uint8, np.uint8, np.int16


class RecordError(ValueError):
    """A record is malformed: missing field, wrong dtype/shape, bad bytes."""


def record_key(shard: int, record: int) -> str:
    """Tar key of a record: no dots (WebDataset splits the name at the first dot)."""
    return f"{shard:06d}_{record:06d}"


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """Decode ``.npy`` bytes without copying the payload; refuses object arrays."""
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(buf)
    except Exception as exc:
        raise RecordError(f"bad .npy header: {exc}") from None
    if dtype.hasobject:
        raise RecordError("object arrays are refused (they would need pickle)")
    count = int(np.prod(shape, dtype=np.int64))
    offset = buf.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise RecordError(f".npy payload is {len(data) - offset} bytes, expected {count * dtype.itemsize}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran else "C")


def members(fields: dict[str, bytes], names: tuple[str, ...]) -> list:
    """The named members of a record: ``.npy`` decoded, ``.json`` parsed.

    Raises:
        RecordError: a member is missing or unreadable.
    """
    missing = [f for f in names if f not in fields]
    if missing:
        raise RecordError(f"missing field(s) {', '.join(missing)}")
    out = []
    for name in names:
        if not name.endswith(".json"):
            out.append(decode_npy(fields[name]))
            continue
        try:
            out.append(json.loads(fields[name]))
        except ValueError as exc:
            raise RecordError(f"bad {name}: {exc}") from None
    return out


@dataclass(frozen=True)
class RecordFormat:
    """What a shard format provides (one module each, registered in ``shards.formats``).

    ``marker``: the tar member only its records have; ``key``: the decoded
    record's key only they have. ``decode(fields, patch)``: a record's
    validated arrays. ``store(patch, device_cut)``: the shuffle pool's store of
    such records (``shards.pool``). ``estimate_bytes(samples, records, patch,
    block)``: shard bytes. ``describe(manifest)``: how the manifest's summary
    says the samples are stored. ``records_for(samples, samples_per_record)``:
    how many records hold them, None when that is known only once they are cut
    (blocks: the blocks they fall in). ``max_shards(samples, records)``: the
    most shards they can fill.
    """

    name: str
    marker: str
    key: str
    decode: Callable[[dict[str, bytes], int | None], dict]
    store: Callable[[int, bool], object]
    estimate_bytes: Callable[[int, int, int, int], int]
    describe: Callable[[dict], str]
    records_for: Callable[[int, int], int | None]
    max_shards: Callable[[int, int], int]
