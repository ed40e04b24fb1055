"""The HTTP front door over real sockets: limits, bad input, client hang-ups.

These run a node (and a proxy) in the test process on 127.0.0.1 port 0 with
the global reactor, through pytest-twisted. Clients that must misbehave (send
a gigabyte header, stream forever, send 600 headers) are plain blocking
sockets run in a thread, so nothing in the client hides what the server did.
"""

from __future__ import annotations

import gc
import json
import os
import re
import select
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceCollection, MultiService
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IListeningPort, IReactorTCP, IReactorTime
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http import datetimeToString
from twisted.web.resource import EncodingResourceWrapper, Resource
from twisted.web.server import GzipEncoderFactory
from twisted.web.server import version as server_version
from zope.interface import implementer

from shardkv import tap
from shardkv.node.service import make_node_service
from shardkv.proxy.service import make_proxy_service
from shardkv.storage.memory import MemoryEngine
from shardkv.testing.polling import free_port
from shardkv.web import site as site_module
from shardkv.web.dataroutes import JSON_ENVELOPE_SLACK
from shardkv.web.site import LimitedRequest, QuietSite, make_site
from tests.tlscerts import CA

reactor = cast(Any, _reactor)

LIMIT = 64 * 1024
"""The value limit the test servers run with (small, so limits are quick to hit)."""
JSON_LIMIT = 6 * LIMIT + JSON_ENVELOPE_SLACK
PROMPT = 2.0
"""Seconds within which a refusal that needs no body must arrive."""


def now_ms() -> int:
    return int(cast(IReactorTime, reactor).seconds() * 1000)


# -- serving a service tree on port 0 ---------------------------------------------


def port_of(port: IListeningPort) -> int:
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    return address.port


@dataclass
class Served:
    """A running service tree whose listeners were bound on port 0."""

    service: MultiService
    ports: list[IListeningPort]
    requests: list[LimitedRequest] = field(default_factory=list)
    sites: list[QuietSite] = field(default_factory=list)

    @property
    def site(self) -> QuietSite:
        return self.sites[0]

    @property
    def port(self) -> int:
        return port_of(self.ports[0])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        for port in self.ports:
            await maybeDeferred(port.stopListening)
        await self.service.stopService()


async def serve(service: MultiService) -> Served:
    """Start ``service`` but bind its listeners ourselves, to learn the ports.

    Each listener's site gets a request class that also records the requests
    it creates, so tests can look at what the server kept.
    """
    listeners = [s for s in service if isinstance(s, StreamServerEndpointService)]
    for listener in listeners:
        service.removeService(listener)
    service.startService()
    served = Served(service, [])
    for listener in listeners:
        site = cast(Any, listener.factory)
        base = site.requestFactory

        def recording(*args: Any, _base: Any = base) -> Any:
            request = _base(*args)
            served.requests.append(request)
            return request

        site.requestFactory = recording
        served.sites.append(site)
        served.ports.append(await listener.endpoint.listen(site))
    return served


async def serve_node(**options: Any) -> Served:
    """A node on port 0 with the test limits; ``options`` go to L{make_node_service}."""
    options.setdefault("listen", ["tcp:0:interface=127.0.0.1"])
    service = make_node_service(
        reactor=reactor,
        node_id="test-node",
        engine=MemoryEngine(),
        max_value_bytes=LIMIT,
        now_ms=now_ms,
        **options,
    )
    return await serve(service)


@pytest_twisted.async_yield_fixture
async def node() -> AsyncIterator[Served]:
    served = await serve_node()
    yield served
    await served.stop()


@pytest_twisted.async_yield_fixture
async def http() -> AsyncIterator[HTTPClient]:
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.retryAutomatically = False
    yield HTTPClient(Agent(reactor, pool=pool))
    await pool.closeCachedConnections()


# -- a raw client, run in a thread -------------------------------------------------


