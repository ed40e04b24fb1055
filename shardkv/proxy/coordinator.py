"""The coordinator: turns a client request into calls to the right nodes.

It asks the ring where a key lives, skips nodes known to be down, and turns
node failures into answers a client can act on:

- 503 ``node_unavailable``: the owner is known to be down (nothing was sent);
- 502 ``node_unreachable``: the owner refused the connection (nothing was
  stored) or broke it mid-request (``"outcome": "unknown"`` for writes);
- 504 ``node_timeout``: no answer in time; for a write the outcome is unknown,
  never reported as a failure.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from shardkv.core.conditions import Precondition
from shardkv.core.placement import Ring
from shardkv.core.records import Record
from shardkv.core.versions import Version
from shardkv.http.dataroutes import Consistency, WriteResult
from shardkv.http.errors import ApiError
from shardkv.http.nodeclient import NodeClient, NodeTimeout, NodeUnreachable
from shardkv.proxy.health import HealthMonitor

T = TypeVar("T")


class Coordinator:
    def __init__(self, ring: Ring, nodes: NodeClient, health: HealthMonitor) -> None:
        self.ring = ring
        self.nodes = nodes
        self.health = health

    def owner(self, key: str) -> str:
        node = self.ring.owner(key)
        if self.health.is_down(node):
            state = self.health.state(node)
            raise ApiError(
                503,
                "node_unavailable",
                f"node {node}, which owns this key, is down: "
                f"{state.error or 'it failed its health check'}",
                extra={"node": node},
            )
        return node

    async def _forward(self, node: str, call: Awaitable[T], write: bool) -> T:
        try:
            result = await call
        except NodeUnreachable as e:
            self.health.mark(node, up=False, error=e.reason)
            extra: dict[str, object] = {"node": node}
            if write:
                extra["outcome"] = "unknown" if e.sent else "not_applied"
            raise ApiError(502, "node_unreachable", str(e), extra=extra) from None
        except NodeTimeout as e:
            extra = {"node": node}
            message = str(e)
            if write:
                extra["outcome"] = "unknown"
                message += "; the write may or may not have been applied"
            raise ApiError(504, "node_timeout", message, extra=extra) from None
        return result

    async def read(self, key: str, c: Consistency) -> Record | None:
        node = self.owner(key)
        return await self._forward(node, self.nodes.get(node, key), write=False)

    async def write(
        self, key: str, value: bytes, content_type: str, pre: Precondition, c: Consistency
    ) -> WriteResult:
        node = self.owner(key)
        call = self.nodes.put(node, key, value, content_type, pre)
        return await self._forward(node, call, write=True)

    async def remove(self, key: str, pre: Precondition, c: Consistency) -> Version:
        node = self.owner(key)
        return await self._forward(node, self.nodes.delete(node, key, pre), write=True)
