"""The Zarr (v3) scan store: one group per scan, written atomically.

Layout::

    STORE/zarr.json            root group; attributes: format, layout, split...
    STORE/<scan_id>/t1         float32 (X, Y, Z) canonical RAS, raw intensities
    STORE/<scan_id>/lesion     uint8 0/1 (absent for unlabelled scans)
    STORE/<scan_id>/brain      uint8 0/1 head/brain mask
    STORE/ingest-report.csv    every scan found, with status and reason

A scan group is written under ``STORE/.partial/<scan_id>`` and renamed into
place once complete, so a group under its final name is always whole.

Integrity: every chunk carries a crc32c checksum (zarr's codec: a flipped
byte fails the read), and each scan's ``checks`` attribute records, per
array, its shape, its nonzero voxel count (the lesion and brain voxel counts)
and a crc32 of the whole array. ``read_scan`` verifies them, so a chunk file
that went missing (zarr would read it back as zeros) is caught too:
``DamagedScan`` names the scan, the array and what differs.
"""

from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from shards import remote

FORMAT = "atlas-zarr"
FORMAT_VERSION = 1
CHUNKS = (64, 64, 64)
PARTIAL = ".partial"
ARRAYS = ("t1", "lesion", "brain")


class StoreError(Exception):
    """The path is not a store this project wrote, or not a compatible one."""


class DamagedScan(StoreError):
    """A scan's arrays no longer match what ingest wrote (a chunk missing, damaged or rewritten)."""


def _codecs() -> list:
    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec()]


def array_checks(data: np.ndarray) -> dict:
    """What ``read_scan`` verifies of one array: shape, nonzero voxels, crc32 of its bytes."""
    data = np.ascontiguousarray(data)
    return {
        "shape": list(data.shape),
        "nonzero": int(np.count_nonzero(data)),
        "crc32": zlib.crc32(memoryview(data).cast("B")),
    }


def _verify(scan_id: str, name: str, data: np.ndarray, recorded: dict | None) -> None:
    if recorded is None:
        return  # ingested before checks were recorded: nothing to compare with
    found = array_checks(data)
    if found["shape"] != recorded["shape"]:
        raise DamagedScan(f"{scan_id}: {name} has shape {found['shape']}, {recorded['shape']} at ingest")
    if found["nonzero"] != recorded["nonzero"]:
        raise DamagedScan(
            f"{scan_id}: {name} has {found['nonzero']:,} nonzero voxels, {recorded['nonzero']:,} at "
            "ingest (a chunk is missing or was rewritten)"
        )
    if found["crc32"] != recorded["crc32"]:
        raise DamagedScan(
            f"{scan_id}: {name} differs from what ingest wrote (crc32 {found['crc32']:08x}, "
            f"{recorded['crc32']:08x} at ingest; a chunk is missing or was rewritten)"
        )


def open_store(path: str | os.PathLike, mode: str = "r") -> zarr.Group:
    """Open a store for reading (``r``) or create/continue one (``a``).

    Raises:
        StoreError: the path exists but is not one of our stores.
    """
    if remote.is_remote(str(path)):
        return _open_remote(str(path), mode)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path}: exists and is not a directory (not a Zarr store)")
    if mode == "r" or (path.exists() and any(path.iterdir())):
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path}: not a Zarr store (no zarr.json)")
        try:
            group = zarr.open_group(path, mode="r" if mode == "r" else "a")
        except Exception as exc:
            raise StoreError(f"{path}: cannot open as a Zarr v3 group: {exc}") from None
        fmt = group.attrs.get("format")
        if fmt is not None and fmt != FORMAT:
            raise StoreError(f"{path}: store format {fmt!r}, expected {FORMAT!r}")
        if fmt is None and (mode == "r" or any(True for _ in group.keys())):
            raise StoreError(f"{path}: Zarr group without the {FORMAT} attributes (not an ingested store)")
        if fmt is not None:
            return group
    else:
        group = zarr.open_group(path, mode="a")
    group.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION})
    return group


