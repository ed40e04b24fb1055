"""A node's own copy of the data: what its routes ask of its storage engine.

Two kinds of caller use it. Clients of the data API (``/kv``, ``/set``) read
and write the node directly: a write checks its precondition and mints its
version (L{shardkv.core.writes}) against the engine's newest record in the
same reactor turn that queues it, so no other request can slip between the
check and the write. The replica routes store records minted elsewhere, only
if they are newer, or keep them as hints for a node that was down.

Reads answer inline; writes fire once the engine made them durable.

The store also holds the node's cluster map (L{MapStore}): the replica routes
check each call's epoch against it (L{MapStore.check_epoch}) in the same
reactor turn that queues the call's writes, which is what makes the fence
hold (see L{shardkv.node.mapstore}).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred, FirstError, fail, gatherResults, succeed
from twisted.python.failure import Failure

from shardkv.core.conditions import Precondition
from shardkv.core.records import CorruptRecord, Record
from shardkv.core.versions import Version, VersionClock, VersionError, check_incoming
from shardkv.core.writes import WriteResult, next_tombstone, next_value
from shardkv.errors import (
    InvalidHintTarget,
    InvalidRequest,
    NotFound,
    ShardkvError,
    ValueTooLarge,
)
from shardkv.node.mapstore import MapStore
from shardkv.node.members import Members
from shardkv.replica import codec
from shardkv.storage.engine import StorageEngine


class PutOutcome(NamedTuple):
    """A replica write's outcome, with what the node held before it.

    A proxy's one-round write (L{shardkv.proxy.coordinator}) needs both: a
    refused write tells it the newer version to mint past (``held``), and an
    applied one whether the key existed (``live``), for 201 versus 200.
    """

    applied: bool
    held: Version | None
    """The version the node held (queued writes included): older than the
    write if it was applied, at least as new if it was refused. None: nothing."""
    live: bool
    """Whether that was a live record (not a tombstone)."""

    def as_json(self) -> dict[str, Any]:
        """The single-key replica route's answer (``PUT /replica/kv/<key>``)."""
        answer: dict[str, Any] = {"applied": self.applied, "live": self.live}
        if self.held is not None:
            answer["held"] = str(self.held)
        return answer


Outcome = Record | bool | PutOutcome | ShardkvError
"""One batch operation's outcome: a read's record, a write's L{PutOutcome} (a
hint's or a stream's bare "applied"), or the domain error that operation alone
failed with."""


