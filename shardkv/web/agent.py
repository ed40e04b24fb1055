"""A lean L{IAgent} over persistent HTTP/1.1 connections, for treq's C{HTTPClient}.

treq stays the API every forwarding call uses; this agent replaces what sits
under it: twisted.web's C{Agent}, C{HTTPConnectionPool} and
C{HTTP11ClientProtocol}, which together cost about 300 us of CPU per exchange
here (an endpoint object, a retrying wrapper, a L{Request} that writes its
head line by line, a producer for the body that writes it on a later reactor
turn, a line-based parser, a transport proxy and several Deferreds). The
cluster's exchanges are small requests and small answers between processes
that speak plain HTTP/1.1 with Content-Length or chunked bodies, so:

  - Connections are kept per (scheme, host, port) and reused, most recently
    used first; at most C{max_per_host} idle ones are kept per host, and an
    idle one is closed after C{idle_timeout} seconds (30 s by default, below
    twisted.web's 60 s server timeout, so the client does not reuse a socket
    the server is about to close). One timer per agent sweeps them, not one
    per connection. More concurrent requests than idle connections open new
    connections: there is no cap on connections per host (as with
    C{HTTPConnectionPool}); the callers bound their concurrency.
  - A request goes out in one C{transport.write}: the head and, when the body
    is in memory (L{BytesProducer}, or treq's default C{FileBodyProducer} over
    a C{BytesIO}), the body too, without a round trip through the reactor.
    Any other L{IBodyProducer} is streamed (chunked if its length is unknown).
  - The response is parsed by hand: status line, headers, then a body framed
    by Content-Length, chunked transfer coding, or the connection's close
    (RFC 9112 6.3); HEAD, 1xx, 204 and 304 answers have no body, and 1xx
    answers other than 101 are skipped. The C{httptools} C parser measured
    0.8-1.2 us faster per response here (about 1 % of an exchange), but it
    cannot be told that an answer is to a HEAD request (it waits for the
    Content-Length bytes that never come), so it would need a second parser
    anyway.

Failures keep twisted.web's types, which L{shardkv.replica.client} sorts into
"sent" and "not sent":

  - a failed connection attempt fails with the endpoint's error
    (C{ConnectionRefusedError}, C{DNSLookupError}, a timeout...): not sent;
  - a request on a closed agent, or on a new connection that closed before
    the request could be written, fails with L{RequestNotSent};
  - a URL with no usable host, or a method or target that is not HTTP, raises
    L{ValueError} at once (as twisted.web's Agent does); a scheme other than
    http or https fails with L{SchemeNotSupported};
  - the connection lost before any byte of the answer:
    L{ResponseNeverReceived} (an in-memory request leaves in one write, so
    once it is written there is no "part sent" state: the outcome is
    unknown); after part of the answer: L{ResponseFailed}; a streamed body
    cut while it was being written: L{RequestTransmissionFailed}; a body
    producer that fails: L{RequestGenerationFailed} (the connection is
    aborted);
  - the answer's body cut short: the body protocol gets L{ResponseFailed}
    (Content-Length or chunked) or L{PotentialDataLoss} (a body that ends at
    the close), as C{readBody} and treq expect;
  - cancelling the request's Deferred before the answer's head arrived aborts
    the connection (C{abortConnection}; it is never reused) or the connection
    attempt, and fails it with a bare L{CancelledError}. twisted.web's Agent
    wraps it as C{ResponseNeverReceived([CancelledError])};
    L{shardkv.replica.client} reads both as a cancellation.

Retries follow C{HTTPConnectionPool}'s C{retryAutomatically}: a request that
fails on a *reused* connection before any byte of the answer arrived (the
server had closed the idle connection as the request went out) is sent once
more on a new connection, only if its method is idempotent (GET, HEAD,
OPTIONS, DELETE, TRACE), it has no body, and it was not cancelled. A POST or
PUT is never retried: the server may have acted on it.
"""

