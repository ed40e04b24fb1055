"""
Tests of tombstone collection (L{TombstoneCollector}) over a memory engine.

A tombstone may go once it is older than the grace period, and not before:
until then a stale replica, a late hint or read repair could bring the
deleted value back. The collector's L{Cooperator} runs on a fake clock here,
so each step of the scan is seen on its own.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock, Cooperator
from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.records import Record
from shardkv.core.versions import Version
from shardkv.node.tombstones import TombstoneCollector
from shardkv.storage.memory import MemoryEngine

NOW_MS = 100_000
GRACE_SECONDS = 10.0
OLD_MS = NOW_MS - 10_000  # exactly the grace period ago: old enough
YOUNG_MS = NOW_MS - 9_999


def tombstone(stored_ms: int) -> Record:
    return Record.deleted(Version(2, 1, "proxy-test"), stored_ms)


def live(stored_ms: int) -> Record:
    return Record(Version(1, 1, "proxy-test"), b"v", "text/plain", stored_ms=stored_ms)


class TombstoneCollectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.engine = MemoryEngine()
        # One step per second of the fake clock, so each step is seen on its own.
        self.cooperator = Cooperator(
            terminationPredicateFactory=lambda: lambda: True,
            scheduler=self.schedule,
        )
        self.records = {
            "a-old": tombstone(OLD_MS),
            "b-young": tombstone(YOUNG_MS),
            "c-live": live(0),
            "d-old": tombstone(0),
            "e-old": tombstone(OLD_MS - 1),
        }
        for key, record in self.records.items():
            self.assertTrue(self.successResultOf(self.engine.put(key, record)))

    def schedule(self, work: object) -> IDelayedCall:
        assert callable(work)
        return self.clock.callLater(1, work)

    def collector(self, step: int) -> TombstoneCollector:
        return TombstoneCollector(
            self.engine, lambda: NOW_MS, GRACE_SECONDS, step, cooperator=self.cooperator
        )

    def finish(self, d: Deferred[object], steps: int = 100) -> None:
        """Advance the fake clock until C{d} fired, at most C{steps} seconds."""
        for _ in range(steps):
            if d.called:
                return
            self.clock.advance(1)
        self.fail(f"the collection did not finish within {steps} steps")

    def keys(self) -> list[str]:
        return [key for key, _ in self.engine.scan()]

    def test_old_tombstones_go_and_young_ones_and_live_records_stay(self) -> None:
        collector = self.collector(step=200)
        d = collector.collect()
        self.finish(d)
        self.successResultOf(d)
        self.assertEqual(self.keys(), ["b-young", "c-live"])
        self.assertEqual(collector.collected, 3)
        self.assertEqual(self.engine.get("b-young"), self.records["b-young"])
        self.assertEqual(self.engine.get("c-live"), self.records["c-live"])

    def test_the_scan_yields_between_steps(self) -> None:
        """
        Two records per step: after the first turn only the first step's old
        tombstone is gone, so a large store never holds the reactor for the
        whole scan.
        """
        collector = self.collector(step=2)
        d = collector.collect()
        self.clock.advance(1)
        self.assertNoResult(d)
        self.assertEqual(self.keys(), ["b-young", "c-live", "d-old", "e-old"])
        self.assertEqual(collector.collected, 1)
        self.finish(d)
        self.successResultOf(d)
        self.assertEqual(self.keys(), ["b-young", "c-live"])
        self.assertEqual(collector.collected, 3)

    def test_a_tombstone_replaced_meanwhile_stays(self) -> None:
        """
        A key written again after the scan read its old tombstone keeps the
        new record: only exactly the tombstone that was seen is removed.
        """
        collector = self.collector(step=2)
        d = collector.collect()
        self.clock.advance(1)
        newer = Record(Version(3, 1, "proxy-test"), b"back", "text/plain", stored_ms=NOW_MS)
        self.assertTrue(self.successResultOf(self.engine.put("e-old", newer)))
        self.finish(d)
        self.assertEqual(self.keys(), ["b-young", "c-live", "e-old"])
        self.assertEqual(self.engine.get("e-old"), newer)
        self.assertEqual(collector.collected, 2)
