"""
In-memory tests of the coordinator (L{shardkv.proxy.coordinator}), through the proxy.

Every key lives on the first N nodes of its preference list (its home
replicas); the coordinator answers a read after R replies and a write after
W durable acknowledgements from home replicas (R=W=2 unless a request says
otherwise), never waiting for the slowest replica, and repairs stale
replicas after a read. When a quorum cannot be had, its answer says how many
replicas answered and whether a write may still have been applied.

The first tests keep one copy of each key (N=R=W=1), so that a failing
owner is the whole quorum; the rest run on fresh 3- and 5-node replicated
clusters, most as tables where each row is a fresh cluster and a failure
names its row. Hints for replicas that missed a write are
C{tests.proxy.test_hints}'s.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock
from urllib.parse import quote

from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.conditions import Precondition
from shardkv.core.quorum import Consistency
from shardkv.core.records import Record
from shardkv.core.versions import Version, VersionClock
from shardkv.core.window import Room
from shardkv.errors import NodeBusy, NodeUnreachable, StorageFull
from shardkv.proxy import coordinator as coordinator_module
from shardkv.proxy.app import ProxyApp
from shardkv.proxy.coordinator import ONE_ROUND_ATTEMPTS, ROOM_WAIT_FRACTION, Coordinator
from shardkv.proxy.health import HealthMonitor
from shardkv.proxy.hints import HintKeeper
from shardkv.replica.client import write_cost
from shardkv.storage.memory import MemoryEngine
from shardkv.testing.history import History, Op, check_final, check_reads
from shardkv.testing.memory import PROXY_WRITER
from shardkv.web.dataroutes import DEFAULT_MAX_VALUE_BYTES
from tests.helpers import (
    HTTP,
    NODES_3,
    NODES_5,
    Call,
    Reply,
    answered,
    check_health,
    cluster_http,
    deliver_hints,
    flusher,
    hints_for_key,
    home_replicas,
    install_faults,
    memory_cluster,
    quorum_status,
    record_holders,
    same_data,
    settle,
)
from tests.proxy.cluster_case import (
    NODES,
    POSITIONS,
    TIMEOUT,
    ClusterCase,
    OwnerCase,
    hint_holders,
    holders,
    key_owned_by,
    kv,
    new_cluster,
    proxy_http,
    version_of,
)

# -- where writes go ----------------------------------------------------------


class OwnerPlacementTests(SynchronousTestCase):
    """With one copy, keys go to the ring's owner and nowhere else."""

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
            record = self.cluster.nodes[owner].store.engine.get(key)
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
        record = self.cluster.nodes[owner].store.engine.get("name")
        assert record is not None
        self.assertTrue(record.tombstone)
        self.assertEqual(record.version, Version.parse(deleted.json()["version"]))
        self.assertEqual(holders(self.cluster, "name"), [owner])

    def test_keys_spread_over_all_nodes(self) -> None:
        keys = [f"user:{i}" for i in range(300)]
        for key in keys:
            self.assertEqual(self.http.post_json("/set", {"key": key, "value": key}).code, 200)
        counts = {n: len(list(app.store.engine.scan())) for n, app in self.cluster.nodes.items()}
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


class PlacementTests(ClusterCase):
    def test_write_lands_on_exactly_the_home_replicas(self) -> None:
        """
        A write (and a delete's tombstone) is stored on exactly the N home
        replicas, all with the version the proxy minted and answered; a read
        then returns it. A cluster smaller than N keeps a copy on every node.
        """
        for size, nodes in [(3, NODES_3), (5, NODES_5), (2, NODES_3[:2])]:
            self.cluster = memory_cluster(nodes, TIMEOUT)
            self.http = cluster_http(self, self.cluster)
            for i in range(8):
                key = f"user:{i}"
                home = home_replicas(self.cluster, key, min(3, len(nodes)))
                reply = self.now("PUT", kv(key), b"v%d" % i)
                self.assertEqual(reply.code, 201, (size, key))
                version = version_of(reply)
                self.assertEqual(version.writer, PROXY_WRITER)
                self.assertEqual(sorted(record_holders(self.cluster, key)), sorted(home))
                self.assertEqual(self.versions(key, home), [version] * len(home), (size, key))
                got = self.now("GET", kv(key))
                self.assertEqual(
                    (got.code, got.body, got.header("etag")), (200, b"v%d" % i, version.etag())
                )

                deleted = version_of(self.now("DELETE", kv(key)))
                self.assertGreater(deleted, version)
                self.assertEqual(sorted(record_holders(self.cluster, key)), sorted(home))
                for node in home:
                    record = self.stored(node, key)
                    assert record is not None
                    self.assertEqual((record.version, record.tombstone), (deleted, True), node)
                self.assertEqual(self.now("GET", kv(key)).code, 404)
            self.no_hints()


# -- quorum levels ------------------------------------------------------------


class QuorumLevelTests(ClusterCase):
    def test_r_and_w_per_request_with_one_replica_down(self) -> None:
        """
        ?r= / ?w= and the X-Shardkv-R / X-Shardkv-W headers set R and W for
        one request. With one of three home replicas down, W=3 or R=3 cannot
        be had: 503, and a write sends nothing. W=2, R=2 and the defaults work.
        """
        rows: list[tuple[str, str, dict[str, str], int, dict[str, object]]] = [
            ("PUT", "?w=3", {}, 503, {"acks": 0, "required": 3, "outcome": "not_applied"}),
            ("PUT", "", {"X-Shardkv-W": "3"}, 503, {"required": 3, "outcome": "not_applied"}),
            ("DELETE", "?w=3", {}, 503, {"required": 3, "outcome": "not_applied"}),
            ("PUT", "?w=2", {}, 200, {}),
            ("PUT", "", {"X-Shardkv-W": "1"}, 200, {}),
            ("PUT", "", {}, 200, {}),
            ("GET", "?r=3", {}, 503, {"replied": 2, "required": 3}),
            ("GET", "", {"X-Shardkv-R": "3"}, 503, {"replied": 2, "required": 3}),
            ("GET", "?r=2", {}, 200, {}),
            ("GET", "", {"X-Shardkv-R": "1"}, 200, {}),
            ("PUT", "?r=3", {}, 503, {"replied": 2, "required": 3, "outcome": "not_applied"}),
        ]
        clusters = [(3, 0), (5, 0), (5, 1), (5, 2)]  # (size, position of the down replica)
        for (method, query, headers, code, fields), (size, position) in itertools.product(
            rows, clusters
        ):
            row = (method, query, headers, size, position)
            self.use(size)
            key = "k"
            home = home_replicas(self.cluster, key)
            self.assertEqual(self.now("PUT", kv(key), b"old").code, 201)
            self.down(home[position])
            sent = len(self.faults.calls)
            body = b"new" if method == "PUT" else None
            reply = self.now(method, kv(key) + query, body, **headers)
            self.assertEqual(reply.code, code, (row, reply.body))
            if code == 503:
                payload = reply.json()
                self.assertEqual(payload["error"], "insufficient_replicas", row)
                self.assertEqual({f: payload.get(f) for f in fields}, fields, row)
                if method == "GET":
                    self.assertNotIn("outcome", payload, row)
                else:
                    # Nothing was sent: the only replica writes are the first PUT's.
                    self.assertEqual(len(self.faults.writes()), 3, row)
                    self.assertEqual(self.now("GET", kv(key)).body, b"old", row)
            else:
                self.assertGreater(len(self.faults.calls), sent, row)

    def test_r_and_w_decide_how_long_a_request_waits(self) -> None:
        """
        With one home replica hung, a request needing all three replies waits
        for the timeout (then 504); one needing fewer answers within one hedge
        delay (at once when the hung replica is not among the first R a
        hedged read asks, or the request writes without reading first).
        """
        rows: list[tuple[str, str, dict[str, str], bool]] = [
            ("PUT", "?w=3", {}, True),
            ("PUT", "", {"X-Shardkv-W": "3"}, True),
            ("PUT", "?r=3", {}, True),
            ("GET", "?r=3", {}, True),
            ("GET", "", {"X-Shardkv-R": "3"}, True),
            ("PUT", "", {}, False),
            ("PUT", "?r=1&w=1", {}, False),
            ("GET", "", {}, False),
            ("GET", "?r=1", {}, False),
            ("DELETE", "", {}, False),
        ]
        for (method, query, headers, waits), position in itertools.product(rows, POSITIONS):
            row = (method, query, headers, position)
            self.use(5)
            key = "k"
            home = home_replicas(self.cluster, key)
            self.assertEqual(self.now("PUT", kv(key), b"old").code, 201)
            self.cluster.network.hung.add(home[position])
            body = b"new" if method == "PUT" else None
            if waits:
                reply = self.after_timeout(method, kv(key) + query, body, **headers)
                self.assertEqual(reply.error(), (504, "replica_timeout"), row)
            else:
                reply = self.hedged(method, kv(key) + query, body, **headers)
                self.assertIn(reply.code, (200, 201), row)

    def test_invalid_quorum(self) -> None:
        """R or W above N, or not a positive whole number, is 400 and sends nothing."""
        self.use(5)
        self.now("PUT", kv("k"), b"v")
        self.faults.calls.clear()
        cases: list[tuple[str, str, dict[str, str], str | None]] = [
            ("GET", "?r=4", {}, "r=4 and w=2 must not exceed the 3 replicas of each key"),
            ("PUT", "?w=4", {}, "r=2 and w=4 must not exceed the 3 replicas of each key"),
            ("DELETE", "?r=9&w=1", {}, "r=9 and w=1 must not exceed the 3 replicas of each key"),
            ("GET", "", {"X-Shardkv-R": "4"}, None),
            ("PUT", "", {"X-Shardkv-W": "4"}, None),
            ("GET", "?r=0", {}, "r must be a positive whole number, not '0'"),
            ("PUT", "?w=two", {}, "w must be a positive whole number, not 'two'"),
            ("PUT", "?w=-1", {}, None),
            ("GET", "", {"X-Shardkv-R": "1.5"}, None),
        ]
        for method, query, headers, message in cases:
            reply = self.http.request(method, kv("k") + query, b"x", headers)
            self.assertEqual(reply.error(), (400, "invalid_quorum"), (method, query, headers))
            if message is not None:
                self.assertEqual(reply.json()["message"], message)
        self.assertEqual(self.faults.calls, [])
        self.assertEqual(self.now("GET", kv("k")).body, b"v")


