"""The domain's errors: what went wrong, in terms a caller can act on.

Every layer below the web raises these and nothing else for an expected
failure. Each carries a stable machine-readable ``code``, a ``message`` for
people, and ``details`` that a client may use (how many replicas answered,
whether a write may have been applied). None of them knows HTTP: the one
table that turns them into statuses is L{shardkv.web.errors}.

This module imports nothing of shardkv, so every layer may import it.
"""

from __future__ import annotations

from typing import Any


class ShardkvError(Exception):
    """Base of every domain error."""

    code = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details


# -- requests ------------------------------------------------------------------


class InvalidRequest(ShardkvError, ValueError):
    """Input that no retry can fix; ``code`` names what was wrong with it."""

    code = "bad_request"

    def __init__(self, message: str, code: str | None = None, **details: Any) -> None:
        super().__init__(message, **details)
        if code is not None:
            self.code = code


class ValueTooLarge(InvalidRequest):
    code = "payload_too_large"


class NotFound(ShardkvError):
    """The key holds no live value (or, on the replica routes, no usable record)."""

    code = "not_found"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @classmethod
    def key(cls, key: str) -> NotFound:
        return cls(f"no value for key {key!r}")


class PreconditionFailed(ShardkvError):
    """An If-Match / If-None-Match (or the seed API's ``version``) did not hold."""

    code = "precondition_failed"


# -- access ----------------------------------------------------------------------


class Unauthorized(ShardkvError):
    """The request carried no usable credentials (no token, or not a bearer token)."""

    code = "unauthorized"


class Forbidden(ShardkvError):
    """The credentials were wrong, or the caller may not use this route at all."""

    code = "forbidden"


# -- quorums -------------------------------------------------------------------


class QuorumUnavailable(ShardkvError):
    """Too few replicas answered. ``details`` say how many, and for a write its
    ``outcome``: ``not_applied`` (definitely nowhere) or ``unknown``."""

    code = "insufficient_replicas"


class QuorumTimeout(QuorumUnavailable):
    """The quorum was still possible but replicas did not answer in time."""

    code = "replica_timeout"


class Overloaded(QuorumUnavailable):
    """Too few replicas had room for the request (each was busy, not down), so
    nothing was sent anywhere; a retry after ``retry_after`` seconds may succeed."""

    code = "overloaded"
    retry_after = 1


# -- calls to a node -------------------------------------------------------------


class ReplicaCallFailed(ShardkvError):
    """A call to node ``node`` failed. ``sent`` says whether it may have been applied."""

    code = "node_failed"

    def __init__(self, node: str, message: str, sent: bool = False) -> None:
        super().__init__(message)
        self.node = node
        self.sent = sent


class NodeUnreachable(ReplicaCallFailed):
    """No answer from the node. With ``sent=False`` the request never left
    (connection refused); with ``sent=True`` the connection broke after the
    request may have been delivered."""

    code = "node_unreachable"

    def __init__(self, node: str, reason: str, sent: bool) -> None:
        super().__init__(node, f"node {node} is unreachable: {reason}", sent)
        self.reason = reason


class NodeTimeout(ReplicaCallFailed):
    """No answer in time. With ``sent=False`` it was still queued here and never left."""

    code = "node_timeout"

    def __init__(self, node: str, seconds: float, sent: bool = True) -> None:
        super().__init__(node, f"node {node} did not answer within {seconds:g} s", sent)
        self.seconds = seconds


class NodeBusy(ReplicaCallFailed):
    """Too much is already queued for the node: nothing was sent, and the node
    is not thought to be down."""

    code = "node_busy"

    def __init__(self, node: str, queued: int, what: str = "operations queued") -> None:
        super().__init__(node, f"node {node} already has {queued} {what}; try again later")
        self.queued = queued


class ReplicaRefused(ReplicaCallFailed):
    """The node answered, with an error of its own (``code`` is the node's)."""

    def __init__(self, node: str, code: str, message: str) -> None:
        super().__init__(node, f"node {node}: {message}")
        self.code = code


class BadReplicaAnswer(ReplicaCallFailed):
    """The node answered something that does not follow the replica protocol."""

    code = "bad_gateway"


class ClientStopped(RuntimeError):
    """A call was made on an HTTP client whose service has stopped (the process
    is shutting down): nothing was sent. The replica client reports it as an
    unreachable node, so that work still running at shutdown ends quietly."""


# -- storage ---------------------------------------------------------------------


class StorageStartupError(ShardkvError):
    """The engine cannot open its data directory; the message says which and why."""

    code = "storage_startup"


class StorageError(ShardkvError):
    """A write the engine could not make durable."""

    code = "storage_unavailable"


class StorageFull(StorageError):
    """No room: the disk or the engine's map is full. Writes resume when there is room."""

    code = "insufficient_storage"


class StorageFailed(StorageError):
    """The engine failed a commit (for example fsync returned EIO) and stopped taking writes.

    It never retries: after a failed fsync the kernel may have dropped the
    dirty pages, so a retry that succeeds can still have lost data
    (PostgreSQL's "fsyncgate").
    """

    code = "storage_failed"


class InvalidHintTarget(StorageError):
    """A hint target (node name) that cannot be stored."""

    code = "invalid_hint_target"


# -- the cluster map and membership changes --------------------------------------


class InvalidMap(InvalidRequest):
    """A cluster map (from disk, the wire or an operator) that does not follow the format."""

    code = "invalid_map"


class InvalidChange(InvalidRequest):
    """A membership change that is malformed or changes nothing."""

    code = "invalid_change"


class UnknownMember(ShardkvError):
    """A change or lookup named a member id the map does not hold (or holds as removed)."""

    code = "unknown_member"


class MapConflict(ShardkvError):
    """The map is not in the state the request assumed: another change won, or
    this one does not fit the map as it now is."""

    code = "map_conflict"


class MoveInProgress(MapConflict):
    """A new change was asked for while a move still runs; commit or abort that first."""

    code = "move_in_progress"


class TooFewMembers(MapConflict):
    """The change would leave fewer members than the replication factor N."""

    code = "too_few_members"


class NoMove(MapConflict):
    """Asked to advance or abort a move, but none is running."""

    code = "no_move"


class TooLateToAbort(MapConflict):
    """The move is already deleting the old copies (cleanup), so it can only finish."""

    code = "too_late_to_abort"


class NoPlan(MapConflict):
    """A commit with no staged plan (or a plan made against an older epoch)."""

    code = "no_plan"


class ForeignCluster(MapConflict):
    """The node already belongs to another cluster (it holds a map of another cluster_id)."""

    code = "foreign_cluster"


class MemberUnreachable(MapConflict):
    """A member a change needs could not be reached, so nothing was installed."""

    code = "member_unreachable"


class StaleEpoch(MapConflict):
    """The request was planned at an older epoch than the node has learned.

    ``details`` carry the node's ``epoch`` and its ``map`` (JSON), so the
    caller can switch to it and retry.
    """

    code = "stale_epoch"


class MapUnavailable(ShardkvError):
    """No majority of the map's acceptors could be reached, so the map cannot change now."""

    code = "map_unavailable"


class NodeHasNewerMap(ReplicaRefused):
    """A node refused a replica call with ``stale_epoch``: it holds the newer ``map``.

    Raised on the proxy side by the replica client. The node refused before
    applying anything, so ``sent`` is False and the call may be retried at
    the new epoch.
    """

    def __init__(self, node: str, message: str, map: dict[str, Any]) -> None:
        super().__init__(node, "stale_epoch", message)
        self.map = map
        self.sent = False
