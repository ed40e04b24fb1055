"""The HTTP/1.1 connection: every request that is not HTTP gets a JSON answer and a close.

Twisted's L{HTTPChannel} splits lines on CRLF only, so a bare-LF request
(``GET / HTTP/1.1\\n\\n``) or a TLS ClientHello sent to a plain port sits in
its buffer until the idle timeout; a line over its length limit closes the
connection with no status at all; and its own refusals are a bare
``400 Bad Request`` with no body. L{FrontDoorChannel} answers each of these
at once in JSON and closes: 400 for what is not HTTP (and for a chunk size
that overflows 64 bits), 414 for a request line over 16 KiB, 431 for headers
that are too many or too large, 408 for headers that do not arrive within
the site's header timeout (slowloris).

The per-request cost is one extra Python frame, a few scans in C and one
clock read: the header deadline is checked by the site's periodic sweep
(L{shardkv.web.site.QuietSite}), not by a timer per request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

JSON = b"application/json"

MAX_REQUEST_LINE = 16 * 1024
"""Longest request line; past it, 414."""
MAX_HEAD_BYTES = 32 * 1024
"""Most bytes in a request head (request line, headers, CRLFs); past it, 431."""
MAX_HEADER_LINES = 500
"""Most headers; past them, 431 (Twisted's own limit answered a bare 400)."""
MAX_CHUNK_SIZE_DIGITS = 16
"""A chunk size of more hex digits does not fit 64 bits: 400."""
LINGER_SECONDS = 5.0
"""How long a refused connection keeps draining what the client still sends."""

REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}

_REQUEST_START = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\r\n"
)
"""Bytes a request may begin with: a method's token characters, or the CRLF
some clients send between requests. A TLS record (0x16) or other binary is not."""


def raw_response(
    status: int, payload: dict[str, str], headers: Iterable[tuple[bytes, bytes]] = ()
) -> bytes:
    """A complete JSON response that closes the connection, written before any request exists."""
    body = json.dumps(payload).encode("utf-8") + b"\n"
    extra = b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers)
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n"
        % (status, REASONS[status], JSON, len(body))
        + extra
        + b"\r\n"
        + body
    )


class ChunkSizes:
    """Follows a chunked body just far enough to read each chunk-size line.

    Twisted's decoder accepts any chunk size and then waits for the bytes;
    a size of ``ffffffffffffffffffff`` with nothing after it holds the
    connection open. This reads the same framing (size line, that many bytes
    and a CRLF, the next size line) so that the request can refuse a size it
    will never take before any of those bytes are buffered. Malformed framing
    is left to Twisted's decoder, which refuses it; this one then stops.
    """

    __slots__ = ("_line", "_skip", "done")

    def __init__(self) -> None:
        self._line = b""
        self._skip = 0
        self.done = False

    def sizes(self, data: bytes) -> list[int]:
        """The chunk sizes announced in ``data``; -1 for one that overflows 64 bits."""
        found: list[int] = []
        i, n = 0, len(data)
        while i < n and not self.done:
            if self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self._line += data[i:]
                if len(self._line) > 1024:
                    self.done = True
                return found
            line, self._line = self._line + data[i:j], b""
            i = j + 1
            text = line.rstrip(b"\r").split(b";", 1)[0]
            if len(text) > MAX_CHUNK_SIZE_DIGITS:
                self.done = True
                found.append(-1)
                return found
            try:
                size = int(text, 16)
            except ValueError:
                self.done = True
                return found
            if size == 0:
                self.done = True
                return found
            found.append(size)
            self._skip = size + 2
        return found


