"""The proxy's service tree: the HTTP client, health checks, listeners."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString

from shardkv.core.placement import Ring
from shardkv.core.quorum import QuorumSizes
from shardkv.core.versions import VersionClock
from shardkv.periodic import periodic
from shardkv.proxy.app import ProxyApp
from shardkv.proxy.coordinator import Coordinator
from shardkv.proxy.health import HealthMonitor
from shardkv.proxy.hints import HintKeeper
from shardkv.replica.client import ReplicaClient
from shardkv.web.dataroutes import body_limit_for
from shardkv.web.httpclient import HTTPClientService
from shardkv.web.site import make_site

DEFAULT_PIPELINE_DEPTH = 1
"""Batches in flight per node: enough to keep a node busy while the next
batch fills, few enough that batches grow under load."""


def make_proxy_service(
    *,
    reactor: Any,
    nodes: Mapping[str, float],
    listen: Sequence[str],
    max_value_bytes: int,
    timeout: float,
    vnodes: int | None = None,
    pool_size: int = 64,
    pipeline_depth: int = DEFAULT_PIPELINE_DEPTH,
    health_interval: float = 1.0,
    access_log: bool = False,
    replicas: int = 3,
    r: int = 2,
    w: int = 2,
    writer_id: str | None = None,
    clock_offset_ms: int = 0,
) -> MultiService:
    """The proxy: ring, node client, health checks and coordinator behind a Site.

    ``writer_id`` names this proxy in the versions it mints; a random
    incarnation suffix keeps two runs of one proxy from minting equal ones.
    """
    service = MultiService()
    client = HTTPClientService(reactor, max_per_host=pool_size)
    client.setServiceParent(service)
    replica_client = ReplicaClient(client, reactor, timeout, pipeline_depth)
    ring = Ring(nodes) if vnodes is None else Ring(nodes, vnodes=vnodes)
    health = HealthMonitor(ring.nodes, replica_client.health, reactor, health_interval)
    health.service().setServiceParent(service)
    writer = f"{writer_id or 'proxy'}.{secrets.token_hex(3)}"
    versions = VersionClock(writer, lambda: int(reactor.seconds() * 1000) + clock_offset_ms)
    hints = HintKeeper(ring, replica_client, health)
    periodic(1.0, hints.retry, reactor).setServiceParent(service)
    sizes = QuorumSizes(replicas, r, w)
    coordinator = Coordinator(ring, replica_client, health, versions, hints, sizes)
    app = ProxyApp(coordinator, max_value_bytes)
    site = make_site(app.app.resource(), body_limit_for(max_value_bytes), access_log)
    for description in listen:
        endpoint = serverFromString(reactor, description)
        StreamServerEndpointService(endpoint, site).setServiceParent(service)
    return service
