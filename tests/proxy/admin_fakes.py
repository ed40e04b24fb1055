"""
Small fakes of the map machinery and the node calls that membership changes use.

The admin and the rebalancer talk to the cluster only through the spec's
interfaces (MapView, MapSync, MapProposer, the ReplicaClient's map and move
calls), so these tests stand in for them with a few lines each: one
L{MapStore} is "the cluster's map", which every proxy's L{FakeSync} reads
and every L{FakeProposer} compares-and-sets, exactly once per call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.testing import MemoryReactorClock

from shardkv.core.clustermap import ClusterMap, bootstrap
from shardkv.errors import NodeHasNewerMap, NodeUnreachable, ReplicaRefused
from shardkv.proxy.changes import MembershipAdmin
from shardkv.proxy.rebalancer import Rebalancer

CLUSTER_ID = "9f2c0123456789ab"
NODES = ["127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083"]
NEW = "127.0.0.1:8084"
VNODES = 64
"""Few ring points, so that the rings the plans build cost nothing."""


def first_map() -> ClusterMap:
    return bootstrap(CLUSTER_ID, dict.fromkeys(NODES, 1.0), 3, 2, 2, VNODES)


class MapStore:
    """The map the nodes agree on."""

    def __init__(self, value: ClusterMap) -> None:
        self.value = value


class FakeView:
    def __init__(self, current: ClusterMap, provisional: bool = False) -> None:
        self.current = current
        self.provisional = provisional

    @property
    def epoch(self) -> int:
        return self.current.epoch

    def install(self, m: ClusterMap) -> bool:
        if m.epoch <= self.current.epoch:
            return False
        self.current = m
        self.provisional = False
        return True


class FakeSync:
    """refresh: the store's map into the view; learned: every member at the store's epoch
    unless ``behind`` says otherwise (None: unreachable)."""

    def __init__(self, store: MapStore, view: FakeView) -> None:
        self.store = store
        self.view = view
        self.behind: dict[str, int | None] = {}
        self.refreshes = 0
        self.stale = False
        """Answer the view's map without looking (a proxy that has not heard yet)."""
        self.fail: Exception | None = None

    async def refresh(self) -> ClusterMap:
        self.refreshes += 1
        if self.fail is not None:
            raise self.fail
        if not self.stale:
            self.view.install(self.store.value)
        return self.view.current

    def agreed_for(self, epoch: int) -> float:
        """The fakes' members learn at once: the grace is always over."""
        return float("inf")

    def learned_epochs(self) -> dict[str, int | None]:
        m = self.store.value
        ids = {x.id for x in m.members} | set(self.behind)
        return {n: self.behind.get(n, m.epoch) for n in sorted(ids)}


class FakeProposer:
    def __init__(self, store: MapStore) -> None:
        self.store = store
        self.calls: list[Sequence[str]] = []
        self.fail: Exception | None = None

    async def propose(
        self, change: Callable[[ClusterMap | None], ClusterMap], acceptors: Sequence[str]
    ) -> ClusterMap:
        self.calls.append(list(acceptors))
        if self.fail is not None:
            raise self.fail
        new = change(self.store.value)
        if new.epoch != self.store.value.epoch:
            assert new.epoch == self.store.value.epoch + 1
        self.store.value = new
        return new


class FakeNodes:
    """The node calls, answering from dicts; nodes in ``down`` are unreachable."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.maps: dict[str, dict[str, Any]] = {}
        self.plans: dict[str, dict[str, Any]] = {}
        self.keys: dict[tuple[str, str], dict[str, Any]] = {}
        self.moves: dict[str, dict[str, Any]] = {}
        self.refuse: dict[str, Exception] = {}
        self.calls: list[tuple[str, str]] = []

    def _check(self, what: str, node: str) -> None:
        self.calls.append((what, node))
        if node in self.down:
            raise NodeUnreachable(node, "connection refused", sent=False)
        if node in self.refuse:
            raise self.refuse[node]

    async def get_map(self, node: str) -> dict[str, Any]:
        self._check("map", node)
        return self.maps.get(
            node, {"node": node, "learned": None, "accepted_epoch": None, "cluster_id": None}
        )

    async def plan(self, node: str, map_json: dict[str, Any]) -> dict[str, Any]:
        self._check("plan", node)
        ClusterMap.from_json(map_json)
        return self.plans.get(node, {"node": node, "pairs": [], "keys_scanned": 0})

    async def plan_keys(
        self, node: str, map_json: dict[str, Any], to: str, cursor: str, limit: int
    ) -> dict[str, Any]:
        self._check("keys", node)
        return self.keys.get((node, to), {"keys": [], "cursor": None}) | {"limit": limit}

    async def move_status(self, node: str) -> dict[str, Any]:
        self._check("move", node)
        return self.moves[node]

    def report(
        self,
        node: str,
        epoch: int,
        stream: str = "idle",
        cleanup: str = "idle",
        keys: int = 0,
        bytes_: int = 0,
    ) -> None:
        self.moves[node] = {
            "node": node,
            "epoch": epoch,
            "phase": None,
            "stream": {
                "state": stream,
                "keys_scanned": keys,
                "keys_moved": keys,
                "bytes_moved": bytes_,
                "copies_sent": keys,
                "last_error": None,
            },
            "cleanup": {"state": cleanup, "keys_deleted": 0, "bytes_deleted": 0},
        }


def stale(node: str) -> NodeHasNewerMap:
    return NodeHasNewerMap(node, "stale epoch", {})


def foreign(node: str) -> ReplicaRefused:
    return ReplicaRefused(node, "foreign_cluster", "the node holds a map of cluster 0000")


class Proxy:
    """One proxy's admin and rebalancer over a shared store and nodes."""

    def __init__(
        self,
        store: MapStore,
        nodes: FakeNodes,
        clock: MemoryReactorClock | None = None,
        rate: int = 0,
    ) -> None:
        self.clock = clock if clock is not None else MemoryReactorClock()
        self.view = FakeView(store.value)
        self.sync = FakeSync(store, self.view)
        self.proposer = FakeProposer(store)
        self.rebalancer = Rebalancer(self.view, self.sync, self.proposer, nodes, self.clock)
        self.admin = MembershipAdmin(
            self.view,
            self.sync,
            self.proposer,
            nodes,
            self.clock,
            rate=rate,
            status=self.rebalancer.status,
        )


def plan_answers(nodes: FakeNodes, to: str = NEW) -> None:
    """Each old node sends 10 keys (1000 bytes) to ``to`` out of 100 it holds."""
    for i, n in enumerate(NODES):
        nodes.plans[n] = {
            "node": n,
            "pairs": [{"from": n, "to": to, "keys": 10 + i, "bytes": 1000 + i}],
            "keys_scanned": 100,
        }
