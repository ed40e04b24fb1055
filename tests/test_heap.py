"""The startup heap is frozen, and cyclic garbage is collected on a timer."""

from __future__ import annotations

import gc
import weakref
from typing import cast

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.task import Clock

from shardkv import heap
from shardkv.heap import freeze_startup_heap, garbage_collector


def test_the_objects_alive_at_start_are_frozen() -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_the_collector_frees_cyclic_garbage_each_interval_once_the_heap_is_frozen() -> None:
    """
    A reference cycle made before the heap is frozen waits (the freeze
    collects anyway); once frozen, each interval's collection frees what
    became garbage since, without waiting for more allocations.
    """
    clock = Clock()
    service = garbage_collector(clock, interval=2.0)
    gc.disable()
    try:
        gc.unfreeze()
        cycle = _Cycle()
        gone = weakref.ref(cycle)
        del cycle
        service.startService()
        assert gone() is not None  # the first run, before the freeze, does nothing
        gc.freeze()
        cycle = _Cycle()
        gone = weakref.ref(cycle)
        del cycle
        clock.advance(1.9)
        assert gone() is not None
        clock.advance(0.1)
        assert gone() is None
    finally:
        service.stopService()
        gc.unfreeze()
        gc.enable()


def test_every_service_tree_has_the_collector() -> None:
    from twisted.internet.testing import MemoryReactorClock

    from shardkv import tap

    for args in (["node", "--storage", "memory"], ["proxy"]):
        options = tap.Options()
        options.parseOptions(args)
        service = tap.makeService(options, MemoryReactorClock())
        timers = [s for s in cast(MultiService, service) if isinstance(s, TimerService)]
        assert any(t.call[0] is heap._collect for t in timers), args
