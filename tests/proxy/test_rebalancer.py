"""
L{Rebalancer}: the orchestration loop, driven on a L{MemoryReactorClock} through
every phase with the nodes' move reports faked (L{tests.proxy.admin_fakes}).
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, Logger
from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.clustermap import ClusterMap, MemberState, Phase
from shardkv.core.membership import abort, next_phase, stage
from shardkv.errors import MapConflict, MapUnavailable
from shardkv.proxy import rebalancer
from tests.proxy.admin_fakes import NEW, NODES, FakeNodes, MapStore, Proxy, first_map

STEP = 0.5


def copying(keys_total: int = 300) -> ClusterMap:
    import dataclasses

    m = stage(first_map(), add=[(NEW, 1.0)])
    assert m.move is not None
    return dataclasses.replace(
        m, move=dataclasses.replace(m.move, keys_total=keys_total, bytes_total=keys_total * 100)
    )


class RebalancerCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.store = MapStore(first_map())
        self.nodes = FakeNodes()
        self.proxy = Proxy(self.store, self.nodes, self.clock)
        self.rebalancer = self.proxy.rebalancer
        self.logged: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.logged.append)
        self.patch(rebalancer, "log", Logger(observer=observer))
        service = self.rebalancer.service()
        service.startService()
        self.addCleanup(service.stopService)

    def install(self, m: ClusterMap, *proxies: Proxy) -> None:
        """``m`` is committed, and the proxies' polls have seen it."""
        self.store.value = m
        for proxy in (self.proxy, *proxies):
            proxy.view.install(m)

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            self.clock.advance(STEP)

    def report_all(self, m: ClusterMap, **kwargs: Any) -> None:
        for node in (*NODES, NEW):
            self.nodes.report(node, m.epoch, **kwargs)

    def lines(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.logged]


class IdleTests(RebalancerCase):
    def test_idle_asks_nobody(self) -> None:
        self.tick(10)
        self.assertEqual(self.proxy.sync.refreshes, 0)
        self.assertEqual(self.nodes.calls, [])
        status = self.rebalancer.status()
        self.assertEqual(status["state"], "idle")
        self.assertEqual(status["epoch"], 1)
        self.assertEqual((status["keys_moved"], status["keys_total"], status["eta_s"]), (0, 0, 0))
        self.assertEqual(self.lines(), [])


class PhaseTests(RebalancerCase):
    def test_a_join_runs_through_every_phase(self) -> None:
        m = copying()
        self.install(m)
        self.report_all(m, stream="streaming", keys=0)
        self.tick()
        self.assertEqual(self.proxy.view.current.epoch, 2)
        self.assertEqual(self.rebalancer.status()["state"], "copying")

        # 150 keys per step from the three sources: 300 keys/s.
        for i in range(1, 3):
            for node in NODES:
                self.nodes.report(node, m.epoch, stream="streaming", keys=50 * i, bytes_=5000 * i)
            self.tick()
        status = self.rebalancer.status()
        self.assertEqual(status["state"], "copying")
        self.assertEqual(status["keys_moved"], 300)
        self.assertEqual(status["bytes_moved"], 30000)
        self.assertEqual(status["keys_per_s"], 300.0)
        self.assertEqual(status["eta_s"], 0)
        self.assertEqual([t["node"] for t in status["transfers"]], NODES)
        self.assertEqual(status["transfers"][0]["state"], "streaming")
        self.assertEqual(self.store.value.epoch, 2, "no source is done yet")

        for node in NODES:
            self.nodes.report(node, m.epoch, stream="done", keys=100)
        self.tick()
        handover = self.store.value
        assert handover.move is not None
        self.assertEqual((handover.epoch, handover.move.phase), (3, Phase.HANDOVER))
        self.assertEqual(self.rebalancer.status()["state"], "handover")
        self.assertEqual(self.rebalancer.status()["keys_moved"], 300)

        self.tick()
        cleanup = self.store.value
        assert cleanup.move is not None
        self.assertEqual((cleanup.epoch, cleanup.move.phase), (4, Phase.CLEANUP))

        self.report_all(cleanup, cleanup="running")
        self.tick(3)
        self.assertEqual(self.store.value.epoch, 4)
        self.assertEqual(self.rebalancer.status()["state"], "cleanup")
        self.report_all(cleanup, cleanup="done")
        self.tick()
        idle = self.store.value
        self.assertEqual(idle.epoch, 5)
        self.assertIsNone(idle.move)
        self.assertEqual(idle.member(NEW).state, MemberState.ACTIVE)
        self.assertEqual(self.rebalancer.status()["state"], "idle")
        calls = len(self.nodes.calls)
        self.tick(4)
        self.assertEqual(len(self.nodes.calls), calls, "idle again: nobody is asked")

        lines = self.lines()
        for phase in ("copying", "handover", "cleanup"):
            self.assertTrue(any(f" {phase}" in line for line in lines), (phase, lines))
        self.assertIn("rebalance: idle at epoch 5", lines)

    def test_cleanup_waits_for_the_leaving_members_too(self) -> None:
        m = next_phase(next_phase(stage(first_map(), add=[(NEW, 1.0)], remove=[NODES[0]])))
        self.install(m)
        for node in (NODES[1], NODES[2], NEW):
            self.nodes.report(node, m.epoch, cleanup="done")
        self.nodes.report(NODES[0], m.epoch, cleanup="running")
        self.tick(3)
        self.assertEqual(self.store.value.epoch, m.epoch)
        self.nodes.report(NODES[0], m.epoch, cleanup="done")
        self.tick()
        self.assertEqual(self.store.value.member(NODES[0]).state, MemberState.REMOVED)

    def test_a_report_for_another_epoch_is_not_done(self) -> None:
        m = copying()
        self.install(m)
        self.report_all(m, stream="done")
        self.nodes.report(NODES[1], m.epoch - 1, stream="done")
        self.tick(3)
        self.assertEqual(self.store.value.epoch, m.epoch)

    def test_no_copy_advances_after_the_barrier(self) -> None:
        """An abort from handover has nothing to copy: the old owners kept everything."""
        m = abort(next_phase(copying()))
        assert m.move is not None and not m.move.copy
        self.install(m)
        self.tick()
        self.assertEqual(self.store.value.epoch, m.epoch + 1)
        self.assertNotIn("move", [what for what, _ in self.nodes.calls])

    def test_rate_and_eta(self) -> None:
        m = copying(keys_total=3000)
        self.install(m)
        for i in range(4):
            for node in NODES:
                self.nodes.report(node, m.epoch, stream="streaming", keys=100 * i)
            self.tick()
        status = self.rebalancer.status()
        self.assertEqual(status["keys_moved"], 900)
        self.assertEqual(status["keys_per_s"], 600.0)
        self.assertEqual(status["eta_s"], 3.5)
        self.assertEqual(status["keys_total"], 3000)
        self.assertEqual(status["bytes_total"], 300000)

    def test_rate_unknown_at_first(self) -> None:
        m = copying()
        self.install(m)
        self.report_all(m, stream="streaming")
        self.tick()
        status = self.rebalancer.status()
        self.assertIsNone(status["keys_per_s"])
        self.assertIsNone(status["eta_s"])

    def test_progress_is_logged_about_every_5_s(self) -> None:
        m = copying()
        self.install(m)
        self.report_all(m, stream="streaming", keys=10)
        self.tick(40)  # 20 s
        progress = [line for line in self.lines() if "copying" in line]
        self.assertIn(len(progress), (4, 5))
        self.assertIn("30/300 keys", progress[-1])


