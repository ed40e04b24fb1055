"""The coordinator: runs each client request as quorum calls to the replicas.

A key lives on the first N distinct nodes of its preference list. A read asks
them all and answers once R have replied, with the newest version seen; the
replicas that were stale are repaired in the background. A write first reads
the newest version (R replies) so that it can mint a larger one, then sends
the record to the N replicas in parallel and answers once W have durably
acknowledged it. Neither waits for the slowest replica.

Answers when a quorum cannot be had:

- 503 ``insufficient_replicas``: W (or R) cannot be reached; the body says
  how many replicas acknowledged, and whether the write may still have been
  applied on some of them (``"outcome": "unknown"``) or not at all;
- 504 ``replica_timeout``: the quorum was still possible but replicas did not
  answer in time; for a write the outcome is unknown, never a failure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from shardkv.core.conditions import Precondition
from shardkv.core.placement import Ring
from shardkv.core.quorum import (
    Outcome,
    ReadQuorum,
    Reply,
    Target,
    WriteQuorum,
    replica_targets,
)
from shardkv.core.records import Record
from shardkv.core.versions import Version, VersionClock
from shardkv.http.dataroutes import Consistency, WriteResult, not_found
from shardkv.http.errors import ApiError, bad_request
from shardkv.http.nodeclient import NodeClient, NodeTimeout, NodeUnreachable
from shardkv.proxy.health import HealthMonitor

log = Logger(namespace="shardkv.proxy.coordinator")


def _reply_kind(failure: Failure) -> Reply:
    """May the failed call have been applied? Only if it was sent and not answered."""
    if isinstance(failure.value, NodeTimeout | NodeUnreachable):
        return Reply.UNKNOWN if failure.value.sent else Reply.FAILED
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
        nodes: NodeClient,
        health: HealthMonitor,
        clock: VersionClock,
        *,
        replicas: int = 3,
        r: int = 2,
        w: int = 2,
    ) -> None:
        self.ring = ring
        self.nodes = nodes
        self.health = health
        self.clock = clock
        self.replicas = replicas
        self.r = r
        self.w = w
        self.repairs = 0
        self.undelivered: dict[tuple[str, str], Record] = {}
        self.max_undelivered = 100_000

    def levels(self, c: Consistency) -> tuple[int, int, int]:
        """N, R and W for one request; N shrinks with a smaller cluster."""
        n = min(self.replicas, len(self.ring.nodes))
        r = c.r if c.r is not None else min(self.r, n)
        w = c.w if c.w is not None else min(self.w, n)
        if r > n or w > n:
            raise bad_request(
                f"r={r} and w={w} must not exceed the {n} replicas of each key", "invalid_quorum"
            )
        return n, r, w

    def _node_failed(self, node: str, failure: Failure) -> None:
        if failure.check(NodeUnreachable, NodeTimeout):
            self.health.mark(node, up=False, error=str(failure.value))

    # reads

    async def read_record(self, key: str, n: int, r: int) -> Record | None:
        """The newest record (tombstones included) that R replicas agree exists."""
        replicas = self.ring.preference_list(key, n)
        quorum = ReadQuorum(replicas, r)
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
            call = self.nodes.replica_get(node, key)
            # A replica with hints still waiting for it may be stale. A read
            # quorum that intersects every write quorum (R + W > N) outvotes
            # it anyway; a smaller one must not count it.
            counts = r + min(self.w, n) > n or not self.health.has_hints_waiting(node)
            call.addCallbacks(
                self._read_ok,
                self._read_failed,
                callbackArgs=(quorum, node, counts, landed),
                errbackArgs=(quorum, node, landed),
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
        raise self._read_error(quorum, r)

    @staticmethod
    def _read_ok(
        record: Record | None, quorum: ReadQuorum, node: str, counts: bool, landed: Any
    ) -> None:
        quorum.add(node, record, counts=counts)
        landed()

    def _read_failed(self, failure: Failure, quorum: ReadQuorum, node: str, landed: Any) -> None:
        self._node_failed(node, failure)
        quorum.fail(node, _reply_kind(failure))
        landed()

    def _read_error(self, quorum: ReadQuorum, r: int) -> ApiError:
        failed = sorted(quorum.failed)
        extra = {"replied": quorum.answered, "required": r, "failed": failed}
        down = f" ({', '.join(failed)} failed or down)" if failed else ""
        if any(kind is Reply.UNKNOWN for kind in quorum.failed.values()):
            message = f"only {quorum.answered} of the {r} replicas needed answered in time{down}"
            return ApiError(504, "replica_timeout", message, extra=extra)
        message = f"only {quorum.answered} of the {r} replicas needed could be read{down}"
        return ApiError(503, "insufficient_replicas", message, extra=extra)

    def _repair(self, key: str, quorum: ReadQuorum) -> None:
        """Bring replicas that answered with an older record (or none) up to date."""
        newest = quorum.newest()
        if newest is None:
            return
        for node in quorum.stale():
            self.repairs += 1
            call = self.nodes.replica_put(node, key, newest)
            call.addErrback(self._node_failed_quietly, node)

    def _node_failed_quietly(self, failure: Failure, node: str) -> None:
        self._node_failed(node, failure)

    async def read(self, key: str, c: Consistency) -> Record | None:
        n, r, _ = self.levels(c)
        record = await self.read_record(key, n, r)
        return None if record is None or record.tombstone else record

    # writes

    async def write(
        self, key: str, value: bytes, content_type: str, pre: Precondition, c: Consistency
    ) -> WriteResult:
        n, r, w = self.levels(c)
        current = await self._version_read(key, n, r)
        live = current if current is not None and not current.tombstone else None
        self._check(pre, live)
        record = Record(self.clock.mint(current.version if current else None), value, content_type)
        await self._replicate(key, record, n, w, c.sloppy)
        return WriteResult(record.version, created=live is None)

    async def remove(self, key: str, pre: Precondition, c: Consistency) -> Version:
        n, r, w = self.levels(c)
        current = await self._version_read(key, n, r)
        if current is None or current.tombstone:
            raise not_found(key)
        self._check(pre, current)
        record = Record.deleted(self.clock.mint(current.version))
        await self._replicate(key, record, n, w, c.sloppy)
        return record.version

    async def _version_read(self, key: str, n: int, r: int) -> Record | None:
        """A write's first step; if it fails, nothing was written."""
        try:
            return await self.read_record(key, n, r)
        except ApiError as e:
            e.extra["outcome"] = "not_applied"
            raise

    @staticmethod
    def _check(pre: Precondition, live: Record | None) -> None:
        reason = pre.failure(live.version if live else None)
        if reason is not None:
            raise ApiError(412, "precondition_failed", reason)

    async def _replicate(self, key: str, record: Record, n: int, w: int, sloppy: bool) -> None:
        preference = self.ring.preference_list(key, len(self.ring.nodes))
        targets = replica_targets(preference, n, self.health.is_down)
        quorum = WriteQuorum(targets, w, sloppy)
        if quorum.pending < w:
            down = [node for node in preference[:n] if self.health.is_down(node)]
            raise ApiError(
                503,
                "insufficient_replicas",
                f"W={w} replicas are needed but {', '.join(down)} "
                f"{'is' if len(down) == 1 else 'are'} down; nothing was written",
                extra={"acks": 0, "required": w, "outcome": "not_applied", "down": down},
            )
        decided, check = _first(lambda: quorum.outcome() is not None)

        def landed() -> None:
            check()
            if quorum.complete:
                self._hint_missed(key, record, quorum, preference, n)

        for target in targets:
            call = self.nodes.replica_put(target.node, key, record, target.hint_for)
            call.addCallbacks(
                self._write_ok,
                self._write_failed,
                callbackArgs=(quorum, target, landed),
                errbackArgs=(quorum, target, landed),
            )
        check()
        await decided
        outcome = quorum.outcome()
        if outcome is Outcome.OK:
            return
        extra: dict[str, object] = {"acks": quorum.acks, "required": w}
        if outcome is Outcome.FAILED:
            extra["outcome"] = "not_applied"
            raise ApiError(
                503,
                "insufficient_replicas",
                f"only {quorum.acks} of the {w} replicas needed acknowledged; "
                "the write was not applied",
                extra=extra,
            )
        extra["outcome"] = "unknown"
        if any(reply is Reply.UNKNOWN for reply in quorum.replies.values()):
            raise ApiError(
                504,
                "replica_timeout",
                f"only {quorum.acks} of the {w} replicas needed acknowledged in time; "
                "the write may or may not have been applied",
                extra=extra,
            )
        raise ApiError(
            503,
            "insufficient_replicas",
            f"only {quorum.acks} of the {w} replicas needed acknowledged; the write "
            "is on some replicas and may still become visible",
            extra=extra,
        )

    @staticmethod
    def _write_ok(_: bool, quorum: WriteQuorum, target: Target, landed: Any) -> None:
        quorum.add(target, Reply.OK)
        landed()

    def _write_failed(
        self, failure: Failure, quorum: WriteQuorum, target: Target, landed: Any
    ) -> None:
        self._node_failed(target.node, failure)
        quorum.add(target, _reply_kind(failure))
        landed()

    def _hint_missed(
        self, key: str, record: Record, quorum: WriteQuorum, preference: list[str], n: int
    ) -> None:
        """Once every target answered: make sure each replica that missed the write gets it.

        Not for a write that failed everywhere: the client was told it was
        not applied, and a hint would apply it later.
        """
        if quorum.outcome() is Outcome.FAILED:
            return
        for target, reply in quorum.replies.items():
            if reply is Reply.OK:
                continue
            home = target.hint_for or target.node
            holders = [p for p in preference[n:] + preference[:n] if p not in (home, target.node)]
            Deferred.fromCoroutine(self._keep_for(home, key, record, holders))

    async def _keep_for(self, home: str, key: str, record: Record, holders: list[str]) -> None:
        """A replica missed a write: hand ``record`` to the first live holder
        that takes it as a hint for ``home``, else keep it here.

        A record nobody could take waits in a bounded queue on this proxy
        and is retried by L{retry_undelivered}; only a proxy restart (or an
        overflowing queue) leaves it to read repair.
        """
        for holder in holders:
            if self.health.is_down(holder):
                continue
            try:
                await self.nodes.replica_put(holder, key, record, home)
            except Exception as e:
                self._node_failed(holder, Failure(e))
                continue
            return
        self._queue_undelivered(home, key, record)

    def _queue_undelivered(self, home: str, key: str, record: Record) -> None:
        slot = (home, key)
        queued = self.undelivered.get(slot)
        if queued is not None and queued.version >= record.version:
            return
        if queued is None and len(self.undelivered) >= self.max_undelivered:
            log.warn(
                "undelivered queue full; {home} gets {key!r} by read repair", home=home, key=key
            )
            return
        self.undelivered[slot] = record

    async def retry_undelivered(self) -> None:
        """Deliver queued records to their home replicas, or to a holder as hints."""
        for (home, key), record in list(self.undelivered.items()):
            if self.undelivered.get((home, key)) is not record:
                continue
            del self.undelivered[(home, key)]
            preference = self.ring.preference_list(key, len(self.ring.nodes))
            await self._keep_for(home, key, record, [home, *(p for p in preference if p != home)])
