"""The dashboard's routes on the proxy: the page, its assets, and the ring it draws.

    GET /dashboard                the page (shardkv/dashboard/static/index.html)
    GET /dashboard/static/<name>  one of its assets, by exact file name
    GET /dashboard/ring.json      the read ring as arcs (L{shardkv.dashboard.arcs});
                                  ?segments=N draws it in at most N (nodes to 512)

The page is plain HTML, CSS and JavaScript shipped in the package: no build
step and nothing loaded from elsewhere (its Content-Security-Policy says
so to the browser). It holds no data; the script polls ``/cluster``,
``/metrics`` and ``/dashboard/ring.json`` and draws what they answer. So the
page and its assets are open (a browser cannot send a bearer token with a
navigation), while the data it reads is guarded as every view is
(L{shardkv.web.auth.proxy_policy}); with tokens set, the page asks for one.

An asset is served only if its name is one of the files in ``static/``: a
name from a request is looked up among them, never joined onto a path.
"""

from __future__ import annotations

from importlib.resources import files
from typing import TYPE_CHECKING, Protocol

from klein import Klein
from twisted.web.iweb import IRequest

from shardkv.dashboard.arcs import LIMIT_SEGMENTS, MAX_SEGMENTS, ring_json
from shardkv.errors import InvalidRequest, NotFound
from shardkv.web.errors import json_body

if TYPE_CHECKING:
    from shardkv.proxy.coordinator import Coordinator

CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
}
"""The kinds of file the page is made of; a file of another kind is not served."""

CONTENT_SECURITY_POLICY = (
    b"default-src 'self'; img-src 'self' data:; object-src 'none'; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""Everything from this proxy, nothing inline that an injected string could become."""

PAGE = "index.html"


class DashboardService(Protocol):
    """What an app serving the dashboard provides: the coordinator, whose view it draws."""

    coordinator: Coordinator


def assets() -> dict[str, bytes]:
    """The files in ``static/`` that may be served, by name, with their content type."""
    found: dict[str, bytes] = {}
    for entry in (files(__package__) / "static").iterdir():
        suffix = entry.name[entry.name.rfind(".") :] if "." in entry.name else ""
        kind = CONTENT_TYPES.get(suffix)
        if kind is not None and entry.is_file():
            found[entry.name] = kind
    return found


def _serve(request: IRequest, name: str) -> bytes:
    kind = assets().get(name)
    if kind is None:
        raise NotFound(f"the dashboard has no file {name[:100]!r}", "no_route")
    body = (files(__package__) / "static" / name).read_bytes()
    request.setResponseCode(200)
    request.setHeader(b"content-type", kind)
    # Assets change with the package; no-cache revalidates them instead of serving stale ones.
    request.setHeader(b"cache-control", b"no-cache")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"referrer-policy", b"no-referrer")
    request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY)
    return body


def _segments(request: IRequest, nodes: int) -> int:
    """The ``?segments=`` bound, from the number of nodes (one segment each) to the limit."""
    values = request.args.get(b"segments")
    if not values:
        return max(MAX_SEGMENTS, nodes)
    raw = values[0]
    if not raw.isdigit() or len(raw) > 6 or not nodes <= int(raw) <= LIMIT_SEGMENTS:
        shown = raw[:20].decode("utf-8", "replace")
        raise InvalidRequest(
            f"?segments= must be a whole number from {nodes} (one per node) "
            f"to {LIMIT_SEGMENTS}, not {shown!r}",
            "invalid_query",
        )
    return int(raw)


def install_dashboard_routes(app: Klein) -> None:
    """Register the dashboard on ``app``; its instances must be L{DashboardService}s."""

    @app.route("/dashboard", methods=["GET"])
    def dashboard(self: DashboardService, request: IRequest) -> bytes:
        return _serve(request, PAGE)

    @app.route("/dashboard/static/<string:name>", methods=["GET"])
    def dashboard_static(self: DashboardService, request: IRequest, name: str) -> bytes:
        return _serve(request, name)

    @app.route("/dashboard/ring.json", methods=["GET"])
    def dashboard_ring(self: DashboardService, request: IRequest) -> bytes:
        view = self.coordinator.view
        bound = _segments(request, len(view.read_ring().nodes))
        return json_body(request, 200, ring_json(view, bound))
