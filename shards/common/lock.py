"""One owner per output directory: a lock file that a second writer finds taken, and a dead one leaves free.

``owned(directory, what)`` holds an exclusive POSIX record lock (``lockf``) on ``directory/.atlas-lock`` for the
block; the file names the owner (command, pid, host, start). The kernel drops the lock when its process dies,
however it dies, so a lock file left by a killed run is stale by construction: the next writer takes it over.
A POSIX lock belongs to the process, not to its forked children (``flock`` would: a DataLoader worker orphaned
by a ``kill -9`` would hold the directory until it noticed); a directory this process holds already is refused
too (``_HELD``). The file is removed on exit, and the directory too when the block made it and left it empty.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK = ".atlas-lock"
_HELD: dict[str, dict] = {}  # this process's lock files now, and what they say (its own locks never conflict)


class OutputBusy(RuntimeError):
    """Another command writes this output directory now; the message names it and the owner."""


def _take(path: Path) -> int:
    """An fd holding the lock on ``path``'s file as it is now on disk (not one unlinked meanwhile)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return -1
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:  # the owner removed it between our open and our lock: take the new one
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def owned(directory: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold ``directory`` (made if missing) for this process while the block runs.

    Raises:
        OutputBusy: another process holds it: one line naming the directory and the owner.
    """
    directory = Path(directory)
    made = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK
    key = str(path.resolve())
    fd = -1 if key in _HELD else _take(path)
    if fd < 0:
        try:  # never read the file of a lock this process holds: closing any of its fds would drop the lock
            owner = _HELD.get(key) or json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            owner = {}
        who = f"{owner.get('what', 'another command')} (pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
        raise OutputBusy(
            f"{directory}: in use by {who}, since {owner.get('since', '?')}); "
            "wait for it to end, or write to another directory"
        )
    since = datetime.datetime.now().isoformat(timespec="seconds")
    info = {"what": what, "pid": os.getpid(), "host": socket.gethostname(), "since": since}
    _HELD[key] = info
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        yield
    finally:
        _HELD.pop(key, None)
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        if made:  # a directory this command made and left empty (it failed before writing) goes too
            with contextlib.suppress(OSError):
                directory.rmdir()
