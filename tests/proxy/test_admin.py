"""
The admin routes (L{shardkv.proxy.admin}) over HTTP, in memory: what each answers,
every error status, and who may call them.

The proxy's data path is not involved, so the L{ProxyApp} here has no real
coordinator; what the admin does is L{tests.proxy.test_changes}, the loop
L{tests.proxy.test_rebalancer}.
"""

from __future__ import annotations

import json
from typing import Any, cast

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from shardkv.core.membership import next_phase, stage
from shardkv.errors import MapUnavailable
from shardkv.proxy.app import ProxyApp
from shardkv.web.auth import Guard
from tests.helpers import HTTP, flusher
from tests.proxy.admin_fakes import NEW, NODES, FakeNodes, MapStore, Proxy, first_map, plan_answers
from tests.web.test_auth import FromPeer

BASE = "http://127.0.0.1:8080"
TOKEN = "cluster-token-0123456789abcdef"
ADD = json.dumps({"add": [{"address": NEW, "weight": 1}]}).encode()


class AdminCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = MapStore(first_map())
        self.nodes = FakeNodes()
        plan_answers(self.nodes)
        self.proxy = Proxy(self.store, self.nodes)
        self.http = self.serve(Guard())

    def serve(
        self,
        guard: Guard,
        peer: IPv4Address | None = None,
        configured: bool = True,
        proxy: Proxy | None = None,
    ) -> HTTP:
        proxy = proxy if proxy is not None else self.proxy
        app = ProxyApp(
            cast(Any, None),
            1 << 20,
            guard,
            admin=proxy.admin if configured else None,
            rebalancer=proxy.rebalancer if configured else None,
        )
        resource: Resource = app.resource()
        if peer is not None:
            resource = FromPeer(resource, peer)
        stub = StubTreq(resource)
        return HTTP(self, stub, BASE, flusher(stub, clock=proxy.clock))


