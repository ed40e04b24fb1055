"""
In-memory HTTP tests of the proxy's Klein app, L{ProxyApp}.

The proxy must serve exactly the node's data API, so L{DataAPIContract}
runs again here, through the proxy, over a one-copy cluster where every key
lives on its owner. The rest are the proxy's own routes: ``/health``, the
checks ``/explain`` makes of its query, and the proxy's value limit. What the
routes answer when replicas fail is the coordinator's, in
C{tests.proxy.test_coordinator}; the views' payloads are in
C{tests.proxy.test_views}.
"""

from __future__ import annotations

from collections.abc import Sequence

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from shardkv.core.records import Record
from shardkv.proxy.app import ProxyApp
from shardkv.web.auth import Guard
from tests.helpers import HTTP, flusher, install_faults
from tests.proxy.cluster_case import NODES, PROXY, holders, new_cluster, proxy_http
from tests.web.contract import DataAPIContract
from tests.web.test_auth import FromPeer


class ProxyDataAPITests(DataAPIContract, SynchronousTestCase):
    """The data API, through the proxy, with every key on its owner node."""

    def setUp(self) -> None:
        self.cluster = new_cluster()
        self.http = proxy_http(self, self.cluster)

    def stored(self, key: str) -> Record | None:
        owner = self.cluster.ring.owner(key)
        self.assertIn(holders(self.cluster, key), ([], [owner]), key)
        return self.cluster.nodes[owner].store.engine.get(key)

    def limited(self, max_value_bytes: int) -> HTTP:
        app = ProxyApp(self.cluster.coordinator, max_value_bytes)
        stub = StubTreq(app.app.resource())
        return HTTP(self, stub, PROXY, flusher(self.cluster.node_http, stub))

    def relayed(self, key: str, message: str) -> str:
        """
        The proxy decides preconditions and "not found" itself, from its
        quorum read, so no node's answer is relayed: no "node X:" prefix.
        """
        return message


class ProxyRouteTests(SynchronousTestCase):
    """What only the proxy's routes do, over a one-copy cluster."""

    def setUp(self) -> None:
        self.cluster = new_cluster()
        self.http = proxy_http(self, self.cluster)
        self.faults = install_faults(self.cluster)

    def test_health(self) -> None:
        reply = self.http.get("/health")
        self.assertEqual(reply.code, 200)
        self.assertEqual(
            reply.json(),
            {
                "status": "ok",
                "role": "proxy",
                "nodes_up": 3,
                "nodes_total": 3,
                "map": {"epoch": 0, "provisional": True},
            },
        )
        self.cluster.health.mark(NODES[2], up=False, error="test")
        self.assertEqual(self.http.get("/health").json()["nodes_up"], 2)

    def test_explain_bad_keys(self) -> None:
        self.assertEqual(self.http.get("/explain").error(), (400, "invalid_key"))
        self.assertEqual(self.http.get("/explain?key=").error(), (400, "invalid_key"))
        self.assertEqual(self.http.get("/explain?key=" + "k" * 1025).error(), (414, "key_too_long"))
        reply = self.http.post_json("/explain?key=k", {})
        self.assertEqual(reply.error(), (405, "method_not_allowed"))
        self.assertEqual(reply.header("allow"), "GET, HEAD")

    def test_proxy_value_limit_sends_nothing(self) -> None:
        app = ProxyApp(self.cluster.coordinator, 4)
        stub = StubTreq(app.app.resource())
        small = HTTP(self, stub, PROXY, flusher(self.cluster.node_http, stub))
        reply = small.put("/kv/k", b"12345")
        self.assertEqual(
            (reply.code, reply.json()),
            (
                413,
                {"error": "payload_too_large", "message": "the value is 5 bytes; the limit is 4"},
            ),
        )
        self.assertEqual(holders(self.cluster, "k"), [])
        self.assertEqual(self.faults.calls, [])


# -- who may call the proxy (issue 12, section 1) ----------------------------------

