"""Work too long for one reactor turn (building a ring), done a step per turn.

A ring of the default 32768 points per node takes 30-50 ms of CPU to build
on a quiet box, and several times that on a busy one. Done in one go on the
reactor, every request in flight waits that long. On a thread it is little
better, because of the GIL: the reactor thread gives the GIL up at each of
its socket calls and then waits for the thread to hand it back, which takes
a switch interval (5 ms), and a shorter interval only trades that for trips
through a busy box's scheduler (measured in ``bench/move.py``: a proxy's
ring build on a thread took 35-60 ms and the GETs in flight 30-50 ms, against
7-8 ms before; with a 0.1 ms interval, 170 ms and 50-90 ms). So rings are
built on the reactor, in steps of a few tenths of a millisecond
(L{shardkv.core.placement.Ring.stepwise}), one step per reactor turn:
between two steps the reactor serves whatever arrived, so a request waits
for one step at most, and the build only takes longer.

A L{Pace} also rests between steps, for as long as a step took times
C{rest}: a process busy for the whole build competes with every other
runnable process for the CPU on a busy box, and its requests wait for the
scheduler; one that rests half the time (or more, for work with no
deadline) keeps getting the CPU at once when a request arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from shardkv.core.placement import Steps, complete

T = TypeVar("T")


@dataclass
class Pace:
    """After each step, rest for the step's time (on the clock) times ``rest``.

    Mutable: work started slowly (prepared ahead) can be hurried once it is
    needed."""

    rest: float = 0.0


def run_steps(clock: IReactorTime | None, steps: Steps[T], pace: Pace | None = None) -> Deferred[T]:
    """Run ``steps`` on ``clock``, the first at once and then one per reactor turn
    (``callLater``, after the rest ``pace`` asks for); fires with their result.
    Without a clock, all at once.

    Cancelling it stops the work where it is.
    """
    if clock is None:
        try:
            return succeed(complete(steps))
        except Exception:
            return fail()
    pending: list[IDelayedCall] = []

    def cancel(_: Deferred[T]) -> None:
        for call in pending:
            if call.active():
                call.cancel()
        steps.close()

    done: Deferred[T] = Deferred(cancel)

    def step() -> None:
        pending.clear()
        started = clock.seconds()
        try:
            next(steps)
        except StopIteration as finished:
            done.callback(finished.value)
            return
        except Exception:
            done.errback()
            return
        rest = 0.0 if pace is None else max(0.0, (clock.seconds() - started) * pace.rest)
        pending.append(clock.callLater(rest, step))

    step()
    return done
