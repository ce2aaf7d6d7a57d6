"""The one process pool of the sharder (synth, ingest, build): spawned workers, results in job order.

Spawn, never fork: zarr runs an I/O thread once a store is open, and a fork
taken while it holds a lock deadlocks the child. With one worker (or one
job) nothing is started and the jobs run in this process, which is also what
lets tests patch the functions they run.

A worker dies with its parent: each watches its pipe from the parent (the
sentinel that ``multiprocessing`` gives a spawned child, which only the
parent holds open) and exits when it closes, so a build killed by any signal,
``kill -9`` or the out-of-memory killer included, leaves no idle workers, and
the resource tracker they kept alive then exits too.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor


class Workers:
    """A spawn-context process pool started once for all passes (or none for one worker).

    Usage::

        with Workers(4) as pool:
            counts = list(pool.map(count_scan, jobs))   # fn must be importable (a module-level function)
    """

    def __init__(self, workers: int):
        self.workers, self._pool = workers, None

    def __enter__(self) -> Workers:
        if self.workers > 1:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=exit_with_parent)
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def map(self, fn: Callable, jobs: list) -> Iterable | Iterator:
        """``fn(job)`` for every job; results in job order, each as soon as it and those before it are done."""
        if self._pool is None or len(jobs) < 2:
            return map(fn, jobs)
        return self._pool.map(fn, jobs)


def exit_with_parent() -> None:
    """In a spawned worker: exit at once when the parent process is gone (its pipe to this worker closed)."""
    parent = multiprocessing.parent_process()
    if parent is None:  # not a spawned child (called in the main process): nothing to watch
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)  # no clean-up: the parent that would collect the results is gone

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