@dataclass
class Raw:
    """What a raw client saw."""

    data: bytes = b""
    eof: bool = False
    """The server closed its side and we read to the end."""
    error: str | None = None
    """A reset or other socket error, while sending or reading."""
    sent: int = 0
    """Body bytes the client got to send."""
    elapsed: float = 0.0

    @property
    def status(self) -> int:
        first = self.data.split(b"\r\n", 1)[0].split()
        if len(first) < 2 or not first[0].startswith(b"HTTP/"):
            raise AssertionError(f"no HTTP status line in {self.data[:200]!r} ({self.error})")
        return int(first[1])

    @property
    def body(self) -> bytes:
        """The body of the (first final) answer, de-chunked."""
        data = self.data.split(b"\r\n\r\n", 1)[1]
        if self.header(b"transfer-encoding") != b"chunked":
            return data
        out = b""
        while True:
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                return out
            out, data = out + data[:size], data[size + 2 :]

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: bytes) -> bytes | None:
        head = self.data.split(b"\r\n\r\n", 1)[0]
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


def exchange(
    port: int,
    head: bytes,
    body: Iterable[bytes] = (),
    *,
    stop_on_answer: bool = True,
    timeout: float = 5.0,
) -> Raw:
    """Send ``head``, then the ``body`` pieces, then read until the server closes.

    With ``stop_on_answer`` the client behaves like curl: it stops sending as
    soon as an answer is readable. Without it, it sends everything first.
    Blocking; run it with ``deferToThread``.
    """
    result = Raw()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(head)
            for piece in body:
                if stop_on_answer and select.select([s], [], [], 0)[0]:
                    break
                s.sendall(piece)
                result.sent += len(piece)
        except OSError as e:
            result.error = f"send: {e!r}"
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    result.eof = True
                    break
                result.data += data
        except TimeoutError:
            pass
        except OSError as e:
            result.error = (result.error or "") + f" recv: {e!r}"
    result.elapsed = time.monotonic() - started
    return result


async def raw(port: int, head: bytes, body: Iterable[bytes] = (), **kw: Any) -> Raw:
    result: Raw = await deferToThread(exchange, port, head, body, **kw)
    return result


def chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """A chunked-encoded body of ``total`` bytes (without the final chunk)."""
    piece = b"%x\r\n" % size + b"x" * size + b"\r\n"
    for _ in range(total // size):
        yield piece


def rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pytest.skip("needs /proc/self/status")


# -- size limits, enforced before buffering ------------------------------------------


@pytest_twisted.ensureDeferred
async def test_huge_content_length_refused_before_body(node: Served) -> None:
    """
    If a PUT declares a 1 GiB body and sends none of it, then the node
    answers 413 in JSON at once (it does not wait for the body) and closes
    the connection.
    """
    head = b"PUT /kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n"
    got = await raw(node.port, head)
    assert got.status == 413, got
    assert got.header(b"content-type") == b"application/json"
    assert got.json()["error"] == "payload_too_large"
    assert str(LIMIT) in got.json()["message"]
    assert got.eof, f"connection left open: {got}"
    assert got.elapsed < PROMPT, got
    (request,) = node.requests
    assert request.content is None, "a buffer or temp file was made for the refused body"


@pytest_twisted.ensureDeferred
async def test_chunked_body_refused_while_streaming(node: Served) -> None:
    """
    If a chunked PUT streams 64 MiB to a node whose limit is 64 KiB, then the
    node answers 413 while the body is still coming, the client never gets
    to send most of it, and the node neither keeps what it read nor grows.
    """
    total = 64 << 20
    before = rss_bytes()
    head = b"PUT /kv/k HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    got = await raw(node.port, head, chunks(total))
    assert got.status == 413, got
    assert got.json()["error"] == "payload_too_large"
    assert got.sent < total // 4, f"the node read {got.sent} bytes before refusing"
    assert rss_bytes() - before < 32 << 20
    (request,) = node.requests
    assert request.content is None, "the refused body is still held"


@pytest_twisted.ensureDeferred
async def test_refusal_lingers_for_a_client_that_keeps_sending(node: Served) -> None:
    """
    If a client streams a 32 MiB chunked body without reading, then the node
    keeps draining after its 413 (a lingering close), so the client finishes
    sending without a reset and then reads the 413.
    """
    head = b"PUT /kv/k HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    got = await raw(node.port, head, chunks(32 << 20), stop_on_answer=False)
    assert got.error is None, got.error
    assert got.status == 413, got
    assert got.eof


@pytest_twisted.ensureDeferred
async def test_body_at_the_limit_is_accepted(node: Served, http: HTTPClient) -> None:
    """
    If a value is exactly the limit, then it is stored and reads back intact,
    whether sent with a length or chunked; one byte more is refused.
    """
    value = os.urandom(LIMIT)
    response = await http.put(node.url + "/kv/exact", data=value)
    assert response.code == 201, await response.text()
    await response.content()
    response = await http.get(node.url + "/kv/exact")
    assert response.code == 200
    assert await response.content() == value

    head = b"PUT /kv/chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    head += b"Connection: close\r\n\r\n"
    got = await raw(node.port, head + b"".join(chunks(LIMIT, 4096)) + b"0\r\n\r\n")
    assert got.status == 201, got

    response = await http.put(node.url + "/kv/over", data=value + b"!")
    assert response.code == 413
    assert (await response.json())["error"] == "payload_too_large"


@pytest_twisted.ensureDeferred
async def test_expect_continue_oversized_gets_413_not_100(node: Served) -> None:
    """
    If a client sends C{Expect: 100-continue} with an oversized length, then
    the first and only answer is 413: no C{100 Continue} invites the body.
    Within the limit, the same request does get C{100 Continue}.
    """
    head = b"PUT /kv/k HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
    got = await raw(node.port, head % (LIMIT + 1))
    assert got.status == 413, got
    assert b"100 Continue" not in got.data
    assert got.eof

    small = await raw(
        node.port, head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") % 2 + b"ok"
    )
    assert small.data.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 "), small


@pytest_twisted.ensureDeferred
async def test_oversized_json_envelope(node: Served, http: HTTPClient) -> None:
    """
    If a C{POST /set} declares a body larger than the JSON limit, then it is
    refused with 413 before the body is read; a body within the envelope
    whose value is too long after decoding is refused with 413 too, while a
    value exactly at the limit is stored.
    """
    head = b"POST /set HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: %d\r\n\r\n" % (JSON_LIMIT + 1)
    got = await raw(node.port, head)
    assert got.status == 413, got
    assert got.json()["error"] == "payload_too_large"
    assert got.elapsed < PROMPT

    body = json.dumps({"key": "k", "value": "v" * (LIMIT + 1)}).encode()
    assert len(body) < JSON_LIMIT
    response = await http.post(node.url + "/set", data=body)
    assert response.code == 413
    assert (await response.json())["error"] == "payload_too_large"

    body = json.dumps({"key": "k", "value": "v" * LIMIT}).encode()
    response = await http.post(node.url + "/set", data=body)
    assert response.code == 200, await response.text()
    await response.content()


@pytest_twisted.ensureDeferred
async def test_escaped_value_within_the_limit_is_accepted(node: Served, http: HTTPClient) -> None:
    """
    If a value of exactly the limit (in UTF-8) is sent to C{/set} the way
    C{json.dumps} encodes it by default (non-ASCII as C{\\uXXXX}), then it is
    stored, as the same value is through C{PUT /kv}.
    """
    value = "\u00e9" * (LIMIT // 2)
    assert len(value.encode("utf-8")) == LIMIT
    response = await http.put(node.url + "/kv/accent", data=value.encode("utf-8"))
    assert response.code == 201
    await response.content()
    body = json.dumps({"key": "accent", "value": value}).encode("ascii")
    response = await http.post(node.url + "/set", data=body)
    assert response.code == 200, await response.text()
    await response.content()


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target", [b"/kv/%FF", b"/kv/a%C3", b"/get?key=%FF", b"/kv/%ED%A0%80", b"/kv/%FF/x"]
)
@pytest_twisted.ensureDeferred
async def test_non_utf8_key_is_400_json(node: Served, target: bytes) -> None:
    """
    If a key in the path or query is not valid UTF-8 (raw, percent-encoded,
    truncated, or an encoded surrogate), then the answer is 400 in JSON.
    """
    got = await raw(node.port, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % target)
    assert got.status == 400, got
    assert got.header(b"content-type") == b"application/json"
    assert got.json()["error"] in ("bad_request", "invalid_key")


@pytest_twisted.ensureDeferred
async def test_raw_non_ascii_request_line_is_400(node: Served) -> None:
    """
    If the request line itself holds a raw 0xFF byte (not percent-encoded,
    so not HTTP), then Twisted's parser refuses it with 400 before any route.
    """
    got = await raw(node.port, b"GET /kv/\xff HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert got.status == 400, got
    assert got.eof


@pytest_twisted.ensureDeferred
async def test_key_too_long_is_414(node: Served, http: HTTPClient) -> None:
    """
    If a key is 1025 bytes, then the answer is 414 in JSON; 1024 is stored.
    """
    response = await http.put(node.url + "/kv/" + "k" * 1025, data=b"v")
    assert response.code == 414
    assert (await response.json())["error"] == "key_too_long"
    response = await http.put(node.url + "/kv/" + "k" * 1024, data=b"v")
    assert response.code == 201
    await response.content()


@pytest.mark.parametrize(("count", "status"), [(600, 431), (5000, 431), (400, 404)])
@pytest_twisted.ensureDeferred
async def test_header_count_limit(node: Served, count: int, status: int) -> None:
    """
    If a request carries 600 or 5,000 headers, then the limit (500 lines)
    refuses it with 431 in JSON; 400 headers pass through to the route
    (404: no such key).
    """
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(count))
    head = b"GET /kv/missing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers + b"\r\n"
    got = await raw(node.port, head)
    assert got.status == status, got
    assert got.header(b"content-type") == b"application/json"
    if status == 431:
        assert got.json()["error"] == "headers_too_large"
        assert got.eof


# -- a client that hangs up on the proxy -------------------------------------------------


class HangingNode(Protocol):
    """A fake node: answers C{GET /health}, refuses the cluster map's routes (so
    the proxy stays on its provisional map), accepts anything else and never answers."""

    def __init__(self, seen: Deferred[None], lost: Deferred[None]) -> None:
        self.buffer = b""
        self.seen = seen
        self.lost = lost
        self.hanging = False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer and not self.hanging:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            length = re.search(rb"(?im)^content-length: *(\d+)", head)
            self.buffer = self.buffer[int(length.group(1)) if length else 0 :]
            if head.startswith(b"GET /health "):
                self.answer(b"200 OK", b'{"status": "ok", "role": "node"}')
            elif head.split(b" ")[1].startswith(b"/replica/map"):
                self.answer(b"404 Not Found", b'{"error": "no_route", "message": "no maps here"}')
            else:
                self.hanging = True
                if not self.seen.called:
                    self.seen.callback(None)

    def answer(self, status: bytes, body: bytes) -> None:
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body)
        )

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.hanging and not self.lost.called:
            self.lost.callback(None)