class NodeStore:
    def __init__(
        self,
        node_id: str,
        engine: StorageEngine,
        versions: VersionClock,
        max_value_bytes: int,
        now_ms: Callable[[], int],
        members: Members | None = None,
        mapstore: MapStore | None = None,
    ) -> None:
        """``members``: the cluster as this node knows it; without them every hint is refused.
        ``mapstore``: the node's cluster map (a fresh, blank one by default); the
        members follow it once it holds a map."""
        self.node_id = node_id
        self.members = members if members is not None else Members()
        self.mapstore = mapstore if mapstore is not None else MapStore(node_id, engine)
        self.members.follow(self.mapstore)
        self.engine = engine
        self.versions = versions
        self.max_value_bytes = max_value_bytes
        self.now_ms = now_ms

    # the data API

    def _stored(self, key: str, latest: bool = False) -> Record | None:
        """The committed record, or with ``latest`` the newest one queued."""
        try:
            return self.engine.latest(key) if latest else self.engine.get(key)
        except CorruptRecord as e:
            raise CorruptRecord(
                f"the stored record for {key!r} on {self.node_id} failed its checksum: {e}"
            ) from None

    def read(self, key: str) -> Record | None:
        record = self._stored(key)
        if record is None or record.tombstone:
            return None
        return record

    def write(
        self, key: str, value: bytes, content_type: str, pre: Precondition
    ) -> Deferred[WriteResult]:
        record, result = next_value(
            self._stored(key, latest=True), pre, self.versions, value, content_type, self.now_ms()
        )
        return self.engine.put(key, record).addCallback(lambda _: result)

    def remove(self, key: str, pre: Precondition) -> Deferred[Version]:
        record = next_tombstone(
            key, self._stored(key, latest=True), pre, self.versions, self.now_ms()
        )
        return self.engine.put(key, record).addCallback(lambda _: record.version)

    # the replica routes

    def replica_record(self, key: str) -> Record:
        """The stored record, tombstones included, as replication sees it.

        A corrupt record is reported as missing, so that the coordinator's
        read repair overwrites it with a good copy from another replica.
        """
        try:
            record = self.engine.get(key)
        except CorruptRecord as e:
            raise NotFound(f"the record for {key!r} is corrupt: {e}", "corrupt_record") from None
        if record is None:
            raise NotFound(f"no record for key {key!r}")
        return record

    def accept(self, key: str, record: Record, hint_for: str | None) -> Deferred[bool]:
        """Store a replicated record if newer, or keep it as a hint for ``hint_for``.

        A hint is kept only for a current member: the handoff would send it to
        ``hint_for``, and a caller must not choose where this node sends data.
        """
        if hint_for is not None and hint_for not in self.members:
            why = (
                "it is not a member of the cluster"
                if self.members.known
                else "this node has not been told the cluster's members yet"
            )
            return fail(InvalidHintTarget(f"hint for {hint_for!r} refused: {why}"))
        local = dataclasses.replace(record, stored_ms=self.now_ms())
        if hint_for is not None:
            return self.engine.put_hint(hint_for, key, local)
        return self.engine.put(key, local)

    def replica_put(self, key: str, record: Record, hint_for: str | None) -> Deferred[Any]:
        """L{accept}, answered with what the node held before (L{PutOutcome});
        a hint answers a bare "applied" (a hint holder's own copy is not asked)."""
        if hint_for is not None:
            return self.accept(key, record, hint_for)
        try:
            prior = self.engine.latest(key)
        except CorruptRecord:
            prior = None  # it is overwritten like a missing one
        held, live = (None, False) if prior is None else (prior.version, not prior.tombstone)
        return self.accept(key, record, None).addCallback(PutOutcome, held, live)

    def replica_put_answer(
        self, key: str, record: Record, hint_for: str | None
    ) -> Deferred[dict[str, Any]]:
        """L{replica_put} as the single-key route's JSON answer."""
        return self.replica_put(key, record, hint_for).addCallback(_put_json)

    def run_batch(self, ops: Sequence[codec.Op]) -> Deferred[list[Outcome]]:
        """Every operation's outcome, once every write in the batch is durable.

        Reads answer from the engine at once; writes join the same group
        commit. One operation's failure is its own outcome, not the batch's.
        Anything else (the caller hung up and the batch was cancelled) fails
        the batch with the first such error itself, and no operation's
        failure is left unhandled.
        """
        outcomes: list[Deferred[Any]] = []
        for op in ops:
            if isinstance(op, codec.GetOp):
                outcomes.append(self._get(op.key))
            else:
                try:
                    self.check_incoming(op.key, op.record.version)
                except InvalidRequest as e:
                    outcomes.append(succeed(e))
                    continue
                outcomes.append(self._put(op))
        return gatherResults(outcomes, consumeErrors=True).addErrback(_first_error)

    def store_many(self, ops: Sequence[codec.PutOp]) -> Deferred[list[Outcome]]:
        """A move's stream: L{run_batch}'s puts, checked alike, in one engine write.

        A stream batch holds up to a thousand records; one write for all of
        them costs the node a fraction of a Deferred per record. A failed
        write is every record's outcome (the sender retries the batch).
        """
        outcomes: list[Outcome | None] = []
        items: list[tuple[str, Record]] = []
        now = self.now_ms()
        for op in ops:
            try:
                self.check_incoming(op.key, op.record.version)
            except InvalidRequest as e:
                outcomes.append(e)
                continue
            if len(op.record.value) > self.max_value_bytes:
                message = f"the value is over this node's {self.max_value_bytes}-byte limit"
                outcomes.append(ValueTooLarge(message, "value_too_large"))
                continue
            outcomes.append(None)
            items.append((op.key, dataclasses.replace(op.record, stored_ms=now)))

        def merge(applied: list[bool] | ShardkvError) -> list[Outcome]:
            each: Iterator[Outcome] = (
                iter(applied) if isinstance(applied, list) else itertools.repeat(applied)
            )
            return [out if out is not None else next(each) for out in outcomes]

        d: Deferred[Any] = self.engine.put_many(items)
        return d.addErrback(self._own_failure).addCallback(merge)

    def check_incoming(self, key: str, version: Version) -> None:
        """Refuse a replicated version this node must not store (see
        L{shardkv.core.versions.check_incoming}) with L{InvalidRequest}."""
        try:
            check_incoming(version, self.now_ms())
        except VersionError as e:
            raise InvalidRequest(f"{self.node_id}, key {key!r}: {e}", "invalid_version") from None

    def _get(self, key: str) -> Deferred[Any]:
        try:
            return succeed(self.replica_record(key))
        except NotFound as e:
            return succeed(e)

    def _put(self, op: codec.PutOp) -> Deferred[Any]:
        if len(op.record.value) > self.max_value_bytes:
            message = f"the value is over this node's {self.max_value_bytes}-byte limit"
            return succeed(ValueTooLarge(message, "value_too_large"))
        applied: Deferred[Any] = self.replica_put(op.key, op.record, op.hint_for)
        return applied.addErrback(self._own_failure)

    def _own_failure(self, failure: Failure) -> ShardkvError:
        """A domain error becomes this operation's outcome; anything else fails the batch."""
        failure.trap(ShardkvError)
        err = failure.value
        assert isinstance(err, ShardkvError)
        err.message = f"{self.node_id}: {err.message}"
        return err


def _put_json(outcome: PutOutcome | bool) -> dict[str, Any]:
    if isinstance(outcome, PutOutcome):
        return outcome.as_json()
    return {"applied": outcome}


def _first_error(failure: Failure) -> Failure:
    """The operation's own failure rather than gatherResults' wrapper, so that
    a cancellation still reads as one (the web layer answers it quietly)."""
    if isinstance(failure.value, FirstError):
        return failure.value.subFailure
    return failure
