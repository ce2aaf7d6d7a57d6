"""The pairs shard format: a record is a micro-batch of ready-cut patch pairs (``shards.schema``'s first layout).

Its codec and validation, the shuffle pool's store of such records (``x`` of
the drawn samples gathered from the records), its byte estimate, and its
registration ``FORMAT`` (listed in ``shards.formats``).
"""

from __future__ import annotations

import json

import numpy as np

from shards.pool import ScanCodes
from shards.schema import (
    BLOCK,
    FIELDS,
    LOC,
    LOC_DTYPE,
    PATCH,
    RECORD_OVERHEAD,
    SCAN,
    X,
    X_DTYPE,
    Y,
    Y_DTYPE,
    RecordError,
    RecordFormat,
    encode_npy,
    members,
)


def encode_record(x: np.ndarray, y: np.ndarray, loc: np.ndarray, scans: list[str]) -> dict[str, bytes]:
    """Member payloads of one pairs record, by field name."""
    validate(x, y, loc, scans)
    return {
        X: encode_npy(x),
        Y: encode_npy(y),
        LOC: encode_npy(loc),
        SCAN: json.dumps(list(scans), separators=(",", ":")).encode(),
    }


def decode_record(fields: dict[str, bytes], patch: int | None = None) -> dict:
    """Arrays of one pairs record: ``x (K,2,P,P,P) uint8``, ``y (K,)``, ``loc (K,3)``, ``scan`` list.

    Raises:
        RecordError: a field is missing or does not match the schema.
    """
    x, y, loc, scans = members(fields, FIELDS)
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


def _estimate_bytes(samples: int, records: int, patch: int, block: int = BLOCK) -> int:
    return samples * (bytes_per_sample(patch) + 16) + records * RECORD_OVERHEAD


FORMAT = RecordFormat(
    "pairs",
    marker=X,
    key="x",
    decode=decode_record,
    store=lambda patch, device_cut: PairStore(),
    estimate_bytes=_estimate_bytes,
    describe=lambda manifest: f"{manifest['config']['samples_per_record']} samples/record",
    records_for=lambda samples, per_record: -(-samples // per_record),
    max_shards=lambda samples, records: samples,  # the build spreads a shard's samples one by one
)
