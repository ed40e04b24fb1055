"""In-memory stand-ins for running nodes and proxies without sockets.

A whole cluster runs inside one test: every node is a real L{NodeApp} on a
memory engine, the proxy reaches them through treq's C{StubTreq}, and time is
a C{MemoryReactorClock}. L{FaultyHTTP} injects refused and hung connections.
Like C{twisted.internet.testing}, this is public so that tests of code built
on shardkv can use it too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource

from shardkv.core.placement import Ring
from shardkv.core.quorum import QuorumSizes
from shardkv.core.versions import VersionClock
from shardkv.node.app import NodeApp
from shardkv.node.members import Members
from shardkv.node.store import NodeStore
from shardkv.proxy.app import ProxyApp
from shardkv.proxy.coordinator import Coordinator
from shardkv.proxy.health import HealthMonitor
from shardkv.proxy.hints import HintKeeper
from shardkv.replica.client import ReplicaClient
from shardkv.storage.memory import MemoryEngine
from shardkv.web.dataroutes import DEFAULT_MAX_VALUE_BYTES


def make_node(
    node_id: str,
    clock: MemoryReactorClock,
    offset_ms: int = 0,
    members: Iterable[str] | None = None,
) -> NodeApp:
    """A node on a memory engine; ``members`` as ``twistd shardkv cluster`` would give them."""

    def now_ms() -> int:
        return int(clock.seconds() * 1000) + offset_ms

    versions = VersionClock(node_id, now_ms)
    store = NodeStore(
        node_id, MemoryEngine(), versions, DEFAULT_MAX_VALUE_BYTES, now_ms, Members(members)
    )
    return NodeApp(store)


PROXY_WRITER = "proxy-test"


class HostDispatch(Resource):
    """Routes a request to a resource by its full Host header (with the port).

    twisted.web's NameVirtualHost drops the port, and our nodes differ only
    by port.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hosts: dict[bytes, Resource] = {}

    def getChildWithDefault(self, path: bytes, request: Any) -> Resource:
        host = request.getHeader(b"host") or b""
        request.postpath.insert(0, request.prepath.pop())
        return self.hosts[host]


class FaultyHTTP:
    """Wraps an HTTP client and injects the failures a real network gives.

    Nodes named in ``down`` refuse connections (nothing is sent); nodes in
    ``hung`` accept the request and never answer, until the caller's timeout
    cancels it.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down: set[str] = set()
        self.hung: set[str] = set()

    def request(self, method: str, url: bytes, **kwargs: Any) -> Deferred[Any]:
        host = url.split(b"/")[2].decode()
        if host in self.down:
            return fail(ConnectionRefusedError(f"{host} is down"))
        if host in self.hung:
            return Deferred(lambda d: d.errback(ResponseNeverReceived([Failure(CancelledError())])))
        answer: Deferred[Any] = self.inner.request(method, url, **kwargs)
        return answer


class MemoryCluster:
    """Nodes, proxy and clock wired together in memory."""

    def __init__(
        self,
        node_ids: Iterable[str],
        timeout: float = 2.0,
        *,
        replicas: int = 3,
        r: int = 2,
        w: int = 2,
        pipeline_depth: int = 1,
        ring: Ring | None = None,
    ) -> None:
        """``ring`` may be passed in to share one between clusters (building one
        takes a few tenths of a second); it must place exactly ``node_ids``."""
        self.clock = MemoryReactorClock()
        node_ids = list(node_ids)
        self.nodes = {n: make_node(n, self.clock, members=node_ids) for n in node_ids}
        self.dispatch = HostDispatch()
        for node_id, app in self.nodes.items():
            self.dispatch.hosts[node_id.encode()] = app.resource()
        self.node_http = StubTreq(self.dispatch)
        self.network = FaultyHTTP(self.node_http)
        self.replica_client = ReplicaClient(self.network, self.clock, timeout, pipeline_depth)
        self.ring = ring if ring is not None else Ring(list(self.nodes))
        if set(self.ring.nodes) != set(self.nodes):
            raise ValueError(f"the ring places {sorted(self.ring.nodes)}, not {sorted(self.nodes)}")
        self.health = HealthMonitor(self.ring.nodes, self.replica_client.health, self.clock)
        versions = VersionClock(PROXY_WRITER, lambda: int(self.clock.seconds() * 1000))
        self.hints = HintKeeper(self.ring, self.replica_client, self.health)
        self.coordinator = Coordinator(
            self.ring,
            self.replica_client,
            self.health,
            versions,
            self.hints,
            QuorumSizes(replicas, r, w),
        )
        self.proxy_app = ProxyApp(self.coordinator, DEFAULT_MAX_VALUE_BYTES)
        self.proxy = StubTreq(self.proxy_app.resource())
