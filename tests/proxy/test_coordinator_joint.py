"""
Tests of the coordinator while the cluster map moves a range: reads from the
map's read ring, writes to the previous and current replica sets with W
acknowledgements required in each (the pending-ranges phases), and the
single-ring path unchanged otherwise.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.clustermap import ClusterMap, Phase
from shardkv.core.membership import next_phase, stage
from shardkv.testing.memory import MemoryCluster
from tests.helpers import NODES_3, cluster_http, install_faults

NEW = "127.0.0.1:8084"
NODES_4 = [*NODES_3, NEW]


def kv(key: str) -> str:
    return "/kv/" + key


class JointPhaseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cluster = MemoryCluster(NODES_4)
        self.faults = install_faults(self.cluster)
        self.http = cluster_http(self, self.cluster)
        # Epoch 1 on the first three nodes, then a copying move that adds NEW.
        seed = MemoryCluster(NODES_3)
        base = seed.bootstrap()
        self.copying = stage(base, add=[(NEW, 1.0)])
        assert self.copying.move is not None and self.copying.move.phase is Phase.COPYING
        assert self.cluster.view.install(self.copying)
        self.key, self.old, self.new = self.moving_key(self.copying)
        self.cluster.coordinator.read_all_fraction = 0.0  # outside a move, every read hedges

    def moving_key(self, m: ClusterMap) -> tuple[str, list[str], list[str]]:
        previous, current = m.write_rings()
        for i in range(1000):
            key = f"k{i}"
            old, new = previous.preference_list(key, 3), current.preference_list(key, 3)
            if set(old) != set(new):
                return key, old, new
        raise AssertionError("no key moves")

    def test_a_write_goes_to_both_sets(self) -> None:
        self.assertEqual(self.http.put(kv(self.key), b"v").code, 201)
        written = {c.node for c in self.faults.writes(self.key)}
        self.assertEqual(written, set(self.old) | set(self.new))
        self.assertTrue(all(c.hint_for is None for c in self.faults.writes(self.key)))

    def test_acked_only_with_w_in_each_set(self) -> None:
        """
        With one old-only replica and the new node refusing writes, each set
        still has two acks: OK. With a shared replica and the new node
        refusing, the new set has one: the write fails although the old set
        alone would have W.
        """
        (old_only,) = set(self.old) - set(self.new)
        (new_only,) = set(self.new) - set(self.old)
        self.faults.refuse_writes.update({old_only, new_only})
        self.assertEqual(self.http.put(kv(self.key), b"v1").code, 201)
        self.faults.refuse_writes.clear()
        shared = sorted(set(self.old) & set(self.new))[0]
        self.faults.refuse_writes.update({shared, new_only})
        reply = self.http.put(kv(self.key), b"v2")
        self.assertEqual(reply.code, 503, reply.body)
        self.assertEqual(reply.json()["required"], 2)

    def test_reads_use_the_previous_ring_while_copying_then_the_current(self) -> None:
        """
        Reads ask all N of the read ring while a move copies and hands over
        (not hedged: the nodes are streaming, and every replica of a settling
        range gets compared), and hedge again from cleanup on.
        """
        self.assertEqual(self.http.put(kv(self.key), b"v").code, 201)
        self.faults.calls.clear()
        self.assertEqual(self.http.get(kv(self.key)).code, 200)
        read = [c.node for c in self.faults.calls if c.method == "GET"]
        self.assertEqual(sorted(read), sorted(self.old))
        handover = next_phase(self.copying)
        assert self.cluster.view.install(handover)
        self.faults.calls.clear()
        self.assertEqual(self.http.get(kv(self.key)).code, 200)
        read = [c.node for c in self.faults.calls if c.method == "GET"]
        self.assertEqual(sorted(read), sorted(self.new))
        cleanup = next_phase(handover)
        assert cleanup.move is not None and cleanup.move.phase is Phase.CLEANUP
        assert self.cluster.view.install(cleanup)
        self.faults.calls.clear()
        self.assertEqual(self.http.get(kv(self.key)).code, 200)
        read = [c.node for c in self.faults.calls if c.method == "GET"]
        self.assertEqual(read, self.cluster.ring.preference_list(self.key, 2))

    def test_a_key_whose_set_does_not_change_takes_the_single_ring_path(self) -> None:
        previous, current = self.copying.write_rings()
        key = next(
            f"s{i}"
            for i in range(1000)
            if set(previous.preference_list(f"s{i}", 3)) == set(current.preference_list(f"s{i}", 3))
        )
        self.assertEqual(self.http.put(kv(key), b"v").code, 201)
        self.assertEqual(len(self.faults.writes(key)), 3)
