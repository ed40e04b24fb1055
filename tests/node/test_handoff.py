"""
Tests of hinted handoff (L{HintHandoff}): a stand-in node hands the records
it kept for a down node back to it.

The nodes are a L{MemoryCluster}'s: real node apps on memory engines behind
C{StubTreq}, reached through its L{FaultyHTTP} (refused or hung nodes) and a
fake clock. A hint may be dropped only once its target acknowledged it, so
that no failure in between loses the write the hint carries.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.records import Record
from shardkv.core.versions import Version
from shardkv.errors import StorageFull
from shardkv.node.handoff import HintHandoff
from shardkv.storage.memory import MemoryEngine
from shardkv.testing.memory import MemoryCluster
from tests.helpers import NODES_3, answered, install_faults, memory_cluster, wait

TIMEOUT = 2.0
LATE = 0.5
"""How long a slow target's requests take to reach it, well within the timeout."""
STAND_IN, HOME, OTHER = NODES_3


def minted(counter: int, value: bytes = b"v") -> Record:
    return Record(Version(counter, counter, "proxy-test"), value, "text/plain")


class HintHandoffTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fresh()

    def fresh(self) -> None:
        """A new cluster whose first node is the stand-in keeping hints."""
        self.cluster: MemoryCluster = memory_cluster(NODES_3, TIMEOUT)
        self.faults = install_faults(self.cluster)
        self.engine: MemoryEngine = self.engine_of(STAND_IN)

    def engine_of(self, node: str) -> MemoryEngine:
        engine: Any = self.cluster.nodes[node].store.engine
        assert isinstance(engine, MemoryEngine)
        return engine

    def hint(self, target: str, key: str, record: Record) -> None:
        self.assertTrue(self.successResultOf(self.engine.put_hint(target, key, record)))

    def start(self, handoff: HintHandoff) -> Deferred[None]:
        """Start one round of C{handoff}."""
        return Deferred.fromCoroutine(handoff.deliver_all())

    def slow(self, *nodes: str) -> None:
        """Requests to C{nodes} arrive L{LATE} seconds of the cluster's clock late."""
        self.faults.delay.update(dict.fromkeys(nodes, LATE))

    def waiting(self) -> dict[str, list[tuple[str, Version]]]:
        """Target -> the (key, version) of each hint the stand-in keeps for it."""
        return {
            target: [(key, record.version) for key, record in self.engine.hints(target, 1000)]
            for target in sorted(self.engine.hint_counts())
        }

    def test_hints_are_removed_only_after_the_target_acknowledged(self) -> None:
        self.hint(HOME, "a", minted(1))
        self.hint(HOME, "b", minted(2))
        self.hint(OTHER, "c", minted(3))
        before = self.waiting()
        self.slow(HOME, OTHER)
        handoff = HintHandoff(self.engine, self.cluster.replica_client)
        d = self.start(handoff)
        self.cluster.node_http.flush()
        self.assertFalse(answered(d))
        self.assertEqual(self.waiting(), before)  # in flight, not yet acknowledged
        self.assertEqual(handoff.delivered, 0)

        self.cluster.clock.advance(LATE)  # the first target (in order) acknowledges
        self.cluster.node_http.flush()
        self.assertEqual(self.waiting(), {OTHER: before[OTHER]})
        self.assertEqual(handoff.delivered, 2)
        self.cluster.clock.advance(LATE)
        wait(self, self.cluster, d)
        self.assertEqual(self.waiting(), {})
        self.assertEqual(handoff.delivered, 3)
        for node, key, counter in [(HOME, "a", 1), (HOME, "b", 2), (OTHER, "c", 3)]:
            record = self.engine_of(node).get(key)
            assert record is not None, (node, key)
            self.assertEqual(record.version, minted(counter).version)
        self.assertIsNone(self.engine.get("a"))  # handing over never makes it the stand-in's

    def test_a_target_that_does_not_acknowledge_keeps_its_hints(self) -> None:
        """
        Refused, hung until the timeout, or failing to store it: the target
        did not acknowledge, so its hints wait for the next round. Hints for
        other targets are delivered all the same.
        """
        for fault in ["down", "hung", "disk full"]:
            self.fresh()
            self.hint(HOME, "a", minted(1))
            self.hint(OTHER, "c", minted(3))
            home: Any = self.engine_of(HOME)
            patch = mock.patch.object(home, "put", home.put)
            if fault == "down":
                self.cluster.network.down.add(HOME)
            elif fault == "hung":
                self.cluster.network.hung.add(HOME)
            else:
                patch = mock.patch.object(home, "put", lambda k, r: fail(StorageFull("full")))
            handoff = HintHandoff(self.engine, self.cluster.replica_client)
            with patch:
                d = self.start(handoff)
                self.cluster.node_http.flush()
                if fault == "hung":
                    self.assertFalse(answered(d), fault)
                    self.cluster.clock.advance(TIMEOUT + 0.01)
                wait(self, self.cluster, d)
            self.assertEqual(self.waiting(), {HOME: [("a", minted(1).version)]}, fault)
            self.assertEqual(handoff.delivered, 1, fault)
            self.assertIsNone(self.engine_of(HOME).get("a"), fault)
            self.assertIsNotNone(self.engine_of(OTHER).get("c"), fault)

            self.cluster.network.down.clear()
            self.cluster.network.hung.clear()
            again = HintHandoff(self.engine, self.cluster.replica_client)
            wait(self, self.cluster, self.start(again))
            self.assertEqual((self.waiting(), again.delivered), ({}, 1), fault)

    def test_a_newer_hint_that_arrived_meanwhile_is_kept(self) -> None:
        """
        Delivering an older record must not drop a newer hint for the same
        key that arrived while the older one was in flight.
        """
        self.hint(HOME, "a", minted(1))
        self.slow(HOME)
        handoff = HintHandoff(self.engine, self.cluster.replica_client)
        d = self.start(handoff)
        self.hint(HOME, "a", minted(2))
        self.cluster.clock.advance(LATE)
        wait(self, self.cluster, d)
        self.assertEqual(handoff.delivered, 1)
        delivered = self.engine_of(HOME).get("a")
        assert delivered is not None
        self.assertEqual(delivered.version, minted(1).version)
        self.assertEqual(self.waiting(), {HOME: [("a", minted(2).version)]})
        self.faults.delay.clear()
        wait(self, self.cluster, self.start(HintHandoff(self.engine, self.cluster.replica_client)))
        newest = self.engine_of(HOME).get("a")
        assert newest is not None
        self.assertEqual((newest.version, self.waiting()), (minted(2).version, {}))

    def test_one_round_sends_at_most_one_batch_per_target(self) -> None:
        """A long outage's hints go back a batch per round, not all at once."""
        for i in range(5):
            self.hint(HOME, f"k{i}", minted(i + 1))
        handoff = HintHandoff(self.engine, self.cluster.replica_client, batch=2, window=1)
        wait(self, self.cluster, self.start(handoff))
        self.assertEqual(handoff.delivered, 2)
        self.assertEqual([key for key, _ in self.waiting()[HOME]], ["k2", "k3", "k4"])

    def test_a_target_that_fails_is_sent_no_more_this_round(self) -> None:
        """
        Once a window of hints to a target fails, the round stops sending to
        it: a long outage's hints would otherwise each wait for a timeout.
        """
        for i in range(3):
            self.hint(HOME, f"k{i}", minted(i + 1))
        self.faults.hang_writes.add(HOME)
        handoff = HintHandoff(self.engine, self.cluster.replica_client, window=1)
        d = self.start(handoff)
        self.cluster.clock.advance(TIMEOUT + 0.01)
        wait(self, self.cluster, d)
        self.assertEqual(
            [c.path for c in self.faults.writes() if c.node == HOME], ["/replica/kv/k0"]
        )
        self.assertEqual((handoff.delivered, len(self.waiting()[HOME])), (0, 3))
