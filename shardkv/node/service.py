"""The node's service tree: the storage engine, then the HTTP listeners."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from shardkv.core.versions import VersionClock
from shardkv.errors import StorageStartupError
from shardkv.node.app import NodeApp
from shardkv.node.handoff import HintHandoff
from shardkv.node.store import NodeStore
from shardkv.node.tombstones import DEFAULT_GRACE_SECONDS, TombstoneCollector
from shardkv.periodic import cooperator_on
from shardkv.replica.client import ReplicaClient
from shardkv.storage.engine import StorageEngine
from shardkv.web.dataroutes import body_limit_for
from shardkv.web.httpclient import HTTPClientService
from shardkv.web.site import make_site

log = Logger(namespace="shardkv.node")


class NodeService(MultiService):
    """Opens the engine before listening and closes it after the last request.

    The engine is opened in startService, not at construction, because twistd
    may fork to daemonize in between and LMDB must not cross a fork.
    """

    def __init__(self, engine: StorageEngine) -> None:
        super().__init__()
        self.engine = engine

    def startService(self) -> None:
        try:
            self.engine.start()
        except StorageStartupError as e:
            # A clear one-line reason beats a traceback: the operator must act.
            message = f"shardkv: cannot start the node: {e}"
            log.critical("{message}", message=message)
            # twistd has replaced sys.stderr with its log by now; say it on the terminal too.
            print(message, file=sys.__stderr__, flush=True)
            raise SystemExit(1) from None
        super().startService()

    def stopService(self) -> Deferred[None]:
        d: Deferred[Any] = Deferred.fromCoroutine(self._stop())
        return d

    async def _stop(self) -> None:
        await super().stopService()
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
    handoff_interval: float = 1.0,
    tombstone_grace: float = DEFAULT_GRACE_SECONDS,
    peer_timeout: float = 2.0,
) -> NodeService:
    store = NodeStore(node_id, engine, VersionClock(node_id, now_ms), max_value_bytes, now_ms)
    app = NodeApp(store)
    site = make_site(
        app.app.resource(), body_limit_for(max_value_bytes, replica_routes=True), access_log
    )
    service = NodeService(engine)
    client = HTTPClientService(reactor, max_per_host=16)
    client.setServiceParent(service)
    handoff = HintHandoff(engine, ReplicaClient(client, reactor, peer_timeout, pipeline_depth=1))
    handoff.service(handoff_interval, reactor).setServiceParent(service)
    collector = TombstoneCollector(
        engine, now_ms, tombstone_grace, cooperator=cooperator_on(reactor)
    )
    collector.service(min(tombstone_grace, 3600.0), reactor).setServiceParent(service)
    for description in listen:
        endpoint = serverFromString(reactor, description)
        StreamServerEndpointService(endpoint, site).setServiceParent(service)
    return service
