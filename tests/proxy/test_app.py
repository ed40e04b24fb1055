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

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.records import Record
from shardkv.proxy.app import ProxyApp
from tests.helpers import HTTP, flusher, install_faults
from tests.proxy.cluster_case import NODES, PROXY, holders, new_cluster, proxy_http
from tests.web.contract import DataAPIContract


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
            reply.json(), {"status": "ok", "role": "proxy", "nodes_up": 3, "nodes_total": 3}
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
