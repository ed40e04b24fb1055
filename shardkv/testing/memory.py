"""In-memory stand-ins for running nodes and proxies without sockets.

A whole cluster runs inside one test: every node is a real L{NodeApp} on a
memory engine, the proxy reaches them through treq's C{StubTreq}, and time is
a C{MemoryReactorClock}. L{FaultyHTTP} injects refused and hung connections.
Like C{twisted.internet.testing}, this is public so that tests of code built
on shardkv can use it too.

Each node has its map store (blank) and a mover; the proxy side has a
L{MapView} (provisional, from the node ids, until a map is installed), a
L{MapProposer}, a L{MapSync}, and the admin and rebalancer of a membership
change (L{MembershipAdmin}, L{Rebalancer}), wired as
L{shardkv.proxy.service.default_app} wires them, none of them started. A test
that only reads and writes needs nothing more: blank nodes check no epoch. One
that wants the map on its nodes calls L{MemoryCluster.bootstrap}.

For membership tests the cluster also runs what the real processes run on
their timers (L{MemoryCluster.start_services}: the proxies' health checks,
undelivered-hint retries, map polls and rebalancers, the nodes' hinted
handoff), more proxies over the same nodes (L{MemoryCluster.add_proxy}),
nodes that crash and restart over the data they had
(L{MemoryCluster.crash}, L{MemoryCluster.restart}), and a bounded wait for a
condition while the clock runs (L{MemoryCluster.drive}).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from treq.testing import StubTreq
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource

from shardkv.cluster.proposer import MapProposer
from shardkv.cluster.sync import MapSync
from shardkv.cluster.view import MapView
from shardkv.core.clustermap import ClusterMap
from shardkv.core.placement import DEFAULT_VNODES, Ring
from shardkv.core.quorum import QuorumSizes
from shardkv.core.versions import VersionClock
from shardkv.metrics import ProxyMetrics
from shardkv.node.app import NodeApp
from shardkv.node.handoff import HintHandoff
from shardkv.node.mapstore import MapStore
from shardkv.node.members import MemberOnlyClient, Members
from shardkv.node.mover import Mover
from shardkv.node.service import _learn_from_peer
from shardkv.node.store import NodeStore
from shardkv.periodic import periodic
from shardkv.proxy.app import ProxyApp
from shardkv.proxy.changes import MembershipAdmin
from shardkv.proxy.coordinator import Coordinator
from shardkv.proxy.health import HealthMonitor
from shardkv.proxy.hints import HintKeeper
from shardkv.proxy.rebalancer import Rebalancer
from shardkv.replica.client import ReplicaClient
from shardkv.replica.protocol import FENCE_GRACE
from shardkv.storage.memory import MemoryEngine
from shardkv.web.dataroutes import DEFAULT_MAX_VALUE_BYTES


def make_node(
    node_id: str,
    clock: MemoryReactorClock,
    offset_ms: int = 0,
    members: Iterable[str] | None = None,
    peers: Any = None,
    timeout: float = 2.0,
    engine: MemoryEngine | None = None,
) -> NodeApp:
    """A node on a memory engine; ``members`` as ``twistd shardkv cluster`` would give them.

    With ``peers`` (an HTTP client reaching the other nodes) the node gets a
    mover that streams to them, as a real node does. ``engine``: the data of
    a node that ran before (a restart); its map store is loaded from it
    before the mover resumes, as L{shardkv.node.service.NodeService} does."""
    app, _ = _make_node(node_id, clock, offset_ms, members, peers, timeout, engine)
    return app


def _make_node(
    node_id: str,
    clock: MemoryReactorClock,
    offset_ms: int,
    members: Iterable[str] | None,
    peers: Any,
    timeout: float,
    engine: MemoryEngine | None,
) -> tuple[NodeApp, MemberOnlyClient | None]:
    """The node, and the client it reaches its peers with (None without ``peers``)."""

    def now_ms() -> int:
        return int(clock.seconds() * 1000) + offset_ms

    versions = VersionClock(node_id, now_ms)
    known = Members(members)
    engine = MemoryEngine() if engine is None else engine
    mapstore = MapStore(node_id, engine, clock, FENCE_GRACE)
    store = NodeStore(
        node_id, engine, versions, DEFAULT_MAX_VALUE_BYTES, now_ms, known, mapstore=mapstore
    )
    mapstore.load()
    if peers is None:
        return NodeApp(store), None
    client = MemberOnlyClient(
        known, peers, clock, timeout, pipeline_depth=1, epoch=lambda: mapstore.epoch or None
    )
    client.newer_map = partial(_learn_from_peer, mapstore)
    mover = Mover(node_id, engine, mapstore, client, clock)
    mover.start()
    return NodeApp(store, mover=mover), client


PROXY_WRITER = "proxy-test"


class HostDispatch(Resource):
    """Routes a request to a resource by its full Host header (with the port).

    twisted.web's NameVirtualHost drops the port, and our nodes differ only
    by port.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hosts: dict[bytes, Resource] = {}

    def getChildWithDefault(self, path: bytes, request: Any) -> Resource:
        host = request.getHeader(b"host") or b""
        request.postpath.insert(0, request.prepath.pop())
        return self.hosts[host]


