"""Giving the memory of large request bodies back to the operating system.

A burst of 1 MiB writes makes the proxy hold a few hundred of them at once
(bodies coming in, copies going out to three replicas). glibc's malloc
serves allocations above its mmap threshold with ``mmap``, which ``free``
returns at once; but the threshold is dynamic, and after the first large
block is freed it rises to that block's size, so every later 1 MiB body
comes from the heap. Freed heap memory goes back only from the top of the
heap, and after a burst it is fragmented: the proxy stayed at four times
its idle RSS long after the load was gone.

Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``) turns the dynamic rise
off, so blocks of that size or more are always mapped and unmapped: after
a burst the RSS returns to near what it was within a second. The cost is
one ``mmap``/``munmap`` pair per large block, small beside copying a
megabyte. Where the C library is not glibc, nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger(namespace="shardkv.proxy.allocator")

M_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter number for the mmap threshold (malloc.h)."""
DEFAULT_MMAP_THRESHOLD = 128 << 10
"""glibc's own starting threshold: blocks from 128 KiB up are always mapped."""


def fix_mmap_threshold(
    threshold: int = DEFAULT_MMAP_THRESHOLD, libc_name: str | None = None
) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; False where that is not possible."""
    name = libc_name if libc_name is not None else ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))


class AllocatorTuning(Service):
    """Fixes the mmap threshold when the proxy starts (not at import: tests
    that only build a proxy service leave their own process alone)."""

    def __init__(self, threshold: int = DEFAULT_MMAP_THRESHOLD) -> None:
        self.threshold = threshold
        self.applied: bool | None = None

    def startService(self) -> None:
        super().startService()
        self.applied = fix_mmap_threshold(self.threshold)
        if not self.applied:
            log.info("not glibc: large request bodies may keep the proxy's memory after a burst")
