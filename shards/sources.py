"""Where shards come from: specs, manifests, opening local files and URLs.

A *spec* is a local shard directory or ``manifest.json``, an ``http(s)://``
URL of either, one or more shard paths/URLs, or a brace pattern such as
``http://host/train-{000000..000031}.tar``. When a manifest can be found
beside the shards, each shard's sample count is known; the reader needs
those counts to give every DDP rank the same number of batches.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from braceexpand import braceexpand

from shards.manifest import ManifestError, ManifestUnreachable, read_manifest
from shards.schema import MANIFEST


class ShardSourceError(Exception):
    """A shard spec is wrong, or a shard cannot be opened (after retries)."""


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int | None = None
    records: int | None = None


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if is_url(base) else str(Path(base) / name)


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if is_url(url) else str(Path(url).parent)


def _from_manifest(where: str, timeout: float) -> tuple[list[Shard], dict]:
    manifest = read_manifest(where, timeout=timeout)
    base = _parent(where)
    shards = [Shard(_join(base, s["name"]), s["samples"], s["records"]) for s in manifest["shards"]]
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
    local_dir = not is_url(spec) and Path(spec).is_dir()
    if spec.endswith(MANIFEST) or local_dir or (is_url(spec) and spec.endswith("/")):
        where = _join(spec, MANIFEST) if (local_dir or spec.endswith("/")) else spec
        try:
            return _from_manifest(where, timeout)
        except ManifestError as exc:
            raise ShardSourceError(str(exc)) from None
    urls = list(braceexpand(spec))
    if not is_url(spec):
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise ShardSourceError(f"{missing[0]}: no such shard file" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    # Counts from a manifest beside the shards, when there is one (best effort).
    try:
        listed, manifest = _from_manifest(_join(_parent(urls[0]), MANIFEST), timeout)
    except ManifestUnreachable as exc:
        raise ShardSourceError(str(exc)) from None
    except ManifestError:
        return [Shard(u) for u in urls], None
    by_url = {s.url: s for s in listed}
    return [by_url.get(u, Shard(u)) for u in urls], manifest


def open_shard(url: str, timeout: float = 30.0, retries: int = 3) -> BinaryIO:
    """Open a shard for sequential reading: a local file, or an HTTP stream.

    Connection failures are retried ``retries`` times with a short backoff, so
    the whole call ends within about ``retries * (timeout + 2)`` seconds.

    Raises:
        ShardSourceError: the shard cannot be opened.
    """
    if not is_url(url):
        try:
            return open(url, "rb", buffering=1 << 20)
        except OSError as exc:
            raise ShardSourceError(f"{url}: cannot open shard: {exc.strerror or exc}") from None
    last: Exception | None = None
    for attempt in range(max(1, retries)):
        try:
            return urllib.request.urlopen(url, timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code < 500:  # 404 and friends: retrying will not help
                raise ShardSourceError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            last = exc
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(min(2.0, 0.25 * 2**attempt))
    reason = getattr(last, "reason", last)
    raise ShardSourceError(f"{url}: unreachable after {max(1, retries)} tries ({reason})")
