"""Who may call which route: the cluster token, the client token, protected mode.

Anyone who can reach a node's replica routes can forge versions, delete keys
cluster-wide and make the node call any address, so those routes are never
open to the network:

- With a cluster token (``--token-file``), every route but ``/health`` needs
  ``Authorization: Bearer <token>``. No usable header is a 401 (with
  ``WWW-Authenticate: Bearer``), a wrong token a 403.
- Without one the process is in protected mode, as Redis is: it may listen on
  loopback only (L{loopback_endpoint}, checked at start-up), and the same
  routes answer only loopback peers.

The proxy's data API is open unless a client token (``--client-token-file``)
is set. Its read-only views (``/cluster``, ``/explain``, ``/metrics``, the
dashboard's ``/dashboard/ring.json``) are at least as protected as the data: the client
token when there is one, otherwise the cluster token when there is one,
otherwise open. The dashboard's page and assets hold no data and are open.
A node's ``/metrics`` is a cluster route like every node route but ``/health``.

L{GuardedResource} checks every request before the app sees it, by path, so a
route added later is a cluster route unless its app's policy says otherwise.
Tokens are compared in constant time and never written into an answer or a
log line.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from shardkv.errors import Forbidden, ShardkvError, Unauthorized
from shardkv.web.errors import error_body, json_body, status_for

MIN_TOKEN_CHARS = 16
"""Shorter secrets can be guessed; ``secrets.token_urlsafe(32)`` gives 43 characters."""

MAKE_TOKEN_HINT = 'python3 -c "import secrets; print(secrets.token_urlsafe(32))" > FILE'


class TokenFileError(ValueError):
    """A token file that cannot serve; the message names the file, never its content."""


def load_token(path: str, option: str = "--token-file") -> str:
    """The secret in ``path``, surrounding whitespace stripped.

    Read once at start-up, so a missing, unreadable, empty or weak file stops
    the process before it listens instead of leaving it open or locked out.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(64 * 1024 + 1)
    except OSError as e:
        raise TokenFileError(f"{option}: cannot read {path}: {e.strerror or e}") from None
    if len(raw) > 64 * 1024:
        raise TokenFileError(f"{option}: {path} is larger than 64 KiB; it must hold one token")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        token = None
    if token is None or not all(33 <= ord(c) < 127 for c in token):
        raise TokenFileError(
            f"{option}: the token in {path} must be printable ASCII with no spaces"
        )
    if not token:
        raise TokenFileError(f"{option}: {path} is empty; put a secret in it: {MAKE_TOKEN_HINT}")
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenFileError(
            f"{option}: the token in {path} is shorter than {MIN_TOKEN_CHARS} characters; "
            f"make a stronger one: {MAKE_TOKEN_HINT}"
        )
    return token


# -- who the peer is ---------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def loopback_host(host: str) -> bool:
    """Is ``host`` an IP literal on loopback (127.0.0.0/8, ::1, or IPv4 mapped into IPv6)?

    Asked for every request in protected mode; parsing the address is most of
    the guard's cost, so answers are kept for the last peers seen (bounded: a
    peer's address is the client's choice)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def loopback_peer(peer: object) -> bool:
    """Did this connection come from this machine? A UNIX socket always does."""
    if isinstance(peer, UNIXAddress):
        return True
    if isinstance(peer, IPv4Address | IPv6Address):
        return loopback_host(peer.host)
    return False


def _endpoint_args(description: str) -> list[str]:
    """A Twisted endpoint description split on its unescaped colons."""
    args, current, escaped = [], [], False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            args.append("".join(current))
            current = []
        else:
            current.append(ch)
    args.append("".join(current))
    return args


def loopback_endpoint(description: str) -> bool:
    """Does this ``--listen`` endpoint accept connections from this machine only?

    TCP and TLS endpoints must name a loopback interface (no interface binds
    them all); a UNIX socket is local. Any other kind cannot be told apart
    from a public one, so it counts as public.
    """
    kind, *args = _endpoint_args(description)
    kind = kind.lower()
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False
    positional = [a for a in args if "=" not in a]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    interface = named.get("interface")
    if interface is None and kind != "ssl" and len(positional) >= 2:
        interface = positional[1]
    return interface is not None and loopback_host(interface)


# -- which route needs what --------------------------------------------------------


class Access(enum.Enum):
    OPEN = "open"
    """Anyone: ``/health``, and the dashboard's page and assets, which hold no data
    (a browser cannot send a token with a navigation; the page sends it when it reads)."""
    CLIENT = "client"
    """The data API: the client token if one is set, else anyone."""
    VIEW = "view"
    """Read-only views: the client token if set, else the cluster token if set, else anyone."""
    CLUSTER = "cluster"
    """Node routes and admin routes: the cluster token, or a loopback peer in protected mode."""


Policy = Callable[[bytes, bytes], Access]
"""(method, raw path) to what the route needs."""


def node_policy(method: bytes, path: bytes) -> Access:
    """On a node everything but ``/health`` is a cluster route, the data API included."""
    return Access.OPEN if path == b"/health" else Access.CLUSTER


_PROXY_DATA = (b"/set", b"/get", b"/delete")


def proxy_policy(method: bytes, path: bytes) -> Access:
    """The proxy's data API is for clients, its views for readers; the rest is admin."""
    if path == b"/health" or path == b"/dashboard" or path.startswith(b"/dashboard/static/"):
        return Access.OPEN
    if path in _PROXY_DATA or path.startswith(b"/kv/"):
        return Access.CLIENT
    if path in (b"/cluster", b"/explain", b"/metrics", b"/dashboard/ring.json"):
        return Access.VIEW
    return Access.CLUSTER


