"""Small CSV tables (``metrics.csv``, ``subjects.csv``): read as dicts, written atomically.

Floats are written with 6 significant digits; NaN and None as empty cells.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from shards.common.atomic import atomic_write_text


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a CSV as dicts of strings; [] when there is no file."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: str | os.PathLike, columns: tuple[str, ...], rows: list[dict]) -> None:
    """A CSV of ``columns`` written atomically; floats as 6 significant digits, NaN/None empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: cell(row.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())


def cell(value, spec: str = ".6g", missing: str = "") -> str:
    """A table cell: floats with ``spec``, anything else as text; None, "" and NaN as ``missing``."""
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec) if isinstance(value, float) else str(value)
