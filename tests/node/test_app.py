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

from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.records import Record
from shardkv.core.versions import VersionClock
from shardkv.node.app import NodeApp
from shardkv.node.store import NodeStore
from shardkv.storage.memory import MemoryEngine
from shardkv.testing.memory import make_node
from tests.helpers import HTTP, flusher
from tests.web.contract import DataAPIContract

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