from __future__ import annotations

import contextlib
import io
import re
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web._newclient import ParseError, WrongBodyLength
from twisted.web.client import (
    URI,
    FileBodyProducer,
    RequestGenerationFailed,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    SchemeNotSupported,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    UNKNOWN_LENGTH,
    IAgent,
    IBodyProducer,
    IClientRequest,
    IPolicyForHTTPS,
    IResponse,
)
from zope.interface import implementer

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"})
"""Methods twisted.web's pool retries on a new connection (RFC 9110 9.2.2)."""

MAX_HEAD = 64 * 1024
"""Bytes an answer's status line and headers may take; past it the answer is refused."""

_MAX_ORIGINS = 4096
_UNSAFE = re.compile(rb"[\x00-\x20\x7f-\xff]")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_METHODS: set[bytes] = set()
_DONE = Failure(ResponseDone("Response body fully received"))
_HEX = frozenset(b"0123456789abcdefABCDEF")
_NO_BODY = (204, 304)
# Body framing of the answer being read.
_LENGTH, _CHUNKED, _UNTIL_CLOSE = 1, 2, 3
# Chunked decoder states.
_SIZE, _DATA, _DATA_END, _TRAILER = 1, 2, 3, 4


@implementer(IBodyProducer)
class BytesProducer:
    """A request body held in memory, which the agent writes with the request's head.

    Pass L{body_producer} as treq's C{data_to_body_producer} so that
    C{data=bytes} becomes one of these instead of a C{FileBodyProducer},
    which writes through a cooperator on a later reactor turn.
    """

    __slots__ = ("body", "length")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def body_producer(data: Any) -> IBodyProducer:
    """treq's C{data_to_body_producer}: bytes in memory, anything else as treq would."""
    if isinstance(data, bytes):
        return BytesProducer(data)
    return IBodyProducer(data)


def _in_memory(producer: IBodyProducer | None) -> bytes | None:
    """The whole body when it is already in memory; None for a producer to run."""
    if producer is None:
        return b""
    if type(producer) is BytesProducer:
        return producer.body
    if type(producer) is FileBodyProducer:
        # treq's default for data=bytes is FileBodyProducer(BytesIO(data)).
        source = getattr(producer, "_inputFile", None)
        if type(source) is io.BytesIO:
            return source.read()
    return None


class _Origin:
    """What a request needs of its URL's scheme://host:port, computed once per origin."""

    __slots__ = ("endpoint", "factory", "host_header", "key")

    def __init__(self, key: tuple[bytes, bytes, int], host_header: bytes) -> None:
        self.key = key
        self.host_header = host_header
        self.endpoint: IStreamClientEndpoint | None = None
        self.factory: ConnectionFactory | None = None


@implementer(IClientRequest)
class _Exchange:
    """One request and the Deferred of its answer; C{request} of the L{IResponse}."""

    __slots__ = (
        "absoluteURI",
        "body",
        "cancelled",
        "connecting",
        "connection",
        "d",
        "headers",
        "keep_alive",
        "method",
        "origin",
        "producer",
        "wire",
    )

    def __init__(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers,
        origin: _Origin,
        wire: bytes,
        keep_alive: bool,
        producer: IBodyProducer | None,
        body: bytes | None,
    ) -> None:
        self.method = method
        self.absoluteURI = uri
        self.headers = headers
        self.origin = origin
        self.wire = wire
        self.keep_alive = keep_alive
        self.producer = producer
        self.body = body  # None: a producer to stream after the head
        self.connection: _Connection | None = None
        self.connecting: Deferred[Any] | None = None
        self.cancelled = False
        self.d: Deferred[IResponse] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[IResponse]) -> None:
        # Deferred.cancel then fails d with CancelledError.
        self.cancelled = True
        connecting, self.connecting = self.connecting, None
        if connecting is not None:
            connecting.cancel()
        connection = self.connection
        if connection is not None and connection.exchange is self:
            connection.abandon()

    def retryable(self) -> bool:
        return self.method in IDEMPOTENT and self.producer is None and not self.d.called


