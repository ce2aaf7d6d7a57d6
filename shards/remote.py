"""Where bytes come from and go to: local paths, ``http(s)://``, object storage, ``pipe:`` commands.

The one home of the question "which kind of location is this, and how is it
opened". Object storage (``s3://``, ``gs://``, ``az://``, ...) goes through
fsspec, by one code path: any scheme whose fsspec backend is installed
(s3fs for ``s3://``, gcsfs for ``gs://``). Endpoint and credentials come the
standard ways of each backend (for S3: ``AWS_ENDPOINT_URL``, profiles,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, instance roles); nothing here
is project-specific. ``pipe:CMD`` URLs (webdataset's) read the standard
output of a shell command, through webdataset's own ``gopen``.

Two failures are told apart everywhere: ``NotFound`` (retrying will not help)
and ``Unreachable`` (the server or bucket did not answer, after retries).
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

HTTP = ("http://", "https://")
PIPE = "pipe:"
READ_BLOCK = 8 << 20  # object-store reads: 8 MiB requests, read ahead one at a time (bounded memory per stream)


class RemoteError(OSError):
    """A location cannot be read or written."""


class NotFound(RemoteError):
    """The location does not exist (or is refused): retrying will not help."""


class Unreachable(RemoteError):
    """The server or bucket did not answer, after retries."""


def scheme(where: str) -> str:
    """``""`` for a local path, else ``http``, ``https``, ``pipe``, ``s3``, ``gs``..."""
    where = str(where)
    if where.startswith(PIPE):
        return "pipe"
    head, sep, _ = where.partition("://")
    return head.lower() if sep and head.isalnum() and len(head) > 1 else ""


def is_remote(where: str) -> bool:
    """Anything but a local path."""
    return scheme(where) != ""


def is_object_store(where: str) -> bool:
    return scheme(where) not in ("", "http", "https", "pipe")


def join(base: str, name: str) -> str:
    return f"{str(base).rstrip('/')}/{name}" if is_remote(base) else str(Path(base) / name)


def parent(where: str) -> str:
    return str(where).rstrip("/").rsplit("/", 1)[0] if is_remote(where) else str(Path(where).parent)


TIMEOUT_ENV = "ATLAS_TIMEOUT"  # seconds: caps every connect and read timeout below, for every command


def deadline(timeout: float) -> float:
    """``timeout``, capped by ``$ATLAS_TIMEOUT`` when set (a positive number of seconds)."""
    cap = os.environ.get(TIMEOUT_ENV, "")
    try:
        return min(timeout, float(cap)) if cap and float(cap) > 0 else timeout
    except ValueError:
        raise RemoteError(f"${TIMEOUT_ENV} is {cap!r}, not a number of seconds") from None


def storage_options(where: str, timeout: float = 30.0) -> dict:
    """fsspec options of one read: timeouts for S3 (botocore's own retries kept few: ours wrap them) and for
    HTTP (aiohttp's own default is 5 minutes in all: a server that accepts and never answers held a command
    that long)."""
    timeout = deadline(timeout)
    if scheme(where) in ("http", "https"):
        import aiohttp

        limit = aiohttp.ClientTimeout(total=None, connect=timeout, sock_connect=timeout, sock_read=timeout)
        return {"client_kwargs": {"timeout": limit}}
    if scheme(where) == "s3":
        return {
            "config_kwargs": {
                "connect_timeout": timeout,
                "read_timeout": timeout,
                "retries": {"max_attempts": 2, "mode": "standard"},
            }
        }
    return {}


def check_scheme(where: str) -> None:
    """Refuse, by name, a URL scheme that nothing here can open.

    Raises:
        RemoteError: no fsspec implementation is known for the scheme.
    """
    kind = scheme(where)
    if kind in ("", "http", "https", "pipe"):
        return
    import fsspec

    if kind not in fsspec.available_protocols():
        raise RemoteError(
            f"{where}: unknown URL scheme {kind}:// (local paths, http(s)://, pipe: and the object "
            "stores of fsspec are known)"
        )


def filesystem(where: str, timeout: float = 30.0):
    """The fsspec filesystem of an object-store URL, and the path inside it."""
    import fsspec

    check_scheme(where)
    try:
        return fsspec.core.url_to_fs(where, **storage_options(where, timeout))
    except ImportError as exc:
        raise RemoteError(f"{where}: no fsspec backend for {scheme(where)}:// is installed ({exc})") from None
    except ValueError as exc:
        raise RemoteError(f"{where}: {exc}") from None
    except Exception as exc:  # a backend that connects when made (ftp, sftp): no answer
        raise Unreachable(f"{where}: {type(exc).__name__}: {exc}") from None


class _Guarded:
    """A stream whose read errors, of whatever library, are OSErrors naming the location."""

    def __init__(self, stream, where: str):
        self._stream, self._where = stream, where

    def read(self, n: int = -1) -> bytes:
        try:
            return self._stream.read(n)
        except OSError:
            raise
        except Exception as exc:  # botocore, aiohttp: the connection went mid-read
            raise Unreachable(f"{self._where}: read failed ({type(exc).__name__}: {exc})") from None

    def close(self) -> None:
        try:
            self._stream.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_once(where: str, timeout: float) -> BinaryIO:
    kind, timeout = scheme(where), deadline(timeout)
    if kind in ("http", "https"):
        try:
            return urllib.request.urlopen(where, timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                raise NotFound(f"{where}: HTTP {exc.code} {exc.reason}") from None
            raise Unreachable(f"{where}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise Unreachable(f"{where}: {getattr(exc, 'reason', exc)}") from None
    if kind == "pipe":
        from webdataset.gopen import gopen

        return gopen(where, "rb")
    fs, path = filesystem(where, timeout)
    try:
        return _Guarded(fs.open(path, "rb", block_size=READ_BLOCK, cache_type="readahead"), where)
    except FileNotFoundError:
        raise NotFound(f"{where}: no such object") from None
    except PermissionError as exc:
        raise NotFound(f"{where}: access denied ({exc})") from None
    except Exception as exc:
        raise Unreachable(f"{where}: {type(exc).__name__}: {exc}") from None


def open_read(where: str, timeout: float = 30.0, retries: int = 3) -> BinaryIO:
    """Open a location for sequential reading; unreachable ones are retried with a short backoff.

    The whole call ends within about ``retries * (timeout + 2)`` seconds.

    Raises:
        NotFound: the location does not exist.
        Unreachable: no answer after ``retries`` tries.
        OSError: a local file cannot be opened.
    """
    if not is_remote(where):
        return open(where, "rb", buffering=1 << 20)
    last: Unreachable | None = None
    for attempt in range(max(1, retries)):
        try:
            return _open_once(where, timeout)
        except Unreachable as exc:
            last = exc
        time.sleep(min(2.0, 0.25 * 2**attempt))
    raise Unreachable(f"{where}: unreachable after {max(1, retries)} tries ({str(last).removeprefix(where + ': ')})")


def read_bytes(where: str, timeout: float = 10.0, retries: int = 1) -> bytes:
    """The whole content of a (small) location: a manifest."""
    with open_read(where, timeout, retries) as stream:
        return stream.read()


def upload(local: str | os.PathLike, where: str, timeout: float = 60.0, retries: int = 3) -> None:
    """Copy a finished local file to an object-store location (one object: never seen half-written)."""
    fs, path = filesystem(where, timeout)
    last: Exception | None = None
    for attempt in range(max(1, retries)):
        try:
            fs.put_file(str(local), path)
            return
        except (FileNotFoundError, PermissionError) as exc:
            raise NotFound(f"{where}: cannot write ({exc})") from None
        except Exception as exc:
            last = exc
        time.sleep(min(2.0, 0.25 * 2**attempt))
    raise Unreachable(f"{where}: upload failed after {max(1, retries)} tries ({type(last).__name__}: {last})")


def exists(where: str, timeout: float = 10.0) -> bool:
    """Whether a location exists. A server that does not answer is ``Unreachable``, never "no" (fsspec's HTTP
    ``exists`` says False for any error, a timeout included)."""
    if not is_remote(where):
        return Path(where).exists()
    if scheme(where) in ("http", "https"):
        try:
            _open_once(where, timeout).close()
        except NotFound:
            return False
        return True
    fs, path = filesystem(where, timeout)
    try:
        return fs.exists(path)
    except Exception as exc:
        raise Unreachable(f"{where}: {type(exc).__name__}: {exc}") from None
