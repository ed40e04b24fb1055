"""An asynchronous client of shardkv's public HTTP API, built on treq.

The HTTP object is injected rather than imported, so one client serves every
setting: the C{treq} module or a C{treq.client.HTTPClient} on a real network,
and C{treq.testing.StubTreq} when a whole cluster runs in memory. Anything
with treq's C{request(method, url, **kwargs)} will do.

Every call returns a C{Deferred} that fires with a L{Reply} (the whole answer,
body read) for I{any} HTTP status: callers of a key-value store branch on 404
and 412 as often as on 200, and the fault tests classify every status. A
caller that wants only success says so with L{Reply.expect}, which raises
L{APIError}. When there is no answer at all, the Deferred fails with
L{NotSent} (the request surely never left: the connection was refused or
never completed) or L{MaybeSent} (it may have been delivered: a timeout or a
connection that broke afterwards), the distinction a history checker needs.

Every call has a deadline: treq's own C{timeout} bounds connecting and the
answer's headers, and a timer on the client's reactor bounds reading the
body as well (treq's stops once the headers are in).
"""

from __future__ import annotations

import json as jsonlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol as WireProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

if TYPE_CHECKING:
    from treq.testing import StubTreq

DEFAULT_TIMEOUT = 5.0
"""Seconds a request may take, connect to last body byte, unless told otherwise."""

JSON_TYPE = "application/json"

HeaderValues = Mapping[str, str | bytes]
"""Request headers: str values are sent as latin-1, bytes as they are."""


class HTTPLike(Protocol):
    """What the client needs of its HTTP object: treq's C{request(method, url, **kwargs)}."""

    @property
    def request(self) -> Callable[..., Deferred[Any]]: ...


AnyHTTP: TypeAlias = "HTTPLike | StubTreq"
"""What a Client accepts (StubTreq builds its methods at run time, so it
needs naming: a type checker cannot see its C{request})."""


def quote_key(key: str) -> str:
    """A key as one percent-encoded path segment or query value.

    The one place keys are encoded: UTF-8, and every reserved character
    (``/``, ``?``, ``&``, ``+``, ``%`` ...) escaped, so any key survives
    both ``/kv/{key}`` and ``?key=``.
    """
    return quote(key.encode("utf-8"), safe="")


# -- answers -------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One HTTP answer, read completely."""

    status: int
    headers: Mapping[str, str]
    """Header names in lower case; a repeated header keeps its last value here."""
    body: bytes
    all_headers: Mapping[str, tuple[str, ...]] = field(
        default_factory=dict, repr=False, compare=False
    )
    """Every value of every header (lower-cased names), so repeats can be seen."""

    @classmethod
    def from_response(cls, response: IResponse, body: bytes) -> Reply:
        """A Reply from a twisted.web/treq response and its body."""
        every: dict[str, tuple[str, ...]] = {}
        for raw_name, raw_values in response.headers.getAllRawHeaders():
            name = raw_name.decode("latin-1").lower()
            values = tuple(v.decode("latin-1") for v in raw_values)
            every[name] = every.get(name, ()) + values
        return cls(response.code, {n: v[-1] for n, v in every.items()}, body, every)

    def header(self, name: str) -> str | None:
        """The single value of header ``name``, or None.

        Raises ``ValueError`` if the header was sent more than once: a caller
        asking for one value would otherwise silently get one of several.
        """
        name = name.lower()
        values = self.all_headers.get(name)
        if values is not None and len(values) > 1:
            raise ValueError(f"{name} given {len(values)} times: {values!r}")
        return self.headers.get(name)

    @property
    def text(self) -> str:
        """The body as text (UTF-8, undecodable bytes replaced), for messages and values."""
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body parsed as JSON (``ValueError`` if it is not JSON)."""
        return jsonlib.loads(self.body.decode("utf-8"))

    def error(self) -> tuple[int, str]:
        """``(status, error code)`` of a shardkv error answer, checking its shape.

        Every shardkv error is ``{"error": CODE, "message": TEXT}``; anything
        else raises ``ValueError``.
        """
        payload = self.json()
        if not isinstance(payload, dict):
            raise ValueError(f"HTTP {self.status}: not an error object: {payload!r}")
        code, message = payload.get("error"), payload.get("message")
        if not isinstance(code, str) or not isinstance(message, str) or not message:
            raise ValueError(f"HTTP {self.status}: not a shardkv error: {payload!r}")
        return self.status, code

    @property
    def ok(self) -> bool:
        """Whether the status is 2xx."""
        return 200 <= self.status < 300

    def expect(self, *statuses: int) -> Reply:
        """This reply if its status is one of ``statuses`` (default: any 2xx), else
        raise L{APIError}; lets a caller that only wants success write
        ``reply.expect().json()``.
        """
        if self.status in statuses if statuses else self.ok:
            return self
        raise APIError(self)

    def __str__(self) -> str:
        return f"HTTP {self.status} {self.text[:500]!r}"


class APIError(Exception):
    """An answer with a status the caller did not expect (see L{Reply.expect})."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        try:
            status, code = reply.error()
            detail = f"{code}: {reply.json()['message']}"
        except ValueError:
            status, detail = reply.status, reply.text[:300]
        super().__init__(f"HTTP {status} {detail}")
        self.status = status


