"""
Tests of batched replica traffic: the wire format (L{shardkv.core.batch}),
the per-node queue that builds batches (L{NodePipeline}), the node's
C{POST /replica/batch} route, and the proxy using both.

Batching must be invisible to clients: every operation in a batch gets the
answer it would have got on its own, one operation's failure says nothing
about its neighbours, and a slow or hung node costs no more than its own
timeout. These tests pin each of those promises down without sockets: the
pipeline runs against a fake C{send} whose Deferreds the test answers, the
node app behind C{StubTreq}, and whole clusters as L{MemoryCluster}s on a
C{MemoryReactorClock}.
"""

from __future__ import annotations

import base64
import gc
import json
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.batch import (
    MAX_CONTENT_TYPE,
    MAX_INLINE_TOTAL,
    MAX_INLINE_VALUE,
    MAX_OPS,
    MAX_REQUEST_BYTES,
    BatchError,
    GetOp,
    Op,
    PutOp,
    Result,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    fits,
)
from shardkv.core.keys import MAX_KEY_BYTES, check_key
from shardkv.core.records import CorruptRecord, Record
from shardkv.core.versions import Version, VersionClock
from shardkv.http.dataroutes import DEFAULT_MAX_VALUE_BYTES, SMALL_BODY_LIMIT, body_limit_for
from shardkv.http.errors import ApiError
from shardkv.http.nodeclient import NodeClient
from shardkv.http.nodeerrors import NodeBusy, NodeTimeout, NodeUnreachable
from shardkv.http.pipeline import NodePipeline
from shardkv.http.site import make_site
from shardkv.node.app import NodeApp
from shardkv.storage.engine import StorageError, StorageFailed, StorageFull
from shardkv.storage.memory import MemoryEngine
from shardkv.testing import MemoryCluster
from tests.helpers import (
    HTTP,
    NODES_3,
    U64,
    WRITER_ALPHABET,
    NetworkFaults,
    Reply,
    answered,
    cluster_http,
    flusher,
    hints_for_key,
    memory_cluster,
    settle,
)

# No example database: the tests must not leave a .hypothesis/ in the tree,
# and a deadline only makes a loaded CI machine flaky.
PROPERTY = settings(database=None, deadline=None, max_examples=150)

NODE_ID = "127.0.0.1:8081"
TIMEOUT = 2.0
V1 = Version(1, 1000, "n1")
V2 = Version(2, 2000, "n2")


# -- the wire format ----------------------------------------------------------

utf8_chars = st.characters(codec="utf-8")  # no lone surrogates: they cannot be stored


def _clip(text: str) -> str:
    """``text`` cut to at most MAX_KEY_BYTES UTF-8 bytes, on a character boundary."""
    return text.encode("utf-8")[:MAX_KEY_BYTES].decode("utf-8", "ignore")


keys = st.one_of(
    st.text(utf8_chars, min_size=1, max_size=20),
    st.text(utf8_chars, min_size=1, max_size=MAX_KEY_BYTES).map(_clip),
    st.text(st.characters(max_codepoint=0x1F), min_size=1, max_size=MAX_KEY_BYTES),
).filter(bool)
versions = st.builds(
    Version,
    counter=st.integers(min_value=1, max_value=U64),
    clock_ms=st.integers(min_value=0, max_value=U64),
    writer=st.text(alphabet=WRITER_ALPHABET, min_size=1, max_size=128),
)
content_types = st.one_of(
    st.sampled_from(["", "text/plain; charset=utf-8", "application/octet-stream"]),
    # HTTP header values are ASCII; the node refuses anything else.
    st.text(st.characters(max_codepoint=127), max_size=MAX_CONTENT_TYPE),
)
# stored_ms stays 0: it is each node's own bookkeeping and never travels.
records = st.builds(
    Record,
    version=versions,
    value=st.binary(max_size=512),
    content_type=content_types,
    tombstone=st.booleans(),
)
# A hint names a node by its address: ASCII.
hint_targets = st.one_of(
    st.none(), st.text(st.characters(max_codepoint=127), min_size=1, max_size=64)
)
ops: st.SearchStrategy[Op] = st.one_of(
    st.builds(GetOp, keys), st.builds(PutOp, keys, records, hint_targets)
)
statuses = st.integers(min_value=100, max_value=599)
results = st.one_of(
    st.builds(Result, statuses, record=records),
    st.builds(Result, statuses, inline=st.just(False)),
    st.builds(Result, statuses, applied=st.booleans()),
    st.builds(
        Result,
        statuses,
        error=st.text(utf8_chars, min_size=1, max_size=40),
        message=st.text(utf8_chars, max_size=200),
    ),
)


@PROPERTY
@given(st.lists(ops, max_size=MAX_OPS))
@example([PutOp("\x01" * MAX_KEY_BYTES, Record(V1, b"\x00\xff", "\x01"), "\x01" * MAX_KEY_BYTES)])
@example([PutOp('"\\/', Record.deleted(V2), None), GetOp("🙂 café")])
def test_request_round_trip(batch: list[Op]) -> None:
    """
    Any valid keys, bytes, versions, content types, tombstones and hint
    targets come out of a request exactly as they went in, in order: a
    node must store precisely what the proxy minted.
    """
    for op in batch:
        check_key(op.key)
    assert decode_request(encode_request(batch)) == batch


