"""Hinted handoff: hand records kept for a down node back to it.

When a home replica is down, the coordinator writes the record to a stand-in
node with ``?hint_for=HOME``. The stand-in keeps it in its hint store (not
among its own records) and this loop pushes it to HOME once HOME answers
again. A hint is dropped only after HOME acknowledged it durably, and
HOME's newer-only write makes a repeated delivery harmless.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from shardkv.http.errors import ApiError
from shardkv.http.nodeclient import NodeBusy, NodeClient, NodeTimeout, NodeUnreachable
from shardkv.storage.engine import StorageEngine, StorageError

log = Logger(namespace="shardkv.node.handoff")


class HintHandoff:
    def __init__(
        self, engine: StorageEngine, client: NodeClient, batch: int = 200, window: int = 16
    ) -> None:
        self._engine = engine
        self._client = client
        self._batch = batch
        self._window = window
        self.delivered = 0

    async def deliver_all(self) -> None:
        for target in sorted(self._engine.hint_counts()):
            await self._deliver(target)

    async def _deliver(self, target: str) -> None:
        """Send up to one batch of hints to ``target``, ``window`` at a time."""
        hints = self._engine.hints(target, self._batch)
        for start in range(0, len(hints), self._window):
            chunk = hints[start : start + self._window]
            calls = [self._client.replica_put(target, key, rec) for key, rec in chunk]
            results = await DeferredList(calls, consumeErrors=True)
            for (ok, value), (key, record) in zip(results, chunk, strict=True):
                if ok:
                    await self._engine.remove_hint(target, key, record)
                    self.delivered += 1
                elif isinstance(value, Failure) and not value.check(
                    NodeUnreachable, NodeTimeout, NodeBusy, ApiError, StorageError
                ):
                    log.failure("handing a hint to {target}", value, target=target)
            if not all(ok for ok, _ in results):
                return

    def service(self, interval: float, clock: Any) -> TimerService:
        svc = TimerService(interval, lambda: Deferred.fromCoroutine(self.deliver_all()))
        svc.clock = clock
        return svc