@implementer(IResponse)
class _Response:
    """An answer: its head at once, its body to the protocol given to L{deliverBody}.

    It is also the body protocol's transport, as twisted.web's response gives
    one: pausing, resuming or closing it acts on the connection while the
    body is arriving, and does nothing once the body is complete.
    """

    previousResponse: IResponse | None = None

    def __init__(
        self,
        version: tuple[bytes, int, int],
        code: int,
        phrase: bytes,
        headers: Headers,
        length: int | object,
        request: _Exchange,
        connection: _Connection | None,
    ) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self.request = request
        self._connection = connection
        self._chunks: list[bytes] = []
        self._protocol: Any = None
        self._reason: Failure | None = None
        self._delivered = False

    def __repr__(self) -> str:
        return f"<_Response {self.code} {self.phrase!r}>"

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: Any) -> None:
        if self._delivered:
            raise RuntimeError("the response body was already delivered")
        self._delivered = True
        self._protocol = protocol
        protocol.makeConnection(self)
        if self._chunks:
            data = b"".join(self._chunks)
            self._chunks = []
            if self._protocol is protocol:
                protocol.dataReceived(data)
        reason = self._reason
        if reason is not None and self._protocol is protocol:
            self._protocol = None
            protocol.connectionLost(reason)

    def _data(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is not None:
            protocol.dataReceived(data)
        elif not self._delivered:
            self._chunks.append(data)

    def _done(self, reason: Failure) -> None:
        self._connection = None
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.connectionLost(reason)
        elif not self._delivered:
            self._reason = reason

    # -- the body protocol's transport -------------------------------------------

    def pauseProducing(self) -> None:
        if self._connection is not None:
            self._connection.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self._connection is not None:
            self._connection.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The body's reader wants no more: the connection is aborted, never reused.

        The reader hears nothing more of this body, not even its end: it
        closed its transport (treq does when its collector fails, C{readBody}
        when it is cancelled) and has settled its own outcome already.
        """
        connection, self._connection = self._connection, None
        self._protocol = None
        self._reason = None
        if connection is not None:
            connection.transport.abortConnection()

    loseConnection = abortConnection = stopProducing


class _BodyConsumer:
    """Writes a streamed request body to the connection (chunk-framed if its length is unknown)."""

    def __init__(self, connection: _Connection, chunked: bool, length: int | None) -> None:
        self._connection = connection
        self._chunked = chunked
        self._left = length
        self.failed: BaseException | None = None

    def write(self, data: bytes) -> None:
        if not data or self._connection.exchange is None:
            return
        if self._left is not None:
            self._left -= len(data)
            if self._left < 0:
                self.failed = WrongBodyLength("the producer wrote more than its length")
                return
        transport = self._connection.transport
        if self._chunked:
            transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            transport.write(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._connection.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._connection.transport.unregisterProducer()


class _Connection(Protocol):
    """One persistent connection: one exchange at a time, parsed as it arrives."""

    transport: Any

    def __init__(self, agent: PersistentAgent, origin: _Origin) -> None:
        self.agent = agent
        self.origin = origin
        self.exchange: _Exchange | None = None
        self.idle_since = 0.0
        self.reused = False
        self.lost = False
        self._streaming: IBodyProducer | None = None
        self._reset()

    def _reset(self) -> None:
        self._buf = b""
        self._received = False
        self._response: _Response | None = None
        self._framing = 0
        self._left = 0
        self._chunk_state = _SIZE
        self._keep = True

    def connectionMade(self) -> None:
        self.agent._live.add(self)
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            with contextlib.suppress(Exception):  # a transport without the option
                set_no_delay(True)

    # -- sending -------------------------------------------------------------------

    def send(self, exchange: _Exchange) -> None:
        """Write ``exchange``'s request; its answer comes back through L{dataReceived}."""
        self.exchange = exchange
        exchange.connection = self
        self._reset()
        self._keep = exchange.keep_alive
        transport = self.transport
        if exchange.body is not None:
            transport.write(exchange.wire + exchange.body if exchange.body else exchange.wire)
            return
        producer = exchange.producer
        assert producer is not None
        length = producer.length
        consumer = _BodyConsumer(
            self, length is UNKNOWN_LENGTH, None if length is UNKNOWN_LENGTH else int(length)
        )
        transport.write(exchange.wire)
        self._streaming = producer
        try:
            produced = producer.startProducing(consumer)
        except BaseException:
            produced = fail()
        args = (exchange, consumer)
        produced.addCallbacks(
            self._produced, self._production_failed, callbackArgs=args, errbackArgs=args
        )

    def _produced(self, _: object, exchange: _Exchange, consumer: _BodyConsumer) -> None:
        if self.exchange is not exchange or self._streaming is None:
            return
        self._streaming = None
        left = consumer._left
        if consumer.failed is not None or (left is not None and left != 0):
            error = consumer.failed or WrongBodyLength("the producer wrote less than its length")
            self._production_failed(Failure(error), exchange, consumer)
            return
        if consumer._chunked:
            self.transport.write(b"0\r\n\r\n")

    def _production_failed(
        self, reason: Failure, exchange: _Exchange, consumer: _BodyConsumer
    ) -> None:
        if self.exchange is not exchange or self._streaming is None:
            return
        self._streaming = None
        self.exchange = None
        self._keep = False
        self.transport.abortConnection()
        if not exchange.d.called:
            exchange.d.errback(Failure(RequestGenerationFailed([reason])))

    def abandon(self) -> None:
        """The exchange was cancelled: drop it and the connection with it."""
        exchange, self.exchange = self.exchange, None
        self._keep = False
        self._stop_streaming()
        if exchange is not None:
            exchange.connection = None
        self.transport.abortConnection()

    def _stop_streaming(self) -> None:
        producer, self._streaming = self._streaming, None
        if producer is not None:
            with contextlib.suppress(Exception):
                producer.stopProducing()

    # -- receiving -----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes while no request is out (or after an abandoned one): not an
            # answer this connection can be trusted with again.
            self._keep = False
            self.transport.abortConnection()
            return
        self._received = True
        response = self._response
        try:
            if response is None:
                buf = self._buf + data if self._buf else data
                response, data = self._head(buf, exchange)
                if response is None:
                    return
            complete = self._body(response, data) if data or self._framing == 0 else False
        except ParseError as e:
            self._broken(exchange, response, Failure(e))
            return
        if complete:
            self._finish(exchange, response)
        elif not exchange.d.called:
            exchange.d.callback(response)

    def _head(self, buf: bytes, exchange: _Exchange) -> tuple[_Response | None, bytes]:
        """The answer's head parsed from ``buf``, with what follows it; (None, b"") if partial."""
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise ParseError("the answer's head is too long", buf[:80])
                self._buf = buf
                return None, b""
            if end > MAX_HEAD:
                raise ParseError("the answer's head is too long", buf[:80])
            lines = buf[:end].split(b"\r\n")
            buf = buf[end + 4 :]
            status = lines[0]
            parts = status.split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or len(parts[1]) != 3:
                raise ParseError("wrong status line", status)
            try:
                major, minor = parts[0][5:].split(b".")
                version = (b"HTTP", int(major), int(minor))
                code = int(parts[1])
            except ValueError:
                raise ParseError("wrong status line", status) from None
            if 100 <= code < 200 and code != 101:
                continue  # informational (100 Continue): the real answer follows
            headers = Headers()
            length: int | None = None
            chunked = False
            coded = False
            keep = self._keep and version >= (b"HTTP", 1, 1)
            for line in lines[1:]:
                name, colon, value = line.partition(b":")
                if not colon or not name or name[-1:] in (b" ", b"\t"):
                    raise ParseError("wrong header line", line)
                value = value.strip(b" \t")
                lower = name.lower()
                if lower == b"content-length":
                    if not value.isdigit():
                        raise ParseError("wrong Content-Length", value)
                    if length is not None and int(value) != length:
                        raise ParseError("two Content-Lengths", value)
                    length = int(value)
                elif lower == b"transfer-encoding":
                    coded = True
                    chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
                elif lower == b"connection" and b"close" in value.lower():
                    keep = False
                try:
                    headers.addRawHeader(name, value)
                except ValueError:
                    raise ParseError("wrong header name", name) from None
            if code == 101:
                raise ParseError("the server switched protocols", status)
            body_length: int | object
            if exchange.method == b"HEAD" or code in _NO_BODY:
                self._framing = 0
                body_length = 0
            elif coded:
                if chunked:
                    self._framing = _CHUNKED
                    self._chunk_state = _SIZE
                else:
                    self._framing = _UNTIL_CLOSE
                    keep = False
                body_length = UNKNOWN_LENGTH
            elif length is not None:
                self._framing = _LENGTH if length else 0
                self._left = length
                body_length = length
            else:
                self._framing = _UNTIL_CLOSE
                keep = False
                body_length = UNKNOWN_LENGTH
            self._keep = keep
            self._buf = b""
            response = _Response(
                version, code, parts[2] if len(parts) > 2 else b"", headers, body_length,
                exchange, self,
            )  # fmt: skip
            self._response = response
            return response, buf

    def _body(self, response: _Response, data: bytes) -> bool:
        """Take ``data`` of the body; True when the body is complete."""
        framing = self._framing
        if framing == _LENGTH:
            left = self._left
            if len(data) < left:
                self._left = left - len(data)
                response._data(data)
                return False
            if len(data) > left:
                self._keep = False  # bytes past the answer: nothing to reuse
                data = data[:left]
            self._left = 0
            response._data(data)
            return True
        if framing == _CHUNKED:
            return self._chunks(response, data)
        if framing == _UNTIL_CLOSE:
            response._data(data)
            return False
        if data:
            self._keep = False
        return True

    def _chunks(self, response: _Response, data: bytes) -> bool:
        buf = self._buf + data if self._buf else data
        self._buf = b""
        pos, size = 0, len(buf)
        while pos < size:
            state = self._chunk_state
            if state == _DATA:
                take = min(self._left, size - pos)
                response._data(buf[pos : pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._chunk_state = _DATA_END
            elif state in (_SIZE, _TRAILER):
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    if size - pos > 4096:
                        raise ParseError("a chunk line is too long", buf[pos : pos + 80])
                    self._buf = buf[pos:]
                    return False
                line = buf[pos:nl]
                pos = nl + 2
                if state == _TRAILER:
                    if not line:
                        if pos != size:
                            self._keep = False
                        return True
                    continue  # trailer fields are not kept
                digits = line.split(b";", 1)[0].strip(b" \t")
                if not digits or len(digits) > 16 or not _HEX.issuperset(digits):
                    raise ParseError("wrong chunk size", line)
                self._left = int(digits, 16)
                self._chunk_state = _DATA if self._left else _TRAILER
            else:  # _DATA_END: the CRLF after a chunk's data
                if size - pos < 2:
                    self._buf = buf[pos:]
                    return False
                if buf[pos : pos + 2] != b"\r\n":
                    raise ParseError("a chunk does not end with CRLF", buf[pos : pos + 2])
                pos += 2
                self._chunk_state = _SIZE
        return False

    def _finish(self, exchange: _Exchange, response: _Response) -> None:
        """The whole answer arrived: free the connection, then tell the caller."""
        self.exchange = None
        self._response = None
        exchange.connection = None
        if self._streaming is not None:
            # The server answered before the body was all written: stop writing,
            # and close, since the request's end is no longer in step.
            self._stop_streaming()
            self._keep = False
        if self._keep:
            self.agent._release(self)
        else:
            self.transport.loseConnection()
        response._done(_DONE)
        if not exchange.d.called:
            exchange.d.callback(response)

    def _broken(self, exchange: _Exchange, response: _Response | None, reason: Failure) -> None:
        """The answer cannot be parsed: abort, and fail whoever waits for it."""
        self.exchange = None
        self._response = None
        exchange.connection = None
        self._keep = False
        self._stop_streaming()
        self.transport.abortConnection()
        failure = Failure(ResponseFailed([reason]))
        if response is not None:
            response._done(failure)
        if not exchange.d.called:
            exchange.d.errback(failure)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Out of the pool before anyone hears of it, and close() told last.
        self.lost = True
        self.agent._lost(self)
        try:
            self._ended(reason)
        finally:
            self.agent._check_closed()

    def _ended(self, reason: Failure) -> None:
        """Whoever waits on this connection learns how far its exchange got."""
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            return
        exchange.connection = None
        response, self._response = self._response, None
        if response is not None:
            if self._framing == _UNTIL_CLOSE:
                response._done(Failure(PotentialDataLoss()))
            else:
                response._done(Failure(ResponseFailed([reason])))
            if not exchange.d.called:
                exchange.d.callback(response)
            return
        if exchange.d.called:
            return
        if self._streaming is not None:
            self._stop_streaming()
            exchange.d.errback(Failure(RequestTransmissionFailed([reason])))
        elif self._received:
            exchange.d.errback(Failure(ResponseFailed([reason])))
        elif self.reused and exchange.retryable() and not self.agent.closed:
            self.agent._connect(exchange)
        else:
            exchange.d.errback(Failure(ResponseNeverReceived([reason])))


class ConnectionFactory(Factory):
    """Connections to one origin. Quiet: no log line per connection opened."""

    noisy = False

    def __init__(self, agent: PersistentAgent, origin: _Origin) -> None:
        self.agent = agent
        self.origin = origin

    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection(self.agent, self.origin)


@implementer(IAgent)
class PersistentAgent:
    """An L{IAgent} over kept-alive HTTP/1.1 connections; see the module's docstring.

    ``tls``: the policy that makes each https connection's TLS settings
    (C{creatorForNetloc(host, port)}), which checks the server's certificate
    against the URL's host; default twisted.web's C{BrowserLikePolicyForHTTPS}.
    """

    def __init__(
        self,
        reactor: Any,
        tls: IPolicyForHTTPS | None = None,
        *,
        max_per_host: int = 64,
        idle_timeout: float = 30.0,
        connect_timeout: float = 30.0,
    ) -> None:
        self._reactor = reactor
        self._tls = tls
        self.max_per_host = max_per_host
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.closed = False
        self._origins: dict[bytes, _Origin] = {}
        self._idle: dict[tuple[bytes, bytes, int], list[_Connection]] = {}
        self._live: set[_Connection] = set()
        self._connecting = 0
        self._sweep: IDelayedCall | None = None
        self._when_closed: list[Deferred[None]] = []

    # -- IAgent --------------------------------------------------------------------

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        if self.closed:
            return fail(RequestNotSent())
        start = uri.find(b"://")
        slash = uri.find(b"/", start + 3) if start > 0 else -1
        query = uri.find(b"?", start + 3) if start > 0 else -1
        cut = slash if query < 0 or 0 <= slash < query else query
        if cut < 0:
            origin_bytes, target = uri, b"/"
        else:
            origin_bytes, target = uri[:cut], uri[cut:]
            if cut == query:
                target = b"/" + target
        hash_at = target.find(b"#")
        if hash_at >= 0:
            target = target[:hash_at]
        if _UNSAFE.search(target) is not None:
            raise ValueError(f"the request target {target!r} holds spaces or control bytes")
        if method not in _METHODS:
            if not _TOKEN.fullmatch(method):
                raise ValueError(f"{method!r} is not an HTTP method")
            _METHODS.add(method)
        origin = self._origins.get(origin_bytes)
        if origin is None:
            origin = self._origin(origin_bytes)
            if origin is None:
                return fail(SchemeNotSupported(f"unsupported scheme in {uri!r}"))
        if headers is None:
            headers = Headers()
        body = _in_memory(bodyProducer)
        lines = [method, b" ", target, b" HTTP/1.1\r\n"]
        has_host = False
        keep_alive = True
        for name, values in headers.getAllRawHeaders():
            if name == b"Content-Length" or name == b"Transfer-Encoding":
                continue  # the body's framing is the agent's to write
            if name == b"Host":
                has_host = True
            elif name == b"Connection" and any(b"close" in v.lower() for v in values):
                keep_alive = False
            for value in values:
                lines += (name, b": ", value, b"\r\n")
        if not has_host:
            lines[4:4] = (b"Host: ", origin.host_header, b"\r\n")
        if body is not None:
            if body or bodyProducer is not None or method in (b"POST", b"PUT", b"PATCH"):
                lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
            else:
                lines.append(b"\r\n")
        else:
            assert bodyProducer is not None
            if bodyProducer.length is UNKNOWN_LENGTH:
                lines.append(b"Transfer-Encoding: chunked\r\n\r\n")
            else:
                lines.append(b"Content-Length: %d\r\n\r\n" % bodyProducer.length)
        exchange = _Exchange(
            method, uri, headers, origin, b"".join(lines), keep_alive, bodyProducer, body
        )
        idle = self._idle.get(origin.key)
        if idle:
            idle.pop().send(exchange)
        else:
            self._connect(exchange)
        return exchange.d

    # -- connections ---------------------------------------------------------------

    def _origin(self, origin_bytes: bytes) -> _Origin | None:
        """What requests to ``origin_bytes`` need; None for a scheme other than http(s).

        L{ValueError} (raised, as twisted.web's Agent does) for a URL with no
        usable host or port.
        """
        if _UNSAFE.search(origin_bytes) is not None:
            raise ValueError(f"{origin_bytes!r} holds spaces or control bytes")
        parsed = URI.fromBytes(origin_bytes)
        if parsed.scheme not in (b"http", b"https"):
            return None
        if not parsed.host:
            raise ValueError(f"no host in {origin_bytes!r}")
        host_text = parsed.host.decode("ascii")
        host = parsed.host
        if isIPv6Address(host_text):
            host = b"[" + host + b"]"
        if (parsed.scheme, parsed.port) in ((b"http", 80), (b"https", 443)):
            host_header = host
        else:
            host_header = b"%b:%d" % (host, parsed.port)
        origin = _Origin((parsed.scheme, parsed.host, parsed.port), host_header)
        endpoint: IStreamClientEndpoint
        if isIPAddress(host_text):
            endpoint = TCP4ClientEndpoint(
                self._reactor, host_text, parsed.port, timeout=self.connect_timeout
            )
        elif isIPv6Address(host_text):
            endpoint = TCP6ClientEndpoint(
                self._reactor, host_text, parsed.port, timeout=self.connect_timeout
            )
        else:
            endpoint = HostnameEndpoint(
                self._reactor, parsed.host, parsed.port, timeout=self.connect_timeout
            )
        if parsed.scheme == b"https":
            if self._tls is None:
                from twisted.web.client import BrowserLikePolicyForHTTPS

                self._tls = BrowserLikePolicyForHTTPS()
            endpoint = wrapClientTLS(self._tls.creatorForNetloc(parsed.host, parsed.port), endpoint)
        origin.endpoint = endpoint
        origin.factory = ConnectionFactory(self, origin)
        if len(self._origins) >= _MAX_ORIGINS:
            self._origins.clear()
        self._origins[origin_bytes] = origin
        return origin

    def _connect(self, exchange: _Exchange) -> None:
        """Open a new connection for ``exchange`` and send it there."""
        origin = exchange.origin
        assert origin.endpoint is not None and origin.factory is not None
        self._connecting += 1
        try:
            connecting = origin.endpoint.connect(origin.factory)
        except BaseException:
            connecting = fail()
        exchange.connecting = connecting
        connecting.addCallbacks(
            self._connected, self._not_connected, callbackArgs=(exchange,), errbackArgs=(exchange,)
        )

    def _connected(self, connection: _Connection, exchange: _Exchange) -> None:
        self._connecting -= 1
        exchange.connecting = None
        if exchange.cancelled or exchange.d.called:
            connection.transport.loseConnection()
        elif connection.lost:  # gone before the request could be written
            exchange.d.errback(Failure(RequestNotSent()))
        else:
            connection.send(exchange)
        self._check_closed()

    def _not_connected(self, reason: Failure, exchange: _Exchange) -> None:
        self._connecting -= 1
        exchange.connecting = None
        if not exchange.cancelled and not exchange.d.called:
            exchange.d.errback(reason)
        self._check_closed()

    def _release(self, connection: _Connection) -> None:
        """An answered connection goes back to its host's idle list (or closes)."""
        if self.closed or self.max_per_host <= 0:
            connection.transport.loseConnection()
            return
        connection.reused = True
        idle = self._idle.get(connection.origin.key)
        if idle is None:
            idle = self._idle[connection.origin.key] = []
        elif len(idle) >= self.max_per_host:
            idle.pop(0).transport.loseConnection()  # the one idle longest
        connection.idle_since = self._reactor.seconds()
        idle.append(connection)
        if self._sweep is None:
            self._sweep = self._reactor.callLater(self.idle_timeout, self._expire)

    def _expire(self) -> None:
        """Close connections idle for C{idle_timeout}; come back for the next one due."""
        self._sweep = None
        now = self._reactor.seconds()
        due: float | None = None
        for key, idle in list(self._idle.items()):
            while idle and now - idle[0].idle_since >= self.idle_timeout - 1e-9:
                idle.pop(0).transport.loseConnection()
            if idle:
                first = idle[0].idle_since + self.idle_timeout
                due = first if due is None else min(due, first)
            else:
                del self._idle[key]
        if due is not None and not self.closed:
            self._sweep = self._reactor.callLater(max(0.0, due - now), self._expire)

    def _lost(self, connection: _Connection) -> None:
        self._live.discard(connection)
        idle = self._idle.get(connection.origin.key)
        if idle is not None and connection in idle:
            idle.remove(connection)

    def idle_connections(self, origin: tuple[bytes, bytes, int] | None = None) -> int:
        """Idle connections kept, for one (scheme, host, port) or in all."""
        if origin is not None:
            return len(self._idle.get(origin, ()))
        return sum(len(idle) for idle in self._idle.values())

    @property
    def open_connections(self) -> int:
        """Connections open now, idle or busy."""
        return len(self._live)

    # -- stopping ------------------------------------------------------------------

    def close(self) -> Deferred[None]:
        """Close every idle connection now and each busy one when its exchange ends.

        New requests fail with L{RequestNotSent}. The Deferred fires once no
        connection or connection attempt is left, so a stopped service
        leaves no socket behind. An exchange in flight keeps its connection
        until it ends: the callers' deadlines bound that wait.
        """
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.transport.loseConnection()
        d: Deferred[None] = Deferred()
        self._when_closed.append(d)
        self._check_closed()
        return d

    def _check_closed(self) -> None:
        if self.closed and not self._live and not self._connecting:
            waiting, self._when_closed = self._when_closed, []
            for d in waiting:
                d.callback(None)
