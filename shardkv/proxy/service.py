"""The proxy's service tree: the HTTP client, health checks, listeners."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.application.service import MultiService

from shardkv.core.placement import Ring
from shardkv.core.quorum import QuorumSizes
from shardkv.core.versions import VersionClock
from shardkv.periodic import periodic
from shardkv.proxy.allocator import AllocatorTuning
from shardkv.proxy.app import ProxyApp
from shardkv.proxy.coordinator import Coordinator
from shardkv.proxy.health import HealthMonitor
from shardkv.proxy.hints import HintKeeper
from shardkv.proxy.members import MemberAnnouncer
from shardkv.replica.client import DEFAULT_NODE_INFLIGHT_BYTES, ReplicaClient
from shardkv.web.auth import Guard
from shardkv.web.dataroutes import body_limit_for
from shardkv.web.httpclient import HTTPClientService
from shardkv.web.listening import listening_service
from shardkv.web.site import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DESCRIPTOR_HEADROOM,
    PROXY_MAX_INFLIGHT_BYTES,
    make_site,
)

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
    node_inflight_bytes: int = DEFAULT_NODE_INFLIGHT_BYTES,
    health_interval: float = 1.0,
    access_log: bool = False,
    echo_errors: bool = True,
    replicas: int = 3,
    r: int = 2,
    w: int = 2,
    writer_id: str | None = None,
    clock_offset_ms: int = 0,
    token: str | None = None,
    client_token: str | None = None,
    urls: Mapping[str, str] | None = None,
    ca_file: str | None = None,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_inflight_bytes: int = PROXY_MAX_INFLIGHT_BYTES,
) -> MultiService:
    """The proxy: ring, node client, health checks and coordinator behind a Site.

    ``writer_id`` names this proxy in the versions it mints; a random
    incarnation suffix keeps two runs of one proxy from minting equal ones.
    ``token`` is the cluster token, sent to nodes and required on admin routes
    (None: protected mode); ``client_token`` guards the data API. ``urls`` gives
    nodes' base URLs (``https://host:port``; default ``http://{node}``), and
    ``ca_file`` the CAs their certificates must chain to.
    """
    service = MultiService()
    AllocatorTuning().setServiceParent(service)
    client = HTTPClientService(reactor, max_per_host=pool_size, token=token, ca_file=ca_file)
    client.setServiceParent(service)
    replica_client = ReplicaClient(
        client, reactor, timeout, pipeline_depth, urls=urls, node_inflight_bytes=node_inflight_bytes
    )
    ring = Ring(nodes) if vnodes is None else Ring(nodes, vnodes=vnodes)
    announcer = MemberAnnouncer(ring.nodes, replica_client.health, replica_client)
    health = HealthMonitor(ring.nodes, announcer.check, reactor, health_interval)
    health.service().setServiceParent(service)
    writer = f"{writer_id or 'proxy'}.{secrets.token_hex(3)}"
    versions = VersionClock(writer, lambda: int(reactor.seconds() * 1000) + clock_offset_ms)
    hints = HintKeeper(ring, replica_client, health)
    periodic(1.0, hints.retry, reactor).setServiceParent(service)
    sizes = QuorumSizes(replicas, r, w)
    coordinator = Coordinator(ring, replica_client, health, versions, hints, sizes)
    app = ProxyApp(coordinator, max_value_bytes, Guard(token, client_token))
    site = make_site(
        app.resource(),
        body_limit_for(max_value_bytes),
        access_log,
        reactor=reactor,
        header_timeout=header_timeout,
        max_connections=max_connections,
        max_inflight_bytes=max_inflight_bytes,
        descriptor_headroom=DESCRIPTOR_HEADROOM + pool_size * len(nodes),
    )
    for description in listen:
        listener = listening_service(reactor, description, site, owner="proxy", echo=echo_errors)
        listener.setServiceParent(service)
    return service
