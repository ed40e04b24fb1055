"""
Tests for L{shardkv.web.dataroutes} that need no app: the body limit per route
and the per-request quorum settings.

The routes themselves are tested through each app (the data API contract);
here are the rules they are built from. The body limit is checked before a
body is read, so a route that gets too small a limit refuses good requests
with 413, and one that gets too large a limit lets a client make the server
buffer what it will refuse anyway.
"""

from __future__ import annotations

from typing import cast

import pytest
from twisted.web.iweb import IRequest
from twisted.web.test.requesthelper import DummyRequest

from shardkv.core.quorum import Consistency
from shardkv.errors import InvalidRequest
from shardkv.replica.codec import MAX_REQUEST_BYTES
from shardkv.web.dataroutes import (
    DEFAULT_MAX_VALUE_BYTES,
    JSON_ENVELOPE_SLACK,
    SMALL_BODY_LIMIT,
    body_limit_for,
    consistency,
)

MAX_VALUE = 1000


def test_the_batch_route_takes_large_bodies_on_nodes_only() -> None:
    """
    A node takes a batch of up to MAX_REQUEST_BYTES; any other method on
    that path, and the same path on a proxy, gets the small limit.
    """
    limit = body_limit_for(DEFAULT_MAX_VALUE_BYTES, replica_routes=True)
    assert limit(b"POST", b"/replica/batch") == MAX_REQUEST_BYTES
    assert limit(b"GET", b"/replica/batch") == SMALL_BODY_LIMIT
    proxy_limit = body_limit_for(DEFAULT_MAX_VALUE_BYTES)
    assert proxy_limit(b"POST", b"/replica/batch") == SMALL_BODY_LIMIT


@pytest.mark.parametrize("replica_routes", [False, True], ids=["proxy", "node"])
@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        (b"PUT", b"/kv/k", MAX_VALUE),
        (b"PUT", b"/kv/a%2Fb", MAX_VALUE),
        (b"POST", b"/set", 6 * MAX_VALUE + JSON_ENVELOPE_SLACK),
        (b"POST", b"/delete", 6 * MAX_VALUE + JSON_ENVELOPE_SLACK),
        (b"GET", b"/kv/k", SMALL_BODY_LIMIT),
        (b"POST", b"/kv/k", SMALL_BODY_LIMIT),
        (b"PUT", b"/set", SMALL_BODY_LIMIT),
        (b"POST", b"/settings", SMALL_BODY_LIMIT),
        (b"PUT", b"/kvx", SMALL_BODY_LIMIT),
    ],
)
def test_data_routes_get_the_same_limit_on_node_and_proxy(
    replica_routes: bool, method: bytes, path: bytes, expected: int
) -> None:
    """
    A raw ``/kv`` value may be as large as the value limit; the seed API's
    JSON may escape each byte of it in six, plus room for the key; anything
    else is small. Node and proxy agree, so a client gets the same answer
    from either.
    """
    assert body_limit_for(MAX_VALUE, replica_routes)(method, path) == expected


def test_replica_puts_take_a_value_on_nodes_only() -> None:
    """A proxy has no replica routes, so it refuses a replica-sized body before reading it."""
    assert body_limit_for(MAX_VALUE, replica_routes=True)(b"PUT", b"/replica/kv/k") == MAX_VALUE
    assert body_limit_for(MAX_VALUE)(b"PUT", b"/replica/kv/k") == SMALL_BODY_LIMIT


def request(args: dict[bytes, list[bytes]], headers: dict[bytes, bytes]) -> IRequest:
    """A request to ``/kv/k`` with these query arguments and headers."""
    req = DummyRequest([b"kv", b"k"])
    req.args = args
    for name, value in headers.items():
        req.requestHeaders.setRawHeaders(name, [value])
    return cast(IRequest, req)


@pytest.mark.parametrize(
    ("args", "headers", "expected"),
    [
        ({}, {}, Consistency()),
        ({b"r": [b"1"], b"w": [b"3"]}, {}, Consistency(r=1, w=3)),
        ({}, {b"x-shardkv-r": b"2", b"x-shardkv-sloppy": b"true"}, Consistency(r=2, sloppy=True)),
        ({b"w": [b"1"]}, {b"x-shardkv-w": b"3"}, Consistency(w=1)),
        ({b"sloppy": [b"YES"]}, {}, Consistency(sloppy=True)),
        ({b"sloppy": [b"1"]}, {}, Consistency(sloppy=True)),
        ({b"sloppy": [b"no"]}, {}, Consistency()),
    ],
)
def test_consistency_from_query_or_headers(
    args: dict[bytes, list[bytes]], headers: dict[bytes, bytes], expected: Consistency
) -> None:
    """The query argument wins over the header, and ``sloppy`` takes 1, true or yes."""
    assert consistency(request(args, headers)) == expected


@pytest.mark.parametrize("raw", [b"0", b"-1", b"two", b"1.5", b" 2"])
def test_a_quorum_number_must_be_a_positive_whole_number(raw: bytes) -> None:
    for args, headers in [({b"r": [raw]}, {}), ({}, {b"x-shardkv-w": raw})]:
        with pytest.raises(InvalidRequest) as info:
            consistency(request(args, headers))
        assert info.value.code == "invalid_quorum"
        assert "must be a positive whole number" in info.value.message
