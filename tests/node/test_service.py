"""
Tests of the node's service tree (L{shardkv.node.service}), built directly.

No sockets and no global reactor: the tree runs on a L{MemoryReactorClock},
which records each C{listenTCP} and C{connectTCP} instead of making it, and
whose clock only moves when a test advances it. C{tests/test_tap.py} checks
that the command line reaches L{make_node_service}; these tests check what
the factory and L{NodeService} do with what they are given.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from typing import Any, cast

import pytest
from twisted.application.internet import TimerService
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from shardkv.core.clustermap import bootstrap
from shardkv.core.records import Record
from shardkv.core.versions import Version
from shardkv.errors import StorageStartupError
from shardkv.node.mapstore import MapStore
from shardkv.node.service import NodeService, make_node_service
from shardkv.replica import codec
from shardkv.storage.engine import StorageEngine
from shardkv.storage.memory import MemoryEngine
from shardkv.web.httpclient import HTTPClientService
from shardkv.web.listening import ListeningService
from shardkv.web.site import LimitedRequest, QuietSite
from tests.tlscerts import CA, speaks_tls

NODE_ID = "127.0.0.1:9001"
ENDPOINTS = ["tcp:9001:interface=127.0.0.1", "tcp:9002:interface=127.0.0.2"]


class RecordingEngine(MemoryEngine):
    """A memory engine that notes when it is started and stopped.

    It also notes how many listeners the reactor had when it was started, to
    tell "opened before listening" from "opened after".
    """

    def __init__(self, reactor: MemoryReactorClock) -> None:
        super().__init__()
        self._reactor = reactor
        self.events: list[str] = []
        self.listeners_at_start: int | None = None

    def start(self) -> None:
        self.listeners_at_start = len(self._reactor.tcpServers)
        self.events.append("start")

    def stop(self) -> Deferred[None]:
        self.events.append("stop")
        return succeed(None)


class UnopenableEngine(MemoryEngine):
    """An engine whose start fails as an unusable data directory does."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def start(self) -> None:
        raise self.error


class SlowToStop(Service):
    """A child whose stop finishes only when the test says so."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.stopped: Deferred[None] = Deferred()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.events.append("child stopping")
        self.stopped.addCallback(lambda _: self.events.append("child stopped"))
        return self.stopped


@pytest.fixture
def reactor() -> MemoryReactorClock:
    """A memory reactor that the whole node tree runs on, tombstone
    collection's steps included: a pass runs only when the test advances it."""
    return MemoryReactorClock()


def build(
    reactor: MemoryReactorClock,
    engine: StorageEngine,
    listen: Sequence[str] = ENDPOINTS,
    **kwargs: Any,
) -> NodeService:
    return make_node_service(
        reactor=reactor,
        node_id=NODE_ID,
        engine=engine,
        listen=listen,
        max_value_bytes=kwargs.pop("max_value_bytes", 1000),
        now_ms=lambda: int(reactor.seconds() * 1000),
        **kwargs,
    )


def children(service: NodeService) -> list[IService]:
    return list(service)


def timers(service: NodeService) -> list[TimerService]:
    return [s for s in service if isinstance(s, TimerService)]


# -- the engine's lifetime -------------------------------------------------------


def test_engine_opens_at_start_not_at_construction(reactor: MemoryReactorClock) -> None:
    """
    If a node tree is built, then its engine is not opened until
    C{startService}, and it is opened before any listener listens.

    twistd may fork to daemonize between building the tree and starting it,
    and an LMDB environment must not cross a fork; a node must not take
    requests for an engine that is not open.
    """
    engine = RecordingEngine(reactor)
    service = build(reactor, engine)
    assert engine.events == []
    assert reactor.tcpServers == []
    service.startService()
    assert engine.events == ["start"]
    assert engine.listeners_at_start == 0
    assert len(reactor.tcpServers) == len(ENDPOINTS)


def test_engine_stops_after_its_children() -> None:
    """
    If a L{NodeService} stops, then its engine stops only once every child
    has finished stopping, and the stop fires after that.

    Listeners and background work still use the engine while they wind down;
    closing it under them would fail their last requests.
    """
    engine = RecordingEngine(MemoryReactorClock())
    service = NodeService(engine)
    child = SlowToStop(engine.events)
    child.setServiceParent(service)
    service.startService()
    stopped = service.stopService()
    assert engine.events == ["start", "child stopping"]
    assert not stopped.called
    child.stopped.callback(None)
    assert engine.events == ["start", "child stopping", "child stopped", "stop"]
    assert stopped.called


