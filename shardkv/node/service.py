"""The node's service tree: the storage engine and the cluster map, then the HTTP listeners."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from shardkv.core.clustermap import ClusterMap
from shardkv.core.versions import VersionClock
from shardkv.errors import ShardkvError, StorageStartupError
from shardkv.metrics import NodeMetrics
from shardkv.node.app import NodeApp
from shardkv.node.handoff import HintHandoff
from shardkv.node.mapstore import MapStore
from shardkv.node.members import MemberOnlyClient, Members
from shardkv.node.mover import Mover
from shardkv.node.store import NodeStore
from shardkv.node.tombstones import DEFAULT_GRACE_SECONDS, TombstoneCollector
from shardkv.periodic import cooperator_on
from shardkv.replica.protocol import FENCE_GRACE
from shardkv.storage.engine import StorageEngine
from shardkv.web.auth import Guard
from shardkv.web.dataroutes import body_limit_for
from shardkv.web.httpclient import HTTPClientService, SchemeURLs
from shardkv.web.listening import listening_service
from shardkv.web.site import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    NODE_MAX_INFLIGHT_BYTES,
    make_site,
)

log = Logger(namespace="shardkv.node")


class NodeService(MultiService):
    """Opens the engine before listening and closes it after the last request.

    The engine is opened in startService, not at construction, because twistd
    may fork to daemonize in between and LMDB must not cross a fork. The map
    store reads its state from the engine right after (so the fence holds
    from the first request), and the mover resumes a move only then.
    """

    def __init__(
        self, engine: StorageEngine, mapstore: MapStore | None = None, mover: Mover | None = None
    ) -> None:
        super().__init__()
        self.engine = engine
        self.mapstore = mapstore
        self.mover = mover

    def startService(self) -> None:
        try:
            self.engine.start()
            if self.mapstore is not None:
                self.mapstore.load()
        except StorageStartupError as e:
            # A clear one-line reason beats a traceback: the operator must act.
            message = f"shardkv: cannot start the node: {e}"
            log.critical("{message}", message=message)
            # twistd has replaced sys.stderr with its log by now; say it on the terminal too.
            print(message, file=sys.__stderr__, flush=True)
            raise SystemExit(1) from None
        if self.mover is not None:
            self.mover.start()
        super().startService()

    def stopService(self) -> Deferred[None]:
        d: Deferred[Any] = Deferred.fromCoroutine(self._stop())
        return d

    async def _stop(self) -> None:
        await super().stopService()
        if self.mover is not None:
            self.mover.stop()
        await self.engine.stop()


def make_node_service(
    *,
    reactor: Any,
    node_id: str,
    engine: StorageEngine,
    listen: Sequence[str],
    max_value_bytes: int,
    now_ms: Callable[[], int],
    access_log: bool = False,
    echo_errors: bool = True,
    handoff_interval: float = 1.0,
    tombstone_grace: float = DEFAULT_GRACE_SECONDS,
    peer_timeout: float = 2.0,
    token: str | None = None,
    members: Iterable[str] | None = None,
    ca_file: str | None = None,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_inflight_bytes: int = NODE_MAX_INFLIGHT_BYTES,
) -> NodeService:
    """``token``: the cluster token (None: protected mode); ``members``: the cluster's
    nodes if known now (otherwise the proxy tells them). With ``ca_file`` the node
    hands hints to its peers over https, verified against that CA: a hint names its
    target by id only, so one scheme serves every peer, and a cluster is all TLS or not.
    """
    # This service's own registry: several services may share a process.
    metrics = NodeMetrics(CollectorRegistry())
    instrument = getattr(engine, "instrument", None)
    if callable(instrument):
        instrument(metrics.storage)
    known = Members(members)
    versions = VersionClock(node_id, now_ms)
    mapstore = MapStore(node_id, engine, reactor, FENCE_GRACE)
    store = NodeStore(
        node_id, engine, versions, max_value_bytes, now_ms, members=known, mapstore=mapstore
    )
    client = HTTPClientService(reactor, max_per_host=16, token=token, ca_file=ca_file)
    urls = None if ca_file is None else SchemeURLs("https")
    peers = MemberOnlyClient(
        known,
        client,
        reactor,
        peer_timeout,
        pipeline_depth=1,
        urls=urls,
        epoch=lambda: mapstore.epoch or None,
        metrics=metrics.replica,
    )
    peers.newer_map = partial(_learn_from_peer, mapstore)
    mover = Mover(node_id, engine, mapstore, peers, reactor)
    app = NodeApp(store, Guard(token), mover=mover, metrics=metrics)
    metrics.watch(
        storage=lambda: engine.health().details,
        hints_waiting=engine.hint_counts,
        epoch=lambda: mapstore.epoch or 0,
    )
    service = NodeService(engine, mapstore, mover)
    client.setServiceParent(service)
    site = make_site(
        app.resource(),
        body_limit_for(max_value_bytes, replica_routes=True),
        access_log,
        reactor=reactor,
        header_timeout=header_timeout,
        max_connections=max_connections,
        max_inflight_bytes=max_inflight_bytes,
        metrics=metrics.http,
    )
    handoff = HintHandoff(engine, peers, metrics=metrics, cluster_map=lambda: mapstore.learned)
    handoff.service(handoff_interval, reactor).setServiceParent(service)
    collector = TombstoneCollector(
        engine, now_ms, tombstone_grace, cooperator=cooperator_on(reactor), metrics=metrics
    )
    collector.service(min(tombstone_grace, 3600.0), reactor).setServiceParent(service)
    for description in listen:
        listener = listening_service(reactor, description, site, owner="node", echo=echo_errors)
        listener.setServiceParent(service)
    return service


def _learn_from_peer(mapstore: MapStore, map_json: dict[str, Any]) -> None:
    """A peer refused a hint as stale and sent its map: learn it too.

    A node holds only maps a majority chose, so the peer's is safe to take;
    it spares this node the wait for the proxy's next push, and the hints go
    out again at the new epoch."""
    try:
        m = ClusterMap.from_json(map_json)
    except ShardkvError as e:
        log.warn("a peer sent a map that does not parse: {error}", error=e.message)
        return
    d = mapstore.learn(m)
    d.addErrback(
        lambda f: log.warn(
            "could not learn map epoch {epoch} from a peer: {error}",
            epoch=m.epoch,
            error=f.getErrorMessage(),
        )
    )
