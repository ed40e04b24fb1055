"""
Small helpers for the in-memory HTTP tests: no reactor, no sockets.

L{HTTP} drives a C{StubTreq} synchronously and hands back a L{Reply} whose
body has already been read, so a test reads as a list of requests and the
exact answers expected.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived

from shardkv.client import api
from shardkv.core.placement import Ring
from shardkv.core.records import Record
from shardkv.node.handoff import HintHandoff
from shardkv.testing.memory import MemoryCluster

T = TypeVar("T")

Pump = Callable[[Deferred[Any]], None]
"""Moves in-memory HTTP along until the given Deferred fires (or nothing moves)."""


class Reply(api.Reply):
    """An API reply as the in-memory tests read it.

    C{code} as treq calls it, and a stricter C{json()}: a test reading JSON
    also checks that the server said it was JSON. C{header()} fails if the
    header repeats, and C{error()} checks the error's shape.
    """

    @property
    def code(self) -> int:
        return self.status

    def json(self) -> Any:
        """The body as JSON; fails unless the reply says it is JSON."""
        assert self.header("content-type") == "application/json", (
            f"HTTP {self.code} is {self.header('content-type')!r}, not JSON: {self.body[:200]!r}"
        )
        return super().json()


def flusher(*stubs: StubTreq, clock: MemoryReactorClock | None = None) -> Pump:
    """
    A L{Pump} that flushes C{stubs} until the Deferred has a result.

    C{Deferred.called} is not the test: a Deferred waiting on a Deferred its
    callback returned is already "called" but has no result yet (treq's
    response Deferreds are like that), so a result is recorded instead.

    With C{clock}, it also runs the reactor turns that are due (work done a
    step per turn, as a plan's ring builds are); only rounds with none due
    count towards the 50 it tries.
    """

    def pump(d: Deferred[Any]) -> None:
        done: list[bool] = []

        def seen(result: object) -> object:
            done.append(True)
            return result

        d.addBoth(seen)
        idle = 0
        while not done and idle < 50:
            for stub in stubs:
                stub.flush()
            if clock is not None and any(c.getTime() <= clock.seconds() for c in clock.calls):
                clock.advance(0)
            else:
                idle += 1

    return pump


HeaderValues = api.HeaderValues


class HTTP:
    """Synchronous requests to an in-memory HTTP server.

    A thin wrapper: L{shardkv.client.api.Client} over the C{StubTreq} sends
    each request, and C{pump} moves it along. The client's deadlines run on
    a clock of their own that never moves, so no request times out here
    however far a test advances the cluster's clock.
    """

    def __init__(self, case: SynchronousTestCase, stub: StubTreq, base: str, pump: Pump) -> None:
        self.case = case
        self.stub: Any = stub  # StubTreq builds its request methods at runtime
        self.base = base
        self.pump = pump
        self.client = api.Client(stub, base, reactor=Clock())

    def start(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: HeaderValues | None = None,
    ) -> Deferred[Reply]:
        """Send a request; the Deferred fires with the whole L{Reply}."""
        d = self.client.request(method, path, body, headers=headers)
        return d.addCallback(lambda r: Reply(r.status, r.headers, r.body, r.all_headers))

    def finish(self, d: Deferred[Reply]) -> Reply:
        """Pump until C{d} fires and return its reply."""
        self.pump(d)
        return self.case.successResultOf(d)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: HeaderValues | None = None,
    ) -> Reply:
        return self.finish(self.start(method, path, body, headers))

    def at_timeout(
        self, clock: MemoryReactorClock, timeout: float, method: str, path: str, body: bytes | None
    ) -> Reply:
        """A request that is still waiting just before ``timeout`` and answered just after."""
        d = self.start(method, path, body)
        self.pump(d)
        self.case.assertNoResult(d)
        clock.advance(timeout - 0.01)
        self.pump(d)
        self.case.assertNoResult(d)
        clock.advance(0.02)
        return self.finish(d)

    def get(self, path: str, headers: HeaderValues | None = None) -> Reply:
        return self.request("GET", path, headers=headers)

    def head(self, path: str, headers: HeaderValues | None = None) -> Reply:
        return self.request("HEAD", path, headers=headers)

    def put(self, path: str, body: bytes, headers: HeaderValues | None = None) -> Reply:
        return self.request("PUT", path, body, headers)

    def delete(self, path: str, headers: HeaderValues | None = None) -> Reply:
        return self.request("DELETE", path, headers=headers)

    def post_json(self, path: str, payload: object) -> Reply:
        body = json.dumps(payload).encode("utf-8")
        return self.request("POST", path, body, {"Content-Type": "application/json"})

    def post_raw(self, path: str, body: bytes) -> Reply:
        return self.request("POST", path, body, {"Content-Type": "application/json"})


# -- in-memory clusters ------------------------------------------------------

PROXY_URL = "http://127.0.0.1:8080"
NODES_3 = [f"127.0.0.1:{port}" for port in range(8081, 8084)]
NODES_5 = [f"127.0.0.1:{port}" for port in range(8081, 8086)]


@functools.cache
def shared_ring(nodes: tuple[str, ...]) -> Ring:
    """
    One L{Ring} per node set, shared by every cluster of those nodes.

    Building a ring takes ~0.3 s; rings are immutable values, so sharing one
    keeps each in-memory cluster at a few tens of milliseconds.
    """
    return Ring(list(nodes))


def memory_cluster(
    nodes: Sequence[str],
    timeout: float = 2.0,
    *,
    replicas: int = 3,
    r: int = 2,
    w: int = 2,
    pipeline_depth: int = 1,
) -> MemoryCluster:
    """A fresh L{MemoryCluster} (nodes, health, clock) over a shared ring.

    Replica operations travel in batches, as they do in a real proxy,
    unless ``pipeline_depth`` is 0.
    """
    return MemoryCluster(
        nodes,
        timeout,
        replicas=replicas,
        r=r,
        w=w,
        pipeline_depth=pipeline_depth,
        ring=shared_ring(tuple(nodes)),
    )


def cluster_http(case: SynchronousTestCase, cluster: MemoryCluster) -> HTTP:
    """Requests to the cluster's proxy, pumping the nodes' stubs as well."""
    return HTTP(case, cluster.proxy, PROXY_URL, flusher(cluster.node_http, cluster.proxy))


def settle(cluster: MemoryCluster, *stubs: StubTreq) -> None:
    """Flush in-memory HTTP until background work (read repair, hints) is done."""
    for _ in range(50):
        cluster.node_http.flush()
        cluster.proxy.flush()
        for stub in stubs:
            stub.flush()


def answered(d: Deferred[Any]) -> bool:
    """Whether C{d} has a result now (C{d.called} is not enough for treq's Deferreds)."""
    box: list[bool] = []

    def seen(result: object) -> object:
        box.append(True)
        return result

    d.addBoth(seen)
    return bool(box)


def wait(case: SynchronousTestCase, cluster: MemoryCluster, d: Deferred[T]) -> T:
    """Pump until C{d} fires (without moving the clock); its result."""
    flusher(cluster.node_http, cluster.proxy)(d)
    return case.successResultOf(d)


def check_health(case: SynchronousTestCase, cluster: MemoryCluster) -> None:
    """One round of the proxy's health checks (as its timer would run it)."""
    wait(case, cluster, cluster.health.check_all())


def deliver_hints(
    case: SynchronousTestCase, cluster: MemoryCluster, nodes: Iterable[str] | None = None
) -> int:
    """Run each node's hinted handoff once; how many hints were handed back."""
    delivered = 0
    for node in cluster.nodes if nodes is None else nodes:
        handoff = HintHandoff(cluster.nodes[node].store.engine, cluster.replica_client)
        wait(case, cluster, Deferred.fromCoroutine(handoff.deliver_all()))
        delivered += handoff.delivered
    settle(cluster)
    return delivered


def home_replicas(cluster: MemoryCluster, key: str, n: int = 3) -> list[str]:
    """The first C{n} nodes of C{key}'s preference list."""
    return cluster.ring.preference_list(key, n)


def record_holders(cluster: MemoryCluster, key: str) -> list[str]:
    """The nodes whose engines hold a record (tombstones too) for C{key}, in ring order."""
    return [n for n in cluster.ring.nodes if cluster.nodes[n].store.engine.get(key) is not None]


def hints_for_key(cluster: MemoryCluster, key: str) -> dict[str, list[str]]:
    """Stand-in node -> the nodes it keeps a hint for C{key} for."""
    found: dict[str, list[str]] = {}
    for node in cluster.ring.nodes:
        engine = cluster.nodes[node].store.engine
        targets = [t for t in sorted(engine.hint_counts()) if key in dict(engine.hints(t, 10_000))]
        if targets:
            found[node] = targets
    return found


def quorum_status(f: str, reply: Reply) -> str:
    """
    Jepsen's ok / fail / info for one proxy answer, as a history records it.

    A read is ok when it answered (404 included). A write is ok on 2xx, fail
    when the answer says it was not applied (or it broke a precondition), and
    info whenever the outcome may be unknown: a 504, ``"outcome": "unknown"``,
    or an error that does not say.
    """
    if 200 <= reply.code < 300 or (f == "get" and reply.code == 404):
        return "ok"
    if f == "get" or reply.code in (400, 412, 413, 414):
        return "fail"
    outcome = reply.json().get("outcome") if reply.header("content-type") else None
    if reply.code == 503 and outcome == "not_applied":
        return "fail"
    return "info"


@dataclass(frozen=True)
class Call:
    """One request that left the proxy (or a node) for a node."""

    method: str
    node: str
    path: str
    hint_for: str | None


class NetworkFaults:
    """
    Faults finer than L{FaultyHTTP}'s, installed behind it.

    L{FaultyHTTP} refuses or hangs every request to a node. This layer sits
    between it and the nodes' C{StubTreq}, so it sees exactly the requests
    that were sent (C{calls}), and can fail one phase of a quorum write only:
    a node in C{refuse_writes} answers reads but refuses replica writes
    (nothing is sent), one in C{hang_writes} accepts replica writes and never
    answers them, and one in C{delay} gets each request that many seconds of
    C{clock} time late (a slow replica; the caller's timeout still applies).
    """

    def __init__(self, inner: Any, clock: IReactorTime) -> None:
        self.inner = inner
        self.clock = clock
        self.refuse_writes: set[str] = set()
        self.hang_writes: set[str] = set()
        self.delay: dict[str, float] = {}
        self.calls: list[Call] = []

    def request(self, method: str, url: bytes, **kwargs: Any) -> Deferred[Any]:
        parts = urlsplit(url.decode("ascii"))
        node = parts.netloc
        write = method == "PUT" and parts.path.startswith("/replica/kv/")
        if write and node in self.refuse_writes:
            return fail(ConnectionRefusedError(f"{node} refuses writes"))
        hint_for = parse_qs(parts.query).get("hint_for", [None])[0]
        self.calls.append(Call(method, node, unquote(parts.path), hint_for))
        if write and node in self.hang_writes:
            return Deferred(lambda d: d.errback(ResponseNeverReceived([Failure(CancelledError())])))
        if node in self.delay:
            later: Deferred[Any] = deferLater(
                self.clock, self.delay[node], self.inner.request, method, url, **kwargs
            )
            return later
        answer: Deferred[Any] = self.inner.request(method, url, **kwargs)
        return answer

    def writes(self, key: str | None = None) -> list[Call]:
        """The replica writes sent (to any node, hinted or not), for C{key} if given."""
        path = None if key is None else "/replica/kv/" + key
        return [
            c
            for c in self.calls
            if c.method == "PUT" and c.path.startswith("/replica/kv/") and path in (None, c.path)
        ]


def install_faults(cluster: MemoryCluster) -> NetworkFaults:
    """Put a L{NetworkFaults} between C{cluster.network} and the nodes.

    Its faults are per replica operation, so the proxy is switched to one
    request per operation (no batches); tests/replica/ covers batching
    itself.
    """
    assert not cluster.replica_client.pipelines, "install faults before the first request"
    cluster.replica_client.pipeline_depth = 0
    faults = NetworkFaults(cluster.network.inner, cluster.clock)
    cluster.network.inner = faults
    return faults


U64 = 2**64 - 1
"""The largest version counter and clock a record can carry."""
WRITER_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-"
"""The characters a version's writer id may use."""


def same_data(record: Record, other: Record | None) -> bool:
    """Equal as replicas see it: ``stored_ms`` is local and ignored."""
    return other is not None and (
        record.version,
        record.value,
        record.content_type,
        record.tombstone,
    ) == (other.version, other.value, other.content_type, other.tombstone)