def _open_remote(url: str, mode: str) -> zarr.Group:
    """A store on object storage (``s3://bucket/store.zarr``...), through zarr's fsspec store: read only."""
    if mode != "r":
        raise StoreError(f"{url}: a store on object storage is read only here; ingest into a local store, then copy it")
    try:
        group = zarr.open_group(url, mode="r", storage_options=remote.storage_options(url))
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise StoreError(f"{url}: not a Zarr store (no zarr.json)") from None
    except Exception as exc:
        raise StoreError(f"{url}: cannot open the store ({type(exc).__name__}: {exc})") from None
    if group.attrs.get("format") != FORMAT:
        raise StoreError(f"{url}: Zarr group without the {FORMAT} attributes (not an ingested store)")
    return group


def complete_scans(path: str | os.PathLike) -> list[str]:
    """Scan ids whose group is in place and marked complete."""
    path = Path(path)
    done = []
    for child in sorted(path.iterdir()) if path.is_dir() else []:
        if child.name.startswith(".") or not (child / "zarr.json").is_file() or not child.is_dir():
            continue
        try:
            if zarr.open_group(child, mode="r").attrs.get("complete"):
                done.append(child.name)
        except Exception:
            continue
    return done


def clear_partial(path: str | os.PathLike) -> None:
    """Drop groups left half-written by an interrupted run."""
    shutil.rmtree(Path(path) / PARTIAL, ignore_errors=True)


def write_scan(path: str | os.PathLike, scan_id: str, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    """Write one scan group atomically (temporary group, then rename)."""
    path = Path(path)
    tmp = path / PARTIAL / scan_id
    shutil.rmtree(tmp, ignore_errors=True)
    group = zarr.open_group(tmp, mode="w")
    for name, data in arrays.items():
        chunks = tuple(min(c, s) for c, s in zip(CHUNKS, data.shape))
        arr = group.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype, compressors=_codecs())
        arr[...] = data
    checks = {name: array_checks(data) for name, data in arrays.items()}
    group.attrs.update({**attrs, "checks": checks, "complete": True})
    final = path / scan_id
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


def read_scan(group: zarr.Group, scan_id: str, arrays: tuple[str, ...] = ARRAYS) -> dict[str, np.ndarray]:
    """Load a scan's arrays (those present) fully into memory, verified against its ``checks``.

    Raises:
        DamagedScan: a chunk fails its checksum or cannot be decoded, or an
            array differs from what ingest recorded.
    """
    scan = group[scan_id]
    checks = scan.attrs.get("checks", {})
    out = {}
    for name in arrays:
        if name not in scan:
            continue
        try:
            out[name] = scan[name][...]
        except Exception as exc:  # zarr: a crc32c mismatch, a truncated or undecodable chunk
            why = "a chunk fails its crc32c checksum" if "checksum" in str(exc) else f"{type(exc).__name__}: {exc}"
            raise DamagedScan(f"{scan_id}: {name} cannot be read ({why})") from None
        _verify(scan_id, name, out[name], checks.get(name))
    return out


def verify_store(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Every scan of the store read and verified: ``(scan_id, "ok" | "unverified: ..." | problem)``."""
    root = open_store(path, "r")
    listed = set(root.attrs.get("scans", {})) | set(root.attrs.get("unlabelled_scans", []))
    results = []
    found = set() if remote.is_remote(str(path)) else set(complete_scans(path))
    for scan_id in sorted(listed | found):
        if scan_id not in root:
            results.append((scan_id, "listed in the store's scans but its group is missing"))
            continue
        try:
            read_scan(root, scan_id)
        except DamagedScan as exc:
            results.append((scan_id, str(exc).removeprefix(f"{scan_id}: ")))
            continue
        attrs = root[scan_id].attrs
        needed = ARRAYS if attrs.get("labelled", scan_id in root.attrs.get("scans", {})) else ("t1", "brain")
        absent = [a for a in needed if a not in root[scan_id]]
        if absent:
            results.append((scan_id, f"no {'/'.join(absent)} array"))
        elif "checks" not in attrs:
            results.append((scan_id, "unverified: ingested before checksums were recorded (re-ingest to add them)"))
        else:
            results.append((scan_id, "ok"))
    return results


def split_scans(group: zarr.Group, split: str) -> list[str]:
    """Labelled scans of the subjects the root attributes put in ``split``, sorted."""
    subjects = set(group.attrs.get("split", {}).get(split, []))
    return sorted(s for s, subj in group.attrs.get("scans", {}).items() if subj in subjects)


def scan_attrs(group: zarr.Group, scan_id: str) -> dict:
    return dict(group[scan_id].attrs)
