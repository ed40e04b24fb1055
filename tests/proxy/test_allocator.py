"""
Tests for L{shardkv.proxy.allocator}: freed large blocks go back to the OS.

The real test runs a fresh interpreter (the setting is process-wide, so it
must not touch the test runner's own): it makes glibc's dynamic threshold
rise, allocates 200 MiB in 1 MiB blocks with small survivors between them,
frees the large ones and reads its RSS from /proc. Without the fix the
memory stays; with it, it is gone.
"""

from __future__ import annotations

import ctypes.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shardkv.proxy.allocator import AllocatorTuning, fix_mmap_threshold

glibc = pytest.mark.skipif(
    not Path("/proc/self/status").exists() or not ctypes.util.find_library("c"),
    reason="needs Linux /proc and a C library",
)

PROBE = textwrap.dedent(
    """
    import re, sys
    from pathlib import Path
    from shardkv.proxy.allocator import fix_mmap_threshold

    def rss():
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmRSS:\\s+(\\d+)", status).group(1)) * 1024

    if sys.argv[1] == "fixed":
        assert fix_mmap_threshold()
    bytes(1 << 20)  # freed at once: glibc's dynamic threshold rises past 1 MiB
    before = rss()
    big, small = [], []
    for i in range(200):
        big.append(b"x" * (1 << 20))
        small.append(bytes(1000 + i))  # survivors between the blocks fragment the heap
    del big
    print((rss() - before) >> 20)
    """
)


def kept_mib(mode: str) -> int:
    """MiB still resident after allocating and freeing 200 MiB, in a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=30, check=True
    )
    return int(out.stdout.strip())


@glibc
def test_freed_bodies_leave_the_process_only_with_the_fixed_threshold() -> None:
    assert kept_mib("plain") > 150
    assert kept_mib("fixed") < 20


def test_no_such_library_changes_nothing() -> None:
    assert fix_mmap_threshold(libc_name="libshardkv-no-such-library.so") is False


def test_the_service_applies_it_when_started_not_when_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []

    def fake(threshold: int) -> bool:
        calls.append(threshold)
        return True

    monkeypatch.setattr("shardkv.proxy.allocator.fix_mmap_threshold", fake)
    service = AllocatorTuning(256 << 10)
    assert (calls, service.applied) == ([], None)
    service.startService()
    assert (calls, service.applied) == ([256 << 10], True)
