"""
In-memory HTTP tests of the dashboard's routes on the proxy
(L{shardkv.dashboard.app}): the page, its assets, the ring, and who may
read them.
"""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
from importlib.resources import files
from pathlib import Path

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from shardkv.dashboard.app import CONTENT_SECURITY_POLICY, assets
from shardkv.dashboard.arcs import ring_json
from shardkv.proxy.app import ProxyApp
from shardkv.web.auth import Access, Guard, proxy_policy
from tests.helpers import HTTP, flusher
from tests.proxy.cluster_case import PROXY, new_cluster, proxy_http
from tests.web.test_auth import FromPeer

TOKEN = "cluster-token-0123456789abcdef"
CLIENT_TOKEN = "client-token-0123456789abcdef"
STATIC = files("shardkv.dashboard") / "static"
ROOT = Path(__file__).resolve().parents[2]


def static(name: str) -> bytes:
    return (STATIC / name).read_bytes()


class DashboardRouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cluster = new_cluster()
        self.http = proxy_http(self, self.cluster)

    def test_page(self) -> None:
        """
        C{/dashboard} is the page from the package, as HTML that may load only
        what this proxy serves, never cached stale.
        """
        reply = self.http.get("/dashboard")
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.header("content-type"), "text/html; charset=utf-8")
        self.assertEqual(reply.body, static("index.html"))
        self.assertEqual(reply.header("content-security-policy"), CONTENT_SECURITY_POLICY.decode())
        self.assertEqual(reply.header("x-content-type-options"), "nosniff")
        self.assertEqual(reply.header("cache-control"), "no-cache")

    def test_assets(self) -> None:
        """Every asset is served with its own content type."""
        for name, kind in [
            ("dashboard.js", "text/javascript; charset=utf-8"),
            ("dashboard.css", "text/css; charset=utf-8"),
            ("index.html", "text/html; charset=utf-8"),
        ]:
            reply = self.http.get("/dashboard/static/" + name)
            self.assertEqual((reply.code, reply.header("content-type")), (200, kind), name)
            self.assertEqual(reply.body, static(name))

    def test_page_loads_only_package_assets(self) -> None:
        """
        Each file the page links is one the proxy serves, and no asset names
        another host: no CDN, no build step.
        """
        page = static("index.html").decode()
        linked = re.findall(r'(?:src|href)="([^"]*)"', page)
        self.assertEqual(
            sorted(linked),
            ["/dashboard/static/dashboard.css", "/dashboard/static/dashboard.js", "data:,"],
        )
        for url in linked:
            if url.startswith("/"):
                self.assertEqual(self.http.get(url).code, 200, url)
        for name in assets():
            text = static(name).decode()
            hosts = set(re.findall(r"https?://[^\s\"')]+", text))
            self.assertLessEqual(hosts, {"http://www.w3.org/2000/svg"}, name)

    def test_unknown_assets_are_json_404s(self) -> None:
        """
        A name that is not a file in static/ is a 404 in the usual error
        shape, whatever it looks like: nothing outside static/ is reachable.
        """
        for path in [
            "/dashboard/static/nope.js",
            "/dashboard/static/..%2Fapp.py",
            "/dashboard/static/../app.py",
            "/dashboard/static/%2E%2E%2Farcs.py",
            "/dashboard/static/",
            "/dashboard/static/sub/dashboard.js",
        ]:
            self.assertEqual(self.http.get(path).error(), (404, "no_route"), path)

    def test_ring(self) -> None:
        """C{/dashboard/ring.json} is the coordinator's view drawn as arcs."""
        reply = self.http.get("/dashboard/ring.json")
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.json(), ring_json(self.cluster.coordinator.view))
        self.assertEqual([n["node"] for n in reply.json()["nodes"]], list(self.cluster.ring.nodes))

    def test_ring_segments_bound(self) -> None:
        """
        C{?segments=N} draws the ring in at most N segments, from one per node
        to 512; anything else is a 400 naming the parameter.
        """
        for bound in (3, 64, 512):
            reply = self.http.get(f"/dashboard/ring.json?segments={bound}")
            self.assertEqual(reply.code, 200)
            body = reply.json()
            self.assertEqual(body, ring_json(self.cluster.coordinator.view, bound))
            self.assertLessEqual(len(body["segments"]), bound)
        for raw in ("2", "513", "0", "-1", "1e3", "abc", "%D9%A3", "9999999999"):
            reply = self.http.get(f"/dashboard/ring.json?segments={raw}")
            self.assertEqual(reply.error(), (400, "invalid_query"), raw)
            self.assertIn("?segments=", reply.json()["message"])

    def test_post_is_not_allowed(self) -> None:
        self.assertEqual(self.http.request("POST", "/dashboard", b"").code, 405)


class DashboardAccessTests(SynchronousTestCase):
    """The page and assets are open; the ring is a view, guarded like /cluster."""

    def setUp(self) -> None:
        self.cluster = new_cluster()

    def serve(self, guard: Guard, peer: IPv4Address | None = None) -> HTTP:
        resource: Resource = ProxyApp(self.cluster.coordinator, 1 << 20, guard).resource()
        if peer is not None:
            resource = FromPeer(resource, peer)
        stub = StubTreq(resource)
        return HTTP(self, stub, PROXY, flusher(self.cluster.node_http, stub))

    def test_policy(self) -> None:
        for path, access in [
            (b"/dashboard", Access.OPEN),
            (b"/dashboard/static/dashboard.js", Access.OPEN),
            (b"/dashboard/ring.json", Access.VIEW),
            (b"/dashboard/anything", Access.CLUSTER),
            (b"/dashboardx", Access.CLUSTER),
        ]:
            self.assertEqual(proxy_policy(b"GET", path), access, path)

    def test_with_tokens(self) -> None:
        """
        With both tokens set, the page and its assets load without one (a
        browser cannot send a token with a navigation) and the ring needs the
        client token, or the cluster token, as /cluster does.
        """
        http = self.serve(Guard(TOKEN, CLIENT_TOKEN), IPv4Address("TCP", "192.0.2.7", 1))
        self.assertEqual(http.get("/dashboard").code, 200)
        self.assertEqual(http.get("/dashboard/static/dashboard.js").code, 200)
        self.assertEqual(http.get("/dashboard/ring.json").error(), (401, "unauthorized"))
        for token in (CLIENT_TOKEN, TOKEN):
            reply = http.get("/dashboard/ring.json", {"Authorization": f"Bearer {token}"})
            self.assertEqual(reply.code, 200)

    def test_protected_mode(self) -> None:
        """With no tokens the dashboard is open, like /cluster, to any peer."""
        http = self.serve(Guard(), IPv4Address("TCP", "192.0.2.7", 1))
        self.assertEqual(http.get("/dashboard").code, 200)
        self.assertEqual(http.get("/dashboard/ring.json").code, 200)


class PackagingTests(SynchronousTestCase):
    def test_assets_are_package_data(self) -> None:
        """
        The page's files are exactly what pyproject ships as package data,
        so an installed (not editable) proxy serves the same page.
        """
        self.assertEqual(set(assets()), {"index.html", "dashboard.js", "dashboard.css"})
        config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
        self.assertIn("shardkv.dashboard", config["packages"])
        patterns = config["package-data"]["shardkv.dashboard"]
        for name in assets():
            self.assertTrue(any(fnmatch("static/" + name, p) for p in patterns), name)
