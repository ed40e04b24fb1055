"""L{shardkv.web.router}: Klein's routing with less work per request, answering as Klein does.

Every answer is compared with plain Klein's (C{KleinResource}) for the same
app and the same requests, on raw HTTP bytes: status, headers and body must
be the same. The only differences allowed are the ones the router exists
for: a synchronous answer carries C{Content-Length} instead of being
chunked (and a HEAD answer says the length of the GET's body). Both are
served by a plain twisted.web C{Site} over an in-memory transport, so what
is compared is the router alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from klein import Klein
from klein.resource import KleinResource
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Site
from werkzeug.exceptions import BadRequest
from zope.interface import implementer

from shardkv.node.app import NodeApp
from shardkv.replica import codec
from shardkv.testing.memory import MemoryCluster, make_node
from shardkv.web.router import MAX_ADAPTERS, RoutedKlein, RouterResource, route_label
from tests.helpers import memory_cluster

NODE_ID = "127.0.0.1:8081"
FRAMING = {b"content-length", b"transfer-encoding"}
"""How a body is delimited: the one thing the router may answer differently."""


@dataclass
class Answer:
    status: int
    headers: dict[bytes, list[bytes]]
    body: bytes
    chunked: bool

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name)
        return values[-1] if values else None

    def comparable(self) -> tuple[int, dict[bytes, list[bytes]], bytes]:
        """What must be the same under Klein and the router (Date aside: it moves)."""
        kept = {k: v for k, v in self.headers.items() if k not in FRAMING and k != b"date"}
        return self.status, kept, self.body

    def json(self) -> Any:
        return json.loads(self.body)


def parse(raw: bytes, head_only: bool = False) -> Answer:
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    chunked = headers.get(b"transfer-encoding") == [b"chunked"]
    if head_only:
        assert rest == b"", rest
        return Answer(status, headers, b"", chunked)
    if chunked:
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            body, rest = body + rest[:size], rest[size + 2 :]
    else:
        length = headers.get(b"content-length")
        body = rest if length is None else rest[: int(length[-1])]
    return Answer(status, headers, body, chunked)


class QuietSite(Site):
    def log(self, request: Any) -> None:
        pass


@dataclass
class Wire:
    """One HTTP/1.1 connection to ``resource``: raw requests in, parsed answers out."""

    resource: Resource
    peer: str = "127.0.0.1"
    clock: MemoryReactorClock = field(default_factory=MemoryReactorClock)

    def __post_init__(self) -> None:
        self.site = QuietSite(self.resource, reactor=self.clock)
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8081),
            peerAddress=IPv4Address("TCP", self.peer, 40000),
        )
        self.channel = self.site.buildProtocol(None)
        self.channel.makeConnection(self.transport)

    def send(self, method: str, path: str, body: bytes = b"", **headers: str) -> None:
        head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1:8081"]
        head += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
        if body or method in ("POST", "PUT"):
            head.append(f"Content-Length: {len(body)}")
        self.channel.dataReceived("\r\n".join(head).encode("utf-8") + b"\r\n\r\n" + body)

    def answer(self, head_only: bool = False) -> Answer | None:
        raw = self.transport.value()
        if not raw:
            return None
        self.transport.clear()
        return parse(raw, head_only)

    def ask(self, method: str, path: str, body: bytes = b"", **headers: str) -> Answer:
        self.send(method, path, body, **headers)
        answer = self.answer(head_only=method == "HEAD")
        assert answer is not None, f"no answer yet to {method} {path}"
        return answer

    def hang_up(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


def assert_same(router: Answer, klein: Answer, method: str = "GET") -> None:
    """The router's answer is Klein's, framed with its length."""
    assert router.comparable() == klein.comparable()
    if method == "HEAD" or router.status in (204, 304) or not router.body:
        return
    assert not router.chunked
    assert router.header(b"content-length") == b"%d" % len(router.body)


@implementer(ILogObserver)
class Errors(list[LogEvent]):
    """The failures logged while a test runs."""

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            self.append(event)


@pytest.fixture
def errors() -> Iterator[Errors]:
    seen = Errors()
    globalLogPublisher.addObserver(seen)
    yield seen
    globalLogPublisher.removeObserver(seen)


# -- a node, every route, against plain Klein -------------------------------------------


def _batch() -> bytes:
    return codec.encode_request([codec.GetOp("k1"), codec.GetOp("absent")])


NODE_TABLE: list[tuple[str, str, bytes, dict[str, str]]] = [
    ("GET", "/health", b"", {}),
    ("HEAD", "/health", b"", {}),
    ("GET", "/metrics", b"", {}),
    ("GET", "/openapi.json", b"", {}),
    ("POST", "/set", b'{"key": "k1", "value": "one"}', {}),
    ("POST", "/set", b'{"key": "k1"}', {}),
    ("POST", "/set", b"not json", {}),
    ("GET", "/get?key=k1", b"", {}),
    ("HEAD", "/get?key=k1", b"", {}),
    ("GET", "/get?key=absent", b"", {}),
    ("GET", "/get", b"", {}),
    ("GET", "/get?key=%FF", b"", {}),
    ("POST", "/get?key=k1", b"", {}),
    ("PUT", "/kv/k2", b"\x00binary", {"content_type": "application/octet-stream"}),
    ("GET", "/kv/k2", b"", {}),
    ("HEAD", "/kv/k2", b"", {}),
    ("GET", "/kv/k2", b"", {"if_none_match": "*"}),
    ("GET", "/kv/a%2Fb", b"", {}),
    ("PUT", "/kv/k3", b"x", {"if_match": "nonsense"}),
    ("DELETE", "/kv/k2", b"", {}),
    ("DELETE", "/kv/k2", b"", {}),
    ("GET", "/kv/k2", b"", {}),
    ("POST", "/delete", b'{"key": "k1"}', {}),
    ("PATCH", "/kv/k1", b"", {}),
    ("GET", "/no/such/route", b"", {}),
    ("OPTIONS", "/get", b"", {}),
    ("GET", "/replica/kv/k1", b"", {}),
    ("GET", "/replica/kv/absent", b"", {}),
    ("PUT", "/replica/kv/k4", b"v", {"x_shardkv_version": "nonsense"}),
    ("POST", "/replica/batch", _batch(), {}),
    ("POST", "/replica/batch", b"garbage", {}),
    ("PUT", "/replica/members", b'{"members": ["127.0.0.1:8081"]}', {}),
    ("GET", "/replica/map", b"", {}),
    ("POST", "/replica/map/prepare", b"{}", {}),
    ("POST", "/replica/map/accept", b'{"ballot": 1}', {}),
    ("POST", "/replica/map/learn", b"[]", {}),
    ("GET", "/replica/move", b"", {}),
    ("POST", "/replica/plan", b"{}", {}),
    ("POST", "/replica/plan/keys", b"{}", {}),
    ("POST", "/replica/stream", b"garbage", {}),
]


def _endpoint(app: Klein, method: str, path: str) -> str | None:
    try:
        rule, _ = app.url_map.bind("x").match(path.split("?")[0], method, return_rule=True)
    except Exception:
        return None
    return str(rule.endpoint)


def test_the_node_table_reaches_every_route() -> None:
    """So that a route added later is compared too (add a row for it)."""
    reached = {_endpoint(NodeApp.app, method, path) for method, path, _, _ in NODE_TABLE}
    every = {rule.endpoint for rule in NodeApp.app.url_map.iter_rules()}
    assert every <= reached


def test_every_node_route_answers_as_plain_klein() -> None:
    """Two identical nodes on one clock, one served by the router, one by KleinResource."""
    router_node = make_node(NODE_ID, MemoryReactorClock())
    klein_node = make_node(NODE_ID, MemoryReactorClock())
    router = Wire(router_node.app.resource())
    klein = Wire(KleinResource(klein_node.app))
    assert isinstance(router.resource, RouterResource)
    for method, path, body, headers in NODE_TABLE:
        mine = router.ask(method, path, body, **headers)
        theirs = klein.ask(method, path, body, **headers)
        assert mine.comparable() == theirs.comparable(), (method, path)
        assert_same(mine, theirs, method)


def test_a_head_answer_carries_the_length_of_the_get_body() -> None:
    node = make_node(NODE_ID, MemoryReactorClock())
    wire = Wire(node.app.resource())
    wire.ask("PUT", "/kv/k", b"hello")
    got = wire.ask("GET", "/kv/k")
    head = wire.ask("HEAD", "/kv/k")
    assert got.body == b"hello"
    assert head.body == b""
    assert head.header(b"content-length") == b"5"
    assert head.header(b"etag") == got.header(b"etag")


def test_not_modified_has_no_length_and_no_body() -> None:
    node = make_node(NODE_ID, MemoryReactorClock())
    wire = Wire(node.app.resource())
    wire.ask("PUT", "/kv/k", b"hello")
    answer = wire.ask("GET", "/kv/k", if_none_match="*")
    assert answer.status == 304
    assert answer.body == b""
    assert answer.header(b"content-length") is None


# -- the proxy: its routes answer with Deferreds ------------------------------------------

PROXY_TABLE: list[tuple[str, str, bytes, dict[str, str]]] = [
    ("POST", "/set", b'{"key": "k1", "value": "one"}', {}),
    ("GET", "/get?key=k1", b"", {}),
    ("GET", "/get?key=absent", b"", {}),
    ("GET", "/get?key=k1&r=9", b"", {}),
    ("PUT", "/kv/k2", b"two", {}),
    ("GET", "/kv/k2", b"", {}),
    ("HEAD", "/kv/k2", b"", {}),
    ("PUT", "/kv/k2", b"x", {"if_match": '"1-1-someone"'}),
    ("DELETE", "/kv/k2", b"", {}),
    ("GET", "/kv/k2", b"", {}),
    ("GET", "/health", b"", {}),
    ("GET", "/explain?key=k1", b"", {}),
    ("GET", "/dashboard", b"", {}),
    ("GET", "/dashboard/static/nothing.js", b"", {}),
    ("GET", "/nope", b"", {}),
]


def _proxied(wire: Wire, cluster: MemoryCluster, method: str, path: str, **kw: Any) -> Answer:
    wire.send(method, path, **kw)
    for _ in range(20):
        cluster.flush()
        answer = wire.answer(head_only=method == "HEAD")
        if answer is not None:
            return answer
        cluster.clock.advance(0.01)
    raise AssertionError(f"no answer to {method} {path}")


def test_proxy_routes_answer_as_plain_klein() -> None:
    """Through the coordinator, answers come from Deferreds: Klein's own way, unchanged."""
    clusters = [memory_cluster(["127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083"])]
    clusters.append(memory_cluster(["127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083"]))
    for cluster in clusters:
        cluster.bootstrap()
    apps = [cluster.proxies[0].proxy_app for cluster in clusters]
    router = Wire(apps[0].app.resource(), clock=clusters[0].clock)
    klein = Wire(KleinResource(apps[1].app), clock=clusters[1].clock)
    for method, path, body, headers in PROXY_TABLE:
        mine = _proxied(router, clusters[0], method, path, body=body, **headers)
        theirs = _proxied(klein, clusters[1], method, path, body=body, **headers)
        assert mine.comparable() == theirs.comparable(), (method, path)


