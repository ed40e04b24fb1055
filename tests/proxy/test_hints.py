"""
In-memory tests of what the proxy does for replicas that missed a write
(L{shardkv.proxy.hints}), and of hinted handoff as the proxy drives it.

A home replica that is down, or that did not acknowledge a write, gets the
record as a hint on another node, which hands it back when the replica
returns. A record that no node could take waits in the proxy's bounded
undelivered queue until L{HintKeeper.retry} finds it a place. A write that
failed everywhere leaves no hint at all.
"""

from __future__ import annotations

import itertools
from typing import Any
from unittest import mock

from twisted.internet.defer import Deferred, fail
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.quorum import Reply as ReplicaReply
from shardkv.core.quorum import Target, WriteQuorum
from shardkv.core.records import Record
from shardkv.core.versions import Version
from shardkv.errors import StorageFull
from shardkv.proxy.hints import HintKeeper
from shardkv.testing.memory import MemoryCluster
from tests.helpers import (
    NODES_3,
    NODES_5,
    check_health,
    deliver_hints,
    hints_for_key,
    home_replicas,
    install_faults,
    memory_cluster,
    settle,
    wait,
)
from tests.proxy.cluster_case import (
    POSITIONS,
    TIMEOUT,
    ClusterCase,
    OwnerCase,
    hint_holders,
    kv,
    new_cluster,
    proxy_http,
    version_of,
)


class HintedHandoffTests(ClusterCase):
    """A home replica that missed writes gets them back as hints, through the proxy."""

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


class HintCountTests(ClusterCase):
    """What the proxy counts of the hints it arranges."""

    def test_a_missed_write_is_queued_and_delivered_to_a_holder(self) -> None:
        """
        One home replica refuses the write (after answering its version
        read): the copy it missed is sought a holder (queued) and the
        stand-in takes it (delivered). (A node known to be down is written
        to a stand-in directly, in the write, and counts neither.)
        """
        self.use(5)
        home = self.cluster.ring.preference_list("k", 3)
        self.faults.refuse_writes.add(home[0])
        self.assertEqual(self.now("PUT", kv("k"), b"v").code, 201)
        registry = self.cluster.coordinator.metrics.registry
        self.assertIs(registry, self.cluster.hints.metrics.registry)
        counts = [
            registry.get_sample_value(name)
            for name in ("shardkv_hints_queued_total", "shardkv_hints_delivered_total")
        ]
        self.assertEqual(counts, [1, 1])


class NotAppliedTests(OwnerCase):
    """A write answered "not_applied" leaves no hint behind."""

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
            engine: Any = cluster.nodes[self.node].store.engine
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
            self.assertEqual(cluster.hints.undelivered, {}, fault)
            check_health(self, cluster)
            deliver_hints(self, cluster)
            check_health(self, cluster)
            self.assertEqual(http.get(self.path).code, 404, fault)


def record(counter: int, value: bytes = b"v") -> Record:
    return Record(Version(counter, counter, "proxy-test"), value, "text/plain")


