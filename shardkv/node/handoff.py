"""Hinted handoff: hand records kept for a down node back to it.

When a home replica is down, the coordinator writes the record to a stand-in
node with ``?hint_for=HOME``. The stand-in keeps it in its hint store (not
among its own records) and this loop pushes it to HOME once HOME answers
again. A hint is dropped only after HOME acknowledged it durably, and
HOME's newer-only write makes a repeated delivery harmless. Each delivery is
counted in the node's L{NodeMetrics} (``shardkv_handoff_delivered_total``).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.internet import TimerService
from twisted.internet.defer import DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from shardkv.core.clustermap import ClusterMap
from shardkv.errors import ReplicaCallFailed, StorageError
from shardkv.metrics import NodeMetrics, counter_value
from shardkv.periodic import periodic
from shardkv.replica.client import ReplicaClient
from shardkv.storage.engine import StorageEngine

log = Logger(namespace="shardkv.node.handoff")


class HintHandoff:
    def __init__(
        self,
        engine: StorageEngine,
        client: ReplicaClient,
        batch: int = 200,
        window: int = 16,
        metrics: NodeMetrics | None = None,
        cluster_map: Callable[[], ClusterMap | None] = lambda: None,
    ) -> None:
        """``metrics``: where deliveries are counted (default: a private registry);
        ``cluster_map``: the node's learned map, by which a hint for a node that no
        longer holds its key is dropped (L{ClusterMap.writes_to})."""
        self._engine = engine
        self._map = cluster_map
        self._client = client
        self._batch = batch
        self._window = window
        self._delivered = (metrics or NodeMetrics.private()).handoff_delivered

    @property
    def delivered(self) -> int:
        """Hints handed back so far (read from the registry)."""
        return int(counter_value(self._delivered))

    async def deliver_all(self) -> None:
        for target in sorted(self._engine.hint_counts()):
            await self._deliver(target)

    async def _deliver(self, target: str) -> None:
        """Send up to one batch of hints to ``target``, ``window`` at a time."""
        hints = self._engine.hints(target, self._batch)
        m = self._map()
        if m is not None:
            needed = []
            for key, record in hints:
                if m.writes_to(target, key):
                    needed.append((key, record))
                else:
                    await self._engine.remove_hint(target, key, record)
            hints = needed
        for start in range(0, len(hints), self._window):
            chunk = hints[start : start + self._window]
            calls = [self._client.replica_put(target, key, rec) for key, rec in chunk]
            results = await DeferredList(calls, consumeErrors=True)
            for (ok, value), (key, record) in zip(results, chunk, strict=True):
                if ok:
                    await self._engine.remove_hint(target, key, record)
                    self._delivered.inc()
                elif isinstance(value, Failure) and not value.check(
                    ReplicaCallFailed, StorageError
                ):
                    log.failure("handing a hint to {target}", value, target=target)
            if not all(ok for ok, _ in results):
                return

    def service(self, interval: float, clock: IReactorTime) -> TimerService:
        return periodic(interval, self.deliver_all, clock)