class TransportError(OSError):
    """No HTTP answer at all. An C{OSError}, like the socket errors it stands for."""


class NotSent(TransportError):
    """The request never left: the connection was refused or never completed."""


class MaybeSent(TransportError):
    """No answer, but the request may have been delivered (and applied):
    a timeout, or a connection that broke after it was made."""


def _transport_error(failure: Failure) -> Failure:
    """Translate a failed exchange into L{NotSent} or L{MaybeSent}.

    A connect error (refused, unreachable, name unknown, a connect that timed
    out or was cancelled by the timeout before it completed) means no byte of
    the request was written. Everything else happened on an open connection
    (or we cannot tell), so the request may have arrived.
    """
    if failure.check(TransportError):
        return failure
    exc = failure.value
    if failure.check(ConnectError, ConnectingCancelledError, DNSLookupError):
        error: TransportError = NotSent(f"{type(exc).__name__}: {exc}")
    else:
        reasons = getattr(exc, "reasons", None)
        if reasons:
            exc_text = "; ".join(
                f"{type(r.value).__name__}: {r.value}" for r in reasons if isinstance(r, Failure)
            )
        else:
            exc_text = str(exc)
        error = MaybeSent(f"{type(exc).__name__}: {exc_text}")
    error.__cause__ = exc
    return Failure(error)


