"""The blocks shard format: a record is one block of a scan's grid with its samples and its voxels' labels.

Its codec and validation (``shards.schema`` gives the layout), the shuffle
pool's store of such records (pairs cut from the blocks, on the CPU or on the
training device: ``shards.blocks``), its byte estimate, and its registration
``FORMAT`` (listed in ``shards.formats``). The tiling and cutting themselves
are ``shards.blocks``.
"""

from __future__ import annotations

import json
import math

import numpy as np

from shards.blocks import cut_pairs
from shards.pool import ScanCodes
from shards.schema import (
    BLOCK,
    BLOCK_FIELDS,
    BLOCK_NPY,
    DRAWS,
    LABELS,
    LOC_DTYPE,
    META,
    OFF,
    PATCH,
    RECORD_OVERHEAD,
    X_DTYPE,
    Y,
    Y_DTYPE,
    RecordError,
    RecordFormat,
    decode_npy,
    encode_npy,
    members,
)


def pack_labels(labels: np.ndarray) -> np.ndarray:
    """``(2, N, N, N)`` lesion and brain masks of a block's core -> ``(2, ceil(N^3/8))`` uint8, bit-packed."""
    return np.packbits(np.asarray(labels, dtype=bool).reshape(2, -1), axis=1)


def unpack_labels(packed: np.ndarray, side: int) -> np.ndarray:
    """``pack_labels`` undone: ``(2, N, N, N)`` uint8 0/1 (row 0 lesion, row 1 brain)."""
    return np.unpackbits(packed, axis=1, count=side**3).reshape(2, side, side, side)


def encode_block_record(
    block: np.ndarray,
    off: np.ndarray,
    y: np.ndarray,
    scan: str,
    origin,
    patch: int,
    labels: np.ndarray | None = None,
    draws: tuple[np.ndarray, float] | None = None,
) -> dict[str, bytes]:
    """Member payloads of one blocks record. ``labels (2, N, N, N)``: the core's lesion and brain masks (None
    writes a version-2 record, without them). ``draws``: (each lesion voxel's expected draws, in C order; each
    background voxel's), written since version 4 (None: a version-3 record)."""
    meta = {"scan": scan, "origin": [int(v) for v in origin], "patch": int(patch)}
    if draws is not None:
        if labels is None:
            raise RecordError("a block's voxel draws need its voxel labels")
        meta["background_draws"] = float(draws[1])
    validate_block(block, off, y, meta)
    fields = {
        BLOCK_NPY: encode_npy(block),
        OFF: encode_npy(off),
        Y: encode_npy(y),
        META: json.dumps(meta, separators=(",", ":")).encode(),
    }
    if labels is not None:
        side = block.shape[1] - patch + 1
        if np.shape(labels) != (2, side, side, side):
            raise RecordError(f"labels are {np.shape(labels)}, expected (2, {side}, {side}, {side})")
        _check_labels(np.asarray(labels, dtype=np.uint8), off, y)
        fields[LABELS] = encode_npy(pack_labels(labels))
    if draws is not None:
        lesion_draws = np.asarray(draws[0], dtype=np.float32)
        _check_draws(lesion_draws, np.asarray(labels, dtype=np.uint8))
        fields[DRAWS] = encode_npy(lesion_draws)
    return fields


def decode_block_record(fields: dict[str, bytes], patch: int | None = None) -> dict:
    """One blocks record: ``block (2,S,S,S) uint8``, ``off (K,3) int16``, ``y (K,)``,
    ``loc (K,3) int16`` (origin + off), ``scan`` (str), ``origin (3,)``, ``patch``, and, since version 3,
    ``labels (2,N,N,N) uint8`` (the core's lesion and brain masks; absent from older records), since version 4
    ``draws (L,) float32`` and ``background_draws`` (float): the expected draws of the core's lesion voxels and
    of each background voxel.

    Raises:
        RecordError: a field is missing or does not match the schema.
    """
    block, off, y, meta = members(fields, BLOCK_FIELDS)
    validate_block(block, off, y, meta, patch)
    origin = np.asarray(meta["origin"], dtype=LOC_DTYPE)
    record = {
        "block": block,
        "off": off,
        "y": y,
        "loc": (off + origin).astype(LOC_DTYPE),
        "scan": meta["scan"],
        "origin": origin,
        "patch": meta["patch"],
    }
    if LABELS in fields:
        side = block.shape[1] - meta["patch"] + 1
        packed = decode_npy(fields[LABELS])
        if packed.dtype != np.uint8 or packed.shape != (2, -(-(side**3) // 8)):
            raise RecordError(f"labels are {packed.dtype} {packed.shape}, expected uint8 (2, {-(-(side**3) // 8)})")
        record["labels"] = unpack_labels(packed, side)
        _check_labels(record["labels"], off, y)
    if DRAWS in fields:
        if "labels" not in record:
            raise RecordError(f"{DRAWS} without {LABELS}")
        record["draws"] = decode_npy(fields[DRAWS])
        _check_draws(record["draws"], record["labels"])
        record["background_draws"] = float(meta["background_draws"])
    return record


def _check_draws(draws: np.ndarray, labels: np.ndarray) -> None:
    """One finite, non-negative float32 a lesion voxel of the core."""
    lesion = int(labels[0].sum())
    if draws.dtype != np.float32 or draws.shape != (lesion,) or not np.all(np.isfinite(draws)) or np.any(draws < 0):
        raise RecordError(
            f"draws are {draws.dtype} {draws.shape}, expected float32 ({lesion},): "
            "one finite, non-negative value a lesion voxel of the core"
        )


def _check_labels(labels: np.ndarray, off: np.ndarray, y: np.ndarray) -> None:
    """The samples' labels are their voxels' lesion labels."""
    at = labels[0][tuple(np.asarray(off, np.intp).T)] if len(off) else np.zeros(0, np.uint8)
    if not np.array_equal(at, y):
        raise RecordError(f"{int(np.sum(at != y))} sample label(s) disagree with the block's voxel labels")


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
    rate = meta.get("background_draws", 0.0)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate < 0:
        raise RecordError(f"meta.json: background_draws {rate!r} is not a finite, non-negative number")


def block_bytes(block: int = BLOCK, patch: int = PATCH) -> int:
    """Payload bytes of one block pair (its labels, samples' offsets and labels excluded)."""
    return 2 * (block + patch - 1) ** 3


def label_bytes(block: int = BLOCK) -> int:
    """Payload bytes of one block's packed voxel labels."""
    return 2 * -(-(block**3) // 8)


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


def _estimate_bytes(samples: int, records: int, patch: int, block: int = BLOCK) -> int:
    # lesion voxels' draws (4 bytes each) are not known before the cut: left out, ~1% of a block's bytes
    return records * (block_bytes(block, patch) + label_bytes(block) + RECORD_OVERHEAD) + samples * 7


def _describe(manifest: dict) -> str:
    records = sum(s["records"] for s in manifest["shards"])
    samples = manifest["totals"]["samples"]
    return f"{records} blocks of {manifest['config']['block']}^3 voxels, {samples / max(records, 1):.1f} samples/block"


FORMAT = RecordFormat(
    "blocks",
    marker=BLOCK_NPY,
    key="block",
    decode=decode_block_record,
    store=BlockStore,
    estimate_bytes=_estimate_bytes,
    describe=_describe,
    records_for=lambda samples, per_record: None,
    max_shards=lambda samples, records: records,  # whole blocks go to shards
)
