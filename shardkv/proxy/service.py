"""The proxy's service tree: the HTTP client, the cluster map, health checks, listeners.

The proxy routes by the cluster map on its nodes (L{shardkv.cluster}): it
starts from a provisional map of ``--nodes`` and its L{MapSync} bootstraps
(or adopts) the real one at start, then keeps up with it. The parts are
kept on the returned L{ProxyService} (L{ProxyParts}), so that the admin
routes can use the same view, proposer and sync.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application.service import IService, MultiService
from twisted.internet.interfaces import IProtocolFactory

from shardkv.cluster.proposer import MapProposer
from shardkv.cluster.sync import MapSync
from shardkv.cluster.view import MapView
from shardkv.core.placement import DEFAULT_VNODES
from shardkv.core.quorum import QuorumSizes
from shardkv.core.versions import VersionClock
from shardkv.metrics import ProxyMetrics
from shardkv.periodic import periodic
from shardkv.proxy.allocator import AllocatorTuning
from shardkv.proxy.app import ProxyApp
from shardkv.proxy.changes import MembershipAdmin
from shardkv.proxy.coordinator import Coordinator
from shardkv.proxy.health import HealthMonitor
from shardkv.proxy.hints import HintKeeper
from shardkv.proxy.rebalancer import Rebalancer
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


class NodeURLs(Mapping[str, str]):
    """Each node's base URL: the one given for it, else ``{scheme}://{node}``.

    Members that join later are named by id only, so they are reached with
    the scheme of the ``--nodes`` entries (https with ``--ca-file``)."""

    def __init__(self, given: Mapping[str, str], scheme: str) -> None:
        self.given = dict(given)
        self.scheme = scheme

    def __getitem__(self, node: str) -> str:
        return self.given.get(node) or f"{self.scheme}://{node}"

    def __iter__(self) -> Iterator[str]:
        return iter(self.given)

    def __len__(self) -> int:
        return len(self.given)


@dataclass
class ProxyParts:
    """What a proxy is made of, for the app (and its admin routes) to use."""

    reactor: Any
    replica_client: ReplicaClient
    view: MapView
    proposer: MapProposer
    sync: MapSync
    health: HealthMonitor
    hints: HintKeeper
    coordinator: Coordinator
    guard: Guard
    max_value_bytes: int
    rebalance_rate: int = 0
    metrics: ProxyMetrics | None = None


class ProxyService(MultiService):
    """The proxy's tree, with its L{ProxyParts} and app."""

    parts: ProxyParts
    app: Any