class UndeliveredQueueTests(ClusterCase):
    """
    A record that no node could keep as a hint waits in the proxy's queue,
    and the queue's retry finds it a place once nodes answer again.
    """

    def strand(self) -> tuple[str, Version]:
        """
        A write that one home replica never acknowledged, while the other two
        went down before it timed out: nobody can keep the hint.
        """
        self.use(3)
        home = home_replicas(self.cluster, "k")
        late = home[2]
        self.faults.hang_writes.add(late)
        reply = self.now("PUT", kv("k"), b"v")
        self.assertEqual(reply.code, 201)
        self.cluster.network.down.update(home[:2])
        self.cluster.clock.advance(TIMEOUT + 0.01)
        settle(self.cluster)
        return late, version_of(reply)

    def test_record_nobody_could_take_waits_in_the_queue(self) -> None:
        """
        Once the late replica's call timed out, the hint holders it was
        offered to refused, so the record waits on the proxy, and the
        holders that refused it are marked down (the late replica is not: a
        timeout is not a failure).
        """
        late, version = self.strand()
        queued = self.cluster.hints.undelivered
        self.assertEqual(list(queued), [(late, "k")])
        self.assertEqual(queued[(late, "k")].version, version)
        self.no_hints()
        self.assertIsNone(self.stored(late, "k"))
        self.assertEqual(
            [self.cluster.health.is_down(n) for n in home_replicas(self.cluster, "k")],
            [True, True, False],
        )

    def test_retry_while_every_node_is_down_keeps_the_record(self) -> None:
        """A retry that finds no live node sends nothing and keeps the record queued."""
        late, version = self.strand()
        self.cluster.network.down.add(late)
        check_health(self, self.cluster)
        sent = len(self.faults.calls)
        wait(self, self.cluster, Deferred.fromCoroutine(self.cluster.hints.retry()))
        self.assertEqual(len(self.faults.calls), sent)
        queued = self.cluster.hints.undelivered
        self.assertEqual({slot: r.version for slot, r in queued.items()}, {(late, "k"): version})

    def test_retry_hands_the_queued_record_home(self) -> None:
        """
        Once the nodes answer again, a retry empties the queue by offering
        the record to the replica that missed the write, which ends up with
        it.
        """
        late, version = self.strand()
        self.faults.hang_writes.clear()
        self.restart(*NODES_3)
        sent = len(self.faults.writes("k"))
        wait(self, self.cluster, Deferred.fromCoroutine(self.cluster.hints.retry()))
        self.assertEqual(self.cluster.hints.undelivered, {})
        # The replica itself is offered the record first, as its own copy:
        # a hint addressed to itself would leave it looking stale.
        self.assertEqual([c.node for c in self.faults.writes("k")[sent:]], [late])
        self.assertEqual(self.versions("k", [late]), [version])
        self.no_hints()
        deliver_hints(self, self.cluster)
        self.assertEqual(self.versions("k", [late]), [version])


class QueueTests(SynchronousTestCase):
    """
    The queue itself: one record per (replica, key), the newest; and a cap,
    past which a new slot is dropped (read repair will fix that replica)
    rather than growing the proxy's memory without bound.
    """

    def setUp(self) -> None:
        self.cluster: MemoryCluster = memory_cluster(NODES_3)
        for node in NODES_3:
            self.cluster.health.mark(node, up=False, error="test")

    def keeper(self, max_undelivered: int) -> HintKeeper:
        c = self.cluster
        return HintKeeper(c.ring, c.replica_client, c.health, max_undelivered)

    def miss(self, keeper: HintKeeper, key: str, rec: Record) -> str:
        """Tell C{keeper} the key's last home replica did not acknowledge C{rec}; it."""
        preference = self.cluster.ring.preference_list(key, 3)
        quorum = WriteQuorum([Target(n) for n in preference], w=2)
        for node in preference[:2]:
            quorum.add(Target(node), ReplicaReply.OK)
        quorum.add(Target(preference[2]), ReplicaReply.UNKNOWN)
        keeper.missed(key, rec, quorum, preference, 3)
        return preference[2]

    def queued(self, keeper: HintKeeper) -> dict[tuple[str, str], int]:
        return {slot: r.version.counter for slot, r in keeper.undelivered.items()}

    def test_the_newest_record_per_replica_and_key_is_kept(self) -> None:
        keeper = self.keeper(10)
        home = self.miss(keeper, "k", record(2))
        self.assertEqual(self.queued(keeper), {(home, "k"): 2})
        self.miss(keeper, "k", record(1))
        self.assertEqual(self.queued(keeper), {(home, "k"): 2})
        self.miss(keeper, "k", record(3))
        self.assertEqual(self.queued(keeper), {(home, "k"): 3})

    def test_a_full_queue_drops_new_slots_and_says_so(self) -> None:
        keeper = self.keeper(2)
        homes = {key: self.miss(keeper, key, record(1)) for key in ["a", "b"]}
        with capturedLogs() as events:
            self.miss(keeper, "c", record(1))
        self.assertEqual(self.queued(keeper), {(homes["a"], "a"): 1, (homes["b"], "b"): 1})
        warnings = [e for e in events if "undelivered queue full" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1, events)
        # A slot already queued still takes a newer record.
        self.miss(keeper, "a", record(5))
        self.assertEqual(self.queued(keeper), {(homes["a"], "a"): 5, (homes["b"], "b"): 1})
