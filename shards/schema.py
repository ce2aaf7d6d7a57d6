"""The sample schema: the one home of the shard keys, dtypes and shapes.

A shard is a POSIX tar file. Each *record* (a WebDataset sample) holds a
micro-batch of K samples under one key, as four members::

    <key>.x.npy      (K, 2, P, P, P) uint8   cube A (around the voxel) and
                                             cube B (around its mirror voxel,
                                             taken from the left-right flipped
                                             volume, so A and B are aligned)
    <key>.y.npy      (K,) uint8              label: 1 lesion, 0 not lesion
    <key>.loc.npy    (K, 3) int16            voxel (i, j, k) in the store's
                                             canonical RAS grid
    <key>.scan.json  list of K str           scan id of each sample

``.npy`` members are plain NumPy format (never object dtype, so never pickle);
plain ``webdataset.WebDataset(url).decode()`` reads them as ``x.npy``,
``y.npy``, ``loc.npy`` and ``scan.json``.
"""

from __future__ import annotations

import io
import json

import numpy as np

SCHEMA = "atlas-patch-pairs"
SCHEMA_VERSION = 1
PATCH = 25
MANIFEST = "manifest.json"

X, Y, LOC, SCAN = "x.npy", "y.npy", "loc.npy", "scan.json"
FIELDS = (X, Y, LOC, SCAN)
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


def decode_record(fields: dict[str, bytes], patch: int | None = None) -> dict:
    """Arrays of one record: ``x (K,2,P,P,P) uint8``, ``y (K,)``, ``loc (K,3)``, ``scan`` list.

    Raises:
        RecordError: a field is missing or does not match the schema.
    """
    missing = [f for f in FIELDS if f not in fields]
    if missing:
        raise RecordError(f"missing field(s) {', '.join(missing)}")
    try:
        scans = json.loads(fields[SCAN])
    except ValueError as exc:
        raise RecordError(f"bad scan.json: {exc}") from None
    x, y, loc = decode_npy(fields[X]), decode_npy(fields[Y]), decode_npy(fields[LOC])
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


def bytes_per_sample(patch: int = PATCH) -> int:
    """Payload bytes of one sample (x, y, loc; scan ids and tar headers excluded)."""
    return 2 * patch**3 + 1 + 3 * 2
