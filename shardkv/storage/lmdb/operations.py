"""One write for the committer thread, its outcome, and the committer's counters.

Kept apart from L{shardkv.storage.lmdb.committer} so that the engine can build
operations without the thread's machinery. Outcomes cross from the committer
thread to the reactor thread as plain values (a result, or L{Failed}); only
L{fire}, on the reactor thread, turns them into Deferred results.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import lmdb
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


@dataclass(eq=False)
class WriteOp(Generic[T]):
    """One write: ``apply(txn, db)`` runs in the committer thread inside the group's
    transaction, against the named sub-database, and returns the op's result.

    ``apply`` must not block and must only touch LMDB through ``txn``.
    ``size`` (bytes written, roughly) bounds a group's size.
    """

    db: str
    apply: Callable[[lmdb.Transaction[bytes], lmdb._Database], T]
    size: int = 0
    deferred: Deferred[T] = field(default_factory=Deferred)


@dataclass
class Failed:
    """The outcome of an operation that failed with ``error``."""

    error: Exception


class ItemError(Exception):
    """Operation number ``index`` of a group failed on its own; the rest may commit."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(str(error))
        self.index = index
        self.error = error


@dataclass
class CommitStats:
    """Counters written by the committer thread and read by anyone (no lock: each
    field is one atomic store, and approximate reads are fine for health)."""

    commits: int = 0
    committed_ops: int = 0
    commit_calls: int = 0
    failed_commits: int = 0
    last_commit_ms: float = 0.0
    total_commit_ms: float = 0.0
    largest_batch: int = 0
    syncs: int = 0
    map_grows: int = 0
    last_sync_wall: float = 0.0

    @property
    def average_batch(self) -> float:
        return self.committed_ops / self.commits if self.commits else 0.0


def fire(ops: list[WriteOp[Any]], outcomes: list[object]) -> None:
    for op, outcome in zip(ops, outcomes, strict=True):
        if isinstance(outcome, Failed):
            op.deferred.errback(Failure(outcome.error))
        else:
            op.deferred.callback(outcome)
