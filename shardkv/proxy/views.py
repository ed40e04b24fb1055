"""What ``/cluster`` and ``/explain`` show: the proxy's view of the cluster and of one key.

Built from the parts' public state (the ring, health, the replica client's
pipelines, the hint queue), so that the views never depend on how the
coordinator works inside.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults

from shardkv.cluster.view import MapView
from shardkv.core.placement import Ring
from shardkv.core.quorum import QuorumSizes
from shardkv.proxy.health import HealthMonitor
from shardkv.proxy.hints import HintKeeper
from shardkv.replica.client import ReplicaClient


def cluster_view(
    ring: Ring,
    health: HealthMonitor,
    replica_client: ReplicaClient,
    hints: HintKeeper,
    sizes: QuorumSizes,
    view: MapView | None = None,
    rebalance: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``view``: the map (its epoch and members are shown); ``rebalance``: the
    progress of a move, as ``GET /admin/rebalance`` gives it."""
    shares = ring.shares()
    vnodes = ring.vnode_counts()
    nodes = [
        {
            "node": node,
            "weight": ring.weight(node),
            "vnodes": vnodes[node],
            "share": round(shares[node], 6),
            "health": health.state(node).as_json(),
            "hints_waiting": health.hints_waiting(node),
            "pipelines": replica_client.pipeline_stats(node),
        }
        for node in ring.nodes
    ]
    result: dict[str, Any] = {
        "replicas": sizes.n,
        "r": sizes.r,
        "w": sizes.w,
        "undelivered": len(hints.undelivered),
        "nodes": nodes,
    }
    if view is not None:
        m = view.current
        result["epoch"] = m.epoch
        result["provisional"] = view.provisional
        result["phase"] = None if m.move is None else m.move.phase.value
        result["members"] = [
            {
                "id": member.id,
                "address": member.address,
                "weight": member.weight,
                "state": member.state.value,
                "health": health.state(member.id).as_json(),
            }
            for member in m.members
        ]
    if rebalance is not None:
        result["rebalance"] = rebalance()
    return result


async def explain_key(
    key: str, ring: Ring, health: HealthMonitor, replica_client: ReplicaClient, n: int
) -> dict[str, Any]:
    """Where ``key`` lives, and what each of its replicas holds right now."""
    placement = ring.explain(key, len(ring.nodes))
    replicas = list(placement.preference_list[:n])
    states = await gatherResults(
        [Deferred.fromCoroutine(_replica_state(replica_client, node, key)) for node in replicas]
    )
    return {
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
    }


async def _replica_state(replica_client: ReplicaClient, node: str, key: str) -> dict[str, Any]:
    try:
        record = await replica_client.replica_get(node, key)
    except Exception as e:  # an explanation reports failures, it does not fail
        return {"version": None, "error": str(e)}
    if record is None:
        return {"version": None}
    return {"version": str(record.version), "tombstone": record.tombstone}
