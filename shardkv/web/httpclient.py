"""The outgoing HTTP client, owned by a Service.

treq's module-level functions share a global pool that nobody closes and that
keeps two connections per host. The pool here is sized for the expected
concurrency, keeps idle connections for less time than twisted.web's 60 s
server timeout (so the proxy does not reuse a socket the node is closing), and
is closed when the service stops.
"""

from __future__ import annotations

from typing import Any

from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.web.client import Agent, HTTPConnectionPool


class HTTPClientService(Service):
    """Owns a persistent connection pool and the treq client that uses it."""

    def __init__(self, reactor: Any, max_per_host: int = 64, idle_timeout: float = 30.0) -> None:
        self._reactor = reactor
        self._max_per_host = max_per_host
        self._idle_timeout = idle_timeout
        self._pool: HTTPConnectionPool | None = None
        self.http: HTTPClient | None = None

    def startService(self) -> None:
        pool = HTTPConnectionPool(self._reactor, persistent=True)
        pool.maxPersistentPerHost = self._max_per_host
        pool.cachedConnectionTimeout = self._idle_timeout  # type: ignore[assignment]
        self._pool = pool
        self.http = HTTPClient(Agent(self._reactor, pool=pool))
        super().startService()

    def request(self, method: str, url: bytes, **kwargs: Any) -> Deferred[Any]:
        """treq's C{request}, on this service's pool."""
        if self.http is None:
            raise RuntimeError("the HTTP client service is not running")
        return self.http.request(method, url, **kwargs)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        pool, self._pool, self.http = self._pool, None, None
        if pool is None:
            return succeed(None)
        closed: Deferred[None] = pool.closeCachedConnections()
        return closed