class WaitingTests(RebalancerCase):
    def test_the_barrier_waits_for_every_member(self) -> None:
        m = copying()
        self.install(m)
        self.report_all(m, stream="done")
        self.proxy.sync.behind = {NEW: 1, NODES[0]: None}
        self.tick(4)
        self.assertEqual(self.store.value.epoch, m.epoch)
        status = self.rebalancer.status()
        self.assertEqual(status["state"], "waiting")
        self.assertEqual(status["waiting_for"], [NODES[0], NEW])
        self.assertEqual(self.proxy.proposer.calls, [])
        self.assertTrue(any("waiting for" in line for line in self.lines()))
        self.proxy.sync.behind = {}
        self.tick()
        self.assertEqual(self.store.value.epoch, m.epoch + 1)

    def test_an_unreachable_source_blocks_the_move_until_it_returns(self) -> None:
        m = copying()
        self.install(m)
        self.report_all(m, stream="done")
        self.nodes.down.add(NODES[2])
        self.tick(4)
        status = self.rebalancer.status()
        self.assertEqual(status["state"], "waiting")
        self.assertEqual(status["waiting_for"], [NODES[2]])
        transfer = {t["node"]: t for t in status["transfers"]}[NODES[2]]
        self.assertEqual(transfer["state"], "unreachable")
        self.assertIn("connection refused", transfer["last_error"])
        self.assertEqual(self.store.value.epoch, m.epoch)
        self.nodes.down.clear()
        self.tick()
        self.assertEqual(self.store.value.epoch, m.epoch + 1)

    def test_no_majority_is_waiting_not_failing(self) -> None:
        m = copying()
        self.install(m)
        self.report_all(m, stream="done")
        self.proxy.proposer.fail = MapUnavailable("no majority of acceptors answered")
        self.tick(3)
        status = self.rebalancer.status()
        self.assertIn("no majority", status["error"])
        self.proxy.sync.fail = MapUnavailable("nobody answered")
        self.tick(2)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.proxy.proposer.fail = None
        self.proxy.sync.fail = None
        self.tick()
        self.assertEqual(self.store.value.epoch, m.epoch + 1)


class RaceTests(RebalancerCase):
    def test_a_lost_compare_and_set_is_not_an_error(self) -> None:
        m = copying()
        self.install(m)
        self.report_all(m, stream="done")
        self.proxy.proposer.fail = MapConflict("another proxy won")
        self.tick(2)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(self.rebalancer.status()["state"], "copying")

    def test_two_proxies_advance_each_phase_once(self) -> None:
        other = Proxy(self.store, self.nodes, self.clock)
        service = other.rebalancer.service()
        service.startService()
        self.addCleanup(service.stopService)
        m = copying()
        self.install(m, other)
        self.report_all(m, stream="done")
        epochs = []
        for _ in range(3):
            self.tick()
            epochs.append(self.store.value.epoch)
            current = self.store.value
            self.report_all(current, stream="done", cleanup="done")
        self.tick(2)
        self.assertIsNone(self.store.value.move)
        self.assertEqual(self.store.value.epoch, m.epoch + 3)
        self.assertEqual(self.flushLoggedErrors(), [])
        for proxy in (self.proxy, other):
            self.assertEqual(proxy.rebalancer.status()["state"], "idle")