class HangingNodeFactory(ServerFactory):
    def __init__(self) -> None:
        self.seen: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.protocols: list[HangingNode] = []

    def buildProtocol(self, addr: object) -> HangingNode:
        protocol = HangingNode(self.seen, self.lost)
        self.protocols.append(protocol)
        return protocol


@implementer(ILogObserver)
class Capture:
    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def errors(self) -> list[str]:
        bad = [
            e
            for e in self.events
            if e.get("log_failure") is not None
            or e.get("isError")
            or e.get("log_level") in (LogLevel.error, LogLevel.critical)
        ]
        return [f"{formatEvent(e)} {e.get('log_failure')!r}" for e in bad]


def within(d: Deferred[Any], seconds: float) -> Deferred[Any]:
    return d.addTimeout(seconds, cast(IReactorTime, reactor))


@pytest.mark.parametrize(
    "head",
    [
        b"GET /kv/some-key HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PUT /kv/some-key HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nvalue",
        b'POST /set HTTP/1.1\r\nHost: x\r\nContent-Length: 27\r\n\r\n{"key": "k", "value": "v1"}',
    ],
    ids=["get", "put", "set"],
)
@pytest_twisted.ensureDeferred
async def test_client_hangup_on_proxy_logs_no_error(head: bytes) -> None:
    """
    If a client hangs up on the proxy while the node it forwarded to has not
    answered, then the proxy logs no error. A read's forward is cancelled (the
    node sees its connection close at once); a write's is not (a write once sent
    is never cancelled, so replicas are not left half-written: one-round writes
    send at once), and the node sees its connection close at the timeout.
    """
    capture = Capture()
    globalLogPublisher.addObserver(capture)
    fake = HangingNodeFactory()
    fake_port = cast(IReactorTCP, reactor).listenTCP(0, fake, interface="127.0.0.1")
    proxy = await serve(
        make_proxy_service(
            reactor=reactor,
            nodes={f"127.0.0.1:{port_of(fake_port)}": 1.0},
            listen=["tcp:0:interface=127.0.0.1"],
            max_value_bytes=LIMIT,
            timeout=30.0 if head.startswith(b"GET") else 2.0,
            health_interval=30.0,
        )
    )
    client: Any = None
    try:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port)
        connected: Any = await endpoint.connect(Factory.forProtocol(Protocol))
        client = connected.transport
        client.write(head)
        await within(fake.seen, 5.0)
        client.loseConnection()
        await within(fake.lost, 15.0)
        for _ in range(3):
            await deferLater(cast(IReactorTime, reactor), 0, lambda: None)
        # The capture must have seen the first health check mark the node up
        # (proof that it captures at all); on a busy box that answer can land
        # after the hang-up, so wait for it with a deadline.
        clock = cast(IReactorTime, reactor)
        deadline = clock.seconds() + 5.0
        while not any(e.get("status") == "up" for e in capture.events):
            assert clock.seconds() < deadline, "the capture saw nothing; the health check never ran"
            await deferLater(clock, 0.01, lambda: None)
        gc.collect()  # an unhandled error in a dropped Deferred is logged on collection
        assert capture.errors() == []
    finally:
        globalLogPublisher.removeObserver(capture)
        if client is not None:
            client.abortConnection()
        for protocol in fake.protocols:
            transport: Any = protocol.transport
            if transport is not None:
                transport.abortConnection()
        await maybeDeferred(fake_port.stopListening)
        await proxy.stop()


