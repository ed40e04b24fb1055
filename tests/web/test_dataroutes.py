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
from klein import Klein
from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IRequest
from twisted.web.test.requesthelper import DummyRequest

from shardkv.core.quorum import Consistency
from shardkv.core.versions import VersionClock
from shardkv.errors import InvalidRequest
from shardkv.node.store import NodeStore
from shardkv.replica.codec import MAX_REQUEST_BYTES, MAX_STREAM_BYTES
from shardkv.storage.memory import MemoryEngine
from shardkv.web.dataroutes import (
    DEFAULT_MAX_VALUE_BYTES,
    JSON_ENVELOPE_SLACK,
    MAP_BODY_LIMIT,
    SMALL_BODY_LIMIT,
    body_limit_for,
    consistency,
    install_data_routes,
)
from shardkv.web.errors import install_error_handlers
from tests.helpers import HTTP, Reply, flusher

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


@pytest.mark.parametrize(
    "path",
    [
        b"/replica/map/prepare",
        b"/replica/map/accept",
        b"/replica/map/learn",
        b"/replica/plan",
        b"/replica/plan/keys",
    ],
)
def test_the_map_routes_take_a_whole_map_on_nodes_only(path: bytes) -> None:
    """A map with thousands of members fits; a proxy still refuses such a body early."""
    assert body_limit_for(MAX_VALUE, replica_routes=True)(b"POST", path) == MAP_BODY_LIMIT
    assert body_limit_for(MAX_VALUE)(b"POST", path) == SMALL_BODY_LIMIT


def test_the_stream_route_takes_a_whole_stream_batch_on_nodes_only() -> None:
    assert body_limit_for(MAX_VALUE, replica_routes=True)(b"POST", b"/replica/stream") == (
        MAX_STREAM_BYTES
    )
    assert body_limit_for(MAX_VALUE)(b"POST", b"/replica/stream") == SMALL_BODY_LIMIT


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


@pytest.mark.parametrize(
    "raw",
    [
        b"0",
        b"-1",
        b"two",
        b"1.5",
        b" 2",
        b"1" * 4301,
        b"9" * 10,
        "\u00b2".encode(),
        "\u0662".encode(),
        "\uff12".encode(),
        b"\xb2",
    ],
)
def test_a_quorum_number_must_be_a_positive_whole_number(raw: bytes) -> None:
    for args, headers in [({b"r": [raw]}, {}), ({}, {b"x-shardkv-w": raw})]:
        with pytest.raises(InvalidRequest) as info:
            consistency(request(args, headers))
        assert info.value.code == "invalid_quorum"
        assert "must be a positive whole number" in info.value.message
        assert len(info.value.message) < 120


class Routes:
    """The data routes alone, over a node's store on a memory engine; like the
    proxy's, its backend reads the request's quorum settings."""

    app = Klein()
    install_data_routes(app)
    install_error_handlers(app)
    max_value_bytes = 1024

    def __init__(self) -> None:
        self.store = NodeStore("n1", MemoryEngine(), VersionClock("n1", lambda: 1), 1024, lambda: 1)

    def backend(self, request: IRequest) -> NodeStore:
        consistency(request)
        return self.store


DEEP = b"[" * 1000 + b"]" * 1000


