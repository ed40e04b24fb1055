"""
In-memory HTTP tests of the routing proxy, L{ProxyApp}, over a three-node
L{MemoryCluster}.

The proxy must serve exactly the node's data API (L{DataAPIContract} runs
again here, through the proxy), send each key to the one node the ring says
owns it, and turn node failures into JSON answers a client can act on. No
reactor and no sockets: the network is C{StubTreq}, the failures come from
C{cluster.network} and time from C{cluster.clock}.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from unittest import mock
from urllib.parse import quote

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from shardkv import testing
from shardkv.core.placement import Ring, hash_key
from shardkv.core.records import Record
from shardkv.core.versions import Version
from shardkv.proxy.app import ProxyApp
from shardkv.testing import MemoryCluster
from tests.helpers import HTTP, Reply, flusher
from tests.test_node_app import DataAPIContract

NODES = ["127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083"]
TIMEOUT = 2.0
PROXY = "http://127.0.0.1:8080"
UNKNOWN = {"status": "unknown", "since": None, "last_check": None, "error": None}


@functools.cache
def _shared_ring(nodes: tuple[str, ...]) -> Ring:
    return Ring(list(nodes))


def new_cluster() -> MemoryCluster:
    """
    A fresh in-memory cluster of L{NODES}.

    Building a ring takes ~0.3 s (32768 points per node). Rings are immutable
    values, so every cluster shares one; each still gets fresh nodes, health
    and clock.
    """
    with mock.patch.object(testing, "Ring", lambda nodes: _shared_ring(tuple(nodes))):
        return MemoryCluster(NODES, timeout=TIMEOUT)


def proxy_http(case: SynchronousTestCase, cluster: MemoryCluster) -> HTTP:
    # Not cluster.settle: it stops as soon as d.called, which a treq Deferred
    # waiting on an inner one already is, so a reply written after the clock
    # moved would never be flushed to the client.
    return HTTP(case, cluster.proxy, PROXY, flusher(cluster.node_http, cluster.proxy))


def holders(cluster: MemoryCluster, key: str) -> list[str]:
    """The nodes whose engines hold any record (tombstones too) for C{key}."""
    return [n for n, app in cluster.nodes.items() if app.engine.get(key) is not None]


def key_owned_by(cluster: MemoryCluster, node: str, prefix: str = "key") -> str:
    """The first key C{prefix}-0, C{prefix}-1, ... that C{node} owns."""
    for i in range(10_000):
        key = f"{prefix}-{i}"
        if cluster.ring.owner(key) == node:
            return key
    raise AssertionError(f"no key owned by {node}")


class ProxyDataAPITests(DataAPIContract, SynchronousTestCase):
    """The data API, through the proxy, with every key on its owner node."""

    def setUp(self) -> None:
        self.cluster = new_cluster()
        self.http = proxy_http(self, self.cluster)

    def stored(self, key: str) -> Record | None:
        owner = self.cluster.ring.owner(key)
        self.assertIn(holders(self.cluster, key), ([], [owner]), key)
        return self.cluster.nodes[owner].engine.get(key)

    def limited(self, max_value_bytes: int) -> HTTP:
        app = ProxyApp(self.cluster.coordinator, max_value_bytes)
        stub = StubTreq(app.app.resource())
        return HTTP(self, stub, PROXY, flusher(self.cluster.node_http, stub))

    def relayed(self, key: str, message: str) -> str:
        return f"node {self.cluster.ring.owner(key)}: {message}"


class PlacementTests(SynchronousTestCase):
    """Keys go to the ring's owner, and the proxy explains where."""

    def setUp(self) -> None:
        self.cluster = new_cluster()
        self.http = proxy_http(self, self.cluster)

    def test_put_lands_on_exactly_the_owner(self) -> None:
        keys = ["name", "café", "a/b", "🙂", "x" * 1024, *(f"k{i}" for i in range(20))]
        for key in keys:
            reply = self.http.put("/kv/" + quote(key, safe=""), b"v")
            self.assertEqual(reply.code, 201, key)
            owner = self.cluster.ring.owner(key)
            self.assertEqual(holders(self.cluster, key), [owner], key)
            record = self.cluster.nodes[owner].engine.get(key)
            assert record is not None
            # The owner minted the version: its id is the writer.
            self.assertEqual(record.version, Version.parse(reply.json()["version"]))
            self.assertEqual(record.version.writer, owner)

    def test_seed_api_lands_on_the_owner_too(self) -> None:
        reply = self.http.post_json("/set", {"key": "name", "value": "alice"})
        owner = self.cluster.ring.owner("name")
        self.assertEqual(holders(self.cluster, "name"), [owner])
        self.assertEqual(Version.parse(reply.json()["version"]).writer, owner)
        self.http.post_json("/delete", {"key": "name"})
        record = self.cluster.nodes[owner].engine.get("name")
        assert record is not None
        self.assertTrue(record.tombstone)
        self.assertEqual(holders(self.cluster, "name"), [owner])

    def test_keys_spread_over_all_nodes(self) -> None:
        keys = [f"user:{i}" for i in range(300)]
        for key in keys:
            self.assertEqual(self.http.post_json("/set", {"key": key, "value": key}).code, 200)
        counts = {n: len(list(app.engine.scan())) for n, app in self.cluster.nodes.items()}
        self.assertEqual(sum(counts.values()), 300)
        for node, count in counts.items():
            # Each node owns about a third of the ring; 300 fixed keys land
            # 100 +- 9 apiece (one standard deviation), so 60 is a real floor.
            self.assertGreaterEqual(count, 60, counts)
            self.assertEqual(
                count,
                sum(1 for key in keys if self.cluster.ring.owner(key) == node),
                node,
            )
        for key in keys[::10]:
            self.assertEqual(self.http.get("/get?key=" + quote(key)).json()["value"], key)

    def test_cluster_view(self) -> None:
        reply = self.http.get("/cluster")
        self.assertEqual(reply.code, 200)
        payload = reply.json()
        self.assertEqual(list(payload), ["nodes"])
        nodes = payload["nodes"]
        self.assertEqual([n["node"] for n in nodes], NODES)
        ring = self.cluster.ring
        shares = ring.shares()
        for entry in nodes:
            node = entry["node"]
            self.assertEqual(
                entry,
                {
                    "node": node,
                    "weight": 1.0,
                    "vnodes": ring.vnode_counts()[node],
                    "share": round(shares[node], 6),
                    "health": UNKNOWN,
                },
            )
            self.assertGreater(entry["vnodes"], 0)
            # Equal weights: each share is about a third.
            self.assertLess(abs(entry["share"] - 1 / 3), 0.02, entry)
        # trial's assertAlmostEqual ignores delta=, so compare by hand.
        self.assertLess(abs(sum(n["share"] for n in nodes) - 1.0), 1e-5)

    def test_cluster_view_shows_health(self) -> None:
        down = NODES[1]
        self.cluster.network.down.add(down)
        self.cluster.clock.advance(7)
        d = self.cluster.health.check_all()
        self.http.pump(d)
        self.successResultOf(d)
        health = {n["node"]: n["health"] for n in self.http.get("/cluster").json()["nodes"]}
        for node in NODES:
            status = "down" if node == down else "up"
            self.assertEqual(
                (health[node]["status"], health[node]["since"], health[node]["last_check"]),
                (status, 7.0, 7.0),
                node,
            )
        self.assertIsNone(health[NODES[0]]["error"])
        self.assertIn(down, health[down]["error"])

    def test_explain(self) -> None:
        for key, query in [("name", "name"), ("a/b", "a%2Fb"), ("café", "caf%C3%A9")]:
            reply = self.http.get("/explain?key=" + query)
            self.assertEqual(reply.code, 200)
            payload = reply.json()
            placement = self.cluster.ring.explain(key, 3)
            owner = self.cluster.ring.owner(key)
            self.assertEqual(
                payload,
                {
                    "key": key,
                    "hash": hash_key(key),
                    "position": placement.position,
                    "owner": owner,
                    "preference_list": [
                        {"node": n, "status": "unknown"} for n in placement.preference_list
                    ],
                },
            )
            prefs = [p["node"] for p in payload["preference_list"]]
            self.assertEqual(prefs[0], owner)
            self.assertEqual(sorted(prefs), NODES)
            # The explanation is the truth: a write goes to that owner.
            self.http.put("/kv/" + quote(key, safe=""), b"v")
            self.assertEqual(holders(self.cluster, key), [owner])

    def test_explain_shows_health(self) -> None:
        key = key_owned_by(self.cluster, NODES[0])
        self.cluster.health.mark(NODES[0], up=False, error="test")
        self.cluster.health.mark(NODES[1], up=True)
        prefs = self.http.get("/explain?key=" + key).json()["preference_list"]
        status = {"127.0.0.1:8081": "down", "127.0.0.1:8082": "up", "127.0.0.1:8083": "unknown"}
        self.assertEqual(prefs, [{"node": p["node"], "status": status[p["node"]]} for p in prefs])
        self.assertEqual(prefs[0]["node"], NODES[0])

    def test_explain_bad_keys(self) -> None:
        self.assertEqual(self.http.get("/explain").error(), (400, "invalid_key"))
        self.assertEqual(self.http.get("/explain?key=").error(), (400, "invalid_key"))
        self.assertEqual(self.http.get("/explain?key=" + "k" * 1025).error(), (414, "key_too_long"))
        reply = self.http.post_json("/explain?key=k", {})
        self.assertEqual(reply.error(), (405, "method_not_allowed"))
        self.assertEqual(reply.header("allow"), "GET, HEAD")

    def test_health(self) -> None:
        reply = self.http.get("/health")
        self.assertEqual(reply.code, 200)
        self.assertEqual(
            reply.json(), {"status": "ok", "role": "proxy", "nodes_up": 3, "nodes_total": 3}
        )
        self.cluster.health.mark(NODES[2], up=False, error="test")
        self.assertEqual(self.http.get("/health").json()["nodes_up"], 2)


