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
import select
import socket
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IListeningPort, IReactorTCP, IReactorTime
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer

from shardkv.node.service import make_node_service
from shardkv.proxy.service import make_proxy_service
from shardkv.storage.memory import MemoryEngine
from shardkv.web.dataroutes import JSON_ENVELOPE_SLACK
from shardkv.web.site import LimitedRequest

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
        served.ports.append(await listener.endpoint.listen(site))
    return served


@pytest_twisted.async_yield_fixture
async def node() -> AsyncIterator[Served]:
    service = make_node_service(
        reactor=reactor,
        node_id="test-node",
        engine=MemoryEngine(),
        listen=["tcp:0:interface=127.0.0.1"],
        max_value_bytes=LIMIT,
        now_ms=now_ms,
    )
    served = await serve(service)
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


@pytest.mark.parametrize(("count", "status"), [(600, 400), (400, 404)])
@pytest_twisted.ensureDeferred
async def test_header_count_limit(node: Served, count: int, status: int) -> None:
    """
    If a request carries 600 headers, then Twisted's own limit (500) refuses
    it with 400; 400 headers pass through to the route (404: no such key).
    """
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(count))
    head = b"GET /kv/missing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers + b"\r\n"
    got = await raw(node.port, head)
    assert got.status == status, got


# -- a client that hangs up on the proxy -------------------------------------------------


class HangingNode(Protocol):
    """A fake node: answers C{GET /health}, accepts anything else and never answers."""

    def __init__(self, seen: Deferred[None], lost: Deferred[None]) -> None:
        self.buffer = b""
        self.seen = seen
        self.lost = lost
        self.hanging = False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer and not self.hanging:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            if head.startswith(b"GET /health "):
                body = b'{"status": "ok", "role": "node"}'
                self.transport.write(  # type: ignore[union-attr]
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
            else:
                self.hanging = True
                if not self.seen.called:
                    self.seen.callback(None)

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
    answered (a read or a write), then the proxy cancels the forward (the
    node sees its connection close) and logs no error.
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
            timeout=30.0,
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
        await within(fake.lost, 5.0)
        for _ in range(3):
            await deferLater(cast(IReactorTime, reactor), 0, lambda: None)
        gc.collect()  # an unhandled error in a dropped Deferred is logged on collection
        assert any(e.get("status") == "up" for e in capture.events), (
            "the capture saw nothing; the health check never ran"
        )
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
