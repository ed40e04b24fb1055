"""
Tests of a node's move routes (L{shardkv.node.moveroutes}): its move status,
its share of a plan, one pair's keys, and the stream of copies it receives.

A real L{NodeApp} on a memory engine behind C{StubTreq}. The stream route
must store each copy only if newer, answer like the batch route, refuse
anything but puts and anything planned at an older epoch, and take up to
L{codec.MAX_STREAM_OPS} records.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.clustermap import ClusterMap
from shardkv.core.movement import MovePlanner
from shardkv.core.placement import hash_key
from shardkv.core.records import Record
from shardkv.core.versions import Version, VersionClock
from shardkv.errors import StorageFull
from shardkv.node.app import NodeApp
from shardkv.node.mapstore import MapStore
from shardkv.node.mover import Mover
from shardkv.node.store import NodeStore
from shardkv.replica import codec
from shardkv.replica.protocol import (
    EPOCH_HEADER,
    MOVE_PATH,
    PLAN_KEYS_PATH,
    PLAN_PATH,
    STREAM_PATH,
)
from shardkv.storage.memory import MemoryEngine
from tests.helpers import HTTP, Reply, flusher
from tests.node.test_mover import A, D, cluster, fill, joining

NOW_MS = 1_700_000_000_000


def put(key: str, counter: int, value: bytes = b"v") -> codec.PutOp:
    return codec.PutOp(key, Record(Version(counter, NOW_MS - 1000, "w"), value, "text/plain"))


class NoPeers:
    def send_stream(self, node: str, ops: Any, epoch: int | None) -> Deferred[list[codec.Result]]:
        return succeed([codec.Result(200, applied=True)] * len(ops))

    def replica_put(self, *args: Any, **kwargs: Any) -> Deferred[bool]:
        return succeed(True)


class MoveRouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW_MS / 1000)
        self.engine = MemoryEngine()
        self.mapstore = MapStore(A, self.engine)
        self.mapstore.load()

        def now_ms() -> int:
            return int(self.clock.seconds() * 1000)

        versions = VersionClock(A, now_ms)
        store = NodeStore(A, self.engine, versions, 1 << 20, now_ms, mapstore=self.mapstore)
        self.mover = Mover(A, self.engine, self.mapstore, NoPeers(), self.clock, 64)
        self.mover.start()
        self.node = NodeApp(store, mover=self.mover)
        self.stub = StubTreq(self.node.app.resource())
        self.http = HTTP(self, self.stub, "http://" + A, flusher(self.stub))

    def call(
        self, method: str, path: str, body: bytes | None = None, epoch: int | None = None
    ) -> Reply:
        """A request, running the node's clock too (plans yield to it between chunks)."""
        headers = {"Content-Type": "application/json"}
        if epoch is not None:
            headers[EPOCH_HEADER.decode()] = str(epoch)
        d = self.http.start(method, path, body, headers)
        seen: list[object] = []

        def note(result: Any) -> Any:
            seen.append(result)
            return result

        d.addBoth(note)
        for _ in range(10_000):
            self.http.pump(d)
            if seen:
                break
            self.clock.advance(0)
        return self.successResultOf(d)

    def post(self, path: str, payload: object) -> Reply:
        return self.call("POST", path, json.dumps(payload).encode())

    def stream(self, ops: list[codec.PutOp], epoch: int | None = None) -> Reply:
        return self.call("POST", STREAM_PATH, codec.encode_request(ops), epoch)

    def learn(self, m: ClusterMap) -> None:
        self.successResultOf(self.mapstore.learn(m))

    def test_the_stream_stores_newer_copies_and_answers_like_a_batch(self) -> None:
        self.engine.put("old", put("old", 5).record)
        reply = self.stream([put("new", 1, b"\x00n"), put("old", 3), put("tomb", 2)])
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual(
            codec.decode_response(reply.body, 3),
            [
                codec.Result(200, applied=True),
                codec.Result(200, applied=False),
                codec.Result(200, applied=True),
            ],
        )
        stored = self.engine.get("new")
        assert stored is not None
        self.assertEqual(stored.value, b"\x00n")
        self.assertEqual(stored.stored_ms, int(self.clock.seconds() * 1000))
        self.assertEqual(self.engine.get("old"), put("old", 5).record)

    def test_a_failed_write_is_every_copys_outcome_and_a_bad_copy_only_its_own(self) -> None:
        """The stream's records go to the engine in one write; when it fails
        (a full disk) each record answers that error, so the sender retries
        the batch; a record refused on its own (too large) answers for itself."""
        self.engine.put_many = lambda items: fail(StorageFull("disk full"))  # type: ignore[method-assign]
        self.node.store.max_value_bytes = 10
        big = codec.PutOp("big", Record(put("big", 1).record.version, b"x" * 11))
        reply = self.stream([put("a", 1), big, put("b", 1)])
        self.assertEqual(reply.code, 200, reply.body)
        results = codec.decode_response(reply.body, 3)
        self.assertEqual(
            [(r.status, r.error) for r in results],
            [
                (507, "insufficient_storage"),
                (413, "value_too_large"),
                (507, "insufficient_storage"),
            ],
        )

    def test_the_stream_takes_max_stream_ops_and_no_more(self) -> None:
        ops = [put(f"k{i}", 1) for i in range(codec.MAX_STREAM_OPS)]
        self.assertEqual(self.stream(ops).code, 200)
        self.assertEqual(len(list(self.engine.scan("", 10**6))), codec.MAX_STREAM_OPS)
        reply = self.stream([*ops, put("one-more", 1)])
        self.assertEqual(reply.code, 400)
        self.assertEqual(reply.json()["error"], "invalid_batch")

    def test_the_stream_refuses_reads_and_hints(self) -> None:
        for op in ({"op": "get", "key": "k"}, {**_put_json(), "hint_for": D}):
            reply = self.call("POST", STREAM_PATH, json.dumps({"ops": [op]}).encode())
            self.assertEqual(reply.code, 400, reply.body)
            self.assertEqual(reply.json()["error"], "invalid_batch")
        self.assertIsNone(self.engine.get("k"))

    def test_the_stream_refuses_an_older_epoch(self) -> None:
        self.learn(cluster())
        self.learn(joining())
        self.assertEqual(self.stream([put("k", 1)], epoch=2).code, 200)
        reply = self.stream([put("late", 1)], epoch=1)
        self.assertEqual(reply.code, 409)
        self.assertEqual((reply.json()["error"], reply.json()["epoch"]), ("stale_epoch", 2))
        self.assertIsNone(self.engine.get("late"))

    def test_move_status(self) -> None:
        blank = self.call("GET", MOVE_PATH).json()
        self.assertEqual((blank["node"], blank["epoch"], blank["phase"]), (A, None, None))
        self.assertEqual(blank["stream"]["state"], "idle")
        self.assertEqual(blank["cleanup"]["state"], "idle")
        fill(self.engine, 100)
        self.learn(cluster())
        self.learn(joining())
        self.clock.advance(0)
        status = self.call("GET", MOVE_PATH).json()
        self.assertEqual((status["epoch"], status["phase"]), (2, "copying"))
        self.assertEqual(status["stream"]["state"], "done")
        self.assertEqual(status["stream"]["keys_scanned"], 101)
        self.assertEqual(
            set(status["stream"]),
            {
                "state",
                "keys_scanned",
                "keys_moved",
                "bytes_moved",
                "copies_sent",
                "copies_refused",
                "last_error",
            },
        )

    def test_plan_and_its_keys(self) -> None:
        fill(self.engine, 300)
        m = joining()
        planner = MovePlanner.for_map(m)
        primary = [
            k
            for k, _ in self.engine.scan("", 10**6)
            if (km := planner.for_hash(hash_key(k))) is not None and km.primary == A
        ]
        plan = self.post(PLAN_PATH, {"map": m.to_json()})
        self.assertEqual(plan.code, 200, plan.body)
        body = plan.json()
        self.assertEqual(body["keys_scanned"], 301)
        self.assertEqual(
            [(p["from"], p["to"], p["keys"]) for p in body["pairs"]], [(A, D, len(primary))]
        )
        page = self.post(PLAN_KEYS_PATH, {"map": m.to_json(), "to": D, "cursor": "", "limit": 5})
        self.assertEqual(page.json(), {"keys": primary[:5], "cursor": primary[4]})
        rest = self.post(
            PLAN_KEYS_PATH, {"map": m.to_json(), "to": D, "cursor": primary[4], "limit": 1000}
        )
        self.assertEqual(rest.json(), {"keys": primary[5:], "cursor": None})

    def test_plan_refuses_bad_input(self) -> None:
        for payload, code in [
            ({}, "invalid_map"),
            ({"map": {"epoch": 1}}, "invalid_map"),
            ({"map": cluster().to_json()}, "invalid_map"),  # no move: nothing to plan
        ]:
            reply = self.post(PLAN_PATH, payload)
            self.assertEqual((reply.code, reply.json()["error"]), (400, code), payload)
        m = joining().to_json()
        bad: list[dict[str, Any]] = [
            {"map": m},
            {"map": m, "to": D, "limit": 0},
            {"map": m, "to": 3},
        ]
        for payload in bad:
            reply = self.post(PLAN_KEYS_PATH, payload)
            self.assertEqual(reply.code, 400, payload)
        reply = self.call("POST", PLAN_PATH, b"not json")
        self.assertEqual((reply.code, reply.json()["error"]), (400, "invalid_json"))


def _put_json() -> dict[str, Any]:
    record = put("k", 1).record
    return json.loads(codec.encode_request([codec.PutOp("k", record)]))["ops"][0]  # type: ignore[no-any-return]
