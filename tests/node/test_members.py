"""
Tests of a node's member list, L{shardkv.node.members}: what it holds, the
pushed body it accepts, and the replica client that calls members only.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.records import Record
from shardkv.core.versions import Version
from shardkv.errors import InvalidRequest, NodeUnreachable
from shardkv.node.handoff import HintHandoff
from shardkv.node.members import MemberOnlyClient, Members
from shardkv.replica.protocol import members_body, parse_members
from shardkv.storage.memory import MemoryEngine


def test_unknown_until_told() -> None:
    members = Members()
    assert not members.known
    assert "127.0.0.1:8081" not in members
    assert members.as_json() is None
    members.replace(["b:2", "a:1", "b:2"])
    assert members.known
    assert "a:1" in members
    assert "c:3" not in members
    assert members.as_json() == ["a:1", "b:2"]


def test_an_empty_list_is_known_and_holds_nobody() -> None:
    members = Members([])
    assert members.known
    assert members.as_json() == []
    assert "" not in members


def test_body_round_trip() -> None:
    assert parse_members(members_body(["b:2", "a:1"])) == ["a:1", "b:2"]
    assert json.loads(members_body([])) == {"members": []}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"null",
        b"{}",
        b'{"members": {}}',
        b'{"members": [null]}',
        b'{"members": ["\\u00e9:1"]}',
        b'{"members": ["a\\tb"]}',
        b"[" * 3000 + b"]" * 3000,
        b"\xff",
    ],
)
def test_bad_bodies(body: bytes) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_members(body)
    assert caught.value.code == "invalid_members"


class MemberOnlyClientTests(SynchronousTestCase):
    """The handoff's client sends nothing to a node that is not a member."""

    def test_non_members_get_nothing(self) -> None:
        clock = MemoryReactorClock()
        sent: list[bytes] = []

        class Recorder:
            def request(self, method: str, url: bytes, **kwargs: object) -> object:
                sent.append(url)
                return Deferred()

        members = Members(["127.0.0.1:8082"])
        client = MemberOnlyClient(members, Recorder(), clock, 1.0, pipeline_depth=0)
        record = Record(Version(1, 1, "p"), b"v", "text/plain")
        failure = self.failureResultOf(client.replica_put("127.0.0.1:20050", "k", record))
        failure.trap(NodeUnreachable)
        self.assertFalse(failure.value.sent)
        self.assertEqual(sent, [])
        client.replica_put("127.0.0.1:8082", "k", record)
        self.assertEqual(sent, [b"http://127.0.0.1:8082/replica/kv/k"])

    def test_handoff_keeps_hints_for_non_members(self) -> None:
        """
        A hint stored before the node knew the members (the issue's made-up
        target "0", or an attacker's address) is never sent, and kept.
        """
        clock = MemoryReactorClock()
        engine = MemoryEngine()
        record = Record(Version(1, 1, "p"), b"v", "text/plain", stored_ms=1)
        for target in ["0", "127.0.0.1:20050"]:
            self.successResultOf(engine.put_hint(target, "k", record))

        class Refuse:
            def request(self, method: str, url: bytes, **kwargs: object) -> object:
                raise AssertionError(f"sent {method} {url!r}")

        client = MemberOnlyClient(Members(["127.0.0.1:8082"]), Refuse(), clock, 1.0)
        handoff = HintHandoff(engine, client)
        self.successResultOf(Deferred.fromCoroutine(handoff.deliver_all()))
        self.assertEqual(engine.hint_counts(), {"0": 1, "127.0.0.1:20050": 1})
        self.assertEqual(handoff.delivered, 0)
