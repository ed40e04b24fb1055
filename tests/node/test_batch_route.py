"""
Tests of a node's C{POST /replica/batch} route (L{shardkv.node.app}).

Every operation in a batch must get the answer it would have got on its own:
one key that is corrupt, over the size limit or refused by a full disk fails
that operation only, while a body that is not a valid batch is refused whole
before anything in it is applied. The node runs behind C{StubTreq} on a
memory engine that can be told to fail chosen keys.
"""

from __future__ import annotations

import gc
import json

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.records import CorruptRecord, Record
from shardkv.core.versions import VersionClock
from shardkv.errors import ReplicaRefused, StorageError, StorageFailed, StorageFull
from shardkv.node.app import NodeApp
from shardkv.node.members import Members
from shardkv.node.store import NodeStore
from shardkv.replica.codec import (
    MAX_INLINE_TOTAL,
    MAX_INLINE_VALUE,
    MAX_OPS,
    MAX_REQUEST_BYTES,
    GetOp,
    Op,
    PutOp,
    Result,
    encode_request,
)
from shardkv.storage.memory import MemoryEngine
from shardkv.web.dataroutes import DEFAULT_MAX_VALUE_BYTES, body_limit_for
from shardkv.web.site import make_site
from tests.helpers import HTTP, flusher, same_data
from tests.replica.helpers import GOOD_RECORD, NODE_ID, V1, V2, OneNodeCase, json_bytes, ops_body


class FaultyEngine(MemoryEngine):
    """A memory engine with chosen keys corrupt on read or failing on write."""

    def __init__(self) -> None:
        super().__init__()
        self.corrupt: set[str] = set()
        self.put_errors: dict[str, StorageError] = {}

    def get(self, key: str) -> Record | None:
        if key in self.corrupt:
            raise CorruptRecord("record checksum mismatch")
        return super().get(key)

    def latest(self, key: str) -> Record | None:
        return self.get(key)

    def put(self, key: str, record: Record) -> Deferred[bool]:
        error = self.put_errors.get(key)
        if error is not None:
            return fail(error)
        return super().put(key, record)


