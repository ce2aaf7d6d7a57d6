"""Shards built into object storage (``s3://bucket/prefix``...): staged locally, uploaded, the manifest last.

A build whose output is an object-store URL runs as a local build in a
staging directory (resumable like any build: the same URL stages in the same
place), then uploads every shard (one object each: S3 never shows half an
object) and ``manifest.json`` last, so a reader that finds the manifest
finds every shard it lists. A rerun uploads only what is missing or differs
in size, and an upload killed midway is finished by the next run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from shards import remote
from shards.manifest import ManifestError, ManifestUnreachable, read_manifest
from shards.schema import MANIFEST


def staging_dir(url: str) -> Path:
    """Where a build into ``url`` is staged: one fixed place per URL, so a rerun resumes."""
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "atlas-shards-staging" / digest


def published(url: str) -> dict | None:
    """The manifest already at ``url``, None when there is none."""
    try:
        return read_manifest(remote.join(url, MANIFEST))
    except ManifestUnreachable:
        raise
    except ManifestError:
        return None


def publish(staged: Path, url: str, log: Callable[[str], None] = print) -> None:
    """Upload the finished build in ``staged`` to ``url``: shards first, ``manifest.json`` last."""
    manifest = json.loads((staged / MANIFEST).read_text())
    fs, base = remote.filesystem(url)
    try:
        listing = fs.ls(base, detail=True)
    except FileNotFoundError:
        listing = []
    there = {Path(item["name"]).name: int(item.get("size") or -1) for item in listing}
    todo = [s for s in manifest["shards"] if there.get(s["name"]) != s["bytes"]]
    for i, shard in enumerate(todo, 1):
        remote.upload(staged / shard["name"], remote.join(url, shard["name"]))
        log(f"uploaded {shard['name']} ({i}/{len(todo)})")
    remote.upload(staged / MANIFEST, remote.join(url, MANIFEST))
    log(f"{url}: {len(manifest['shards'])} shards and {MANIFEST} in place")
    shutil.rmtree(staged, ignore_errors=True)
