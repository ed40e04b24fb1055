"""The HTTP server side shared by nodes and the proxy.

Twisted's C{Request} buffers any body it is sent (to a temporary file above
100 kB) and only then lets a resource look at it. L{LimitedRequest} refuses an
oversized body from its ``Content-Length``, or as soon as a chunked body passes
the limit, so a node never stores a gigabyte it will reject anyway.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from shardkv.web.errors import JSON

BodyLimit = Callable[[bytes, bytes], int]
"""Maps (method, raw path) to the largest body that request may carry."""

LINGER_SECONDS = 5.0


def _raw_response(status: int, reason: bytes, payload: dict[str, str]) -> bytes:
    body = json.dumps(payload).encode("utf-8") + b"\n"
    head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
    return head % (status, reason, JSON, len(body)) + body


class LimitedRequest(Request):
    """A request that refuses a body larger than its route allows.

    The answer is written straight to the transport because the request has
    not been dispatched yet. The write side is then closed while the read side
    keeps draining (a "lingering close", as nginx does), so the client reads
    the 413 rather than a connection reset; a timer ends the drain.
    """

    body_limit: BodyLimit = staticmethod(lambda method, path: 1 << 20)

    def __init__(self, channel: HTTPChannel, queued: object = None) -> None:
        super().__init__(channel, parsePOSTFormSubmission=False)
        self._limit = 0
        self._received = 0
        self._refused = False

    def gotLength(self, length: int | None) -> None:
        # The request line is parsed by the channel but only handed to the
        # request once the body is in; the limit depends on it now.
        method = getattr(self.channel, "_command", b"")
        path = getattr(self.channel, "_path", b"").split(b"?", 1)[0]
        self._limit = self.body_limit(method, path)
        if length is not None and length > self._limit:
            self._refuse(length)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._refuse(None)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            super().requestReceived(command, path, version)

    def _refuse(self, length: int | None) -> None:
        self._refused = True
        if self.content is not None:
            self.content.close()
        self.content = None
        # Stop twisted.web from sending "100 Continue" after our answer.
        self.requestHeaders.removeHeader(b"expect")
        size = f"{length} bytes" if length is not None else "more than that"
        payload = {
            "error": "payload_too_large",
            "message": f"the request body may be at most {self._limit} bytes; it was {size}",
        }
        channel = self.channel
        transport: Any = channel.transport
        transport.write(_raw_response(413, b"Payload Too Large", payload))
        channel.persistent = False
        lose_write = getattr(transport, "loseWriteConnection", None)
        if lose_write is not None:
            lose_write()
            channel.callLater(LINGER_SECONDS, transport.abortConnection)
        else:
            transport.loseConnection()


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


class QuietSite(Site):
    """A Site whose per-request access log is optional.

    Twisted logs every request by default, which costs 15-27 % of a node's
    throughput on this stack; operators turn it on with ``--access-log``.
    """

    access_log = False

    def log(self, request: Any) -> None:
        if self.access_log:
            super().log(request)


def make_site(resource: Resource, body_limit: BodyLimit, access_log: bool = False) -> Site:
    """A Site that limits bodies by route and answers errors in JSON."""
    request_class = type("Request", (LimitedRequest,), {"body_limit": staticmethod(body_limit)})
    site = QuietSite(_Utf8Guard(resource), requestFactory=request_class)
    site.access_log = access_log
    site.displayTracebacks = False
    return site
