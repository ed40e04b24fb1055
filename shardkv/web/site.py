"""The HTTP server side shared by nodes and the proxy: limits applied before any work is done.

Twisted's C{Request} buffers any body it is sent (to a temporary file above
100 kB) and only then lets a resource look at it. L{LimitedRequest} refuses an
oversized body from its ``Content-Length``, or as soon as a chunked body
announces or passes the limit, so a node never stores a gigabyte it will
reject anyway. It also admits each body against the process's budget of
request bytes in flight (L{Admission}): past it, ``503 overloaded`` with
``Retry-After`` straight away, before any of the body is buffered.

L{QuietSite} caps live connections (past the cap a new connection is closed
at once), fits the process's open-file limit to that cap, and closes
connections whose request headers do not arrive within ``header_timeout``.
The protocol-level answers themselves are L{shardkv.web.channel}'s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, datetimeToString, unquote
from twisted.web.resource import Resource, _IEncodingResource
from twisted.web.server import Request, Site
from twisted.web.server import version as server_version

from shardkv.metrics import OTHER_ROUTE, HTTPMetrics
from shardkv.web.channel import LINGER_SECONDS, FrontDoorChannel
from shardkv.web.descriptors import DESCRIPTORS, DescriptorBudget
from shardkv.web.errors import JSON, json_body

__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "LINGER_SECONDS",
    "NODE_MAX_INFLIGHT_BYTES",
    "PROXY_MAX_INFLIGHT_BYTES",
    "Admission",
    "BodyLimit",
    "LimitedRequest",
    "QuietSite",
    "make_site",
]

BodyLimit = Callable[[bytes, bytes], int]
"""Maps (method, raw path) to the largest body that request may carry."""

DEFAULT_HEADER_TIMEOUT = 10.0
"""Seconds a request's head may take, from its first byte (from the connection's start
for the first request on a connection)."""
DEFAULT_MAX_CONNECTIONS = 1024
"""Live connections per site; past it, a new connection is closed at once."""
PROXY_MAX_INFLIGHT_BYTES = 64 << 20
"""Request-body bytes a proxy holds at once: 64 one-MiB PUTs."""
NODE_MAX_INFLIGHT_BYTES = 256 << 20
"""Request-body bytes a node holds at once: room for several proxies' full batches."""
DESCRIPTOR_HEADROOM = 64
"""Descriptors a site needs besides its client connections: listening sockets,
outgoing calls to peers, LMDB's files. A proxy adds its connection pool."""


