"""
Tests for L{shardkv.web.errors}: the one table from domain errors to HTTP
statuses, and the JSON every error is answered with.

Clients act on the status (retry a 503, fix a 400, read again after a 412),
so each domain error must map to the status that says what it means, and a
more specific error must not be swallowed by its base class's status.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from typing import Any

import pytest
from klein import Klein
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IRequest

import shardkv
from shardkv.core.keys import InvalidKey, KeyTooLong
from shardkv.core.records import CorruptRecord
from shardkv.errors import (
    BadReplicaAnswer,
    Forbidden,
    ForeignCluster,
    InvalidChange,
    InvalidHintTarget,
    InvalidMap,
    InvalidRequest,
    MapConflict,
    MapUnavailable,
    MemberUnreachable,
    MoveInProgress,
    NodeBusy,
    NodeHasNewerMap,
    NodeTimeout,
    NodeUnreachable,
    NoMove,
    NoPlan,
    NotFound,
    Overloaded,
    PreconditionFailed,
    QuorumTimeout,
    QuorumUnavailable,
    ReplicaCallFailed,
    ReplicaRefused,
    ShardkvError,
    StaleEpoch,
    StorageError,
    StorageFailed,
    StorageFull,
    StorageStartupError,
    TooFewMembers,
    TooLateToAbort,
    Unauthorized,
    UnknownMember,
    ValueTooLarge,
)
from shardkv.web.errors import STATUS, error_body, install_error_handlers, status_for
from tests.helpers import HTTP, flusher

EXPECTED: dict[type[ShardkvError], int] = {
    InvalidRequest: 400,
    InvalidKey: 400,
    KeyTooLong: 414,
    ValueTooLarge: 413,
    NotFound: 404,
    PreconditionFailed: 412,
    QuorumUnavailable: 503,
    QuorumTimeout: 504,
    Overloaded: 503,
    CorruptRecord: 503,
    StorageError: 503,
    StorageFull: 507,
    StorageFailed: 503,
    InvalidHintTarget: 400,
    ReplicaCallFailed: 502,
    NodeUnreachable: 502,
    NodeTimeout: 502,
    NodeBusy: 502,
    ReplicaRefused: 502,
    BadReplicaAnswer: 502,
    Unauthorized: 401,
    Forbidden: 403,
    # Raised while the node starts, before it serves anything.
    StorageStartupError: 500,
    # The cluster map and membership changes.
    InvalidMap: 400,
    InvalidChange: 400,
    UnknownMember: 404,
    MapConflict: 409,
    MoveInProgress: 409,
    TooFewMembers: 409,
    NoMove: 409,
    TooLateToAbort: 409,
    NoPlan: 409,
    ForeignCluster: 409,
    MemberUnreachable: 409,
    StaleEpoch: 409,
    MapUnavailable: 503,
    # Proxy-side, like every refusal a node answers with.
    NodeHasNewerMap: 502,
}
"""The status every domain error class is answered with, decided one by one."""


def subclasses(cls: type[ShardkvError]) -> Iterator[type[ShardkvError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from subclasses(sub)


def every_domain_error() -> set[type[ShardkvError]]:
    """Every ShardkvError subclass that shardkv defines, once all its modules are imported."""
    for module in pkgutil.walk_packages(shardkv.__path__, "shardkv."):
        importlib.import_module(module.name)
    return {cls for cls in subclasses(ShardkvError) if cls.__module__.startswith("shardkv.")}


def make(cls: type[ShardkvError]) -> ShardkvError:
    """An instance of ``cls``, whatever its constructor wants."""
    if issubclass(cls, NodeUnreachable):
        return cls("n1", "refused", sent=False)
    if issubclass(cls, NodeTimeout):
        return cls("n1", 2.0)
    if issubclass(cls, NodeBusy):
        return cls("n1", 10)
    if issubclass(cls, NodeHasNewerMap):
        return cls("n1", "epoch 3 is older than 4", {"epoch": 4})
    if issubclass(cls, ReplicaRefused):
        return cls("n1", "storage_failed", "fsync failed")
    if issubclass(cls, ReplicaCallFailed):
        return cls("n1", "failed")
    return cls("went wrong")


def test_every_domain_error_has_a_decided_status() -> None:
    """
    A new domain error class must be given a status on purpose: one that
    only inherits a status by accident fails here until EXPECTED says so.
    """
    assert every_domain_error() == set(EXPECTED)


BY_NAME = sorted(EXPECTED, key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", BY_NAME, ids=[c.__name__ for c in BY_NAME])
def test_status_for(cls: type[ShardkvError]) -> None:
    assert status_for(make(cls)) == EXPECTED[cls]


@pytest.mark.parametrize(
    ("specific", "general"),
    [
        (QuorumTimeout, QuorumUnavailable),
        (KeyTooLong, InvalidKey),
        (StorageFull, StorageError),
        (ValueTooLarge, InvalidRequest),
        (InvalidHintTarget, StorageError),
    ],
)
def test_the_most_specific_class_wins(
    specific: type[ShardkvError], general: type[ShardkvError]
) -> None:
    """
    A subclass listed in STATUS gets its own status, not its base class's:
    a timeout (504) is not just "too few replicas" (503), a full disk (507)
    not just a storage failure (503), a key too long (414) not just bad.
    """
    assert issubclass(specific, general)
    assert status_for(make(specific)) == STATUS[specific] != STATUS[general]


class Surprise(ShardkvError):
    """A domain error the table does not list."""

    code = "surprise"


def test_an_unlisted_domain_error_is_a_500() -> None:
    assert status_for(Surprise("unexpected")) == 500
    assert status_for(ShardkvError("bare")) == 500


def test_error_body_has_code_message_and_details() -> None:
    error = QuorumUnavailable("2 of 3 replicas needed, 1 answered", needed=2, answered=1)
    assert error_body(error) == {
        "error": "insufficient_replicas",
        "message": "2 of 3 replicas needed, 1 answered",
        "needed": 2,
        "answered": 1,
    }
    assert error_body(InvalidRequest("r is 0", "invalid_quorum")) == {
        "error": "invalid_quorum",
        "message": "r is 0",
    }


def test_a_stale_epoch_body_carries_the_newer_map() -> None:
    """
    A node that refuses a call planned at an older epoch answers its own
    epoch and map beside the code, so the caller can switch without asking.
    """
    newer = {"cluster_id": "c1", "epoch": 4}
    error = StaleEpoch("epoch 3 is older than 4", epoch=4, map=newer)
    assert status_for(error) == 409
    assert error_body(error) == {
        "error": "stale_epoch",
        "message": "epoch 3 is older than 4",
        "epoch": 4,
        "map": newer,
    }


RAISED: dict[str, Exception] = {
    "timeout": QuorumTimeout("replicas did not answer in time", outcome="unknown", acks=1),
    "long": KeyTooLong("the key is 2000 bytes; the limit is 1024"),
    "full": StorageFull("no space left on device"),
    "overloaded": Overloaded("every replica is busy", outcome="not_applied"),
    "surprise": Surprise("nobody expected this"),
    "bug": ZeroDivisionError("division by zero"),
    "cancelled": CancelledError(),
}


class Tiny:
    """An app whose only route raises the error it is named after."""

    app = Klein()

    @app.route("/raise/<name>", methods=["GET"])
    def raise_(self, request: IRequest, name: str) -> Any:
        raise RAISED[name]

    install_error_handlers(app)


class ErrorHandlerTests(SynchronousTestCase):
    """The handlers, through a real Klein app: every error is JSON with its status."""

    def setUp(self) -> None:
        stub = StubTreq(Tiny().app.resource())
        self.http = HTTP(self, stub, "http://node", flusher(stub))

    def test_a_domain_error_renders_with_its_status_and_details(self) -> None:
        reply = self.http.get("/raise/timeout")
        self.assertEqual(reply.code, 504)
        self.assertEqual(
            reply.json(),
            {
                "error": "replica_timeout",
                "message": "replicas did not answer in time",
                "outcome": "unknown",
                "acks": 1,
            },
        )
        self.assertEqual(self.http.get("/raise/long").error(), (414, "key_too_long"))
        self.assertEqual(self.http.get("/raise/full").error(), (507, "insufficient_storage"))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_overloaded_says_when_to_retry(self) -> None:
        """
        Overloaded is a 503 with Retry-After, so a client backs off for that
        long; other errors carry no Retry-After.
        """
        reply = self.http.get("/raise/overloaded")
        self.assertEqual(reply.error(), (503, "overloaded"))
        self.assertEqual(reply.header("retry-after"), "1")
        self.assertEqual(reply.json()["outcome"], "not_applied")
        self.assertIsNone(self.http.get("/raise/full").header("retry-after"))

    def test_an_unlisted_domain_error_is_a_logged_500_with_its_code(self) -> None:
        """The client still learns the code; the operator finds the failure in the log."""
        reply = self.http.get("/raise/surprise")
        self.assertEqual(reply.code, 500)
        self.assertEqual(reply.json(), {"error": "surprise", "message": "nobody expected this"})
        self.assertEqual(len(self.flushLoggedErrors(Surprise)), 1)

    def test_a_bug_is_a_500_that_tells_nothing(self) -> None:
        """An unexpected exception is logged and answered without its text."""
        reply = self.http.get("/raise/bug")
        self.assertEqual(reply.code, 500)
        self.assertEqual(
            reply.json(), {"error": "internal", "message": "internal error; see the server log"}
        )
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_a_cancelled_request_is_499_and_not_logged(self) -> None:
        self.assertEqual(self.http.get("/raise/cancelled").error(), (499, "cancelled"))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_no_route_and_wrong_method_are_json(self) -> None:
        self.assertEqual(self.http.get("/nowhere").error(), (404, "no_route"))
        reply = self.http.delete("/raise/timeout")
        self.assertEqual(reply.error(), (405, "method_not_allowed"))
        self.assertIn("GET", reply.header("allow") or "")