# -- the connection cap --------------------------------------------------------------


async def eventually(check: Callable[[], bool], what: str, deadline: float = 5.0) -> None:
    """Let the reactor run until ``check()`` holds; fail after ``deadline`` s."""
    clock = cast(IReactorTime, reactor)
    end = clock.seconds() + deadline
    while not check():
        if clock.seconds() > end:
            raise AssertionError(f"not within {deadline} s: {what}")
        await deferLater(clock, 0.01, lambda: None)


def closed_within(s: socket.socket, seconds: float) -> bool:
    """Whether the server closed ``s`` (EOF or reset) within ``seconds``, writing nothing."""
    readable, _, _ = select.select([s], [], [], seconds)
    if not readable:
        return False
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


def health_on_fresh_connection(port: int) -> int | None:
    """The status of C{GET /health} on a new connection; None if it was closed unanswered."""
    got = exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return got.status if got.data else None


CAP = 50


@pytest_twisted.ensureDeferred
async def test_connection_cap_closes_extra_connections_at_once() -> None:
    """
    If 60 clients connect to a node capped at 50 connections and send
    nothing, then the last 10 are closed at once (without an answer) while
    the first 50 stay open, a new client is closed too, and once 5 of the
    50 hang up, a new client is served.
    """
    served = await serve_node(max_connections=CAP, header_timeout=60.0)
    sockets: list[socket.socket] = []
    try:

        def connect(count: int) -> list[socket.socket]:
            return [socket.create_connection(("127.0.0.1", served.port)) for _ in range(count)]

        sockets = await deferToThread(connect, CAP + 10)
        await eventually(lambda: served.site.turned_away == 10, "10 connections turned away")
        closed = await deferToThread(
            lambda: [i for i, s in enumerate(sockets) if closed_within(s, 0 if i < CAP else 2.0)]
        )
        assert closed == list(range(CAP, CAP + 10)), closed
        assert len(served.site.channels) == CAP
        assert await deferToThread(health_on_fresh_connection, served.port) is None

        for s in sockets[:5]:
            s.close()
        await eventually(lambda: len(served.site.channels) == CAP - 5, "5 channels released")
        assert await deferToThread(health_on_fresh_connection, served.port) == 200
    finally:
        for s in sockets:
            s.close()
        await served.stop()


