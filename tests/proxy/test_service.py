"""
Tests of the proxy's service tree (L{shardkv.proxy.service}), built directly.

The tree runs on a L{MemoryReactorClock}: listeners and connections to the
nodes are recorded, not made, and time moves only when a test advances it.
C{tests/test_tap.py} checks that the command line reaches
L{make_proxy_service}; these tests check what the factory builds from it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, cast

import pytest
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.testing import MemoryReactorClock

import shardkv.proxy.service as proxy_service
from shardkv.core.quorum import QuorumSizes
from shardkv.proxy.allocator import AllocatorTuning
from shardkv.proxy.coordinator import Coordinator
from shardkv.proxy.service import make_proxy_service
from shardkv.web.dataroutes import SMALL_BODY_LIMIT
from shardkv.web.httpclient import HTTPClientService
from shardkv.web.listening import ListeningService
from shardkv.web.site import LimitedRequest, QuietSite

NODES = {"127.0.0.1:9101": 1.0, "127.0.0.1:9102": 2.0, "127.0.0.1:9103": 1.0}
ENDPOINTS = ["tcp:9100:interface=127.0.0.1", "tcp:9200:interface=127.0.0.2"]
INCARNATION = re.compile(r"[0-9a-f]{6}")


@pytest.fixture
def coordinators(monkeypatch: pytest.MonkeyPatch) -> list[Coordinator]:
    """
    Every L{Coordinator} the proxy factory builds, as it built it.

    The coordinator sits behind Klein and the site's wrappers; recording the
    real one at construction reads its settings without reaching through
    private attributes.
    """
    made: list[Coordinator] = []

    def record(*args: Any, **kwargs: Any) -> Coordinator:
        coordinator = Coordinator(*args, **kwargs)
        made.append(coordinator)
        return coordinator

    monkeypatch.setattr(proxy_service, "Coordinator", record)
    return made


def build(
    reactor: MemoryReactorClock, listen: Sequence[str] = ENDPOINTS, **kwargs: Any
) -> MultiService:
    return make_proxy_service(
        reactor=reactor,
        nodes=NODES,
        listen=listen,
        max_value_bytes=kwargs.pop("max_value_bytes", 1000),
        timeout=kwargs.pop("timeout", 0.5),
        **kwargs,
    )


def timers(service: MultiService) -> list[TimerService]:
    return [s for s in service if isinstance(s, TimerService)]


def client(service: MultiService) -> HTTPClientService:
    (found,) = [s for s in service if isinstance(s, HTTPClientService)]
    return found


# -- the tree ----------------------------------------------------------------------


def test_tree_has_client_timers_and_one_listener_per_endpoint() -> None:
    """
    If a proxy is built, then its tree holds, in start order, the allocator
    tuning (L{shardkv.proxy.allocator}), the HTTP client, the health timer
    (at the given interval), the hint-retry timer (every second), the map
    sync's timer (bootstrap retries every half second, then polls), the
    rebalancer's step (every half second) and one listener per endpoint;
    once started, each listener listens where its endpoint says, all serving
    one site.
    """
    reactor = MemoryReactorClock()
    service = build(reactor, health_interval=7.0)
    assert [type(child) for child in service] == [
        AllocatorTuning,
        HTTPClientService,
        TimerService,
        TimerService,
        TimerService,
        TimerService,
        ListeningService,
        ListeningService,
    ]
    assert [timer.step for timer in timers(service)] == [7.0, 1.0, 0.5, 0.5]
    service.startService()
    assert all(child.running for child in service)
    listened = [(port, interface) for port, _, _, interface in reactor.tcpServers]
    assert listened == [(9100, "127.0.0.1"), (9200, "127.0.0.2")]
    first, second = (factory for _, factory, _, _ in reactor.tcpServers)
    assert isinstance(first, QuietSite)
    assert first is second


def test_no_endpoints_no_listeners() -> None:
    """
    If a proxy is given no endpoints, then it listens on nothing: the default
    port is the command line's business, not the factory's.
    """
    reactor = MemoryReactorClock()
    service = build(reactor, listen=[])
    service.startService()
    assert reactor.tcpServers == []
    assert [type(child) for child in service] == [
        AllocatorTuning,
        HTTPClientService,
        TimerService,
        TimerService,
        TimerService,
        TimerService,
    ]


def test_health_checks_every_node_at_start_through_the_pool() -> None:
    """
    If the proxy starts, then it checks every node's health at once, through
    its own client on the given reactor, whose pool keeps C{pool_size}
    connections per node; stopping waits for the checks in flight, which
    give up after C{timeout}.
    """
    reactor = MemoryReactorClock()
    service = build(reactor, timeout=0.5, pool_size=5)
    service.startService()
    # Each node gets its health check and the map's bootstrap (a prepare).
    reached = [f"{host}:{port}" for host, port, *_ in reactor.tcpClients]
    assert sorted(set(reached)) == sorted(NODES)
    assert all(reached.count(node) == 2 for node in NODES)
    agent = client(service).agent
    assert agent is not None
    assert agent.max_per_host == 5
    stopped = service.stopService()
    reactor.advance(0.49)
    assert not stopped.called
    reactor.advance(0.02)
    assert stopped.called
    assert not any(child.running for child in service)


def test_site_refuses_replica_bodies_and_logs_if_asked() -> None:
    """
    If a proxy is built with a value limit and an access log, then its site
    holds C{/kv} bodies to that limit, refuses the node-only replica routes'
    bodies before reading them, and logs each request.
    """
    reactor = MemoryReactorClock()
    service = build(reactor, max_value_bytes=100_000, access_log=True)
    service.startService()
    ((_, site, _, _), _) = reactor.tcpServers
    assert isinstance(site, QuietSite)
    assert issubclass(site.requestFactory, LimitedRequest)
    limit = cast(type[LimitedRequest], site.requestFactory).body_limit
    assert limit(b"PUT", b"/kv/k") == 100_000
    assert limit(b"PUT", b"/replica/kv/k") == SMALL_BODY_LIMIT
    assert limit(b"POST", b"/replica/batch") == SMALL_BODY_LIMIT
    assert site.access_log


# -- the coordinator -------------------------------------------------------------


def test_coordinator_gets_the_quorum_sizes(coordinators: list[Coordinator]) -> None:
    """
    If a proxy is built with C{replicas}, C{r} and C{w}, then its coordinator
    defaults to exactly those sizes, over a ring of the given nodes and
    weights.
    """
    build(MemoryReactorClock(), replicas=3, r=1, w=3)
    (coordinator,) = coordinators
    assert coordinator.sizes == QuorumSizes(3, 1, 3)
    assert list(coordinator.ring.nodes) == list(NODES)
    assert [coordinator.ring.weight(node) for node in NODES] == list(NODES.values())


def test_default_quorum_sizes(coordinators: list[Coordinator]) -> None:
    """
    If a proxy is given no quorum settings, then it keeps three copies and
    reads and writes two, so R + W > N.
    """
    build(MemoryReactorClock())
    (coordinator,) = coordinators
    assert coordinator.sizes == QuorumSizes(3, 2, 2)


def test_versions_name_the_proxy_and_its_incarnation(coordinators: list[Coordinator]) -> None:
    """
    If a proxy named C{edge-1} mints a version, then its writer is
    C{edge-1.<6 hex digits>}, and a second build of the same proxy has a
    different suffix.

    Two runs of one proxy (a restart within one millisecond, or a clock set
    back) must never mint equal versions for different values.
    """
    build(MemoryReactorClock(), writer_id="edge-1")
    build(MemoryReactorClock(), writer_id="edge-1")
    writers = [c.versions.mint(None).writer for c in coordinators]
    for writer in writers:
        name, _, suffix = writer.rpartition(".")
        assert name == "edge-1"
        assert INCARNATION.fullmatch(suffix), writer
    assert writers[0] != writers[1]


def test_unnamed_proxy_is_called_proxy(coordinators: list[Coordinator]) -> None:
    """If a proxy is given no writer id, then its versions say C{proxy.<6 hex>}."""
    build(MemoryReactorClock())
    (coordinator,) = coordinators
    name, _, suffix = coordinator.versions.mint(None).writer.rpartition(".")
    assert name == "proxy"
    assert INCARNATION.fullmatch(suffix)


def test_versions_use_reactor_time_with_the_offset(coordinators: list[Coordinator]) -> None:
    """
    If a proxy is built with a clock offset, then the versions it mints carry
    the reactor's time in milliseconds plus that offset: fault tests skew a
    proxy's clock this way.
    """
    reactor = MemoryReactorClock()
    build(reactor, clock_offset_ms=-250)
    (coordinator,) = coordinators
    reactor.advance(12.5)
    assert coordinator.versions.mint(None).clock_ms == 12_250
