"""Durability modes: how much an acknowledged write survives.

This module is the one place that knows the modes; the LMDB engine, its
group committer and the command line all check a mode with
L{check_durability}. The modes are modelled on Redis ``appendfsync``.
"Acknowledged" means the Deferred from the engine's ``put`` fired with a result.

``always`` (default; the only mode whose acks may count toward a quorum W)
    LMDB ``sync=True, metasync=True``: every group commit is fsynced before
    any write in it is acknowledged. Process crash (kill -9): loses nothing
    acknowledged. Power loss or kernel crash: loses nothing acknowledged
    (provided the disk honours fsync).

``batch``
    ``sync=False``; the committer calls ``env.sync(True)`` at least every
    ``batch_interval`` seconds (default 1 s) while there are unsynced commits.
    Writes are acknowledged after commit, before the sync. Process crash:
    loses nothing acknowledged (committed pages are in the OS page cache).
    Power loss or kernel crash: may lose the writes acknowledged since the
    last sync, about ``batch_interval`` (~1 s) of them. LMDB documents that
    without sync the database stays intact only if the file system preserves
    write order; otherwise such a crash can also corrupt the file. A failed
    ``env.sync`` fail-stops the engine like a failed commit.

``os``
    ``sync=False`` and never an explicit sync while running (one at a clean
    stop): the kernel writes dirty pages back when it likes (about 30 s on
    Linux, ``vm.dirty_expire_centisecs``). Process crash: loses nothing
    acknowledged. Power loss or kernel crash: may lose ~30 s of acknowledged
    writes, with the same corruption caveat as ``batch``; write-back errors
    are never seen by this process.
"""

from __future__ import annotations

DURABILITY_MODES = ("always", "batch", "os")


def check_durability(mode: str) -> str:
    """``mode`` if it names a durability mode; otherwise ValueError, listing the modes."""
    if mode not in DURABILITY_MODES:
        raise ValueError(f"unknown durability {mode!r}; use one of {', '.join(DURABILITY_MODES)}")
    return mode
