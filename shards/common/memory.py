"""glibc's allocator, set for training and prediction: freed memory stays in the process, not handed back to the kernel.

A training step allocates and frees the same large activation buffers every step. glibc serves large requests
with fresh ``mmap`` pages and returns freed memory at the top of the heap to the kernel, so each step pays for
the kernel to fault in and zero those pages again: measured, tens of thousands of minor page faults a
second, and more the more memory the process holds (a wide shuffle pool of blocks); BENCHMARKS.md, "Steps a
CPU-second and the allocator". ``keep_freed_memory`` turns both off (``mallopt``: no ``mmap`` for
allocations, no trimming). The cost: the process keeps its peak memory until it exits, which a training
process reaches in its first steps anyway.

``ATLAS_MALLOC=glibc`` leaves glibc's settings as they are. Elsewhere than glibc (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_MAX = -4
KEEP = 2**31 - 1  # mallopt takes an int: return memory at the heap's top only past 2 GiB free


def keep_freed_memory() -> bool:
    """Set glibc's allocator to keep freed memory (unless ``ATLAS_MALLOC=glibc``); True when it did."""
    if os.environ.get("ATLAS_MALLOC", "keep") == "glibc" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl has a mallopt that ignores its arguments
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP))
