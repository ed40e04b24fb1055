"""
Tests of a node's member list, L{shardkv.node.members}: what it holds, the
pushed body it accepts, and the replica client that calls members only.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.clustermap import Member, MemberState, Move, Phase, bootstrap
from shardkv.core.records import Record
from shardkv.core.versions import Version
from shardkv.errors import InvalidRequest, NodeUnreachable
from shardkv.node.handoff import HintHandoff
from shardkv.node.mapstore import MapStore
from shardkv.node.members import MemberOnlyClient, Members
from shardkv.replica.protocol import EPOCH_HEADER, members_body, parse_members
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


# -- following the learned map (issue 11) ------------------------------------------

CLUSTER = "9f2c00aa11bb22cc"


def test_members_follow_the_learned_map_and_ignore_pushes() -> None:
    store = MapStore("a:1", MemoryEngine())
    members = Members(["x:9"])
    members.follow(store)
    assert not members.from_map
    assert members.replace(["y:9"]) is True
    store.learn(bootstrap(CLUSTER, {"a:1": 1.0, "b:2": 1.0}, 2, 1, 1, 16))
    assert members.from_map
    assert members.as_json() == ["a:1", "b:2"]
    assert members.replace(["y:9"]) is False, "a pushed list no longer applies"
    assert members.as_json() == ["a:1", "b:2"]


def test_members_of_a_move_include_the_leaving_not_the_removed() -> None:
    m = bootstrap(CLUSTER, {"a:1": 1.0, "b:2": 1.0, "c:3": 1.0}, 2, 1, 1, 16)
    leaving = dataclasses.replace(
        m,
        epoch=2,
        members=(
            Member("a:1", "a:1", 1.0, MemberState.ACTIVE),
            Member("b:2", "b:2", 1.0, MemberState.ACTIVE),
            Member("c:3", "c:3", 1.0, MemberState.LEAVING),
            Member("d:4", "d:4", 1.0, MemberState.REMOVED),
        ),
        move=Move(Phase.COPYING, {"a:1": 1.0, "b:2": 1.0, "c:3": 1.0}),
    )
    members = Members()
    members.learned(leaving)
    assert members.as_json() == ["a:1", "b:2", "c:3"]
    members.learned(m)
    assert members.as_json() == ["a:1", "b:2", "c:3"], "an older map changes nothing"


def test_a_map_loaded_at_start_sets_the_members() -> None:
    engine = MemoryEngine()
    MapStore("a:1", engine).learn(bootstrap(CLUSTER, {"a:1": 1.0}, 1, 1, 1, 16))
    store = MapStore("a:1", engine)
    members = Members()
    members.follow(store)
    assert not members.known
    store.load()
    assert members.as_json() == ["a:1"]


class EpochHeaderTests(SynchronousTestCase):
    """The node's own calls carry its learned epoch, so a peer with a newer map refuses them."""

    def test_the_learned_epoch_is_sent(self) -> None:
        clock = MemoryReactorClock()
        sent: list[dict[bytes, bytes]] = []

        class Recorder:
            def request(self, method: str, url: bytes, **kwargs: Any) -> object:
                sent.append(dict(kwargs.get("headers") or {}))
                return Deferred()

        epoch: list[int | None] = [None]
        members = Members(["127.0.0.1:8082"])
        client = MemberOnlyClient(
            members, Recorder(), clock, 1.0, pipeline_depth=0, epoch=lambda: epoch[0]
        )
        record = Record(Version(1, 1, "p"), b"v", "text/plain")
        client.replica_put("127.0.0.1:8082", "k", record)
        epoch[0] = 7
        client.replica_put("127.0.0.1:8082", "k", record)
        client.replica_put("127.0.0.1:8082", "k", record, epoch=9)
        self.assertEqual(
            [h.get(EPOCH_HEADER) for h in sent], [None, b"7", b"9"], "an explicit epoch wins"
        )
