"""Quorum decisions, with no I/O: which replicas to ask, and when to answer.

The coordinator feeds replica replies into a L{WriteQuorum} or L{ReadQuorum}
as they arrive and answers the client as soon as the quorum decides. Keeping
the rules here, away from HTTP, lets Hypothesis try every order of replies
and failures.

Every reply is one of three kinds, after Jepsen's ok / fail / info:

- ``OK``: the replica definitely applied the write (or answered the read);
- ``FAILED``: it definitely did not (the connection was refused, or the node
  was known to be down so nothing was sent, or it answered an error);
- ``UNKNOWN``: the request may have been applied (a timeout after sending).

A write that cannot reach W is reported as *unknown* whenever any replica
may hold it, never as a definite failure.

While the cluster map moves a range (its ``copying`` and ``handover``
phases), a write goes to the old and the new replicas together and needs W
acknowledgements within each set: L{JointWriteQuorum}. Then a read at either
epoch's ring intersects it (R + W > N in each set).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from shardkv.core.records import Record
from shardkv.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class Consistency:
    """Per-request quorum settings (``?r=``, ``?w=``, ``?sloppy=true``).

    None means the cluster default.
    """

    r: int | None = None
    w: int | None = None
    sloppy: bool = False


class QuorumSizes(NamedTuple):
    """How many copies a key has (n), and how many must answer a read (r) or a write (w)."""

    n: int
    r: int
    w: int


def quorum_sizes(default: QuorumSizes, members: int, c: Consistency) -> QuorumSizes:
    """The sizes for one request: N shrinks with a smaller cluster, R and W may be overridden."""
    n = min(default.n, members)
    r = c.r if c.r is not None else min(default.r, n)
    w = c.w if c.w is not None else min(default.w, n)
    if r > n or w > n:
        raise InvalidRequest(
            f"r={r} and w={w} must not exceed the {n} replicas of each key", "invalid_quorum"
        )
    return QuorumSizes(n, r, w)


class Reply(enum.Enum):
    OK = "ok"
    FAILED = "failed"
    UNKNOWN = "unknown"


class Outcome(enum.Enum):
    OK = "ok"
    FAILED = "failed"  # definitely not applied anywhere
    UNKNOWN = "unknown"  # may have been applied on some replicas


@dataclass(frozen=True, slots=True)
class Target:
    """One replica write: ``node`` stores the record, for ``hint_for`` if it is a stand-in."""

    node: str
    hint_for: str | None = None


def replica_targets(
    preference: Sequence[str], n: int, is_down: Callable[[str], bool]
) -> list[Target]:
    """Where a write goes: the first ``n`` nodes, with stand-ins for down ones.

    A down home replica is replaced by the next live node after the first
    ``n`` (Dynamo's sloppy quorum), which keeps the record as a hint and hands
    it back when the home replica returns. When there are more down home
    replicas than live spares, the live nodes share the extra hints, so every
    down replica gets its missed write as long as any node is up.
    """
    home = list(preference[:n])
    spares = [node for node in preference[n:] if not is_down(node)]
    live_home = [node for node in home if not is_down(node)]
    sharing = spares or live_home
    fresh = iter(spares)
    targets = [Target(node) for node in live_home]
    for i, node in enumerate(node for node in home if is_down(node)):
        stand_in = next(fresh, None) or (sharing[i % len(sharing)] if sharing else None)
        if stand_in is not None:
            targets.append(Target(stand_in, hint_for=node))
    return targets


@dataclass
class WriteQuorum:
    """Counts acknowledgements of one write until it can answer.

    Only home replicas count towards W, unless ``sloppy``: a stand-in's
    hinted copy is not a replica a later quorum read would consult. Either
    way W counts distinct nodes, so a stand-in keeping several hints is one
    copy.
    """

    targets: Sequence[Target]
    w: int
    sloppy: bool = False
    replies: dict[Target, Reply] = field(default_factory=dict)

    def add(self, target: Target, reply: Reply) -> None:
        self.replies[target] = reply

    def _counts(self, target: Target) -> bool:
        return target.hint_for is None or self.sloppy

    def _acked(self) -> set[str]:
        return {t.node for t, r in self.replies.items() if r is Reply.OK and self._counts(t)}

    @property
    def acks(self) -> int:
        return len(self._acked())

    @property
    def pending(self) -> int:
        """Distinct counting nodes that have not acknowledged and may still."""
        waiting = {t.node for t in self.targets if t not in self.replies and self._counts(t)}
        return len(waiting - self._acked())

    @property
    def complete(self) -> bool:
        """Every target has answered (or failed)."""
        return len(self.replies) >= len(self.targets)

    def reachable(self) -> bool:
        """Can W acknowledgements still come?"""
        return self.acks + self.pending >= self.w

    def outcome(self) -> Outcome | None:
        """OK once W acknowledged; otherwise None until W is out of reach.

        Out of reach, the write is FAILED (applied nowhere) only if every
        target answered and none may hold it; a target still in flight, or
        one that timed out, may yet apply it: UNKNOWN.
        """
        if self.acks >= self.w:
            return Outcome.OK
        if self.acks + self.pending >= self.w:
            return None
        in_flight = any(t not in self.replies for t in self.targets)
        maybe = any(r in (Reply.OK, Reply.UNKNOWN) for r in self.replies.values())
        return Outcome.UNKNOWN if in_flight or maybe else Outcome.FAILED


@dataclass
class JointWriteQuorum:
    """Counts acknowledgements of one write that needs W within each of several sets.

    Used while a map change moves ranges: ``sets`` are the first N nodes of
    the key's preference list under the previous ring and under the current
    one. The targets are their union, each node written once (a node in both
    sets acknowledges for both). There are no stand-ins: a down node is a
    failed reply, so a hinted copy never counts for either set. The answer
    follows L{WriteQuorum}'s rules: OK only when every set has W acks, and
    never FAILED while any target may hold the write.
    """

    sets: Sequence[Sequence[str]]
    w: int
    replies: dict[Target, Reply] = field(default_factory=dict)
    targets: list[Target] = field(init=False)
    sloppy: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        seen: dict[str, None] = {}
        for members in self.sets:
            seen.update(dict.fromkeys(members))
        self.targets = [Target(node) for node in seen]

    def add(self, target: Target, reply: Reply) -> None:
        self.replies[target] = reply

    def _acked(self) -> set[str]:
        return {t.node for t, r in self.replies.items() if r is Reply.OK}

    def _answered(self) -> set[str]:
        return {t.node for t in self.replies}

    def set_acks(self) -> list[int]:
        """Acknowledgements within each set, in the order of ``sets``."""
        acked = self._acked()
        return [len(acked.intersection(members)) for members in self.sets]

    def set_pending(self) -> list[int]:
        """Nodes of each set that have not answered yet."""
        answered = self._answered()
        return [len(set(members) - answered) for members in self.sets]

    @property
    def acks(self) -> int:
        """The fewest acknowledgements of any set: what W is measured against."""
        return min(self.set_acks(), default=0)

    @property
    def pending(self) -> int:
        """The fewest nodes still to answer in any set."""
        return min(self.set_pending(), default=0)

    @property
    def complete(self) -> bool:
        return len(self.replies) >= len(self.targets)

    def reachable(self) -> bool:
        """Can every set still reach W?"""
        return all(
            a + p >= self.w for a, p in zip(self.set_acks(), self.set_pending(), strict=True)
        )

    def outcome(self) -> Outcome | None:
        """OK once every set has W; None while every set can still get there.

        Out of reach (some set cannot get W), the write is FAILED only if
        every target answered and none may hold it, else UNKNOWN.
        """
        acks = self.set_acks()
        if all(a >= self.w for a in acks):
            return Outcome.OK
        if self.reachable():
            return None
        in_flight = any(t not in self.replies for t in self.targets)
        maybe = any(r in (Reply.OK, Reply.UNKNOWN) for r in self.replies.values())
        return Outcome.UNKNOWN if in_flight or maybe else Outcome.FAILED


AnyWriteQuorum = WriteQuorum | JointWriteQuorum


@dataclass
class ReadQuorum:
    """Collects replica records for one read until R have answered.

    A replica that answers "no record" counts as an answer. The newest
    version seen wins; replicas that answered with something older, or
    nothing, are the ones read repair brings up to date. A replica that may
    be stale (hints for it are still waiting elsewhere) is read and repaired
    but does not count towards R.
    """

    replicas: Sequence[str]
    r: int
    records: dict[str, Record | None] = field(default_factory=dict)
    counted: set[str] = field(default_factory=set)
    failed: dict[str, Reply] = field(default_factory=dict)

    def add(self, node: str, record: Record | None, counts: bool = True) -> None:
        self.records[node] = record
        if counts:
            self.counted.add(node)

    def fail(self, node: str, reply: Reply = Reply.FAILED) -> None:
        self.failed[node] = reply

    @property
    def answered(self) -> int:
        return len(self.counted)

    @property
    def pending(self) -> int:
        return len(self.replicas) - len(self.records) - len(self.failed)

    def outcome(self) -> Outcome | None:
        if self.answered >= self.r:
            return Outcome.OK
        if self.answered + self.pending >= self.r:
            return None
        return Outcome.FAILED

    def newest(self) -> Record | None:
        present = [rec for rec in self.records.values() if rec is not None]
        return max(present, key=lambda rec: rec.version) if present else None

    def stale(self) -> list[str]:
        """Replicas that answered with an older version than the newest, or none."""
        best = self.newest()
        if best is None:
            return []
        return [
            node for node, rec in self.records.items() if rec is None or rec.version < best.version
        ]


class LatencyWindow:
    """Recent replica read latencies, and the hedge delay they imply.

    A hedged read asks R replicas and asks the others only when one of them
    has not answered within the hedge delay (Cassandra's speculative retry
    at its ``99p`` setting): ``multiple`` times the ``quantile`` of the last
    ``size`` samples, kept between ``floor`` and ``cap``. The quantile is
    computed again every ``every`` samples, not per read: sorting a few
    hundred floats costs tens of microseconds, per read that would be more
    than the hedge saves. Until ``every`` samples have come in the delay is
    ``floor``.
    """

    __slots__ = (
        "_at",
        "_delay",
        "_samples",
        "_since",
        "cap",
        "every",
        "floor",
        "multiple",
        "quantile",
    )

    def __init__(
        self,
        quantile: float = 0.99,
        *,
        size: int = 512,
        every: int = 64,
        multiple: float = 1.0,
        floor: float = 0.002,
        cap: float = 0.1,
    ) -> None:
        self.quantile = quantile
        self.multiple = multiple
        self.floor = floor
        self.cap = cap
        self.every = every
        self._samples: list[float] = [0.0] * size
        self._at = 0
        self._since = 0
        self._delay = floor

    def add(self, seconds: float) -> None:
        samples = self._samples
        samples[self._at % len(samples)] = seconds
        self._at += 1
        self._since += 1
        if self._since >= self.every:
            self._since = 0
            filled = sorted(samples[: min(self._at, len(samples))])
            q = filled[min(len(filled) - 1, int(len(filled) * self.quantile))]
            self._delay = min(self.cap, max(self.floor, q * self.multiple))

    def delay(self) -> float:
        """Seconds a hedged read waits for its first R replicas before asking the others."""
        return self._delay
