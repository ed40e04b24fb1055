"""The garbage collector and a long-running server's heap."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Hide what is alive once the services run from the garbage collector.

    That is some 65,000 objects (modules, classes, functions) that never
    die, and a full collection walks every one: 35-45 ms of CPU on a busy
    2-core box, with the reactor stopped. A node streaming a move ran one
    every 2-3 s, and each stalled the reads it held (bench/move.py).
    Frozen, they are never walked again, and a full collection costs what
    the objects made since cost.
    """
    gc.collect()
    gc.freeze()
