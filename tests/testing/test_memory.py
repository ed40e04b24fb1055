"""L{shardkv.testing.memory}: the in-memory cluster is wired as the tests assume.

Every proxy test trusts that a L{MemoryCluster} routes each node's traffic
to that node and that L{FaultyHTTP} fails requests the way a real network
does. If the wiring were off (two nodes behind one resource, a ring other
than the one passed in, a "down" node that still receives writes), those
tests would pass for the wrong reasons.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import treq
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import Request

from shardkv.core.placement import Ring
from shardkv.errors import NodeTimeout, NodeUnreachable
from shardkv.testing.memory import FaultyHTTP, HostDispatch, MemoryCluster, make_node
from tests.helpers import NODES_3, answered, cluster_http, flusher, shared_ring, wait

NODE = NODES_3[0]
OTHER = NODES_3[1]


class Recording:
    """An HTTP client that records what reaches it and answers at once."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, dict[str, Any]]] = []

    def request(self, method: str, url: bytes, **kwargs: Any) -> Deferred[Any]:
        self.calls.append((method, url, kwargs))
        return succeed("answered")


class Named(Resource):
    """A leaf that answers with its name and records the paths it was asked for."""

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.paths: list[bytes] = []

    def render(self, request: Request) -> bytes:
        self.paths.append(request.path)
        postpath = [p.decode() for p in request.postpath or []]
        return json.dumps({"name": self.name, "postpath": postpath}).encode()


def fetch(stub: StubTreq, url: str) -> tuple[int, bytes]:
    """GET ``url`` through ``stub``, pumped to completion."""
    got: list[tuple[int, bytes]] = []

    async def go() -> None:
        client: Any = stub  # StubTreq builds its request methods at runtime
        response = await client.get(url)
        got.append((response.code, await treq.content(response)))

    d = Deferred.fromCoroutine(go())
    flusher(stub)(d)
    assert got, f"no answer from {url}"
    return got[0]


# -- HostDispatch ---------------------------------------------------------------------


def test_host_dispatch_routes_by_the_full_host_with_its_port() -> None:
    """Nodes differ only by port, so the port must pick the resource; the
    resource still sees the whole path."""
    dispatch = HostDispatch()
    one, two = Named("one"), Named("two")
    dispatch.hosts[b"127.0.0.1:8081"] = one
    dispatch.hosts[b"127.0.0.1:8082"] = two
    stub = StubTreq(dispatch)

    code, body = fetch(stub, "http://127.0.0.1:8082/replica/kv/a")
    assert code == 200
    assert json.loads(body) == {"name": "two", "postpath": ["replica", "kv", "a"]}
    code, body = fetch(stub, "http://127.0.0.1:8081/health")
    assert (code, json.loads(body)["name"]) == (200, "one")
    assert (one.paths, two.paths) == ([b"/health"], [b"/replica/kv/a"])


def test_host_dispatch_never_routes_an_unknown_host_elsewhere() -> None:
    """A host without a resource (same address, another port) reaches no node."""
    dispatch = HostDispatch()
    one = Named("one")
    dispatch.hosts[b"127.0.0.1:8081"] = one
    code, _ = fetch(StubTreq(dispatch), "http://127.0.0.1:8089/health")
    assert code != 200
    assert one.paths == []


# -- FaultyHTTP ------------------------------------------------------------------------


def test_a_node_that_is_down_refuses_with_nothing_sent() -> None:
    """Refused means the request never left: the inner client never sees it."""
    inner = Recording()
    network = FaultyHTTP(inner)
    network.down.add(NODE)
    d = network.request("PUT", f"http://{NODE}/replica/kv/a".encode(), data=b"v")
    failure = SynchronousTestCase().failureResultOf(d, ConnectionRefusedError)
    assert f"{NODE} is down" in str(failure.value)
    assert inner.calls == []


def test_a_hung_node_never_answers_until_the_caller_cancels() -> None:
    """The request hangs (nothing reaches the node); cancelling it fails it the
    way treq does when a timeout cancels a request in flight."""
    inner = Recording()
    network = FaultyHTTP(inner)
    network.hung.add(NODE)
    d = network.request("GET", f"http://{NODE}/health".encode())
    assert not answered(d)
    d.cancel()
    failure = SynchronousTestCase().failureResultOf(d, ResponseNeverReceived)
    assert [r.type for r in failure.value.reasons] == [CancelledError]
    assert inner.calls == []