# -- request bodies in flight -----------------------------------------------------------


def hold(port: int, head: bytes) -> socket.socket:
    """Send a request head whose body never comes; keep the connection."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(head)
    return s


@pytest_twisted.async_yield_fixture
async def small_proxy() -> AsyncIterator[Served]:
    """A proxy that holds at most 4 values' worth of request bodies (its nodes are absent)."""
    proxy = await serve(
        make_proxy_service(
            reactor=reactor,
            nodes={f"127.0.0.1:{free_port()}": 1.0},
            listen=["tcp:0:interface=127.0.0.1"],
            max_value_bytes=LIMIT,
            timeout=1.0,
            health_interval=30.0,
            max_inflight_bytes=4 * LIMIT,
        )
    )
    yield proxy
    await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_inflight_bodies_past_the_cap_get_503_at_once(small_proxy: Served) -> None:
    """
    If four PUTs whose bodies are still coming hold a proxy's whole budget
    of request bytes, then a fifth PUT is answered 503 overloaded in JSON
    with Retry-After: 1 at once, from its Content-Length, and so is a chunked
    PUT as soon as it announces a chunk; a GET is still served; when the
    four clients hang up, the budget returns to 0.
    """
    site = small_proxy.site
    put = b"PUT /kv/k%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    held = [await deferToThread(hold, small_proxy.port, put % (i, LIMIT)) for i in range(4)]
    try:
        await eventually(lambda: site.inflight_bytes == 4 * LIMIT, "4 bodies admitted")

        got = await raw(small_proxy.port, put % (5, LIMIT))
        assert got.status == 503, got
        assert got.json()["error"] == "overloaded"
        assert got.header(b"retry-after") == b"1"
        assert got.eof
        assert got.elapsed < PROMPT
        assert small_proxy.requests[4].content is None, "the refused body was buffered"

        chunked = b"PUT /kv/c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        got = await raw(small_proxy.port, chunked + b"10\r\n")
        assert got.status == 503, got
        assert got.json()["error"] == "overloaded"
        assert site.inflight_bytes == 4 * LIMIT

        got = await raw(small_proxy.port, b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert got.status == 200, got
    finally:
        for s in held:
            s.close()
    await eventually(lambda: site.inflight_bytes == 0, "the budget released")


@pytest_twisted.ensureDeferred
async def test_inflight_budget_never_leaks() -> None:
    """
    If a node serves many PUTs that complete, many refused while its budget
    is full, chunked PUTs, and clients that hang up halfway through a body,
    then once they are all done the budget is back to 0.
    """
    served = await serve_node(max_inflight_bytes=2 * LIMIT)
    site = served.site
    value = b"v" * LIMIT
    put = b"PUT /kv/k%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    try:
        held = [await deferToThread(hold, served.port, put % (i, LIMIT)) for i in range(2)]
        await eventually(lambda: site.inflight_bytes == 2 * LIMIT, "2 bodies admitted")
        refused = [
            await raw(served.port, put % (i, LIMIT) + value, stop_on_answer=False)
            for i in range(20)
        ]
        assert {r.status for r in refused} == {503}
        held[0].sendall(value)
        answer = await deferToThread(held[0].recv, 65536)
        assert answer.startswith(b"HTTP/1.1 201 "), answer
        held[1].sendall(value[: LIMIT // 2])
        held[1].close()
        for s in held:
            s.close()
        await eventually(lambda: site.inflight_bytes == 0, "the held bodies released")

        close = b"Connection: close\r\n"
        done = [
            await raw(
                served.port,
                (put % (i, LIMIT)).replace(b"\r\n\r\n", b"\r\n" + close + b"\r\n") + value,
            )
            for i in range(20)
        ]
        assert {r.status for r in done} <= {200, 201}, [r.status for r in done]
        chunked = (
            b"PUT /kv/c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" + close + b"\r\n"
        )
        got = await raw(served.port, chunked + b"".join(chunks(LIMIT, 4096)) + b"0\r\n\r\n")
        assert got.status in (200, 201), got
        half = [
            await deferToThread(hold, served.port, put % (i, LIMIT) + value[:100]) for i in range(5)
        ]
        await eventually(lambda: site.inflight_bytes > 0, "half-sent bodies admitted")
        for s in half:
            s.close()
        await eventually(lambda: site.inflight_bytes == 0, "every body released")
        assert site.admission.refused >= 20
    finally:
        await served.stop()


# -- the options reach every site -------------------------------------------------------


def front_door_sites(*argv: str) -> list[QuietSite]:
    options = tap.Options()
    options.parseOptions(list(argv))
    service = tap.makeService(options, MemoryReactor())

    def walk(s: Any) -> Iterator[Any]:
        yield s
        if IServiceCollection.providedBy(s):
            for child in s:
                yield from walk(child)

    found = [s.factory for s in walk(service) if isinstance(s, StreamServerEndpointService)]
    assert found and all(isinstance(site, QuietSite) for site in found)
    return found


def test_front_door_options_and_defaults() -> None:
    """
    If node, proxy and cluster are started with no front-door options, then
    every site has a 10 s header timeout and a cap of 1,024 connections, a
    proxy holds 64 MiB of request bodies and a node 256 MiB; the options
    change all three on every site of each.
    """
    node, proxy = front_door_sites("node", "--storage", "memory"), front_door_sites("proxy")
    for site in node + proxy:
        assert (site.header_timeout, site.max_connections) == (10.0, 1024)
    assert node[0].admission.limit == 256 << 20
    assert proxy[0].admission.limit == 64 << 20
    cluster = front_door_sites("cluster", "--storage", "memory")
    assert sorted(site.admission.limit for site in cluster) == [64 << 20] + [256 << 20] * 3

    flags = ("--header-timeout", "2.5", "--max-connections", "77", "--max-inflight-bytes", "999")
    for argv in (("node", "--storage", "memory"), ("proxy",), ("cluster", "--storage", "memory")):
        for site in front_door_sites(*argv, *flags):
            assert (site.header_timeout, site.max_connections, site.admission.limit) == (
                2.5,
                77,
                999,
            )
    with pytest.raises(usage.UsageError):
        front_door_sites("node", "--max-connections", "0")


@pytest_twisted.ensureDeferred
async def test_connection_cap_on_a_tls_listener(tmp_path: Path) -> None:
    """
    If a TLS listener is at its cap, then a new connection is closed at once
    (the TLS wrapper needs a protocol to wrap, so the site cannot simply
    return None), and the connections within the cap are served over TLS.
    """
    ca = CA.create(tmp_path)
    leaf = ca.issue("node")
    served = await serve_node(listen=[leaf.listen(0)], max_connections=2, header_timeout=60.0)
    context = ssl.create_default_context(cafile=str(ca.pem))

    def scenario(port: int) -> tuple[list[bool], bytes]:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        try:
            extra = socket.create_connection(("127.0.0.1", port))
            with extra:
                turned = closed_within(extra, 2.0)
            with held[0] as s, context.wrap_socket(s, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = b""
                while data := tls.recv(65536):
                    answer += data
            return [turned], answer
        finally:
            for s in held:
                s.close()

    try:
        turned, answer = await deferToThread(scenario, served.port)
        assert turned == [True]
        assert answer.startswith(b"HTTP/1.1 200 "), answer
    finally:
        await served.stop()


@pytest.mark.parametrize(("method", "status"), [(b"GET", 405), (b"PUT", 405), (b"OPTIONS", 200)])
@pytest_twisted.ensureDeferred
async def test_asterisk_target(node: Served, method: bytes, status: int) -> None:
    """
    If a request has the asterisk-form target (C{GET * HTTP/1.1}), then any
    method but OPTIONS gets 405 in JSON with C{Allow: OPTIONS} (twisted.web's
    own answer has no body) and C{OPTIONS *} gets an empty 200.
    """
    got = await raw(node.port, b"%s * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % method)
    assert got.status == status, got
    if status == 405:
        assert got.header(b"allow") == b"OPTIONS"
        assert got.header(b"content-type") == b"application/json"
        assert got.json()["error"] == "method_not_allowed"
    else:
        assert got.body == b""


# -- the request's processing, in memory --------------------------------------------------


class _Boom(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        raise RuntimeError("boom")


class _Text(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"compress me " * 100


def _answer_of(resource: Resource, head: bytes) -> bytes:
    """The answer of a site with this shape's requests, serving ``resource`` as it is."""
    site = QuietSite(resource, LimitedRequest, reactor=MemoryReactorClock())
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    channel = site.buildProtocol(None)
    channel.makeConnection(transport)
    channel.dataReceived(head)
    return cast(bytes, transport.value())


def test_the_date_header_is_made_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """Twisted formats it for every request (2.6 us); it is the same all second long."""
    now = [1_800_000_000.25]
    monkeypatch.setattr(site_module.time, "time", lambda: now[0])
    first = site_module.http_date()
    assert first == datetimeToString(1_800_000_000)
    now[0] += 0.7
    assert site_module.http_date() is first
    now[0] += 0.1
    assert site_module.http_date() == datetimeToString(1_800_000_001)


def test_requests_get_twisteds_server_and_date_headers() -> None:
    got = _answer_of(_Text(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = got.split(b"\r\n\r\n")[0].decode()
    assert f"Server: {server_version.decode()}\r\n" in head
    date = re.search(r"Date: (.*)\r\n", head)
    assert date is not None and date.group(1).endswith(" GMT")


def test_a_resource_s_encoder_still_applies() -> None:
    """The request's process() is Twisted's, less the Date: encoders (gzip) are kept."""
    wrapped = EncodingResourceWrapper(_Text(), [GzipEncoderFactory()])
    got = _answer_of(wrapped, b"GET / HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in head
    assert len(body) < 300


def test_a_resource_that_fails_is_twisteds_500() -> None:
    got = _answer_of(_Boom(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 500 ")
    assert b"boom" not in got  # no traceback shown


def test_a_body_free_request_is_not_weighed() -> None:
    """A GET has no body: its route's limit is not even looked up."""
    asked: list[bytes] = []

    def limit(method: bytes, path: bytes) -> int:
        asked.append(path)
        return 10

    site = make_site(_Text(), limit, reactor=MemoryReactorClock())
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    channel = site.buildProtocol(None)
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    transport.clear()
    channel.dataReceived(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n01234567890")
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert asked == [b"/b"]