class _BodyCollector(WireProtocol):
    """Collects a response body; cancelling its Deferred drops the connection,
    so a server that stalls mid-body cannot hold the socket open forever."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _d: Deferred[bytes]) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:  # cancelled: the Deferred has failed already
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def read_body(response: IResponse) -> Deferred[bytes]:
    """The whole body of ``response``; cancellable (see L{_BodyCollector})."""
    collector = _BodyCollector()
    response.deliverBody(collector)
    return collector.done


# -- the client ------------------------------------------------------------------


class Client:
    """Requests to one shardkv server (a proxy or a node) at ``base_url``.

    ``reactor`` runs the deadlines; it must be the reactor the HTTP object
    runs on (for C{StubTreq}, any clock: a C{Clock} that never moves means
    no request ever times out, which in-memory tests want). Without one,
    the global reactor.
    """

    def __init__(
        self,
        http: AnyHTTP,
        base_url: str,
        *,
        reactor: IReactorTime | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.reactor: IReactorTime = reactor
        self.timeout = timeout

    def at(self, base_url: str, *, timeout: float | None = None) -> Client:
        """The same client (HTTP object, reactor) for another server, or another timeout."""
        seconds = self.timeout if timeout is None else timeout
        return Client(self.http, base_url, reactor=self.reactor, timeout=seconds)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        *,
        json: object = None,
        headers: HeaderValues | None = None,
        timeout: float | None = None,
    ) -> Deferred[Reply]:
        """Send one request to ``base_url + path`` and read the whole answer.

        ``json`` is encoded and sent with ``Content-Type: application/json``
        (unless ``headers`` names another); a str ``body`` is sent as UTF-8.
        Redirects are not followed: an API client reports what the server
        said. Fails with L{NotSent} or L{MaybeSent} when there is no answer.
        """
        if not path.startswith("/"):
            raise ValueError(f"a path starts with '/': {path!r}")
        raw = Headers()
        for name, value in (headers or {}).items():
            raw.addRawHeader(
                name.encode("ascii"), value if isinstance(value, bytes) else value.encode("latin-1")
            )
        if json is not None:
            body = jsonlib.dumps(json)
            if not raw.hasHeader(b"content-type"):
                raw.setRawHeaders(b"content-type", [JSON_TYPE.encode()])
        data = body.encode("utf-8") if isinstance(body, str) else body
        seconds = self.timeout if timeout is None else timeout
        d: Deferred[Any] = cast(HTTPLike, self.http).request(
            method,
            self.base_url + path,
            headers=raw,
            data=data,
            allow_redirects=False,
            timeout=seconds,
            reactor=self.reactor,
        )

        def read(response: IResponse) -> Deferred[Reply]:
            body_d = read_body(response)
            return body_d.addCallback(lambda data: Reply.from_response(response, data))

        d.addCallback(read)
        d.addTimeout(seconds, self.reactor)
        d.addErrback(_transport_error)
        return d

    # -- the seed API --------------------------------------------------------------

    def get(self, key: str) -> Deferred[Reply]:
        """``GET /get?key=``: 200 with ``{"key", "value", "version"}``, or 404."""
        return self.request("GET", "/get?key=" + quote_key(key))

    def set(self, key: str, value: str, *, version: str | None = None) -> Deferred[Reply]:
        """``POST /set``; with ``version``, only if the key is still at that version (else 412)."""
        payload: dict[str, str] = {"key": key, "value": value}
        if version is not None:
            payload["version"] = version
        return self.request("POST", "/set", json=payload)

    def remove(self, key: str) -> Deferred[Reply]:
        """``POST /delete`` (the seed's delete): 200, or 404 if absent."""
        return self.request("POST", "/delete", json={"key": key})

    # -- REST ----------------------------------------------------------------------

    def put(
        self,
        key: str,
        value: bytes | str,
        *,
        content_type: str | None = None,
        if_match: str | None = None,
        if_none_match: str | None = None,
    ) -> Deferred[Reply]:
        """``PUT /kv/{key}``: 201 created or 200 replaced, ETag = the new version.

        A str value is sent as UTF-8. ``content_type`` None sends none (the
        server stores its default); ``if_match`` / ``if_none_match`` make the
        write conditional (412 when the condition fails).
        """
        headers: dict[str, str] = {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if if_match is not None:
            headers["If-Match"] = if_match
        if if_none_match is not None:
            headers["If-None-Match"] = if_none_match
        return self.request("PUT", "/kv/" + quote_key(key), value, headers=headers)

    def read(self, key: str, *, if_none_match: str | None = None) -> Deferred[Reply]:
        """``GET /kv/{key}``: the value's bytes, its Content-Type and ETag; 404 if absent."""
        headers = {} if if_none_match is None else {"If-None-Match": if_none_match}
        return self.request("GET", "/kv/" + quote_key(key), headers=headers)

    def delete(self, key: str, *, if_match: str | None = None) -> Deferred[Reply]:
        """``DELETE /kv/{key}``: 200 with the tombstone's version; 404 if absent."""
        headers = {} if if_match is None else {"If-Match": if_match}
        return self.request("DELETE", "/kv/" + quote_key(key), headers=headers)

    # -- operations ------------------------------------------------------------------

    def health(self) -> Deferred[Reply]:
        """``GET /health``: 200 when serving, 503 with the reason when not."""
        return self.request("GET", "/health")

    def cluster(self) -> Deferred[Reply]:
        """``GET /cluster`` (proxy): the nodes, their health and traffic, N/R/W."""
        return self.request("GET", "/cluster")

    def explain(self, key: str) -> Deferred[Reply]:
        """``GET /explain?key=`` (proxy): the key's hash, owner and preference list."""
        return self.request("GET", "/explain?key=" + quote_key(key))
