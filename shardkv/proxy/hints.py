"""What the proxy does for a replica that missed a write: find it a hint holder.

Once every target of a write has answered, each home replica that did not
acknowledge gets the record as a hint on another node (``?hint_for=HOME``),
which hands it back when HOME returns (L{shardkv.node.handoff}). A record
that no node could take waits here, in a bounded queue, and is retried every
second; only a proxy restart (or an overflowing queue) leaves it to read
repair. A record queued for a node that has since left the cluster map is
dropped: the node will never need it.

Counted in the proxy's L{ProxyMetrics}: each missed write sent looking for a
holder (``shardkv_hints_queued_total``), each one a node took
(``shardkv_hints_delivered_total``); what waits is read at scrape time.
"""

from __future__ import annotations

from collections.abc import Collection

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from shardkv.cluster.view import MapView
from shardkv.core.placement import Ring
from shardkv.core.quorum import AnyWriteQuorum, Outcome, Reply, Target
from shardkv.core.records import Record
from shardkv.metrics import ProxyMetrics
from shardkv.proxy.health import HealthMonitor
from shardkv.replica.client import ReplicaClient

log = Logger(namespace="shardkv.proxy.hints")

DEFAULT_MAX_UNDELIVERED = 100_000


class HintKeeper:
    def __init__(
        self,
        view: MapView | Ring,
        replica_client: ReplicaClient,
        health: HealthMonitor,
        max_undelivered: int = DEFAULT_MAX_UNDELIVERED,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        """``view``: the map whose rings place keys (a bare L{Ring}: fixed placement).
        ``metrics``: where hints are counted (default: a private registry)."""
        self.metrics = metrics if metrics is not None else ProxyMetrics.private()
        self.view = view
        self.replica_client = replica_client
        self.health = health
        self.max_undelivered = max_undelivered
        self.undelivered: dict[tuple[str, str], Record] = {}

    def waiting(self) -> dict[str, int]:
        """Records queued here, by the node they wait for."""
        counts: dict[str, int] = {}
        for home, _ in self.undelivered:
            counts[home] = counts.get(home, 0) + 1
        return counts

    @property
    def ring(self) -> Ring:
        """The ring writes go to now (the current one while a move runs)."""
        if isinstance(self.view, Ring):
            return self.view
        return self.view.write_rings()[-1]

    def _epoch(self) -> int | None:
        return None if isinstance(self.view, Ring) else self.view.epoch

    def _writes_to(self, node: str, key: str) -> bool:
        """A node the key has moved away from needs no hint (L{ClusterMap.writes_to})."""
        return isinstance(self.view, Ring) or self.view.current.writes_to(node, key)

    def _member(self, node: str) -> bool:
        return isinstance(self.view, Ring) or node in self.view.nodes()

    def missed(
        self,
        key: str,
        record: Record,
        quorum: AnyWriteQuorum,
        preference: list[str],
        n: int,
        newer: Collection[Target] = (),
    ) -> None:
        """Once every target answered: make sure each replica that missed the write gets it.

        Not for a write that failed everywhere: the client was told it was
        not applied, and a hint would apply it later. Nor for the targets in
        ``newer``: they refused it for holding a newer version (a one-round
        write's refusal), so they miss nothing.
        """
        if quorum.outcome() is Outcome.FAILED:
            return
        for target, reply in quorum.replies.items():
            if reply is Reply.OK or target in newer:
                continue
            home = target.hint_for or target.node
            holders = [p for p in preference[n:] + preference[:n] if p not in (home, target.node)]
            self.metrics.hints_queued.inc()
            Deferred.fromCoroutine(self._keep_for(home, key, record, holders))

    async def _keep_for(self, home: str, key: str, record: Record, holders: list[str]) -> None:
        """Hand ``record`` to the first live holder that takes it as a hint for
        ``home`` (or, when the holder is ``home`` itself, as its own copy), else
        queue it here."""
        for holder in holders:
            if self.health.is_down(holder):
                continue
            hint_for = None if holder == home else home
            try:
                await self.replica_client.replica_put(
                    holder, key, record, hint_for, epoch=self._epoch()
                )
            except Exception as e:
                self.health.call_failed(holder, e)
                continue
            self.metrics.hints_delivered.inc()
            return
        self._queue(home, key, record)

    def _queue(self, home: str, key: str, record: Record) -> None:
        slot = (home, key)
        queued = self.undelivered.get(slot)
        if queued is not None and queued.version >= record.version:
            return
        if queued is None and len(self.undelivered) >= self.max_undelivered:
            log.warn(
                "undelivered queue full; {home} gets {key!r} by read repair", home=home, key=key
            )
            return
        self.undelivered[slot] = record

    async def retry(self) -> None:
        """Deliver queued records to their home replicas, or to a holder as hints."""
        for (home, key), record in list(self.undelivered.items()):
            if self.undelivered.get((home, key)) is not record:
                continue
            del self.undelivered[(home, key)]
            if not self._member(home) or not self._writes_to(home, key):
                continue
            ring = self.ring
            preference = ring.preference_list(key, len(ring.nodes))
            await self._keep_for(home, key, record, [home, *(p for p in preference if p != home)])