def default_app(parts: ProxyParts, app_class: Callable[..., ProxyApp] = ProxyApp) -> ProxyApp:
    """The proxy's app with its admin routes and the move's orchestration.

    ``app_class`` makes it: L{ProxyApp}, or a worker's (L{shardkv.proxy.workers}).
    """
    nodes, reactor = parts.replica_client, parts.reactor
    rebalancer = Rebalancer(parts.view, parts.sync, parts.proposer, nodes, reactor)
    admin = MembershipAdmin(
        parts.view,
        parts.sync,
        parts.proposer,
        nodes,
        reactor,
        rate=parts.rebalance_rate,
        status=rebalancer.status,
    )
    return app_class(
        parts.coordinator,
        parts.max_value_bytes,
        parts.guard,
        admin=admin,
        rebalancer=rebalancer,
        metrics=parts.metrics,
    )


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
    rebalance_rate: int = 0,
    map_interval: float = 1.0,
    app_factory: Callable[[ProxyParts], Any] = default_app,
    listener: Callable[[str, IProtocolFactory], IService] | None = None,
) -> ProxyService:
    """The proxy: ring, node client, health checks and coordinator behind a Site.

    ``writer_id`` names this proxy in the versions it mints; a random
    incarnation suffix keeps two runs of one proxy from minting equal ones.
    ``token`` is the cluster token, sent to nodes and required on admin routes
    (None: protected mode); ``client_token`` guards the data API. ``urls`` gives
    nodes' base URLs (``https://host:port``; default ``http://{node}``), and
    ``ca_file`` the CAs their certificates must chain to. ``nodes``, ``replicas``,
    ``r``, ``w`` and ``vnodes`` seed the cluster map on blank nodes; nodes that hold
    a map win. ``map_interval``: seconds between polls of the nodes' maps.
    ``app_factory`` builds the Klein app from the parts (default: L{ProxyApp}).
    ``listener`` makes the service that serves the site on one ``listen``
    endpoint (default: L{listening_service}, which listens itself; a worker of
    ``--workers`` adopts its parent's socket instead).
    """
    service = ProxyService()
    # This service's own registry: several services may share a process.
    metrics = ProxyMetrics(CollectorRegistry())
    AllocatorTuning().setServiceParent(service)
    client = HTTPClientService(reactor, max_per_host=pool_size, token=token, ca_file=ca_file)
    client.setServiceParent(service)
    given = dict(urls or {})
    https = ca_file is not None or any(u.startswith("https://") for u in given.values())
    replica_client = ReplicaClient(
        client,
        reactor,
        timeout,
        pipeline_depth,
        urls=NodeURLs(given, "https" if https else "http"),
        node_inflight_bytes=node_inflight_bytes,
        metrics=metrics.replica,
    )
    sizes = QuorumSizes(replicas, r, w)
    vnodes = DEFAULT_VNODES if vnodes is None else vnodes
    view = MapView.from_nodes(nodes, sizes, vnodes, clock=reactor)
    replica_client.newer_map = view.receive_json
    writer = f"{writer_id or 'proxy'}.{secrets.token_hex(3)}"
    proposer = MapProposer(replica_client, writer, reactor, random.Random())
    sync = MapSync(
        view, proposer, replica_client, reactor, nodes, sizes, vnodes, interval=map_interval
    )
    replica_client.newer_epoch = sync.notice
    health = HealthMonitor(
        view.nodes(),
        sync.health_check(replica_client.health),
        reactor,
        health_interval,
        metrics=metrics,
    )
    view.subscribe(lambda m: health.follow(m.acceptors()))
    health.service().setServiceParent(service)
    versions = VersionClock(writer, lambda: int(reactor.seconds() * 1000) + clock_offset_ms)
    hints = HintKeeper(view, replica_client, health, metrics=metrics)
    periodic(1.0, hints.retry, reactor).setServiceParent(service)
    sync.service().setServiceParent(service)
    coordinator = Coordinator(view, replica_client, health, versions, hints, metrics=metrics)
    guard = Guard(token, client_token)
    parts = ProxyParts(
        reactor,
        replica_client,
        view,
        proposer,
        sync,
        health,
        hints,
        coordinator,
        guard,
        max_value_bytes,
        rebalance_rate,
        metrics,
    )
    app = app_factory(parts)
    service.parts, service.app = parts, app
    rebalancer = app.rebalancer if isinstance(app, ProxyApp) else None
    if rebalancer is not None:
        rebalancer.service().setServiceParent(service)
    _watch(metrics, parts, rebalancer)
    site = make_site(
        app.resource(),
        body_limit_for(max_value_bytes),
        access_log,
        reactor=reactor,
        header_timeout=header_timeout,
        max_connections=max_connections,
        max_inflight_bytes=max_inflight_bytes,
        descriptor_headroom=DESCRIPTOR_HEADROOM + pool_size * len(nodes),
        metrics=metrics.http,
    )
    for description in listen:
        if listener is None:
            serving: IService = listening_service(
                reactor, description, site, owner="proxy", echo=echo_errors
            )
        else:
            serving = listener(description, site)
        serving.setServiceParent(service)
    return service


def _watch(metrics: ProxyMetrics, parts: ProxyParts, rebalancer: Rebalancer | None) -> None:
    """The proxy's state as gauges, read from its parts whenever ``/metrics`` is scraped."""
    health, hints, view = parts.health, parts.hints, parts.view

    def up() -> list[tuple[str, bool]]:
        return [(node, s.status == "up") for node, s in sorted(health.states.items())]

    def waiting() -> list[tuple[str, int]]:
        queued = hints.waiting()
        nodes = sorted(set(health.states) | set(queued))
        return [(node, health.hints_waiting(node) + queued.get(node, 0)) for node in nodes]

    metrics.watch(
        up=up,
        hints_waiting=waiting,
        epoch=lambda: view.epoch,
        rebalance=None if rebalancer is None else rebalancer.status,
    )
