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
    <key>.meta.json  {"scan": str, "origin": [i, j, k], "patch": P}: the
                                             block's scan, its first voxel
                                             (canonical RAS indices), and P

The pair of sample k is ``block[:, o0:o0+P, o1:o1+P, o2:o2+P]`` with
``o = off[k]``: byte-identical to the pair a pairs build stores for it.

``.npy`` members are plain NumPy format (never object dtype, so never pickle);
plain ``webdataset.WebDataset(url).decode()`` reads every member.
"""

from __future__ import annotations

import io
import json

import numpy as np

SCHEMA = "atlas-patch-pairs"
SCHEMA_VERSION = 2  # 2 added the blocks format; version 1 manifests (pairs only) are still read
READABLE_VERSIONS = (1, 2)
PATCH = 25
BLOCK = 32  # bytes/sample at the paper's sample: 16 -> 2.3 kB, 24 -> 1.4 kB, 32 -> 1.1 kB (BENCHMARKS.md)
MANIFEST = "manifest.json"

X, Y, LOC, SCAN = "x.npy", "y.npy", "loc.npy", "scan.json"
FIELDS = (X, Y, LOC, SCAN)
BLOCK_NPY, OFF, META = "block.npy", "off.npy", "meta.json"
BLOCK_FIELDS = (BLOCK_NPY, OFF, Y, META)
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


def encode_record(x: np.ndarray, y: np.ndarray, loc: np.ndarray, scans: list[str]) -> dict[str, bytes]:
    """Member payloads of one record, by field name (see the module docstring)."""
    validate(x, y, loc, scans)
    return {
        X: encode_npy(x),
        Y: encode_npy(y),
        LOC: encode_npy(loc),
        SCAN: json.dumps(list(scans), separators=(",", ":")).encode(),
    }


def _members(fields: dict[str, bytes], names: tuple[str, ...]) -> list:
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


def decode_record(fields: dict[str, bytes], patch: int | None = None) -> dict:
    """Arrays of one pairs record: ``x (K,2,P,P,P) uint8``, ``y (K,)``, ``loc (K,3)``, ``scan`` list.

    Raises:
        RecordError: a field is missing or does not match the schema.
    """
    x, y, loc, scans = _members(fields, FIELDS)
    validate(x, y, loc, scans, patch)
    return {"x": x, "y": y, "loc": loc, "scan": scans}


def validate(x: np.ndarray, y: np.ndarray, loc: np.ndarray, scans, patch: int | None = None) -> None:
    k = x.shape[0] if x.ndim else -1
    p = patch or (x.shape[2] if x.ndim == 5 else PATCH)
    if x.dtype != X_DTYPE or x.shape != (k, 2, p, p, p):
        raise RecordError(f"x is {x.dtype} {x.shape}, expected uint8 (K, 2, {p}, {p}, {p})")
    if y.dtype != Y_DTYPE or y.shape != (k,) or (y.size and y.max() > 1):
        raise RecordError(f"y is {y.dtype} {y.shape}, expected uint8 0/1 ({k},)")
    if loc.dtype != LOC_DTYPE or loc.shape != (k, 3):
        raise RecordError(f"loc is {loc.dtype} {loc.shape}, expected int16 ({k}, 3)")
    if not isinstance(scans, list) or len(scans) != k or not all(isinstance(s, str) for s in scans):
        raise RecordError(f"scan.json must be a list of {k} strings")


def encode_block_record(
    block: np.ndarray, off: np.ndarray, y: np.ndarray, scan: str, origin, patch: int
) -> dict[str, bytes]:
    """Member payloads of one blocks record (see the module docstring)."""
    meta = {"scan": scan, "origin": [int(v) for v in origin], "patch": int(patch)}
    validate_block(block, off, y, meta)
    return {
        BLOCK_NPY: encode_npy(block),
        OFF: encode_npy(off),
        Y: encode_npy(y),
        META: json.dumps(meta, separators=(",", ":")).encode(),
    }


def decode_block_record(fields: dict[str, bytes], patch: int | None = None) -> dict:
    """One blocks record: ``block (2,S,S,S) uint8``, ``off (K,3) int16``, ``y (K,)``,
    ``loc (K,3) int16`` (origin + off), ``scan`` (str), ``origin (3,)``, ``patch``.

    Raises:
        RecordError: a field is missing or does not match the schema.
    """
    block, off, y, meta = _members(fields, BLOCK_FIELDS)
    validate_block(block, off, y, meta, patch)
    origin = np.asarray(meta["origin"], dtype=LOC_DTYPE)
    return {
        "block": block,
        "off": off,
        "y": y,
        "loc": (off + origin).astype(LOC_DTYPE),
        "scan": meta["scan"],
        "origin": origin,
        "patch": meta["patch"],
    }


def validate_block(block: np.ndarray, off: np.ndarray, y: np.ndarray, meta, patch: int | None = None) -> None:
    if not isinstance(meta, dict) or not isinstance(meta.get("patch"), int) or meta["patch"] < 1:
        raise RecordError("meta.json has no patch size")
    p = meta["patch"]
    if patch is not None and p != patch:
        raise RecordError(f"patch {p}, expected {patch}")
    s = block.shape[1] if block.ndim == 4 else -1
    if block.dtype != X_DTYPE or block.shape != (2, s, s, s) or s < p:
        raise RecordError(f"block is {block.dtype} {block.shape}, expected uint8 (2, S, S, S) with S >= {p}")
    k = off.shape[0] if off.ndim == 2 else -1
    if off.dtype != LOC_DTYPE or off.shape != (k, 3) or (k and (off.min() < 0 or off.max() > s - p)):
        raise RecordError(f"off is {off.dtype} {off.shape}, expected int16 ({k}, 3) in [0, {s - p}]")
    if y.dtype != Y_DTYPE or y.shape != (k,) or (y.size and y.max() > 1):
        raise RecordError(f"y is {y.dtype} {y.shape}, expected uint8 0/1 ({k},)")
    origin = meta.get("origin")
    if not isinstance(meta.get("scan"), str) or not (
        isinstance(origin, list) and len(origin) == 3 and all(isinstance(v, int) for v in origin)
    ):
        raise RecordError('meta.json must be {"scan": str, "origin": [i, j, k], "patch": P}')


def block_bytes(block: int = BLOCK, patch: int = PATCH) -> int:
    """Payload bytes of one block pair (its samples' offsets and labels excluded)."""
    return 2 * (block + patch - 1) ** 3


def bytes_per_sample(patch: int = PATCH) -> int:
    """Payload bytes of one sample (x, y, loc; scan ids and tar headers excluded)."""
    return 2 * patch**3 + 1 + 3 * 2
