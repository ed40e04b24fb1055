"""The proxy's Klein app: the data API plus views of the cluster."""

from __future__ import annotations

from klein import Klein
from twisted.internet.defer import Deferred, gatherResults
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
        coordinator = self.coordinator
        ring, health = coordinator.ring, coordinator.health
        shares = ring.shares()
        vnodes = ring.vnode_counts()
        n, r, w = coordinator.levels(Consistency())
        nodes = [
            {
                "node": node,
                "weight": ring.weight(node),
                "vnodes": vnodes[node],
                "share": round(shares[node], 6),
                "health": health.state(node).as_json(),
                "hints_waiting": health.hints_waiting(node),
                "pipelines": coordinator.nodes.pipeline_stats(node),
            }
            for node in ring.nodes
        ]
        payload = {
            "replicas": n,
            "r": r,
            "w": w,
            "undelivered": len(coordinator.undelivered),
            "nodes": nodes,
        }
        return json_body(request, 200, payload)

    @app.route("/explain", methods=["GET"])
    async def explain(self, request: IRequest) -> bytes:
        """Where a key lives, and what each of its replicas holds right now."""
        key = query_key(request)
        coordinator = self.coordinator
        ring, health = coordinator.ring, coordinator.health
        n, _, _ = coordinator.levels(Consistency())
        placement = ring.explain(key, len(ring.nodes))
        replicas = list(placement.preference_list[:n])
        states = await gatherResults(
            [Deferred.fromCoroutine(self._replica_state(node, key)) for node in replicas]
        )
        return json_body(
            request,
            200,
            {
                "key": key,
                "hash": placement.hash,
                "position": placement.position,
                "token": placement.token,
                "owner": placement.owner,
                "replicas": [
                    {"node": node, "status": health.state(node).status, **state}
                    for node, state in zip(replicas, states, strict=True)
                ],
                "preference_list": list(placement.preference_list),
            },
        )

    async def _replica_state(self, node: str, key: str) -> dict[str, object]:
        try:
            record = await self.coordinator.nodes.replica_get(node, key)
        except Exception as e:  # an explanation reports failures, it does not fail
            return {"version": None, "error": str(e)}
        if record is None:
            return {"version": None}
        return {"version": str(record.version), "tombstone": record.tombstone}
