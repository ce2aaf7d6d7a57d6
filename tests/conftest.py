"""Shared phantom releases and stores (session-scoped: built once per run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atlas_shards.ingest import ingest
from atlas_shards.synth import TRUTH_FILE, synthesize_release


def _build(tmp_path_factory, name: str, layout: str, subjects: int, **defects) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp(name)
    synthesize_release(out / "release", layout, subjects, seed=3, workers=2, progress=False, **defects)
    return out / "release", json.loads((out / "release" / TRUTH_FILE).read_text())


@pytest.fixture(scope="session")
def r11(tmp_path_factory):
    """R1.1 phantom with one scan of each planted defect, ingested."""
    release, truth = _build(tmp_path_factory, "r11", "r1.1", 5, mismatched_masks=1, truncated=1, empty_masks=1)
    store = release.parent / "store.zarr"
    summary = ingest(release, store, workers=2, progress=False)
    return release, truth, store, summary


@pytest.fixture(scope="session")
def native(tmp_path_factory):
    """Native-space phantom covering every native protocol (orientation), ingested."""
    release, truth = _build(tmp_path_factory, "native", "native", 5)
    store = release.parent / "store.zarr"
    summary = ingest(release, store, workers=2, progress=False)
    return release, truth, store, summary


@pytest.fixture(scope="session")
def r20(tmp_path_factory):
    """ATLAS v2.0 phantom: Training and Testing, macOS debris, metadata CSV."""
    release, truth = _build(tmp_path_factory, "r20", "r2.0", 5)
    store = release.parent / "store.zarr"
    summary = ingest(release, store, workers=1, progress=False)
    return release, truth, store, summary
