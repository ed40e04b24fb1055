"""The outgoing HTTP client, owned by a Service.

treq's module-level functions share a global pool that nobody closes and that
keeps two connections per host. The pool here is sized for the expected
concurrency, keeps idle connections for less time than twisted.web's 60 s
server timeout (so the proxy does not reuse a socket the node is closing), and
is closed when the service stops.

The same service carries what the cluster's own traffic needs on every call:
the cluster token, sent as ``Authorization: Bearer`` on each request so no
caller can forget it, and the CA that node certificates must chain to. Both
are checked at construction, so a process with a bad token or CA file refuses
to start instead of failing every call later.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from cryptography import x509
from OpenSSL.crypto import X509
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)
from twisted.web.http_headers import Headers

AUTHORIZATION = b"Authorization"


def load_ca_certificates(path: str) -> list[Certificate]:
    """Every certificate in the PEM file at ``path``; L{ValueError} in one line if none.

    Read once at start-up (before the reactor runs), so the blocking read
    costs nothing at run time.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read the CA file {path}: {e.strerror or e}") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"the CA file {path} holds no readable PEM certificate") from None
    return [Certificate(X509.from_cryptography(c)) for c in certificates]


def _bearer(token: str) -> bytes:
    """The Authorization value for ``token``; refuses one that cannot be a header value.

    Only visible ASCII without spaces, so the token can neither split a header
    nor be changed on the way. The message never repeats the token.
    """
    if not token or not all("!" <= c <= "~" for c in token):
        raise ValueError("the token must be non-empty visible ASCII without spaces")
    return b"Bearer " + token.encode("ascii")


def _with_authorization(headers: Any, value: bytes) -> Headers:
    """A copy of the caller's headers (None, a dict as treq takes, or L{Headers}) plus ours.

    A copy, because callers reuse header objects; setting the header (not
    adding it) leaves exactly one Authorization header.
    """
    if isinstance(headers, Headers):
        merged = headers.copy()
    else:
        merged = Headers()
        for name, values in (headers or {}).items():
            merged.setRawHeaders(name, values if isinstance(values, list) else [values])
    merged.setRawHeaders(AUTHORIZATION, [value])
    return merged


class QuietClientFactory(_HTTP11ClientFactory):
    """The pool's factory of one connection, without its log lines.

    Twisted logs "Starting factory" and "Stopping factory" for every
    connection a pool opens: about once a second for each down node, while
    the health checks keep trying it."""

    noisy = False


class HTTPClientService(Service):
    """Owns a persistent connection pool and the treq client that uses it.

    ``token``: sent as ``Authorization: Bearer <token>`` on every request.
    ``ca_file``: a PEM file of the CAs that https servers' certificates must
    chain to, with the URL's host (name or IP address) checked against the
    certificate; without it, https trusts the system's store.
    """

    def __init__(
        self,
        reactor: Any,
        max_per_host: int = 64,
        idle_timeout: float = 30.0,
        *,
        ca_file: str | None = None,
        token: str | None = None,
    ) -> None:
        self._reactor = reactor
        self._max_per_host = max_per_host
        self._idle_timeout = idle_timeout
        self._authorization = None if token is None else _bearer(token)
        self._tls = (
            BrowserLikePolicyForHTTPS()
            if ca_file is None
            else BrowserLikePolicyForHTTPS(
                trustRoot=trustRootFromCertificates(load_ca_certificates(ca_file))
            )
        )
        self._pool: HTTPConnectionPool | None = None
        self.http: HTTPClient | None = None

    def __repr__(self) -> str:
        return f"<HTTPClientService token={'set' if self._authorization else 'none'}>"

    def startService(self) -> None:
        pool = HTTPConnectionPool(self._reactor, persistent=True)
        pool._factory = QuietClientFactory
        pool.maxPersistentPerHost = self._max_per_host
        pool.cachedConnectionTimeout = self._idle_timeout  # type: ignore[assignment]
        self._pool = pool
        self.http = HTTPClient(Agent(self._reactor, contextFactory=self._tls, pool=pool))
        super().startService()

    def request(self, method: str, url: bytes, **kwargs: Any) -> Deferred[Any]:
        """treq's C{request}, on this service's pool, with the token if there is one."""
        if self.http is None:
            raise RuntimeError("the HTTP client service is not running")
        if self._authorization is not None:
            kwargs["headers"] = _with_authorization(kwargs.get("headers"), self._authorization)
        return self.http.request(method, url, **kwargs)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        pool, self._pool, self.http = self._pool, None, None
        if pool is None:
            return succeed(None)
        closed: Deferred[None] = pool.closeCachedConnections()
        return closed


class SchemeURLs(Mapping[str, str]):
    """Base URLs for any node id under one scheme: ``https://{node}`` for every node.

    A node learns its peers' ids only from the hints it holds, so it cannot
    list them up front; this mapping answers for whichever id it is asked.
    """

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme

    def __getitem__(self, node: str) -> str:
        return f"{self.scheme}://{node}"

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0