class FailureTests(SynchronousTestCase):
    """A failing node gets a clear JSON answer; other nodes' keys keep working."""

    def setUp(self) -> None:
        self.cluster = new_cluster()
        self.http = proxy_http(self, self.cluster)
        self.node = NODES[1]
        self.key = key_owned_by(self.cluster, self.node)
        self.path = "/kv/" + quote(self.key, safe="")
        self.others = {n: key_owned_by(self.cluster, n) for n in NODES if n != self.node}

    def refuse(self) -> None:
        self.cluster.network.down.add(self.node)

    def assertBody(self, reply: Reply, status: int, body: Mapping[str, object]) -> None:
        self.assertEqual((reply.code, reply.json()), (status, body))

    def refused_message(self) -> str:
        return (
            f"node {self.node} is unreachable: Connection was refused by other side: "
            f"{self.node} is down."
        )

    def test_refused_write_is_not_applied(self) -> None:
        self.refuse()
        for reply in [
            self.http.put(self.path, b"v"),
        ]:
            self.assertBody(
                reply,
                502,
                {
                    "error": "node_unreachable",
                    "message": self.refused_message(),
                    "node": self.node,
                    "outcome": "not_applied",
                },
            )
        state = self.cluster.health.state(self.node)
        self.assertEqual(state.status, "down")
        self.assertEqual(state.error, f"Connection was refused by other side: {self.node} is down.")

    def test_refused_read_and_delete(self) -> None:
        self.refuse()
        read = self.http.get("/get?key=" + quote(self.key))
        self.assertBody(
            read,
            502,
            {"error": "node_unreachable", "message": self.refused_message(), "node": self.node},
        )
        self.cluster.health.mark(self.node, up=True)
        delete = self.http.post_json("/delete", {"key": self.key})
        self.assertBody(
            delete,
            502,
            {
                "error": "node_unreachable",
                "message": self.refused_message(),
                "node": self.node,
                "outcome": "not_applied",
            },
        )

    def test_down_node_answers_503_without_a_call(self) -> None:
        """
        Once a refusal marked the node down, requests for its keys fail at
        once with 503: even with the node reachable again, nothing reaches it
        until a health check brings it back.
        """
        self.refuse()
        self.assertEqual(self.http.put(self.path, b"v").code, 502)
        self.cluster.network.down.clear()  # the node works, but the proxy must not ask it

        expected = {
            "error": "node_unavailable",
            "message": (
                f"node {self.node}, which owns this key, is down: "
                f"Connection was refused by other side: {self.node} is down."
            ),
            "node": self.node,
        }
        for reply in [
            self.http.put(self.path, b"v"),
            self.http.post_json("/set", {"key": self.key, "value": "v"}),
            self.http.get(self.path),
            self.http.get("/get?key=" + quote(self.key)),
            self.http.delete(self.path),
        ]:
            self.assertBody(reply, 503, expected)
        self.assertEqual(holders(self.cluster, self.key), [])

    def test_other_nodes_keep_working(self) -> None:
        self.refuse()
        self.assertEqual(self.http.put(self.path, b"v").code, 502)
        for node, key in self.others.items():
            path = "/kv/" + quote(key, safe="")
            self.assertEqual(self.http.put(path, b"v").code, 201, node)
            got = self.http.get(path)
            self.assertEqual((got.code, got.body), (200, b"v"), node)
            self.assertEqual(self.http.delete(path).code, 200, node)
            self.assertEqual(holders(self.cluster, key), [node])
        self.assertEqual(self.http.get("/health").json()["nodes_up"], 2)

    def test_health_check_brings_a_node_back(self) -> None:
        self.refuse()
        self.assertEqual(self.http.put(self.path, b"v").code, 502)

        # Still refusing: the check keeps it down.
        d = self.cluster.health.check_all()
        self.http.pump(d)
        self.successResultOf(d)
        self.assertTrue(self.cluster.health.is_down(self.node))
        self.assertEqual(self.http.put(self.path, b"v").code, 503)

        self.cluster.network.down.clear()
        self.cluster.clock.advance(5)
        d = self.cluster.health.check_all()
        self.http.pump(d)
        self.successResultOf(d)
        state = self.cluster.health.state(self.node)
        self.assertEqual((state.status, state.since, state.error), ("up", 5.0, ""))

        reply = self.http.put(self.path, b"v")
        self.assertEqual(reply.code, 201)
        self.assertEqual(holders(self.cluster, self.key), [self.node])
        self.assertEqual(self.http.get("/health").json()["nodes_up"], 3)

    def hang(self, method: str, path: str, body: bytes | None = None) -> Reply:
        """Send a request to the hung node and time it out; return the reply."""
        self.cluster.network.hung.add(self.node)
        d = self.http.start(method, path, body)
        self.http.pump(d)
        self.assertNoResult(d)
        self.cluster.clock.advance(TIMEOUT - 0.01)
        self.http.pump(d)
        self.assertNoResult(d)
        self.cluster.clock.advance(0.02)
        return self.http.finish(d)

    def test_hung_write_outcome_is_unknown(self) -> None:
        for method, path, body in [
            ("PUT", self.path, b"v"),
            ("POST", "/set", f'{{"key": "{self.key}", "value": "v"}}'.encode()),
            ("DELETE", self.path, None),
        ]:
            reply = self.hang(method, path, body)
            self.assertBody(
                reply,
                504,
                {
                    "error": "node_timeout",
                    "message": (
                        f"node {self.node} did not answer within 2 s; "
                        "the write may or may not have been applied"
                    ),
                    "node": self.node,
                    "outcome": "unknown",
                },
            )

    def test_hung_read_times_out(self) -> None:
        for path in [self.path, "/get?key=" + quote(self.key)]:
            reply = self.hang("GET", path)
            self.assertBody(
                reply,
                504,
                {
                    "error": "node_timeout",
                    "message": f"node {self.node} did not answer within 2 s",
                    "node": self.node,
                },
            )

    def test_hung_node_recovers_when_it_answers_again(self) -> None:
        self.assertEqual(self.hang("PUT", self.path, b"v").code, 504)
        self.assertFalse(self.cluster.health.is_down(self.node))
        self.cluster.network.hung.clear()
        reply = self.http.put(self.path, b"v")
        self.assertEqual(reply.code, 201)
        self.assertEqual(holders(self.cluster, self.key), [self.node])

    def test_hung_node_does_not_block_other_keys(self) -> None:
        self.cluster.network.hung.add(self.node)
        stuck = self.http.start("PUT", self.path, b"v")
        for node, key in self.others.items():
            reply = self.http.put("/kv/" + quote(key, safe=""), b"v")
            self.assertEqual(reply.code, 201, node)
        self.assertNoResult(stuck)
        self.cluster.clock.advance(TIMEOUT + 1)
        self.assertEqual(self.http.finish(stuck).code, 504)


