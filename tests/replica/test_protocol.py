"""
Tests for L{shardkv.replica.protocol}: the replica routes' paths and headers.

Both ends build and read these, so a path must name exactly the key that was
encoded (a "/" or "?" in a key must not become a path separator or a query)
and the headers must carry everything of a record but its value.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardkv.core.keys import MAX_KEY_BYTES, key_from_path
from shardkv.core.records import DEFAULT_CONTENT_TYPE, Record
from shardkv.core.versions import Version, VersionError
from shardkv.replica.protocol import (
    MAX_CONTENT_TYPE,
    REPLICA_KV_PREFIX,
    TOMBSTONE_HEADER,
    VERSION_HEADER,
    InvalidContentType,
    check_content_type,
    key_path,
    record_from_headers,
    record_headers,
    replica_put_path,
)
from tests.replica.helpers import V1, V2

PROPERTY = settings(database=None, deadline=None, max_examples=200)


@pytest.mark.parametrize(
    ("key", "path"),
    [
        ("k", "/replica/kv/k"),
        ("a/b", "/replica/kv/a%2Fb"),
        ("/lead", "/replica/kv/%2Flead"),
        ("café", "/replica/kv/caf%C3%A9"),
        ("🙂", "/replica/kv/%F0%9F%99%82"),
        ("q?x=1#f", "/replica/kv/q%3Fx%3D1%23f"),
        ("100% + sp ace", "/replica/kv/100%25%20%2B%20sp%20ace"),
        ("..", "/replica/kv/.."),
    ],
)
def test_key_path_percent_encodes_every_reserved_byte(key: str, path: str) -> None:
    assert key_path(key) == path


def test_key_path_takes_another_prefix() -> None:
    assert key_path("a/b", "/kv/") == "/kv/a%2Fb"
    assert REPLICA_KV_PREFIX == "/replica/kv/"


@PROPERTY
@given(st.text(st.characters(codec="utf-8"), min_size=1, max_size=200))
def test_key_path_decodes_back_to_the_key(key: str) -> None:
    """
    The node reads the key from the raw path after the prefix: whatever the
    key, that is one path segment that decodes to the same key.
    """
    path = key_path(key)
    assert path.startswith(REPLICA_KV_PREFIX)
    segment = path[len(REPLICA_KV_PREFIX) :]
    assert "/" not in segment and "?" not in segment and "#" not in segment
    assert segment.isascii()
    if len(key.encode("utf-8")) <= MAX_KEY_BYTES:
        assert key_from_path(segment.encode("ascii")) == key


@pytest.mark.parametrize(
    ("hint_for", "path"),
    [
        (None, "/replica/kv/a%2Fb"),
        ("127.0.0.1:8085", "/replica/kv/a%2Fb?hint_for=127.0.0.1%3A8085"),
        ("n&x=1", "/replica/kv/a%2Fb?hint_for=n%26x%3D1"),
    ],
)
def test_replica_put_path_names_the_hint_target(hint_for: str | None, path: str) -> None:
    """
    A hinted put names the node it is kept for in ``?hint_for=``, escaped so
    that a target with "&" or "=" cannot add query arguments of its own.
    """
    got = replica_put_path("a/b", hint_for)
    assert got == path
    query = parse_qs(urlsplit(got).query)
    assert query == ({} if hint_for is None else {"hint_for": [hint_for]})


@pytest.mark.parametrize(
    "record",
    [
        Record(V1, b"value", "text/plain; charset=utf-8"),
        Record(V2, b"", ""),
        Record.deleted(V2),
        Record(V1, b"\x00\xff", "application/octet-stream"),
    ],
)
def test_record_headers_round_trip(record: Record) -> None:
    headers = record_headers(record)
    assert headers[VERSION_HEADER] == str(record.version).encode()
    assert headers[TOMBSTONE_HEADER] == (b"1" if record.tombstone else b"0")
    back = record_from_headers(
        headers[VERSION_HEADER], headers[TOMBSTONE_HEADER], headers[b"Content-Type"], record.value
    )
    assert back == record


def test_missing_headers_read_as_a_live_record_without_content_type() -> None:
    """Only the version is required: no tombstone header is a live record, no type is ""."""
    assert record_from_headers(b"1-1000-n1", None, None, b"v") == Record(V1, b"v", "")
    assert not record_from_headers(b"1-1000-n1", b"true", None, b"").tombstone


@pytest.mark.parametrize("version", [None, b"", b"yesterday", b"0-1-w", b"1-1-a b", b"\xff-1-w"])
def test_a_bad_version_header_raises_version_error(version: bytes | None) -> None:
    """
    A record is only as good as its version; without one that parses there
    is no record, and the caller turns the VersionError into a 400 or a
    BadReplicaAnswer.
    """
    with pytest.raises(VersionError):
        record_from_headers(version, b"0", b"text/plain", b"v")


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain; charset=caf\u00e9",
        "text/plain\x01",
        "text/plain\x7f",
        "a" * (MAX_CONTENT_TYPE + 1),
    ],
)
def test_the_content_type_rule(content_type: str) -> None:
    """Printable ASCII up to MAX_CONTENT_TYPE characters, and nothing else."""
    with pytest.raises(InvalidContentType):
        check_content_type(content_type)


@pytest.mark.parametrize("content_type", ["", "a" * MAX_CONTENT_TYPE, "text/plain;\tq=1", " ~"])
def test_the_content_type_rule_takes_header_text(content_type: str) -> None:
    assert check_content_type(content_type) == content_type


@pytest.mark.parametrize(
    "raw", ["caf\u00e9".encode(), b"\xff", b"text\x00", b"a" * (MAX_CONTENT_TYPE + 1)]
)
def test_a_node_taking_a_write_refuses_a_bad_content_type(raw: bytes) -> None:
    """
    Stored, a non-ASCII content type made every later read of the key fail
    (the node could not send it back as a header): a node refuses it at the
    door, and a reader of a node's answer reads it as the default.
    """
    with pytest.raises(InvalidContentType):
        record_from_headers(b"1-1000-n1", b"0", raw, b"v", strict=True)
    lenient = record_from_headers(b"1-1000-n1", b"0", raw, b"v")
    assert lenient == Record(V1, b"v", DEFAULT_CONTENT_TYPE)


def test_a_stored_bad_content_type_is_sent_as_the_default() -> None:
    """A record stored before the rule existed stays readable."""
    record = Record(Version(1, 1, "w"), b"v", "caf\u00e9")
    assert record_headers(record)[b"Content-Type"] == DEFAULT_CONTENT_TYPE.encode()
