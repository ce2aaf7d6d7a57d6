"""Tar shards: deterministic writing and streaming record reading.

Written with the standard library's ``tarfile`` (GNU format, fixed mtime,
owner and mode) so the same records always give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from shards.common.atomic import atomic_path

BLOCK = tarfile.BLOCKSIZE
NUL_BLOCK = bytes(BLOCK)


def write_shard(path: str | os.PathLike, records: Iterable[tuple[str, dict[str, bytes]]]) -> str:
    """Write ``(key, {field: bytes})`` records to ``path`` atomically; return its sha256."""
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for key, fields in records:
                for field, data in fields.items():
                    info = tarfile.TarInfo(f"{key}.{field}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))
        digest = sha256_file(tmp)
    return digest


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    while len(data) < n:  # sockets return short reads
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


def iter_members(stream: BinaryIO) -> Iterator[tuple[str, str, bytes]]:
    """``(key, field, data)`` for each regular file of a tar stream, in order.

    Headers are parsed by ``tarfile.TarInfo.frombuf``; each member's payload is
    read with one ``read`` call (``tarfile``'s stream mode copies through a
    small buffer, which is slower). GNU long names and pax ``path`` are honoured.

    Raises ``tarfile.TarError`` or ``EOFError`` on a corrupt or truncated
    stream, after yielding what came before.
    """
    long_name = None
    while True:
        header = _read_exact(stream, BLOCK)
        if not header or header == NUL_BLOCK:
            return
        if len(header) < BLOCK:
            raise EOFError("tar header truncated")
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        data = _read_exact(stream, info.size)
        if len(data) < info.size:
            raise EOFError(f"member {info.name} truncated ({len(data)} of {info.size} bytes)")
        pad = -info.size % BLOCK
        if pad and len(_read_exact(stream, pad)) < pad:
            raise EOFError(f"member {info.name} truncated (padding)")
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE):
            for line in data.decode("utf-8", "surrogateescape").splitlines():
                _, _, kv = line.partition(" ")
                k, _, v = kv.partition("=")
                if k == "path" and info.type == tarfile.XHDTYPE:
                    long_name = v
            continue
        name, long_name = long_name or info.name, None
        if not info.isreg():
            continue
        key, _, field = Path(name).name.partition(".")
        yield key, field, data


def iter_grouped(stream: BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive members by key: ``(key, {field: bytes})`` per record."""
    key, fields = None, {}
    try:
        for k, field, data in iter_members(stream):
            if k != key and fields:
                yield key, fields
                fields = {}
            key = k
            fields[field] = data
    except Exception:  # not GeneratorExit: a consumer that stops early is no damage
        if fields:  # the record before the damage may be whole: let the decoder judge
            yield key, fields
        raise
    if fields:
        yield key, fields
