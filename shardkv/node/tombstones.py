"""Tombstone collection: forget deletes once every replica has surely seen them.

A delete leaves a tombstone so that a stale replica, a late hint or read
repair cannot bring the value back. After ``grace`` (longer than any hint or
outage should last) the tombstone is dropped. The scan runs in small steps
under C{cooperate}, so a large store never blocks the reactor. Each one
dropped is counted (``shardkv_tombstones_collected_total``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Cooperator

from shardkv.metrics import NodeMetrics, counter_value
from shardkv.periodic import periodic
from shardkv.storage.engine import StorageEngine

DEFAULT_GRACE_SECONDS = 24 * 3600


class TombstoneCollector:
    def __init__(
        self,
        engine: StorageEngine,
        now_ms: Callable[[], int],
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        step: int = 200,
        cooperator: Cooperator | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        """``metrics``: where collections are counted (default: a private registry)."""
        self._engine = engine
        self._now_ms = now_ms
        self._grace_ms = int(grace_seconds * 1000)
        self._step = step
        self._cooperator = cooperator or Cooperator()
        self._collected = (metrics or NodeMetrics.private()).tombstones_collected

    @property
    def collected(self) -> int:
        """Tombstones dropped so far (read from the registry)."""
        return int(counter_value(self._collected))

    def collect(self) -> Deferred[Any]:
        """One pass over the store; fires when done."""
        return self._cooperator.cooperate(self._pass()).whenDone()

    def _pass(self) -> Iterator[Deferred[Any] | None]:
        """Scan ``step`` records at a time; each step's removals commit as one group."""
        cutoff = self._now_ms() - self._grace_ms
        start = ""
        while True:
            batch = list(self._engine.scan(start, self._step + 1))
            removals = [
                self._engine.remove_tombstone(key, record).addCallback(self._count)
                for key, record in batch[: self._step]
                if record.tombstone and record.stored_ms <= cutoff
            ]
            yield DeferredList(removals) if removals else None
            if len(batch) <= self._step:
                return
            start = batch[self._step][0]

    def _count(self, removed: bool) -> bool:
        if removed:
            self._collected.inc()
        return removed

    def service(self, interval: float, clock: IReactorTime) -> TimerService:
        return periodic(interval, self.collect, clock)
