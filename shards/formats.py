"""The shard contract's record formats, one registration each: ``FORMATS["pairs"]``, ``FORMATS["blocks"]``.

A format is a module of its own (``shards.pairs``, ``shards.block_records``)
whose ``FORMAT`` (a ``shards.schema.RecordFormat``) owns how its records are
told apart, decoded and validated, sampled by the reader's shuffle pool, how
many bytes its shards take, and how the manifest's summary describes them.
The reader, the stages, the manifest and the build's plan ask it and branch
on no format's name; the build's own passes are registered beside
(``atlas_shards.formats``). Adding a format is its module plus one line here.
"""

from __future__ import annotations

from shards import block_records, pairs
from shards.schema import RecordError, RecordFormat

FORMATS: dict[str, RecordFormat] = {f.name: f for f in (pairs.FORMAT, block_records.FORMAT)}


def format_of(fields: dict[str, bytes]) -> RecordFormat:
    """The format of a record, from the member only its records have."""
    for kind in FORMATS.values():
        if kind.marker in fields:
            return kind
    raise RecordError(f"a record with none of the formats' members ({', '.join(sorted(fields)) or 'none'})")


def decode_any(fields: dict[str, bytes], patch: int | None = None, fmt: str | None = None) -> dict:
    """A record of either format, checked against the stream's ``fmt`` when it is known."""
    kind = format_of(fields)
    if fmt is not None and kind.name != fmt:
        raise RecordError(f"a {kind.name} record in a stream of {fmt} shards")
    return kind.decode(fields, patch)


def store_for(record: dict, device_cut: bool = False):
    """The shuffle pool's store for a stream whose first decoded record is ``record``."""
    kind = next(k for k in FORMATS.values() if k.key in record)
    return kind.store(record.get("patch"), device_cut)
