"""``manifest.json``: what a shard directory holds, and how to check it.

Keys (schema version 4; version 1, from before blocks, is read as pairs;
version 2 blocks records carry no voxel labels, version 3 none of their
expected draws)::

    schema, schema_version   "atlas-patch-pairs", 4
    format                   "blocks" or "pairs" (see ``shards.schema``)
    config                   the full build configuration (split, patch,
                             format, block, mode, rates, norm,
                             samples_per_record, seed...)
    norm                     {"method", "offset", "scale"}: model input is
                             (x - offset) * scale
    sample                   field names, dtypes and shapes
    store                    where the samples came from
    scans                    [{scan_id, subject_id, samples, lesion_samples,
                               lesion_voxels, background_voxels}]
    shards                   [{name, samples, lesion_samples, records,
                               bytes, sha256}]   (blocks: one record a block,
                               and voxels {lesion, background}: the labelled
                               voxels of the blocks' cores; draws {lesion,
                               background}: their expected draws, summed)
    totals                   {samples, lesion_samples, lesion_fraction,
                              shards, records, bytes, bytes_per_sample,
                              voxels, draws (blocks)}
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from shards import remote
from shards.common.atomic import atomic_write_text
from shards.formats import FORMATS, decode_any
from shards.schema import MANIFEST, READABLE_VERSIONS, SCHEMA, SCHEMA_VERSION
from shards.tario import iter_grouped


REQUIRED = {"config": dict, "norm": dict, "shards": list, "totals": dict}  # what the reader, trainer and evaluator use


class ManifestError(ValueError):
    """A manifest is missing, unreadable, or of another schema."""


class ManifestUnreachable(ManifestError):
    """The server holding the manifest could not be reached (not the same as no manifest)."""


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def read_manifest(where: str | os.PathLike, timeout: float = 10.0) -> dict:
    """Read a manifest from a directory, a file path or a URL (``http(s)://``, ``s3://``...)."""
    where = str(where)
    try:
        if remote.is_remote(where):
            url = where if where.endswith(".json") else remote.join(where, MANIFEST)  # a file, or its directory
            text = remote.read_bytes(url, timeout=timeout).decode()
        else:
            path = Path(where)
            text = (path / MANIFEST if path.is_dir() else path).read_text()
        manifest = json.loads(text)
    except (FileNotFoundError, remote.NotFound) as exc:
        why = str(exc).removeprefix(f"{where}: ") if isinstance(exc, remote.NotFound) else f"no {MANIFEST}"
        raise ManifestError(f"{where}: {why} (not a shard directory, or the build has not finished)") from None
    except remote.Unreachable as exc:
        raise ManifestUnreachable(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{where}: cannot read the shard manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise ManifestError(f"{where}: not an {SCHEMA} manifest")
    if manifest.get("schema_version") not in READABLE_VERSIONS:
        raise ManifestError(
            f"{where}: shard schema version {manifest.get('schema_version')}, this reader knows {SCHEMA_VERSION}; "
            "rebuild the shards"
        )
    missing = [k for k, kind in REQUIRED.items() if not isinstance(manifest.get(k), kind)]
    if missing or not isinstance(manifest["config"].get("patch"), int):
        raise ManifestError(f"{where}: damaged manifest: {', '.join(missing) or 'config.patch'} missing or malformed")
    _check_shard_entries(manifest["shards"], where)
    manifest.setdefault("format", "pairs")
    manifest["config"].setdefault("format", manifest["format"])
    return manifest


def _check_shard_entries(shards: list, where: str) -> None:
    """Each shard entry names a file of the shard directory itself (never a path out of it) and counts with
    non-negative integers.

    Raises:
        ManifestError: naming the manifest, the entry and the key.
    """
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            raise ManifestError(f"{where}: shards[{i}] is a JSON {type(entry).__name__}, not an object")
        name = entry.get("name")
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ManifestError(
                f"{where}: shards[{i}].name {json.dumps(name)} is not a file name in the shard directory"
            )
        for key in ("samples", "records"):
            value = entry.get(key)
            if key in entry and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ManifestError(f"{where}: shards[{i}].{key} is {json.dumps(value)}, not a count")


def preprocessing_of(m: dict) -> dict:
    """Patch size and normalisation of a manifest, or of a run's ``preprocessing`` record (``{"norm", "build"}``)."""
    build = m.get("config") or m.get("build") or {}
    norm = m.get("norm") or {}
    return {
        "patch": build.get("patch"),
        "norm": norm.get("method"),
        "offset": norm.get("offset"),
        "scale": norm.get("scale"),
    }


def sampling_rates(manifest: dict) -> dict | None:
    """The rates the build actually drew lesion and background voxels at, over the split.

    ``lesion_rate`` = lesion samples / lesion voxels and ``background_rate`` =
    background samples / background voxels, from the manifest's per-scan
    counts. With every lesion voxel kept they are the configured rates; with
    a lesion cap (``--max-lesion-samples``) or sampling by component
    (``--component-samples``) the lesion rate is the split's average, well
    under the configured 1. None when the manifest lacks the counts.
    """
    scans = manifest.get("scans") or []
    try:
        lesion = sum(int(s["lesion_voxels"]) for s in scans)
        background = sum(int(s["background_voxels"]) for s in scans)
        drawn = sum(int(s["lesion_samples"]) for s in scans)
        other = sum(int(s["samples"]) - int(s["lesion_samples"]) for s in scans)
    except (KeyError, TypeError, ValueError):
        return None
    if lesion <= 0 or background <= 0:
        return None
    return {"lesion_rate": drawn / lesion, "background_rate": other / background}


def provenance(manifest: dict) -> dict:
    """What a run keeps of where its samples came from: the store, its split's fingerprint, the subjects (so that
    the evaluator can refuse to score a model on its own training subjects)."""
    store = manifest.get("store") or {}
    return {
        "store": store.get("path"),
        "split_fingerprint": store.get("split_fingerprint"),
        "split": (manifest.get("config") or {}).get("split"),
        "subjects": sorted({str(s["subject_id"]) for s in manifest.get("scans") or [] if "subject_id" in s}),
    }


def check_compatible(a: dict, a_name: str, b: dict, b_name: str) -> None:
    """Refuse to mix samples cut or normalised differently (patch size, normalisation method and parameters).

    Raises:
        ManifestError: one line naming both sides and what differs.
    """
    pa, pb = preprocessing_of(a), preprocessing_of(b)
    differ = [k for k in pa if pa[k] != pb[k]]
    if differ:
        show = lambda p: ", ".join(f"{k} {p[k]}" for k in differ)  # noqa: E731
        raise ManifestError(
            f"{a_name} ({show(pa)}) and {b_name} ({show(pb)}) were preprocessed differently; "
            "they cannot be used together"
        )


class _Hashing:
    """A read stream that hashes and counts what passes through it."""

    def __init__(self, stream):
        self.stream, self.sha, self.size = stream, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 22):
            pass


def _check_shard(stream, shard: dict, where: str, patch: int, fmt: str) -> list[str]:
    """One pass over a shard: its size, sha256 and record/sample/lesion counts against the manifest."""
    hashing, problems = _Hashing(stream), []
    counts = {"records": 0, "samples": 0, "lesion_samples": 0}
    try:
        for _, fields in iter_grouped(hashing):
            rec = decode_any(fields, patch, fmt)
            counts["records"] += 1
            counts["samples"] += len(rec["y"])
            counts["lesion_samples"] += int(rec["y"].sum())
        hashing.drain()
    except Exception as exc:  # tarfile, record and I/O errors alike
        problems.append(f"{where}: unreadable: {type(exc).__name__}: {exc}")
        counts = None
        try:
            hashing.drain()
        except Exception:
            return problems
    whole = []
    if hashing.size != shard["bytes"]:
        whole.append(f"{where}: {hashing.size} bytes, manifest says {shard['bytes']}")
    if hashing.sha.hexdigest() != shard["sha256"]:
        whole.append(f"{where}: sha256 differs from the manifest")
    for key in ("records", "samples", "lesion_samples") if counts else ():
        if counts[key] != shard[key]:
            problems.append(f"{where}: {counts[key]} {key.replace('_', ' ')}, manifest says {shard[key]}")
    return whole + problems


def verify(where: str | os.PathLike) -> list[str]:
    """Check every shard of a directory or URL against its manifest; return the problems found (empty when sound)."""
    where = str(where)
    manifest = read_manifest(where)
    patch = manifest["config"]["patch"]
    problems = []
    for shard in manifest["shards"]:
        path = remote.join(where, shard["name"])
        try:
            stream = remote.open_read(path)
        except (FileNotFoundError, remote.NotFound):
            problems.append(f"{path}: missing")
            continue
        except OSError as exc:
            problems.append(f"{path}: cannot be read: {exc}")
            continue
        with stream:
            problems += _check_shard(stream, shard, path, patch, manifest["format"])
    if not remote.is_remote(where):
        for leftover in sorted(Path(where).glob(".*.tmp")):
            problems.append(
                f"{leftover}: a temporary file left by a killed build ({leftover.stat().st_size} bytes); "
                "the next build into this directory removes it"
            )
    total = sum(s["samples"] for s in manifest["shards"])
    if total != manifest["totals"]["samples"]:
        problems.append(f"{where}: shards hold {total} samples, totals say {manifest['totals']['samples']}")
    return problems


def summarise(manifest: dict, where: str | os.PathLike = "") -> str:
    """A few human lines: what the shards hold and how they were built."""
    c, t = manifest["config"], manifest["totals"]
    sizes = [s["samples"] for s in manifest["shards"]]
    mode = (
        f"natural rate {c['natural_rate']}"
        if c["mode"] == "natural"
        else (f"balanced: lesion rate {c['lesion_rate']:.4g}, background rate {c['background_rate']:.4g}")
    )
    layout = FORMATS[manifest["format"]].describe(manifest)
    lines = [
        f"{where}: {manifest['schema']} v{manifest['schema_version']} ({manifest['format']}), "
        f"split {c['split']}, {mode}",
        f"  {t['samples']} samples ({t['lesion_samples']} lesion, fraction {t['lesion_fraction']:.4f}) "
        f"from {len(manifest['scans'])} scans of {len(manifest['subjects'])} subjects",
        f"  {t['shards']} shards of {min(sizes)}-{max(sizes)} samples, {t['bytes'] / 2**20:.1f} MiB, "
        f"{t['bytes_per_sample']:.0f} bytes/sample; {layout}",
        f"  patch {c['patch']}, norm {manifest['norm']['method']} (input = (x - {manifest['norm']['offset']:g}) "
        f"* {manifest['norm']['scale']:.6g}), seed {c['seed']}",
    ]
    return "\n".join(lines + [f"  note: {n}" for n in manifest.get("notes", [])])