class FrontDoorChannel(HTTPChannel):
    """An HTTPChannel that answers every protocol-level refusal in JSON, then closes.

    Each segment of a request head is looked at once as it arrives, with a
    few scans in C (no per-line Python): a line ending in a bare LF, a head
    over L{MAX_HEAD_BYTES} or L{MAX_HEADER_LINES} are refused before Twisted
    parses them. ``head_started`` is when the current request's head began
    (the connection's start for the first request, its first byte for later
    ones) and is ``None`` once the headers are in or while a kept-alive
    connection is idle; the site's sweep calls L{header_timed_out} on a
    channel past its deadline.
    """

    MAX_LENGTH = MAX_REQUEST_LINE
    totalHeadersSize = MAX_HEAD_BYTES + 1024  # ours (which counts CRLFs too) trips first
    maxHeaders = MAX_HEADER_LINES + 10  # ours trips first

    header_timeout = 10.0
    now: Callable[[], float] = staticmethod(lambda: 0.0)
    on_lost: Callable[[FrontDoorChannel], None] = staticmethod(lambda channel: None)

    head_started: float | None = None
    refused = False
    """Set once an answer was written outside a request; all later input is dropped."""
    chunks: ChunkSizes | None = None
    _at_start = True
    _tail = b""
    _head_bytes = 0
    _head_lines = 0
    _abort_call: IDelayedCall | None = None
    _host: IAddress | None = None
    _peer: IAddress | None = None
    _secure: bool | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.head_started = self.now()

    # Twisted's Request asks its channel for both addresses on every request,
    # and TCP's getHost is a getsockname() system call; a connection's
    # addresses and TLS never change, so each is asked once per connection.

    def getHost(self) -> IAddress:
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    def getPeer(self) -> IAddress:
        peer = self._peer
        if peer is None:
            peer = self._peer = super().getPeer()
        return peer

    def isSecure(self) -> bool:
        secure = self._secure
        if secure is None:
            secure = self._secure = super().isSecure()
        return secure

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        if self.line_mode and data:
            # The current request's head, looked at once per segment in C.
            if self._at_start:
                self._at_start = False
                if self.head_started is None:
                    self.head_started = self.now()
                if data[0] not in _REQUEST_START:
                    self.refuse(
                        400, "bad_request", "this is not an HTTP/1.1 request (TLS to a plain port?)"
                    )
                    return
            tail = self._tail
            probe = tail + data if tail else data
            end = probe.find(b"\r\n\r\n")
            head = probe if end < 0 else probe[: end + 4]
            lf = head.count(b"\n")
            crlf = head.count(b"\r\n")
            if tail:
                lf -= tail.count(b"\n")
                crlf -= tail.count(b"\r\n")
            if lf != crlf:
                self.refuse(400, "bad_request", "HTTP lines end in CRLF; a line ended in a bare LF")
                return
            before = self._head_bytes
            size = before + len(head) - len(tail)
            lines = self._head_lines + lf
            if size > MAX_HEAD_BYTES or lines > MAX_HEADER_LINES + 2:
                first_lf = data.find(b"\n")
                line = before + (len(data) if first_lf < 0 else first_lf)
                if not self.requests and line > MAX_REQUEST_LINE:
                    self._too_long_request_line()
                else:
                    self._too_large_headers()
                return
            if end < 0:
                self._tail = head[-3:]
                self._head_bytes = size
                self._head_lines = lines
            else:
                # The head is complete: Twisted parses it within this call.
                self.head_started = None
                self._at_start = True
                if before:
                    self._tail = b""
                    self._head_bytes = self._head_lines = 0
        super().dataReceived(data)

    def _too_long_request_line(self) -> None:
        self.refuse(
            414, "uri_too_long", f"the request line may be at most {MAX_REQUEST_LINE} bytes"
        )

    def _too_large_headers(self) -> None:
        self.refuse(
            431,
            "headers_too_large",
            f"the request head may be at most {MAX_HEAD_BYTES} bytes, each line at most "
            f"{MAX_REQUEST_LINE}, with at most {MAX_HEADER_LINES} headers",
        )

    def lineLengthExceeded(self, line: bytes) -> None:
        # Twisted makes the request when the request line is complete.
        if not self.requests:
            self._too_long_request_line()
        else:
            self._too_large_headers()

    def expect_chunks(self) -> None:
        """The request's body is chunked: follow its chunk sizes (the request calls this)."""
        self.chunks = ChunkSizes()

    def rawDataReceived(self, data: bytes) -> None:
        chunks = self.chunks
        if chunks is not None:
            request: Any = self.requests[-1]
            for size in chunks.sizes(data):
                if size < 0:
                    self.refuse(400, "bad_request", "a chunk size does not fit in 64 bits")
                    return
                if not request.chunk_announced(size):
                    return
            if chunks.done:
                self.chunks = None
        super().rawDataReceived(data)

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Twisted's one funnel for the requests its parser refuses; the only private hook here.

        Twisted writes a bare ``400 Bad Request`` with no body; this answers the
        same status in JSON. Twisted does not say which check failed.
        """
        self.refuse(
            400,
            "bad_request",
            "malformed HTTP/1.1 request (request line, a header, Content-Length, "
            "Transfer-Encoding or chunked framing)",
        )

    def header_timed_out(self) -> None:
        """Close a connection whose request head took too long.

        A connection that never sent a byte is closed without an answer, so
        that a client about to reuse it never reads a 408 as the answer to a
        request it had not sent yet; a head cut short gets a 408.
        """
        if self._at_start:
            self.head_started = None
            self.refused = True
            transport: Any = self.transport
            transport.loseConnection()
            return
        self.refuse(
            408,
            "request_timeout",
            f"the request headers did not arrive within {self.header_timeout:g} s",
            linger=False,
        )

    def refuse(
        self,
        status: int,
        code: str,
        message: str,
        headers: Iterable[tuple[bytes, bytes]] = (),
        *,
        linger: bool = True,
    ) -> None:
        """Answer ``status`` in JSON outside any request and close the connection.

        With ``linger`` the write side is closed while the read side keeps
        draining for L{LINGER_SECONDS} (as nginx does), so a client still
        sending reads the answer rather than a reset.
        """
        if self.refused:
            return
        self.refused = True
        self.head_started = None
        self.chunks = None
        self.persistent = False
        self.clearLineBuffer()
        transport: Any = self.transport
        transport.write(raw_response(status, {"error": code, "message": message}, headers))
        lose_write = getattr(transport, "loseWriteConnection", None) if linger else None
        if lose_write is not None:
            lose_write()
        else:
            transport.loseConnection()
        self._abort_call = self.callLater(LINGER_SECONDS, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.head_started = None
        if self._abort_call is not None:
            self._abort_call.cancel()
            self._abort_call = None
        try:
            super().connectionLost(reason)
        finally:
            self.on_lost(self)
