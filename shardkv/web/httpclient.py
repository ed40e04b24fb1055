"""The outgoing HTTP client, owned by a Service.

treq's module-level functions share a global pool that nobody closes and that
keeps two connections per host. The pool here is sized for the expected
concurrency, keeps idle connections for less time than twisted.web's 60 s
server timeout (so the proxy does not reuse a socket the node is closing), and
is closed when the service stops.

Calls go through treq's C{HTTPClient.request}, over
L{shardkv.web.agent.PersistentAgent} rather than twisted.web's Agent and
pool, and with three of treq's own options set for the cluster's traffic.
Measured as proxy CPU per ``POST /replica/batch`` exchange with a real node
(one GET operation, medians of five interleaved rounds on a busy 2-core box):
twisted.web's Agent and pool under treq 328 us; the lean agent under plain
treq 192 us; and then, each alone on top of it:

  - the URL handed over as a L{PreparedURL}, made once per URL: treq
    otherwise parses it with hyperlink and IDNA-encodes its host on every
    call, even an IP address (136 us);
  - a cookie jar that keeps nothing (L{NoCookies}), passed as the client's
    jar and as each call's C{cookies} (190 us: within the noise; over a no-op
    agent it saves 7 of 69 us): the cluster's calls carry no cookies;
  - bodies given as bytes made L{shardkv.web.agent.BytesProducer}s, which
    the agent writes with the request's head in one write (189 us; treq's
    own C{FileBodyProducer} over C{BytesIO} is read the same way already).

All together, as this service runs them: 114 us.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from http.cookiejar import Cookie
from typing import Any

from cryptography import x509
from hyperlink import EncodedURL
from OpenSSL.crypto import X509
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.http_headers import Headers

from shardkv.errors import ClientStopped
from shardkv.web.agent import PersistentAgent, body_producer

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


class NoCookies(IndexableCookieJar):
    """A cookie jar that never stores a cookie, so it never sends one.

    The cluster's calls are between its own processes, authenticated by the
    bearer token on every request; nodes set no cookies, and a cookie a node
    did set must not change what later calls to other nodes carry. treq's
    C{HTTPClient} always wraps its agent in a C{CookieAgent}: with this jar
    that wrapper finds nothing to add and keeps nothing it is given.
    """

    def set_cookie(self, cookie: Cookie) -> None:
        pass

    def set_cookie_if_ok(self, cookie: Cookie, request: Any) -> None:
        pass

    def add_cookie_header(self, request: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

    def __iter__(self) -> Iterator[Cookie]:
        return iter(())

    def __len__(self) -> int:
        return 0


class PreparedURL(EncodedURL):
    """A hyperlink URL already in its wire form, which treq sends as it is.

    treq turns whatever URL it is given into bytes with
    C{url.to_uri().to_text()}: a parse, a percent-encoding pass and IDNA on
    the host, on every call. A prepared URL did that once, when it was made
    (L{prepare}), and answers both calls from that. A copy made from it
    (C{replace}, as treq does for C{params=}) is a plain hyperlink URL again.
    """

    _wire: str | None = None

    @classmethod
    def prepare(cls, url: bytes) -> PreparedURL:
        """The prepared form of ``url``; L{ValueError} for one treq could not send either."""
        uri = EncodedURL.from_text(url.decode("ascii")).to_uri()
        prepared = cls(
            scheme=uri.scheme,
            host=uri.host,
            path=uri.path,
            query=uri.query,
            fragment=uri.fragment,
            port=uri.port,
            rooted=uri.rooted,
            userinfo=uri.userinfo,
            uses_netloc=uri.uses_netloc,
        )
        prepared._wire = uri.to_text()
        return prepared

    def to_uri(self) -> EncodedURL:
        if self._wire is not None:
            return self
        uri: EncodedURL = super().to_uri()
        return uri

    def to_text(self, with_password: bool = False) -> str:
        if self._wire is not None and not with_password:
            return self._wire
        text: str = super().to_text(with_password)
        return text


class PreparedURLs:
    """The L{PreparedURL} of each URL called, kept for the next call to it.

    A proxy calls few distinct URLs over and over (one batch route per
    node); single-key calls name keys, so the cache is emptied whenever it
    reaches ``size`` entries rather than growing without bound.
    """

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._urls: dict[bytes, PreparedURL] = {}

    def get(self, url: bytes) -> PreparedURL:
        prepared = self._urls.get(url)
        if prepared is None:
            prepared = PreparedURL.prepare(url)
            if len(self._urls) >= self.size:
                self._urls.clear()
            self._urls[url] = prepared
        return prepared


class HTTPClientService(Service):
    """Owns a persistent connection pool and the treq client that uses it.

    ``max_per_host``: idle connections kept per node (more are opened when
    more calls are in flight at once; there is no cap on those).
    ``idle_timeout``: seconds an idle connection is kept.

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
        self._agent: PersistentAgent | None = None
        self._jar = NoCookies()
        self._urls = PreparedURLs()
        self.http: HTTPClient | None = None

    @property
    def agent(self) -> PersistentAgent | None:
        """The agent under treq while the service runs (None when stopped)."""
        return self._agent

    def __repr__(self) -> str:
        return f"<HTTPClientService token={'set' if self._authorization else 'none'}>"

    def startService(self) -> None:
        agent = PersistentAgent(
            self._reactor,
            self._tls,
            max_per_host=self._max_per_host,
            idle_timeout=self._idle_timeout,
        )
        self._agent = agent
        self.http = HTTPClient(agent, cookiejar=self._jar, data_to_body_producer=body_producer)
        super().startService()

    def request(self, method: str, url: bytes | EncodedURL, **kwargs: Any) -> Deferred[Any]:
        """treq's C{request}, on this service's connections, with the token if there is one.

        ``url`` as bytes is prepared once per URL (L{PreparedURLs}); a hyperlink
        URL (a L{PreparedURL} the caller keeps) is sent as it is. A host that no
        URL can name raises L{ValueError} here, as treq would. Cookies are
        refused (L{TypeError}): the cluster's calls carry none (L{NoCookies}).
        """
        if self.http is None:
            raise ClientStopped("the HTTP client service is not running")
        if "cookies" in kwargs:
            raise TypeError("the cluster's HTTP client sends no cookies")
        if self._authorization is not None:
            kwargs["headers"] = _with_authorization(kwargs.get("headers"), self._authorization)
        target = self._urls.get(url) if isinstance(url, bytes) else url
        return self.http.request(method, target, cookies=self._jar, **kwargs)

    def stopService(self) -> Deferred[None]:
        """Stop taking requests, close the idle connections, and fire when none is left.

        A call in flight keeps its connection until it ends (its caller's
        deadline bounds that wait), then the connection closes.
        """
        super().stopService()
        agent, self._agent, self.http = self._agent, None, None
        if agent is None:
            return succeed(None)
        return agent.close()


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
