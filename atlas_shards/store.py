"""The Zarr (v3) scan store: one group per scan, written atomically.

Layout::

    STORE/zarr.json            root group; attributes: format, layout, split...
    STORE/<scan_id>/t1         float32 (X, Y, Z) canonical RAS, raw intensities
    STORE/<scan_id>/lesion     uint8 0/1 (absent for unlabelled scans)
    STORE/<scan_id>/brain      uint8 0/1 head/brain mask
    STORE/ingest-report.csv    every scan found, with status and reason

A scan group is written under ``STORE/.partial/<scan_id>`` and renamed into
place once complete, so a group under its final name is always whole.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

FORMAT = "atlas-zarr"
FORMAT_VERSION = 1
CHUNKS = (64, 64, 64)
PARTIAL = ".partial"
ARRAYS = ("t1", "lesion", "brain")


class StoreError(Exception):
    """The path is not a store this project wrote, or not a compatible one."""


def _compressor() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def open_store(path: str | os.PathLike, mode: str = "r") -> zarr.Group:
    """Open a store for reading (``r``) or create/continue one (``a``).

    Raises:
        StoreError: the path exists but is not one of our stores.
    """
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
        arr = group.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype, compressors=_compressor())
        arr[...] = data
    group.attrs.update({**attrs, "complete": True})
    final = path / scan_id
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


def read_scan(group: zarr.Group, scan_id: str, arrays: tuple[str, ...] = ARRAYS) -> dict[str, np.ndarray]:
    """Load a scan's arrays (those present) fully into memory."""
    scan = group[scan_id]
    return {name: scan[name][...] for name in arrays if name in scan}


def split_scans(group: zarr.Group, split: str) -> list[str]:
    """Labelled scans of the subjects the root attributes put in ``split``, sorted."""
    subjects = set(group.attrs.get("split", {}).get(split, []))
    return sorted(s for s, subj in group.attrs.get("scans", {}).items() if subj in subjects)


def scan_attrs(group: zarr.Group, scan_id: str) -> dict:
    return dict(group[scan_id].attrs)