_date: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The Date header's value now (RFC 9110's IMF-fixdate), made once a second."""
    global _date
    now = int(time.time())
    if now != _date[0]:
        _date = (now, datetimeToString(now))
    return _date[1]


class Admission:
    """The request-body bytes one process holds, against a cap.

    A body is admitted whole from its ``Content-Length`` (or chunk by chunk
    as a chunked body announces them) and released when its request
    finishes or its connection is lost. When nothing is in flight, one body
    is admitted whatever its size, so a cap below the body limit cannot
    starve a request forever.
    """

    __slots__ = ("inflight", "limit", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight = 0
        self.refused = 0

    def admit(self, size: int) -> bool:
        if self.inflight and self.inflight + size > self.limit:
            self.refused += 1
            return False
        self.inflight += size
        return True

    def release(self, size: int) -> None:
        self.inflight -= size


class LimitedRequest(Request):
    """A request that refuses a body larger than its route allows, or than the process can hold.

    The answer is written straight to the transport because the request has
    not been dispatched yet; the channel then closes the write side while
    the read side keeps draining (a "lingering close"), so the client reads
    the 413 or 503 rather than a connection reset.
    """

    body_limit: BodyLimit = staticmethod(lambda method, path: 1 << 20)
    admission: Admission | None = None
    route: str = OTHER_ROUTE
    """The Klein rule that answered (set by L{shardkv.web.metricsroutes.RoutedKlein})."""

    def __init__(self, channel: HTTPChannel, queued: object = None) -> None:
        super().__init__(channel, parsePOSTFormSubmission=False)
        self.received_at = 0.0
        """When the request was whole (monotonic): its latency counts from here."""
        self._limit = 0
        self._received = 0
        self._admitted = 0
        self._refused = False

    def gotLength(self, length: int | None) -> None:
        if length == 0:
            # No body (every GET): nothing to limit or admit.
            super().gotLength(length)
            return
        # The request line is parsed by the channel but only handed to the
        # request once the body is in; the limit depends on it now.
        method = getattr(self.channel, "_command", b"")
        path = getattr(self.channel, "_path", b"").split(b"?", 1)[0]
        self._limit = self.body_limit(method, path)
        if length is None:
            channel: Any = self.channel
            channel.expect_chunks()
        else:
            if length > self._limit:
                self._refuse_too_large(f"{length} bytes")
                return
            if length and not self._admit(length):
                return
        super().gotLength(length)

    def chunk_announced(self, size: int) -> bool:
        """A chunked body announced a chunk of ``size``; False if that refused the request."""
        if self._refused:
            return False
        if self._admitted + size > self._limit:
            self._refuse_too_large("more than that")
            return False
        return self._admit(size)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._admitted:
            if self._received > self._limit:
                self._refuse_too_large("more than that")
                return
            if not self._admit(self._received - self._admitted):
                return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            self.received_at = time.monotonic()
            super().requestReceived(command, path, version)

    def process(self) -> None:
        """Twisted's C{server.Request.process}, but for the Date header and ``*``.

        Twisted formats the Date header anew for every request (2.6 us, about
        5 % of a node's CPU for a GET); it changes once a second, so it is
        formatted once a second (L{http_date}). The rest is Twisted's own code,
        as of Twisted 26.10: the Server header, the resource path, the
        resource's encoder, rendering, and a failure while rendering.
        """
        if self.path == b"*":
            self._asterisk()
            return
        self.site = site = cast(Any, self.channel).site
        self.setHeader(b"Server", server_version)
        self.setHeader(b"Date", http_date())
        self.prepath = []
        self.postpath = list(map(unquote, self.path[1:].split(b"/")))
        try:
            resrc = site.getResourceFor(self)
            if _IEncodingResource.providedBy(resrc):
                encoder = resrc.getEncoder(self)
                if encoder is not None:
                    self._encoder = encoder
            self.render(resrc)
        except BaseException:
            self.processingFailed(Failure())

    def _asterisk(self) -> None:
        # twisted.web answers the asterisk-form target itself, a 405 with no body.
        self.site = cast(Any, self.channel).site
        if self.method == b"OPTIONS":
            self.setResponseCode(200)
            self.setHeader(b"content-length", b"0")
            self.finish()
            return
        self.setHeader(b"allow", b"OPTIONS")
        method = self.method.decode("ascii", "replace")
        payload = {
            "error": "method_not_allowed",
            "message": f"{method} * is not allowed; use OPTIONS",
        }
        self.write(json_body(self, 405, payload))
        self.finish()

    def finish(self) -> None:
        self._release()
        super().finish()

    def connectionLost(self, reason: Any) -> None:
        self._release()
        super().connectionLost(reason)

    def _admit(self, size: int) -> bool:
        admission = self.admission
        if admission is not None and not admission.admit(size):
            self._refuse(
                503,
                "overloaded",
                f"this server holds {admission.limit} bytes of request bodies at most and is "
                "full; retry shortly",
                [(b"Retry-After", b"1")],
            )
            return False
        self._admitted += size
        return True

    def _release(self) -> None:
        if self._admitted:
            if self.admission is not None:
                self.admission.release(self._admitted)
            self._admitted = 0

    def _refuse_too_large(self, size: str) -> None:
        self._refuse(
            413,
            "payload_too_large",
            f"the request body may be at most {self._limit} bytes; it was {size}",
        )

    def _refuse(
        self, status: int, code: str, message: str, headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        self._refused = True
        self._release()
        if self.content is not None:
            self.content.close()
        self.content = None
        # Stop twisted.web from sending "100 Continue" after our answer.
        self.requestHeaders.removeHeader(b"expect")
        channel: Any = self.channel
        channel.refuse(status, code, message, headers)


class _Utf8Guard(Resource):
    """Answers a non-UTF-8 path with JSON; Klein's own answer is plain text."""

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self._inner = inner

    def render(self, request: Any) -> Any:
        try:
            b"/".join(request.postpath).decode("utf-8")
        except UnicodeDecodeError:
            request.setResponseCode(400)
            request.setHeader(b"content-type", JSON)
            return (
                json.dumps(
                    {"error": "bad_request", "message": "the URL path is not valid UTF-8"}
                ).encode()
                + b"\n"
            )
        return self._inner.render(request)


class _TurnAway(Protocol):
    """Closes a connection past the cap at once.

    Returning None from C{buildProtocol} closes a plain TCP connection, but a
    TLS listener's wrapper needs a protocol to wrap, so the site returns this.
    """

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.loseConnection()


class QuietSite(Site):
    """A Site with front-door limits and an optional per-request access log.

    Twisted logs every request by default, which costs 15-27 % of a node's
    throughput on this stack; operators turn it on with ``--access-log``.
    Every finished request is counted in ``metrics`` (L{HTTPMetrics}) if set,
    at the same hook: by route, method and status, with its latency.
    ``channels`` holds the live connections; ``connection_limit`` is the cap
    in force (``max_connections``, or less if the open-file limit is lower).
    """

    protocol = FrontDoorChannel  # type: ignore[assignment]
    access_log = False
    metrics: HTTPMetrics | None = None

    def __init__(
        self,
        resource: Resource,
        requestFactory: Any,
        *,
        reactor: Any = None,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        admission: Admission | None = None,
        descriptor_headroom: int = DESCRIPTOR_HEADROOM,
        descriptors: DescriptorBudget | None = None,
    ) -> None:
        super().__init__(resource, requestFactory=requestFactory, reactor=reactor)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.connection_limit = max_connections
        self.admission = admission if admission is not None else Admission(1 << 62)
        self.descriptor_headroom = descriptor_headroom
        self._descriptors = descriptors if descriptors is not None else DESCRIPTORS
        self._granted = 0
        self.channels: set[FrontDoorChannel] = set()
        self.turned_away = 0
        """Connections closed at once because the cap was reached."""
        self._sweep: LoopingCall | None = None

    @property
    def inflight_bytes(self) -> int:
        """Request-body bytes admitted and not yet released, across this site's connections."""
        return self.admission.inflight

    def log(self, request: Any) -> None:
        metrics = self.metrics
        if metrics is not None:
            started = getattr(request, "received_at", 0.0)
            seconds = time.monotonic() - started if started else 0.0
            route = getattr(request, "route", OTHER_ROUTE)
            metrics.observe(route, request.method, request.code, seconds)
        if self.access_log:
            super().log(request)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if len(self.channels) >= self.connection_limit:
            self.turned_away += 1
            return _TurnAway()
        channel: FrontDoorChannel = super().buildProtocol(addr)
        channel.header_timeout = self.header_timeout
        channel.now = self.reactor.seconds
        channel.on_lost = self.channels.discard
        self.channels.add(channel)
        return channel

    def startFactory(self) -> None:
        super().startFactory()
        self._granted = self._descriptors.reserve(self.max_connections, self.descriptor_headroom)
        self.connection_limit = self._granted
        self._sweep = LoopingCall(self._close_slow_heads)
        self._sweep.clock = self.reactor
        self._sweep.start(min(1.0, self.header_timeout / 4), now=False)

    def stopFactory(self) -> None:
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        self._sweep = None
        self._descriptors.release(self._granted, self.descriptor_headroom)
        self._granted = 0
        super().stopFactory()

    def _close_slow_heads(self) -> None:
        deadline = self.reactor.seconds() - self.header_timeout
        late = [
            c for c in self.channels if c.head_started is not None and c.head_started <= deadline
        ]
        for channel in late:
            channel.header_timed_out()


def make_site(
    resource: Resource,
    body_limit: BodyLimit,
    access_log: bool = False,
    *,
    reactor: Any = None,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_inflight_bytes: int = NODE_MAX_INFLIGHT_BYTES,
    descriptor_headroom: int = DESCRIPTOR_HEADROOM,
    metrics: HTTPMetrics | None = None,
) -> QuietSite:
    """A Site that limits bodies by route, connections, slow heads and bodies in flight,
    and counts what it answered in ``metrics``."""
    admission = Admission(max_inflight_bytes)
    request_class = type(
        "Request",
        (LimitedRequest,),
        {"body_limit": staticmethod(body_limit), "admission": admission},
    )
    site = QuietSite(
        _Utf8Guard(resource),
        request_class,
        reactor=reactor,
        header_timeout=header_timeout,
        max_connections=max_connections,
        admission=admission,
        descriptor_headroom=descriptor_headroom,
    )
    site.access_log = access_log
    site.metrics = metrics
    site.displayTracebacks = False
    return site
