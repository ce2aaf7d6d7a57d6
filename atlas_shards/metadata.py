"""Join the release's metadata table (CSV, TSV or XLSX) to the scans.

Release tables are messy: R1.1 has integer subject ids (``31768`` for folder
``031768``) with stray spaces, one row per scan; v2.0 names subjects
``r001s001`` where folders say ``sub-r001s001``. Ids are therefore compared in
a normal form (stripped, lower case, ``sub-`` removed, leading zeros of
numbers removed) and the id column is the one that matches the most scans.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from atlas_shards.discover import is_hidden

TABLE_SUFFIXES = (".csv", ".tsv", ".xlsx")
_NUMBER = re.compile(r"^\d+(\.0+)?$")


def normalise_id(value: object) -> str:
    text = str(value).strip().lower().removeprefix("sub-")
    if _NUMBER.match(text):
        return str(int(float(text)))
    return text


def find_tables(root: Path, max_depth: int = 2) -> list[Path]:
    """Metadata tables at most ``max_depth`` folders below the release root."""
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if len(rel.parts) > max_depth + 1 or any(is_hidden(p) for p in rel.parts):
            continue
        if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
            found.append(path)
    return found


def read_table(path: Path) -> list[dict[str, str]]:
    """Rows as dicts of stripped strings (empty cells become "")."""
    import pandas as pd

    if path.suffix.lower() == ".xlsx":
        frame = pd.read_excel(path, dtype=str)
    else:
        frame = pd.read_csv(path, dtype=str, sep="\t" if path.suffix.lower() == ".tsv" else ",", skipinitialspace=True)
    frame.columns = [str(c).strip() for c in frame.columns]
    frame = frame.fillna("")
    return [{k: str(v).strip() for k, v in row.items()} for row in frame.to_dict(orient="records")]


def join_metadata(root: Path, subject_ids: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Map each subject id to the first metadata row naming it.

    Returns:
        (rows by subject id, notes): notes say which table and column were
        used, and which tables could not be read.
    """
    notes: list[str] = []
    wanted = {normalise_id(s): s for s in subject_ids}
    best: tuple[int, Path | None, str, list[dict[str, str]]] = (0, None, "", [])
    for path in find_tables(root):
        try:
            rows = read_table(path)
        except Exception as exc:  # a broken table must not stop ingestion
            notes.append(f"metadata table {path.name} unreadable: {exc}")
            continue
        for column in rows[0].keys() if rows else []:
            hits = len({normalise_id(r[column]) for r in rows} & wanted.keys())
            if hits > best[0]:
                best = (hits, path, column, rows)
    hits, path, column, rows = best
    if path is None:
        return {}, notes
    joined: dict[str, dict[str, str]] = {}
    for row in rows:
        key = normalise_id(row[column])
        if key in wanted and wanted[key] not in joined:
            joined[wanted[key]] = row
    notes.append(f"metadata from {path.relative_to(root)} (column {column!r}): {len(joined)} of {len(wanted)} subjects")
    return joined, notes


def hemisphere_from_row(row: dict[str, str]) -> str | None:
    """The lesion hemisphere a metadata row states, normalised, if any."""
    for key, value in row.items():
        if "hemisphere" not in key.lower() or not value:
            continue
        v = value.strip().lower()
        if v in ("l", "lh", "left"):
            return "left"
        if v in ("r", "rh", "right"):
            return "right"
        if v in ("b", "both", "bilateral"):
            return "bilateral"
        return v
    return None


warnings.filterwarnings("ignore", message="Workbook contains no default style", category=UserWarning)