class RelayedErrorTests(SynchronousTestCase):
    """An error a node answers reaches the client with its status and code."""

    def setUp(self) -> None:
        self.cluster = new_cluster()
        self.http = proxy_http(self, self.cluster)

    def test_precondition_failed_names_the_node(self) -> None:
        key = key_owned_by(self.cluster, NODES[2])
        path = "/kv/" + quote(key, safe="")
        v1 = Version.parse(self.http.put(path, b"1").json()["version"])
        v2 = Version.parse(self.http.put(path, b"2").json()["version"])
        reply = self.http.put(path, b"3", {"If-Match": v1.etag()})
        self.assertEqual(
            (reply.code, reply.json()),
            (
                412,
                {
                    "error": "precondition_failed",
                    "message": f"node {NODES[2]}: If-Match wants {v1} but the key has {v2}",
                },
            ),
        )

    def test_node_value_limit_is_relayed(self) -> None:
        """A node stricter than the proxy refuses the value; the client sees the node's 413."""
        node = NODES[0]
        self.cluster.nodes[node].max_value_bytes = 4
        key = key_owned_by(self.cluster, node)
        reply = self.http.put("/kv/" + quote(key, safe=""), b"12345")
        self.assertEqual(
            (reply.code, reply.json()),
            (
                413,
                {
                    "error": "payload_too_large",
                    "message": f"node {node}: the value is 5 bytes; the limit is 4",
                },
            ),
        )
        self.assertEqual(holders(self.cluster, key), [])
        # A failed request is the node's answer, not a network failure.
        self.assertFalse(self.cluster.health.is_down(node))

    def test_proxy_value_limit_sends_nothing(self) -> None:
        app = ProxyApp(self.cluster.coordinator, 4)
        stub = StubTreq(app.app.resource())
        small = HTTP(self, stub, PROXY, flusher(self.cluster.node_http, stub))
        reply = small.put("/kv/k", b"12345")
        self.assertEqual(
            (reply.code, reply.json()),
            (
                413,
                {"error": "payload_too_large", "message": "the value is 5 bytes; the limit is 4"},
            ),
        )
        self.assertEqual(holders(self.cluster, "k"), [])