@PROPERTY
@given(st.lists(results, max_size=MAX_OPS))
def test_response_round_trip(answers: list[Result]) -> None:
    """
    Every kind of result (a record, "not inline", applied or not, an error)
    survives the response encoding in order, and a response is refused
    unless it has exactly one result per operation sent.
    """
    body = encode_response(answers)
    assert decode_response(body, len(answers)) == answers
    for wrong in (len(answers) + 1, len(answers) - 1):
        if wrong >= 0:
            with pytest.raises(BatchError):
                decode_response(body, wrong)


def _body(payload: object) -> bytes:
    return json.dumps(payload).encode("utf-8")


GOOD_RECORD: dict[str, Any] = {
    "version": "1-1-w",
    "tombstone": False,
    "content_type": "text/plain",
    "value": base64.b64encode(b"x").decode("ascii"),
}


def _put(hint_for: object = None, **record: object) -> bytes:
    """A one-put request whose record differs from a good one in ``record``."""
    fields = {**GOOD_RECORD, **record}
    item: dict[str, Any] = {
        "op": "put",
        "key": "k",
        "record": {k: v for k, v in fields.items() if v is not ...},
    }
    if hint_for is not None:
        item["hint_for"] = hint_for
    return _body({"ops": [item]})


def _ops(*items: object) -> bytes:
    return _body({"ops": list(items)})


DEEP = b"[" * 100_000 + b"]" * 100_000

