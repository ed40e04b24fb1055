"""The proxy's Klein app: the data API through the coordinator, plus views of the cluster.

Serve L{ProxyApp.resource}: it puts the guard (L{shardkv.web.auth}) in front of
every route. ``/health`` is open; the data API needs the client token when one
is set; ``/cluster`` and ``/explain`` need the client token when one is set,
else the cluster token when one is set; any other path is an admin route,
``/admin/*`` (L{shardkv.proxy.admin}) among them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from shardkv.core.conditions import Precondition
from shardkv.core.quorum import Consistency
from shardkv.core.records import Record
from shardkv.core.versions import Version
from shardkv.core.writes import WriteResult
from shardkv.dashboard.app import install_dashboard_routes
from shardkv.proxy.admin import install_admin_routes
from shardkv.proxy.coordinator import Coordinator
from shardkv.proxy.views import cluster_view, explain_key
from shardkv.web.auth import Guard, GuardedResource, proxy_policy
from shardkv.web.dataroutes import consistency, install_data_routes, query_key
from shardkv.web.errors import install_error_handlers, json_body
from shardkv.web.metricsroutes import RoutedKlein, install_metrics_routes
from shardkv.web.openapi import install_openapi_routes
from shardkv.web.reloadroute import install_reload_routes

if TYPE_CHECKING:
    from shardkv.metrics import ProxyMetrics
    from shardkv.proxy.changes import MembershipAdmin
    from shardkv.proxy.rebalancer import Rebalancer


class QuorumBackend:
    """The coordinator at one request's quorum settings, as the data routes call it."""

    __slots__ = ("c", "coordinator")

    def __init__(self, coordinator: Coordinator, c: Consistency) -> None:
        self.coordinator = coordinator
        self.c = c

    def read(self, key: str) -> Deferred[Record | None]:
        return Deferred.fromCoroutine(self.coordinator.read(key, self.c))

    def write(
        self, key: str, value: bytes, content_type: str, pre: Precondition
    ) -> Deferred[WriteResult]:
        return Deferred.fromCoroutine(self.coordinator.write(key, value, content_type, pre, self.c))

    def remove(self, key: str, pre: Precondition) -> Deferred[Version]:
        return Deferred.fromCoroutine(self.coordinator.remove(key, pre, self.c))


class ProxyApp:
    app = RoutedKlein()
    install_metrics_routes(app)
    install_data_routes(app)
    install_admin_routes(app)
    install_reload_routes(app)
    install_dashboard_routes(app)
    install_openapi_routes(app)
    install_error_handlers(app)

    def __init__(
        self,
        coordinator: Coordinator,
        max_value_bytes: int,
        guard: Guard | None = None,
        admin: MembershipAdmin | None = None,
        rebalancer: Rebalancer | None = None,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        """Without a ``guard``: no tokens, admin routes for loopback peers only.
        Without ``admin`` / ``rebalancer`` their routes answer 404; without
        ``metrics``, ``/metrics`` does."""
        self.coordinator = coordinator
        self.max_value_bytes = max_value_bytes
        self.guard = guard if guard is not None else Guard()
        self.admin = admin
        self.rebalancer = rebalancer
        self.metrics = metrics

    def resource(self) -> Resource:
        """The app behind its guard: what a proxy serves."""
        return GuardedResource(self.app.resource(), self.guard, proxy_policy)

    def backend(self, request: IRequest) -> QuorumBackend:
        return QuorumBackend(self.coordinator, consistency(request))

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        states = self.coordinator.health.states
        up = sum(1 for s in states.values() if s.status != "down")
        return json_body(
            request,
            200,
            {
                "status": "ok",
                "role": "proxy",
                "nodes_up": up,
                "nodes_total": len(states),
                "map": self.coordinator.view.health_json(),
            },
        )

    @app.route("/cluster", methods=["GET"])
    def cluster(self, request: IRequest) -> bytes:
        c = self.coordinator
        rebalance = None if self.rebalancer is None else self.rebalancer.status
        view = cluster_view(
            c.ring,
            c.health,
            c.replica_client,
            c.hints,
            c.quorum_sizes(Consistency()),
            view=c.view,
            rebalance=rebalance,
        )
        return json_body(request, 200, view)

    @app.route("/explain", methods=["GET"])
    async def explain(self, request: IRequest) -> bytes:
        key = query_key(request)
        c = self.coordinator
        n = c.quorum_sizes(Consistency()).n
        view = await explain_key(key, c.ring, c.health, c.replica_client, n)
        return json_body(request, 200, view)
