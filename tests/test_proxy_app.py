"""
In-memory HTTP tests of the routing proxy, L{ProxyApp}, over a three-node
L{MemoryCluster}.

The proxy must serve exactly the node's data API (L{DataAPIContract} runs
again here, through the proxy), send each key to the nodes the ring says
hold it, and turn node failures into JSON answers a client can act on. Most
tests keep one copy of each key (N=R=W=1), so a key lives on exactly its
owner and routing is easy to see; replication has its own tests in
C{tests.test_replication}. No reactor and no sockets: the network is
C{StubTreq}, the failures come from C{cluster.network} (and
L{NetworkFaults} for failures of one phase of a write) and time from
C{cluster.clock}.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from unittest import mock
from urllib.parse import quote

from treq.testing import StubTreq
from twisted.internet.defer import fail
from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.placement import hash_key
from shardkv.core.records import Record
from shardkv.core.versions import Version
from shardkv.proxy.app import ProxyApp
from shardkv.storage.engine import StorageFull
from shardkv.testing import PROXY_WRITER, MemoryCluster
from tests.helpers import (
    HTTP,
    NetworkFaults,
    Reply,
    check_health,
    deliver_hints,
    flusher,
    install_faults,
    memory_cluster,
    settle,
)
from tests.test_node_app import DataAPIContract

NODES = ["127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083"]
TIMEOUT = 2.0
PROXY = "http://127.0.0.1:8080"
UNKNOWN = {"status": "unknown", "since": None, "last_check": None, "error": None}


def new_cluster(replicas: int = 1) -> MemoryCluster:
    """
    A fresh in-memory cluster of L{NODES}, keeping ``replicas`` copies of each
    key and answering after one reply (R=W=1).

    Most tests here look at routing, so they keep one copy: each key then
    lives on exactly its owner. Replication has its own tests.

    Every cluster shares one ring (building one takes ~0.3 s); each still
    gets fresh nodes, health and clock.
    """
    return memory_cluster(NODES, TIMEOUT, replicas=replicas, r=1, w=1)


def proxy_http(case: SynchronousTestCase, cluster: MemoryCluster) -> HTTP:
    # Not cluster.settle: it stops as soon as d.called, which a treq Deferred
    # waiting on an inner one already is, so a reply written after the clock
    # moved would never be flushed to the client.
    return HTTP(case, cluster.proxy, PROXY, flusher(cluster.node_http, cluster.proxy))


def holders(cluster: MemoryCluster, key: str) -> list[str]:
    """The nodes whose engines hold any record (tombstones too) for C{key}."""
    return [n for n, app in cluster.nodes.items() if app.engine.get(key) is not None]


def hint_holders(cluster: MemoryCluster) -> dict[str, dict[str, int]]:
    """Node -> its waiting hints per target node, for nodes that keep any."""
    counts = {n: app.engine.hint_counts() for n, app in cluster.nodes.items()}
    return {n: c for n, c in counts.items() if c}


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
        """
        The proxy decides preconditions and "not found" itself, from its
        quorum read, so no node's answer is relayed: no "node X:" prefix.
        """
        return message


class PlacementTests(SynchronousTestCase):
    """With one copy, keys go to the ring's owner, and the proxy explains where."""

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
            # The proxy minted the version (its clock is the writer) and the
            # owner stored exactly that version.
            self.assertEqual(record.version, Version.parse(reply.json()["version"]))
            self.assertEqual(record.version.writer, PROXY_WRITER)

    def test_seed_api_lands_on_the_owner_too(self) -> None:
        reply = self.http.post_json("/set", {"key": "name", "value": "alice"})
        owner = self.cluster.ring.owner("name")
        self.assertEqual(holders(self.cluster, "name"), [owner])
        self.assertEqual(Version.parse(reply.json()["version"]).writer, PROXY_WRITER)
        deleted = self.http.post_json("/delete", {"key": "name"})
        record = self.cluster.nodes[owner].engine.get("name")
        assert record is not None
        self.assertTrue(record.tombstone)
        self.assertEqual(record.version, Version.parse(deleted.json()["version"]))
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
        self.assertEqual(list(payload), ["replicas", "r", "w", "undelivered", "nodes"])
        self.assertEqual(
            (payload["replicas"], payload["r"], payload["w"], payload["undelivered"]), (1, 1, 1, 0)
        )
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
                    "hints_waiting": 0,
                    "pipelines": {},
                },
            )
            self.assertGreater(entry["vnodes"], 0)
            # Equal weights: each share is about a third.
            self.assertLess(abs(entry["share"] - 1 / 3), 0.02, entry)
        # trial's assertAlmostEqual ignores delta=, so compare by hand.
        self.assertLess(abs(sum(n["share"] for n in nodes) - 1.0), 1e-5)

    def test_cluster_view_shows_quorum_levels(self) -> None:
        """
        /cluster names the cluster's N, R and W; N never exceeds the number
        of nodes, and R and W shrink with it.
        """
        for kwargs, expected in [
            ({"replicas": 1, "r": 1, "w": 1}, (1, 1, 1)),
            ({"replicas": 3, "r": 2, "w": 2}, (3, 2, 2)),
            ({"replicas": 3, "r": 1, "w": 3}, (3, 1, 3)),
            ({"replicas": 5, "r": 3, "w": 3}, (3, 3, 3)),
        ]:
            cluster = memory_cluster(NODES, TIMEOUT, **kwargs)
            payload = proxy_http(self, cluster).get("/cluster").json()
            self.assertEqual((payload["replicas"], payload["r"], payload["w"]), expected, kwargs)

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
                    "token": placement.token,
                    "owner": owner,
                    "replicas": [{"node": owner, "status": "unknown", "version": None}],
                    "preference_list": list(placement.preference_list),
                },
            )
            prefs = payload["preference_list"]
            self.assertEqual(prefs[0], owner)
            self.assertEqual(sorted(prefs), NODES)
            # The explanation is the truth: a write goes to that owner, and
            # the explanation then shows the version the owner holds.
            version = self.http.put("/kv/" + quote(key, safe=""), b"v").json()["version"]
            self.assertEqual(holders(self.cluster, key), [owner])
            replicas = self.http.get("/explain?key=" + query).json()["replicas"]
            self.assertEqual(
                replicas,
                [{"node": owner, "status": "unknown", "version": version, "tombstone": False}],
            )
            deleted = self.http.delete("/kv/" + quote(key, safe="")).json()["version"]
            replicas = self.http.get("/explain?key=" + query).json()["replicas"]
            self.assertEqual(
                replicas,
                [{"node": owner, "status": "unknown", "version": deleted, "tombstone": True}],
            )

    def test_explain_shows_health(self) -> None:
        """
        Each of a key's N replicas is listed in preference order with the
        proxy's view of its health; one that cannot be asked shows why.
        """
        self.cluster = new_cluster(replicas=3)
        self.http = proxy_http(self, self.cluster)
        key = key_owned_by(self.cluster, NODES[0])
        self.cluster.health.mark(NODES[0], up=False, error="test")
        self.cluster.health.mark(NODES[1], up=True)
        self.cluster.network.down.add(NODES[2])
        payload = self.http.get("/explain?key=" + key).json()
        status = {"127.0.0.1:8081": "down", "127.0.0.1:8082": "up", "127.0.0.1:8083": "unknown"}
        replicas = payload["replicas"]
        self.assertEqual([r["node"] for r in replicas], payload["preference_list"])
        self.assertEqual(replicas[0]["node"], NODES[0])
        for entry in replicas:
            node = entry["node"]
            self.assertEqual((entry["status"], entry["version"]), (status[node], None), node)
            if node == NODES[2]:
                self.assertIn(f"{node} is down", entry["error"])
            else:
                self.assertNotIn("error", entry)

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
    """
    A failing owner gets the quorum's JSON answer; other nodes' keys keep
    working.

    With one copy a key's quorum is its owner alone, so a refused or hung
    owner means R (or W) cannot be had: 503 ``insufficient_replicas`` or 504
    ``replica_timeout``, saying how many replicas answered and how many were
    needed.
    """

    def setUp(self) -> None:
        self.cluster = new_cluster()
        self.http = proxy_http(self, self.cluster)
        self.faults: NetworkFaults = install_faults(self.cluster)
        self.node = NODES[1]
        self.key = key_owned_by(self.cluster, self.node)
        self.path = "/kv/" + quote(self.key, safe="")
        self.others = {n: key_owned_by(self.cluster, n) for n in NODES if n != self.node}

    def refuse(self) -> None:
        self.cluster.network.down.add(self.node)

    def assertBody(self, reply: Reply, status: int, body: Mapping[str, object]) -> None:
        self.assertEqual((reply.code, reply.json()), (status, body))

    def assertFields(self, reply: Reply, status: int, error: str, **fields: object) -> None:
        """C{reply} is this JSON error and its body has at least these fields."""
        self.assertEqual(reply.error(), (status, error), reply.body)
        payload = reply.json()
        self.assertEqual({name: payload.get(name) for name in fields}, fields, payload)

    def assertQuorumError(
        self, reply: Reply, status: int, error: str, message: str, **fields: object
    ) -> None:
        """
        C{reply} is exactly this JSON error: these fields and no others, and
        a message that starts with C{message} (it may go on to name nodes).
        """
        self.assertEqual(reply.error(), (status, error), reply.body)
        payload = dict(reply.json())
        self.assertTrue(payload.pop("message").startswith(message), reply.body)
        self.assertEqual(payload, {"error": error, **fields})

    def refused_error(self) -> str:
        return (
            f"node {self.node} is unreachable: "
            f"Connection was refused by other side: {self.node} is down."
        )

    def assertUnread(self, reply: Reply) -> None:
        """C{reply} is the answer when the owner could not be read."""
        self.assertQuorumError(
            reply,
            503,
            "insufficient_replicas",
            "only 0 of the 1 replicas needed could be read",
            replied=0,
            required=1,
            failed=[self.node],
        )

    def writes(self) -> list[tuple[str, str, bytes | None]]:
        """One request of each kind that writes the key (PUT, /set, DELETE)."""
        return [
            ("PUT", self.path, b"v"),
            ("POST", "/set", f'{{"key": "{self.key}", "value": "v"}}'.encode()),
            ("DELETE", self.path, None),
        ]

    def test_refused_read(self) -> None:
        self.refuse()
        for path in [self.path, "/get?key=" + quote(self.key)]:
            self.assertUnread(self.http.get(path))
        state = self.cluster.health.state(self.node)
        self.assertEqual((state.status, state.error), ("down", self.refused_error()))

    def test_refused_write_is_not_applied(self) -> None:
        """
        A write whose owner refuses the connection is 503 and reaches no node:
        its quorum read already fails, so no replica write is ever sent, and
        the answer says so.
        """
        self.refuse()
        for method, path, body in self.writes():
            self.cluster.health.mark(self.node, up=True)
            reply = self.http.request(method, path, body)
            self.assertFields(
                reply,
                503,
                "insufficient_replicas",
                replied=0,
                required=1,
                failed=[self.node],
                outcome="not_applied",
            )
        self.assertEqual(self.faults.writes(), [])
        self.assertEqual((holders(self.cluster, self.key), hint_holders(self.cluster)), ([], {}))
        state = self.cluster.health.state(self.node)
        self.assertEqual((state.status, state.error), ("down", self.refused_error()))

    def test_write_refused_after_its_read_is_not_applied(self) -> None:
        """
        An owner that answers the quorum read but refuses the replica write
        (it went down in between) gives a definite failure: nothing was sent.
        """
        self.faults.refuse_writes.add(self.node)
        reply = self.http.put(self.path, b"v")
        self.assertBody(
            reply,
            503,
            {
                "error": "insufficient_replicas",
                "message": (
                    "only 0 of the 1 replicas needed acknowledged; the write was not applied"
                ),
                "acks": 0,
                "required": 1,
                "outcome": "not_applied",
            },
        )
        self.assertEqual(holders(self.cluster, self.key), [])
        self.assertTrue(self.cluster.health.is_down(self.node))

    def test_write_answered_not_applied_never_appears(self) -> None:
        """
        "not_applied" is a promise: the write is on no node and never will
        be, whatever recovers later. So no hint is kept for a write that
        failed everywhere. (It once was: another node kept a hint for the
        owner, and hinted handoff later made the "failed" write readable.)
        """
        for fault in ["refuse_writes", "engine_full"]:
            cluster = new_cluster()
            http = proxy_http(self, cluster)
            faults = install_faults(cluster)
            engine: Any = cluster.nodes[self.node].engine
            if fault == "refuse_writes":
                faults.refuse_writes.add(self.node)
                broken = mock.patch.object(engine, "put", engine.put)  # unchanged
            else:
                broken = mock.patch.object(
                    engine, "put", lambda key, rec: fail(StorageFull("the disk is full"))
                )
            with broken:
                reply = http.put(self.path, b"v")
            faults.refuse_writes.clear()
            self.assertFields(reply, 503, "insufficient_replicas", outcome="not_applied")
            settle(cluster)
            self.assertEqual(hint_holders(cluster), {}, fault)
            self.assertEqual(cluster.coordinator.undelivered, {}, fault)
            check_health(self, cluster)
            deliver_hints(self, cluster)
            check_health(self, cluster)
            self.assertEqual(http.get(self.path).code, 404, fault)

    def test_down_node_answers_503_without_a_call(self) -> None:
        """
        Once a refusal marked the node down, requests for its keys fail at
        once with 503: even with the node reachable again, nothing reaches it
        until a health check brings it back.
        """
        self.refuse()
        self.assertEqual(self.http.put(self.path, b"v").code, 503)
        self.cluster.network.down.clear()  # the node works, but the proxy must not ask it
        self.faults.calls.clear()

        for reply in [
            self.http.put(self.path, b"v"),
            self.http.post_json("/set", {"key": self.key, "value": "v"}),
            self.http.get(self.path),
            self.http.get("/get?key=" + quote(self.key)),
            self.http.delete(self.path),
        ]:
            self.assertFields(
                reply, 503, "insufficient_replicas", replied=0, required=1, failed=[self.node]
            )
            if reply.json().get("outcome") is not None:  # writes say nothing was written
                self.assertEqual(reply.json()["outcome"], "not_applied")
        self.assertEqual(self.faults.calls, [])
        self.assertEqual(holders(self.cluster, self.key), [])

    def test_other_nodes_keep_working(self) -> None:
        self.refuse()
        self.assertEqual(self.http.put(self.path, b"v").code, 503)
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
        self.assertEqual(self.http.put(self.path, b"v").code, 503)

        # Still refusing: the check keeps it down.
        check_health(self, self.cluster)
        self.assertTrue(self.cluster.health.is_down(self.node))
        self.assertEqual(self.http.put(self.path, b"v").code, 503)

        self.cluster.network.down.clear()
        self.cluster.clock.advance(5)
        check_health(self, self.cluster)
        state = self.cluster.health.state(self.node)
        self.assertEqual((state.status, state.since, state.error), ("up", 5.0, ""))

        reply = self.http.put(self.path, b"v")
        self.assertEqual(reply.code, 201)
        self.assertEqual(holders(self.cluster, self.key), [self.node])
        self.assertEqual(self.http.get("/health").json()["nodes_up"], 3)

    def hang(self, method: str, path: str, body: bytes | None = None) -> Reply:
        """Send a request to the hung node and time it out; return the reply."""
        if not self.faults.hang_writes:
            self.cluster.network.hung.add(self.node)
        return self.http.at_timeout(self.cluster.clock, TIMEOUT, method, path, body)

    def test_hung_write_outcome_is_unknown(self) -> None:
        """
        An owner that answers the quorum read but never acknowledges the
        replica write gives 504 after the timeout: the write may or may not
        have been applied. A hint for the owner is left on another node, so
        the write may still become visible.
        """
        self.assertEqual(self.http.put(self.path, b"v0").code, 201)
        self.faults.hang_writes.add(self.node)
        for method, path, body in self.writes():
            self.cluster.health.mark(self.node, up=True)
            reply = self.hang(method, path, body)
            self.assertBody(
                reply,
                504,
                {
                    "error": "replica_timeout",
                    "message": (
                        "only 0 of the 1 replicas needed acknowledged in time; "
                        "the write may or may not have been applied"
                    ),
                    "acks": 0,
                    "required": 1,
                    "outcome": "unknown",
                },
            )
            self.assertTrue(self.cluster.health.is_down(self.node))
            settle(self.cluster)
            [(stand_in, waiting)] = hint_holders(self.cluster).items()
            self.assertEqual((waiting, stand_in != self.node), ({self.node: 1}, True))

    def test_hung_write_times_out(self) -> None:
        """
        A wholly hung owner times out the write's quorum read: 504, and
        nothing was sent, which the answer says.
        """
        for method, path, body in self.writes():
            self.cluster.health.mark(self.node, up=True)
            reply = self.hang(method, path, body)
            self.assertFields(
                reply,
                504,
                "replica_timeout",
                replied=0,
                required=1,
                failed=[self.node],
                outcome="not_applied",
            )
        self.assertEqual(self.faults.writes(), [])

    def test_hung_read_times_out(self) -> None:
        for path in [self.path, "/get?key=" + quote(self.key)]:
            self.cluster.health.mark(self.node, up=True)
            reply = self.hang("GET", path)
            self.assertQuorumError(
                reply,
                504,
                "replica_timeout",
                "only 0 of the 1 replicas needed answered in time",
                replied=0,
                required=1,
                failed=[self.node],
            )

    def test_timeout_marks_the_node_down_until_a_health_check(self) -> None:
        """
        A node that timed out is down: its keys fail at once (no second
        timeout to wait for) until a health check finds it answering again.
        """
        self.assertEqual(self.hang("PUT", self.path, b"v").code, 504)
        state = self.cluster.health.state(self.node)
        self.assertEqual(
            (state.status, state.error), ("down", f"node {self.node} did not answer within 2 s")
        )
        self.faults.calls.clear()
        self.assertEqual(self.http.put(self.path, b"v").code, 503)  # no clock advance needed
        self.assertEqual(self.faults.calls, [])

        self.cluster.network.hung.clear()
        self.assertEqual(self.http.put(self.path, b"v").code, 503)
        check_health(self, self.cluster)
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


