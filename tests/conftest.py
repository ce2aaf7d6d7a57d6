"""Shared phantom releases and stores (session-scoped: built once per run)."""

from __future__ import annotations

import json

import pytest

from atlas_shards.ingest import ingest
from atlas_shards.synth import TRUTH_FILE, synthesize_release


def _ingested(tmp_path_factory, layout: str, subjects: int, workers: int = 2, **defects):
    """(release, truth, store, summary) for a freshly synthesised phantom."""
    out = tmp_path_factory.mktemp(layout.replace(".", ""))
    release, store = out / "release", out / "store.zarr"
    synthesize_release(release, layout, subjects, seed=3, workers=2, progress=False, **defects)
    truth = json.loads((release / TRUTH_FILE).read_text())
    return release, truth, store, ingest(release, store, workers=workers, progress=False)


@pytest.fixture(scope="session")
def r11(tmp_path_factory):
    """R1.1 phantom with one scan of each planted defect, ingested."""
    return _ingested(tmp_path_factory, "r1.1", 5, mismatched_masks=1, truncated=1, empty_masks=1)


@pytest.fixture(scope="session")
def native(tmp_path_factory):
    """Native-space phantom covering every native protocol (orientation), ingested."""
    return _ingested(tmp_path_factory, "native", 5)


@pytest.fixture(scope="session")
def r20(tmp_path_factory):
    """ATLAS v2.0 phantom (Training, Testing, macOS debris, metadata CSV), ingested in one process."""
    return _ingested(tmp_path_factory, "r2.0", 5, workers=1)
