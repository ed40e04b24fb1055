"""The floor for a proxied GET or SET: the least a Twisted proxy with R=W=2 can do.

    python bench/floor_proxy.py PORT NODE_PORT NODE_PORT

A leaf twisted.web Resource takes ``GET /get?key=K`` or ``POST /set``, sends
the very same request to both nodes over kept-alive connections with a
hand-written client of a few dozen lines (no Agent, no treq, no Deferreds
per exchange), and answers with the first node's reply once both replied.
It does nothing a real proxy must also do: no placement, no versions to
compare, no quorum rules, no timeouts, no health, no metrics, no errors. So
``bench/run.py floor`` measures the least that two replica requests cost on
this stack and this machine, beside a direct node and the shardkv proxy.
"""

import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

Reply = Callable[[int, bytes], None]
the_reactor: Any = reactor  # the default (epoll) reactor, as twistd runs a proxy on


class NodeConnection(Protocol):
    """One kept-alive HTTP/1.1 connection: one request at a time, replies with
    Content-Length only (what a shardkv node sends)."""

    def __init__(self, pool: "NodePool") -> None:
        self.pool = pool
        self.buffer = b""
        self.waiting: Reply | None = None

    def connectionMade(self) -> None:
        self.pool.connected(self)

    def connectionLost(self, reason: object = None) -> None:
        """A node closes a connection idle for long; forget it (the bench stops on
        a request that fails, so one in flight is answered 502)."""
        if self in self.pool.idle:
            self.pool.idle.remove(self)
        if self.waiting is not None:
            self.waiting(502, b"")

    def send(self, head: bytes, body: bytes, reply: Reply) -> None:
        self.waiting = reply
        assert self.transport is not None
        self.transport.write(head + body)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[: end + 2]
        start = head.lower().find(b"content-length:")
        length = int(head[start + 15 : head.find(b"\r\n", start)]) if start >= 0 else 0
        if len(self.buffer) < end + 4 + length:
            return
        status = int(head[9:12])
        body = self.buffer[end + 4 : end + 4 + length]
        self.buffer = self.buffer[end + 4 + length :]
        reply, self.waiting = self.waiting, None
        self.pool.idle.append(self)
        assert reply is not None
        reply(status, body)


class NodePool(ClientFactory):
    """Idle connections to one node; a new one when none is idle."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: deque[NodeConnection] = deque()
        self.queued: deque[tuple[bytes, bytes, Reply]] = deque()

    def buildProtocol(self, addr: Any) -> NodeConnection:
        return NodeConnection(self)

    def connected(self, conn: NodeConnection) -> None:
        conn.send(*self.queued.popleft())

    def request(self, head: bytes, body: bytes, reply: Reply) -> None:
        if self.idle:
            self.idle.popleft().send(head, body, reply)
        else:
            self.queued.append((head, body, reply))
            the_reactor.connectTCP("127.0.0.1", self.port, self)


def first_of(count: int, answer: Reply) -> Reply:
    """The reply to give each of ``count`` nodes: ``answer`` gets the first to
    arrive, once all ``count`` have."""
    replies: list[tuple[int, bytes]] = []

    def one(status: int, data: bytes) -> None:
        replies.append((status, data))
        if len(replies) == count:
            answer(*replies[0])

    return one


class Forward(Resource):
    isLeaf = True

    def __init__(self, pools: list[NodePool]) -> None:
        super().__init__()
        self.pools = pools

    def render(self, request: Any) -> Any:
        body = request.content.read() if request.method == b"POST" else b""
        head = (
            request.method
            + b" "
            + request.uri
            + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + b"Content-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
        )

        def answer(status: int, data: bytes) -> None:
            request.setResponseCode(status)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"%d" % len(data))
            request.write(data)
            request.finish()

        one = first_of(len(self.pools), answer)
        for pool in self.pools:
            pool.request(head, body, one)
        return NOT_DONE_YET


class QuietSite(Site):
    def log(self, request: Any) -> None:
        """No access log (a shardkv proxy has none by default either)."""


if __name__ == "__main__":
    site = QuietSite(Forward([NodePool(int(p)) for p in sys.argv[2:]]))
    the_reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1")
    the_reactor.run()
