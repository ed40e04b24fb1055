"""bench/stack_floor.py: the floor's work through Klein's routes and treq's calls."""

from typing import Any

from stack_floor import StackForward, make_app
from treq.testing import StubTreq
from twisted.internet.defer import fail
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyRequest

from shardkv.web.router import RouterResource


class Node(Resource):
    """Answers every request with its own name and the path it was sent."""

    isLeaf = True

    def __init__(self, name: bytes, status: int = 200) -> None:
        super().__init__()
        self.name = name
        self.status = status
        self.seen: list[tuple[bytes, bytes, bytes]] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        self.seen.append((request.method, request.uri, request.content.read()))
        request.setResponseCode(self.status)
        return self.name


class Nodes(Resource):
    """Both nodes behind one StubTreq, told apart by the port of each URL."""

    isLeaf = True

    def __init__(self, nodes: dict[int, Node]) -> None:
        super().__init__()
        self.nodes = nodes

    def render(self, request: Request) -> Any:
        return self.nodes[request.getHost().port].render(request)


class StubHTTP:
    """What StackForward needs of HTTPClientService: its ``request``."""

    def __init__(self, stub: StubTreq) -> None:
        self.stub = stub

    def request(self, method: str, url: Any, **kwargs: Any) -> Any:
        return self.stub.request(method, url.to_text(), **kwargs)  # type: ignore[attr-defined]


def forward(nodes: dict[int, Node]) -> tuple[StackForward, StubTreq]:
    stub = StubTreq(Nodes(nodes))
    return StackForward(StubHTTP(stub), list(nodes)), stub  # type: ignore[arg-type]


def test_a_get_goes_to_every_node_as_it_came_and_the_first_reply_answers() -> None:
    a, b = Node(b"a"), Node(b"b", 404)
    fwd, stub = forward({9001: a, 9002: b})
    request = DummyRequest([b"get"])
    request.uri = b"/get?key=k%2F1"
    answers: list[bytes] = []
    fwd.forward(request, None).addCallback(answers.append)
    stub.flush()
    assert a.seen == b.seen == [(b"GET", b"/get?key=k%2F1", b"")]
    assert answers == [b"a"] and request.responseCode == 200
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]


def test_a_set_sends_its_body_to_both_nodes() -> None:
    a, b = Node(b"a", 201), Node(b"b", 201)
    fwd, stub = forward({9001: a, 9002: b})
    request = DummyRequest([b"set"])
    request.method, request.uri = b"POST", b"/set"
    answers: list[bytes] = []
    fwd.forward(request, b'{"key": "k", "value": "v"}').addCallback(answers.append)
    stub.flush()
    assert a.seen == b.seen == [(b"POST", b"/set", b'{"key": "k", "value": "v"}')]
    assert answers == [b"a"] and request.responseCode == 201


def test_a_call_that_fails_counts_as_a_502_reply() -> None:
    class Refusing(StubHTTP):
        def request(self, method: str, url: Any, **kwargs: Any) -> Any:
            if ":9002/" in url.to_text():
                return fail(ConnectionRefusedError())
            return super().request(method, url, **kwargs)

    a, b = Node(b"a"), Node(b"b")
    fwd, stub = forward({9002: b, 9001: a})
    fwd.http = Refusing(stub)  # type: ignore[assignment]
    request = DummyRequest([b"get"])
    request.uri = b"/get?key=k"
    answers: list[bytes] = []
    fwd.forward(request, None).addCallback(answers.append)
    stub.flush()
    assert a.seen and not b.seen
    assert answers == [b""] and request.responseCode == 502


def test_the_routes_are_served_by_shardkvs_klein_router() -> None:
    fwd, _ = forward({9001: Node(b"a")})
    assert isinstance(make_app(fwd).resource(), RouterResource)