class SloppyQuorumTests(ClusterCase):
    """W counts acknowledgements from home replicas, unless a write asks to be sloppy."""

    def test_hinted_copy_does_not_count_toward_w(self) -> None:
        """
        With two of three home replicas down, W=2 cannot be met by home
        replicas: 503 "not_applied" and nothing is sent. With ?sloppy=true
        (or X-Shardkv-Sloppy) the stand-ins' hinted copies count, and it
        succeeds. (?r=1 lets the write's own quorum read through: it asks only
        home replicas.)
        """
        for pair, (query, headers) in itertools.product(
            itertools.combinations(POSITIONS, 2),
            [("?r=1&sloppy=true", {}), ("?r=1", {"X-Shardkv-Sloppy": "true"})],
        ):
            row = (pair, query, headers)
            self.use(5)
            key = "k"
            preference = self.cluster.ring.preference_list(key, 5)
            home = preference[:3]
            missing = [home[p] for p in pair]
            self.down(*missing)

            for strict in ["?r=1", "?r=1&w=2", ""]:
                reply = self.now("PUT", kv(key) + strict, b"v")
                self.assertEqual(reply.error(), (503, "insufficient_replicas"), (row, strict))
                if strict:
                    fields = {k: reply.json()[k] for k in ("acks", "required", "outcome", "down")}
                    expected = {
                        "acks": 0,
                        "required": 2,
                        "outcome": "not_applied",
                        "down": missing,  # in preference order
                    }
                    self.assertEqual(fields, expected, (row, strict))
            self.assertEqual(self.faults.writes(), [], row)
            self.assertEqual(record_holders(self.cluster, key), [], row)

            reply = self.now("PUT", kv(key) + query, b"v", **headers)
            self.assertEqual(reply.code, 201, row)
            [live] = [n for n in home if n not in missing]
            self.assertEqual(record_holders(self.cluster, key), [live], row)
            self.assertEqual(
                hints_for_key(self.cluster, key),
                {preference[3]: [missing[0]], preference[4]: [missing[1]]},
                row,
            )

    def test_sloppy_write_needs_w_distinct_nodes(self) -> None:
        """
        W counts nodes, not hints: in a 3-node cluster with two home replicas
        down, the one live node would keep its copy and both hints, so even a
        sloppy W=2 is out of reach and nothing is sent. (It once answered 201
        with a single copy.)
        """
        self.use(3)
        home = home_replicas(self.cluster, "k")
        self.down(home[0], home[1])
        reply = self.now("PUT", kv("k") + "?r=1&sloppy=true", b"v")
        self.assertEqual(reply.error(), (503, "insufficient_replicas"))
        fields = {f: reply.json()[f] for f in ("acks", "required", "outcome")}
        self.assertEqual(fields, {"acks": 0, "required": 2, "outcome": "not_applied"})
        self.assertEqual(self.faults.writes(), [])
        self.assertEqual(self.now("PUT", kv("k") + "?r=1&w=1&sloppy=true", b"v").code, 201)


# -- a failing owner ----------------------------------------------------------