class RouteTests(AdminCase):
    def test_map(self) -> None:
        reply = self.http.get("/admin/map")
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.json(), first_map().to_json())

    def test_plan_keys_commit_rebalance(self) -> None:
        reply = self.http.request("POST", "/admin/plan", ADD)
        self.assertEqual(reply.code, 200, reply.body)
        plan = reply.json()
        self.assertEqual(plan["base_epoch"], 1)
        self.assertEqual(plan["keys_moving"], 33)

        self.nodes.keys[(NODES[0], NEW)] = {"keys": ["a", "b"], "cursor": "b"}
        reply = self.http.get(f"/admin/plan/keys?from={NODES[0]}&to={NEW}&cursor=&limit=2")
        self.assertEqual(reply.json(), {"keys": ["a", "b"], "cursor": "b"})
        self.assertEqual(self.http.get(f"/admin/plan/keys?from={NODES[0]}&to={NEW}").code, 200)

        reply = self.http.request("POST", "/admin/commit", b"")
        self.assertEqual(reply.code, 200, reply.body)
        answer = reply.json()
        self.assertEqual(answer["epoch"], 2)
        self.assertEqual(answer["map"]["move"]["phase"], "copying")
        self.assertEqual(answer["rebalance"]["state"], "copying")

        status = self.http.get("/admin/rebalance").json()
        self.assertEqual(status["state"], "copying")
        self.assertEqual(status["epoch"], 2)
        for field in (
            "keys_moved",
            "keys_total",
            "bytes_moved",
            "bytes_total",
            "keys_per_s",
            "eta_s",
            "waiting_for",
            "transfers",
        ):
            self.assertIn(field, status)
        self.assertEqual(self.http.get("/admin/map").json()["epoch"], 2)

        reply = self.http.request("POST", "/admin/abort", b"")
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual(reply.json()["map"]["move"]["phase"], "handover")

    def test_staged_plan(self) -> None:
        """GET /admin/plan shows the staged plan as POST answered it, until commit takes it."""
        reply = self.http.get("/admin/plan")
        self.assertEqual((reply.code, reply.json()["error"]), (409, "no_plan"))
        staged = self.http.request("POST", "/admin/plan", ADD).json()
        reply = self.http.get("/admin/plan")
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual(reply.json(), staged)
        self.assertEqual(self.http.request("POST", "/admin/commit", b"").code, 200)
        self.assertEqual(self.http.get("/admin/plan").code, 409)

    def test_idle(self) -> None:
        status = self.http.get("/admin/rebalance").json()
        self.assertEqual(status["state"], "idle")
        self.assertEqual(status["waiting_for"], [])

    def test_error_statuses(self) -> None:
        cases: list[tuple[str, str, bytes | None, tuple[int, str]]] = [
            ("POST", "/admin/plan", b"{", (400, "invalid_change")),
            ("POST", "/admin/plan", b'{"add": [{"address": "x"}]}', (400, "invalid_change")),
            ("POST", "/admin/plan", b'{"nodes": []}', (400, "invalid_change")),
            ("POST", "/admin/plan", b"{}", (400, "invalid_change")),
            ("POST", "/admin/plan", b'{"remove": ["127.0.0.1:1"]}', (404, "unknown_member")),
            ("POST", "/admin/plan", b'{"remove": ["127.0.0.1:8081"]}', (409, "too_few_members")),
            ("GET", f"/admin/plan/keys?from={NODES[0]}&to={NEW}", None, (409, "no_plan")),
            ("POST", "/admin/commit", b"", (409, "no_plan")),
            ("POST", "/admin/abort", b"", (409, "no_move")),
            ("DELETE", "/admin/plan", None, (405, "method_not_allowed")),
            ("POST", "/admin/map", b"", (405, "method_not_allowed")),
            ("GET", "/admin/nothing", None, (404, "no_route")),
        ]
        for method, path, body, expected in cases:
            reply = self.http.request(method, path, body)
            self.assertEqual(reply.error(), expected, (method, path, body, reply.body))

    def test_plan_keys_queries(self) -> None:
        self.http.request("POST", "/admin/plan", ADD)
        for query, expected in [
            ("", (400, "invalid_query")),
            (f"?from={NODES[0]}", (400, "invalid_query")),
            (f"?from={NODES[0]}&to={NEW}&limit=x", (400, "invalid_query")),
            (f"?from={NODES[0]}&to={NEW}&limit=0", (400, "invalid_query")),
            (f"?from={NODES[0]}&to={NEW}&limit=99999999", (400, "invalid_query")),
            (f"?from=%ff&to={NEW}", (400, "invalid_query")),
            (f"?from={NEW}&to={NODES[0]}", (404, "unknown_member")),
        ]:
            reply = self.http.get("/admin/plan/keys" + query)
            self.assertEqual(reply.error(), expected, query)

    def test_conflicts(self) -> None:
        self.nodes.down.add(NEW)
        reply = self.http.request("POST", "/admin/plan", ADD)
        self.assertEqual(reply.error(), (409, "member_unreachable"))
        self.assertEqual(reply.json()["members"], [NEW])
        self.nodes.down.clear()

        self.nodes.maps[NEW] = {"node": NEW, "learned": None, "cluster_id": "0000"}
        self.assertEqual(
            self.http.request("POST", "/admin/plan", ADD).error(), (409, "foreign_cluster")
        )
        del self.nodes.maps[NEW]

        other = self.serve(Guard(), proxy=Proxy(self.store, self.nodes))
        self.assertEqual(self.http.request("POST", "/admin/plan", ADD).code, 200)
        reweight = b'{"weights": {"127.0.0.1:8081": 2}}'
        self.assertEqual(other.request("POST", "/admin/plan", reweight).code, 200)
        self.assertEqual(self.http.request("POST", "/admin/commit", b"").code, 200)
        self.assertEqual(other.request("POST", "/admin/commit", b"").error(), (409, "map_conflict"))

        self.assertEqual(
            self.http.request("POST", "/admin/plan", ADD).error(), (409, "move_in_progress")
        )

    def test_barrier_and_too_late(self) -> None:
        self.http.request("POST", "/admin/plan", ADD)
        self.proxy.sync.behind = {NODES[2]: None}
        reply = self.http.request("POST", "/admin/commit", b"")
        self.assertEqual(reply.error(), (409, "member_unreachable"))
        self.assertEqual(reply.json()["members"], [NODES[2]])
        self.store.value = next_phase(next_phase(stage(first_map(), add=[(NEW, 1.0)])))
        self.assertEqual(
            self.http.request("POST", "/admin/abort", b"").error(), (409, "too_late_to_abort")
        )

    def test_map_unavailable(self) -> None:
        self.proxy.sync.fail = MapUnavailable("no majority of the acceptors answered")
        self.assertEqual(
            self.http.request("POST", "/admin/plan", ADD).error(), (503, "map_unavailable")
        )

    def test_not_configured(self) -> None:
        http = self.serve(Guard(), configured=False)
        for path in ("/admin/map", "/admin/rebalance"):
            self.assertEqual(http.get(path).error(), (404, "no_route"))


class AccessTests(AdminCase):
    def test_protected_mode_answers_loopback_only(self) -> None:
        outside = self.serve(Guard(), IPv4Address("TCP", "192.0.2.7", 1))
        for path in ("/admin/map", "/admin/rebalance"):
            self.assertEqual(outside.get(path).error(), (403, "forbidden"))
        self.assertEqual(outside.request("POST", "/admin/plan", ADD).error(), (403, "forbidden"))
        self.assertIsNone(self.proxy.admin.staged)
        inside = self.serve(Guard(), IPv4Address("TCP", "127.0.0.1", 1))
        self.assertEqual(inside.get("/admin/map").code, 200)

    def test_the_cluster_token(self) -> None:
        http = self.serve(Guard(TOKEN, "client-token-0123456789abcdef"))
        self.assertEqual(http.get("/admin/map").error(), (401, "unauthorized"))
        wrong = {"Authorization": "Bearer client-token-0123456789abcdef"}
        self.assertEqual(http.get("/admin/map", wrong).error(), (403, "forbidden"))
        self.assertEqual(
            http.request("POST", "/admin/commit", b"", wrong).error(), (403, "forbidden")
        )
        right = {"Authorization": f"Bearer {TOKEN}"}
        self.assertEqual(http.get("/admin/map", right).code, 200)
