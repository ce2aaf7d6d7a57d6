"""Atomic file output: a reader never sees a partial file under a final name."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place on success.

    The temporary file lives in the same directory so the rename is atomic on
    POSIX. On any exception the temporary file is removed and ``final`` is left
    exactly as it was.

    Args:
        final: the path the complete file should end up at.
        suffix: extension for the temporary name, for writers that infer the
            format from it (matplotlib's ``savefig``, nibabel's ``save``).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; shards and reports are meant to be shared/served.
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, final)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if exc.filename is None and exc.strerror:  # a failed write() names no file: name the output
            raise type(exc)(exc.errno, exc.strerror, str(final)) from exc
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``final`` atomically."""
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``final`` atomically."""
    atomic_write_bytes(final, text.encode("utf-8"))


def check_output_dir(path: str | os.PathLike) -> None:
    """Refuse, before any work, an output directory that cannot be made: a file at it or above it.

    Raises:
        NotADirectoryError: naming the output and the file in the way.
    """
    path = Path(path).absolute()
    for where in (path, *path.parents):
        if where.exists():
            if not where.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, f"cannot be an output directory: {where} is a file", str(path))
            return


def save_figure(fig, path: str | os.PathLike, dpi: int = 100, **savefig) -> str:
    """Save a matplotlib figure as a PNG atomically and close it; returns the file name."""
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, **savefig)
    plt.close(fig)
    return Path(path).name
