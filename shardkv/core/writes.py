"""The rule every write follows: check the precondition, then mint a newer version.

A node applies it to its own newest record; the proxy's coordinator applies it
to the newest record its read quorum saw. Written once, here, so that the two
can never disagree about what If-Match means or which version comes next.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardkv.core.conditions import Precondition
from shardkv.core.records import Record
from shardkv.core.versions import Version, VersionClock
from shardkv.errors import NotFound, PreconditionFailed


@dataclass(frozen=True, slots=True)
class WriteResult:
    version: Version
    created: bool


def _live(current: Record | None) -> Record | None:
    return current if current is not None and not current.tombstone else None


def _check(pre: Precondition, live: Record | None) -> None:
    reason = pre.failure(live.version if live else None)
    if reason is not None:
        raise PreconditionFailed(reason)


def next_value(
    current: Record | None,
    pre: Precondition,
    versions: VersionClock,
    value: bytes,
    content_type: str,
    stored_ms: int = 0,
) -> tuple[Record, WriteResult]:
    """The record that replaces ``current`` (which may be a tombstone), and the answer."""
    live = _live(current)
    _check(pre, live)
    version = versions.mint(current.version if current else None)
    record = Record(version, value, content_type, stored_ms=stored_ms)
    return record, WriteResult(version, created=live is None)


def next_tombstone(
    key: str,
    current: Record | None,
    pre: Precondition,
    versions: VersionClock,
    stored_ms: int = 0,
) -> Record:
    """The tombstone that deletes ``current``; L{NotFound} when there is nothing live."""
    live = _live(current)
    if live is None:
        raise NotFound.key(key)
    _check(pre, live)
    return Record.deleted(versions.mint(live.version), stored_ms)
