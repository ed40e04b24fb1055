"""The HTTP/1.1 channel over real sockets: what is not HTTP gets a JSON answer and a close.

Each test runs a node in the test process on 127.0.0.1 port 0 (the helpers
of tests/web/test_site.py) and talks to it with a plain blocking socket in a
thread, so nothing in the client hides what the server did.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import time
from collections.abc import AsyncIterator

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread

from shardkv.testing.memory import make_node
from shardkv.web.channel import MAX_HEAD_BYTES, MAX_REQUEST_LINE, ChunkSizes
from shardkv.web.dataroutes import body_limit_for
from shardkv.web.site import make_site
from tests.web.test_site import LIMIT, Raw, Served, node, raw, serve_node

__all__ = ["node"]

PROMPT = 1.0
"""Seconds within which a refusal of what is not HTTP must arrive (the issue's bound)."""
HEADER_TIMEOUT = 0.5
"""The short header timeout the slow-client tests run with."""


def tls_client_hello() -> bytes:
    """The first flight of a real TLS client: a ClientHello record (begins 0x16 0x03)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", hello[:8]
    return hello


def assert_json_refusal(got: Raw, status: int, code: str) -> None:
    assert got.status == status, got
    assert got.header(b"content-type") == b"application/json", got
    body = got.json()
    assert body["error"] == code, body
    assert body["message"], body
    assert got.eof, f"connection left open: {got}"


# -- not HTTP: 400 in JSON, and a close, at once --------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\n\n",
        b"GET /health HTTP/1.1\r\nHost: x\n\n",
        b"GET /health HTTP/1.1\r\nHost: x\nX: y\r\n\r\n",
    ],
    ids=["all-bare-lf", "bare-lf-header", "bare-lf-mid-head"],
)
@pytest_twisted.ensureDeferred
async def test_bare_lf_is_400_at_once(node: Served, head: bytes) -> None:
    """
    If a request's lines end in a bare LF rather than CRLF, then the node
    answers 400 in JSON and closes within a second; before, it waited for a
    CRLF that never came (for the idle timeout, a minute).
    """
    got = await raw(node.port, head)
    assert_json_refusal(got, 400, "bad_request")
    assert got.elapsed < PROMPT, got


@pytest_twisted.ensureDeferred
async def test_tls_client_hello_on_plain_port_is_400(node: Served) -> None:
    """
    If a TLS client speaks to a plain-HTTP port, then its ClientHello is
    answered 400 in JSON and the connection closed within a second.
    """
    got = await raw(node.port, tls_client_hello())
    assert_json_refusal(got, 400, "bad_request")
    assert "TLS" in got.json()["message"]
    assert got.elapsed < PROMPT, got


@pytest.mark.parametrize(
    ("size", "status", "code"),
    [
        (b"ffffffffffffffffffff", 400, "bad_request"),
        (b"f" * 40 + b";ext=1", 400, "bad_request"),
        (b"ffffffffffffffff", 413, "payload_too_large"),
        (b"%x" % (LIMIT + 1), 413, "payload_too_large"),
    ],
    ids=["20-digits", "40-digits-ext", "16-digits", "limit-plus-one"],
)
@pytest_twisted.ensureDeferred
async def test_chunk_size_refused_before_its_bytes(
    node: Served, size: bytes, status: int, code: str
) -> None:
    """
    If a chunked PUT announces a chunk size that overflows 64 bits, then the
    answer is 400 in JSON within a second; one that fits but passes the
    value limit is 413. Before, the node waited for bytes that never came.
    """
    head = b"PUT /kv/k HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\n"
    got = await raw(node.port, head + b"abc")
    assert_json_refusal(got, status, code)
    assert got.elapsed < PROMPT, got
    assert node.site.inflight_bytes == 0


@pytest_twisted.ensureDeferred
async def test_chunks_within_the_limit_are_stored(node: Served) -> None:
    """
    If a chunked PUT sends many chunks (with extensions, some split across
    writes) adding up to the limit, then it is stored: the chunk reader
    follows the framing and does not refuse a good body.
    """
    value = os.urandom(LIMIT)
    body = b""
    for i in range(0, LIMIT, 1000):
        piece = value[i : i + 1000]
        body += b"%x;n=%d\r\n" % (len(piece), i) + piece + b"\r\n"
    body += b"0\r\nX-Trailer: t\r\n\r\n"
    head = b"PUT /kv/chunky HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    head += b"Connection: close\r\n\r\n"
    got = await raw(node.port, head, [body[i : i + 777] for i in range(0, len(body), 777)])
    assert got.status == 201, got
    got = await raw(node.port, b"GET /kv/chunky HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert got.status == 200, got
    assert got.body == value


def test_chunk_sizes_reader() -> None:
    """
    If chunked framing arrives one byte at a time, then the reader still
    finds every size and stops at the last chunk; malformed sizes end it.
    """
    reader = ChunkSizes()
    found: list[int] = []
    for byte in b"3\r\nabc\r\n10;x=y\r\n" + b"z" * 16 + b"\r\n0\r\n\r\nGET / HTTP/1.1\r\n":
        found += reader.sizes(bytes([byte]))
    assert found == [3, 16]
    assert reader.done
    bad = ChunkSizes()
    assert bad.sizes(b"zz\r\n") == []
    assert bad.done
    assert ChunkSizes().sizes(b"1" * 17 + b"\r\n") == [-1]


# -- too long: 414 and 431 in JSON -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_request_line_over_16k_is_414(node: Served) -> None:
    """
    If the request line is over 16 KiB (or even over the whole head's limit),
    then the answer is 414 in JSON (it closed with no status before); a
    request line of exactly 16 KiB passes to the route.
    """
    prefix = b"GET /kv/"
    suffix = b" HTTP/1.1"
    target = b"k" * (MAX_REQUEST_LINE + 1 - len(prefix) - len(suffix))
    got = await raw(node.port, prefix + target + suffix + b"\r\nHost: x\r\n\r\n")
    assert_json_refusal(got, 414, "uri_too_long")
    assert got.elapsed < PROMPT
    huge = await raw(node.port, prefix + b"k" * (MAX_HEAD_BYTES + 1000) + suffix + b"\r\n\r\n")
    assert_json_refusal(huge, 414, "uri_too_long")

    fits = b"GET /health?" + b"p" * (MAX_REQUEST_LINE - 12 - len(suffix)) + suffix
    assert len(fits) == MAX_REQUEST_LINE
    got = await raw(node.port, fits + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert got.status == 200, got


@pytest.mark.parametrize(
    "headers",
    [
        b"X-Big: " + b"v" * (1 << 20) + b"\r\n",
        b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(40)),
    ],
    ids=["one-1MB-header", "40KB-of-headers"],
)
@pytest_twisted.ensureDeferred
async def test_large_headers_are_431(node: Served, headers: bytes) -> None:
    """
    If one header is 1 MB, or the headers add up to more than 32 KiB, then
    the answer is 431 in JSON (before, a closed connection with no status);
    headers just under the total pass.
    """
    got = await raw(node.port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert_json_refusal(got, 431, "headers_too_large")
    assert got.error is None, got.error

    fits = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(MAX_HEAD_BYTES // 1100))
    got = await raw(node.port, b"GET /health HTTP/1.1\r\nConnection: close\r\n" + fits + b"\r\n")
    assert got.status == 200, got


# -- Twisted's own refusals, in JSON -------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"GET /health HTTP/1.1 extra\r\n\r\n",
        b"GET /health HTTP/3.0\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /health HTTP/1.1\r\nBad Name: v\r\n\r\n",
        b"PUT /kv/k HTTP/1.1\r\nContent-Length: 12abc\r\n\r\n",
        b"PUT /kv/k HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"PUT /kv/k HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"PUT /kv/k HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"PUT /kv/k HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX",
        b"\r\n\r\nGET /health HTTP/1.1\r\n\r\n",
    ],
    ids=[
        "four-parts",
        "version",
        "one-part",
        "no-colon",
        "bad-name",
        "bad-length",
        "two-lengths",
        "unknown-coding",
        "chunk-not-hex",
        "chunk-no-crlf",
        "two-blank-lines",
    ],
)
@pytest_twisted.ensureDeferred
async def test_twisted_parser_refusals_are_json(node: Served, head: bytes) -> None:
    """
    If Twisted's parser refuses a request (a bad request line, header,
    length, coding or chunk framing), then the 400 it sends is JSON with a
    code and a message (Twisted's own is a bare status line) and the
    connection closes at once.
    """
    got = await raw(node.port, head)
    assert_json_refusal(got, 400, "bad_request")
    assert got.elapsed < PROMPT, got


# -- slow request heads: --header-timeout -----------------------------------------------


@pytest_twisted.async_yield_fixture
async def slow_node() -> AsyncIterator[Served]:
    served = await serve_node(header_timeout=HEADER_TIMEOUT)
    yield served
    await served.stop()


server_clock = time.time
"""What a test times the server's timeouts with: the reactor's own clock
(C{reactor.seconds}, wall time), not C{time.monotonic}. A VM's wall clock may be
slewed against the monotonic one (0.5 % was measured here), and then a timeout
of 0.5 s on the reactor's clock lasts 0.4975 s on the monotonic one."""


def trickle(
    port: int, first: bytes, then: bytes, every: float, limit: float
) -> tuple[float, bytes]:
    """Send ``first``, then one byte of ``then`` every ``every`` s until the server closes.

    Returns the seconds from the connection attempt to the close, on the
    server's clock (L{server_clock}), and what the server sent; gives up after
    ``limit`` s. Blocking; run it in a thread. The clock starts before
    connecting: the server's header timer starts when its reactor accepts the
    connection, which (the server sharing this process) may come before this
    thread runs again after the connect returns.
    """
    started = server_clock()
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        s.sendall(first)
        seen = b""
        pending = then
        while server_clock() - started < limit:
            readable, _, _ = select.select([s], [], [], every)
            if readable:
                try:
                    data = s.recv(65536)
                except ConnectionResetError:
                    return server_clock() - started, seen
                if not data:
                    return server_clock() - started, seen
                seen += data
                continue
            if pending:
                try:
                    s.sendall(pending[:1])
                except OSError:
                    return server_clock() - started, seen
                pending = pending[1:] or then
        raise AssertionError(f"still open after {limit} s; the server sent {seen!r}")


@pytest_twisted.ensureDeferred
async def test_slowloris_first_request_gets_408(slow_node: Served) -> None:
    """
    If a client sends its request head one byte at a time, forever, then the
    node answers 408 in JSON and closes after the header timeout (0.5 s
    here), though every byte arrived well within the idle timeout.
    """
    elapsed, seen = await deferToThread(
        trickle, slow_node.port, b"GET /health HTTP/1.1\r\n", b"X-Slow: abcdefgh\r\n", 0.05, 10.0
    )
    assert HEADER_TIMEOUT <= elapsed < HEADER_TIMEOUT + PROMPT, elapsed
    got = Raw(data=seen, eof=True)
    assert got.status == 408
    assert got.json()["error"] == "request_timeout"


@pytest_twisted.ensureDeferred
async def test_slowloris_on_a_kept_alive_connection(slow_node: Served) -> None:
    """
    If a kept-alive connection sits idle for four header timeouts after one
    request (that is the idle timeout's business, so it stays open) and then
    starts a second request it never finishes, then the node answers that
    second request 408 one header timeout after its first byte.
    """

    def scenario(port: int) -> tuple[float, bytes, bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while b'"ok"' not in first and b"}" not in first:
                first += s.recv(65536)
            idle_until = time.monotonic() + 4 * HEADER_TIMEOUT
            while time.monotonic() < idle_until:
                readable, _, _ = select.select([s], [], [], idle_until - time.monotonic())
                assert not readable, f"the idle kept-alive connection was closed: {s.recv(100)!r}"
            started = server_clock()
            s.sendall(b"GET /health HTTP/1.1\r\nHo")
            rest = b""
            while True:
                data = s.recv(65536)
                if not data:
                    break
                rest += data
            return server_clock() - started, first, rest

    elapsed, first, rest = await deferToThread(scenario, slow_node.port)
    assert first.startswith(b"HTTP/1.1 200 "), first
    assert HEADER_TIMEOUT <= elapsed < HEADER_TIMEOUT + PROMPT, elapsed
    assert Raw(data=rest, eof=True).status == 408


@pytest_twisted.ensureDeferred
async def test_silent_connection_is_closed_without_an_answer(slow_node: Served) -> None:
    """
    If a client connects and never sends a byte, then the node closes the
    connection after the header timeout and writes nothing (a pooled client
    about to send must not read a 408 as its answer).
    """

    def silent(port: int) -> tuple[float, bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            started = time.monotonic()
            data = s.recv(100)
            return time.monotonic() - started, data

    elapsed, data = await deferToThread(silent, slow_node.port)
    assert data == b""
    assert elapsed < HEADER_TIMEOUT + PROMPT, elapsed


@pytest_twisted.ensureDeferred
async def test_a_slow_but_steady_client_within_the_timeout_is_served(slow_node: Served) -> None:
    """
    If a client sends a complete request head in pieces within the header
    timeout, then it is served, and a slow body is not the header timeout's
    business.
    """

    def pieces(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            for piece in (b"PUT /kv/slow HTTP/1.1\r\n", b"Host: x\r\n", b"Content-Length: 2\r\n"):
                s.sendall(piece)
                time.sleep(HEADER_TIMEOUT / 10)  # the client's pace, not synchronisation
            s.sendall(b"Connection: close\r\n\r\n")
            time.sleep(HEADER_TIMEOUT * 2)
            s.sendall(b"ok")
            out = b""
            while data := s.recv(65536):
                out += data
            return out

    answer = await deferToThread(pieces, slow_node.port)
    assert answer.startswith(b"HTTP/1.1 201 "), answer


class CountingTransport(StringTransport):
    """Counts how often the channel asks for its addresses."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: dict[str, int] = {}

    def getHost(self) -> IPv4Address:
        self.asked["host"] = self.asked.get("host", 0) + 1
        return IPv4Address("TCP", "127.0.0.1", 8081)

    def getPeer(self) -> IPv4Address:
        self.asked["peer"] = self.asked.get("peer", 0) + 1
        return IPv4Address("TCP", "127.0.0.1", 40000)


def test_a_connections_addresses_are_asked_once() -> None:
    """Twisted asks for both on every request; a TCP getHost is a getsockname() call."""
    node = make_node("127.0.0.1:8081", MemoryReactorClock())
    site = make_site(node.resource(), body_limit_for(1 << 20), reactor=MemoryReactorClock())
    transport = CountingTransport()
    channel = site.buildProtocol(None)
    channel.makeConnection(transport)
    for _ in range(3):
        channel.dataReceived(b"GET /get?key=k HTTP/1.1\r\nHost: x\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 404 ")
        transport.clear()
    assert transport.asked == {"host": 1, "peer": 1}
    assert channel.isSecure() is False
