"""The proxy's Klein app: the data API plus views of the cluster."""

from __future__ import annotations

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest

from shardkv.core.conditions import Precondition
from shardkv.core.records import Record
from shardkv.core.versions import Version
from shardkv.http.dataroutes import Consistency, WriteResult, install_data_routes, query_key
from shardkv.http.errors import install_error_handlers, json_body
from shardkv.proxy.coordinator import Coordinator


class ProxyApp:
    app = Klein()
    install_data_routes(app)
    install_error_handlers(app)

    def __init__(self, coordinator: Coordinator, max_value_bytes: int) -> None:
        self.coordinator = coordinator
        self.max_value_bytes = max_value_bytes

    def read(self, key: str, c: Consistency) -> Deferred[Record | None]:
        return Deferred.fromCoroutine(self.coordinator.read(key, c))

    def write(
        self, key: str, value: bytes, content_type: str, pre: Precondition, c: Consistency
    ) -> Deferred[WriteResult]:
        return Deferred.fromCoroutine(self.coordinator.write(key, value, content_type, pre, c))

    def remove(self, key: str, pre: Precondition, c: Consistency) -> Deferred[Version]:
        return Deferred.fromCoroutine(self.coordinator.remove(key, pre, c))

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        states = self.coordinator.health.states
        up = sum(1 for s in states.values() if s.status != "down")
        return json_body(
            request,
            200,
            {"status": "ok", "role": "proxy", "nodes_up": up, "nodes_total": len(states)},
        )

    @app.route("/cluster", methods=["GET"])
    def cluster(self, request: IRequest) -> bytes:
        ring = self.coordinator.ring
        shares = ring.shares()
        vnodes = ring.vnode_counts()
        nodes = [
            {
                "node": node,
                "weight": ring.weight(node),
                "vnodes": vnodes[node],
                "share": round(shares[node], 6),
                "health": self.coordinator.health.state(node).as_json(),
            }
            for node in ring.nodes
        ]
        return json_body(request, 200, {"nodes": nodes})

    @app.route("/explain", methods=["GET"])
    def explain(self, request: IRequest) -> bytes:
        key = query_key(request)
        ring = self.coordinator.ring
        placement = ring.explain(key, len(ring.nodes))
        health = self.coordinator.health
        return json_body(
            request,
            200,
            {
                "key": key,
                "hash": placement.hash,
                "position": placement.position,
                "owner": placement.owner,
                "preference_list": [
                    {"node": n, "status": health.state(n).status} for n in placement.preference_list
                ],
            },
        )