class OwnerFailureTests(OwnerCase):
    """
    A failing owner gets the quorum's JSON answer; other nodes' keys keep
    working.
    """

    def test_refused_read(self) -> None:
        self.refuse()
        for path in [self.path, "/get?key=" + quote(self.key)]:
            self.assertUnread(self.http.get(path))
        state = self.cluster.health.state(self.node)
        self.assertEqual((state.status, state.error), ("down", self.refused_error()))

    def test_refused_write_is_not_applied(self) -> None:
        """
        A write whose owner refuses the connection is 503 and reaches no node,
        and the answer says so: a PUT (one round) is refused unsent; a DELETE's
        quorum read already fails, so no replica write is ever sent.
        """
        self.refuse()
        for method, path, body in self.writes():
            self.cluster.health.mark(self.node, up=True)
            reply = self.http.request(method, path, body)
            if method == "DELETE":
                fields: dict[str, object] = {"replied": 0, "failed": [self.node]}
            else:
                fields = {"acks": 0}
            self.assertFields(
                reply, 503, "insufficient_replicas", required=1, outcome="not_applied", **fields
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
        ]:  # one-round writes: refused before anything is sent
            self.assertFields(
                reply,
                503,
                "insufficient_replicas",
                acks=0,
                required=1,
                outcome="not_applied",
                down=[self.node],
            )
        for reply in [
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

    def test_hung_write_outcome_is_unknown(self) -> None:
        """
        An owner that answers the quorum read but never acknowledges the
        replica write gives 504 after the timeout: the write may or may not
        have been applied. A hint for the owner is left on another node, so
        the write may still become visible. The owner is not marked down: it
        answered the read, and a slow answer is not a failure.
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
            self.assertFalse(self.cluster.health.is_down(self.node))
            settle(self.cluster)
            [(stand_in, waiting)] = hint_holders(self.cluster).items()
            self.assertEqual((waiting, stand_in != self.node), ({self.node: 1}, True))

    def test_hung_write_times_out(self) -> None:
        """
        A wholly hung owner times out a DELETE's quorum read: 504, and nothing
        was sent, which the answer says. A PUT (one round) was sent: 504, and
        its outcome is unknown.
        """
        for method, path, body in self.writes():
            self.cluster.health.mark(self.node, up=True)
            reply = self.hang(method, path, body)
            if method == "DELETE":
                fields: dict[str, object] = {
                    "replied": 0,
                    "failed": [self.node],
                    "outcome": "not_applied",
                }
            else:
                fields = {"acks": 0, "outcome": "unknown"}
            self.assertFields(reply, 504, "replica_timeout", required=1, **fields)
        # What reached a node: hints of the PUTs for the hung owner, nothing else.
        settle(self.cluster)
        self.assertEqual({c.hint_for for c in self.faults.writes()}, {self.node})
        self.assertEqual(len(self.faults.writes()), 2)

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
        record = self.cluster.nodes[NODES[2]].store.engine.get(key)
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
        engine: Any = self.cluster.nodes[node].store.engine
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


# -- slow and hung replicas ---------------------------------------------------


class SlowReplicaTests(ClusterCase):
    def test_hung_replica_is_not_waited_for(self) -> None:
        """
        A hung home replica delays neither writes nor reads by more than one
        hedge delay: they answer once two replicas did, without waiting for
        its timeout. When its calls time out it is not marked down (only
        failed health checks do that for a node that accepts connections),
        and the write it missed waits for it as a hint.
        """
        for size, position, op in itertools.product((3, 5), POSITIONS, ("PUT", "GET", "DELETE")):
            row = (size, position, op)
            self.use(size)
            key = "k"
            home = home_replicas(self.cluster, key)
            self.assertEqual(self.now("PUT", kv(key), b"v0").code, 201)
            hung = home[position]
            self.cluster.network.hung.add(hung)

            reply = self.hedged(op, kv(key), b"v1" if op == "PUT" else None)
            self.assertEqual(reply.code, 200, row)
            self.assertLessEqual(self.cluster.clock.seconds(), self.hedge_delay())
            if op == "GET":
                self.assertEqual(reply.body, b"v0", row)
                continue
            version = version_of(reply)
            live = [n for n in home if n != hung]
            self.assertEqual(self.versions(key, live), [version] * 2, row)

            self.cluster.clock.advance(TIMEOUT + 0.01)
            settle(self.cluster)
            self.assertFalse(self.cluster.health.is_down(hung), row)
            [stand_in] = hints_for_key(self.cluster, key)
            self.assertEqual(hints_for_key(self.cluster, key)[stand_in], [hung], row)
            self.assertNotEqual(stand_in, hung)

    def test_slow_replica_is_not_waited_for_and_catches_up(self) -> None:
        """
        A replica that answers late (within the timeout) does not delay the
        answer by more than a hedge delay, still applies the write, and is
        neither marked down nor hinted for.
        """
        for size, position in itertools.product((3, 5), POSITIONS):
            row = (size, position)
            self.use(size)
            key = "k"
            home = home_replicas(self.cluster, key)
            slow = home[position]
            self.faults.delay[slow] = 1.5
            reply = self.hedged("PUT", kv(key), b"v")
            self.assertEqual(reply.code, 201, row)
            self.assertIsNone(self.stored(slow, key), row)
            self.assertEqual(self.hedged("GET", kv(key)).body, b"v", row)
            self.cluster.clock.advance(1.5)
            settle(self.cluster)
            self.assertEqual(self.versions(key, [slow]), [version_of(reply)], row)
            self.assertFalse(self.cluster.health.is_down(slow), row)
            self.no_hints()

    def test_timeouts_after_sending_make_the_outcome_unknown(self) -> None:
        """
        Two of three home replicas take the write and never acknowledge it:
        once their calls time out the answer is 504 with outcome "unknown"
        and acks=1, never a definite failure. Both when only their writes
        hang and when the nodes hang outright (with ?r=1 to get past the
        write's quorum read).
        """
        for pair, mode in itertools.product(
            itertools.combinations(POSITIONS, 2), ("writes hang", "nodes hang")
        ):
            row = (pair, mode)
            self.use(5)
            key = "k"
            home = home_replicas(self.cluster, key)
            hung = {home[p] for p in pair}
            query = ""
            if mode == "writes hang":
                self.faults.hang_writes.update(hung)
            else:
                self.cluster.network.hung.update(hung)
                query = "?r=1"
            reply = self.after_timeout("PUT", kv(key) + query, b"v")
            self.assertEqual(
                reply.json(),
                {
                    "error": "replica_timeout",
                    "message": (
                        "only 1 of the 2 replicas needed acknowledged in time; "
                        "the write may or may not have been applied"
                    ),
                    "acks": 1,
                    "required": 2,
                    "outcome": "unknown",
                },
                row,
            )
            self.assertEqual(reply.code, 504, row)
            [acked] = set(home) - hung
            self.assertEqual(record_holders(self.cluster, key), [acked], row)

    def test_write_still_in_flight_makes_the_outcome_unknown(self) -> None:
        """
        Two home replicas refuse the write (they went down after the quorum
        read) while the third is slow: W=2 is out of reach at once, but the
        slow one may still apply it, so the answer is "unknown", never
        "not_applied". It does apply it, and keeps hints for the other two.
        (This once answered "not_applied", and the write became readable.)
        """
        for size in (3, 5):
            self.use(size)
            key = "k"
            home = home_replicas(self.cluster, key)
            self.faults.refuse_writes.update(home[:2])
            self.faults.delay[home[2]] = 0.5
            reply = self.now("PUT", kv(key), b"v")  # the quorum read needs only the fast two
            self.assertEqual(
                reply.json(),
                {
                    "error": "insufficient_replicas",
                    "message": (
                        "only 0 of the 2 replicas needed acknowledged; the write "
                        "is on some replicas and may still become visible"
                    ),
                    "acks": 0,
                    "required": 2,
                    "outcome": "unknown",
                },
                size,
            )
            self.assertEqual((reply.code, record_holders(self.cluster, key)), (503, []), size)
            self.cluster.clock.advance(0.5)  # the slow replica's write lands
            settle(self.cluster)
            self.assertEqual(record_holders(self.cluster, key), [home[2]], size)
            self.cluster.clock.advance(0.5)  # hints sent to it (3 nodes) are slow too
            settle(self.cluster)
            hinted = sorted(t for ts in hints_for_key(self.cluster, key).values() for t in ts)
            self.assertEqual(hinted, sorted(home[:2]), size)


# -- busy replicas -------------------------------------------------------------

CAP = 100
"""The per-node cap of record bytes in flight in these tests."""


class OverloadTests(ClusterCase):
    """
    A replica that is busy (its cap of record bytes in flight is full) is
    not a failed one: a write that cannot find W replicas with room is
    refused whole with 503 ``overloaded`` and Retry-After, nothing sent; one
    that can goes ahead; and nobody is marked down.
    """

    def fill(self, *nodes: str) -> None:
        """Give each of ``nodes`` a full cap of bytes in flight that never lands."""
        client = self.cluster.replica_client
        client.node_inflight_bytes = CAP
        for node in nodes:
            self.faults.hang_writes.add(node)
            filler = Record(Version(1, 1, "filler"), b"f" * CAP, "text/plain")  # over the cap
            pending = client.replica_put(node, "filler", filler)
            self.assertFalse(answered(pending))
            pending.addErrback(lambda _: None)  # it times out whenever the clock moves

    def assertFields(self, reply: Reply, status: int, error: str, **fields: object) -> None:
        self.assertEqual(reply.error(), (status, error), reply.body)
        payload = reply.json()
        self.assertEqual({name: payload.get(name) for name in fields}, fields, payload)

    def assertOverloaded(self, reply: Reply, **fields: object) -> None:
        self.assertEqual(reply.error(), (503, "overloaded"), reply.body)
        self.assertEqual(reply.header("retry-after"), "1")
        payload = reply.json()
        self.assertEqual({name: payload.get(name) for name in fields}, fields, payload)

    def test_a_write_without_w_replicas_with_room_is_refused_unsent(self) -> None:
        """
        With two of the three home replicas full, a PUT or DELETE is
        refused at once, before any replica write leaves: outcome
        not_applied, the busy nodes named, no hint left anywhere.
        """
        for position in POSITIONS:
            self.use(3)
            home = home_replicas(self.cluster, "k")
            self.assertEqual(self.now("PUT", kv("k"), b"v0").code, 201)
            before = self.versions("k", home)
            busy = sorted(n for i, n in enumerate(home) if i != position)
            self.fill(*busy)
            sent = len(self.faults.writes("k"))
            for method, body in [("PUT", b"v1"), ("DELETE", None)]:
                reply = self.now(method, kv("k"), body)
                self.assertOverloaded(reply, acks=0, required=2, outcome="not_applied", busy=busy)
            self.assertEqual(len(self.faults.writes("k")), sent, position)
            self.assertEqual(self.versions("k", home), before, position)
            settle(self.cluster)
            self.no_hints()
            self.assertEqual([self.cluster.health.is_down(n) for n in home], [False] * 3)

    def test_one_busy_replica_does_not_stop_a_write(self) -> None:
        """
        With one home replica full, W=2 is reached on the other two; the
        busy one is not sent the write (it gets a hint instead) and is not
        marked down, and the hint reaches it once its bytes drain.
        """
        for position in POSITIONS:
            self.use(3)
            home = home_replicas(self.cluster, "k")
            busy = home[position]
            self.fill(busy)
            reply = self.now("PUT", kv("k"), b"v")
            self.assertEqual(reply.code, 201, position)
            self.assertNotIn(busy, [c.node for c in self.faults.writes("k")])
            settle(self.cluster)
            self.assertFalse(self.cluster.health.is_down(busy))
            self.assertEqual(
                [t for ts in hints_for_key(self.cluster, "k").values() for t in ts], [busy]
            )
            self.faults.hang_writes.clear()
            self.cluster.clock.advance(TIMEOUT + 0.01)  # the filler times out
            deliver_hints(self, self.cluster)
            self.assertEqual(self.versions("k", [busy]), [version_of(reply)], position)

    def slow(self, *nodes: str, cap: int = 1000) -> None:
        """Give each of ``nodes`` the smallest window (as after late answers),
        filled by a write that hangs: room under its cap, none in its window."""
        client = self.cluster.replica_client
        client.node_inflight_bytes = cap
        for node in nodes:
            self.faults.hang_writes.add(node)
            window = client.window(node)
            window.limit = window.floor
            filler = Record(Version(1, 1, "filler"), b"f" * 10, "text/plain")
            client.replica_put(node, "filler", filler).addErrback(lambda _: None)
            self.assertEqual(window.room(write_cost("k", filler)), Room.WINDOW_FULL)

    def test_a_write_waits_for_room_in_slow_replicas_windows(self) -> None:
        """
        With two of the three home replicas' windows full (under their caps),
        a PUT waits, nothing sent; once one of their writes in flight ends, W
        have room and it is sent and acknowledged, and nobody is marked down.
        """
        self.use(3)
        home = home_replicas(self.cluster, "k")
        self.slow(*home[:2])
        self.cluster.clock.advance(TIMEOUT * 0.75)
        d = self.http.start("PUT", kv("k"), b"v", {})
        self.http.pump(d)
        self.assertNoResult(d)
        self.assertEqual(self.faults.writes("k"), [])
        self.faults.hang_writes.clear()
        self.cluster.clock.advance(TIMEOUT * 0.25 + 0.01)  # the fillers time out
        reply = self.http.finish(d)
        self.assertEqual(reply.code, 201, reply.body)
        sent_to = {c.node for c in self.faults.writes("k")}
        self.assertIn(home[2], sent_to)  # sent once W had room: the first filler's end
        self.assertGreaterEqual(len(sent_to), 2)
        settle(self.cluster)
        self.assertEqual([self.cluster.health.is_down(n) for n in home], [False] * 3)

    def test_a_write_that_finds_no_room_in_time_is_overloaded_unsent(self) -> None:
        """
        If W replicas have no room within 3/4 of the timeout, the write is
        refused whole: 503 overloaded, outcome not_applied, the busy nodes
        named, nothing sent and no hint left.
        """
        self.use(3)
        home = home_replicas(self.cluster, "k")
        self.slow(*home[:2])
        d = self.http.start("PUT", kv("k"), b"v", {})
        self.http.pump(d)
        self.cluster.clock.advance(TIMEOUT * ROOM_WAIT_FRACTION - 0.01)
        self.assertNoResult(d)
        self.cluster.clock.advance(0.02)
        reply = self.http.finish(d)
        self.assertOverloaded(
            reply, acks=0, required=2, outcome="not_applied", busy=sorted(home[:2])
        )
        self.assertIn(
            f"had no room within {TIMEOUT * ROOM_WAIT_FRACTION:g} s", reply.json()["message"]
        )
        self.assertEqual(self.faults.writes("k"), [])
        self.faults.hang_writes.clear()
        self.cluster.clock.advance(TIMEOUT)
        settle(self.cluster)
        self.no_hints()

    def test_a_write_past_the_waiting_cap_is_refused_at_once(self) -> None:
        """Writes waiting for room are capped; the next one is overloaded at once."""
        self.use(3)
        self.slow(*home_replicas(self.cluster, "k")[:2])
        with mock.patch.object(coordinator_module, "MAX_WAITING", 1):
            waiting = self.http.start("PUT", kv("k"), b"1", {})
            self.http.pump(waiting)
            self.assertNoResult(waiting)
            self.assertOverloaded(self.now("PUT", kv("k"), b"2"), outcome="not_applied")
        self.cluster.clock.advance(TIMEOUT)
        self.assertOverloaded(self.http.finish(waiting), outcome="not_applied")

    def test_a_write_whose_caller_left_while_waiting_is_never_sent(self) -> None:
        self.use(3)
        home = home_replicas(self.cluster, "k")
        self.slow(*home[:2])
        coordinator = self.cluster.coordinator
        d = Deferred.fromCoroutine(coordinator.write("k", b"v", "", Precondition(), Consistency()))
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.faults.hang_writes.clear()
        self.cluster.clock.advance(TIMEOUT + 0.01)  # room again, at once
        settle(self.cluster)
        self.assertEqual(self.faults.writes("k"), [])
        self.assertEqual(coordinator._waiting, [])

    def test_busy_at_send_time_everywhere_is_overloaded(self) -> None:
        """
        A replica can also be busy for lack of queue room (NodeBusy from its
        pipeline); if every target says so, nothing was sent anywhere, and
        the answer is overloaded too.
        """
        self.use(3)
        self.assertEqual(self.now("PUT", kv("k"), b"v0").code, 201)

        def refuse(node: str, key: str, record: Record, *args: Any) -> None:
            *_, failed, tag = args
            failed(NodeBusy(node, 10_000), tag)

        with mock.patch.object(self.cluster.replica_client, "write_into", refuse):
            reply = self.now("PUT", kv("k"), b"v1")
        self.assertOverloaded(
            reply, acks=0, required=2, outcome="not_applied", busy=home_replicas(self.cluster, "k")
        )

    def test_a_write_that_may_have_been_applied_is_never_overloaded(self) -> None:
        """
        If one replica took the write and never answered while the other two
        were busy, the write may be on that replica: the answer is
        insufficient_replicas with outcome unknown, not overloaded.
        """
        self.use(3)
        home = home_replicas(self.cluster, "k")
        self.assertEqual(self.now("PUT", kv("k"), b"v0").code, 201)
        self.faults.hang_writes.add(home[0])
        client = self.cluster.replica_client
        real_put = client.write_into

        def put(node: str, key: str, record: Record, *args: Any) -> None:
            if node in home[1:]:
                *_, failed, tag = args
                failed(NodeBusy(node, 10_000), tag)
                return
            real_put(node, key, record, *args)

        with mock.patch.object(client, "write_into", put):
            reply = self.now("PUT", kv("k"), b"v1")
        self.assertFields(reply, 503, "insufficient_replicas", acks=0, outcome="unknown")
        self.assertIsNone(reply.header("retry-after"))
        self.cluster.clock.advance(TIMEOUT + 0.01)
        settle(self.cluster)

    def test_a_read_of_only_busy_replicas_is_overloaded(self) -> None:
        """A GET whose replicas all answered NodeBusy is overloaded; one with a
        replica down as well is insufficient_replicas."""
        self.use(3)
        home = home_replicas(self.cluster, "k")
        self.assertEqual(self.now("PUT", kv("k"), b"v0").code, 201)

        def busy_get(node: str, key: str, epoch: Any, ok: Any, failed: Any, tag: Any) -> Any:
            failed(NodeBusy(node, 10_000), tag)
            return mock.Mock()  # what cancels it: nothing to cancel

        with mock.patch.object(self.cluster.replica_client, "get_into", busy_get):
            self.assertOverloaded(self.now("GET", kv("k")), replied=0, required=2, failed=home)
            self.down(home[0])
            reply = self.now("GET", kv("k"))
        self.assertFields(reply, 503, "insufficient_replicas", replied=0, failed=home)


# -- read repair --------------------------------------------------------------


class QuorumOutcomeTests(ClusterCase):
    """Each client read and write is counted by how its quorum ended."""

    def outcomes(self) -> dict[tuple[str, str], float]:
        registry = self.cluster.coordinator.metrics.registry
        counts: dict[tuple[str, str], float] = {}
        for op in ("read", "write"):
            for outcome in ("ok", "insufficient", "timeout", "overloaded"):
                labels = {"op": op, "outcome": outcome}
                value = registry.get_sample_value("shardkv_quorum_outcomes_total", labels)
                if value:
                    counts[(op, outcome)] = value
        return counts

    def test_ok_and_insufficient_are_counted(self) -> None:
        """
        A write and a read that got their quorums are ``ok``; with two of the
        three home replicas down, a write is ``insufficient``. A missing key
        is still an ``ok`` read: the quorum answered.
        """
        self.use(3)
        self.assertEqual(self.now("PUT", kv("k"), b"v").code, 201)
        self.assertEqual(self.now("GET", kv("k")).code, 200)
        self.assertEqual(self.now("GET", kv("absent")).code, 404)
        self.down(*home_replicas(self.cluster, "k")[:2])
        self.assertEqual(self.now("PUT", kv("k"), b"v2").code, 503)
        self.assertEqual(
            self.outcomes(),
            {("write", "ok"): 1, ("read", "ok"): 2, ("write", "insufficient"): 1},
        )


class ReadRepairTests(ClusterCase):
    def make_stale(self, how: str, key: str, node: str) -> None:
        """Leave C{node} behind the other home replicas of C{key}."""
        if how in ("missed write", "missed delete"):
            self.down(node)
            if how == "missed write":
                self.assertEqual(self.now("PUT", kv(key), b"v2").code, 200)
            else:
                self.assertEqual(self.now("DELETE", kv(key)).code, 200)
            for app in self.cluster.nodes.values():  # the hint is lost
                for target, hinted in [
                    (t, app.store.engine.hints(t)) for t in app.store.engine.hint_counts()
                ]:
                    for k, record in hinted:
                        self.successResultOf(app.store.engine.remove_hint(target, k, record))
            self.no_hints()
            self.restart(node)
            return
        old = self.stored(node, key)
        assert old is not None
        self.assertEqual(self.now("PUT", kv(key), b"v2").code, 200)
        # The node lost its newest data (a restore from an old backup, or a wipe).
        fresh = MemoryEngine()
        if how == "older record":
            self.successResultOf(fresh.put(key, old))
        self.cluster.nodes[node].store.engine = fresh

    def test_read_repairs_a_stale_replica(self) -> None:
        """
        A read at R=2 returns the newest record even when a replica it asked
        is stale, and then brings that replica up to date in the background.
        A read that asks every replica (here every read: the read-all share is
        1) finds a stale one wherever it is in the preference list; a hedged
        read, only among the replicas it asked (L{test_hedged_read_repairs_the_replicas_it_asked}).
        """
        hows = ("missed write", "older record", "missing record", "missed delete")
        for how, position in itertools.product(hows, POSITIONS):
            row = (how, position)
            self.use(5)
            self.cluster.coordinator.read_all_fraction = 1.0
            key = "k"
            home = home_replicas(self.cluster, key)
            stale = home[position]
            self.assertEqual(self.now("PUT", kv(key), b"v1").code, 201)
            self.make_stale(how, key, stale)
            fresh = [n for n in home if n != stale]
            newest = self.stored(fresh[0], key)
            assert newest is not None
            self.assertFalse(same_data(newest, self.stored(stale, key)), row)

            repairs = self.cluster.coordinator.repairs
            got = self.now("GET", kv(key))
            if how == "missed delete":
                self.assertEqual(got.code, 404, row)
            else:
                self.assertEqual((got.code, got.body), (200, b"v2"), row)
            settle(self.cluster)
            self.assertEqual(self.cluster.coordinator.repairs, repairs + 1, row)
            self.assertTrue(same_data(newest, self.stored(stale, key)), row)
            # Repaired: even read alone, the replica answers the newest record.
            self.cluster.network.down.update(fresh)
            again = self.now("GET", kv(key) + "?r=1")
            self.assertEqual(again.code, 404 if how == "missed delete" else 200, row)
            self.assertEqual(again.body, b"v2" if how != "missed delete" else again.body, row)

    def test_hedged_read_repairs_the_replicas_it_asked(self) -> None:
        """
        A hedged read asks the first two home replicas. A stale one among them
        is repaired; a stale third replica is not asked, so not repaired, until
        a read asks every replica (the read-all share) or a hedge or a failure
        makes a read ask it.
        """
        for position in POSITIONS:
            self.use(3)
            coordinator = self.cluster.coordinator
            coordinator.read_all_fraction = 0.0
            key = "k"
            home = home_replicas(self.cluster, key)
            stale = home[position]
            self.assertEqual(self.now("PUT", kv(key), b"v1").code, 201)
            self.make_stale("missed write", key, stale)
            newest = self.stored(home[position - 1], key)
            assert newest is not None

            reads = len(self.replica_reads(key))
            self.assertEqual(self.now("GET", kv(key)).body, b"v2", position)
            settle(self.cluster)
            asked = [c.node for c in self.replica_reads(key)[reads:]]
            self.assertEqual(asked, home[:2], position)
            self.assertEqual(coordinator.repairs, 1 if position < 2 else 0, position)
            self.assertEqual(same_data(newest, self.stored(stale, key)), position < 2, position)

            coordinator.read_all_fraction = 1.0
            self.assertEqual(self.now("GET", kv(key)).body, b"v2", position)
            settle(self.cluster)
            self.assertEqual(coordinator.repairs, 1, position)
            self.assertTrue(same_data(newest, self.stored(stale, key)), position)

    def test_up_to_date_replicas_are_not_repaired(self) -> None:
        self.use(5)
        self.now("PUT", kv("k"), b"v")
        sent = len(self.faults.writes())
        for _ in range(3):
            self.assertEqual(self.now("GET", kv("k")).body, b"v")
        settle(self.cluster)
        self.assertEqual((self.cluster.coordinator.repairs, len(self.faults.writes())), (0, sent))


# -- one-round writes ------------------------------------------------------------


class MintsLow:
    """A version clock that ignores what it saw for its first ``low`` mints (every
    try then loses), then mints as a real one does."""

    def __init__(self, inner: VersionClock, low: int) -> None:
        self.inner = inner
        self.low = low
        self.writer = inner.writer

    def mint(self, seen: Version | None) -> Version:
        if self.low > 0:
            self.low -= 1
            return self.inner.mint(None)
        return self.inner.mint(seen)

    def mint_after(self, counter: int | None) -> Version:
        if self.low > 0:
            self.low -= 1
            return self.inner.mint(None)
        return self.inner.mint_after(counter)


class OneRoundWriteTests(ClusterCase):
    """
    A PUT with 2W > N, no precondition, not sloppy and no ``?r=``, on a key
    that is not moving, sends a tentative version straight to the replicas
    (one past the newest this proxy saw): one round instead of a version
    read and then the write. A replica applies it only if it is newer than
    what it holds and says what it held; refusals make the proxy mint past
    the newest refusal and send again, a bounded number of times, and then
    fall back to reading first.
    """

    def writes_of(self, key: str, since: int = 0) -> list[Call]:
        return [c for c in self.faults.writes(key)[since:] if c.hint_for is None]

    def other_proxy(self) -> tuple[HTTP, Coordinator]:
        """A second proxy over the same nodes: its cache of versions is empty."""
        proxy = self.cluster.add_proxy()
        proxy.replica_client.pipeline_depth = 0
        http = HTTP(
            self, proxy.proxy, "http://127.0.0.1:8090", flusher(self.cluster.node_http, proxy.proxy)
        )
        return http, proxy.coordinator

    def test_a_write_takes_one_round(self) -> None:
        """
        A new key: N replica writes, no replica read, 201. The next write of it
        through the same proxy: one round again, at counter + 1, 200.
        """
        for size in (3, 5):
            self.use(size)
            home = home_replicas(self.cluster, "k")
            reply = self.now("PUT", kv("k"), b"v1")
            self.assertEqual(reply.code, 201, size)
            self.assertEqual(self.replica_reads("k"), [], size)
            self.assertEqual(sorted(c.node for c in self.writes_of("k")), sorted(home), size)
            first = version_of(reply)
            self.assertEqual(first.counter, 1)
            reply = self.now("PUT", kv("k"), b"v2")
            self.assertEqual((reply.code, version_of(reply).counter), (200, 2), size)
            self.assertEqual(self.replica_reads("k"), [], size)
            self.assertEqual(len(self.writes_of("k")), 6, size)
            self.assertEqual(self.versions("k", home), [version_of(reply)] * 3, size)
            coordinator = self.cluster.coordinator
            self.assertEqual(
                (coordinator.one_round_retries, coordinator.one_round_fallbacks), (0, 0)
            )

    def test_a_read_teaches_the_proxy_the_version(self) -> None:
        """A key this proxy only read is written in one round, past what it read."""
        self.use(3)
        self.assertEqual(self.now("PUT", kv("k"), b"v1").code, 201)
        http, coordinator = self.other_proxy()
        self.assertEqual(http.get(kv("k")).body, b"v1")
        reply = http.put(kv("k"), b"v2")
        self.assertEqual((reply.code, version_of(reply).counter), (200, 2))
        self.assertEqual(coordinator.one_round_retries, 0)

    def test_refusal_then_a_newer_try(self) -> None:
        """
        A proxy that never saw the key mints counter 1; the replicas refuse it
        (they hold counter 5) and say so; the second try, at counter 6, is
        applied everywhere. Nothing was hinted for the losing try, and the
        key existed: 200.
        """
        self.use(3)
        home = home_replicas(self.cluster, "k")
        for i in range(5):
            self.now("PUT", kv("k"), b"v%d" % i)
        http, coordinator = self.other_proxy()
        before = len(self.writes_of("k"))
        reply = http.put(kv("k"), b"new")
        self.assertEqual((reply.code, version_of(reply).counter), (200, 6))
        self.assertEqual(len(self.writes_of("k", before)), 6)  # two tries of three
        self.assertEqual(self.replica_reads("k"), [])
        self.assertEqual((coordinator.one_round_retries, coordinator.one_round_fallbacks), (1, 0))
        settle(self.cluster)
        self.assertEqual(self.versions("k", home), [version_of(reply)] * 3)
        self.no_hints()

    def test_a_newer_tombstone_refuses_too(self) -> None:
        """A key deleted at counter 3: a try at counter 1 is refused by the
        tombstone, the next one (4) wins, and the key did not exist: 201."""
        self.use(3)
        self.now("PUT", kv("k"), b"v1")
        self.now("PUT", kv("k"), b"v2")
        self.assertEqual(self.now("DELETE", kv("k")).code, 200)
        http, coordinator = self.other_proxy()
        reply = http.put(kv("k"), b"again")
        self.assertEqual((reply.code, version_of(reply).counter), (201, 4))
        self.assertEqual(coordinator.one_round_retries, 1)

    def test_fallback_after_the_bound(self) -> None:
        """
        When every try loses (here the clock ignores what it saw), after
        ONE_ROUND_ATTEMPTS tries the write reads the version first and writes
        past it, as before: it is acknowledged with a larger version, and the
        losing tries are overwritten everywhere.
        """
        self.use(3)
        home = home_replicas(self.cluster, "k")
        for i in range(4):
            self.now("PUT", kv("k"), b"v%d" % i)
        coordinator = self.cluster.coordinator
        old = self.versions("k", home)[0]
        assert old is not None
        coordinator.versions = MintsLow(coordinator.versions, ONE_ROUND_ATTEMPTS)  # type: ignore[assignment]
        coordinator.read_all_fraction = 0.0  # its fallback's read asks two replicas
        reads = len(self.replica_reads("k"))
        reply = self.now("PUT", kv("k"), b"won")
        self.assertEqual(reply.code, 200)
        self.assertGreater(version_of(reply), old)
        self.assertEqual(coordinator.one_round_fallbacks, 1)
        self.assertEqual(coordinator.one_round_retries, ONE_ROUND_ATTEMPTS - 1)
        self.assertEqual(len(self.replica_reads("k")) - reads, 2)
        settle(self.cluster)
        self.assertEqual(self.versions("k", home), [version_of(reply)] * 3)
        self.no_hints()

    def test_writes_that_read_first(self) -> None:
        """
        These still read the version first: 2W <= N (?w=1, or N=2 with W=1),
        a write that names its R, a sloppy one, a conditional one (If-Match,
        If-None-Match), and every delete.
        """
        rows: list[tuple[str, str, dict[str, str], int]] = [
            ("PUT", "?w=1", {}, 3),
            ("PUT", "?r=2", {}, 3),
            ("PUT", "?r=1&w=2", {}, 3),
            ("PUT", "?sloppy=true", {}, 3),
            ("PUT", "", {"If-Match": "*"}, 3),
            ("PUT", "", {"If-None-Match": "*"}, 3),
            ("DELETE", "", {}, 3),
            ("PUT", "?w=1", {}, 2),
        ]
        for method, query, headers, n in rows:
            row = (method, query, headers, n)
            self.use(3, replicas=n, w=min(2, n), r=min(2, n))
            self.cluster.coordinator.read_all_fraction = 0.0
            self.assertEqual(self.now("PUT", kv("k"), b"v").code, 201, row)
            self.assertEqual(self.replica_reads("k"), [], row)
            reply = self.now(method, kv("k") + query, b"x" if method == "PUT" else None, **headers)
            if "If-None-Match" in headers:
                self.assertEqual(reply.code, 412, row)
            else:
                self.assertEqual(reply.code, 200, row)
            self.assertGreater(len(self.replica_reads("k")), 0, row)

    def test_a_conditional_write_sees_the_key(self) -> None:
        """If-None-Match: * reads first, so a PUT that must only create fails
        on an existing key even through a proxy that never saw it."""
        self.use(3)
        self.assertEqual(self.now("PUT", kv("k"), b"v").code, 201)
        http, _ = self.other_proxy()
        reply = http.put(kv("k"), b"x", headers={"If-None-Match": "*"})
        self.assertEqual(reply.code, 412)

    def test_created_by_the_intersection(self) -> None:
        """
        ``created`` is decided by what the acknowledging replicas held: a key
        on only two of its three replicas (the third missed it and its hint was
        lost) is "not created" whichever two replicas acknowledge, since any
        two include one that holds it.
        """
        for down in POSITIONS:
            self.use(3)
            home = home_replicas(self.cluster, "k")
            missed = home[(down + 1) % 3]
            self.down(missed)
            self.assertEqual(self.now("PUT", kv("k"), b"v1").code, 201)
            for app in self.cluster.nodes.values():  # the hint is lost
                for target in app.store.engine.hint_counts():
                    for k, record in app.store.engine.hints(target):
                        self.successResultOf(app.store.engine.remove_hint(target, k, record))
            self.restart(missed)
            self.down(home[down])
            http, _ = self.other_proxy()
            reply = http.put(kv("k"), b"v2")
            self.assertEqual(reply.code, 200, (down, reply.body))

    def test_a_write_after_a_delete_is_created(self) -> None:
        self.use(3)
        self.assertEqual(self.now("PUT", kv("k"), b"v1").code, 201)
        self.assertEqual(self.now("PUT", kv("k"), b"v2").code, 200)
        self.assertEqual(self.now("DELETE", kv("k")).code, 200)
        self.assertEqual(self.now("PUT", kv("k"), b"v3").code, 201)
        self.assertEqual(self.now("PUT", kv("k"), b"v4").code, 200)

    def test_a_failure_after_a_try_was_applied_is_unknown(self) -> None:
        """
        A first try applied on one stale replica and refused by the other two;
        every later try and the fallback's read find nothing reachable: the
        answer may not say "not_applied", since the first try is on a replica.
        """
        self.use(3)
        home = home_replicas(self.cluster, "k")
        self.down(home[0])
        for i in range(3):
            self.assertEqual(self.now("PUT", kv("k"), b"v%d" % i).code, (201, 200, 200)[i])
        for app in self.cluster.nodes.values():
            for target in app.store.engine.hint_counts():
                for k, record in app.store.engine.hints(target):
                    self.successResultOf(app.store.engine.remove_hint(target, k, record))
        self.restart(home[0])
        http, coordinator = self.other_proxy()
        client = coordinator.replica_client
        real = client.write_into
        tries: list[str] = []

        def write(node: str, key: str, record: Record, *args: Any) -> None:
            tries.append(node)
            if len(tries) > 3:
                *_, failed, tag = args
                failed(NodeUnreachable(node, "gone", sent=False), tag)
                return
            real(node, key, record, *args)

        with mock.patch.object(client, "write_into", write):
            reply = http.put(kv("k"), b"lost")
        self.assertEqual(reply.error()[1], "insufficient_replicas", reply.body)
        self.assertEqual(reply.json()["outcome"], "unknown", reply.body)
        self.assertIn("an earlier try of this write is on some replicas", reply.json()["message"])
        self.assertEqual(self.stored(home[0], "k").value, b"lost")  # type: ignore[union-attr]

    def test_a_node_that_does_not_say_what_it_held(self) -> None:
        """
        A node older than the ``held``/``live`` fields refuses without saying
        what it holds: the write falls back to reading first at once.
        """
        self.use(3)
        for i in range(3):
            self.now("PUT", kv("k"), b"v%d" % i)
        http, coordinator = self.other_proxy()
        client = coordinator.replica_client
        real = client.write_into

        def old_node(node: str, key: str, record: Record, *args: Any) -> None:
            hint_for, epoch, ok, failed, tag = args

            def strip(result: Any, tag: Any) -> None:
                ok(dataclasses.replace(result, held=None, live=None), tag)

            real(node, key, record, hint_for, epoch, strip, failed, tag)

        with mock.patch.object(client, "write_into", old_node):
            reply = http.put(kv("k"), b"new")
        self.assertEqual((reply.code, version_of(reply).counter), (200, 4))
        self.assertEqual((coordinator.one_round_retries, coordinator.one_round_fallbacks), (0, 1))

    def test_concurrent_writers_converge_on_one_winner(self) -> None:
        """
        Three proxies that never saw the key write it at once, again and again:
        every write is acknowledged, every home replica ends with the same
        record, it is the acknowledged write with the largest version, and a
        read through any proxy returns it.
        """
        self.use(3)
        home = home_replicas(self.cluster, "k")
        proxies = [self.other_proxy() for _ in range(3)]
        acked: dict[Version, bytes] = {}
        for turn in range(6):
            # Proxy `turn % 3` first writes alone a few times, so the others'
            # guesses fall behind and their tries are refused.
            lead, _ = proxies[turn % 3]
            for j in range(turn):
                reply = lead.put(kv("k"), b"lead-%d-%d" % (turn, j))
                acked[version_of(reply)] = b"lead-%d-%d" % (turn, j)
            pending = [
                (http.start("PUT", kv("k"), b"p%d-%d" % (i, turn)), b"p%d-%d" % (i, turn))
                for i, (http, _) in enumerate(proxies)
            ]
            for d, value in pending:
                reply = proxies[0][0].finish(d)
                self.assertIn(reply.code, (200, 201), reply.body)
                acked[version_of(reply)] = value
            settle(self.cluster)
            records = [self.stored(n, "k") for n in home]
            self.assertEqual(len({r.version for r in records if r}), 1, (turn, records))
            winner = max(acked)
            self.assertEqual([r.value for r in records if r], [acked[winner]] * 3, turn)
            for http, _ in proxies:
                self.assertEqual(http.get(kv("k")).body, acked[winner], turn)
        self.assertGreater(sum(c.one_round_retries for _, c in proxies), 3)


# -- hedged reads ---------------------------------------------------------------


class HedgedReadTests(ClusterCase):
    """
    A read asks the first R healthy home replicas that count towards R, and
    the others only when one of those fails (at once) or has not answered
    within the hedge delay (on the cluster's clock). A share of reads asks
    all N, and so does every read while a move runs
    (L{tests.proxy.test_coordinator_joint}).
    """

    def use_hedged(self, size: int = 3, **levels: int) -> list[str]:
        """A fresh cluster whose reads all hedge; the home replicas of ``k`` (written)."""
        self.use(size, **levels)
        self.cluster.coordinator.read_all_fraction = 0.0
        self.assertEqual(self.now("PUT", kv("k"), b"v").code, 201)
        return home_replicas(self.cluster, "k")

    def asked(self, since: int = 0) -> list[str]:
        return [c.node for c in self.replica_reads("k")[since:]]

    def test_a_read_asks_only_r_replicas(self) -> None:
        for size, r in [(3, 2), (5, 2), (5, 1), (5, 3)]:
            home = self.use_hedged(size)
            before = len(self.replica_reads("k"))
            got = self.now("GET", kv("k") + f"?r={r}")
            self.assertEqual((got.code, got.body), (200, b"v"), (size, r))
            self.assertEqual(self.asked(before), home[:r], (size, r))
            self.assertEqual(self.cluster.coordinator.hedges, 0)

    def test_the_hedge_fires_after_the_delay(self) -> None:
        """
        With the first replica hung, the read waits exactly one hedge delay,
        then asks the third and answers from it and the second. The hung one
        is not marked down (a timeout is not a failure).
        """
        for position in (0, 1):
            home = self.use_hedged()
            coordinator = self.cluster.coordinator
            self.cluster.network.hung.add(home[position])
            before = len(self.replica_reads("k"))
            d = self.http.start("GET", kv("k"))
            self.http.pump(d)
            self.assertNoResult(d)
            delay = coordinator.hedge_delay()
            self.cluster.clock.advance(delay * 0.99)
            self.http.pump(d)
            self.assertNoResult(d)
            self.assertEqual(self.asked(before), [n for n in home[:2] if n != home[position]])
            self.cluster.clock.advance(delay * 0.02)
            got = self.http.finish(d)
            self.assertEqual((got.code, got.body), (200, b"v"), position)
            self.assertEqual(self.asked(before)[-1], home[2], position)
            self.assertEqual(coordinator.hedges, 1, position)
            self.cluster.clock.advance(TIMEOUT)
            settle(self.cluster)
            self.assertFalse(self.cluster.health.is_down(home[position]), position)

    def test_a_replica_that_let_the_hedge_fire_is_asked_last(self) -> None:
        """
        After a hedge, the replica that was slow is asked after the others for
        SLOW_FOR seconds, so that a paused node does not cost every read a
        hedge delay until health marks it down; then it is asked first again.
        """
        from shardkv.proxy.coordinator import SLOW_FOR

        home = self.use_hedged()
        self.cluster.network.hung.add(home[0])
        self.assertEqual(self.hedged("GET", kv("k")).body, b"v")
        self.cluster.network.hung.clear()
        before = len(self.replica_reads("k"))
        self.assertEqual(self.now("GET", kv("k")).body, b"v")
        self.assertEqual(self.asked(before), home[1:])
        self.cluster.clock.advance(SLOW_FOR)
        settle(self.cluster)
        before = len(self.replica_reads("k"))
        self.assertEqual(self.now("GET", kv("k")).body, b"v")
        self.assertEqual(self.asked(before), home[:2])
        self.assertEqual(self.cluster.coordinator.hedges, 1)

    def test_a_late_answer_clears_the_slow_mark(self) -> None:
        home = self.use_hedged()
        self.faults.delay[home[0]] = 0.5
        self.assertEqual(self.hedged("GET", kv("k")).body, b"v")
        self.cluster.clock.advance(0.5)  # its late answer lands: it is fast again
        settle(self.cluster)
        self.faults.delay.clear()
        before = len(self.replica_reads("k"))
        self.assertEqual(self.now("GET", kv("k")).body, b"v")
        self.assertEqual(self.asked(before), home[:2])

    def test_a_failed_replica_makes_the_read_ask_the_next_at_once(self) -> None:
        """
        A refused connection (the node died, health does not know yet) is a
        failure: the next replica is asked at once, without waiting for a
        hedge, and the node is marked down. Once it is known to be down, reads
        skip it and ask the other two.
        """
        for position in (0, 1):
            home = self.use_hedged()
            self.cluster.network.down.add(home[position])
            before = len(self.replica_reads("k"))
            got = self.now("GET", kv("k"))
            self.assertEqual((got.code, got.body), (200, b"v"), position)
            # (The refused call never reaches the network log.)
            others = [n for n in home if n != home[position]]
            self.assertEqual(self.asked(before), others, position)
            self.assertTrue(self.cluster.health.is_down(home[position]), position)
            self.cluster.network.down.clear()  # it works again; health does not know yet
            before = len(self.faults.calls)
            self.assertEqual(self.now("GET", kv("k")).body, b"v", position)
            asked = [c.node for c in self.faults.calls[before:]]
            self.assertEqual(asked, others, position)
            self.assertEqual(self.cluster.coordinator.hedges, 0)

    def test_two_failures_of_three_fail_the_read(self) -> None:
        home = self.use_hedged()
        self.cluster.network.down.update(home[:2])
        got = self.now("GET", kv("k"))
        self.assertEqual(got.error(), (503, "insufficient_replicas"))
        self.assertEqual((got.json()["replied"], got.json()["failed"]), (1, sorted(home[:2])))

    def test_a_hung_spare_is_not_waited_for(self) -> None:
        """With the third replica hung, a hedged read never asks it."""
        home = self.use_hedged()
        self.cluster.network.hung.add(home[2])
        before = len(self.replica_reads("k"))
        self.assertEqual(self.now("GET", kv("k")).body, b"v")
        self.assertEqual(self.asked(before), home[:2])

    def test_the_read_all_share(self) -> None:
        """
        A read asks all N with probability ``read_all_fraction`` (0.1 by
        default, drawn from the coordinator's random), R otherwise.
        """
        from shardkv.proxy.coordinator import READ_ALL_FRACTION

        self.use(3)
        coordinator = self.cluster.coordinator
        self.assertEqual(coordinator.read_all_fraction, READ_ALL_FRACTION)
        self.assertEqual(self.now("PUT", kv("k"), b"v").code, 201)
        coordinator._random = random.Random(7)
        before = len(self.replica_reads("k"))
        reads = 400
        for _ in range(reads):
            self.assertEqual(self.now("GET", kv("k")).body, b"v")
        asked = len(self.replica_reads("k")) - before
        alls = coordinator.reads_of_all
        self.assertEqual(asked, 2 * reads + alls)
        self.assertTrue(0.05 * reads < alls < 0.15 * reads, alls)

    def test_hedge_delay_follows_replica_latency(self) -> None:
        """
        The delay is the recent p99 of replica reads, at least its floor, at
        most its cap and a quarter of the replica timeout.
        """
        self.use(3)
        coordinator = self.cluster.coordinator
        window = coordinator.latency
        self.assertEqual(coordinator.hedge_delay(), window.floor)
        for _ in range(window.every):
            window.add(0.02)
        self.assertAlmostEqual(coordinator.hedge_delay(), 0.02)
        for _ in range(window.every):
            window.add(5.0)
        self.assertAlmostEqual(coordinator.hedge_delay(), window.cap)
        self.cluster.replica_client.timeout = 0.2
        self.assertAlmostEqual(coordinator.hedge_delay(), 0.05)

    def test_observed_latency_sets_the_delay(self) -> None:
        """Replica answers that take 30 ms of clock time make the hedge wait about that."""
        self.use_hedged()
        for node in NODES_3:
            self.faults.delay[node] = 0.03
        coordinator = self.cluster.coordinator
        for _ in range(coordinator.latency.every // 2):
            d = self.http.start("GET", kv("k"))
            self.http.pump(d)
            self.cluster.clock.advance(0.03)
            self.assertEqual(self.http.finish(d).body, b"v")
        self.assertAlmostEqual(coordinator.hedge_delay(), 0.03, places=3)

    def test_a_stale_replica_with_hints_waiting_is_not_asked_first_when_r_w_le_n(self) -> None:
        """
        With R + W <= N (R=1 here), a replica that hints wait for does not
        count towards R: a hedged read asks a replica that counts instead,
        and never answers from the stale one alone.
        """
        for position in POSITIONS:
            home = self.use_hedged()
            behind = home[position]
            self.down(behind)
            self.assertEqual(self.now("PUT", kv("k"), b"v1").code, 200)
            self.restart(behind)
            self.assertTrue(self.cluster.health.has_hints_waiting(behind))
            before = len(self.replica_reads("k"))
            got = self.now("GET", kv("k") + "?r=1")
            self.assertEqual((got.code, got.body), (200, b"v1"), position)
            self.assertEqual(self.asked(before), [n for n in home if n != behind][:1], position)


# -- what clients can rely on -------------------------------------------------


@dataclass
class Client:
    """One client's requests, recorded in a shared history with logical times."""

    case: ClusterCase
    name: str
    history: History
    ticks: Iterator[int]

    def put(self, key: str, value: str, query: str = "") -> Reply:
        start = next(self.ticks)
        reply = self.case.call("PUT", kv(key) + query, value.encode())
        self.history.add(
            Op(self.name, "put", key, value, quorum_status("put", reply), start, next(self.ticks))
        )
        return reply

    def get(self, key: str, query: str = "") -> Reply:
        start = next(self.ticks)
        reply = self.case.call("GET", kv(key) + query)
        value = reply.body.decode() if reply.code == 200 else None
        self.history.add(
            Op(self.name, "get", key, value, quorum_status("get", reply), start, next(self.ticks))
        )
        return reply


class ConsistencyTests(ClusterCase):
    def test_read_your_writes_with_one_replica_failed(self) -> None:
        """
        With R+W>N and any one home replica down or hung, before, while and
        after it fails: no read returns a value never written, every read
        after an acknowledged write returns it (or a later one), and the key
        ends with the last acknowledged write.
        """
        levels = [
            (3, "?r=2&w=2", "?r=2"),
            (5, "?r=2&w=2", "?r=2"),
            (5, "?r=1&w=3", "?r=1"),
            (5, "?r=3&w=1", "?r=3"),
        ]
        for (size, wq, rq), kind, position in itertools.product(
            levels, ("down", "hung"), POSITIONS
        ):
            row = (size, kind, position, wq)
            self.use(size)
            history = History()
            client = Client(self, "c", history, itertools.count())
            key = "k"
            failed = home_replicas(self.cluster, key)[position]

            self.assertEqual(client.get("never-written" + rq).code, 404, row)
            self.assertEqual(client.put(key, "v1", wq).code, 201, row)
            getattr(self.cluster.network, kind).add(failed)
            for i in range(2, 5):
                reply = client.put(key, f"v{i}", wq)
                got = client.get(key, rq)
                if reply.code == 200 and got.code == 200:
                    self.assertEqual(got.body, f"v{i}".encode(), row)
            self.restart(failed)
            for i in range(5, 7):
                client.get(key, rq)
                client.put(key, f"v{i}", wq)
            client.get(key, rq)
            client.get("never-written", rq)

            self.assertEqual(check_reads(history), [], row)
            self.restart()
            deliver_hints(self, self.cluster)
            check_health(self, self.cluster)
            final = client.get(key)
            self.assertEqual(final.code, 200, row)
            self.assertEqual(check_final(history, {key: final.body.decode()}), [], row)
            acked = [op for op in history.ops if op.f == "put" and op.status == "ok"]
            self.assertGreaterEqual(len(acked), 3 if wq != "?r=1&w=3" else 1, row)


class ClockSkewTests(ClusterCase):
    def test_last_acknowledged_write_wins_despite_skewed_proxies(self) -> None:
        """
        Two proxies over the same nodes, one clock 90 s fast and the other
        90 s slow, take turns writing the same keys one after another: every
        key ends with its last acknowledged write, read through either proxy
        and on every home replica, although the winner's wall clock is often
        earlier than the write it replaced (so wall-clock last-write-wins
        would lose it).
        """
        cluster = self.use(5)
        clock = cluster.clock

        def skewed(ms: int) -> Any:
            return lambda: int(clock.seconds() * 1000) + ms

        cluster.coordinator.versions = VersionClock("proxy-a", skewed(90_000))
        health_b = HealthMonitor(cluster.ring.nodes, cluster.replica_client.health, clock)
        hints_b = HintKeeper(cluster.ring, cluster.replica_client, health_b)
        coordinator_b = Coordinator(
            cluster.ring,
            cluster.replica_client,
            health_b,
            VersionClock("proxy-b", skewed(-90_000)),
            hints_b,
        )
        stub_b = StubTreq(ProxyApp(coordinator_b, DEFAULT_MAX_VALUE_BYTES).app.resource())
        proxy_b = HTTP(self, stub_b, "http://127.0.0.1:8090", flusher(cluster.node_http, stub_b))
        proxies = [self.http, proxy_b]

        last: dict[str, bytes] = {}
        backwards = 0
        for key, turn in itertools.product([f"key-{i}" for i in range(12)], range(6)):
            proxy = proxies[(turn + len(key)) % 2]
            value = f"{key}/{turn}".encode()
            before = self.stored(home_replicas(cluster, key)[0], key)
            clock.advance(0.01)
            reply = proxy.put(kv(key), value)
            self.assertIn(reply.code, (200, 201), (key, turn))
            last[key] = value
            version = version_of(reply)
            if before is not None and version.clock_ms < before.version.clock_ms:
                backwards += 1
        self.assertGreater(backwards, 20)  # the skew was exercised

        for key, value in last.items():
            for proxy in proxies:
                self.assertEqual(proxy.get(kv(key)).body, value, key)
            home = home_replicas(cluster, key)
            self.assertEqual(
                [r.value if r else None for r in (self.stored(n, key) for n in home)],
                [value] * 3,
                key,
            )


class HintsWaitingTests(ClusterCase):
    def test_replica_with_hints_waiting_never_answers_alone(self) -> None:
        """
        A home replica that missed writes (hints for it wait on other nodes,
        as its health reports say) is read but, when R + W <= N, does not
        count toward R: with R=1 it cannot answer alone with its stale
        record. (With R + W > N it counts: any R replicas include one that
        has the write.) Once the hints are delivered and health sees that, it
        counts again.
        """
        for position in POSITIONS:
            self.use(5)
            key = "k"
            home = home_replicas(self.cluster, key)
            behind = home[position]
            others = [n for n in home if n != behind]
            self.assertEqual(self.now("PUT", kv(key), b"v0").code, 201)
            self.down(behind)
            self.assertEqual(self.now("PUT", kv(key), b"v1").code, 200)
            self.restart(behind)
            self.assertEqual(self.cluster.health.hints_waiting(behind), 1)

            # R=2: it counts, but the other replica that answers outvotes it.
            for node in others:
                self.cluster.network.down.add(node)
                got = self.now("GET", kv(key))
                self.assertEqual((got.code, got.body), (200, b"v1"), (position, node))
                self.cluster.network.down.clear()
                check_health(self, self.cluster)
            self.assertEqual(self.cluster.health.hints_waiting(behind), 1)

            # The others are slow: the stale replica answers first, and is not enough.
            for node in others:
                self.faults.delay[node] = 0.5
            d = self.http.start("GET", kv(key) + "?r=1")
            self.http.pump(d)
            self.assertNoResult(d)
            self.cluster.clock.advance(0.5)
            got = self.http.finish(d)
            self.assertEqual((got.code, got.body), (200, b"v1"), position)
            self.faults.delay.clear()

            # The others are down: the stale replica alone is no quorum.
            self.cluster.network.down.update(others)
            got = self.now("GET", kv(key) + "?r=1")
            self.assertEqual(got.error(), (503, "insufficient_replicas"), position)
            self.assertEqual(got.json()["replied"], 0)
            self.cluster.network.down.clear()

            self.assertEqual(deliver_hints(self, self.cluster), 1)
            check_health(self, self.cluster)
            self.assertEqual(self.cluster.health.hints_waiting(behind), 0)
            self.cluster.network.down.update(others)
            got = self.now("GET", kv(key) + "?r=1")
            self.assertEqual((got.code, got.body), (200, b"v1"), position)