# -- every kind of result, against plain Klein -------------------------------------------


class Leaf(Resource):
    isLeaf = True

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"a resource's body"


class Kinds:
    """An app answering each kind of result a Klein route may give."""

    app = RoutedKlein()

    def __init__(self) -> None:
        self.pending: Deferred[bytes] = Deferred()
        self.cancelled = False

        def cancel(d: Deferred[bytes]) -> None:
            self.cancelled = True

        self.hanging: Deferred[bytes] = Deferred(cancel)

    @app.route("/bytes")
    def bytes_(self, request: IRequest) -> bytes:
        request.setHeader(b"x-kind", b"bytes")
        return b"some bytes"

    @app.route("/text")
    def text(self, request: IRequest) -> str:
        return "t\u00e9xt"

    @app.route("/none")
    def none(self, request: IRequest) -> None:
        request.setResponseCode(204)

    @app.route("/empty")
    def empty(self, request: IRequest) -> bytes:
        return b""

    @app.route("/written")
    def written(self, request: IRequest) -> bytes:
        request.write(b"first ")
        return b"then returned"

    @app.route("/finished")
    def finished(self, request: IRequest) -> None:
        request.write(b"all of it")
        request.finish()

    @app.route("/pending")
    def pending_(self, request: IRequest) -> Deferred[bytes]:
        return self.pending

    @app.route("/hanging")
    def hanging_(self, request: IRequest) -> Deferred[bytes]:
        return self.hanging

    @app.route("/fired")
    def fired(self, request: IRequest) -> Deferred[bytes]:
        return succeed(b"fired already")

    @app.route("/coroutine")
    async def coroutine(self, request: IRequest) -> bytes:
        return b"from a coroutine"

    @app.route("/resource")
    def resource(self, request: IRequest) -> Resource:
        return Leaf()

    @app.route("/arg/<int:n>")
    def arg(self, request: IRequest, n: int) -> bytes:
        return b"n=%d prepath=%s postpath=%s" % (
            n,
            b"/".join(request.prepath),
            b"/".join(request.postpath),
        )

    @app.route("/raises")
    def raises(self, request: IRequest) -> bytes:
        raise KeyError("k")

    @app.route("/handler-raises")
    def handler_raises(self, request: IRequest) -> bytes:
        raise TypeError("t")

    @app.route("/handler-defers")
    def handler_defers(self, request: IRequest) -> bytes:
        raise LookupError("deferred handling")

    @app.route("/fails-later")
    def fails_later(self, request: IRequest) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        d.errback(KeyError("later"))
        return d

    @app.route("/unhandled")
    def unhandled(self, request: IRequest) -> bytes:
        raise ZeroDivisionError("nobody handles this")

    @app.route("/werkzeug")
    def werkzeug(self, request: IRequest) -> bytes:
        raise BadRequest("werkzeug's own")

    @app.handle_errors(KeyError)
    def key_error(self, request: IRequest, failure: Failure) -> bytes:
        request.setResponseCode(404)
        return b"handled " + failure.getErrorMessage().encode()

    @app.handle_errors(TypeError)
    def type_error(self, request: IRequest, failure: Failure) -> bytes:
        raise ValueError("the handler failed too")

    @app.handle_errors(ValueError)
    def value_error(self, request: IRequest, failure: Failure) -> bytes:
        request.setResponseCode(500)
        return b"the next handler: " + str(failure.value).encode()

    @app.handle_errors(LookupError)
    def lookup_error(self, request: IRequest, failure: Failure) -> Deferred[bytes]:
        request.setResponseCode(409)
        return succeed(b"handled later")