def _digest(secret: bytes) -> bytes:
    # Comparing fixed-size digests keeps the comparison from leaking the token's length.
    return hashlib.sha256(secret).digest()


class Guard:
    """The tokens one process accepts, and the check each request passes."""

    def __init__(self, cluster_token: str | None = None, client_token: str | None = None) -> None:
        self._cluster = _digest(cluster_token.encode("ascii")) if cluster_token else None
        self._client = _digest(client_token.encode("ascii")) if client_token else None

    @property
    def protected_mode(self) -> bool:
        """No cluster token: cluster routes answer loopback peers only."""
        return self._cluster is None

    def __repr__(self) -> str:
        # Never the digests: a repr can end up in a log.
        return (
            f"Guard(cluster_token={'set' if self._cluster else 'unset'}, "
            f"client_token={'set' if self._client else 'unset'})"
        )

    def check(self, request: IRequest, access: Access) -> None:
        """Return if ``request`` may use a route needing ``access``; raise otherwise.

        L{Unauthorized} (with C{WWW-Authenticate} set on the request) when it
        carries no bearer token, L{Forbidden} when the token is wrong or, in
        protected mode, when the peer is not on loopback.
        """
        if access is Access.OPEN:
            return
        if access is Access.VIEW:
            access = Access.CLIENT if self._client is not None else Access.CLUSTER
            if self._cluster is None and self._client is None:
                return
        if access is Access.CLIENT:
            if self._client is None:
                return
            self._require(request, [self._client, self._cluster], "the client token")
            return
        if self._cluster is None:
            if not loopback_peer(request.getClientAddress()):
                raise Forbidden(
                    "protected mode: with no --token-file this route answers only "
                    "clients on this machine; start every process with --token-file"
                )
            return
        self._require(request, [self._cluster], "the cluster token")

    def _require(self, request: IRequest, accepted: list[bytes | None], what: str) -> None:
        given = _bearer(request)
        if given is None:
            request.setHeader(b"www-authenticate", b'Bearer realm="shardkv"')
            raise Unauthorized(f"this route needs {what}: send Authorization: Bearer <token>")
        digest = _digest(given)
        # Every accepted token is compared, so the time taken says nothing about which matched.
        matches = [hmac.compare_digest(digest, token) for token in accepted if token is not None]
        if not any(matches):
            raise Forbidden(f"the bearer token is not {what}")


def _bearer(request: IRequest) -> bytes | None:
    """The token of the one ``Authorization: Bearer`` header, or None."""
    values: list[bytes] = request.requestHeaders.getRawHeaders(b"authorization") or []
    if len(values) != 1:
        return None
    scheme, _, credentials = values[0].strip().partition(b" ")
    credentials = credentials.strip()
    if scheme.lower() != b"bearer" or not credentials:
        return None
    return credentials


class GuardedResource(Resource):
    """Passes a request on to ``inner`` only if the guard allows its route.

    A leaf wrapping the app's resource, like the site's UTF-8 check: the
    check runs before routing, so it covers routes the app does not know
    (they stay a 401 rather than a 404) and any route added later.
    """

    isLeaf = True

    def __init__(self, inner: Resource, guard: Guard, policy: Policy) -> None:
        super().__init__()
        self._inner = inner
        self._guard = guard
        self._policy = policy

    def render(self, request: Any) -> Any:
        try:
            self._guard.check(request, self._policy(request.method, request.path))
        except ShardkvError as e:
            return json_body(request, status_for(e), error_body(e))
        return self._inner.render(request)