def test_other_nodes_pass_through_untouched() -> None:
    """Faults are per host:port; everything else goes to the inner client as given."""
    inner = Recording()
    network = FaultyHTTP(inner)
    network.down.add(NODE)
    network.hung.add("127.0.0.1:8083")
    d = network.request("GET", f"http://{OTHER}/health".encode(), unbuffered=True)
    assert SynchronousTestCase().successResultOf(d) == "answered"
    assert inner.calls == [("GET", f"http://{OTHER}/health".encode(), {"unbuffered": True})]


# -- MemoryCluster -----------------------------------------------------------------------


class MemoryClusterTests(SynchronousTestCase):
    """A whole cluster: nodes, the proxy in front of them, the faults between."""

    def cluster(self, timeout: float = 2.0) -> MemoryCluster:
        return MemoryCluster(NODES_3, timeout, ring=shared_ring(tuple(NODES_3)))

    def test_every_node_answers_at_its_own_address(self) -> None:
        """The nodes' client reaches each node by its id, and only that node."""
        cluster = self.cluster()
        for node in NODES_3:
            health = wait(
                self, cluster, Deferred.fromCoroutine(cluster.replica_client.health(node))
            )
            self.assertEqual((health["node"], health["role"]), (node, "node"))

    def test_every_node_is_reachable_through_the_proxy(self) -> None:
        """With three copies on three nodes, a write through the proxy lands on
        every node and the proxy's health checks find every node up."""
        cluster = self.cluster()
        http = cluster_http(self, cluster)
        self.assertEqual(http.put("/kv/a", b"v1").code, 201)
        for node, app in cluster.nodes.items():
            record = app.store.engine.get("a")
            self.assertIsNotNone(record, node)
            assert record is not None
            self.assertEqual(record.value, b"v1")
        wait(self, cluster, cluster.health.check_all())
        self.assertEqual(
            {n: cluster.health.state(n).status for n in NODES_3}, dict.fromkeys(NODES_3, "up")
        )
        self.assertEqual(http.get("/kv/a").body, b"v1")

    def test_the_ring_passed_in_is_used(self) -> None:
        """A shared ring must be the one that places keys, not a fresh copy."""
        ring = Ring(NODES_3, vnodes=8)
        cluster = MemoryCluster(NODES_3, ring=ring)
        self.assertIs(cluster.ring, ring)
        self.assertIs(cluster.coordinator.ring, ring)
        self.assertEqual(tuple(cluster.health.states), ring.nodes)

    def test_without_a_ring_one_is_built_over_the_nodes(self) -> None:
        cluster = MemoryCluster(NODES_3)
        self.assertEqual(cluster.ring.nodes, tuple(sorted(NODES_3)))
        self.assertEqual(cluster.ring, shared_ring(tuple(NODES_3)))

    def test_a_node_that_is_down_is_unreachable_and_not_sent(self) -> None:
        """Through the cluster's own network: refused at once, nothing reached the node."""
        cluster = self.cluster()
        cluster.network.down.add(NODE)
        d = Deferred.fromCoroutine(cluster.replica_client.health(NODE))
        error = self.failureResultOf(d, NodeUnreachable).value
        self.assertEqual((error.node, error.sent), (NODE, False))

    def test_a_hung_node_times_out_at_the_clusters_timeout(self) -> None:
        """The cluster's ``timeout`` is the replica client's, on the cluster's clock."""
        cluster = self.cluster(timeout=0.5)
        cluster.network.hung.add(NODE)
        d = Deferred.fromCoroutine(cluster.replica_client.health(NODE))
        cluster.clock.advance(0.49)
        self.assertFalse(answered(d))
        cluster.clock.advance(0.02)
        error = self.failureResultOf(d, NodeTimeout).value
        self.assertEqual((error.node, error.seconds), (NODE, 0.5))


def test_make_node_runs_its_clock_offset_from_the_clusters() -> None:
    """A node's clock is the shared clock plus ``offset_ms`` (skewed nodes)."""
    clock = MemoryReactorClock()
    clock.advance(10)
    app = make_node(NODE, clock, offset_ms=2500)
    assert app.store.node_id == NODE
    assert app.store.now_ms() == 12_500


def test_a_ring_that_places_other_nodes_is_refused() -> None:
    """A ring naming a node the cluster does not run would send requests nowhere."""
    with pytest.raises(ValueError, match="the ring places"):
        MemoryCluster(NODES_3[:2], ring=shared_ring(tuple(NODES_3)))