KIND_PATHS = [
    ("GET", "/bytes"),
    ("HEAD", "/bytes"),
    ("GET", "/text"),
    ("GET", "/none"),
    ("GET", "/empty"),
    ("GET", "/written"),
    ("GET", "/finished"),
    ("GET", "/fired"),
    ("GET", "/coroutine"),
    ("GET", "/resource"),
    ("GET", "/arg/12"),
    ("GET", "/arg/x"),
    ("GET", "/raises"),
    ("GET", "/handler-raises"),
    ("GET", "/handler-defers"),
    ("GET", "/fails-later"),
    ("GET", "/werkzeug"),
    ("POST", "/bytes"),
    ("GET", "/missing"),
]


def _two_kinds() -> tuple[Kinds, Wire, Kinds, Wire]:
    mine, theirs = Kinds(), Kinds()
    return mine, Wire(mine.app.resource()), theirs, Wire(KleinResource(theirs.app))


@pytest.mark.parametrize(("method", "path"), KIND_PATHS)
def test_each_kind_of_result_answers_as_plain_klein(method: str, path: str) -> None:
    _, router, _, klein = _two_kinds()
    mine, theirs = router.ask(method, path), klein.ask(method, path)
    assert mine.comparable() == theirs.comparable()


def test_synchronous_bytes_are_framed_with_their_length() -> None:
    _, router, _, klein = _two_kinds()
    mine, theirs = router.ask("GET", "/bytes"), klein.ask("GET", "/bytes")
    assert theirs.chunked
    assert mine.header(b"content-length") == b"10" and not mine.chunked
    text = router.ask("GET", "/text")
    assert text.body == "t\u00e9xt".encode() and text.header(b"content-length") == b"5"
    handled = router.ask("GET", "/raises")
    assert handled.status == 404 and not handled.chunked


