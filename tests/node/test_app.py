"""
In-memory HTTP tests of a storage node's Klein app, L{NodeApp}.

The data API itself is L{DataAPIContract}, run here against a node; the rest
are what only a node's routes do. Everything is synchronous: C{StubTreq}
over the Klein resource, no reactor and no sockets, so these tests run the
same under pytest and trial.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any
from urllib.parse import quote

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from shardkv.core.clustermap import bootstrap
from shardkv.core.records import Record
from shardkv.core.versions import Version, VersionClock
from shardkv.node.app import NodeApp
from shardkv.node.store import NodeStore
from shardkv.replica import codec
from shardkv.replica.protocol import FENCE_GRACE
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


# -- the cluster map: acceptor, learner and epoch fence (issue 11) -------------------

CLUSTER = "9f2c00aa11bb22cc"
PEERS = {NODE_ID: 1.0, "127.0.0.1:8082": 1.0, "127.0.0.1:8083": 1.0}


def map_json(epoch: int = 1, cluster_id: str = CLUSTER) -> dict[str, Any]:
    m = dataclasses.replace(bootstrap(cluster_id, PEERS, 3, 2, 2, 64), epoch=epoch)
    return m.to_json()


class NodeMapRouteTests(SynchronousTestCase):
    """/replica/map and its prepare, accept and learn; the epoch header on replica calls."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.node = make_node(NODE_ID, self.clock)
        self.http = guarded_http(self, self.node)
        self.version = {"X-Shardkv-Version": "5-5-x", "Content-Type": "text/plain"}

    def learn(self, epoch: int) -> Reply:
        return self.http.post_json("/replica/map/learn", {"map": map_json(epoch)})

    def test_blank_node(self) -> None:
        self.assertEqual(
            self.http.get("/replica/map").json(),
            {"node": NODE_ID, "learned": None, "accepted_epoch": None, "cluster_id": None},
        )
        self.assertEqual(
            self.http.get("/health").json()["map"], {"epoch": None, "cluster_id": None}
        )

    def test_a_round(self) -> None:
        reply = self.http.post_json("/replica/map/prepare", {"ballot": [1, "proxy-a"]})
        self.assertEqual(
            reply.json(),
            {
                "promised": True,
                "promised_ballot": [1, "proxy-a"],
                "accepted_ballot": None,
                "accepted": None,
            },
        )
        reply = self.http.post_json(
            "/replica/map/accept", {"ballot": [1, "proxy-a"], "map": map_json(1)}
        )
        self.assertEqual(reply.json(), {"accepted": True, "promised_ballot": [1, "proxy-a"]})
        self.assertEqual(self.http.get("/replica/map").json()["accepted_epoch"], 1)
        reply = self.http.post_json("/replica/map/prepare", {"ballot": [0, "proxy-b"]})
        self.assertEqual(
            reply.json(),
            {
                "promised": False,
                "promised_ballot": [1, "proxy-a"],
                "accepted_ballot": [1, "proxy-a"],
                "accepted": map_json(1),
            },
        )
        reply = self.http.post_json(
            "/replica/map/accept", {"ballot": [0, "proxy-b"], "map": map_json(2)}
        )
        self.assertEqual(reply.json(), {"accepted": False, "promised_ballot": [1, "proxy-a"]})
        self.assertEqual(self.learn(1).json(), {"epoch": 1})
        self.assertEqual(self.learn(3).json(), {"epoch": 3})
        self.assertEqual(self.learn(2).json(), {"epoch": 3}, "an older map changes nothing")
        state = self.http.get("/replica/map").json()
        self.assertEqual(
            state,
            {"node": NODE_ID, "learned": map_json(3), "accepted_epoch": 1, "cluster_id": CLUSTER},
        )
        self.assertEqual(
            self.http.get("/health").json()["map"], {"epoch": 3, "cluster_id": CLUSTER}
        )

    def test_a_node_of_another_cluster_refuses(self) -> None:
        self.learn(2)
        other = map_json(5, "0000111122223333")
        for path, body in [
            ("/replica/map/learn", {"map": other}),
            ("/replica/map/accept", {"ballot": [9, "p"], "map": other}),
        ]:
            reply = self.http.post_json(path, body)
            self.assertEqual(reply.error(), (409, "foreign_cluster"), path)
            self.assertEqual(reply.json()["cluster_id"], CLUSTER)
        self.assertEqual(self.http.get("/replica/map").json()["learned"], map_json(2))

    def test_malformed_bodies_are_400s(self) -> None:
        bad_map = {**map_json(1), "epoch": -1}
        cases: list[tuple[str, bytes, str]] = [
            ("/replica/map/prepare", b"", "invalid_json"),
            ("/replica/map/prepare", b"\xff", "invalid_json"),
            ("/replica/map/prepare", b"[]", "invalid_json"),
            ("/replica/map/prepare", b"[" * 5000, "invalid_json"),
            ("/replica/map/prepare", b"{}", "invalid_json"),
            ("/replica/map/prepare", b'{"ballot": null}', "invalid_map"),
            ("/replica/map/prepare", b'{"ballot": [1]}', "invalid_map"),
            ("/replica/map/prepare", b'{"ballot": [true, "p"]}', "invalid_map"),
            ("/replica/map/accept", b'{"ballot": [1, "p"]}', "invalid_map"),
            ("/replica/map/accept", b'{"map": {}}', "invalid_json"),
            ("/replica/map/learn", b"{}", "invalid_map"),
            ("/replica/map/learn", b'{"map": null}', "invalid_map"),
            ("/replica/map/learn", b'{"map": {"epoch": 1}}', "invalid_map"),
            ("/replica/map/learn", json.dumps({"map": bad_map}).encode(), "invalid_map"),
            (
                "/replica/map/accept",
                json.dumps({"ballot": [1, "p"], "map": bad_map}).encode(),
                "invalid_map",
            ),
        ]
        for path, body, code in cases:
            reply = self.http.post_raw(path, body)
            self.assertEqual(reply.error(), (400, code), (path, body[:40]))
        self.assertEqual(
            self.http.get("/replica/map").json(),
            {"node": NODE_ID, "learned": None, "accepted_epoch": None, "cluster_id": None},
        )

    def test_within_the_grace_a_call_of_the_epoch_before_is_taken_and_told_the_epoch(
        self,
    ) -> None:
        """For FENCE_GRACE after an install, a call planned at the epoch just
        before is still served, and the answer names the node's epoch so that
        the caller fetches the map; an older call is refused; afterwards the
        epoch before is refused too."""
        self.learn(3)
        self.clock.advance(FENCE_GRACE)
        self.learn(4)
        reply = self.http.request("GET", "/replica/kv/old", None, {"X-Shardkv-Epoch": "3"})
        self.assertEqual(reply.code, 404)
        self.assertEqual(reply.header("x-shardkv-map-epoch"), "4")
        reply = self.http.request("GET", "/replica/kv/old", None, {"X-Shardkv-Epoch": "2"})
        self.assertEqual(reply.error(), (409, "stale_epoch"))
        self.clock.advance(FENCE_GRACE)
        reply = self.http.request("GET", "/replica/kv/old", None, {"X-Shardkv-Epoch": "3"})
        self.assertEqual(reply.error(), (409, "stale_epoch"))
        reply = self.http.request("GET", "/replica/kv/old", None, {"X-Shardkv-Epoch": "4"})
        self.assertIsNone(reply.header("x-shardkv-map-epoch"))

    def test_stale_replica_calls_are_refused_with_the_map(self) -> None:
        self.learn(4)
        self.clock.advance(FENCE_GRACE)
        self.http.put("/replica/kv/old", b"v", self.version)
        record = Record(Version.parse("6-6-x"), b"v", "text/plain")
        batch = codec.encode_request([codec.PutOp("b", record), codec.GetOp("old")])
        calls: list[tuple[str, str, bytes | None, dict[str, str]]] = [
            ("GET", "/replica/kv/old", None, {}),
            ("PUT", "/replica/kv/new", b"v", self.version),
            ("POST", "/replica/batch", batch, {"Content-Type": "application/json"}),
        ]
        for method, path, body, headers in calls:
            reply = self.http.request(method, path, body, {**headers, "X-Shardkv-Epoch": "3"})
            self.assertEqual(reply.error(), (409, "stale_epoch"), path)
            payload = reply.json()
            self.assertEqual((payload["epoch"], payload["map"]), (4, map_json(4)), path)
            reply = self.http.request(method, path, body, {**headers, "X-Shardkv-Epoch": "x"})
            self.assertEqual(reply.error(), (400, "invalid_epoch"), path)
        self.assertIsNone(self.node.store.engine.get("new"))
        self.assertIsNone(self.node.store.engine.get("b"))
        for epoch in ["4", "5", None]:
            headers = {} if epoch is None else {"X-Shardkv-Epoch": epoch}
            for method, path, body, more in calls:
                reply = self.http.request(method, path, body, {**more, **headers})
                self.assertEqual(reply.code, 200, (method, path, epoch))
        self.assertIsNotNone(self.node.store.engine.get("new"))
        self.assertIsNotNone(self.node.store.engine.get("b"))

    def test_a_learned_map_sets_the_members_and_pushes_are_ignored(self) -> None:
        self.http.put("/replica/members", b'{"members": ["127.0.0.1:8089"]}')
        self.assertEqual(self.http.get("/health").json()["members"], ["127.0.0.1:8089"])
        self.learn(1)
        members = sorted(PEERS)
        self.assertEqual(self.http.get("/health").json()["members"], members)
        reply = self.http.put("/replica/members", b'{"members": ["127.0.0.1:8089"]}')
        self.assertEqual(reply.json(), {"members": members})
        path = "/replica/kv/s?hint_for="
        self.assertEqual(self.http.put(path + "127.0.0.1:8082", b"v", self.version).code, 200)
        refused = self.http.put(path + "127.0.0.1:8089", b"v", self.version)
        self.assertEqual(refused.error(), (400, "invalid_hint_target"))

    def test_the_map_routes_need_the_token(self) -> None:
        node = token_node(self.clock)
        http = guarded_http(self, node)
        for method, path, body in [
            ("GET", "/replica/map", None),
            ("POST", "/replica/map/prepare", b'{"ballot": [1, "p"]}'),
            ("POST", "/replica/map/accept", b"{}"),
            ("POST", "/replica/map/learn", json.dumps({"map": map_json(1)}).encode()),
        ]:
            reply = http.request(method, path, body)
            self.assertEqual(reply.error(), (401, "unauthorized"), path)
        self.assertIsNone(node.store.mapstore.learned)
        self.assertEqual(node.store.mapstore.state.promised, None)
