"""
In-memory HTTP tests of a storage node's Klein app, L{NodeApp}.

The data API itself is L{DataAPIContract}, run here against a node; the rest
are what only a node's routes do. Everything is synchronous: C{StubTreq}
over the Klein resource, no reactor and no sockets, so these tests run the
same under pytest and trial.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from shardkv.core.records import Record
from shardkv.core.versions import Version, VersionClock
from shardkv.node.app import NodeApp
from shardkv.node.store import NodeStore
from shardkv.replica import codec
from shardkv.storage.memory import MemoryEngine
from shardkv.testing.memory import make_node
from shardkv.web.auth import Guard
from tests.helpers import HTTP, Reply, flusher
from tests.web.contract import DataAPIContract
from tests.web.test_auth import FromPeer

NODE_ID = "127.0.0.1:8081"


def small_node(clock: MemoryReactorClock, max_value_bytes: int) -> NodeApp:
    """A memory node like C{make_node}'s, but refusing values over C{max_value_bytes}."""

    def now_ms() -> int:
        return int(clock.seconds() * 1000)

    versions = VersionClock(NODE_ID, now_ms)
    return NodeApp(NodeStore(NODE_ID, MemoryEngine(), versions, max_value_bytes, now_ms))


def node_http(case: SynchronousTestCase, node: NodeApp) -> HTTP:
    stub = StubTreq(node.app.resource())
    return HTTP(case, stub, f"http://{node.store.node_id}", flusher(stub))


class NodeDataAPITests(DataAPIContract, SynchronousTestCase):
    """The data API served directly by a node."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.node = make_node(NODE_ID, self.clock)
        self.http = node_http(self, self.node)

    def stored(self, key: str) -> Record | None:
        return self.node.store.engine.get(key)

    def limited(self, max_value_bytes: int) -> HTTP:
        self.node = small_node(self.clock, max_value_bytes)
        return node_http(self, self.node)


class NodeTests(SynchronousTestCase):
    """What only a node does: mint versions from its clock, report its health."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.node = make_node(NODE_ID, self.clock)
        self.http = node_http(self, self.node)

    def test_versions_carry_node_id_and_clock(self) -> None:
        self.clock.advance(12.345)
        reply = self.http.put("/kv/k", b"v")
        self.assertEqual(reply.json(), {"key": "k", "version": f"1-12345-{NODE_ID}"})
        record = self.node.store.engine.get("k")
        assert record is not None
        self.assertEqual(record.stored_ms, 12345)

    def test_versions_never_repeat_within_one_millisecond(self) -> None:
        seen = [
            self.http.post_json("/set", {"key": f"k{i}", "value": "v"}).json()["version"]
            for i in range(5)
        ]
        self.assertEqual(seen, [f"1-{ms}-{NODE_ID}" for ms in range(5)])

    def test_health(self) -> None:
        self.put_some(3)
        reply = self.http.get("/health")
        self.assertEqual(reply.code, 200)
        payload = reply.json()
        # Other fields (hinted handoff, for one) may be added; these must stay.
        self.assertEqual(
            {name: payload[name] for name in ("status", "role", "node", "storage")},
            {
                "status": "ok",
                "role": "node",
                "node": NODE_ID,
                "storage": {"engine": "memory", "writable": True, "keys": 3},
            },
        )

    def test_deletes_keep_a_tombstone(self) -> None:
        self.http.put("/kv/k", b"v")
        self.http.delete("/kv/k")
        record = self.node.store.engine.get("k")
        assert record is not None
        self.assertEqual((record.tombstone, record.value, record.version.counter), (True, b"", 2))

    def put_some(self, n: int) -> None:
        for i in range(n):
            self.assertEqual(self.http.put(f"/kv/k{i}", b"v").code, 201)

    def test_json_error_bodies_are_objects(self) -> None:
        """Error replies are one JSON object per line: the shape a client parses."""
        reply = self.http.get("/nope")
        self.assertTrue(reply.body.endswith(b"}\n"))
        payload: Any = json.loads(reply.body)
        self.assertEqual(payload, {"error": "no_route", "message": "no route for /nope"})