def test_tree_keeps_engine_open_through_a_tombstone_pass(reactor: MemoryReactorClock) -> None:
    """
    If the node stops while a tombstone pass is running, then the engine is
    stopped only after the pass has finished.

    The collector's timer runs a pass at once when the tree starts; the pass
    scans and removes through the engine.
    """
    engine = RecordingEngine(reactor)
    service = build(reactor, engine)
    service.startService()
    stopped = service.stopService()
    assert engine.events == ["start"]
    assert not stopped.called
    reactor.advance(0)  # the pass's one step
    assert engine.events == ["start", "stop"]
    assert stopped.called


def test_engine_stays_open_until_a_handoff_in_flight_gives_up(
    reactor: MemoryReactorClock,
) -> None:
    """
    If a hint is waiting when the node starts, then the handoff timer sends it
    at once through the tree's HTTP client on the given reactor; if the node
    stops while that call is out, then the engine stays open until the call
    gives up after C{peer_timeout}.
    """
    engine = RecordingEngine(reactor)
    record = Record(Version(1, 1, "proxy-test"), b"v", "text/plain", stored_ms=1)
    assert engine.put_hint("127.0.0.1:9100", "k", record).called
    service = build(reactor, engine, peer_timeout=0.5, members=["127.0.0.1:9100"])
    service.startService()
    assert [(host, port) for host, port, *_ in reactor.tcpClients] == [("127.0.0.1", 9100)]
    reactor.advance(0)  # let the tombstone pass finish, so only the handoff is out
    stopped = service.stopService()
    reactor.advance(0.49)
    assert engine.events == ["start"]
    assert not stopped.called
    reactor.advance(0.02)
    assert engine.events == ["start", "stop"]
    assert stopped.called
    assert engine.hint_counts() == {"127.0.0.1:9100": 1}  # not delivered, so kept


