"""Background work: repeating (health checks, hint delivery, tombstone collection), and
long work cut into steps."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="shardkv.periodic")


def _awaited(result: Any) -> Any:
    """Run a coroutine that ``work`` returned (older Twisted's maybeDeferred would not)."""
    return Deferred.fromCoroutine(result) if inspect.iscoroutine(result) else result


def periodic(interval: float, work: Callable[[], Any], clock: IReactorTime) -> TimerService:
    """A service that runs ``work`` every ``interval`` seconds of ``clock``.

    A run that returns a Deferred or a coroutine is waited for before the next
    one is scheduled, so slow work never piles up behind itself. A run that
    fails is logged and the next one runs on time: a bare TimerService would
    stop for good after one failure, and a node would silently stop handing
    back hints.
    """

    def failed(failure: Failure) -> None:
        log.failure(
            "periodic {work} failed; it runs again in {interval} s",
            failure,
            work=getattr(work, "__qualname__", repr(work)),
            interval=interval,
        )

    def run() -> Any:
        started = maybeDeferred(work).addCallback(_awaited)
        return started.addErrback(failed)

    service = TimerService(interval, run)
    service.clock = clock
    return service


def cooperator_on(clock: IReactorTime) -> Cooperator:
    """A Cooperator whose steps run on ``clock`` rather than the global reactor,
    so that long work cut into steps runs on the reactor a service was given."""
    return Cooperator(scheduler=lambda step: clock.callLater(0, step))
