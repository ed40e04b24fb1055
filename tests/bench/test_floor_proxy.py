"""bench/floor_proxy.py: the same request to every node, the first reply once all replied."""

import io
from typing import Any

from floor_proxy import Forward, NodePool
from twisted.internet.testing import StringTransport
from twisted.web.test.requesthelper import DummyRequest


class Pool(NodePool):
    """A pool that records what it was asked to send and answers when told."""

    def __init__(self) -> None:
        super().__init__(0)
        self.sent: list[tuple[bytes, bytes, Any]] = []

    def request(self, head: bytes, body: bytes, reply: Any) -> None:
        self.sent.append((head, body, reply))


def test_a_reply_in_pieces_with_its_length_last_is_read_whole() -> None:
    pool = NodePool(0)
    conn = pool.buildProtocol(None)
    transport = StringTransport()
    replies: list[tuple[int, bytes]] = []
    pool.queued.append(
        (b"GET /get?key=k HTTP/1.1\r\n\r\n", b"", lambda s, b: replies.append((s, b)))
    )
    conn.makeConnection(transport)
    assert transport.value() == b"GET /get?key=k HTTP/1.1\r\n\r\n"
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
        b'{"key": 1}\n'
    )
    for i in range(0, len(answer), 7):
        conn.dataReceived(answer[i : i + 7])
    assert replies == [(200, b'{"key": 1}\n')]
    assert list(pool.idle) == [conn]


def test_a_lost_connection_is_forgotten_and_its_request_answered_502() -> None:
    pool = NodePool(0)
    conn = pool.buildProtocol(None)
    replies: list[tuple[int, bytes]] = []
    pool.queued.append((b"x", b"", lambda s, b: replies.append((s, b))))
    conn.makeConnection(StringTransport())
    conn.connectionLost()
    assert replies == [(502, b"")] and not pool.idle


def test_every_node_gets_the_request_and_the_first_reply_answers_once_all_replied() -> None:
    pools = [Pool(), Pool()]
    request = DummyRequest([b"set"])
    request.method = b"POST"
    request.uri = b"/set"
    request.content = io.BytesIO(b'{"key": "k", "value": "v"}')  # type: ignore[attr-defined]
    Forward(list(pools)).render(request)
    (head_a, body_a, reply_a), (head_b, body_b, reply_b) = pools[0].sent[0], pools[1].sent[0]
    assert head_a == head_b and head_a.startswith(b"POST /set HTTP/1.1\r\n")
    assert b"Content-Length: 26\r\n" in head_a and body_a == body_b == b'{"key": "k", "value": "v"}'
    reply_b(201, b"second")
    assert request.finished == 0
    reply_a(200, b"first")
    assert request.finished == 1
    assert request.responseCode == 201 and b"".join(request.written) == b"second"