def test_an_answer_begun_by_the_route_stays_chunked() -> None:
    """A route that wrote before returning has sent its headers: no length can follow."""
    _, router, _, _ = _two_kinds()
    answer = router.ask("GET", "/written")
    assert answer.chunked and answer.body == b"first then returned"


def test_a_route_that_finished_the_request_itself_is_left_alone(
    errors: list[LogEvent],
) -> None:
    _, router, _, _ = _two_kinds()
    answer = router.ask("GET", "/finished")
    assert answer.body == b"all of it"
    assert errors == []


def test_an_unhandled_error_is_twisteds_500_as_with_klein(errors: list[LogEvent]) -> None:
    _, router, _, klein = _two_kinds()
    mine, theirs = router.ask("GET", "/unhandled"), klein.ask("GET", "/unhandled")
    assert mine.status == theirs.status == 500
    assert mine.comparable() == theirs.comparable()
    assert len(errors) == 2  # logged once by each


def test_a_deferred_answers_when_it_fires() -> None:
    mine, router, theirs, klein = _two_kinds()
    router.send("GET", "/pending")
    klein.send("GET", "/pending")
    assert router.answer() is None and klein.answer() is None
    mine.pending.callback(b"at last")
    theirs.pending.callback(b"at last")
    answers = router.answer(), klein.answer()
    assert answers[0] is not None and answers[1] is not None
    assert answers[0].comparable() == answers[1].comparable()
    assert answers[0].body == b"at last"