MALFORMED_REQUESTS = [
    ("not JSON", b"ops: get k"),
    ("empty", b""),
    ("not UTF-8", b'{"ops": [{"op": "get", "key": "\xff"}]}'),
    ("a list", b"[]"),
    ("null", b"null"),
    ("no ops", _body({"op": []})),
    ("ops not a list", _body({"ops": {"op": "get", "key": "k"}})),
    ("op not an object", _ops("get k")),
    ("unknown op", _ops({"op": "delete", "key": "k"})),
    ("no op", _ops({"key": "k"})),
    ("no key", _ops({"op": "get"})),
    ("key not a string", _ops({"op": "get", "key": 7})),
    ("empty key", _ops({"op": "get", "key": ""})),
    ("key too long", _ops({"op": "get", "key": "k" * (MAX_KEY_BYTES + 1)})),
    ("key too long in bytes", _ops({"op": "get", "key": "é" * (MAX_KEY_BYTES // 2 + 1)})),
    ("put without record", _ops({"op": "put", "key": "k"})),
    ("record not an object", _ops({"op": "put", "key": "k", "record": ["1-1-w"]})),
    ("record without version", _put(version=...)),
    ("record without value", _put(value=...)),
    ("record without content_type", _put(content_type=...)),
    ("record without tombstone", _put(tombstone=...)),
    ("bad version", _put(version="yesterday")),
    ("version counter 0", _put(version="0-1-w")),
    ("version writer invalid", _put(version="1-1-no spaces")),
    ("version counter too big", _put(version=f"{2**64}-1-w")),
    ("version not a string", _put(version=12)),
    ("value not base64", _put(value="not base64!")),
    ("value badly padded", _put(value="eA=")),
    ("value not ASCII", _put(value="é")),
    ("value not a string", _put(value=[1])),
    ("tombstone not a bool", _put(tombstone="false")),
    ("content_type not a string", _put(content_type=None)),
    ("content_type too long", _put(content_type="a" * (MAX_CONTENT_TYPE + 1))),
    ("content_type a lone surrogate", _put(content_type="\ud800")),
    ("hint_for not a string", _put(hint_for=5)),
    ("too many ops", _ops(*[{"op": "get", "key": f"k{i}"} for i in range(MAX_OPS + 1)])),
    ("nested too deep", b'{"ops": ' + DEEP + b"}"),
]


@pytest.mark.parametrize(
    "body", [body for _, body in MALFORMED_REQUESTS], ids=[n for n, _ in MALFORMED_REQUESTS]
)
def test_malformed_requests_raise_batch_error(body: bytes) -> None:
    """
    Every way a request body can be wrong is a L{BatchError}, which the
    node answers as 400; any other exception would be a 500 for the whole
    batch and hide what was wrong.
    """
    with pytest.raises(BatchError):
        decode_request(body)


def _answer(**record: object) -> bytes:
    """A one-result response whose record differs from a good one in ``record``."""
    return _body({"results": [{"status": 200, "record": {**GOOD_RECORD, **record}}]})


MALFORMED_RESPONSES = [
    ("not JSON", b"<html>502 Bad Gateway</html>", 1),
    ("a list", b"[]", 1),
    ("no results", _body({"result": []}), 1),
    ("results not a list", _body({"results": {"status": 200}}), 1),
    ("too few results", _body({"results": [{"status": 200}]}), 2),
    ("too many results", _body({"results": [{"status": 200}, {"status": 200}]}), 1),
    ("no results for one op", _body({"results": []}), 1),
    ("result not an object", _body({"results": [200]}), 1),
    ("no status", _body({"results": [{"applied": True}]}), 1),
    ("status a string", _body({"results": [{"status": "200"}]}), 1),
    ("record not an object", _body({"results": [{"status": 200, "record": "x"}]}), 1),
    ("record bad version", _answer(version="nope"), 1),
    ("record bad base64", _answer(value="!!"), 1),
    ("record version not a string", _answer(version=12), 1),
    ("record value not ASCII", _answer(value="é"), 1),
    ("nested too deep", b'{"results": ' + DEEP + b"}", 1),
]


@pytest.mark.parametrize(
    ("body", "expected"),
    [(body, n) for _, body, n in MALFORMED_RESPONSES],
    ids=[name for name, _, _ in MALFORMED_RESPONSES],
)
def test_malformed_responses_raise_batch_error(body: bytes, expected: int) -> None:
    """
    A node's answer the proxy cannot trust is a L{BatchError} (which the
    client turns into a 502 for the batch), never a crash mid-callback.
    """
    with pytest.raises(BatchError):
        decode_response(body, expected)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def _maybe(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Either a well-formed field value or any JSON value at all."""
    return st.one_of(good, json_values)


record_like = st.fixed_dictionaries(
    {},
    optional={
        "version": _maybe(versions.map(str)),
        "value": _maybe(st.binary(max_size=16).map(lambda b: base64.b64encode(b).decode())),
        "content_type": _maybe(st.text(max_size=20)),
        "tombstone": _maybe(st.booleans()),
    },
)
op_like = st.fixed_dictionaries(
    {},
    optional={
        "op": _maybe(st.sampled_from(["get", "put"])),
        "key": _maybe(st.text(min_size=1, max_size=10)),
        "record": _maybe(record_like),
        "hint_for": _maybe(st.text(max_size=10)),
    },
)
result_like = st.fixed_dictionaries(
    {},
    optional={
        "status": _maybe(statuses),
        "record": _maybe(record_like),
        "error": _maybe(st.text(max_size=10)),
        "message": _maybe(st.text(max_size=10)),
        "applied": _maybe(st.booleans()),
        "inline": _maybe(st.booleans()),
    },
)
request_bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(_body),
    st.lists(_maybe(op_like), max_size=4).map(lambda items: _body({"ops": items})),
)
response_bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(_body),
    st.lists(_maybe(result_like), max_size=4).map(lambda items: _body({"results": items})),
)


@PROPERTY
@given(request_bodies)
@example(_put(version=12))
@example(_put(value="é"))
@example(b'{"ops": ' + DEEP + b"}")
def test_any_request_body_decodes_or_raises_batch_error(body: bytes) -> None:
    """
    Whatever arrives at C{/replica/batch}, decoding either succeeds or
    raises L{BatchError}; and what decodes encodes again to the same
    operations, so a node never holds an operation it could not describe.
    """
    try:
        decoded = decode_request(body)
    except BatchError:
        return
    assert decode_request(encode_request(decoded)) == decoded


@PROPERTY
@given(response_bodies, st.integers(min_value=0, max_value=4))
@example(_answer(version=12), 1)
@example(_answer(value="é"), 1)
@example(b'{"results": ' + DEEP + b"}", 1)
def test_any_response_body_decodes_or_raises_batch_error(body: bytes, expected: int) -> None:
    """Whatever a node answers, decoding succeeds with one result per op or raises L{BatchError}."""
    try:
        decoded = decode_response(body, expected)
    except BatchError:
        return
    assert len(decoded) == expected


def _worst_case_request(version: Version) -> bytes:
    """MAX_OPS puts with every escapable field at its limit, in the worst bytes for JSON."""
    key = "\x01" * MAX_KEY_BYTES  # JSON writes each as \\u0001: six bytes per byte
    record = Record(version, b"\xff" * MAX_INLINE_VALUE, "\x01" * MAX_CONTENT_TYPE, False)
    assert fits(record)
    return encode_request([PutOp(key, record, "\x01" * MAX_KEY_BYTES)] * MAX_OPS)


def test_worst_case_request_fits_the_node_limit() -> None:
    """
    The biggest batch a proxy can build (every key, hint target and content
    type escaped six times over, every value at the inline limit) stays
    within the body limit nodes enforce; otherwise a node would refuse a
    whole batch with 413. The version is a proxy's: a writer id with its
    incarnation suffix and a millisecond clock good until the year 2100.
    """
    body = _worst_case_request(Version(10**12, 4_102_444_800_000, "proxy-eu-west-1a.0f3a9c"))
    assert len(body) <= MAX_REQUEST_BYTES
    assert len(decode_request(body)) == MAX_OPS


def test_longest_valid_version_still_fits_the_node_limit() -> None:
    """
    MAX_REQUEST_BYTES says it is the largest body a proxy sends, and a
    version may carry a 128-character writer and two 20-digit counters:
    the worst-case batch with such versions must fit too.
    """
    body = _worst_case_request(Version(U64, U64, "w" * 128))
    assert len(body) <= MAX_REQUEST_BYTES, f"{len(body) - MAX_REQUEST_BYTES} bytes over"


def test_fits_is_the_inline_value_limit() -> None:
    """Records travel in a batch up to MAX_INLINE_VALUE bytes of value, and not beyond."""
    assert fits(Record(V1, b"x" * MAX_INLINE_VALUE))
    assert not fits(Record(V1, b"x" * (MAX_INLINE_VALUE + 1)))


# -- NodePipeline ---------------------------------------------------------------


def echo(op: Op) -> Result:
    """A result that names the operation it answers, to check results land positionally."""
    return Result(200, record=Record(V1, op.key.encode("utf-8")))


class FakeNode:
    """The pipeline's C{send}: records every batch and lets the test answer it."""

    def __init__(self) -> None:
        self.batches: list[list[Op]] = []
        self.answers: list[Deferred[list[Result]]] = []

    def send(self, node: str, batch: Sequence[Op]) -> Deferred[list[Result]]:
        assert node == NODE_ID
        d: Deferred[list[Result]] = Deferred()
        self.batches.append(list(batch))
        self.answers.append(d)
        return d

    def sent_keys(self) -> list[list[str]]:
        return [[op.key for op in batch] for batch in self.batches]

    def answer(self, index: int) -> None:
        """Answer batch ``index`` with one L{echo} per operation."""
        self.answers[index].callback([echo(op) for op in self.batches[index]])


class PipelineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.node = FakeNode()

    def pipeline(self, depth: int = 1, max_queued: int = 10_000) -> NodePipeline:
        return NodePipeline(NODE_ID, self.node.send, self.clock, TIMEOUT, depth, max_queued)

    def submit(self, pipeline: NodePipeline, *names: str) -> list[Deferred[Result]]:
        return [pipeline.submit(GetOp(name)) for name in names]

    def assertEchoes(self, answers: list[Deferred[Result]], names: Sequence[str]) -> None:
        got = [self.successResultOf(d) for d in answers]
        self.assertEqual(got, [echo(GetOp(name)) for name in names])

    def assertNoTimers(self) -> None:
        """Every settled operation cancelled its deadline: nothing is left on the clock."""
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_first_op_leaves_at_once_alone(self) -> None:
        """
        An idle pipeline sends an operation the moment it is submitted, in a
        batch of its own: batching must add no latency when there is no load.
        """
        pipeline = self.pipeline()
        (d,) = self.submit(pipeline, "a")
        self.assertEqual(self.node.sent_keys(), [["a"]])
        self.assertNoResult(d)
        self.node.answer(0)
        self.assertEchoes([d], ["a"])
        self.assertNoTimers()

    def test_ops_wait_for_a_free_slot_and_leave_together(self) -> None:
        """
        With ``depth`` batches out, new operations wait; when one batch
        lands, everything that waited leaves as one batch, in submission
        order, while the other batch is still out.
        """
        pipeline = self.pipeline(depth=2)
        first = self.submit(pipeline, "a", "b")
        self.assertEqual(self.node.sent_keys(), [["a"], ["b"]])
        waiting = self.submit(pipeline, "c", "d", "e")
        self.assertEqual(len(self.node.batches), 2)
        self.assertEqual(pipeline.stats()["queued"], 3)
        for d in waiting:
            self.assertNoResult(d)

        self.node.answer(1)
        self.assertEqual(self.node.sent_keys(), [["a"], ["b"], ["c", "d", "e"]])
        self.assertEchoes(first[1:], ["b"])
        self.assertNoResult(first[0])

        self.node.answer(0)
        self.node.answer(2)
        self.assertEchoes(first[:1] + waiting, ["a", "c", "d", "e"])
        self.assertEqual(len(self.node.batches), 3)
        self.assertNoTimers()

    def test_a_batch_never_exceeds_max_ops(self) -> None:
        """
        MAX_OPS + 10 operations queued behind a busy node leave as a batch of
        MAX_OPS and then one of 10, each op answered by its own result.
        """
        pipeline = self.pipeline()
        names = [f"k{i}" for i in range(MAX_OPS + 11)]
        answers = self.submit(pipeline, *names)
        self.assertEqual([len(b) for b in self.node.batches], [1])
        self.node.answer(0)
        self.assertEqual([len(b) for b in self.node.batches], [1, MAX_OPS])
        self.node.answer(1)
        self.assertEqual([len(b) for b in self.node.batches], [1, MAX_OPS, 10])
        self.node.answer(2)
        self.assertEqual([key for keys in self.node.sent_keys() for key in keys], names)
        self.assertEchoes(answers, names)
        self.assertNoTimers()

    def test_results_are_matched_by_position(self) -> None:
        """The n-th result of a batch answers its n-th operation, puts and gets alike."""
        pipeline = self.pipeline()
        self.submit(pipeline, "first")
        get = pipeline.submit(GetOp("g"))
        put = pipeline.submit(PutOp("p", Record(V2, b"v"), "127.0.0.1:8085"))
        missing = pipeline.submit(GetOp("m"))
        self.node.answer(0)
        self.assertEqual(
            self.node.batches[1],
            [GetOp("g"), PutOp("p", Record(V2, b"v"), "127.0.0.1:8085"), GetOp("m")],
        )
        answers = [
            Result(200, record=Record(V1, b"g")),
            Result(200, applied=True),
            Result(404, error="not_found", message="no record"),
        ]
        self.node.answers[1].callback(answers)
        self.assertEqual(
            [self.successResultOf(d) for d in (get, put, missing)],
            answers,
        )

    def test_a_failed_batch_fails_every_op_in_it(self) -> None:
        """
        A batch that breaks as a whole (the connection dropped mid-request)
        fails every operation in it with that same error, so each caller
        learns the write may have happened; the next batch still leaves.
        """
        pipeline = self.pipeline()
        self.submit(pipeline, "a")
        in_batch = self.submit(pipeline, "b", "c", "d")
        self.node.answer(0)
        later = self.submit(pipeline, "e")
        self.node.answers[1].errback(NodeUnreachable(NODE_ID, "the connection broke", sent=True))
        for d in in_batch:
            error = self.failureResultOf(d, NodeUnreachable).value
            assert isinstance(error, NodeUnreachable)
            self.assertTrue(error.sent)
        self.assertEqual(self.node.sent_keys()[2], ["e"])
        self.node.answer(2)
        self.assertEchoes(later, ["e"])
        self.assertNoTimers()

    def test_an_op_queued_past_its_deadline_is_never_sent(self) -> None:
        """
        The deadline counts from submission. An operation still queued behind
        a stuck batch when it runs out fails with NodeTimeout(sent=False) (a
        write that surely did not happen) and is dropped from the queue.
        """
        pipeline = self.pipeline()
        (stuck,) = self.submit(pipeline, "a")
        self.clock.advance(1.0)
        (queued,) = self.submit(pipeline, "b")
        self.clock.advance(TIMEOUT - 1.0)
        self.assertTrue(self.failureResultOf(stuck, NodeTimeout).value.sent)
        self.assertNoResult(queued)
        self.clock.advance(1.0)
        error = self.failureResultOf(queued, NodeTimeout).value
        assert isinstance(error, NodeTimeout)
        self.assertEqual((error.sent, error.node, error.seconds), (False, NODE_ID, TIMEOUT))

        self.node.answer(0)  # the stuck batch lands at last
        self.assertEqual(self.node.sent_keys(), [["a"]])
        self.assertEqual(pipeline.stats(), {"in_flight": 0, "queued": 0, "batches": 1, "ops": 1})
        self.assertNoTimers()

    def test_time_spent_queued_counts_against_the_deadline(self) -> None:
        """
        An operation that waited 1.5 s in the queue has 0.5 s left once sent,
        and then fails with NodeTimeout(sent=True): its outcome is unknown.
        """
        pipeline = self.pipeline()
        self.submit(pipeline, "a")
        (waited,) = self.submit(pipeline, "b")
        self.clock.advance(1.5)
        self.node.answer(0)
        self.assertEqual(self.node.sent_keys()[1], ["b"])
        self.clock.advance(0.49)
        self.assertNoResult(waited)
        self.clock.advance(0.02)
        error = self.failureResultOf(waited, NodeTimeout).value
        assert isinstance(error, NodeTimeout)
        self.assertTrue(error.sent)

    def test_a_late_answer_is_ignored(self) -> None:
        """
        An operation sent but not answered by its deadline fails with
        NodeTimeout(sent=True); the answer (or failure) arriving afterwards
        changes nothing, logs no error, and frees the slot for the next batch.
        """
        pipeline = self.pipeline()
        (late_ok,) = self.submit(pipeline, "a")
        self.clock.advance(TIMEOUT)
        self.assertTrue(self.failureResultOf(late_ok, NodeTimeout).value.sent)
        (late_fail,) = self.submit(pipeline, "b")
        self.assertEqual(len(self.node.batches), 1, "sent while the first batch was out")

        self.node.answer(0)
        self.assertEqual(self.node.sent_keys(), [["a"], ["b"]])
        self.clock.advance(TIMEOUT)
        self.failureResultOf(late_fail, NodeTimeout)
        self.node.answers[1].errback(NodeUnreachable(NODE_ID, "reset", sent=True))

        gc.collect()  # an unhandled failure in a Deferred is logged when it is collected
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(pipeline.in_flight, 0)
        (d,) = self.submit(pipeline, "c")
        self.assertEqual(self.node.sent_keys()[-1], ["c"])
        self.node.answer(2)
        self.assertEchoes([d], ["c"])
        self.assertNoTimers()

    def test_a_cancelled_queued_op_is_never_sent(self) -> None:
        """
        A caller that gives up (the client hung up) cancels its operation;
        one still queued is dropped, so the node never does work nobody
        waits for; once nothing is left waiting, the deadline timer goes too.
        """
        pipeline = self.pipeline()
        self.submit(pipeline, "a")
        b, c = self.submit(pipeline, "b", "c")
        b.cancel()
        self.failureResultOf(b, CancelledError)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1, "one timer per pipeline")
        self.node.answer(0)
        self.assertEqual(self.node.sent_keys(), [["a"], ["c"]])
        self.node.answer(1)
        self.assertEchoes([c], ["c"])
        self.assertNoTimers()

    def test_a_cancelled_sent_op_ignores_its_answer(self) -> None:
        """
        Cancelling an operation already sent settles it at once; when its
        batch lands, its neighbours get their results and its own is dropped
        without an error.
        """
        pipeline = self.pipeline()
        self.submit(pipeline, "a")
        b, c = self.submit(pipeline, "b", "c")
        self.node.answer(0)
        self.assertEqual(self.node.sent_keys()[1], ["b", "c"])
        b.cancel()
        self.failureResultOf(b, CancelledError)
        self.node.answer(1)
        self.assertEchoes([c], ["c"])
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertNoTimers()

    def test_a_batch_nobody_waits_for_is_cancelled(self) -> None:
        """
        Once every operation of a sent batch is cancelled (all their clients
        hung up), the batch itself is cancelled, so the node's connection is
        closed rather than left to answer no one; a batch with one live
        operation left goes on, and the freed slot sends the next batch.
        """
        pipeline = self.pipeline()
        self.submit(pipeline, "a")
        b, c = self.submit(pipeline, "b", "c")
        self.node.answer(0)
        b.cancel()
        self.assertFalse(self.node.answers[1].called)
        c.cancel()
        self.assertTrue(self.node.answers[1].called)
        for gone in (b, c):
            self.failureResultOf(gone, CancelledError)
        (d,) = self.submit(pipeline, "d")
        self.assertEqual(self.node.sent_keys()[2], ["d"])
        self.node.answer(2)
        self.assertEchoes([d], ["d"])
        self.assertNoTimers()

    def test_a_full_queue_answers_busy_at_once(self) -> None:
        """
        Past ``max_queued`` waiting operations, a submit fails immediately
        with NodeBusy and sends nothing: memory stays bounded when a node
        falls behind, and the node is not taken for dead.
        """
        pipeline = self.pipeline(max_queued=2)
        self.submit(pipeline, "a", "b", "c")
        (d,) = self.submit(pipeline, "d")
        error = self.failureResultOf(d, NodeBusy).value
        assert isinstance(error, NodeBusy)
        self.assertEqual((error.node, error.queued), (NODE_ID, 2))
        self.assertEqual(pipeline.stats()["queued"], 2)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1, "one timer per pipeline")

        self.node.answer(0)
        self.assertEqual(self.node.sent_keys(), [["a"], ["b", "c"]])
        (e,) = self.submit(pipeline, "e")
        self.assertNoResult(e)

    def test_stats_count_batches_and_ops(self) -> None:
        """
        stats() shows what is out and waiting, and how many batches and
        operations were sent, so an operator can see batching happen.
        """
        pipeline = self.pipeline()
        empty = {"in_flight": 0, "queued": 0, "batches": 0, "ops": 0}
        self.assertEqual(pipeline.stats(), empty)
        self.submit(pipeline, "a", "b", "c", "d")
        self.assertEqual(pipeline.stats(), {"in_flight": 1, "queued": 3, "batches": 1, "ops": 1})
        self.node.answer(0)
        self.assertEqual(pipeline.stats(), {"in_flight": 1, "queued": 0, "batches": 2, "ops": 4})
        self.node.answer(1)
        self.assertEqual(pipeline.stats(), {"in_flight": 0, "queued": 0, "batches": 2, "ops": 4})


# -- the node's POST /replica/batch -------------------------------------------------


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


class NodeBatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(5.0)
        self.engine = FaultyEngine()
        self.node = self.make_node(DEFAULT_MAX_VALUE_BYTES)
        self.stub = StubTreq(self.node.app.resource())
        self.http = HTTP(self, self.stub, "http://" + NODE_ID, flusher(self.stub))

    def make_node(self, max_value_bytes: int) -> NodeApp:
        def now_ms() -> int:
            return int(self.clock.seconds() * 1000)

        return NodeApp(NODE_ID, self.engine, VersionClock(NODE_ID, now_ms), max_value_bytes, now_ms)

    def send(self, batch: Sequence[Op], http: HTTP | None = None) -> list[Result]:
        reply = (http or self.http).post_raw("/replica/batch", encode_request(batch))
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual(reply.header("content-type"), "application/json")
        return decode_response(reply.body, len(batch))

    def client(self) -> tuple[NodeClient, NetworkFaults]:
        """A pipelining NodeClient for this node, and the log of what it sent."""
        calls = NetworkFaults(self.stub, self.clock)
        return NodeClient(calls, self.clock, TIMEOUT, pipeline_depth=1), calls

    def wait(self, d: Deferred[Any]) -> Any:
        flusher(self.stub)(d)
        return self.successResultOf(d)

    def test_mixed_batch_gives_one_result_per_op(self) -> None:
        """
        Gets, puts and hinted puts in one batch each get the answer they
        would get alone: a hint is kept apart from the node's own records,
        an older version is not applied, and stored records get the node's
        own clock as stored_ms.
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
                Result(200, applied=True),
                Result(200, applied=True),
                Result(200, applied=False),
                Result(200, record=Record.deleted(V1)),
            ],
        )
        stored = self.engine.get("new")
        assert stored is not None
        self.assertTrue(new.same_data(stored))
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
        self.assertEqual(results[1], Result(200, applied=True))
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
        self.assertEqual(ok, Result(200, applied=True))

        client, _ = self.client()
        d = client.replica_put(NODE_ID, "full", Record(V1, b"x"))
        flusher(self.stub)(d)
        error = self.failureResultOf(d, ApiError).value
        assert isinstance(error, ApiError)
        self.assertEqual((error.status, error.code), (507, "insufficient_storage"))

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
            _body({"ops": "get"}),
            _ops(valid, {"op": "get", "key": ""}),
            _ops(valid, {"op": "frobnicate", "key": "k"}),
            _ops(*[valid] * (MAX_OPS + 1)),
        ]:
            reply = self.http.post_raw("/replica/batch", body)
            self.assertEqual(reply.error(), (400, "invalid_batch"), reply.body)
        self.assertIsNone(self.engine.get("applied?"))

    def test_an_oversized_body_is_refused_before_it_is_read(self) -> None:
        """
        The node's site refuses a batch declaring more than MAX_REQUEST_BYTES
        with a JSON 413 as soon as the headers are in (no body was sent at
        all), and lets one at the limit through to be read.
        """
        limit = body_limit_for(DEFAULT_MAX_VALUE_BYTES, replica_routes=True)
        self.assertEqual(limit(b"POST", b"/replica/batch"), MAX_REQUEST_BYTES)
        self.assertEqual(limit(b"GET", b"/replica/batch"), SMALL_BODY_LIMIT)
        proxy_limit = body_limit_for(DEFAULT_MAX_VALUE_BYTES)
        self.assertEqual(proxy_limit(b"POST", b"/replica/batch"), SMALL_BODY_LIMIT)

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

    def test_a_large_record_is_fetched_on_its_own(self) -> None:
        """
        A record too large to answer inline comes back ``inline: false`` in
        the batch, and NodeClient.replica_get then fetches it with a single
        GET, so the caller still gets the whole record.
        """
        large = Record(V2, bytes(range(256)) * 300, "image/png")
        self.assertFalse(fits(large))
        self.engine.put("large", large)
        (result,) = self.send([GetOp("large")])
        self.assertEqual(result, Result(200, inline=False))

        client, calls = self.client()
        got = self.wait(client.replica_get(NODE_ID, "large"))
        self.assertTrue(large.same_data(got))
        self.assertEqual(
            [(c.method, c.path) for c in calls.calls],
            [("POST", "/replica/batch"), ("GET", "/replica/kv/large")],
        )

    def test_a_record_that_does_not_fit_is_put_on_its_own(self) -> None:
        """
        NodeClient.replica_put sends a record over the inline limit as a
        single /replica/kv PUT (hint target included), and one at the limit
        in a batch.
        """
        client, calls = self.client()
        large = Record(V2, b"L" * (MAX_INLINE_VALUE + 1), "text/plain")
        edge = Record(V2, b"E" * MAX_INLINE_VALUE, "text/plain")
        self.assertTrue(self.wait(client.replica_put(NODE_ID, "large", large)))
        self.assertTrue(self.wait(client.replica_put(NODE_ID, "hint", large, "127.0.0.1:8085")))
        self.assertTrue(self.wait(client.replica_put(NODE_ID, "edge", edge)))
        self.assertEqual(
            [(c.method, c.path, c.hint_for) for c in calls.calls],
            [
                ("PUT", "/replica/kv/large", None),
                ("PUT", "/replica/kv/hint", "127.0.0.1:8085"),
                ("POST", "/replica/batch", None),
            ],
        )
        self.assertTrue(large.same_data(self.engine.get("large")))
        self.assertTrue(edge.same_data(self.engine.get("edge")))
        self.assertEqual([k for k, _ in self.engine.hints("127.0.0.1:8085")], ["hint"])
        self.assertEqual(client.pipeline_stats(NODE_ID)["write"]["ops"], 1)


# -- batching through the proxy ------------------------------------------------------

RTT = 0.01
"""How long each node takes to answer in the batching tests (clock time)."""


class ClusterBatchingTests(SynchronousTestCase):
    """
    A 3-node cluster (N=3, R=2, W=2) whose proxy batches. Nodes answer
    after RTT of clock time, so requests started together overlap the way
    they do under real load and their replica operations share batches.
    """

    cluster: MemoryCluster
    http: HTTP
    faults: NetworkFaults

    def use(self, pipeline_depth: int = 1, slow: bool = True) -> None:
        self.cluster = memory_cluster(NODES_3, TIMEOUT, pipeline_depth=pipeline_depth)
        self.http = cluster_http(self, self.cluster)
        self.faults = NetworkFaults(self.cluster.network.inner, self.cluster.clock)
        self.cluster.network.inner = self.faults
        if slow:
            self.faults.delay.update(dict.fromkeys(NODES_3, RTT))

    def run_all(self, requests: list[Deferred[Reply]]) -> list[Reply]:
        """Move the clock an RTT at a time until every request is answered."""
        for _ in range(100):
            settle(self.cluster)
            if all(answered(d) for d in requests):
                break
            self.cluster.clock.advance(RTT)
        return [self.successResultOf(d) for d in requests]

    def put(self, key: str, value: bytes, ctype: str = "text/plain") -> Deferred[Reply]:
        return self.http.start("PUT", "/kv/" + key, value, {"Content-Type": ctype})

    def get(self, key: str) -> Deferred[Reply]:
        return self.http.start("GET", "/kv/" + key)

    def assertBatched(self) -> None:
        """Every pipeline is idle, sent fewer batches than ops, and only batches went out."""
        total = 0
        for node in NODES_3:
            stats = self.cluster.client.pipeline_stats(node)
            self.assertEqual(sorted(stats), ["read", "write"])
            for kind, s in stats.items():
                self.assertEqual((s["in_flight"], s["queued"]), (0, 0), (node, kind))
                self.assertLess(s["batches"], s["ops"], (node, kind, s))
                total += s["batches"]
        self.assertEqual(
            {(c.method, c.path) for c in self.faults.calls}, {("POST", "/replica/batch")}
        )
        self.assertEqual(len(self.faults.calls), total)

    def test_concurrent_requests_share_batches_and_answer_correctly(self) -> None:
        """
        Thirty writes started together, then reads, new writes and misses
        mixed together, all answer exactly as they would unbatched, every
        replica ends with the newest value, and the proxy sent far fewer
        batches than replica operations.
        """
        self.use()
        names = [f"key-{i}" for i in range(30)]
        created = self.run_all([self.put(n, b"v1 " + n.encode()) for n in names])
        self.assertEqual({r.code for r in created}, {201})

        mixed: list[tuple[str, str, Deferred[Reply]]] = []
        for i, name in enumerate(names):
            if i % 3 == 0:
                mixed.append(("put", name, self.put(name, b"v2 " + name.encode(), "text/x-v2")))
            else:
                mixed.append(("get", name, self.get(name)))
            if i % 6 == 0:
                mixed.append(("miss", f"missing-{i}", self.get(f"missing-{i}")))
        replies = self.run_all([d for _, _, d in mixed])
        for (kind, name, _), reply in zip(mixed, replies, strict=True):
            if kind == "put":
                self.assertEqual(reply.code, 200, reply.body)
            elif kind == "miss":
                self.assertEqual(reply.error(), (404, "not_found"))
            else:
                self.assertEqual((reply.code, reply.body), (200, b"v1 " + name.encode()))
                self.assertEqual(reply.header("content-type"), "text/plain")
        settle(self.cluster)

        for i, name in enumerate(names):
            value, ctype = (b"v2 ", "text/x-v2") if i % 3 == 0 else (b"v1 ", "text/plain")
            for node in NODES_3:
                record = self.cluster.nodes[node].engine.get(name)
                assert record is not None, (node, name)
                self.assertEqual(
                    (record.value, record.content_type), (value + name.encode(), ctype)
                )
        self.assertBatched()

    def test_depth_zero_makes_no_pipelines(self) -> None:
        """With pipeline_depth=0 every replica operation is its own request, as before batching."""
        self.use(pipeline_depth=0)
        replies = self.run_all([self.put("a", b"1"), self.put("b", b"2")])
        self.assertEqual({r.code for r in replies}, {201})
        self.assertEqual(self.run_all([self.get("a")])[0].body, b"1")
        self.assertEqual(self.cluster.client.pipelines, {})
        self.assertEqual(self.cluster.client.pipeline_stats(NODES_3[0]), {})
        self.assertTrue(self.faults.calls)
        self.assertTrue(all(c.path.startswith("/replica/kv/") for c in self.faults.calls))

    def test_a_hung_node_does_not_hold_up_batches_to_the_others(self) -> None:
        """
        With one replica hung, its batch never comes back and its ops queue,
        but reads answer from the other two and writes reach W=2 without
        the clock moving. Once the timeout passes the hung node's ops fail
        with NodeTimeout, its queue drains, it is marked down, and the
        writes it missed are kept as hints on the others.
        """
        self.use(slow=False)
        hung = NODES_3[0]
        live = NODES_3[1:]
        self.cluster.network.hung.add(hung)
        names = [f"h{i}" for i in range(10)]

        writes = [self.put(n, n.encode()) for n in names]
        for d in writes:
            self.http.pump(d)
        self.assertEqual([self.successResultOf(d).code for d in writes], [201] * 10)
        reads = [self.get(n) for n in names]
        for d in reads:
            self.http.pump(d)
        self.assertEqual([self.successResultOf(d).body for d in reads], [n.encode() for n in names])
        for name in names:
            self.assertIsNone(self.cluster.nodes[hung].engine.get(name))
            for node in live:
                self.assertIsNotNone(self.cluster.nodes[node].engine.get(name))

        stats = self.cluster.client.pipeline_stats(hung)
        self.assertEqual(
            {kind: s["in_flight"] for kind, s in stats.items()}, {"read": 1, "write": 1}
        )
        self.assertEqual(stats["read"]["queued"], 19)
        self.assertEqual(stats["write"]["queued"], 9)

        probe = self.cluster.client.replica_get(hung, "h0")
        self.assertNoResult(probe)
        self.cluster.clock.advance(TIMEOUT + 0.01)
        self.failureResultOf(probe, NodeTimeout)
        self.cluster.clock.advance(TIMEOUT + 0.01)  # the batch that took the queue times out too
        settle(self.cluster)
        for kind, s in self.cluster.client.pipeline_stats(hung).items():
            self.assertEqual((s["in_flight"], s["queued"]), (0, 0), kind)
        self.assertTrue(self.cluster.health.is_down(hung))
        for name in names:
            kept = hints_for_key(self.cluster, name)
            self.assertEqual([t for targets in kept.values() for t in targets], [hung])
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_a_long_content_type_does_not_fail_its_batch(self) -> None:
        """
        The proxy takes any ASCII Content-Type a client sends. A write with a
        long one (2000 characters) must not make the node refuse the batch it
        travels in, failing the unrelated writes beside it; it should be
        stored like any other.
        """
        self.use()
        ctype = "application/x." + "a" * 2000
        requests = [self.put(f"n{i}", b"v") for i in range(2)]
        requests.append(self.put("long", b"x", ctype))
        requests += [self.put(f"n{i}", b"v") for i in range(2, 5)]
        replies = self.run_all(requests)
        self.assertEqual([r.code for r in replies], [201] * 6, [r.body[:200] for r in replies])
        got = self.run_all([self.get("long")])[0]
        self.assertEqual((got.code, got.header("content-type")), (200, ctype))

    def test_a_stored_long_content_type_reads_in_a_batch(self) -> None:
        """
        A record with a long content type written without batching (depth 0
        is a supported setting) must stay readable once batching is on, and
        must not fail the other reads that share its batch.
        """
        self.use(pipeline_depth=0)
        ctype = "application/x." + "a" * 2000
        self.assertEqual(self.run_all([self.put("long", b"x", ctype)])[0].code, 201)
        self.assertEqual(self.run_all([self.put("short", b"y")])[0].code, 201)
        self.cluster.client.pipeline_depth = 1
        replies = self.run_all([self.get("short"), self.get("long"), self.get("short")])
        self.assertEqual([r.code for r in replies], [200] * 3, [r.body[:200] for r in replies])
        self.assertEqual(replies[1].header("content-type"), ctype)
