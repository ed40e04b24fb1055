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
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from shardkv.core.records import Record


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
    it back when the home replica returns. With no live node left to stand
    in, the hint goes to the first live home replica's hint store instead: the
    record then still reaches the down node later.
    """
    home = list(preference[:n])
    spare = [node for node in preference[n:] if not is_down(node)]
    live_home = [node for node in home if not is_down(node)]
    targets = [Target(node) for node in live_home]
    for node in home:
        if not is_down(node):
            continue
        if spare:
            targets.append(Target(spare.pop(0), hint_for=node))
        elif live_home:
            targets.append(Target(live_home[0], hint_for=node))
    return targets


@dataclass
class WriteQuorum:
    """Counts acknowledgements of one write until it can answer.

    Only home replicas count towards W, unless ``sloppy``: a stand-in's
    hinted copy is not a replica a later quorum read would consult.
    """

    targets: Sequence[Target]
    w: int
    sloppy: bool = False
    replies: dict[Target, Reply] = field(default_factory=dict)

    def add(self, target: Target, reply: Reply) -> None:
        self.replies[target] = reply

    def _counts(self, target: Target) -> bool:
        return target.hint_for is None or self.sloppy

    @property
    def acks(self) -> int:
        return sum(1 for t, r in self.replies.items() if r is Reply.OK and self._counts(t))

    @property
    def pending(self) -> int:
        return sum(1 for t in self.targets if t not in self.replies and self._counts(t))

    def outcome(self) -> Outcome | None:
        """OK once W acknowledged; otherwise None until W is out of reach."""
        if self.acks >= self.w:
            return Outcome.OK
        if self.acks + self.pending >= self.w:
            return None
        maybe = self.acks > 0 or any(r in (Reply.OK, Reply.UNKNOWN) for r in self.replies.values())
        return Outcome.UNKNOWN if maybe else Outcome.FAILED


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
