"""``manifest.json``: what a shard directory holds, and how to check it.

Keys (schema version 2; version 1, from before blocks, is read as pairs)::

    schema, schema_version   "atlas-patch-pairs", 2
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
                               bytes, sha256}]   (blocks: one record a block)
    totals                   {samples, lesion_samples, lesion_fraction,
                              shards, records, bytes, bytes_per_sample}
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from shards.atomic import atomic_write_text
from shards.schema import MANIFEST, READABLE_VERSIONS, SCHEMA, SCHEMA_VERSION, decode_any
from shards.tario import iter_grouped, sha256_file


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
    """Read a manifest from a directory, a file path or an ``http(s)://`` URL."""
    where = str(where)
    try:
        if where.startswith(("http://", "https://")):
            with urllib.request.urlopen(where, timeout=timeout) as resp:
                text = resp.read().decode()
        else:
            path = Path(where)
            text = (path / MANIFEST if path.is_dir() else path).read_text()
        manifest = json.loads(text)
    except FileNotFoundError:
        raise ManifestError(f"{where}: no {MANIFEST} (not a shard directory, or the build has not finished)") from None
    except urllib.error.HTTPError as exc:
        raise ManifestError(f"{where}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise ManifestUnreachable(f"{where}: unreachable ({exc.reason})") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{where}: cannot read the shard manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise ManifestError(f"{where}: not an {SCHEMA} manifest")
    if manifest.get("schema_version") not in READABLE_VERSIONS:
        raise ManifestError(
            f"{where}: shard schema version {manifest.get('schema_version')}, this reader knows {SCHEMA_VERSION}; rebuild the shards"
        )
    missing = [k for k, kind in REQUIRED.items() if not isinstance(manifest.get(k), kind)]
    if missing or not isinstance(manifest["config"].get("patch"), int):
        raise ManifestError(f"{where}: damaged manifest: {', '.join(missing) or 'config.patch'} missing or malformed")
    manifest.setdefault("format", "pairs")
    manifest["config"].setdefault("format", manifest["format"])
    return manifest


def preprocessing_of(m: dict) -> dict:
    """Patch size and normalisation of a manifest, or of a run's ``preprocessing`` record (``{"norm", "build"}``)."""
    build = m.get("config") or m.get("build") or {}
    norm = m.get("norm") or {}
    return {"patch": build.get("patch"), "norm": norm.get("method"), "offset": norm.get("offset"),
            "scale": norm.get("scale")}


def check_compatible(a: dict, a_name: str, b: dict, b_name: str) -> None:
    """Refuse to mix samples cut or normalised differently (patch size, normalisation method and parameters).

    Raises:
        ManifestError: one line naming both sides and what differs.
    """
    pa, pb = preprocessing_of(a), preprocessing_of(b)
    differ = [k for k in pa if pa[k] != pb[k]]
    if differ:
        show = lambda p: ", ".join(f"{k} {p[k]}" for k in differ)  # noqa: E731
        raise ManifestError(f"{a_name} ({show(pa)}) and {b_name} ({show(pb)}) were preprocessed differently; "
                            "they cannot be used together")


def count_shard(path: str | os.PathLike, patch: int | None = None, fmt: str | None = None) -> dict:
    """Records, samples and lesion samples in one shard file, decoding every record."""
    records = samples = lesion = 0
    with open(path, "rb") as f:
        for _, fields in iter_grouped(f):
            rec = decode_any(fields, patch, fmt)
            records += 1
            samples += len(rec["y"])
            lesion += int(rec["y"].sum())
    return {"records": records, "samples": samples, "lesion_samples": lesion}


def verify(out_dir: str | os.PathLike) -> list[str]:
    """Check every shard against the manifest; return the problems found (empty when sound)."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    patch = manifest["config"]["patch"]
    problems = []
    for shard in manifest["shards"]:
        path = out_dir / shard["name"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        if path.stat().st_size != shard["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {shard['bytes']}")
        if sha256_file(path) != shard["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
        try:
            counts = count_shard(path, patch, manifest["format"])
        except Exception as exc:  # tarfile, record and I/O errors alike
            problems.append(f"{path}: unreadable: {type(exc).__name__}: {exc}")
            continue
        for key in ("records", "samples", "lesion_samples"):
            if counts[key] != shard[key]:
                problems.append(f"{path}: {counts[key]} {key.replace('_', ' ')}, manifest says {shard[key]}")
    for leftover in sorted(out_dir.glob(".*.tmp")):
        problems.append(f"{leftover}: a temporary file left by a killed build ({leftover.stat().st_size} bytes); "
                        "the next build into this directory removes it")
    total = sum(s["samples"] for s in manifest["shards"])
    if total != manifest["totals"]["samples"]:
        problems.append(f"{out_dir}: shards hold {total} samples, totals say {manifest['totals']['samples']}")
    return problems


def summarise(manifest: dict, where: str | os.PathLike = "") -> str:
    """A few human lines: what the shards hold and how they were built."""
    c, t = manifest["config"], manifest["totals"]
    sizes = [s["samples"] for s in manifest["shards"]]
    mode = f"natural rate {c['natural_rate']}" if c["mode"] == "natural" else (
        f"balanced: lesion rate {c['lesion_rate']:.4g}, background rate {c['background_rate']:.4g}"
    )
    records = sum(s["records"] for s in manifest["shards"])
    layout = (f"{records} blocks of {c['block']}^3 voxels, {t['samples'] / max(records, 1):.1f} samples/block"
              if manifest["format"] == "blocks" else f"{c['samples_per_record']} samples/record")
    lines = [
        f"{where}: {manifest['schema']} v{manifest['schema_version']} ({manifest['format']}), split {c['split']}, {mode}",
        f"  {t['samples']} samples ({t['lesion_samples']} lesion, fraction {t['lesion_fraction']:.4f}) "
        f"from {len(manifest['scans'])} scans of {len(manifest['subjects'])} subjects",
        f"  {t['shards']} shards of {min(sizes)}-{max(sizes)} samples, {t['bytes'] / 2**20:.1f} MiB, "
        f"{t['bytes_per_sample']:.0f} bytes/sample; {layout}",
        f"  patch {c['patch']}, norm {manifest['norm']['method']} (input = (x - {manifest['norm']['offset']:g}) "
        f"* {manifest['norm']['scale']:.6g}), seed {c['seed']}",
    ]
    return "\n".join(lines + [f"  note: {n}" for n in manifest.get("notes", [])])