def test_a_client_that_hangs_up_cancels_the_routes_deferred(errors: list[LogEvent]) -> None:
    """As in Klein: the work is cancelled, and the cancellation is not logged."""
    for kinds, wire in (_two_kinds()[:2], _two_kinds()[2:]):
        assert isinstance(kinds, Kinds) and isinstance(wire, Wire)
        wire.send("GET", "/hanging")
        assert wire.answer() is None
        wire.hang_up()
        assert kinds.cancelled
        assert kinds.hanging.called
        kinds.hanging.addErrback(lambda f: f.trap(CancelledError))
    assert errors == []


def test_a_route_answering_after_the_client_left_writes_nothing(errors: list[LogEvent]) -> None:
    mine, router, _, _ = _two_kinds()
    router.send("GET", "/pending")
    router.hang_up()
    mine.pending.callback(b"too late")
    assert router.transport.value() == b""
    assert errors == []


def test_the_path_segments_a_route_consumed_move_to_prepath() -> None:
    _, router, _, _ = _two_kinds()
    answer = router.ask("GET", "/arg/12")
    assert answer.body == b"n=12 prepath=arg/12 postpath="


def test_a_host_that_is_not_utf8_is_refused_as_klein_does() -> None:
    mine, theirs = Kinds(), Kinds()
    answers = []
    for resource in (mine.app.resource(), KleinResource(theirs.app)):
        wire = Wire(resource)
        wire.channel.dataReceived(b"GET /bytes HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n")
        answers.append(wire.answer())
    assert answers[0] is not None and answers[1] is not None
    assert answers[0].status == 400
    assert answers[0].comparable() == answers[1].comparable()


# -- what the router keeps ---------------------------------------------------------------


def test_adapters_are_kept_per_host_and_bounded() -> None:
    """The Host header is the client's: every name gets its answer, the cache stays bounded."""
    kinds = Kinds()
    resource = kinds.app.resource()
    assert isinstance(resource, RouterResource)
    wire = Wire(resource)
    for i in range(MAX_ADAPTERS * 3):
        wire.channel.dataReceived(b"GET /bytes HTTP/1.1\r\nHost: host-%d\r\n\r\n" % i)
        answer = wire.answer()
        assert answer is not None and answer.body == b"some bytes"
        assert len(resource._adapters) <= MAX_ADAPTERS
    wire.ask("GET", "/bytes")
    wire.ask("GET", "/bytes")
    assert len(resource._adapters) <= MAX_ADAPTERS


def test_only_matches_of_rules_without_arguments_are_kept() -> None:
    """``/kv/<key>`` for every key would grow with the keys: those are matched each time."""
    node = make_node(NODE_ID, MemoryReactorClock())
    resource = node.app.resource()
    assert isinstance(resource, RouterResource)
    wire = Wire(resource)
    for i in range(50):
        wire.ask("GET", f"/kv/k{i}")
        wire.ask("GET", f"/get?key=k{i}")
    wire.ask("GET", "/nowhere")
    ((_, static),) = resource._adapters.values()
    assert set(static) == {(b"/get", b"GET")}


def test_requests_carry_the_rule_that_matched() -> None:
    """The label the HTTP metrics count under; ``other`` when no rule matched."""
    seen: list[str] = []

    class Labels:
        app = RoutedKlein()

        @app.route("/kv/<path:_key>")
        def kv(self, request: IRequest, _key: str) -> bytes:
            seen.append(getattr(request, "route", "unset"))
            return b""

    wire = Wire(Labels().app.resource())
    wire.ask("GET", "/kv/a/b")
    wire.ask("GET", "/kv/c")
    assert seen == ["/kv/<key>", "/kv/<key>"]
    assert route_label("/replica/kv/<key:_key>") == "/replica/kv/<key>"


def test_resources_compare_by_their_app() -> None:
    kinds = Kinds()
    assert kinds.app.resource() == kinds.app.resource()
    assert kinds.app.resource() != Kinds().app.resource()
