"""
Tests of L{PersistentAgent}, the lean agent under treq's C{HTTPClient}.

Two kinds. Over real sockets on 127.0.0.1, against a small twisted.web server
started in the test (or a scripted server that misbehaves on purpose), with
the global reactor through pytest-twisted: keep-alive reuse, body framings,
closes from the server, refusals, cancellation, https. And on a
L{MemoryReactorClock}, where the test plays the server over a
L{StringTransport} byte by byte and moves the clock: idle timeouts, the pool's
limit, retries on a reused connection, what goes on the wire.
"""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import pytest_twisted
import treq
from OpenSSL import SSL
from service_identity import VerificationError
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import trustRootFromCertificates
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import (
    BrowserLikePolicyForHTTPS,
    FileBodyProducer,
    PartialDownloadError,
    RequestGenerationFailed,
    RequestNotSent,
    ResponseFailed,
    ResponseNeverReceived,
    SchemeNotSupported,
    readBody,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from shardkv.web.agent import BytesProducer, PersistentAgent, body_producer
from shardkv.web.httpclient import load_ca_certificates
from tests.tlscerts import CA

reactor = cast(Any, _reactor)

DEADLINE = 5.0


async def until(check: Callable[[], object], what: str) -> None:
    """Poll ``check`` on the reactor until it is true, failing after L{DEADLINE} seconds."""
    end = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


# -- a real twisted.web server ------------------------------------------------------


class Routes(Resource):
    """The test server's routes; it notes the client port of every request it serves."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[int] = []
        self.slow: list[Request] = []

    def render(self, request: Request) -> bytes | int:
        address = request.getClientAddress()
        assert isinstance(address, IPv4Address)
        self.ports.append(address.port)
        path = request.path
        if path == b"/hello":
            return b"hello"
        if path == b"/chunked":
            request.write(b"chun")
            request.write(b"ked")
            request.finish()
            return NOT_DONE_YET
        if path == b"/empty":
            request.setResponseCode(204)
            return b""
        if path == b"/close":
            request.setHeader(b"connection", b"close")
            return b"bye"
        if path == b"/echo":
            assert request.content is not None
            body: bytes = request.content.read()
            return request.method + b" " + body
        if path == b"/slow":
            self.slow.append(request)
            return NOT_DONE_YET
        request.setResponseCode(404)
        return b"no"


class Counting(WrappingFactory):
    """Wraps a server factory: counts the connections it accepted, keeps the live ones."""

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self.accepted = 0

    def registerProtocol(self, p: Any) -> None:
        self.accepted += 1
        super().registerProtocol(p)

    @property
    def live(self) -> int:
        return len(self.protocols)

    def close_all(self) -> None:
        for p in list(self.protocols):
            p.transport.loseConnection()


async def close_server(site: Counting, port: IListeningPort) -> None:
    """Close the server's connections and stop listening; return once they are gone."""
    site.close_all()
    await maybeDeferred(port.stopListening)
    await until(lambda: not site.live, "the server's connections to close")


@dataclass
class Server:
    port: IListeningPort
    site: Counting
    routes: Routes

    def url(self, path: str) -> bytes:
        address = self.port.getHost()
        assert isinstance(address, IPv4Address)
        return f"http://127.0.0.1:{address.port}{path}".encode()

    @property
    def open_channels(self) -> int:
        return self.site.live


@pytest_twisted.async_yield_fixture
async def server() -> AsyncIterator[Server]:
    routes = Routes()
    site = Counting(Site(routes))
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    yield Server(port, site, routes)
    await close_server(site, port)


@pytest_twisted.async_yield_fixture
async def agent() -> AsyncIterator[PersistentAgent]:
    agent = PersistentAgent(reactor)
    yield agent
    await agent.close()


async def get(agent: PersistentAgent, url: bytes, method: bytes = b"GET") -> tuple[int, bytes]:
    response = await agent.request(method, url)
    return response.code, await readBody(response)


@pytest_twisted.ensureDeferred
async def test_sequential_requests_share_one_connection(
    server: Server, agent: PersistentAgent
) -> None:
    """
    If requests to one server follow each other, then they all go out on one
    kept-alive connection, through treq's client as through the agent itself.
    """
    http = HTTPClient(agent)
    for _ in range(5):
        response = await http.get(server.url("/hello"))
        assert await response.content() == b"hello"
    assert await get(agent, server.url("/hello")) == (200, b"hello")
    assert len(set(server.routes.ports)) == 1
    assert server.site.accepted == 1
    assert agent.open_connections == 1
    assert agent.idle_connections() == 1


@pytest_twisted.ensureDeferred
async def test_content_length_and_chunked_bodies(server: Server, agent: PersistentAgent) -> None:
    """
    If the server frames a body by Content-Length or by chunks, then the whole
    body arrives, for readBody and for treq's content, json and collect; and
    the connection is reused after each.
    """
    http = HTTPClient(agent)
    response = await http.get(server.url("/hello"))
    assert response.length == 5
    assert await treq.content(response) == b"hello"
    response = await http.get(server.url("/chunked"))
    assert response.length is UNKNOWN_LENGTH
    assert response.headers.getRawHeaders(b"transfer-encoding") == [b"chunked"]
    assert await treq.text_content(response) == "chunked"
    pieces: list[bytes] = []
    await treq.collect(await http.get(server.url("/chunked")), pieces.append)
    assert b"".join(pieces) == b"chunked"
    response = await http.post(server.url("/echo"), json={"a": 1})
    assert await readBody(response) == b'POST {"a":1}'
    assert len(set(server.routes.ports)) == 1


@pytest_twisted.ensureDeferred
async def test_head_and_204_have_no_body(server: Server, agent: PersistentAgent) -> None:
    """
    If the request is HEAD or the answer is 204, then the response has no
    body (even with a Content-Length), and the next request on the same
    connection is answered correctly.
    """
    response = await agent.request(b"HEAD", server.url("/hello"))
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-length") == [b"5"]
    assert response.length == 0
    assert await readBody(response) == b""
    assert await get(agent, server.url("/empty")) == (204, b"")
    assert await get(agent, server.url("/hello")) == (200, b"hello")
    assert len(set(server.routes.ports)) == 1


@pytest_twisted.ensureDeferred
async def test_connection_close_from_the_server_is_not_reused(
    server: Server, agent: PersistentAgent
) -> None:
    """
    If the server answers with C{Connection: close}, then the answer is read
    whole, the connection is closed rather than kept, and the next request
    opens a new one.
    """
    assert await get(agent, server.url("/close")) == (200, b"bye")
    assert agent.idle_connections() == 0
    await until(lambda: agent.open_connections == 0, "the closed connection to go")
    assert await get(agent, server.url("/hello")) == (200, b"hello")
    assert len(set(server.routes.ports)) == 2


@pytest_twisted.ensureDeferred
async def test_idle_connection_closed_by_the_server_leaves_the_pool(
    server: Server, agent: PersistentAgent
) -> None:
    """
    If the server closes a connection while it sits idle in the pool, then it
    leaves the pool, and the next request (a POST, which is never retried)
    goes out on a new connection and succeeds.
    """
    assert await get(agent, server.url("/hello")) == (200, b"hello")
    assert agent.idle_connections() == 1
    server.site.close_all()
    await until(lambda: agent.open_connections == 0, "the pool to notice the close")
    assert agent.idle_connections() == 0
    assert await get(agent, server.url("/echo"), b"POST") == (200, b"POST ")
    assert len(set(server.routes.ports)) == 2


@pytest_twisted.ensureDeferred
async def test_connection_refused(agent: PersistentAgent) -> None:
    """
    If nothing listens on the port, then the request fails with
    L{ConnectionRefusedError}: the replica client's "not sent".
    """
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number = port.getHost().port
    await maybeDeferred(port.stopListening)
    with pytest.raises(ConnectionRefusedError):
        await agent.request(b"GET", f"http://127.0.0.1:{number}/".encode())
    assert agent.open_connections == 0


@pytest_twisted.ensureDeferred
async def test_max_per_host_idle_connections_are_kept(server: Server) -> None:
    """
    If more requests are in flight to one host than there are idle
    connections, then each gets a connection of its own (no cap), and once
    they are answered only C{max_per_host} stay open.
    """
    agent = PersistentAgent(reactor, max_per_host=2)
    try:
        pending = [agent.request(b"GET", server.url("/slow")) for _ in range(4)]
        await until(lambda: len(server.routes.slow) == 4, "four requests at the server")
        assert agent.open_connections == 4
        for request in server.routes.slow:
            request.write(b"late")
            request.finish()
        for d in pending:
            assert await readBody(await d) == b"late"
        assert agent.idle_connections() == 2
        await until(lambda: agent.open_connections == 2, "the extra connections to close")
        await until(lambda: server.open_channels == 2, "the server to see two closes")
    finally:
        await agent.close()


@pytest_twisted.ensureDeferred
async def test_cancel_aborts_the_connection(server: Server, agent: PersistentAgent) -> None:
    """
    If the request's Deferred is cancelled before the answer arrives, then it
    fails with L{CancelledError}, its connection is aborted (the server sees
    it go), and the next request runs on a new connection.
    """
    d = agent.request(b"GET", server.url("/slow"))
    await until(lambda: server.routes.slow, "the request at the server")
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    await until(lambda: server.open_channels == 0, "the server to see the abort")
    assert agent.open_connections == 0
    assert await get(agent, server.url("/hello")) == (200, b"hello")
    assert len(set(server.routes.ports)) == 2


@pytest_twisted.ensureDeferred
async def test_close_waits_for_the_connections(server: Server) -> None:
    """
    If the agent is closed, then idle connections close at once, a busy one
    closes when its answer is in, and the Deferred fires only when none is
    left; later requests are not sent.
    """
    agent = PersistentAgent(reactor)
    hello = agent.request(b"GET", server.url("/hello"))
    busy = agent.request(b"GET", server.url("/slow"))
    assert await readBody(await hello) == b"hello"
    await until(lambda: server.routes.slow, "the slow request at the server")
    assert (agent.open_connections, agent.idle_connections()) == (2, 1)
    closed = agent.close()
    await until(lambda: server.open_channels == 1, "the idle connection to close")
    assert not closed.called
    server.routes.slow[0].write(b"done")
    server.routes.slow[0].finish()
    assert await readBody(await busy) == b"done"
    await closed
    assert agent.open_connections == 0
    with pytest.raises(RequestNotSent):
        await agent.request(b"GET", server.url("/hello"))


# -- scripted servers that misbehave ---------------------------------------------------


@dataclass
class Scripted:
    """A server that answers each request's head with ``answer`` and then maybe hangs up."""

    answer: bytes
    hang_up: bool = True
    connections: list[Protocol] = field(default_factory=list)


class _ScriptedProtocol(Protocol):
    def __init__(self, script: Scripted) -> None:
        self.script = script
        self.buf = b""

    def connectionMade(self) -> None:
        self.script.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" in self.buf:
            self.buf = b""
            assert self.transport is not None
            if self.script.answer:
                self.transport.write(self.script.answer)
            if self.script.hang_up:
                self.transport.loseConnection()


@pytest_twisted.async_yield_fixture
async def scripted() -> AsyncIterator[tuple[Scripted, bytes]]:
    script = Scripted(b"")
    factory = Factory.forProtocol(lambda: _ScriptedProtocol(script))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield script, f"http://127.0.0.1:{port.getHost().port}/".encode()
    for c in script.connections:
        assert c.transport is not None
        c.transport.loseConnection()
    await maybeDeferred(port.stopListening)


@pytest_twisted.ensureDeferred
async def test_server_dying_mid_response(
    scripted: tuple[Scripted, bytes], agent: PersistentAgent
) -> None:
    """
    If the server hangs up before any byte of its answer, then the request
    fails with L{ResponseNeverReceived}; after part of the head, with
    L{ResponseFailed}; after the head but before the whole body, the response
    arrives and reading its body fails with L{ResponseFailed} (Content-Length
    or chunked), or, for a body that ends at the close, ends with
    L{PotentialDataLoss} (treq's content takes that as the end).
    """
    script, url = scripted
    script.answer = b""
    with pytest.raises(ResponseNeverReceived):
        await agent.request(b"POST", url)
    script.answer = b"HTTP/1.1 200 OK\r\nContent-Len"
    with pytest.raises(ResponseFailed) as failed:
        await agent.request(b"GET", url)
    assert not isinstance(failed.value, ResponseNeverReceived)
    for answer in [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
    ]:
        script.answer = answer
        response = await agent.request(b"GET", url)
        with pytest.raises(ResponseFailed):
            await readBody(response)
        response = await HTTPClient(agent).get(url)
        with pytest.raises(ResponseFailed):
            await response.content()
    script.answer = b"HTTP/1.1 200 OK\r\n\r\nuntil the end"
    response = await agent.request(b"GET", url)
    with pytest.raises(PartialDownloadError) as partial:
        await readBody(response)
    assert partial.value.response == b"until the end"
    response = await HTTPClient(agent).get(url)
    assert await response.content() == b"until the end"
    assert agent.open_connections == 0


@pytest_twisted.ensureDeferred
async def test_an_unparseable_answer_fails_and_closes(
    scripted: tuple[Scripted, bytes], agent: PersistentAgent
) -> None:
    """
    If the answer is not HTTP, then the request fails with L{ResponseFailed}
    and the connection is dropped.
    """
    script, url = scripted
    script.hang_up = False
    for answer in [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"]:
        script.answer = answer
        with pytest.raises(ResponseFailed):
            await agent.request(b"GET", url)
        await until(lambda: agent.open_connections == 0, "the connection to drop")


# -- https --------------------------------------------------------------------------


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"hello"


@pytest_twisted.ensureDeferred
async def test_https_with_a_private_ca(tmp_path: Any) -> None:
    """
    If the agent's TLS policy trusts the CA that issued the server's
    certificate, then https requests succeed and reuse their connection; a
    certificate for another host fails before any HTTP, with the TLS error
    among the reasons.
    """
    ca = CA.create(tmp_path / "ca")
    good, wrong = ca.issue("good"), ca.issue("wrong", ("node.example",))
    policy = BrowserLikePolicyForHTTPS(
        trustRoot=trustRootFromCertificates(load_ca_certificates(str(ca.pem)))
    )
    cases = [(good, "127.0.0.1", True), (good, "localhost", True), (wrong, "127.0.0.1", False)]
    for leaf, host, ok in cases:
        endpoint = serverFromString(
            reactor, f"ssl:0:interface=127.0.0.1:privateKey={leaf.key}:certKey={leaf.cert}"
        )
        site = Counting(Site(_Hello()))
        port = await endpoint.listen(site)
        agent = PersistentAgent(reactor, policy)
        url = f"https://{host}:{port.getHost().port}/".encode()
        try:
            if ok:
                assert await get(agent, url) == (200, b"hello")
                assert await get(agent, url) == (200, b"hello")
                assert site.accepted == 1
            else:
                with pytest.raises(ResponseNeverReceived) as refused:
                    await agent.request(b"GET", url)
                reasons = refused.value.reasons
                assert any(r.check(SSL.Error, VerificationError) for r in reasons)
        finally:
            await agent.close()
            await close_server(site, port)


# -- on a memory reactor: the wire, the clock, the pool --------------------------------


class CountingTransport(StringTransport):
    """A string transport that also keeps each write apart."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


@dataclass
class Wire:
    """One connection the agent opened, completed over a string transport."""

    protocol: Any
    transport: CountingTransport

    def sent(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data

    def answer(self, data: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") -> None:
        self.protocol.dataReceived(data)

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


class MemoryAgentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.agent = PersistentAgent(self.reactor, max_per_host=2, idle_timeout=10.0)
        self.wires: list[Wire] = []

    def connect(self) -> Wire:
        """Complete the next connection attempt the agent made."""
        host, port, factory, _, _ = self.reactor.tcpClients[len(self.wires)]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        assert protocol is not None
        transport = CountingTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol.makeConnection(transport)
        wire = Wire(protocol, transport)
        self.wires.append(wire)
        return wire

    def request(
        self, method: bytes = b"GET", url: bytes = b"http://10.0.0.1:81/a", **kw: Any
    ) -> Deferred[IResponse]:
        return self.agent.request(method, url, **kw)

    def body(self, d: Deferred[IResponse]) -> bytes:
        return self.successResultOf(readBody(self.successResultOf(d)))

    def test_the_request_goes_out_in_one_write(self) -> None:
        """
        If a request has an in-memory body (L{BytesProducer}, or treq's
        default FileBodyProducer over BytesIO), then head and body are written
        at once with a Content-Length, the Host header names a non-default
        port, and the caller's framing headers are replaced.
        """
        for producer in [BytesProducer(b"hello"), FileBodyProducer(io.BytesIO(b"hello"))]:
            headers = Headers({b"X-A": [b"1", b"2"], b"Content-Length": [b"99"]})
            d = self.request(b"POST", headers=headers, bodyProducer=producer)
            wire = self.wires[-1] if self.wires else self.connect()
            wire.answer()
            assert self.body(d) == b"ok"
        (wire,) = self.wires
        one = (
            b"POST /a HTTP/1.1\r\nHost: 10.0.0.1:81\r\nX-A: 1\r\nX-A: 2\r\n"
            b"Content-Length: 5\r\n\r\nhello"
        )
        assert wire.transport.writes == [one, one]

    def test_request_lines_without_a_body(self) -> None:
        """
        If a request has no body, then a GET carries no Content-Length, a POST
        carries C{Content-Length: 0}, and a default port is left out of Host.
        """
        d = self.request(url=b"http://example.test/x?q=1#frag")
        wire = self.connect()
        assert wire.sent() == b"GET /x?q=1 HTTP/1.1\r\nHost: example.test\r\n\r\n"
        wire.answer()
        self.body(d)
        d = self.request(b"POST", url=b"http://example.test?q")
        assert (
            wire.sent() == b"POST /?q HTTP/1.1\r\nHost: example.test\r\nContent-Length: 0\r\n\r\n"
        )
        wire.answer()
        self.body(d)

    def test_a_streamed_body_of_unknown_length_is_chunked(self) -> None:
        """
        If the body producer is not in memory and has no length, then it is
        run and its writes go out chunk-framed, ended by the last chunk; the
        answer reuses the connection.
        """

        @implementer(IBodyProducer)
        class Streamed:
            length = UNKNOWN_LENGTH

            def __init__(self) -> None:
                self.finished: Deferred[None] = Deferred()

            def startProducing(self, consumer: Any) -> Deferred[None]:
                consumer.write(b"abc")
                self.consumer = consumer
                return self.finished

            def stopProducing(self) -> None:
                pass

            def pauseProducing(self) -> None:
                pass

            def resumeProducing(self) -> None:
                pass

        producer = Streamed()
        d = self.request(b"PUT", bodyProducer=producer)
        wire = self.connect()
        assert wire.sent().endswith(b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        producer.consumer.write(b"de")
        producer.finished.callback(None)
        assert wire.sent() == b"2\r\nde\r\n0\r\n\r\n"
        wire.answer()
        assert self.body(d) == b"ok"
        assert self.agent.idle_connections() == 1

    def test_a_failing_producer_fails_the_request(self) -> None:
        """
        If the body producer fails, then the request fails with
        L{RequestGenerationFailed} and the connection is aborted.
        """

        @implementer(IBodyProducer)
        class Broken:
            length = 3

            def startProducing(self, consumer: Any) -> Deferred[None]:
                raise ValueError("no body today")

            def stopProducing(self) -> None:
                pass

            def pauseProducing(self) -> None:
                pass

            def resumeProducing(self) -> None:
                pass

        d = self.request(b"PUT", bodyProducer=Broken())
        wire = self.connect()
        failure = self.failureResultOf(d, RequestGenerationFailed)
        assert failure.value.reasons[0].check(ValueError)
        assert wire.transport.disconnected

    def test_an_answer_fed_byte_by_byte(self) -> None:
        """
        If the answer arrives one byte at a time, across a 100 Continue, a
        chunked body with extensions and trailers, then it is parsed whole and
        the connection is kept.
        """
        answer = (
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nX-Multi: a\r\nx-multi: b\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"4;ext=1\r\nchun\r\n3\r\nked\r\n0\r\nTrailer: x\r\n\r\n"
        )
        d = self.request()
        wire = self.connect()
        for i in range(len(answer)):
            wire.answer(answer[i : i + 1])
        response = self.successResultOf(d)
        assert (response.code, response.phrase) == (201, b"Created")
        assert response.headers.getRawHeaders(b"x-multi") == [b"a", b"b"]
        assert self.successResultOf(readBody(response)) == b"chunked"
        assert self.agent.idle_connections() == 1

    def test_idle_connections_expire_after_the_idle_timeout(self) -> None:
        """
        If a kept connection stays idle for C{idle_timeout} seconds, then it
        is closed; one that went idle later is closed later; one sweep timer
        serves them all, and none is left when the pool is empty.
        """
        first, second = self.request(), self.request()
        a, b = self.connect(), self.connect()
        a.answer()
        self.reactor.advance(4)
        b.answer()
        self.body(first)
        self.body(second)
        assert len(self.reactor.getDelayedCalls()) == 1
        self.reactor.advance(5.9)
        assert not a.transport.disconnecting
        self.reactor.advance(0.2)
        assert a.transport.disconnecting and not b.transport.disconnecting
        a.lose()
        self.reactor.advance(3.8)
        assert not b.transport.disconnecting
        self.reactor.advance(0.2)
        assert b.transport.disconnecting
        b.lose()
        assert self.reactor.getDelayedCalls() == []
        assert self.agent.idle_connections() == 0

    def test_a_reused_connection_is_taken_out_of_the_idle_timer(self) -> None:
        """
        If an idle connection is reused before its timeout, then the sweep
        leaves it open, and it expires only after it is idle again.
        """
        d = self.request()
        wire = self.connect()
        wire.answer()
        self.body(d)
        self.reactor.advance(9)
        d = self.request()
        self.reactor.advance(2)  # the sweep runs while the connection is busy
        assert not wire.transport.disconnecting
        wire.answer()
        self.body(d)
        self.reactor.advance(9.9)
        assert not wire.transport.disconnecting
        self.reactor.advance(0.2)
        assert wire.transport.disconnecting

    def test_at_most_max_per_host_idle(self) -> None:
        """
        If three answered connections to one host go idle with
        C{max_per_host=2}, then the one idle longest is closed.
        """
        pending = [self.request() for _ in range(3)]
        wires = [self.connect() for _ in range(3)]
        for wire in wires:
            wire.answer()
        for d in pending:
            self.body(d)
        assert [w.transport.disconnecting for w in wires] == [True, False, False]
        assert self.agent.idle_connections() == 2

    def test_get_is_retried_on_a_reused_connection_the_server_closed(self) -> None:
        """
        If a reused connection is lost before any byte of the answer, then a
        GET without a body is sent again on a new connection (as
        twisted.web's pool does), but a POST fails with
        L{ResponseNeverReceived}: the server may have acted on it.
        """
        d = self.request()
        wire = self.connect()
        wire.answer()
        self.body(d)
        d = self.request()
        wire.lose()
        retry = self.connect()
        assert retry.sent().startswith(b"GET /a HTTP/1.1\r\n")
        retry.answer()
        assert self.body(d) == b"ok"
        d = self.request(b"POST", bodyProducer=BytesProducer(b"x"))
        retry.lose()
        self.failureResultOf(d, ResponseNeverReceived)
        assert len(self.reactor.tcpClients) == 2

    def test_a_new_connection_lost_is_not_retried(self) -> None:
        """
        If a fresh connection is lost before the answer, then even a GET fails
        with L{ResponseNeverReceived}: only a reused connection is retried.
        """
        d = self.request()
        self.connect().lose()
        self.failureResultOf(d, ResponseNeverReceived)
        assert len(self.reactor.tcpClients) == 1

    def test_cancel_while_connecting(self) -> None:
        """
        If the request is cancelled before its connection is made, then the
        attempt stops and the request fails with L{CancelledError}.
        """
        d = self.request()
        connector = self.reactor.connectors[0]
        d.cancel()
        self.failureResultOf(d, CancelledError)
        assert connector.stoppedConnecting

    def test_cancel_after_the_head_leaves_the_response(self) -> None:
        """
        If the response's head has arrived, then cancelling the request's
        Deferred does nothing: the body can still be read.
        """
        d = self.request()
        wire = self.connect()
        wire.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        response = self.successResultOf(d)
        d.cancel()
        body = readBody(response)
        wire.answer(b"cd")
        assert self.successResultOf(body) == b"abcd"

    def test_reading_the_body_can_abort(self) -> None:
        """
        If the body's reader closes its transport (readBody when cancelled),
        then the connection is aborted and not kept.
        """
        d = self.request()
        wire = self.connect()
        wire.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        body = readBody(self.successResultOf(d))
        body.cancel()
        self.failureResultOf(body)
        assert wire.transport.disconnected
        wire.lose()
        assert self.agent.idle_connections() == 0

    def test_close_before_and_after(self) -> None:
        """
        If the agent is closed with no connection, then its Deferred fires at
        once; a request after that is not sent.
        """
        assert self.successResultOf(self.agent.close()) is None
        self.failureResultOf(self.request())
        assert self.reactor.tcpClients == []

    def test_what_cannot_be_a_request_is_refused_before_any_connection(self) -> None:
        """
        If the target holds a space or control byte, the method is not a
        token, or the URL has no host, then C{request} raises L{ValueError};
        a scheme other than http(s) fails with L{SchemeNotSupported}; no
        connection is attempted for any of them.
        """
        for method, url in [
            (b"GET", b"http://10.0.0.1:81/a b"),
            (b"GET", b"http://10.0.0.1:81/a\r\nX-Evil: 1"),
            (b"GE T", b"http://10.0.0.1:81/"),
            (b"GET", b"http://:81/"),
        ]:
            with pytest.raises(ValueError):
                self.agent.request(method, url)
        self.failureResultOf(self.agent.request(b"GET", b"ftp://10.0.0.1/"), SchemeNotSupported)
        assert self.reactor.tcpClients == []

    def test_treq_client_through_the_agent(self) -> None:
        """
        If treq's client runs over the agent with L{body_producer}, then
        C{data=bytes} goes out with the head, and treq's response reads the
        body.
        """
        http = HTTPClient(self.agent, data_to_body_producer=body_producer)
        d = http.post("http://10.0.0.1:81/batch", data=b'{"ops":[]}')
        wire = self.connect()
        assert wire.sent().endswith(b'Content-Length: 10\r\n\r\n{"ops":[]}')
        wire.answer(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        )
        assert self.successResultOf(self.successResultOf(d).json()) == {}


def test_bytes_producer_writes_its_body() -> None:
    """L{BytesProducer} is a plain IBodyProducer for code that runs it."""
    written: list[bytes] = []

    class Consumer:
        write = written.append

    producer = BytesProducer(b"abc")
    assert producer.length == 3
    assert producer.startProducing(Consumer()).called
    assert written == [b"abc"]
    assert isinstance(body_producer(io.BytesIO(b"x")), FileBodyProducer)
    assert succeed(None).called
