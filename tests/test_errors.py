"""
Tests for L{shardkv.errors}: what each domain error carries besides its status
(tests/web/test_errors.py has the statuses).

Callers act on these fields, so they are part of the interface: the proxy
relays a node's own ``code``, decides from ``sent`` whether a write may have
been applied, and reports ``details`` to clients.
"""

from __future__ import annotations

import ast
from pathlib import Path

import shardkv.errors
from shardkv.errors import (
    BadReplicaAnswer,
    InvalidChange,
    InvalidMap,
    InvalidRequest,
    MapConflict,
    NodeBusy,
    NodeHasNewerMap,
    NodeTimeout,
    NodeUnreachable,
    NotFound,
    QuorumUnavailable,
    ReplicaRefused,
    StaleEpoch,
    TooFewMembers,
    ValueTooLarge,
)


def test_invalid_request_may_name_its_own_code() -> None:
    """A code given to one error changes that error only, not its class."""
    assert InvalidRequest("bad").code == "bad_request"
    assert InvalidRequest("bad", "invalid_quorum").code == "invalid_quorum"
    assert InvalidRequest.code == "bad_request"
    assert ValueTooLarge("big").code == "payload_too_large"
    assert ValueTooLarge("big", "value_too_large").code == "value_too_large"
    assert isinstance(InvalidRequest("bad"), ValueError)


def test_not_found_for_a_key() -> None:
    error = NotFound.key("a/b")
    assert (error.code, error.message, str(error)) == (
        "not_found",
        "no value for key 'a/b'",
        "no value for key 'a/b'",
    )
    assert NotFound("corrupt", "corrupt_record").code == "corrupt_record"


def test_details_are_kept_apart_from_the_message() -> None:
    error = QuorumUnavailable("too few", needed=2, answered=1, outcome="unknown")
    assert (error.message, error.details) == (
        "too few",
        {"needed": 2, "answered": 1, "outcome": "unknown"},
    )


def test_replica_call_failures_say_whether_they_were_sent() -> None:
    """
    ``sent`` is what lets the proxy call a failed write "not applied": only
    a refusal before sending, a busy queue or a timeout while still queued.
    """
    refused = NodeUnreachable("n1", "connection refused", sent=False)
    assert (refused.node, refused.reason, refused.sent) == ("n1", "connection refused", False)
    assert refused.message == "node n1 is unreachable: connection refused"
    timeout = NodeTimeout("n1", 2.5)
    assert (timeout.sent, timeout.seconds, timeout.message) == (
        True,
        2.5,
        "node n1 did not answer within 2.5 s",
    )
    assert NodeTimeout("n1", 2.0, sent=False).sent is False
    busy = NodeBusy("n1", 64)
    assert (busy.sent, busy.queued, busy.code) == (False, 64, "node_busy")
    assert BadReplicaAnswer("n1", "nonsense").code == "bad_gateway"


def test_a_refusal_carries_the_nodes_code() -> None:
    error = ReplicaRefused("n1", "insufficient_storage", "disk full")
    assert (error.node, error.code, error.message) == (
        "n1",
        "insufficient_storage",
        "node n1: disk full",
    )
    assert ReplicaRefused.code == "node_failed"


def test_map_errors_are_requests_or_conflicts() -> None:
    """
    Malformed maps and changes are bad input (a ValueError a caller may
    catch as such); every refusal over the state of the map is a
    MapConflict, so a proposer can give up on all of them alike.
    """
    assert isinstance(InvalidMap("bad"), InvalidRequest)
    assert InvalidChange("bad").code == "invalid_change"
    assert isinstance(TooFewMembers("few"), MapConflict)
    stale = StaleEpoch("old", epoch=4, map={"epoch": 4})
    assert (stale.code, stale.details) == ("stale_epoch", {"epoch": 4, "map": {"epoch": 4}})


def test_a_node_with_a_newer_map_refused_before_applying() -> None:
    """The proxy may retry at the new epoch: nothing was applied (``sent`` is False)."""
    error = NodeHasNewerMap("n1", "epoch 3 is older than 4", {"epoch": 4})
    assert (error.node, error.code, error.map, error.sent) == (
        "n1",
        "stale_epoch",
        {"epoch": 4},
        False,
    )
    assert isinstance(error, ReplicaRefused)


def test_errors_import_nothing_of_shardkv() -> None:
    """Every layer imports this module, so it must import no other part of shardkv."""
    tree = ast.parse(Path(shardkv.errors.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert not {name for name in imported if name.startswith(("shardkv", "."))}, imported
