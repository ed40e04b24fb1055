"""The startup heap is frozen: a full collection no longer walks it."""

from __future__ import annotations

import gc

from shardkv.heap import freeze_startup_heap


def test_the_objects_alive_at_start_are_frozen() -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
