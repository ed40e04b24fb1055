"""The proxy's service tree: the HTTP client, health checks, listeners."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString

from shardkv.core.placement import Ring
from shardkv.http.client import HTTPClientService
from shardkv.http.dataroutes import body_limit_for
from shardkv.http.nodeclient import NodeClient
from shardkv.http.site import make_site
from shardkv.proxy.app import ProxyApp
from shardkv.proxy.coordinator import Coordinator
from shardkv.proxy.health import HealthMonitor


def make_proxy_service(
    *,
    reactor: Any,
    nodes: Mapping[str, float],
    listen: Sequence[str],
    max_value_bytes: int,
    timeout: float,
    vnodes: int | None = None,
    pool_size: int = 64,
    health_interval: float = 1.0,
    access_log: bool = False,
) -> MultiService:
    service = MultiService()
    client = HTTPClientService(reactor, max_per_host=pool_size)
    client.setServiceParent(service)
    node_client = NodeClient(client, reactor, timeout)
    ring = Ring(nodes) if vnodes is None else Ring(nodes, vnodes=vnodes)
    health = HealthMonitor(ring.nodes, node_client.health, reactor, health_interval)
    health.service().setServiceParent(service)
    app = ProxyApp(Coordinator(ring, node_client, health), max_value_bytes)
    site = make_site(app.app.resource(), body_limit_for(max_value_bytes), access_log)
    for description in listen:
        endpoint = serverFromString(reactor, description)
        StreamServerEndpointService(endpoint, site).setServiceParent(service)
    return service