class NodeErrorTests(SynchronousTestCase):
    """
    The proxy decides preconditions itself; an error a node answers is a
    failed reply in the quorum, not a sign that the node is down.
    """

    def setUp(self) -> None:
        self.cluster = new_cluster()
        self.http = proxy_http(self, self.cluster)
        self.faults = install_faults(self.cluster)

    def test_precondition_failed_is_decided_by_the_proxy(self) -> None:
        key = key_owned_by(self.cluster, NODES[2])
        path = "/kv/" + quote(key, safe="")
        v1 = Version.parse(self.http.put(path, b"1").json()["version"])
        v2 = Version.parse(self.http.put(path, b"2").json()["version"])
        sent = len(self.faults.writes())
        reply = self.http.put(path, b"3", {"If-Match": v1.etag()})
        self.assertEqual(
            (reply.code, reply.json()),
            (
                412,
                {
                    "error": "precondition_failed",
                    "message": f"If-Match wants {v1} but the key has {v2}",
                },
            ),
        )
        # Checked against the quorum read: no replica write was sent.
        self.assertEqual(len(self.faults.writes()), sent)
        record = self.cluster.nodes[NODES[2]].engine.get(key)
        assert record is not None
        self.assertEqual((record.version, record.value), (v2, b"2"))

    def test_node_error_is_a_failed_reply(self) -> None:
        """
        An owner whose engine refuses the write (its disk is full) makes the
        write a definite failure: 503 ``not_applied``. The node answered, so
        it is not marked down.
        """
        node = NODES[0]
        key = key_owned_by(self.cluster, node)
        engine: Any = self.cluster.nodes[node].engine
        with mock.patch.object(engine, "put", lambda k, rec: fail(StorageFull("the disk is full"))):
            reply = self.http.put("/kv/" + quote(key, safe=""), b"12345")
        self.assertEqual(
            (reply.code, reply.json()),
            (
                503,
                {
                    "error": "insufficient_replicas",
                    "message": (
                        "only 0 of the 1 replicas needed acknowledged; the write was not applied"
                    ),
                    "acks": 0,
                    "required": 1,
                    "outcome": "not_applied",
                },
            ),
        )
        self.assertEqual(holders(self.cluster, key), [])
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
        self.assertEqual(self.faults.calls, [])
