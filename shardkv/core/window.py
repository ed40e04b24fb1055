"""A node's window: the record bytes it may have in flight, sized by how fast it answers.

A fixed cap (``--node-inflight-bytes``) bounds the memory a proxy spends on
one node, but not how long a write waits at that node: 32 MiB is a few
hundred milliseconds of a quiet node's work and seconds of a busy one's. A
write still unanswered when its deadline passes is answered 504 with an
outcome nobody knows, which under load is failure dressed as overload.

A node works on the writes it holds together, so each of them is answered
after roughly (bytes in flight) / (the node's throughput). Each answer is
therefore a sample of that throughput: the bytes that were in flight when
the write was sent (itself included), divided by how long its answer took.
A sample never overstates the throughput (the node may also have been
waiting on its disk, or idle), so a window of ``target`` seconds of the
estimated throughput keeps answers within about ``target``; it grows as
fast as the samples do when the node has room to spare. The estimate is an
exponentially weighted average of the samples, and only writes sent with a
real load in flight (at least L{LOAD_FRACTION} of the floor) are samples:
a lone small write measures the node's fixed costs, not its throughput.

A new window is half the cap, so a node that has not answered yet is not
handed the whole cap at once. The window stays between the floor
(1/16 of the cap) and the cap. A node with nothing in flight takes one
write whatever its size, so neither a cap nor a window below the largest
value can starve it. What to do with a write that does not fit is the
caller's business (L{Room} says whether it would fit under the cap).
"""

from __future__ import annotations

from enum import Enum

FLOOR_FRACTION = 16
"""The window never shrinks below the cap divided by this."""
START_FRACTION = 2
"""A new window is the cap divided by this."""
LOAD_FRACTION = 0.25
"""A write is a throughput sample when at least this part of the floor was in flight."""
RATE_WEIGHT = 0.25
"""The weight of each new sample in the throughput estimate."""
MIN_SECONDS = 1e-3
"""Answer times are counted as at least this (a clock that did not move)."""


class Room(Enum):
    """Whether a write of a given size fits a node now."""

    FREE = "free"
    """It fits the window: send it."""
    WINDOW_FULL = "window_full"
    """It fits under the cap but not the window: room comes as the node's
    writes in flight are answered."""
    CAP_FULL = "cap_full"
    """Not even the cap has room for it."""


class ByteWindow:
    """The bytes one node may have in flight (``limit``) and has (``used``).

    ``ceiling`` is the cap and ``target`` the seconds the window keeps the
    node's answers within. ``rate`` is the estimated throughput, in bytes
    per second (None before the first sample). Times are the caller's clock.
    """

    __slots__ = ("ceiling", "floor", "limit", "rate", "target", "used")

    def __init__(self, ceiling: int, target: float) -> None:
        self.ceiling = ceiling
        self.floor = max(1, ceiling // FLOOR_FRACTION)
        self.limit = max(self.floor, ceiling // START_FRACTION)
        self.target = target
        self.used = 0
        self.rate: float | None = None

    def __repr__(self) -> str:
        return f"<ByteWindow used={self.used} limit={self.limit} ceiling={self.ceiling}>"

    def room(self, size: int) -> Room:
        """Whether ``size`` more bytes fit the window, only the cap, or neither."""
        if self.used == 0 or self.used + size <= self.limit:
            return Room.FREE
        if self.used + size <= self.ceiling:
            return Room.WINDOW_FULL
        return Room.CAP_FULL

    def take(self, size: int) -> int:
        """Count ``size`` bytes as in flight; returns the bytes now in flight,
        which the caller hands back with the write's end."""
        self.used += size
        return self.used

    def release(self, size: int) -> None:
        """A write's bytes stop counting, with nothing learned of the node's speed
        (it was never sent, the caller gave up, or the connection failed)."""
        self.used -= size

    def answered(self, size: int, in_flight: int, started: float, now: float) -> None:
        """The node answered (or, if ``now`` is its deadline, did not answer in
        time) a write of ``size`` bytes sent at ``started`` with ``in_flight``
        bytes in flight, L{take}'s answer."""
        self.used -= size
        if in_flight < self.floor * LOAD_FRACTION:
            return
        sample = in_flight / max(now - started, MIN_SECONDS)
        rate = sample if self.rate is None else self.rate + RATE_WEIGHT * (sample - self.rate)
        self.rate = rate
        self.limit = min(self.ceiling, max(self.floor, int(rate * self.target)))

    def resize(self, ceiling: int | None = None, target: float | None = None) -> None:
        """A new cap (the window opens to it) or a new target."""
        if ceiling is not None:
            self.ceiling = ceiling
            self.floor = max(1, ceiling // FLOOR_FRACTION)
            self.limit = ceiling
        if target is not None:
            self.target = target