class FaultyHTTP:
    """Wraps an HTTP client and injects the failures a real network gives.

    Nodes named in ``down`` refuse connections (nothing is sent); nodes in
    ``hung`` accept the request and never answer, until the caller's timeout
    cancels it.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down: set[str] = set()
        self.hung: set[str] = set()

    def request(self, method: str, url: bytes, **kwargs: Any) -> Deferred[Any]:
        host = url.split(b"/")[2].decode()
        if host in self.down:
            return fail(ConnectionRefusedError(f"{host} is down"))
        if host in self.hung:
            return Deferred(lambda d: d.errback(ResponseNeverReceived([Failure(CancelledError())])))
        answer: Deferred[Any] = self.inner.request(method, url, **kwargs)
        return answer


class MemoryProxy:
    """One proxy over a cluster's nodes: its own client, view, health, hints,
    coordinator, proposer, sync, admin and rebalancer, wired as
    L{shardkv.proxy.service.default_app} wires them, and its HTTP front as a
    C{StubTreq} (L{proxy})."""

    def __init__(
        self,
        network: Any,
        clock: MemoryReactorClock,
        timeout: float,
        writer: str,
        seeds: dict[str, float],
        sizes: QuorumSizes,
        *,
        vnodes: int,
        ring: Ring | None = None,
        pipeline_depth: int = 1,
        seed: int = 0,
        rate: int = 0,
    ) -> None:
        self.clock = clock
        self.writer = writer
        self.metrics = metrics = ProxyMetrics.private()
        self.replica_client = ReplicaClient(
            network, clock, timeout, pipeline_depth, metrics=metrics.replica
        )
        self.view = (
            MapView.of_ring(ring, sizes)
            if ring is not None
            else MapView.from_nodes(seeds, sizes, vnodes)
        )
        self.replica_client.newer_map = self.view.receive_json
        self.proposer = MapProposer(self.replica_client, writer, clock, random.Random(seed))
        self.sync = MapSync(
            self.view,
            self.proposer,
            self.replica_client,
            clock,
            seeds,
            sizes,
            self.view.current.vnodes,
        )
        self.replica_client.newer_epoch = self.sync.notice
        self.health = HealthMonitor(
            self.view.nodes(),
            self.sync.health_check(self.replica_client.health),
            clock,
            metrics=metrics,
        )
        self.view.subscribe(lambda m: self.health.follow(m.acceptors()))
        versions = VersionClock(writer, lambda: int(clock.seconds() * 1000))
        self.hints = HintKeeper(self.view, self.replica_client, self.health, metrics=metrics)
        self.coordinator = Coordinator(
            self.view, self.replica_client, self.health, versions, self.hints, metrics=metrics
        )
        self.rebalancer = Rebalancer(
            self.view, self.sync, self.proposer, self.replica_client, clock
        )
        self.admin = MembershipAdmin(
            self.view,
            self.sync,
            self.proposer,
            self.replica_client,
            clock,
            rate=rate,
            status=self.rebalancer.status,
        )
        self.proxy_app = ProxyApp(
            self.coordinator,
            DEFAULT_MAX_VALUE_BYTES,
            admin=self.admin,
            rebalancer=self.rebalancer,
            metrics=metrics,
        )
        self.proxy = StubTreq(self.proxy_app.resource())
        self.services: list[Service] = []

    def start_services(self) -> None:
        """Run what a proxy runs on its timers (L{shardkv.proxy.service.make_proxy_service}):
        health checks, undelivered-hint retries, the map's bootstrap and polls, the
        rebalancer. Idempotent."""
        if self.services:
            return
        self.services = [
            self.health.service(),
            periodic(1.0, self.hints.retry, self.clock),
            self.sync.service(),
            self.rebalancer.service(),
        ]
        for service in self.services:
            service.startService()

    def stop_services(self) -> None:
        """Stop the timers (a proxy killed: work in flight is dropped, not finished)."""
        services, self.services = self.services, []
        for service in services:
            service.stopService()


class MemoryCluster:
    """Nodes, proxy and clock wired together in memory."""

    def __init__(
        self,
        node_ids: Iterable[str],
        timeout: float = 2.0,
        *,
        replicas: int = 3,
        r: int = 2,
        w: int = 2,
        pipeline_depth: int = 1,
        ring: Ring | None = None,
        seed: int = 0,
        vnodes: int | None = None,
        rate: int = 0,
    ) -> None:
        """``ring`` may be passed in to share one between clusters (building one
        takes a few tenths of a second); it must place exactly ``node_ids``.
        ``seed`` seeds the proposer's jitter. ``vnodes`` (without a ``ring``):
        ring points per unit of weight in the map the cluster bootstraps; few
        make membership tests fast. ``rate``: the proxies' ``--rebalance-rate``."""
        self.clock = MemoryReactorClock()
        node_ids = list(node_ids)
        self.dispatch = HostDispatch()
        self.node_http = StubTreq(self.dispatch)
        self.network = FaultyHTTP(self.node_http)
        self.timeout = timeout
        self.pipeline_depth = pipeline_depth
        self.nodes: dict[str, NodeApp] = {}
        self.engines: dict[str, MemoryEngine] = {}
        """Each node's data, which outlives its crashes (L{crash}, L{restart})."""
        self.crashed: set[str] = set()
        self._members: dict[str, list[str] | None] = {}
        self._peers: dict[str, MemberOnlyClient | None] = {}
        self._node_services: dict[str, list[Service]] = {}
        self._running = False
        for node_id in node_ids:
            self.add_node(node_id, members=node_ids)
        self.sizes = QuorumSizes(replicas, r, w)
        if ring is not None and set(ring.nodes) != set(self.nodes):
            raise ValueError(f"the ring places {sorted(ring.nodes)}, not {sorted(self.nodes)}")
        self.seeds = dict.fromkeys(self.nodes, 1.0) if ring is None else _weights(ring)
        self.vnodes = vnodes if vnodes is not None else DEFAULT_VNODES
        self.ring_given = ring
        self.rate = rate
        self.seed = seed
        self.proxies: list[MemoryProxy] = []
        first = self.add_proxy(PROXY_WRITER)
        self.replica_client = first.replica_client
        self.view = first.view
        self.health = first.health
        self.hints = first.hints
        self.coordinator = first.coordinator
        self.proposer = first.proposer
        self.sync = first.sync
        self.admin = first.admin
        self.rebalancer = first.rebalancer
        self.proxy_app = first.proxy_app
        self.proxy = first.proxy

    @property
    def ring(self) -> Ring:
        """The ring reads use now."""
        return self.view.read_ring()

    # -- proxies -----------------------------------------------------------------

    def add_proxy(self, writer: str | None = None, sizes: QuorumSizes | None = None) -> MemoryProxy:
        """Another proxy over the same nodes (seeded with the same ``--nodes``),
        with its own view and proposer; started if the cluster's services run.
        ``sizes``: its ``--replicas``, ``--r`` and ``--w`` (default: the cluster's)."""
        writer = writer or f"{PROXY_WRITER}-{len(self.proxies) + 1}"
        proxy = MemoryProxy(
            self.network,
            self.clock,
            self.timeout,
            writer,
            self.seeds,
            self.sizes if sizes is None else sizes,
            vnodes=self.vnodes,
            ring=self.ring_given,
            pipeline_depth=self.pipeline_depth,
            seed=self.seed + len(self.proxies),
            rate=self.rate,
        )
        self.proxies.append(proxy)
        if self._running:
            proxy.start_services()
        return proxy

    # -- nodes -------------------------------------------------------------------

    def add_node(self, node_id: str, members: Iterable[str] | None = None) -> NodeApp:
        """Start a (blank) node reachable at ``node_id``, as ``twistd shardkv node`` would."""
        if node_id in self.engines:
            raise ValueError(f"{node_id} exists already; restart it instead")
        self.engines[node_id] = MemoryEngine()
        self._members[node_id] = None if members is None else list(members)
        return self._start_node(node_id)

    def _start_node(self, node_id: str) -> NodeApp:
        app, peers = _make_node(
            node_id,
            self.clock,
            0,
            self._members[node_id],
            self.network,
            self.timeout,
            self.engines[node_id],
        )
        self.nodes[node_id] = app
        self._peers[node_id] = peers
        self.dispatch.hosts[node_id.encode()] = app.resource()
        if self._running:
            self._start_node_services(node_id)
        return app

    def _start_node_services(self, node_id: str) -> None:
        peers = self._peers[node_id]
        if peers is None or node_id in self._node_services:
            return
        mapstore = self.nodes[node_id].store.mapstore
        handoff = HintHandoff(self.engines[node_id], peers, cluster_map=lambda: mapstore.learned)
        service = handoff.service(1.0, self.clock)
        service.startService()
        self._node_services[node_id] = [service]

    def crash(self, node_id: str) -> None:
        """Kill the node's process: connections to it are refused from now on, its
        timers and its mover stop, and whatever it had in flight is lost. Its engine
        (records, hints, map store, move progress) is kept, as LMDB keeps what it
        committed: the memory engine commits each write before it answers.

        Requests that had already passed the network when it crashed are still
        served (by the old app until the restart): as if they had landed just
        before the crash."""
        app = self.nodes[node_id]
        self.crashed.add(node_id)
        self.network.down.add(node_id)
        for service in self._node_services.pop(node_id, []):
            service.stopService()
        if app.mover is not None:
            app.mover.stop()
        peers = self._peers.get(node_id)
        if peers is not None:
            peers.newer_map = None  # answers still on their way must not install maps

    def restart(self, node_id: str) -> NodeApp:
        """Start a crashed node again over its data: a new L{NodeApp}, L{MapStore}
        (loaded from the engine) and L{Mover} (resuming from its stored progress)."""
        if node_id not in self.crashed:
            raise ValueError(f"{node_id} has not crashed")
        self.crashed.discard(node_id)
        app = self._start_node(node_id)
        self.network.down.discard(node_id)
        return app

    # -- time ----------------------------------------------------------------------

    def start_services(self) -> None:
        """Run every proxy's and node's timers, as the real processes do; from now on
        advancing the clock (L{drive}, L{advance}) runs them."""
        self._running = True
        for proxy in self.proxies:
            proxy.start_services()
        for node_id in self.nodes:
            if node_id not in self.crashed:
                self._start_node_services(node_id)

    def stop_services(self) -> None:
        self._running = False
        for proxy in self.proxies:
            proxy.stop_services()
        for node_id in list(self._node_services):
            for service in self._node_services.pop(node_id):
                service.stopService()

    def flush(self, rounds: int = 50) -> None:
        """Deliver the in-memory HTTP that is waiting, without moving the clock."""
        for _ in range(rounds):
            self.node_http.flush()
            for proxy in self.proxies:
                proxy.proxy.flush()

    def advance(self, seconds: float, step: float = 0.1) -> None:
        """Let ``seconds`` of clock time pass in steps of ``step``, flushing the HTTP
        after each, so that timers, timeouts and moves run as they would."""
        self.flush()
        waited = 0.0
        while waited < seconds - 1e-9:
            dt = min(step, seconds - waited)
            self.clock.advance(dt)
            waited += dt
            self.flush()

    def drive(
        self,
        condition: Callable[[], bool],
        seconds: float = 60.0,
        step: float = 0.1,
        what: str = "the condition",
    ) -> float:
        """Advance the clock until ``condition()`` holds, at most ``seconds`` of clock
        time; the time it took. An AssertionError (naming ``what``) when it never does."""
        self.flush()
        waited = 0.0
        while not condition():
            if waited >= seconds:
                raise AssertionError(f"{what} did not hold within {seconds} s of clock time")
            self.clock.advance(step)
            waited += step
            self.flush()
        return waited

    def pump(self, d: Deferred[Any], seconds: float = 30.0, step: float = 0.05) -> Any:
        """Flush the in-memory HTTP and move the clock until ``d`` has a result
        (at most ``seconds`` of clock time); the result (a Failure is raised)."""
        box: list[Any] = []
        d.addBoth(box.append)
        waited = 0.0
        while not box:
            for _ in range(50):
                self.node_http.flush()
                for proxy in self.proxies:
                    proxy.proxy.flush()
                if box:
                    break
            if box:
                break
            if waited >= seconds:
                raise AssertionError(f"no result within {seconds} s of clock time")
            self.clock.advance(step)
            waited += step
        result = box[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def bootstrap(self) -> ClusterMap:
        """Put the cluster map on the nodes (epoch 1 from the node ids on blank nodes)
        and install it in the proxies' views: what a proxy does when it starts."""
        m: ClusterMap = self.pump(Deferred.fromCoroutine(self.sync.bootstrap()))
        for proxy in self.proxies[1:]:
            self.pump(Deferred.fromCoroutine(proxy.sync.bootstrap()))
        return m

    # -- looking inside ------------------------------------------------------------

    def learned_epochs(self) -> dict[str, int]:
        """Each node's learned epoch (0: none), crashed ones included (from their data)."""
        return {node: self.nodes[node].store.mapstore.epoch for node in self.nodes}

    def holders(self, key: str) -> set[str]:
        """The nodes whose engine holds a record (a tombstone too) of ``key``."""
        return {node for node, engine in self.engines.items() if engine.get(key) is not None}


def _weights(ring: Ring) -> dict[str, float]:
    return {node: ring.weight(node) for node in ring.nodes}