def test_storage_startup_error_exits_with_one_line(
    reactor: MemoryReactorClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    If the engine cannot open its data directory, then starting the node
    raises C{SystemExit(1)} with no chained traceback, logs one critical line
    that names the reason, prints the same line on the real stderr, and
    listens on nothing.

    The operator has to act (free the directory, fix its permissions); a
    traceback would bury the one line that says what to do. twistd has
    replaced C{sys.stderr} with its log by then, so the line goes to
    C{sys.__stderr__} as well; that stream is replaced here, so what the
    node printed is read apart from what Twisted's own pre-logging observer
    writes to the terminal.
    """
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "__stderr__", terminal)
    reason = "/srv/node is in use by another process (pid 42)"
    service = build(reactor, UnopenableEngine(StorageStartupError(reason)))
    with capturedLogs() as events, pytest.raises(SystemExit) as info:
        service.startService()
    line = f"shardkv: cannot start the node: {reason}"
    assert info.value.code == 1
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
    critical = [e for e in events if e["log_level"] == LogLevel.critical]
    assert [formatEvent(e) for e in critical] == [line]
    assert terminal.getvalue() == line + "\n"
    assert reactor.tcpServers == []
    assert not any(child.running for child in service)


def test_other_start_errors_are_not_hidden(reactor: MemoryReactorClock) -> None:
    """
    If the engine fails to start for any other reason, then that error
    propagates as it is: only a data directory problem is the operator's
    to fix, and anything else is a bug whose traceback is wanted.
    """
    service = build(reactor, UnopenableEngine(RuntimeError("engine bug")))
    with pytest.raises(RuntimeError, match="engine bug"):
        service.startService()
    assert reactor.tcpServers == []


# -- the tree ----------------------------------------------------------------------


def test_tree_has_client_timers_and_one_listener_per_endpoint(
    reactor: MemoryReactorClock,
) -> None:
    """
    If a node is built, then its tree holds, in start order, the HTTP client,
    the handoff timer, the tombstone timer and one listener per endpoint; once
    started, each listener listens where its endpoint says, all serving one
    site.
    """
    service = build(reactor, MemoryEngine(), handoff_interval=5.0, tombstone_grace=60.0)
    kinds = [type(child) for child in children(service)]
    assert kinds == [
        HTTPClientService,
        TimerService,
        TimerService,
        ListeningService,
        ListeningService,
    ]
    assert [timer.step for timer in timers(service)] == [5.0, 60.0]
    service.startService()
    assert all(child.running for child in service)
    listened = [(port, interface) for port, _, _, interface in reactor.tcpServers]
    assert listened == [(9001, "127.0.0.1"), (9002, "127.0.0.2")]
    first, second = (factory for _, factory, _, _ in reactor.tcpServers)
    assert isinstance(first, QuietSite)
    assert first is second


def test_no_endpoints_no_listeners(reactor: MemoryReactorClock) -> None:
    """
    If a node is given no endpoints, then it listens on nothing: the default
    port is the command line's business, not the factory's.
    """
    service = build(reactor, MemoryEngine(), listen=[])
    service.startService()
    assert reactor.tcpServers == []
    assert [type(child) for child in children(service)] == [
        HTTPClientService,
        TimerService,
        TimerService,
    ]


def test_tombstone_timer_runs_at_least_hourly(reactor: MemoryReactorClock) -> None:
    """
    If the tombstone grace period is longer than an hour, then the collector
    still runs every hour: waiting a whole grace period between passes would
    keep a tombstone for up to twice the grace.
    """
    service = build(reactor, MemoryEngine(), tombstone_grace=2 * 24 * 3600.0)
    assert [timer.step for timer in timers(service)] == [1.0, 3600.0]


def test_site_takes_replica_bodies_and_logs_if_asked(reactor: MemoryReactorClock) -> None:
    """
    If a node is built with a value limit and an access log, then its site
    holds C{/kv} and C{/replica/kv} bodies to that limit and takes whole
    replica batches (a node serves the replica routes, a proxy refuses
    them), and logs each request.
    """
    service = build(reactor, MemoryEngine(), max_value_bytes=1234, access_log=True)
    service.startService()
    ((_, site, _, _), _) = reactor.tcpServers
    assert isinstance(site, QuietSite)
    assert issubclass(site.requestFactory, LimitedRequest)
    limit = cast(type[LimitedRequest], site.requestFactory).body_limit
    assert limit(b"PUT", b"/kv/k") == 1234
    assert limit(b"PUT", b"/replica/kv/k") == 1234
    assert limit(b"POST", b"/replica/batch") == codec.MAX_REQUEST_BYTES
    assert site.access_log


def test_ca_file_hands_hints_to_peers_over_tls(tmp_path: Any) -> None:
    """
    If the node is given a CA file, then it hands hints to its peers over
    TLS; without one, in the clear: a hint names its target by id only, so
    the node uses one scheme for every peer.
    """
    ca = str(CA.create(tmp_path / "ca").pem)
    peer = "127.0.0.1:9002"
    for ca_file, tls in [(ca, True), (None, False)]:
        reactor = MemoryReactorClock()
        engine = MemoryEngine()
        service = make_node_service(
            reactor=reactor,
            node_id=NODE_ID,
            engine=engine,
            listen=[],
            max_value_bytes=1024,
            now_ms=lambda: 0,
            members=[NODE_ID, peer],
            ca_file=ca_file,
        )
        service.startService()
        engine.put_hint(peer, "k", Record(Version(1, 1, "w"), b"v"))
        reactor.advance(1.5)
        assert [(port, speaks_tls(f, port)) for _, port, f, *_ in reactor.tcpClients] == [
            (9002, tls)
        ]
        service.stopService()


# -- the cluster map (issue 11) ------------------------------------------------------

CLUSTER = "9f2c00aa11bb22cc"


class MetaRecordingEngine(RecordingEngine):
    def get_meta(self, name: str) -> bytes | None:
        self.events.append(f"get_meta {name}")
        return super().get_meta(name)


def test_the_map_is_loaded_after_the_engine_starts(reactor: MemoryReactorClock) -> None:
    """
    If the engine holds a learned map, then the node reads it right after the
    engine starts and before it listens, so the epoch fence holds from the
    first request; the mover starts then, and stops with the node.
    """
    engine = MetaRecordingEngine(reactor)
    m = bootstrap(CLUSTER, {NODE_ID: 1.0}, 1, 1, 1, 16)
    assert MapStore(NODE_ID, engine).learn(m).called
    service = build(reactor, engine)
    assert service.mapstore is not None and service.mover is not None
    assert service.mapstore.learned is None
    assert not service.mover.running
    service.startService()
    assert engine.events[0] == "start"
    assert sorted(engine.events[1:3]) == ["get_meta cluster.acceptor", "get_meta cluster.map"]
    assert service.mapstore.learned == m
    assert service.mover.running
    service.stopService()
    reactor.advance(0)
    assert not service.mover.running


def test_an_unreadable_map_stops_the_node_with_one_line(
    reactor: MemoryReactorClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "__stderr__", terminal)
    engine = MemoryEngine()
    assert engine.put_meta("cluster.map", b"{not json").called
    service = build(reactor, engine)
    with pytest.raises(SystemExit) as info:
        service.startService()
    assert info.value.code == 1
    assert "cluster map state stored on node" in terminal.getvalue()
    assert reactor.tcpServers == []
