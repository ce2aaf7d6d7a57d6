"""One scan's spill files in ``.build/spill/`` (both formats): every file under a temporary name first.

A worker orphaned by a killed build may still be finishing a scan while a
rerun redoes it, so no file is ever visible half-written; the ``.done``
marker goes last and says the scan's spill is whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from shards.common.atomic import atomic_path, atomic_write_text
from shards.schema import X_DTYPE


def write_spill(
    base: Path, big: str, shape: tuple, pieces: Iterable[np.ndarray], small: dict[str, np.ndarray], done: dict
) -> dict:
    """Write ``{base}.{big}.npy`` (``X_DTYPE`` uint8, ``shape``) from ``pieces`` streamed to disk (a scan's can be GBs),
    then each ``{base}.{name}.npy`` of ``small``, then ``{base}.done`` holding ``done``; return ``done``."""
    with atomic_path(f"{base}.{big}.npy") as tmp, open(tmp, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(X_DTYPE)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        for piece in pieces:
            f.write(np.ascontiguousarray(piece, dtype=X_DTYPE).data)
    for name, array in small.items():
        with atomic_path(f"{base}.{name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, array)
    atomic_write_text(f"{base}.done", json.dumps(done))
    return done
