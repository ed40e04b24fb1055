"""The API client for synchronous callers: scripts, the benchmark, threads in fault tests.

L{BlockingClient} runs L{shardkv.client.api.Client} on a I{private} reactor in
a daemon thread (L{ReactorThread}) and hands each call over to it, waiting
for the answer. The global reactor is never touched: in a pytest-twisted
test it belongs to the test, and a script should not have to run one.

Any number of threads may share one client; each call blocks only its
caller. One reactor thread carries a few thousand requests a second, far
more than the fault tests' load (a few hundred from up to 48 threads).

Failures keep the distinction the fault tests' history checker needs:
L{NotSent} when the request never left (connection refused, or a connect
that never completed) and L{MaybeSent} when it may have been delivered
(a timeout or a broken connection after connecting). Both are ``OSError``.

    with BlockingClient("http://127.0.0.1:8080") as kv:
        kv.set("name", "alice").expect(200)
        print(kv.get("name").json()["value"])

For a one-off request to a full URL, L{request} uses a shared client.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

from treq.client import HTTPClient
from twisted.internet.abstract import isIPAddress
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from shardkv.client.api import (
    DEFAULT_TIMEOUT,
    APIError,
    Client,
    HeaderValues,
    MaybeSent,
    NotSent,
    Reply,
    TransportError,
)
from shardkv.web.agent import BytesProducer

__all__ = [
    "APIError",
    "BlockingClient",
    "MaybeSent",
    "NotSent",
    "ReactorThread",
    "Reply",
    "TransportError",
    "request",
]

P = ParamSpec("P")
T = TypeVar("T")

HANDOFF_SLACK = 10.0
"""Seconds a caller waits beyond a request's own deadline before giving up on
the reactor thread itself (it should never come to that: the deadline fires
on the reactor)."""


def _new_reactor() -> Any:
    """A reactor instance of our own: epoll where there is epoll, else select."""
    try:
        from twisted.internet.epollreactor import EPollReactor

        return EPollReactor()
    except ImportError:  # not Linux
        from twisted.internet.selectreactor import SelectReactor

        return SelectReactor()


class ReactorThread:
    """A private reactor running in a daemon thread, with a blocking hand-off.

    L{call} is C{blockingCallFromThread} against this reactor: it schedules
    the function on the reactor thread, waits for its (possibly Deferred)
    result and returns it or raises its exception in the caller's thread.
    """

    def __init__(self, name: str = "shardkv-client") -> None:
        self.reactor = _new_reactor()
        self._running = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        if not self._running.wait(10.0):
            raise RuntimeError("the client's reactor thread did not start")

    def _run(self) -> None:
        self.reactor.callWhenRunning(self._running.set)
        self.reactor.run(installSignalHandlers=False)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def call(self, f: Callable[P, Deferred[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``f(*args, **kwargs)`` on the reactor thread; its result, or raise.

        Waits as long as it takes: every client request carries its own
        deadline on the reactor. L{call_within} bounds the wait as well.
        """
        return self.call_within(None, f, *args, **kwargs)

    def call_within(
        self,
        wait: float | None,
        f: Callable[P, Deferred[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """L{call}, giving up with ``TimeoutError`` after ``wait`` seconds (None: never)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("ReactorThread.call from its own reactor thread would deadlock")
        if not self.alive:
            raise RuntimeError("this client's reactor thread has been stopped")
        done = threading.Event()
        box: list[Any] = []

        def deliver(result: object) -> None:
            box.append(result)
            done.set()

        def start() -> None:
            maybeDeferred(f, *args, **kwargs).addBoth(deliver)

        self.reactor.callFromThread(start)
        if not done.wait(wait):
            raise TimeoutError(f"no result from the reactor thread within {wait:g} s")
        result = box[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result  # type: ignore[no-any-return]

    def stop(self, deadline: float = 10.0) -> None:
        """Stop the reactor and wait for its thread to end. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive():
            self.reactor.callFromThread(self.reactor.stop)
            self._thread.join(deadline)


def _bytes_body(body: bytes) -> IBodyProducer:
    """A request body written in one go.

    treq's default producer for bytes is a C{FileBodyProducer} on the
    I{global} cooperator, which runs on the global reactor: on a private
    reactor it would never write a byte.
    """
    if not isinstance(body, bytes):
        raise TypeError(f"the API client sends bytes, not {type(body).__name__}")
    return BytesProducer(body)


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """Endpoints for the Agent: a plain TCP endpoint for an IP address.

    Agent's default resolves every host, IP literals included, through the
    reactor's thread pool: a thread hop per new connection that buys nothing
    when the URL already says 127.0.0.1.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self.reactor, host, uri.port)
        else:
            endpoint = HostnameEndpoint(self.reactor, host, uri.port)
        if uri.scheme == b"https":
            return wrapClientTLS(self.tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


class BlockingClient:
    """L{shardkv.client.api.Client}'s calls, blocking, for one server at ``base_url``.

    By default the client starts its own L{ReactorThread}, with its own
    connection pool, and L{close} stops both. ``persistent=False`` opens a
    new connection per request, so a broken connection belongs to exactly
    one request (what the fault tests' histories want); the default keeps
    connections alive, which is faster for bulk work.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        persistent: bool = True,
        max_per_host: int = 64,
        thread: ReactorThread | None = None,
    ) -> None:
        self._owns_thread = thread is None
        self.thread = ReactorThread() if thread is None else thread
        reactor = self.thread.reactor
        self.pool = HTTPConnectionPool(reactor, persistent=persistent)
        self.pool.maxPersistentPerHost = max_per_host
        self.pool.retryAutomatically = False  # a retried request would be two in the history
        agent = Agent.usingEndpointFactory(reactor, _Endpoints(reactor), pool=self.pool)
        http = HTTPClient(agent, data_to_body_producer=_bytes_body)
        self._client = Client(http, base_url, reactor=reactor, timeout=timeout)

    @property
    def base_url(self) -> str:
        return self._client.base_url

    @property
    def timeout(self) -> float:
        return self._client.timeout

    def at(self, base_url: str, *, timeout: float | None = None) -> BlockingClient:
        """This client (thread, pool) for another server, or with another default
        timeout; closing it does nothing (the client it came from owns the thread).
        """
        view = object.__new__(BlockingClient)
        view._owns_thread = False
        view.thread = self.thread
        view.pool = self.pool
        view._client = self._client.at(base_url, timeout=timeout)
        return view

    def _call(self, f: Callable[..., Deferred[Reply]], *args: Any, **kwargs: Any) -> Reply:
        timeout = kwargs.get("timeout")
        wait = (self.timeout if timeout is None else timeout) + HANDOFF_SLACK
        return self.thread.call_within(wait, f, *args, **kwargs)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        *,
        json: object = None,
        headers: HeaderValues | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """See L{Client.request}; raises L{NotSent} or L{MaybeSent} without an answer."""
        return self._call(
            self._client.request, method, path, body, json=json, headers=headers, timeout=timeout
        )

    def get(self, key: str) -> Reply:
        """``GET /get?key=`` (see L{Client.get})."""
        return self._call(self._client.get, key)

    def set(self, key: str, value: str, *, version: str | None = None) -> Reply:
        """``POST /set`` (see L{Client.set})."""
        return self._call(self._client.set, key, value, version=version)

    def remove(self, key: str) -> Reply:
        """``POST /delete`` (see L{Client.remove})."""
        return self._call(self._client.remove, key)

    def put(
        self,
        key: str,
        value: bytes | str,
        *,
        content_type: str | None = None,
        if_match: str | None = None,
        if_none_match: str | None = None,
    ) -> Reply:
        """``PUT /kv/{key}`` (see L{Client.put})."""
        return self._call(
            self._client.put,
            key,
            value,
            content_type=content_type,
            if_match=if_match,
            if_none_match=if_none_match,
        )

    def read(self, key: str, *, if_none_match: str | None = None) -> Reply:
        """``GET /kv/{key}`` (see L{Client.read})."""
        return self._call(self._client.read, key, if_none_match=if_none_match)

    def delete(self, key: str, *, if_match: str | None = None) -> Reply:
        """``DELETE /kv/{key}`` (see L{Client.delete})."""
        return self._call(self._client.delete, key, if_match=if_match)

    def health(self) -> Reply:
        """``GET /health``."""
        return self._call(self._client.health)

    def cluster(self) -> Reply:
        """``GET /cluster`` (proxy)."""
        return self._call(self._client.cluster)

    def explain(self, key: str) -> Reply:
        """``GET /explain?key=`` (proxy)."""
        return self._call(self._client.explain, key)

    def close(self) -> None:
        """Drop pooled connections and stop the reactor thread, if this client owns them."""
        if not self._owns_thread or not self.thread.alive:
            return
        with contextlib.suppress(TimeoutError, RuntimeError):
            self.thread.call_within(5.0, self.pool.closeCachedConnections)
        self.thread.stop()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- one-off requests -------------------------------------------------------------

_shared: BlockingClient | None = None
_shared_lock = threading.Lock()


def shared() -> BlockingClient:
    """A process-wide client (one connection per request) for one-off calls.

    Started on first use, stopped at exit; use L{BlockingClient.at} to aim it.
    """
    global _shared
    with _shared_lock:
        if _shared is None or not _shared.thread.alive:
            _shared = BlockingClient("http://127.0.0.1", persistent=False)
            atexit.register(_shared.close)
        return _shared


def request(
    method: str,
    url: str,
    body: bytes | str | None = None,
    *,
    json: object = None,
    headers: HeaderValues | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Reply:
    """One request to a full ``http://host:port/path?query`` URL, on the shared client.

    Raises L{NotSent} or L{MaybeSent} (both ``OSError``) when there is no answer.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"need an http://host:port/... URL, not {url!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    client = shared().at(f"{parts.scheme}://{parts.netloc}")
    return client.request(method, target, body, json=json, headers=headers, timeout=timeout)
