"""One reactor turn on a test clock."""

from __future__ import annotations

from twisted.internet.task import Clock


def one_turn(clock: Clock) -> None:
    """Run the calls due now, as one reactor turn does (``Clock.advance(0)`` would
    also run the ones they make)."""
    due = [call for call in clock.calls if call.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.called = True
        call.func(*call.args, **call.kw)
