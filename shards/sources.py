"""Where shards come from: specs, manifests, opening shards.

A *spec* is a shard directory or ``manifest.json``, local or at a URL
(``http(s)://``, ``s3://`` and any other object store fsspec knows: see
``shards.remote``), one or more shard paths/URLs (``pipe:`` commands too), or
a brace pattern such as ``s3://bucket/train-{000000..000031}.tar``. When a
manifest can be found beside the shards, each shard's sample count is known;
the reader needs those counts to give every DDP rank the same number of
batches. Shards are found through the manifest: no bucket listing is needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from braceexpand import braceexpand

from shards import remote
from shards.manifest import ManifestError, ManifestUnreachable, read_manifest
from shards.schema import MANIFEST


class ShardSourceError(Exception):
    """A shard spec is wrong, or a shard cannot be opened (after retries)."""


class NoReadableRecords(ShardSourceError):
    """The shards open, and not one record in them can be read: damaged or not shards at all, not unreachable."""


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int | None = None
    records: int | None = None


def is_url(spec: str) -> bool:
    return remote.is_remote(spec)


def _from_manifest(where: str, timeout: float) -> tuple[list[Shard], dict]:
    manifest = read_manifest(where, timeout=timeout)
    base = remote.parent(where)
    shards = [Shard(remote.join(base, s["name"]), s["samples"], s["records"]) for s in manifest["shards"]]
    return shards, manifest


def resolve(spec: str | os.PathLike | list, timeout: float = 10.0) -> tuple[list[Shard], dict | None]:
    """Shards named by ``spec``, and the manifest when one was found.

    Raises:
        ShardSourceError: nothing matches, a local shard is missing, or a
            manifest that was named explicitly cannot be read.
    """
    if isinstance(spec, (list, tuple)):
        shards, manifest = [], None
        for item in spec:
            more, found = resolve(item, timeout)
            shards += more
            manifest = manifest or found
        return shards, manifest
    spec = str(spec)
    if not spec:
        raise ShardSourceError("empty shard spec")
    try:
        remote.check_scheme(spec)
    except remote.RemoteError as exc:
        raise ShardSourceError(str(exc)) from None
    local_dir = not is_url(spec) and Path(spec).is_dir()
    # a URL of a directory: a trailing slash, or a last name without an extension (s3://bucket/shards/train)
    url_dir = (
        is_url(spec) and remote.scheme(spec) != "pipe" and (spec.endswith("/") or "." not in spec.rsplit("/", 1)[-1])
    )
    if spec.endswith(MANIFEST) or local_dir or url_dir:
        where = remote.join(spec, MANIFEST) if (local_dir or url_dir) else spec
        try:
            return _from_manifest(where, timeout)
        except ManifestError as exc:
            raise ShardSourceError(str(exc)) from None
    urls = list(braceexpand(spec))
    if not is_url(spec):
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise ShardSourceError(
                f"{missing[0]}: no such shard file" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
    # Counts from a manifest beside the shards, when there is one (best effort).
    try:
        if remote.scheme(urls[0]) == "pipe":
            return [Shard(u) for u in urls], None  # a command's output: no manifest beside it
        listed, manifest = _from_manifest(remote.join(remote.parent(urls[0]), MANIFEST), timeout)
    except ManifestUnreachable as exc:
        raise ShardSourceError(str(exc)) from None
    except ManifestError:
        return [Shard(u) for u in urls], None
    by_url = {s.url: s for s in listed}
    return [by_url.get(u, Shard(u)) for u in urls], manifest


def open_shard(url: str, timeout: float = 30.0, retries: int = 3) -> BinaryIO:
    """Open a shard for sequential reading: a local file, an HTTP or object-store stream, a command's output.

    Connection failures are retried ``retries`` times with a short backoff, so
    the whole call ends within about ``retries * (timeout + 2)`` seconds.

    Raises:
        ShardSourceError: the shard cannot be opened ("unreachable" when the
            server or bucket did not answer).
    """
    try:
        return remote.open_read(url, timeout=timeout, retries=retries)
    except remote.RemoteError as exc:
        raise ShardSourceError(str(exc)) from None
    except OSError as exc:
        raise ShardSourceError(f"{url}: cannot open shard: {exc.strerror or exc}") from None
