"""The coordinator: runs each client request as quorum calls to the replicas.

A key lives on the first N distinct nodes of its preference list. A read asks
them all and answers once R have replied, with the newest version seen; the
replicas that were stale are repaired in the background. A write first reads
the newest version (R replies) so that it can mint a larger one, then sends
the record to the N replicas in parallel and answers once W have durably
acknowledged it. Neither waits for the slowest replica.

When a quorum cannot be had it raises:

- L{QuorumUnavailable}: W (or R) cannot be reached; the details say how many
  replicas acknowledged, and whether the write may still have been applied
  on some of them (``"outcome": "unknown"``) or not at all;
- L{QuorumTimeout}: the quorum was still possible but replicas did not
  answer in time; for a write the outcome is unknown, never a failure;
- L{Overloaded}: the quorum failed only because replicas were busy (each had
  its cap of bytes in flight, L{NodeBusy}), so nothing was sent anywhere and
  a retry shortly after may succeed. A write checks every target for room
  before it sends anything: if fewer than W have room it is refused whole,
  rather than sent to one replica and then reported as "unknown". An
  outcome that may have been applied is never "overloaded".

Replicas that missed a write are the business of L{shardkv.proxy.hints}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from shardkv.core.conditions import Precondition
from shardkv.core.placement import Ring
from shardkv.core.quorum import (
    Consistency,
    Outcome,
    QuorumSizes,
    ReadQuorum,
    Reply,
    Target,
    WriteQuorum,
    quorum_sizes,
    replica_targets,
)
from shardkv.core.records import Record
from shardkv.core.versions import Version, VersionClock
from shardkv.core.writes import WriteResult, next_tombstone, next_value
from shardkv.errors import (
    NodeBusy,
    Overloaded,
    QuorumTimeout,
    QuorumUnavailable,
    ReplicaCallFailed,
)
from shardkv.proxy.health import HealthMonitor
from shardkv.proxy.hints import HintKeeper
from shardkv.replica.client import ReplicaClient, write_cost

DEFAULT_SIZES = QuorumSizes(n=3, r=2, w=2)


def _reply_kind(failure: Failure) -> Reply:
    """May the failed call have been applied? Only if it was sent and not answered."""
    if isinstance(failure.value, ReplicaCallFailed) and failure.value.sent:
        return Reply.UNKNOWN
    return Reply.FAILED


def _first(quorum_decided: Callable[[], bool]) -> tuple[Deferred[None], Callable[[], None]]:
    """A Deferred that fires the first time ``quorum_decided()`` holds."""
    done: Deferred[None] = Deferred()

    def check() -> None:
        if not done.called and quorum_decided():
            done.callback(None)

    return done, check


class Coordinator:
    def __init__(
        self,
        ring: Ring,
        replica_client: ReplicaClient,
        health: HealthMonitor,
        versions: VersionClock,
        hints: HintKeeper,
        sizes: QuorumSizes = DEFAULT_SIZES,
    ) -> None:
        self.ring = ring
        self.replica_client = replica_client
        self.health = health
        self.versions = versions
        self.hints = hints
        self.sizes = sizes
        self.repairs = 0

    def quorum_sizes(self, c: Consistency) -> QuorumSizes:
        """N, R and W for one request."""
        return quorum_sizes(self.sizes, len(self.ring.nodes), c)

    # reads

    async def read_record(self, key: str, n: int, r: int) -> Record | None:
        """The newest record (tombstones included) that R replicas agree exists."""
        replicas = self.ring.preference_list(key, n)
        quorum = ReadQuorum(replicas, r)
        busy: set[str] = set()
        done, check = _first(lambda: quorum.outcome() is not None)

        def landed() -> None:
            check()
            if quorum.pending == 0:
                self._repair(key, quorum)

        calls = []
        for node in replicas:
            if self.health.is_down(node):
                quorum.fail(node)
                continue
            call = self.replica_client.replica_get(node, key)
            # A replica with hints still waiting for it may be stale. A read
            # quorum that intersects every write quorum (R + W > N) outvotes
            # it anyway; a smaller one must not count it.
            counts = r + min(self.sizes.w, n) > n or not self.health.has_hints_waiting(node)
            call.addCallbacks(
                self._read_ok,
                self._read_failed,
                callbackArgs=(quorum, node, counts, landed),
                errbackArgs=(quorum, node, landed, busy),
            )
            calls.append(call)
        check()
        try:
            await done
        except CancelledError:
            # The client hung up: stop asking. (Writes, past this point, are
            # never cancelled, so replicas do not end up half-written.)
            for call in calls:
                call.cancel()
            raise
        outcome = quorum.outcome()
        if outcome is Outcome.OK:
            return quorum.newest()
        raise self._read_error(quorum, r, busy)

    @staticmethod
    def _read_ok(
        record: Record | None, quorum: ReadQuorum, node: str, counts: bool, landed: Any
    ) -> None:
        quorum.add(node, record, counts=counts)
        landed()

    def _read_failed(
        self, failure: Failure, quorum: ReadQuorum, node: str, landed: Any, busy: set[str]
    ) -> None:
        self.health.call_failed(node, failure.value)
        if isinstance(failure.value, NodeBusy):
            busy.add(node)
        quorum.fail(node, _reply_kind(failure))
        landed()

    @staticmethod
    def _read_error(quorum: ReadQuorum, r: int, busy: set[str]) -> QuorumUnavailable:
        failed = sorted(quorum.failed)
        details = {"replied": quorum.answered, "required": r, "failed": failed}
        if failed and busy.issuperset(failed):
            return Overloaded(
                f"only {quorum.answered} of the {r} replicas needed could be read: "
                f"{', '.join(failed)} {'is' if len(failed) == 1 else 'are'} busy; "
                "try again shortly",
                **details,
            )
        down = f" ({', '.join(failed)} failed or down)" if failed else ""
        if any(kind is Reply.UNKNOWN for kind in quorum.failed.values()):
            message = f"only {quorum.answered} of the {r} replicas needed answered in time{down}"
            return QuorumTimeout(message, **details)
        message = f"only {quorum.answered} of the {r} replicas needed could be read{down}"
        return QuorumUnavailable(message, **details)

    def _repair(self, key: str, quorum: ReadQuorum) -> None:
        """Bring replicas that answered with an older record (or none) up to date."""
        newest = quorum.newest()
        if newest is None:
            return
        for node in quorum.stale():
            self.repairs += 1
            call = self.replica_client.replica_put(node, key, newest)
            call.addErrback(self._repair_failed, node)

    def _repair_failed(self, failure: Failure, node: str) -> None:
        self.health.call_failed(node, failure.value)

    async def read(self, key: str, c: Consistency) -> Record | None:
        n, r, _ = self.quorum_sizes(c)
        record = await self.read_record(key, n, r)
        return None if record is None or record.tombstone else record

    # writes

    async def write(
        self, key: str, value: bytes, content_type: str, pre: Precondition, c: Consistency
    ) -> WriteResult:
        n, r, w = self.quorum_sizes(c)
        current = await self._version_read(key, n, r)
        record, result = next_value(current, pre, self.versions, value, content_type)
        await self._replicate(key, record, n, w, c.sloppy)
        return result

    async def remove(self, key: str, pre: Precondition, c: Consistency) -> Version:
        n, r, w = self.quorum_sizes(c)
        current = await self._version_read(key, n, r)
        record = next_tombstone(key, current, pre, self.versions)
        await self._replicate(key, record, n, w, c.sloppy)
        return record.version

    async def _version_read(self, key: str, n: int, r: int) -> Record | None:
        """A write's first step; if it fails, nothing was written."""
        try:
            return await self.read_record(key, n, r)
        except QuorumUnavailable as e:
            e.details["outcome"] = "not_applied"
            raise

    async def _replicate(self, key: str, record: Record, n: int, w: int, sloppy: bool) -> None:
        preference = self.ring.preference_list(key, len(self.ring.nodes))
        targets = replica_targets(preference, n, self.health.is_down)
        quorum = WriteQuorum(targets, w, sloppy)
        if quorum.pending < w:
            down = [node for node in preference[:n] if self.health.is_down(node)]
            raise QuorumUnavailable(
                f"W={w} replicas are needed but {', '.join(down)} "
                f"{'is' if len(down) == 1 else 'are'} down; nothing was written",
                acks=0,
                required=w,
                outcome="not_applied",
                down=down,
            )
        self._admit(targets, w, sloppy, write_cost(key, record))
        busy: set[Target] = set()
        decided, check = _first(lambda: quorum.outcome() is not None)

        def landed() -> None:
            check()
            if quorum.complete:
                self.hints.missed(key, record, quorum, preference, n)

        for target in targets:
            call = self.replica_client.replica_put(target.node, key, record, target.hint_for)
            call.addCallbacks(
                self._write_ok,
                self._write_failed,
                callbackArgs=(quorum, target, landed),
                errbackArgs=(quorum, target, landed, busy),
            )
        check()
        await decided
        outcome = quorum.outcome()
        if outcome is Outcome.OK:
            return
        counts = {"acks": quorum.acks, "required": w}
        if outcome is Outcome.FAILED and busy.issuperset(quorum.replies):
            raise Overloaded(
                f"only {quorum.acks} of the {w} replicas needed had room for the write; "
                "nothing was written, try again shortly",
                **counts,
                outcome="not_applied",
                busy=sorted({t.node for t in busy}),
            )
        if outcome is Outcome.FAILED:
            raise QuorumUnavailable(
                f"only {quorum.acks} of the {w} replicas needed acknowledged; "
                "the write was not applied",
                **counts,
                outcome="not_applied",
            )
        if any(reply is Reply.UNKNOWN for reply in quorum.replies.values()):
            raise QuorumTimeout(
                f"only {quorum.acks} of the {w} replicas needed acknowledged in time; "
                "the write may or may not have been applied",
                **counts,
                outcome="unknown",
            )
        raise QuorumUnavailable(
            f"only {quorum.acks} of the {w} replicas needed acknowledged; the write "
            "is on some replicas and may still become visible",
            **counts,
            outcome="unknown",
        )

    @staticmethod
    def _write_ok(_: bool, quorum: WriteQuorum, target: Target, landed: Any) -> None:
        quorum.add(target, Reply.OK)
        landed()

    def _admit(self, targets: list[Target], w: int, sloppy: bool, size: int) -> None:
        """Refuse the write, before anything is sent, unless W targets have room for it."""
        need: dict[str, int] = {}
        busy: list[Target] = []
        for target in targets:
            need[target.node] = need.get(target.node, 0) + size
            if not self.replica_client.has_room(target.node, need[target.node]):
                busy.append(target)
        if not busy:
            return
        probe = WriteQuorum(targets, w, sloppy)
        for target in busy:
            probe.add(target, Reply.FAILED)
        if probe.acks + probe.pending >= w:
            return
        nodes = sorted({t.node for t in busy})
        raise Overloaded(
            f"W={w} replicas are needed but {', '.join(nodes)} "
            f"{'has' if len(nodes) == 1 else 'have'} too much in flight; "
            "nothing was written, try again shortly",
            acks=0,
            required=w,
            outcome="not_applied",
            busy=nodes,
        )

    def _write_failed(
        self,
        failure: Failure,
        quorum: WriteQuorum,
        target: Target,
        landed: Any,
        busy: set[Target],
    ) -> None:
        self.health.call_failed(target.node, failure.value)
        if isinstance(failure.value, NodeBusy):
            busy.add(target)
        quorum.add(target, _reply_kind(failure))
        landed()