class RouteInputTests(SynchronousTestCase):
    """
    Inputs that used to earn a 500 (or a 400 where HTTP says 412) get a JSON
    4xx, and the key they named stays usable.
    """

    def setUp(self) -> None:
        stub = StubTreq(Routes().app.resource())
        self.http = HTTP(self, stub, "http://n1", flusher(stub))

    def assertError(self, reply: Reply, status: int, code: str) -> None:
        self.assertEqual(reply.error(), (status, code), reply.body)
        self.assertEqual(set(reply.json()), {"error", "message"})

    def assertUsable(self, key: str) -> None:
        self.assertIn(self.http.put(f"/kv/{key}", b"fine").code, (200, 201))
        self.assertEqual(self.http.get(f"/kv/{key}").body, b"fine")
        self.assertEqual(self.http.post_json("/set", {"key": key, "value": "v"}).code, 200)

    def test_a_key_holding_a_newline_is_reachable_by_path(self) -> None:
        """
        A key with a newline, stored through /set, is read back through
        /kv/{key}; the path converter used to stop at the newline and
        answer 404 no_route (found by schemathesis).
        """
        self.assertEqual(self.http.post_json("/set", {"key": "a\nb", "value": "v"}).code, 200)
        self.assertEqual(self.http.get("/kv/a%0Ab").body, b"v")
        self.assertUsable("a%0Ab")

    def test_json_nested_too_deep_is_400(self) -> None:
        """About 2 KB of brackets raised RecursionError in the decoder: a 500."""
        for body in [
            DEEP,
            b'{"key": "k", "value": ' + DEEP + b"}",
            b'{"key": "k", "value": "v", "version": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1001,
        ]:
            for route in ["/set", "/delete"]:
                self.assertError(self.http.post_raw(route, body), 400, "invalid_json")
        self.assertUsable("k")

    def test_a_huge_number_in_json_is_400(self) -> None:
        body = b'{"key": "k", "value": "v", "version": ' + b"1" * 5000 + b"}"
        self.assertError(self.http.post_raw("/set", body), 400, "invalid_json")

    def test_huge_or_odd_quorum_numbers_are_400(self) -> None:
        for query in ["r=" + "1" * 5000, "w=" + "1" * 4301, "r=%C2%B2", "w=%D9%A2"]:
            reply = self.http.put(f"/kv/k?{query}", b"v")
            self.assertError(reply, 400, "invalid_quorum")
        reply = self.http.request("GET", "/kv/k", headers={"X-Shardkv-R": b"1" * 5000})
        self.assertError(reply, 400, "invalid_quorum")
        self.assertUsable("k")

    def test_a_well_formed_foreign_if_match_is_412(self) -> None:
        """
        RFC 9110: an entity tag that does not match the current one fails
        the precondition (412); only a malformed header is a 400.
        """
        self.http.put("/kv/k", b"1")
        tags: list[str | bytes] = ['"not-the-version"', 'W/"x"', '"1-2"', '"a,b"', b'"\xb2-1-w"']
        for tag in [*tags, '""']:
            for reply in [
                self.http.put("/kv/k", b"2", {"If-Match": tag}),
                self.http.delete("/kv/k", {"If-Match": tag}),
            ]:
                self.assertError(reply, 412, "precondition_failed")
        reply = self.http.put("/kv/absent", b"2", {"If-Match": '"not-the-version"'})
        self.assertError(reply, 412, "precondition_failed")
        for malformed in ["garbage", '"unterminated', '"a" "b"', '"x", junk', '*, "x"']:
            reply = self.http.put("/kv/k", b"2", {"If-Match": malformed})
            self.assertError(reply, 400, "invalid_precondition")
        self.assertEqual(self.http.get("/kv/k").body, b"1")

    def test_a_foreign_version_field_is_412_and_a_non_string_400(self) -> None:
        """
        The seed API's "version" holds an entity tag: a well-formed one that
        is not ours cannot match (412); one that is no tag, or not a string,
        is the client's mistake (400).
        """
        self.http.post_json("/set", {"key": "k", "value": "1"})
        for version in ["not-the-version", '"quoted"', "1-2", "\u00b2-1-w"]:
            for route, body in [
                ("/set", {"key": "k", "value": "2", "version": version}),
                ("/delete", {"key": "k", "version": version}),
            ]:
                self.assertError(self.http.post_json(route, body), 412, "precondition_failed")
        bad: list[object] = [5, ["1-0-w"], {}, True, "", "a b", "\u0100"]
        for odd in bad:
            payload = {"key": "k", "value": "2", "version": odd}
            self.assertError(self.http.post_json("/set", payload), 400, "invalid_version")
        self.assertEqual(self.http.get("/kv/k").body, b"1")

    def test_a_content_type_a_record_may_not_carry_is_400(self) -> None:
        """
        The data API takes the same content types as the replica routes
        (printable ASCII, bounded), so nothing it stores can be refused on
        the way to a replica or fail as a header on the way out.
        """
        for ctype in [b"caf\xc3\xa9", b"text/\xff", b"x\x01", b"x\x7f"]:
            reply = self.http.put("/kv/k", b"v", {"Content-Type": ctype})
            self.assertError(reply, 400, "bad_request")
        long = b"a" * 8000
        reply = self.http.put("/kv/k", b"v", {"Content-Type": long})
        self.assertEqual(reply.code, 201)
        self.assertEqual(self.http.get("/kv/k").header("content-type"), long.decode())
        self.assertUsable("k")