# -- who may call a node (issue 12, section 1) -------------------------------------

TOKEN = "cluster-token-0123456789abcdef"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
FORGED = {"X-Shardkv-Version": "1000000-1-attacker", "Content-Type": "text/plain"}
OUTSIDE = IPv4Address("TCP", "192.0.2.7", 40000)


def guarded_http(case: SynchronousTestCase, node: NodeApp, peer: IPv4Address | None = None) -> HTTP:
    """The node as a process serves it: every request through its guard."""
    resource: Resource = node.resource()
    if peer is not None:
        resource = FromPeer(resource, peer)
    stub = StubTreq(resource)
    return HTTP(case, stub, f"http://{node.store.node_id}", flusher(stub))


def token_node(clock: MemoryReactorClock, members: list[str] | None = None) -> NodeApp:
    node = make_node(NODE_ID, clock, members=members)
    return NodeApp(node.store, Guard(TOKEN))


class NodeTokenTests(SynchronousTestCase):
    """With a cluster token, every node route but /health needs it."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.node = token_node(self.clock, [NODE_ID, "127.0.0.1:8082"])
        self.http = guarded_http(self, self.node)

    def test_forged_version_without_the_token_is_refused(self) -> None:
        """
        The issue's first attack: a PUT of a forged, huge version (or a
        tombstone) to /replica/kv is a 401 without the token, a 403 with a
        wrong one, and stores nothing; with the token it is stored.
        """
        tombstone = {**FORGED, "X-Shardkv-Tombstone": "1"}
        for headers in [FORGED, tombstone]:
            reply = self.http.put("/replica/kv/victim", b"evil", headers)
            self.assertEqual(reply.error(), (401, "unauthorized"))
            self.assertEqual(reply.header("www-authenticate"), 'Bearer realm="shardkv"')
            wrong = {**headers, "Authorization": "Bearer wrong-token-wrong-token"}
            reply = self.http.put("/replica/kv/victim", b"evil", wrong)
            self.assertEqual(reply.error(), (403, "forbidden"))
            self.assertNotIn(b"wrong-token", reply.body)
        self.assertIsNone(self.node.store.engine.get("victim"))
        reply = self.http.put("/replica/kv/victim", b"ok", {**FORGED, **BEARER})
        self.assertEqual(reply.code, 200)
        self.assertIsNotNone(self.node.store.engine.get("victim"))

    def test_every_route_but_health_needs_the_token(self) -> None:
        calls = [
            ("GET", "/replica/kv/k", None),
            ("POST", "/replica/batch", b'{"ops": []}'),
            ("PUT", "/replica/members", b'{"members": []}'),
            ("PUT", "/kv/k", b"v"),
            ("GET", "/kv/k", None),
            ("DELETE", "/kv/k", None),
            ("POST", "/set", b'{"key": "k", "value": "v"}'),
            ("GET", "/get?key=k", None),
            ("POST", "/delete", b'{"key": "k"}'),
            ("GET", "/no-such-route", None),
        ]
        for method, path, body in calls:
            reply = self.http.request(method, path, body)
            self.assertEqual(reply.error(), (401, "unauthorized"), (method, path))
            self.assertNotIn(TOKEN.encode(), reply.body)
        self.assertIsNone(self.node.store.engine.get("k"))
        self.assertEqual(self.node.store.members.as_json(), [NODE_ID, "127.0.0.1:8082"])
        self.assertEqual(self.http.put("/kv/k", b"v", BEARER).code, 201)
        health = self.http.get("/health")
        self.assertEqual(health.code, 200)
        self.assertNotIn(TOKEN.encode(), health.body)


class NodeProtectedModeTests(SynchronousTestCase):
    """With no token, node routes answer loopback peers only."""

    def test_outside_peers_are_refused(self) -> None:
        clock = MemoryReactorClock()
        node = make_node(NODE_ID, clock, members=[NODE_ID])
        outside = guarded_http(self, node, OUTSIDE)
        reply = outside.put("/replica/kv/victim", b"evil", FORGED)
        self.assertEqual(reply.error(), (403, "forbidden"))
        self.assertIn("protected mode", reply.json()["message"])
        self.assertEqual(outside.put("/kv/k", b"v").error(), (403, "forbidden"))
        self.assertEqual(outside.get("/health").code, 200)
        self.assertIsNone(node.store.engine.get("victim"))
        local = guarded_http(self, node)
        self.assertEqual(local.put("/replica/kv/victim", b"v", FORGED).code, 200)


class NodeMembersTests(SynchronousTestCase):
    """PUT /replica/members and hint_for: hints only for members."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.node = make_node(NODE_ID, self.clock)
        self.http = guarded_http(self, self.node)
        self.version = {"X-Shardkv-Version": "5-5-x", "Content-Type": "text/plain"}

    def hint(self, target: str) -> Reply:
        path = "/replica/kv/s?hint_for=" + quote(target, safe="")
        return self.http.put(path, b"payload", self.version)

    def test_until_told_every_hint_is_refused(self) -> None:
        self.assertIsNone(self.http.get("/health").json()["members"])
        for target in ["127.0.0.1:8082", "127.0.0.1:20050", "0"]:
            reply = self.hint(target)
            self.assertEqual(reply.error(), (400, "invalid_hint_target"), target)
            self.assertIn("not been told", reply.json()["message"])
        self.assertEqual(self.node.store.engine.hint_counts(), {})

    def test_members_are_pushed_and_shown_in_health(self) -> None:
        reply = self.http.put(
            "/replica/members", json.dumps({"members": ["127.0.0.1:8083", NODE_ID]}).encode()
        )
        self.assertEqual(reply.json(), {"members": [NODE_ID, "127.0.0.1:8083"]})
        self.assertEqual(self.http.get("/health").json()["members"], [NODE_ID, "127.0.0.1:8083"])
        self.assertEqual(self.hint("127.0.0.1:8083").json(), {"applied": True})
        for target in ["127.0.0.1:20050", "0", "127.0.0.1:8082"]:
            self.assertEqual(self.hint(target).error(), (400, "invalid_hint_target"), target)
        self.assertEqual(self.node.store.engine.hint_counts(), {"127.0.0.1:8083": 1})
        # A new list replaces the old one whole.
        self.http.put("/replica/members", b'{"members": ["127.0.0.1:8082"]}')
        self.assertEqual(self.hint("127.0.0.1:8083").error(), (400, "invalid_hint_target"))
        self.assertEqual(self.hint("127.0.0.1:8082").code, 200)

    def test_bad_member_lists(self) -> None:
        for body in [
            b"",
            b"[]",
            b'{"members": "127.0.0.1:8082"}',
            b'{"members": [1]}',
            b'{"members": [""]}',
            b'{"members": ["a\\nb"]}',
            json.dumps({"members": ["x" * 256]}).encode(),
            json.dumps({"members": [f"h:{i}" for i in range(1025)]}).encode(),
            b"[" * 5000,
        ]:
            reply = self.http.put("/replica/members", body)
            self.assertEqual(reply.error(), (400, "invalid_members"), body[:40])
        self.assertIsNone(self.node.store.members.as_json())

    def test_batch_refuses_non_member_hints_per_operation(self) -> None:
        self.http.put("/replica/members", b'{"members": ["127.0.0.1:8082"]}')
        record = Record(Version.parse("5-5-x"), b"v", "text/plain")
        ops = [
            codec.PutOp("a", record, "127.0.0.1:8082"),
            codec.PutOp("b", record, "127.0.0.1:20050"),
            codec.PutOp("c", record),
        ]
        reply = self.http.post_raw("/replica/batch", codec.encode_request(ops))
        results = codec.decode_response(reply.body, 3)
        self.assertEqual([r.status for r in results], [200, 400, 200])
        self.assertEqual(results[1].error, "invalid_hint_target")
        self.assertEqual(self.node.store.engine.hint_counts(), {"127.0.0.1:8082": 1})
