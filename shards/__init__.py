"""The shard contract shared by the sharder, the trainer and the evaluator.

For now it holds the file-writing discipline every stage follows (write to a
temporary name, rename into place); the sample schema and the streaming reader
join it with the shard builder.
"""

from shards.atomic import atomic_path, atomic_write_bytes, atomic_write_text

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]
