"""Run a command (the test suite) and fail, naming them, if any process it started outlives it.

Usage: ``python tests/no_leftovers.py python -m pytest -q``. The exit status is
the command's, or 1 when processes were left behind; they are listed (pid and
command line) and then killed, so the machine is left clean either way.

On Linux this process makes itself a child subreaper (``PR_SET_CHILD_SUBREAPER``):
every process the command starts that loses its parent (a build killed by a
test, a daemonised server) is re-parented here instead of to init, so after
the command ends its descendants are exactly what it left behind. A short
grace lets processes that are already on their way out finish. Elsewhere the
command just runs, with a note that nothing was checked.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
GRACE_SECONDS = 10.0  # torch's DataLoader workers look for their parent every 5 s


def become_subreaper() -> bool:
    """Whether orphaned descendants are now re-parented to this process (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie has ended: only its exit status waits to be collected)."""
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def descendants(root: int) -> list[int]:
    """Live (not zombie) processes below ``root``, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None and st[0] != "Z":
            children.setdefault(st[1], []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def reap() -> None:
    """Collect the exit status of re-parented children that have ended (they would stay zombies)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:300]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    if not become_subreaper():
        print("no_leftovers: not Linux: left-over processes are not checked", file=sys.stderr)
        return subprocess.call(argv)
    status = subprocess.call(argv)
    deadline = time.monotonic() + GRACE_SECONDS
    while True:
        reap()
        left = descendants(os.getpid())
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not left:
        return status
    print(f"\nerror: {len(left)} process(es) started by the suite were still alive after it ended:", file=sys.stderr)
    for pid in left:
        print(f"  pid {pid}: {command_line(pid)}", file=sys.stderr)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.5)
    reap()
    return status or 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
