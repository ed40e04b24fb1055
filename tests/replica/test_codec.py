"""
Tests for L{shardkv.replica.codec}, the batch wire format between proxy and node.

Batching must be invisible to clients, so every key, value, version, content
type and hint target must come out of a batch exactly as it went in; every
malformed body, either way, must be a L{BatchError} (a 400 or a 502 for the
batch, never a crash); and the largest batch a proxy can build must fit the
body limit a node enforces.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shardkv.core.keys import MAX_KEY_BYTES, check_key
from shardkv.core.records import Record
from shardkv.core.versions import Version
from shardkv.replica.codec import (
    MAX_CONTENT_TYPE,
    MAX_INLINE_VALUE,
    MAX_OPS,
    MAX_REQUEST_BYTES,
    MAX_STREAM_BYTES,
    MAX_STREAM_OPS,
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
    fits_stream,
    stream_cost,
)
from tests.helpers import U64, WRITER_ALPHABET
from tests.replica.helpers import GOOD_RECORD, V1, V2, json_bytes, ops_body

# No example database: the tests must not leave a .hypothesis/ in the tree,
# and a deadline only makes a loaded CI machine flaky.
PROPERTY = settings(database=None, deadline=None, max_examples=150)


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
    # Stored and served as an HTTP header: printable ASCII; the node refuses anything else.
    st.text(
        st.sampled_from([chr(c) for c in range(0x20, 0x7F)] + ["\t"]), max_size=MAX_CONTENT_TYPE
    ),
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
        applied=st.booleans(),
        held=st.one_of(st.none(), versions),
        live=st.booleans(),
    ),
    st.builds(
        Result,
        statuses,
        error=st.text(utf8_chars, min_size=1, max_size=40),
        message=st.text(utf8_chars, max_size=200),
    ),
)


@PROPERTY
@given(st.lists(ops, max_size=MAX_OPS))
@example([PutOp("\x01" * MAX_KEY_BYTES, Record(V1, b"\x00\xff", '"'), "\x01" * MAX_KEY_BYTES)])
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
    return json_bytes({"ops": [item]})


DEEP = b"[" * 100_000 + b"]" * 100_000

MALFORMED_REQUESTS = [
    ("not JSON", b"ops: get k"),
    ("empty", b""),
    ("not UTF-8", b'{"ops": [{"op": "get", "key": "\xff"}]}'),
    ("a list", b"[]"),
    ("null", b"null"),
    ("no ops", json_bytes({"op": []})),
    ("ops not a list", json_bytes({"ops": {"op": "get", "key": "k"}})),
    ("op not an object", ops_body("get k")),
    ("unknown op", ops_body({"op": "delete", "key": "k"})),
    ("no op", ops_body({"key": "k"})),
    ("no key", ops_body({"op": "get"})),
    ("key not a string", ops_body({"op": "get", "key": 7})),
    ("empty key", ops_body({"op": "get", "key": ""})),
    ("key too long", ops_body({"op": "get", "key": "k" * (MAX_KEY_BYTES + 1)})),
    ("key too long in bytes", ops_body({"op": "get", "key": "é" * (MAX_KEY_BYTES // 2 + 1)})),
    ("put without record", ops_body({"op": "put", "key": "k"})),
    ("record not an object", ops_body({"op": "put", "key": "k", "record": ["1-1-w"]})),
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
    ("content_type not ASCII", _put(content_type="text/plain; charset=caf\u00e9")),
    ("content_type with a control character", _put(content_type="text/plain\x01")),
    ("content_type with a newline", _put(content_type="text/plain\r\nX-Evil: 1")),
    ("hint_for not a string", _put(hint_for=5)),
    ("too many ops", ops_body(*[{"op": "get", "key": f"k{i}"} for i in range(MAX_OPS + 1)])),
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
    return json_bytes({"results": [{"status": 200, "record": {**GOOD_RECORD, **record}}]})


MALFORMED_RESPONSES = [
    ("not JSON", b"<html>502 Bad Gateway</html>", 1),
    ("a list", b"[]", 1),
    ("no results", json_bytes({"result": []}), 1),
    ("results not a list", json_bytes({"results": {"status": 200}}), 1),
    ("too few results", json_bytes({"results": [{"status": 200}]}), 2),
    ("too many results", json_bytes({"results": [{"status": 200}, {"status": 200}]}), 1),
    ("no results for one op", json_bytes({"results": []}), 1),
    ("result not an object", json_bytes({"results": [200]}), 1),
    ("no status", json_bytes({"results": [{"applied": True}]}), 1),
    ("status a string", json_bytes({"results": [{"status": "200"}]}), 1),
    ("record not an object", json_bytes({"results": [{"status": 200, "record": "x"}]}), 1),
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
    json_values.map(json_bytes),
    st.lists(_maybe(op_like), max_size=4).map(lambda items: json_bytes({"ops": items})),
)
response_bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(json_bytes),
    st.lists(_maybe(result_like), max_size=4).map(lambda items: json_bytes({"results": items})),
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
    record = Record(version, b"\xff" * MAX_INLINE_VALUE, '"' * MAX_CONTENT_TYPE, False)
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


def test_fits_wants_a_short_ascii_content_type() -> None:
    """
    A content type travels as a JSON string but is stored and served as an
    HTTP header, so a batch only takes ASCII up to MAX_CONTENT_TYPE; longer
    or non-ASCII ones go on their own.
    """
    assert fits(Record(V1, b"x", "a" * MAX_CONTENT_TYPE))
    assert not fits(Record(V1, b"x", "a" * (MAX_CONTENT_TYPE + 1)))
    assert not fits(Record(V1, b"x", "text/plain; charset=caf\u00e9"))
    assert not fits(Record(V1, b"x", "text/plain\x00"))
    assert fits(Record.deleted(V2))


def test_a_put_without_hint_for_sends_no_hint_field() -> None:
    """
    An unhinted put carries no ``hint_for`` at all, and an empty one reads
    as none, so a node never keeps a hint for a node named "".
    """
    body = encode_request([PutOp("k", Record(V1, b"x"))])
    assert b"hint_for" not in body
    hinted = ops_body({"op": "put", "key": "k", "record": GOOD_RECORD, "hint_for": ""})
    assert decode_request(hinted) == [PutOp("k", Record(Version(1, 1, "w"), b"x", "text/plain"))]


def test_each_result_kind_is_written_with_only_its_own_fields() -> None:
    """
    An error result carries its code and message but no record, a result
    left out of line says so and nothing else, and a write says applied.
    """
    body = encode_response(
        [
            Result(507, error="insufficient_storage", message="full"),
            Result(200, inline=False),
            Result(200, applied=True),
        ]
    )
    assert json.loads(body) == {
        "results": [
            {"status": 507, "error": "insufficient_storage", "message": "full"},
            {"status": 200, "inline": False},
            {"status": 200, "applied": True},
        ]
    }


def test_a_put_says_what_the_node_held() -> None:
    """
    A put's result may say what the node held before it (``held``, left out
    when nothing) and whether that was live; a result without ``live`` is a
    node that does not say (an older one, or a hint), read as None.
    """
    body = encode_response(
        [
            Result(200, applied=False, held=V2, live=True),
            Result(200, applied=True, live=False),
            Result(200, applied=True),
        ]
    )
    assert json.loads(body)["results"] == [
        {"status": 200, "applied": False, "live": True, "held": str(V2)},
        {"status": 200, "applied": True, "live": False},
        {"status": 200, "applied": True},
    ]
    old, new = decode_response(
        b'{"results": [{"status": 200, "applied": true}, '
        b'{"status": 200, "applied": false, "live": false, "held": "' + str(V1).encode() + b'"}]}',
        2,
    )
    assert (old.live, old.held) == (None, None)
    assert (new.applied, new.live, new.held) == (False, False, V1)


@pytest.mark.parametrize(
    "item",
    [
        {"status": 200, "applied": True, "live": "yes"},
        {"status": 200, "applied": False, "live": True, "held": 7},
        {"status": 200, "applied": False, "live": True, "held": "not-a-version"},
    ],
)
def test_a_malformed_held_or_live_is_a_batch_error(item: dict[str, Any]) -> None:
    with pytest.raises(BatchError):
        decode_response(json.dumps({"results": [item]}).encode(), 1)


# -- the stream's bounds ---------------------------------------------------------


def test_a_stream_takes_max_stream_ops_and_a_batch_still_max_ops() -> None:
    """
    A move's stream decodes with max_ops=MAX_STREAM_OPS; the batch route's
    default stays MAX_OPS, so a proxy's batch is bounded as before.
    """
    puts = [{"op": "put", "key": f"k{i}", "record": GOOD_RECORD} for i in range(MAX_STREAM_OPS)]
    assert len(decode_request(ops_body(*puts), max_ops=MAX_STREAM_OPS)) == MAX_STREAM_OPS
    with pytest.raises(BatchError, match=f"at most {MAX_STREAM_OPS} operations"):
        decode_request(ops_body(*puts, puts[0]), max_ops=MAX_STREAM_OPS)
    with pytest.raises(BatchError, match=f"at most {MAX_OPS} operations"):
        decode_request(ops_body(*puts[: MAX_OPS + 1]))


@PROPERTY
@given(keys, records)
def test_stream_cost_bounds_what_a_record_adds_to_a_stream_body(key: str, record: Record) -> None:
    """A sender that adds up stream_cost never builds a body over its bound."""
    empty = len(encode_request([]))
    one = len(encode_request([PutOp(key, record)]))
    assert one - empty <= stream_cost(key, record)


def test_a_full_stream_of_worst_case_records_fits_max_stream_bytes() -> None:
    """
    Records as costly as JSON makes them (escaped keys and content types,
    the longest versions), as many as their costs allow under
    MAX_STREAM_BYTES, encode within MAX_STREAM_BYTES, and decode.
    """
    key = "\x01" * MAX_KEY_BYTES
    record = Record(Version(U64, U64, "w" * 128), b"\xff" * 4096, '"' * MAX_CONTENT_TYPE)
    assert fits_stream(key, record)
    count = min(MAX_STREAM_OPS, MAX_STREAM_BYTES // stream_cost(key, record))
    body = encode_request([PutOp(key, record)] * count)
    assert len(body) <= MAX_STREAM_BYTES
    assert len(decode_request(body, max_ops=MAX_STREAM_OPS)) == count


def test_fits_stream_wants_a_batchable_content_type_and_a_bounded_cost() -> None:
    assert fits_stream("k", Record(V1, b"x" * (1 << 20)))  # a value at the node's default limit
    assert fits_stream("k", Record.deleted(V2))
    assert not fits_stream("k", Record(V1, b"x" * MAX_STREAM_BYTES))
    assert not fits_stream("k", Record(V1, b"x", "a" * (MAX_CONTENT_TYPE + 1)))
    assert not fits_stream("k", Record(V1, b"x", "text/plain\x00"))
