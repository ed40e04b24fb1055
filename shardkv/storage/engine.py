"""The interface every storage engine provides to a node.

Reads are synchronous: they run inline on the reactor thread because a point
read from memory or LMDB takes microseconds, far less than a thread hop.
Writes return Deferreds that fire only once the write is durable (as durable
as the engine's setting promises), because a node acknowledges a write only
after that.

Every write is *newer-only*: a record is stored only if its version is newer
than the one already stored. Replicas, hinted handoff and read repair can then
apply writes in any order, any number of times, and still converge.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet.defer import Deferred

from shardkv.core.records import Record


@dataclass(frozen=True)
class EngineHealth:
    ok: bool
    writable: bool
    reason: str = ""
    details: dict[str, object] = field(default_factory=dict)


class StorageEngine(Protocol):
    name: str

    def get(self, key: str) -> Record | None:
        """The committed record for ``key`` (possibly a tombstone), or None.

        Raises L{shardkv.core.records.CorruptRecord} for a record that fails
        its checksum; it is never returned as data.
        """

    def latest(self, key: str) -> Record | None:
        """Like L{get}, but includes writes queued and not yet committed.

        The node mints versions and checks preconditions against this, so two
        writes queued in the same group cannot both pass an ``If-Match``.
        """

    def put(self, key: str, record: Record) -> Deferred[bool]:
        """Store ``record`` if it is newer than what is stored.

        Fires with True if stored, False if the stored version was newer or
        equal, once durable; fails with L{shardkv.errors.StorageError} otherwise.
        """

    def put_many(self, items: Sequence[tuple[str, Record]]) -> Deferred[list[bool]]:
        """L{put} for each item, in one write (a move's stream): one result per item.

        Fails whole with L{shardkv.errors.StorageError} when the write fails.
        """

    def scan(self, start: str = "", limit: int = 1000) -> Iterator[tuple[str, Record]]:
        """Records in the engine's key order from ``start``, at most ``limit``; corrupt skipped.

        Paginate by passing the last key returned as the next ``start``.
        """

    def remove_tombstone(self, key: str, record: Record) -> Deferred[bool]:
        """Delete ``key`` outright if it still holds exactly this tombstone."""

    def discard(self, key: str, record: Record) -> Deferred[bool]:
        """Delete ``key`` outright if it still holds exactly this version (value or tombstone).

        A move's cleanup drops the copies a node no longer owns. Checking the
        version, as L{remove_tombstone} does, keeps a write that landed after
        the cleanup read the record: a newer version is never discarded.
        """

    def put_hint(self, target: str, key: str, record: Record) -> Deferred[bool]:
        """Keep ``record`` for node ``target`` until it can be handed back (newer-only).

        Hints live apart from the node's own records: a node standing in for
        another must not serve the key as if it owned it.
        """

    def hints(self, target: str, limit: int = 100) -> list[tuple[str, Record]]:
        """Up to ``limit`` hints waiting for ``target``, in key order."""

    def hint_counts(self) -> dict[str, int]:
        """How many hints wait for each target node."""

    def remove_hint(self, target: str, key: str, record: Record) -> Deferred[bool]:
        """Drop a delivered hint, unless a newer one replaced it meanwhile."""

    def drop_hints(self, target: str) -> Deferred[int]:
        """Delete every hint waiting for ``target``; fires with how many, once durable.

        For a node that left the cluster: nobody will ever take its hints.
        """

    def get_meta(self, name: str) -> bytes | None:
        """The value the node last stored under ``name`` with L{put_meta}, or None.

        Metadata (the node's cluster map, its acceptor state) lives apart from
        the records, so no scan, move or cleanup ever sees it. Committed values
        only: a L{put_meta} still queued is not seen.
        """

    def put_meta(self, name: str, value: bytes) -> Deferred[None]:
        """Store ``value`` under ``name`` (replacing it); fires once durable.

        It is committed in order with the writes queued before it (the LMDB
        engine's one commit thread), so when it fires every write queued
        earlier is committed too: the node's epoch fence relies on that.
        """

    def health(self) -> EngineHealth: ...

    def start(self) -> None: ...

    def stop(self) -> Deferred[None]: ...
