"""
Clusters in memory for the proxy's tests, and base classes to drive them.

Two kinds of cluster. L{new_cluster} keeps one copy of each key (N=R=W=1),
so a key lives on exactly its owner and routing is easy to see; L{OwnerCase}
drives one over a failing owner. L{ClusterCase} builds a fresh replicated
cluster (N=3, R=W=2 unless a row says otherwise) per table row, of 3 or 5
nodes. No reactor and no sockets: the network is C{StubTreq}, the failures
come from C{cluster.network} (refused or hung nodes) and L{NetworkFaults}
(one phase of a write failing, slow replicas, a log of what was sent), and
time from C{cluster.clock}.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.records import Record
from shardkv.core.versions import Version
from shardkv.testing.memory import MemoryCluster
from tests.helpers import (
    HTTP,
    NODES_3,
    NODES_5,
    Call,
    NetworkFaults,
    Reply,
    answered,
    check_health,
    cluster_http,
    flusher,
    install_faults,
    memory_cluster,
    settle,
)

NODES = ["127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083"]
"""The nodes of a one-copy cluster (L{new_cluster})."""
TIMEOUT = 2.0
PROXY = "http://127.0.0.1:8080"
UNKNOWN = {"status": "unknown", "since": None, "last_check": None, "error": None}
CLUSTERS = {3: NODES_3, 5: NODES_5}
"""The nodes of a replicated cluster (L{ClusterCase.use}) by its size."""
POSITIONS = (0, 1, 2)  # a home replica's place in the key's preference list


def new_cluster(replicas: int = 1) -> MemoryCluster:
    """
    A fresh in-memory cluster of L{NODES}, keeping ``replicas`` copies of each
    key and answering after one reply (R=W=1).

    Tests of routing and of a failing owner keep one copy: each key then
    lives on exactly its owner. Replicated clusters come from L{ClusterCase}.

    Every cluster shares one ring (building one takes ~0.3 s); each still
    gets fresh nodes, health and clock.
    """
    return memory_cluster(NODES, TIMEOUT, replicas=replicas, r=1, w=1)


def proxy_http(case: SynchronousTestCase, cluster: MemoryCluster) -> HTTP:
    # Not cluster.settle: it stops as soon as d.called, which a treq Deferred
    # waiting on an inner one already is, so a reply written after the clock
    # moved would never be flushed to the client.
    return HTTP(case, cluster.proxy, PROXY, flusher(cluster.node_http, cluster.proxy))


def holders(cluster: MemoryCluster, key: str) -> list[str]:
    """The nodes whose engines hold any record (tombstones too) for C{key}."""
    return [n for n, app in cluster.nodes.items() if app.store.engine.get(key) is not None]


def hint_holders(cluster: MemoryCluster) -> dict[str, dict[str, int]]:
    """Node -> its waiting hints per target node, for nodes that keep any."""
    counts = {n: app.store.engine.hint_counts() for n, app in cluster.nodes.items()}
    return {n: c for n, c in counts.items() if c}


def key_owned_by(cluster: MemoryCluster, node: str, prefix: str = "key") -> str:
    """The first key C{prefix}-0, C{prefix}-1, ... that C{node} owns."""
    for i in range(10_000):
        key = f"{prefix}-{i}"
        if cluster.ring.owner(key) == node:
            return key
    raise AssertionError(f"no key owned by {node}")


def kv(key: str) -> str:
    return "/kv/" + quote(key, safe="")


class ClusterCase(SynchronousTestCase):
    """A fresh cluster per table row, with helpers to drive it."""

    cluster: MemoryCluster
    http: HTTP
    faults: NetworkFaults

    def use(self, size: int, **levels: int) -> MemoryCluster:
        self.cluster = memory_cluster(CLUSTERS[size], TIMEOUT, **levels)
        self.http = cluster_http(self, self.cluster)
        self.faults = install_faults(self.cluster)
        return self.cluster

    def down(self, *nodes: str, known: bool = True) -> None:
        """Crash C{nodes} (connections refused); with C{known}, let health checks see it."""
        self.cluster.network.down.update(nodes)
        if known:
            check_health(self, self.cluster)

    def restart(self, *nodes: str) -> None:
        """Bring C{nodes} back (refused or hung) and run a health check round."""
        self.cluster.network.down.difference_update(nodes)
        self.cluster.network.hung.difference_update(nodes)
        check_health(self, self.cluster)

    def now(self, method: str, path: str, body: bytes | None = None, **headers: str) -> Reply:
        """A request that must be answered without the clock moving."""
        d = self.http.start(method, path, body, headers)
        self.http.pump(d)
        self.assertTrue(answered(d), f"{method} {path} waited for a slow replica")
        return self.successResultOf(d)

    def hedged(self, method: str, path: str, body: bytes | None = None, **headers: str) -> Reply:
        """A request that must be answered once the clock moved one hedge delay at most
        (a hedged read whose first R replicas include a hung or slow one asks the
        others then), and not later."""
        d = self.http.start(method, path, body, headers)
        self.http.pump(d)
        if not answered(d):
            self.cluster.clock.advance(self.cluster.coordinator.hedge_delay())
            self.http.pump(d)
        self.assertTrue(answered(d), f"{method} {path} waited longer than a hedge delay")
        return self.successResultOf(d)

    def hedge_delay(self) -> float:
        return self.cluster.coordinator.hedge_delay()

    def after_timeout(
        self, method: str, path: str, body: bytes | None = None, **headers: str
    ) -> Reply:
        """A request that is answered exactly when replica calls time out (counted
        from the hedge, if its read had to hedge first)."""
        d = self.http.start(method, path, body, headers)
        self.http.pump(d)
        self.assertNoResult(d)
        self.cluster.clock.advance(self.hedge_delay())
        self.http.pump(d)
        self.assertNoResult(d)
        self.cluster.clock.advance(TIMEOUT - self.hedge_delay() - 0.01)
        self.http.pump(d)
        self.assertNoResult(d)
        self.cluster.clock.advance(self.hedge_delay() + 0.02)
        return self.http.finish(d)

    def call(self, method: str, path: str, body: bytes | None = None, **headers: str) -> Reply:
        """A request, moving the clock past a hedge delay, then past the timeout, as
        long as it has to wait (a write's version read may hedge before its write)."""
        d = self.http.start(method, path, body, headers)
        self.http.pump(d)
        for _ in range(3):
            if answered(d):
                break
            self.cluster.clock.advance(self.cluster.coordinator.hedge_delay())
            self.http.pump(d)
            if answered(d):
                break
            self.cluster.clock.advance(TIMEOUT + 0.01)
            self.http.pump(d)
        reply = self.http.finish(d)
        settle(self.cluster)
        return reply

    def replica_reads(self, key: str) -> list[Call]:
        """The replica reads of ``key`` sent so far, in order."""
        path = "/replica/kv/" + quote(key, safe="")
        return [c for c in self.faults.calls if c.method == "GET" and c.path == path]

    def stored(self, node: str, key: str) -> Record | None:
        return self.cluster.nodes[node].store.engine.get(key)

    def versions(self, key: str, nodes: list[str]) -> list[Version | None]:
        records = [self.stored(n, key) for n in nodes]
        return [r.version if r else None for r in records]

    def hint_record(self, stand_in: str, home: str, key: str) -> Record | None:
        return dict(self.cluster.nodes[stand_in].store.engine.hints(home, 10_000)).get(key)

    def no_hints(self) -> None:
        counts = {n: app.store.engine.hint_counts() for n, app in self.cluster.nodes.items()}
        self.assertEqual({n: c for n, c in counts.items() if c}, {})


def version_of(reply: Reply) -> Version:
    return Version.parse(reply.json()["version"])


class OwnerCase(SynchronousTestCase):
    """
    A one-copy cluster with one node, C{self.node}, about to fail.

    With one copy a key's quorum is its owner alone, so a refused or hung
    owner means R (or W) cannot be had: 503 ``insufficient_replicas`` or 504
    ``replica_timeout``, saying how many replicas answered and how many were
    needed. C{self.key} is a key it owns; C{self.others} one key owned by
    each other node.
    """

    def setUp(self) -> None:
        self.cluster = new_cluster()
        self.http = proxy_http(self, self.cluster)
        self.faults: NetworkFaults = install_faults(self.cluster)
        self.node = NODES[1]
        self.key = key_owned_by(self.cluster, self.node)
        self.path = "/kv/" + quote(self.key, safe="")
        self.others = {n: key_owned_by(self.cluster, n) for n in NODES if n != self.node}

    def refuse(self) -> None:
        self.cluster.network.down.add(self.node)

    def assertBody(self, reply: Reply, status: int, body: Mapping[str, object]) -> None:
        self.assertEqual((reply.code, reply.json()), (status, body))

    def assertFields(self, reply: Reply, status: int, error: str, **fields: object) -> None:
        """C{reply} is this JSON error and its body has at least these fields."""
        self.assertEqual(reply.error(), (status, error), reply.body)
        payload = reply.json()
        self.assertEqual({name: payload.get(name) for name in fields}, fields, payload)

    def assertQuorumError(
        self, reply: Reply, status: int, error: str, message: str, **fields: object
    ) -> None:
        """
        C{reply} is exactly this JSON error: these fields and no others, and
        a message that starts with C{message} (it may go on to name nodes).
        """
        self.assertEqual(reply.error(), (status, error), reply.body)
        payload = dict(reply.json())
        self.assertTrue(payload.pop("message").startswith(message), reply.body)
        self.assertEqual(payload, {"error": error, **fields})

    def refused_error(self) -> str:
        return (
            f"node {self.node} is unreachable: "
            f"Connection was refused by other side: {self.node} is down."
        )

    def assertUnread(self, reply: Reply) -> None:
        """C{reply} is the answer when the owner could not be read."""
        self.assertQuorumError(
            reply,
            503,
            "insufficient_replicas",
            "only 0 of the 1 replicas needed could be read",
            replied=0,
            required=1,
            failed=[self.node],
        )

    def writes(self) -> list[tuple[str, str, bytes | None]]:
        """One request of each kind that writes the key (PUT, /set, DELETE)."""
        return [
            ("PUT", self.path, b"v"),
            ("POST", "/set", f'{{"key": "{self.key}", "value": "v"}}'.encode()),
            ("DELETE", self.path, None),
        ]

    def hang(self, method: str, path: str, body: bytes | None = None) -> Reply:
        """Send a request to the hung node and time it out; return the reply."""
        if not self.faults.hang_writes:
            self.cluster.network.hung.add(self.node)
        return self.http.at_timeout(self.cluster.clock, TIMEOUT, method, path, body)
