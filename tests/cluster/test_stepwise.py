"""
Tests of L{shardkv.cluster.stepwise.run_steps}: work cut into steps runs one
step per reactor turn, so that what arrives between two steps is served.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from shardkv.cluster.stepwise import Pace, run_steps
from tests.cluster.turns import one_turn


def counting(steps: int, log: list[int]) -> Generator[None, None, str]:
    for i in range(steps):
        log.append(i)
        yield
    return f"{steps} steps"


def test_one_step_per_turn() -> None:
    """The first step runs at once, each later one on a turn of its own."""
    clock, log = Clock(), list[int]()
    d = run_steps(clock, counting(3, log))
    assert log == [0] and not d.called
    one_turn(clock)
    assert log == [0, 1] and not d.called
    one_turn(clock)
    one_turn(clock)
    assert log == [0, 1, 2] and d.called
    assert d.result == "3 steps"
    assert clock.getDelayedCalls() == []


def test_work_without_steps_is_done_at_once() -> None:
    clock = Clock()
    d = run_steps(clock, counting(0, []))
    assert d.called and d.result == "0 steps"
    assert clock.getDelayedCalls() == []


def test_without_a_clock_everything_runs_at_once() -> None:
    log: list[int] = []
    d = run_steps(None, counting(5, log))
    assert log == [0, 1, 2, 3, 4] and d.result == "5 steps"


def test_an_error_in_a_step_fails_the_work() -> None:
    def failing() -> Generator[None, None, None]:
        yield
        raise ValueError("bad step")

    clock = Clock()
    errors: list[Failure] = []
    run_steps(clock, failing()).addErrback(errors.append)
    assert errors == []
    one_turn(clock)
    assert [str(e.value) for e in errors if e.check(ValueError)] == ["bad step"]
    run_steps(None, failing()).addErrback(errors.append)
    assert len(errors) == 2 and errors[1].check(ValueError)


def test_cancelling_stops_the_work() -> None:
    clock, log = Clock(), list[int]()
    d = run_steps(clock, counting(10, log))
    one_turn(clock)
    errors: list[Failure] = []
    d.addErrback(errors.append)
    d.cancel()
    assert log == [0, 1] and clock.getDelayedCalls() == []
    assert len(errors) == 1 and errors[0].check(CancelledError)


def test_a_pace_rests_after_each_step_for_its_time_times_rest() -> None:
    """With a L{Pace}, the next step waits for the last one's time (on the clock)
    times C{rest}; lowering C{rest} on the way hurries the rest of the work."""
    clock = Clock()

    def timed() -> Generator[None, None, None]:
        for _ in range(3):
            clock.advance(0.002)  # a step that takes 2 ms
            yield

    pace = Pace(rest=4.0)
    d = run_steps(clock, timed(), pace)
    (call,) = clock.getDelayedCalls()
    assert call.getTime() - clock.seconds() == pytest.approx(0.008)
    clock.advance(0.007)
    assert not d.called
    pace.rest = 0.0
    clock.advance(0.001)
    assert d.called, "no rest: the other steps follow at once"