class NodeBatchTests(OneNodeCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(5.0)
        self.engine = FaultyEngine()
        self.serve(self.make_node(DEFAULT_MAX_VALUE_BYTES))

    def make_node(self, max_value_bytes: int) -> NodeApp:
        def now_ms() -> int:
            return int(self.clock.seconds() * 1000)

        versions = VersionClock(NODE_ID, now_ms)
        members = Members([NODE_ID, "127.0.0.1:8085"])
        return NodeApp(NodeStore(NODE_ID, self.engine, versions, max_value_bytes, now_ms, members))

    def test_mixed_batch_gives_one_result_per_op(self) -> None:
        """
        Gets, puts and hinted puts in one batch each get the answer they
        would get alone: a hint is kept apart from the node's own records,
        an older version is not applied, and stored records get the node's
        own clock as stored_ms. A put says what the node held before it
        (``held``, ``live``); a hint does not.
        """
        self.engine.put("old", Record(V2, b"two", "text/plain"))
        self.engine.put("gone", Record.deleted(V1))
        new = Record(V1, b"\x00new", "application/octet-stream")
        batch: list[Op] = [
            GetOp("old"),
            GetOp("missing"),
            PutOp("new", new),
            PutOp("hinted", Record(V2, b"h", "text/plain"), "127.0.0.1:8085"),
            PutOp("old", Record(V1, b"one", "text/plain")),
            GetOp("gone"),
        ]
        self.assertEqual(
            self.send(batch),
            [
                Result(200, record=Record(V2, b"two", "text/plain")),
                Result(404, error="not_found", message="no record for key 'missing'"),
                Result(200, applied=True, held=None, live=False),
                Result(200, applied=True),
                Result(200, applied=False, held=V2, live=True),
                Result(200, record=Record.deleted(V1)),
            ],
        )
        stored = self.engine.get("new")
        assert stored is not None
        self.assertTrue(same_data(new, stored))
        self.assertEqual(stored.stored_ms, 5000)
        self.assertIsNone(self.engine.get("hinted"))
        self.assertEqual(
            self.engine.hints("127.0.0.1:8085"),
            [("hinted", Record(V2, b"h", "text/plain", False, 5000))],
        )
        self.assertEqual(self.engine.get("old"), Record(V2, b"two", "text/plain"))

    def test_a_value_over_the_node_limit_fails_that_op_only(self) -> None:
        """
        A put whose value is over this node's limit gets 413 in its own
        result and is not stored; a put at the limit in the same batch is.
        """
        small = self.make_node(16)
        stub = StubTreq(small.app.resource())
        http = HTTP(self, stub, "http://" + NODE_ID, flusher(stub))
        results = self.send(
            [PutOp("big", Record(V1, b"x" * 17)), PutOp("ok", Record(V1, b"x" * 16))], http
        )
        self.assertEqual((results[0].status, results[0].error), (413, "value_too_large"))
        self.assertIn("16-byte limit", results[0].message)
        self.assertEqual(results[1], Result(200, applied=True, live=False))
        self.assertIsNone(self.engine.get("big"))
        self.assertIsNotNone(self.engine.get("ok"))

    def test_a_corrupt_record_fails_that_op_only(self) -> None:
        """
        A record failing its checksum answers 404 corrupt_record (so the
        proxy reads it as missing and read repair overwrites it), while the
        other reads in the batch succeed.
        """
        self.engine.put("bad", Record(V1, b"x"))
        self.engine.put("good", Record(V1, b"y"))
        self.engine.corrupt.add("bad")
        bad, good = self.send([GetOp("bad"), GetOp("good")])
        self.assertEqual((bad.status, bad.error, bad.record), (404, "corrupt_record", None))
        self.assertIn("checksum", bad.message)
        self.assertEqual(good, Result(200, record=Record(V1, b"y")))

        client, _ = self.client()
        self.assertIsNone(self.wait(client.replica_get(NODE_ID, "bad")))

    def test_storage_failures_fail_their_ops_only(self) -> None:
        """
        A write the engine cannot make durable answers that engine error's
        own status and code in its result (507 for a full disk, 503 for a
        failed commit); the other writes in the batch are applied.
        """
        self.engine.put_errors["full"] = StorageFull("no space left on device")
        self.engine.put_errors["failed"] = StorageFailed("fsync returned EIO")
        full, failed, ok = self.send(
            [
                PutOp("full", Record(V1, b"x")),
                PutOp("failed", Record(V1, b"x")),
                PutOp("ok", Record(V1, b"x")),
            ]
        )
        self.assertEqual((full.status, full.error), (507, "insufficient_storage"))
        self.assertEqual((failed.status, failed.error), (503, "storage_failed"))
        self.assertIn(NODE_ID, full.message)
        self.assertIn("fsync returned EIO", failed.message)
        self.assertEqual(ok, Result(200, applied=True, live=False))

        client, _ = self.client()
        d = client.replica_put(NODE_ID, "full", Record(V1, b"x"))
        flusher(self.stub)(d)
        error = self.failureResultOf(d, ReplicaRefused).value
        assert isinstance(error, ReplicaRefused)
        self.assertEqual(error.code, "insufficient_storage")

    def test_an_invalid_body_is_400_and_applies_nothing(self) -> None:
        """
        A body that is not a valid batch is refused whole with a JSON 400
        invalid_batch, and none of its operations is applied, not even a
        valid put before the bad one.
        """
        valid = {
            "op": "put",
            "key": "applied?",
            "record": GOOD_RECORD,
        }
        for body in [
            b"not json",
            json_bytes({"ops": "get"}),
            ops_body(valid, {"op": "get", "key": ""}),
            ops_body(valid, {"op": "frobnicate", "key": "k"}),
            ops_body(*[valid] * (MAX_OPS + 1)),
        ]:
            reply = self.http.post_raw("/replica/batch", body)
            self.assertEqual(reply.error(), (400, "invalid_batch"), reply.body)
        self.assertIsNone(self.engine.get("applied?"))

    def test_an_oversized_body_is_refused_before_it_is_read(self) -> None:
        """
        The node's site refuses a batch declaring more than MAX_REQUEST_BYTES
        with a JSON 413 as soon as the headers are in (no body was sent at
        all), and lets one at the limit through to be read. (Which limit
        applies to which route is tested in tests/web/test_dataroutes.py.)
        """
        limit = body_limit_for(DEFAULT_MAX_VALUE_BYTES, replica_routes=True)
        site = make_site(self.node.app.resource(), limit)
        site.reactor = self.clock
        for length, refused in [(MAX_REQUEST_BYTES + 1, True), (MAX_REQUEST_BYTES, False)]:
            channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
            assert channel is not None
            transport = StringTransport()
            channel.makeConnection(transport)
            channel.dataReceived(
                b"POST /replica/batch HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n"
                % (NODE_ID.encode(), length)
            )
            head, _, body = transport.value().partition(b"\r\n\r\n")
            if refused:
                self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)
                self.assertIn(b"Content-Type: application/json", head)
                self.assertEqual(json.loads(body)["error"], "payload_too_large")
                self.assertTrue(transport.disconnecting)
            else:
                self.assertEqual(transport.value(), b"", "answered before the body came")
            channel.connectionLost(Failure(ConnectionError("test over")))

    def test_reads_past_the_inline_total_are_left_out(self) -> None:
        """
        A response carries at most MAX_INLINE_TOTAL bytes of values: reads
        past it answer ``inline: false`` (the record exists, fetch it alone)
        rather than growing the response without bound.
        """
        per = MAX_INLINE_TOTAL // MAX_INLINE_VALUE
        names = [f"k{i}" for i in range(per + 4)]
        for name in names:
            self.engine.put(name, Record(V1, name.encode().ljust(MAX_INLINE_VALUE, b".")))
        got = self.send([GetOp(name) for name in names])
        self.assertEqual([r.inline for r in got], [True] * per + [False] * 4)
        for name, result in zip(names[:per], got, strict=False):
            assert result.record is not None
            self.assertTrue(result.record.value.startswith(name.encode()))
        self.assertEqual(set(got[per:]), {Result(200, inline=False)})


