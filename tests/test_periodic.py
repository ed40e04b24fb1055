"""
Tests for L{shardkv.periodic}: background work on a timer.

Health checks, hint delivery and tombstone collection all run this way. A
run must not start while the previous one is still waiting on the network,
or a slow node would make runs pile up behind each other; and a coroutine
must actually be run, not just created and dropped.
"""

from __future__ import annotations

from collections.abc import Iterator

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from shardkv.periodic import cooperator_on, periodic

INTERVAL = 10.0


class PeriodicTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.runs: list[float] = []

    def tick(self) -> None:
        self.runs.append(self.clock.seconds())

    def test_runs_at_start_and_then_every_interval(self) -> None:
        service = periodic(INTERVAL, self.tick, self.clock)
        self.assertEqual(self.runs, [])
        service.startService()
        self.assertEqual(self.runs, [0.0])
        self.clock.advance(INTERVAL - 0.5)
        self.assertEqual(self.runs, [0.0])
        self.clock.advance(0.5)
        self.clock.advance(INTERVAL)
        self.assertEqual(self.runs, [0.0, INTERVAL, 2 * INTERVAL])

        self.successResultOf(service.stopService())
        self.clock.advance(5 * INTERVAL)
        self.assertEqual(len(self.runs), 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waits_for_a_deferred_before_the_next_run(self) -> None:
        """
        A run whose Deferred has not fired holds back the next one however
        many intervals pass; once it fires, runs resume on the interval.
        """
        pending: list[Deferred[None]] = []

        def slow() -> Deferred[None]:
            self.tick()
            d: Deferred[None] = Deferred()
            pending.append(d)
            return d

        service = periodic(INTERVAL, slow, self.clock)
        service.startService()
        self.clock.advance(3.5 * INTERVAL)
        self.assertEqual(self.runs, [0.0])

        pending[0].callback(None)
        self.assertEqual(len(self.runs), 1)
        self.clock.advance(INTERVAL)
        self.assertEqual(len(self.runs), 2)
        self.clock.advance(5 * INTERVAL)
        self.assertEqual(len(self.runs), 2, "ran again while the second run was waiting")

        stopped = service.stopService()
        self.assertNoResult(stopped)
        pending[1].callback(None)
        self.successResultOf(stopped)

    def test_runs_a_coroutine_and_waits_for_it(self) -> None:
        """
        An ``async def`` is run to its end (what it does after its first
        await happens), and the next run waits until it has finished.
        """
        gate: list[Deferred[None]] = []
        finished: list[float] = []

        async def work() -> None:
            self.tick()
            d: Deferred[None] = Deferred()
            gate.append(d)
            await d
            finished.append(self.clock.seconds())

        service = periodic(INTERVAL, work, self.clock)
        service.startService()
        self.clock.advance(2 * INTERVAL)
        self.assertEqual((self.runs, finished), ([0.0], []))

        gate[0].callback(None)
        self.assertEqual(finished, [2 * INTERVAL])
        self.clock.advance(INTERVAL)
        self.assertEqual(self.runs, [0.0, 3 * INTERVAL])
        gate[1].callback(None)
        self.assertEqual(finished, [2 * INTERVAL, 3 * INTERVAL])
        self.successResultOf(service.stopService())

    def test_runs_on_the_clock_it_was_given(self) -> None:
        """The service's timer is the given clock's, so tests (and twistd) control time."""
        service = periodic(INTERVAL, self.tick, self.clock)
        service.startService()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.successResultOf(service.stopService())


class FailureTests(SynchronousTestCase):
    """A failed run is logged and the next one still runs: a node whose hint
    delivery failed once must not stop handing hints back for good."""

    def test_a_failed_run_does_not_stop_the_next(self) -> None:
        clock = Clock()
        runs: list[float] = []

        def broken() -> Deferred[None]:
            runs.append(clock.seconds())
            d: Deferred[None] = Deferred()
            d.errback(RuntimeError("the disk is on fire"))
            return d

        def raising() -> None:
            runs.append(clock.seconds())
            raise RuntimeError("and so is the other one")

        for work in (broken, raising):
            runs.clear()
            service = periodic(INTERVAL, work, clock)
            service.startService()
            clock.advance(INTERVAL)
            clock.advance(INTERVAL)
            self.assertEqual(len(runs), 3, work.__name__)
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)
            self.successResultOf(service.stopService())


def test_cooperator_on_runs_steps_on_the_given_clock() -> None:
    clock = Clock()
    steps: list[float] = []

    def work() -> Iterator[None]:
        for _ in range(3):
            steps.append(clock.seconds())
            yield None

    done = cooperator_on(clock).cooperate(work()).whenDone()
    assert steps == []
    for _ in range(5):
        clock.advance(1)
    assert steps and done.called
