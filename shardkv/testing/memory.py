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
from shardkv.core.placement import Ring
from shardkv.core.quorum import QuorumSizes
from shardkv.core.versions import VersionClock
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

    def now_ms() -> int:
        return int(clock.seconds() * 1000) + offset_ms

    versions = VersionClock(node_id, now_ms)
    known = Members(members)
    engine = MemoryEngine() if engine is None else engine
    mapstore = MapStore(node_id, engine)
    store = NodeStore(
        node_id, engine, versions, DEFAULT_MAX_VALUE_BYTES, now_ms, known, mapstore=mapstore
    )
    mapstore.load()
    if peers is None:
        return NodeApp(store)
    client = MemberOnlyClient(
        known, peers, clock, timeout, pipeline_depth=1, epoch=lambda: mapstore.epoch or None
    )
    client.newer_map = partial(_learn_from_peer, mapstore)
    mover = Mover(node_id, engine, mapstore, client, clock)
    mover.start()
    app = NodeApp(store, mover=mover)
    app.peers = client  # type: ignore[attr-defined]  # for the node's hinted handoff
    return app


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
    ) -> None:
        """``ring`` may be passed in to share one between clusters (building one
        takes a few tenths of a second); it must place exactly ``node_ids``.
        ``seed`` seeds the proposer's jitter."""
        self.clock = MemoryReactorClock()
        node_ids = list(node_ids)
        self.dispatch = HostDispatch()
        self.node_http = StubTreq(self.dispatch)
        self.network = FaultyHTTP(self.node_http)
        self.timeout = timeout
        self.nodes: dict[str, NodeApp] = {}
        for node_id in node_ids:
            self.add_node(node_id, members=node_ids)
        self.replica_client = ReplicaClient(self.network, self.clock, timeout, pipeline_depth)
        sizes = QuorumSizes(replicas, r, w)
        if ring is not None and set(ring.nodes) != set(self.nodes):
            raise ValueError(f"the ring places {sorted(ring.nodes)}, not {sorted(self.nodes)}")
        self.view = (
            MapView.of_ring(ring, sizes)
            if ring is not None
            else MapView.from_nodes(list(self.nodes), sizes)
        )
        self.replica_client.newer_map = self.view.install_json
        self.health = HealthMonitor(self.view.nodes(), self.replica_client.health, self.clock)
        self.view.subscribe(lambda m: self.health.follow(m.acceptors()))
        versions = VersionClock(PROXY_WRITER, lambda: int(self.clock.seconds() * 1000))
        self.hints = HintKeeper(self.view, self.replica_client, self.health)
        self.coordinator = Coordinator(
            self.view, self.replica_client, self.health, versions, self.hints
        )
        self.proposer = MapProposer(
            self.replica_client, PROXY_WRITER, self.clock, random.Random(seed)
        )
        self.sync = MapSync(
            self.view,
            self.proposer,
            self.replica_client,
            self.clock,
            dict.fromkeys(self.nodes, 1.0) if ring is None else _weights(ring),
            sizes,
            self.view.current.vnodes,
        )
        self.proxy_app = ProxyApp(self.coordinator, DEFAULT_MAX_VALUE_BYTES)
        self.proxy = StubTreq(self.proxy_app.resource())

    @property
    def ring(self) -> Ring:
        """The ring reads use now."""
        return self.view.read_ring()

    def add_node(self, node_id: str, members: Iterable[str] | None = None) -> NodeApp:
        """Start a (blank) node reachable at ``node_id``, as ``twistd shardkv node`` would."""
        app = make_node(
            node_id, self.clock, members=members, peers=self.network, timeout=self.timeout
        )
        self.nodes[node_id] = app
        self.dispatch.hosts[node_id.encode()] = app.resource()
        return app

    def pump(self, d: Deferred[Any], seconds: float = 30.0, step: float = 0.05) -> Any:
        """Flush the in-memory HTTP and move the clock until ``d`` has a result
        (at most ``seconds`` of clock time); the result (a Failure is raised)."""
        box: list[Any] = []
        d.addBoth(box.append)
        waited = 0.0
        while not box:
            for _ in range(50):
                self.node_http.flush()
                self.proxy.flush()
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
        and install it in the proxy's view: what a proxy does when it starts."""
        m: ClusterMap = self.pump(Deferred.fromCoroutine(self.sync.bootstrap()))
        return m


def _weights(ring: Ring) -> dict[str, float]:
    return {node: ring.weight(node) for node in ring.nodes}