class HungEngine(MemoryEngine):
    """A memory engine whose writes never commit (a node paused mid-fsync)."""

    def put(self, key: str, record: Record) -> Deferred[bool]:
        return Deferred()


class CancelledBatchTests(SynchronousTestCase):
    def test_a_client_that_hangs_up_mid_batch_leaves_no_unhandled_error(self) -> None:
        """
        When the caller goes away while a batch's writes wait for their
        commit (a proxy paused with SIGSTOP, a hung-up client), the route's
        Deferred is cancelled: every write in the batch is cancelled too, and
        not one of them may end as "Unhandled error in Deferred" or as an
        unexpected-error log, which is what a cancellation used to leave.
        """
        clock = MemoryReactorClock()
        versions = VersionClock(NODE_ID, lambda: 0)
        node = NodeApp(NodeStore(NODE_ID, HungEngine(), versions, 1024, lambda: 0))
        site = make_site(node.app.resource(), body_limit_for(1024, replica_routes=True))
        site.reactor = clock
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert channel is not None
        transport = StringTransport()
        channel.makeConnection(transport)
        body = encode_request(
            [GetOp("missing")] + [PutOp(f"k{i}", Record(V1, b"x")) for i in range(38)]
        )
        channel.dataReceived(
            b"POST /replica/batch HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (NODE_ID.encode(), len(body), body)
        )
        self.assertEqual(transport.value(), b"", "answered before the writes committed")
        channel.connectionLost(Failure(ConnectionDone("the client hung up")))
        del channel
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])