TOKEN = "cluster-token-0123456789abcdef"
CLIENT_TOKEN = "client-token-0123456789abcdef"
DATA_CALLS = [
    ("PUT", "/kv/k", b"v"),
    ("GET", "/kv/k", None),
    ("DELETE", "/kv/k", None),
    ("POST", "/set", b'{"key": "k", "value": "v"}'),
    ("GET", "/get?key=k", None),
    ("POST", "/delete", b'{"key": "k"}'),
]
VIEW_CALLS = [("GET", "/cluster", None), ("GET", "/explain?key=k", None)]


class ProxyAccessTests(SynchronousTestCase):
    """The proxy's guard: /health open, data for clients, views, admin routes."""

    def setUp(self) -> None:
        self.cluster = new_cluster()

    def serve(self, guard: Guard, peer: IPv4Address | None = None) -> HTTP:
        resource: Resource = ProxyApp(self.cluster.coordinator, 1 << 20, guard).resource()
        if peer is not None:
            resource = FromPeer(resource, peer)
        stub = StubTreq(resource)
        return HTTP(self, stub, PROXY, flusher(self.cluster.node_http, stub))

    def codes(
        self, http: HTTP, calls: Sequence[tuple[str, str, bytes | None]], token: str | None = None
    ) -> list[int]:
        headers = None if token is None else {"Authorization": f"Bearer {token}"}
        replies = [http.request(method, path, body, headers) for method, path, body in calls]
        for reply in replies:
            for secret in (TOKEN, CLIENT_TOKEN):
                self.assertNotIn(secret.encode(), reply.body)
        return [reply.code for reply in replies]

    def test_with_no_tokens_data_and_views_stay_open(self) -> None:
        http = self.serve(Guard(), IPv4Address("TCP", "192.0.2.7", 1))
        self.assertEqual(self.codes(http, DATA_CALLS), [201, 200, 200, 200, 200, 200])
        self.assertEqual(self.codes(http, VIEW_CALLS), [200, 200])
        self.assertEqual(http.get("/health").code, 200)

    def test_protected_mode_admin_routes_answer_loopback_only(self) -> None:
        """Any path the proxy does not serve to clients is an admin route."""
        outside = self.serve(Guard(), IPv4Address("TCP", "192.0.2.7", 1))
        self.assertEqual(outside.get("/admin/anything").error(), (403, "forbidden"))
        self.assertEqual(self.serve(Guard()).get("/admin/anything").error(), (404, "no_route"))

    def test_client_token_guards_data_and_views(self) -> None:
        """
        With a client token, the data API and the views answer 401 without a
        token, 403 with a wrong one, and work with the client token (or the
        cluster token); /health stays open.
        """
        http = self.serve(Guard(TOKEN, CLIENT_TOKEN))
        calls = DATA_CALLS + VIEW_CALLS
        self.assertEqual(self.codes(http, calls), [401] * len(calls))
        self.assertEqual(self.codes(http, calls, "wrong-token-wrong-token"), [403] * len(calls))
        self.assertIsNone(self.cluster.nodes[self.cluster.ring.owner("k")].store.engine.get("k"))
        self.assertEqual(
            self.codes(http, calls, CLIENT_TOKEN), [201, 200, 200, 200, 200, 200, 200, 200]
        )
        self.assertEqual(self.codes(http, VIEW_CALLS, TOKEN), [200, 200])
        self.assertEqual(http.get("/health").code, 200)
        self.assertEqual(http.get("/admin", {"Authorization": f"Bearer {CLIENT_TOKEN}"}).code, 403)

    def test_cluster_token_alone_guards_views_not_data(self) -> None:
        http = self.serve(Guard(TOKEN))
        self.assertEqual(self.codes(http, DATA_CALLS), [201, 200, 200, 200, 200, 200])
        self.assertEqual(self.codes(http, VIEW_CALLS), [401, 401])
        self.assertEqual(self.codes(http, VIEW_CALLS, TOKEN), [200, 200])
        self.assertEqual(http.get("/admin").error(), (401, "unauthorized"))
