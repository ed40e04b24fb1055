"""
In-memory tests of replication through the proxy (test plan A5).

Every key lives on the first N=3 nodes of its preference list (its home
replicas); the proxy answers a read after R replies and a write after W
durable acknowledgements from home replicas (R=W=2 unless a request says
otherwise). A down home replica's copy goes to a stand-in as a hint, and
hinted handoff brings it home later; reads repair stale replicas.

The clusters are L{MemoryCluster}s of 3 and 5 nodes: real node apps on
memory engines behind C{StubTreq}, a fake clock, and faults from
C{cluster.network} (refused or hung nodes) and L{NetworkFaults} (one phase
of a write failing, slow replicas, and a log of what was sent). Most tests
are tables: each row is a fresh cluster, and a failure names its row.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.records import Record
from shardkv.core.versions import Version, VersionClock
from shardkv.history import History, Op, check_final, check_reads
from shardkv.http.dataroutes import DEFAULT_MAX_VALUE_BYTES
from shardkv.proxy.app import ProxyApp
from shardkv.proxy.coordinator import Coordinator
from shardkv.proxy.health import HealthMonitor
from shardkv.storage.memory import MemoryEngine
from shardkv.testing import PROXY_WRITER, MemoryCluster
from tests.helpers import (
    HTTP,
    NODES_3,
    NODES_5,
    NetworkFaults,
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
    settle,
)

TIMEOUT = 2.0
NODES = {3: NODES_3, 5: NODES_5}
POSITIONS = (0, 1, 2)  # a home replica's place in the key's preference list


def kv(key: str) -> str:
    return "/kv/" + quote(key, safe="")


class ClusterCase(SynchronousTestCase):
    """A fresh cluster per table row, with helpers to drive it."""

    cluster: MemoryCluster
    http: HTTP
    faults: NetworkFaults

    def use(self, size: int, **levels: int) -> MemoryCluster:
        self.cluster = memory_cluster(NODES[size], TIMEOUT, **levels)
        self.http = cluster_http(self, self.cluster)
        self.faults = install_faults(self.cluster)
        return self.cluster

    def down(self, *nodes: str, known: bool = True) -> None:
        """Crash C{nodes} (connections refused); with C{known}, let health checks see it."""
        self.cluster.network.down.update(nodes)
        if known:
            check_health(self, self.cluster)

    def restart(self, *nodes: str) -> None:
        """Bring C{nodes} back (refused or hung) and run a health check round."""
        self.cluster.network.down.difference_update(nodes)
        self.cluster.network.hung.difference_update(nodes)
        check_health(self, self.cluster)

    def now(self, method: str, path: str, body: bytes | None = None, **headers: str) -> Reply:
        """A request that must be answered without the clock moving."""
        d = self.http.start(method, path, body, headers)
        self.http.pump(d)
        self.assertTrue(answered(d), f"{method} {path} waited for a slow replica")
        return self.successResultOf(d)

    def after_timeout(self, method: str, path: str, body: bytes | None = None) -> Reply:
        """A request that is answered exactly when replica calls time out."""
        return self.http.at_timeout(self.cluster.clock, TIMEOUT, method, path, body)

    def call(self, method: str, path: str, body: bytes | None = None, **headers: str) -> Reply:
        """A request, moving the clock past the timeout if it has to wait."""
        d = self.http.start(method, path, body, headers)
        self.http.pump(d)
        if not answered(d):
            self.cluster.clock.advance(TIMEOUT + 0.01)
        reply = self.http.finish(d)
        settle(self.cluster)
        return reply

    def stored(self, node: str, key: str) -> Record | None:
        return self.cluster.nodes[node].engine.get(key)

    def versions(self, key: str, nodes: list[str]) -> list[Version | None]:
        records = [self.stored(n, key) for n in nodes]
        return [r.version if r else None for r in records]

    def hint_record(self, stand_in: str, home: str, key: str) -> Record | None:
        return dict(self.cluster.nodes[stand_in].engine.hints(home, 10_000)).get(key)

    def no_hints(self) -> None:
        counts = {n: app.engine.hint_counts() for n, app in self.cluster.nodes.items()}
        self.assertEqual({n: c for n, c in counts.items() if c}, {})


def version_of(reply: Reply) -> Version:
    return Version.parse(reply.json()["version"])


# -- where writes go ----------------------------------------------------------


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
        for the timeout (then 504); one needing fewer answers at once.
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
            d = self.http.start(method, kv(key) + query, body, headers)
            self.http.pump(d)
            self.assertEqual(answered(d), not waits, row)
            if waits:
                self.cluster.clock.advance(TIMEOUT + 0.01)
                reply = self.http.finish(d)
                self.assertEqual(reply.error(), (504, "replica_timeout"), row)
            else:
                self.assertIn(self.successResultOf(d).code, (200, 201), row)

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


# -- hinted handoff -----------------------------------------------------------


class HintedHandoffTests(ClusterCase):
    def test_missed_write_is_handed_back(self) -> None:
        """
        With one home replica down, a write still succeeds (W=2): the first
        live node after the home replicas keeps a hint for the down one,
        which lacks the record. Once it is back, the stand-in's handoff gives
        it the record and the hint store empties. Whether the proxy knew the
        node was down or found out from the write's own requests, and for
        deletes (tombstones) too.
        """
        for position, known, op in itertools.product(POSITIONS, (True, False), ("PUT", "DELETE")):
            row = (position, known, op)
            self.use(5)
            key = "k"
            preference = self.cluster.ring.preference_list(key, 5)
            home, stand_in = preference[:3], preference[3]
            self.assertEqual(self.now("PUT", kv(key), b"v0").code, 201)
            before = self.stored(home[position], key)
            missed = home[position]
            self.down(missed, known=known)

            reply = self.now(op, kv(key), b"v1" if op == "PUT" else None)
            self.assertEqual(reply.code, 200, row)
            version = version_of(reply)
            live = [n for n in home if n != missed]
            self.assertEqual(self.versions(key, live), [version, version], row)
            self.assertEqual(self.stored(missed, key), before, row)
            self.assertEqual(hints_for_key(self.cluster, key), {stand_in: [missed]}, row)
            hint = self.hint_record(stand_in, missed, key)
            assert hint is not None
            self.assertEqual((hint.version, hint.tombstone), (version, op == "DELETE"), row)
            self.assertIsNone(self.stored(stand_in, key), row)  # a hint is not a replica

            self.restart(missed)
            self.assertEqual(self.cluster.health.hints_waiting(missed), 1, row)
            self.assertEqual(deliver_hints(self, self.cluster, [stand_in]), 1, row)
            record = self.stored(missed, key)
            assert record is not None
            self.assertEqual(record.version, version, row)
            self.no_hints()
            check_health(self, self.cluster)
            self.assertEqual(self.cluster.health.hints_waiting(missed), 0, row)

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

    def test_down_replica_gets_every_missed_write_back(self) -> None:
        """
        riak_test's pattern: write many keys while a node is down, check it
        lacks them, bring it back and hand the hints over, then take its
        fellow replicas down: every key is still readable, from it alone.
        """
        self.use(5)
        node = NODES_5[2]
        keys = [
            k for k in (f"key-{i}" for i in range(80)) if node in home_replicas(self.cluster, k)
        ]
        self.assertGreater(len(keys), 20)
        self.down(node)
        for key in keys:
            self.assertEqual(self.now("PUT", kv(key), key.encode()).code, 201, key)
        self.assertEqual([k for k in keys if self.stored(node, k) is not None], [])

        self.restart(node)
        self.assertEqual(self.cluster.health.hints_waiting(node), len(keys))
        self.assertEqual(deliver_hints(self, self.cluster), len(keys))
        check_health(self, self.cluster)
        self.assertEqual(self.cluster.health.hints_waiting(node), 0)
        for key in keys:
            others = [n for n in home_replicas(self.cluster, key) if n != node]
            self.cluster.network.down.update(others)
            got = self.now("GET", kv(key) + "?r=1")
            self.assertEqual((got.code, got.body), (200, key.encode()), key)
            self.cluster.network.down.clear()
            check_health(self, self.cluster)


# -- slow and hung replicas ---------------------------------------------------


class SlowReplicaTests(ClusterCase):
    def test_hung_replica_is_not_waited_for(self) -> None:
        """
        A hung home replica delays neither writes nor reads: they answer once
        two replicas did, without the clock moving. When its calls time out,
        it is marked down and the write it missed waits for it as a hint.
        """
        for size, position, op in itertools.product((3, 5), POSITIONS, ("PUT", "GET", "DELETE")):
            row = (size, position, op)
            self.use(size)
            key = "k"
            home = home_replicas(self.cluster, key)
            self.assertEqual(self.now("PUT", kv(key), b"v0").code, 201)
            hung = home[position]
            self.cluster.network.hung.add(hung)

            reply = self.now(op, kv(key), b"v1" if op == "PUT" else None)
            self.assertEqual(reply.code, 200, row)
            self.assertEqual(self.cluster.clock.seconds(), 0.0)
            if op == "GET":
                self.assertEqual(reply.body, b"v0", row)
                continue
            version = version_of(reply)
            live = [n for n in home if n != hung]
            self.assertEqual(self.versions(key, live), [version] * 2, row)

            self.cluster.clock.advance(TIMEOUT + 0.01)
            settle(self.cluster)
            self.assertTrue(self.cluster.health.is_down(hung), row)
            [stand_in] = hints_for_key(self.cluster, key)
            self.assertEqual(hints_for_key(self.cluster, key)[stand_in], [hung], row)
            self.assertNotEqual(stand_in, hung)

    def test_slow_replica_is_not_waited_for_and_catches_up(self) -> None:
        """
        A replica that answers late (within the timeout) does not delay the
        answer, still applies the write, and is neither marked down nor
        hinted for.
        """
        for size, position in itertools.product((3, 5), POSITIONS):
            row = (size, position)
            self.use(size)
            key = "k"
            home = home_replicas(self.cluster, key)
            slow = home[position]
            self.faults.delay[slow] = 1.5
            reply = self.now("PUT", kv(key), b"v")
            self.assertEqual(reply.code, 201, row)
            self.assertIsNone(self.stored(slow, key), row)
            self.assertEqual(self.now("GET", kv(key)).body, b"v", row)
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


# -- read repair --------------------------------------------------------------


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
                for target, hinted in [(t, app.engine.hints(t)) for t in app.engine.hint_counts()]:
                    for k, record in hinted:
                        self.successResultOf(app.engine.remove_hint(target, k, record))
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
        self.cluster.nodes[node].engine = fresh

    def test_read_repairs_a_stale_replica(self) -> None:
        """
        A read at R=2 returns the newest record even when a replica it asked
        is stale, and then brings that replica up to date in the background.
        """
        hows = ("missed write", "older record", "missing record", "missed delete")
        for how, position in itertools.product(hows, POSITIONS):
            row = (how, position)
            self.use(5)
            key = "k"
            home = home_replicas(self.cluster, key)
            stale = home[position]
            self.assertEqual(self.now("PUT", kv(key), b"v1").code, 201)
            self.make_stale(how, key, stale)
            fresh = [n for n in home if n != stale]
            newest = self.stored(fresh[0], key)
            assert newest is not None
            self.assertFalse(newest.same_data(self.stored(stale, key)), row)

            repairs = self.cluster.coordinator.repairs
            got = self.now("GET", kv(key))
            if how == "missed delete":
                self.assertEqual(got.code, 404, row)
            else:
                self.assertEqual((got.code, got.body), (200, b"v2"), row)
            settle(self.cluster)
            self.assertEqual(self.cluster.coordinator.repairs, repairs + 1, row)
            self.assertTrue(newest.same_data(self.stored(stale, key)), row)
            # Repaired: even read alone, the replica answers the newest record.
            self.cluster.network.down.update(fresh)
            again = self.now("GET", kv(key) + "?r=1")
            self.assertEqual(again.code, 404 if how == "missed delete" else 200, row)
            self.assertEqual(again.body, b"v2" if how != "missed delete" else again.body, row)

    def test_up_to_date_replicas_are_not_repaired(self) -> None:
        self.use(5)
        self.now("PUT", kv("k"), b"v")
        sent = len(self.faults.writes())
        for _ in range(3):
            self.assertEqual(self.now("GET", kv("k")).body, b"v")
        settle(self.cluster)
        self.assertEqual((self.cluster.coordinator.repairs, len(self.faults.writes())), (0, sent))


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

        cluster.coordinator.clock = VersionClock("proxy-a", skewed(90_000))
        health_b = HealthMonitor(cluster.ring.nodes, cluster.client.health, clock)
        coordinator_b = Coordinator(
            cluster.ring, cluster.client, health_b, VersionClock("proxy-b", skewed(-90_000))
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


class ViewTests(ClusterCase):
    def test_explain_and_cluster_show_replicas_and_hints(self) -> None:
        """
        /explain lists each home replica with its health and the version it
        holds; /cluster shows the quorum levels and the hints waiting for
        each node.
        """
        self.use(5)
        key = "name"
        preference = self.cluster.ring.preference_list(key, 5)
        home = preference[:3]
        v1 = str(version_of(self.now("PUT", kv(key), b"v1")))
        behind = home[1]
        self.down(behind)
        v2 = str(version_of(self.now("PUT", kv(key), b"v2")))

        explained = self.now("GET", "/explain?key=" + key).json()
        placement = self.cluster.ring.explain(key, 5)
        self.assertEqual(
            {k: explained[k] for k in ("key", "owner", "token", "position", "preference_list")},
            {
                "key": key,
                "owner": home[0],
                "token": placement.token,
                "position": placement.position,
                "preference_list": preference,
            },
        )
        replicas = explained["replicas"]
        self.assertEqual([r["node"] for r in replicas], home)
        self.assertEqual(
            [(r["status"], r["version"], r.get("tombstone")) for r in replicas],
            [("up", v2, False), ("down", None, None), ("up", v2, False)],
        )
        self.assertIn(f"{behind} is down", replicas[1]["error"])

        cluster = self.now("GET", "/cluster").json()
        self.assertEqual((cluster["replicas"], cluster["r"], cluster["w"]), (3, 2, 2))
        waiting = {n["node"]: n["hints_waiting"] for n in cluster["nodes"]}
        self.assertEqual(waiting, dict.fromkeys(NODES_5, 0))  # a down node's hints: not counted yet

        self.restart(behind)
        explained = self.now("GET", "/explain?key=" + key).json()
        self.assertEqual(
            [(r["status"], r["version"]) for r in explained["replicas"]],
            [("up", v2), ("up", v1), ("up", v2)],
        )
        waiting = {
            n["node"]: n["hints_waiting"] for n in self.now("GET", "/cluster").json()["nodes"]
        }
        self.assertEqual(waiting, {n: 1 if n == behind else 0 for n in NODES_5})

        deliver_hints(self, self.cluster)
        check_health(self, self.cluster)
        waiting = {
            n["node"]: n["hints_waiting"] for n in self.now("GET", "/cluster").json()["nodes"]
        }
        self.assertEqual(waiting, dict.fromkeys(NODES_5, 0))
        explained = self.now("GET", "/explain?key=" + key).json()
        self.assertEqual([r["version"] for r in explained["replicas"]], [v2] * 3)
