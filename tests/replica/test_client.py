"""
Tests for L{shardkv.replica.client}: calls to a node's replica routes.

A caller decides what a failed replica call means from its class alone, so
each kind of failure must come out as the right domain error: refused
before sending (L{NodeUnreachable}, C{sent=False}), no answer in time
(L{NodeTimeout}, C{sent=True}), the node's own error (L{ReplicaRefused}
with the node's code) and nonsense (L{BadReplicaAnswer}). Then, with a
real node, records too large for a batch travel alone; and with a whole
in-memory cluster, a batching proxy answers exactly as an unbatched one.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.resource import Resource
from twisted.web.server import Request

from shardkv.core.records import Record
from shardkv.core.versions import Version
from shardkv.core.window import START_FRACTION
from shardkv.errors import (
    BadReplicaAnswer,
    NodeBusy,
    NodeTimeout,
    NodeUnreachable,
    ReplicaCallFailed,
    ReplicaRefused,
)
from shardkv.replica.client import (
    DEFAULT_NODE_INFLIGHT_BYTES,
    RECORD_OVERHEAD,
    TARGET_FRACTION,
    ReplicaClient,
    write_cost,
)
from shardkv.replica.codec import (
    MAX_INLINE_VALUE,
    GetOp,
    Result,
    decode_request,
    encode_response,
    fits,
)
from shardkv.storage.memory import MemoryEngine
from shardkv.testing.memory import FaultyHTTP, MemoryCluster, make_node
from shardkv.web.httpclient import HTTPClientService
from tests.helpers import (
    HTTP,
    NODES_3,
    NetworkFaults,
    Reply,
    answered,
    cluster_http,
    flusher,
    hints_for_key,
    memory_cluster,
    same_data,
    settle,
)
from tests.replica.helpers import NODE_ID, TIMEOUT, V1, V2, OneNodeCase

# -- failures, as domain errors ---------------------------------------------------


class Scripted(Resource):
    """A node that answers every request with the status, headers and body it is given."""

    isLeaf = True

    def __init__(
        self, status: int = 200, body: bytes = b"", headers: dict[bytes, bytes] | None = None
    ) -> None:
        super().__init__()
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.seen: list[tuple[bytes, bytes]] = []

    def render(self, request: Request) -> bytes:
        self.seen.append((request.method, request.path))
        request.setResponseCode(self.status)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return self.body


Call = Callable[[ReplicaClient], Deferred[Any]]

CALLS: dict[str, Call] = {
    "get": lambda c: c.replica_get(NODE_ID, "k"),
    "put": lambda c: c.replica_put(NODE_ID, "k", Record(V1, b"v")),
    "batch": lambda c: Deferred.fromCoroutine(c.send_batch(NODE_ID, [GetOp("k")])),
    "pipelined get": lambda c: c.replica_get(NODE_ID, "k"),
    "pipelined put": lambda c: c.replica_put(NODE_ID, "k", Record(V1, b"v"), "127.0.0.1:8085"),
}
"""Every way to call a node; the pipelined ones go through a NodePipeline and a batch."""


def make_client(http: Any, clock: MemoryReactorClock, call: str) -> ReplicaClient:
    return ReplicaClient(http, clock, TIMEOUT, pipeline_depth=1 if "pipelined" in call else 0)


def outcome(d: Deferred[Any], *stubs: StubTreq) -> Any:
    """What ``d`` fired with (a L{Failure} for an error), pumping ``stubs`` first."""
    flusher(*stubs)(d)
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the call did not finish"
    return box[0]


def error_of(d: Deferred[Any], *stubs: StubTreq) -> BaseException:
    result = outcome(d, *stubs)
    assert isinstance(result, Failure), f"expected a failure, got {result!r}"
    error = result.value
    assert error is not None
    return error


class Broken:
    """An HTTP client whose every request fails with ``error`` (after it may have left)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def request(self, method: str, url: bytes, **kwargs: Any) -> Deferred[Any]:
        return fail(self.error)


@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_refused_connection_is_unreachable_and_not_sent(call: str) -> None:
    """
    A node that refuses the connection never saw the request: the call
    fails with NodeUnreachable(sent=False), so a write is known not to
    have been applied there.
    """
    network = FaultyHTTP(StubTreq(Scripted()))
    network.down.add(NODE_ID)
    error = error_of(CALLS[call](make_client(network, MemoryReactorClock(), call)))
    assert isinstance(error, NodeUnreachable), error
    assert (error.node, error.sent, error.code) == (NODE_ID, False, "node_unreachable")
    assert f"{NODE_ID} is down" in error.reason


@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_hung_node_times_out_as_maybe_sent(call: str) -> None:
    """
    A node that took the request and never answers fails the call with
    NodeTimeout(sent=True) once the timeout passes, and not before: the
    write may have been applied.
    """
    network = FaultyHTTP(StubTreq(Scripted()))
    network.hung.add(NODE_ID)
    clock = MemoryReactorClock()
    d = CALLS[call](make_client(network, clock, call))
    clock.advance(TIMEOUT - 0.01)
    assert not answered(d)
    clock.advance(0.02)
    error = error_of(d)
    assert isinstance(error, NodeTimeout), error
    assert (error.node, error.sent, error.seconds) == (NODE_ID, True, TIMEOUT)
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    "error",
    [
        ResponseFailed([Failure(ConnectionLost())]),
        ResponseNeverReceived([Failure(ConnectionLost())]),
        RequestTransmissionFailed([Failure(ConnectionLost())]),
        ConnectionLost(),
    ],
    ids=["response failed", "response never received", "transmission failed", "connection lost"],
)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_broken_connection_is_unreachable_and_maybe_sent(call: str, error: Exception) -> None:
    """
    A connection that breaks after the request went out fails the call at
    once with NodeUnreachable(sent=True): unlike a refusal, the node may
    have applied the write.
    """
    got = error_of(CALLS[call](make_client(Broken(error), MemoryReactorClock(), call)))
    assert isinstance(got, NodeUnreachable), got
    assert (got.node, got.sent) == (NODE_ID, True)


@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_request_the_pool_could_not_send_is_unreachable_and_not_sent(call: str) -> None:
    got = error_of(CALLS[call](make_client(Broken(RequestNotSent()), MemoryReactorClock(), call)))
    assert isinstance(got, NodeUnreachable), got
    assert (got.node, got.sent) == (NODE_ID, False)


@pytest.mark.parametrize("address", ["a..b:10000", "x" * 64 + ".example:1", "nödé:1"])
def test_an_address_no_url_can_name_is_unreachable_and_not_sent(address: str) -> None:
    """A host that is not a valid DNS name is refused before anything is sent, not a 500."""
    client = ReplicaClient(StubTreq(Scripted()), MemoryReactorClock(), TIMEOUT)
    got = error_of(Deferred.fromCoroutine(client.get_map(address)))
    assert isinstance(got, NodeUnreachable), got
    assert (got.node, got.sent) == (address, False)


def test_a_caller_cancelling_gets_a_bare_cancellation() -> None:
    """
    When the caller gives up (its client hung up) the call fails with a
    plain CancelledError, which Klein drops silently, and not with a
    NodeTimeout that would count against the node; no timer is left behind.
    """
    network = FaultyHTTP(StubTreq(Scripted()))
    network.hung.add(NODE_ID)
    clock = MemoryReactorClock()
    for call in ("get", "put"):
        d = CALLS[call](make_client(network, clock, call))
        d.cancel()
        assert type(error_of(d)) is CancelledError, call
    assert clock.getDelayedCalls() == []


NODE_ERROR = json.dumps({"error": "insufficient_storage", "message": "no space left"}).encode()


@pytest.mark.parametrize("call", ["get", "put", "batch"])
def test_a_node_error_is_refused_with_the_nodes_code(call: str) -> None:
    """
    A node that answers with a JSON error of its own (here a full disk) is
    ReplicaRefused carrying the node's code and message, so the proxy can
    tell "this node refused" from "this node is gone".
    """
    stub = StubTreq(Scripted(507, NODE_ERROR, {b"content-type": b"application/json"}))
    error = error_of(CALLS[call](make_client(stub, MemoryReactorClock(), call)), stub)
    assert isinstance(error, ReplicaRefused), error
    assert (error.node, error.code, error.sent) == (NODE_ID, "insufficient_storage", False)
    assert error.message == f"node {NODE_ID}: no space left"


@pytest.mark.parametrize("call", ["pipelined get", "pipelined put"])
def test_a_failed_op_in_a_batch_is_refused_with_its_own_code(call: str) -> None:
    """One operation's error result in a good batch is ReplicaRefused with that result's code."""
    body = encode_response([Result(503, error="storage_failed", message="fsync returned EIO")])
    stub = StubTreq(Scripted(200, body))
    error = error_of(CALLS[call](make_client(stub, MemoryReactorClock(), call)), stub)
    assert isinstance(error, ReplicaRefused), error
    assert (error.code, error.message) == ("storage_failed", f"node {NODE_ID}: fsync returned EIO")


GOOD_VERSION = {b"x-shardkv-version": b"1-1-w"}

BAD_ANSWERS: list[tuple[str, str, int, bytes, dict[bytes, bytes]]] = [
    ("get", "an HTML error page", 502, b"<html>Bad Gateway</html>", {}),
    ("get", "an error that is a list", 500, b'["error"]', {}),
    ("get", "an error without a message", 500, b'{"error": "x"}', {}),
    ("get", "a bad version", 200, b"v", {b"x-shardkv-version": b"yesterday"}),
    ("get", "no version", 200, b"v", {}),
    ("put", "an answer that is not JSON", 200, b"ok", {}),
    ("put", "an answer without applied", 200, b'{"stored": true}', {}),
    ("put", "an HTML error page", 503, b"<html>down</html>", {}),
    ("batch", "an answer that is not a batch", 200, b"<html>hi</html>", {}),
    ("batch", "too many results", 200, encode_response([Result(404), Result(404)]), {}),
    ("batch", "an HTML error page", 502, b"<html>Bad Gateway</html>", {}),
    ("pipelined get", "an answer that is not a batch", 200, b'{"results": 1}', {}),
    ("pipelined put", "too few results", 200, encode_response([]), {}),
]


@pytest.mark.parametrize(
    ("call", "status", "body", "headers"),
    [case[:1] + case[2:] for case in BAD_ANSWERS],
    ids=[f"{call}: {name}" for call, name, *_ in BAD_ANSWERS],
)
def test_nonsense_is_a_bad_replica_answer(
    call: str, status: int, body: bytes, headers: dict[bytes, bytes]
) -> None:
    """
    An answer that does not follow the replica protocol (a load balancer's
    HTML page, a bad version, a batch with the wrong number of results) is
    BadReplicaAnswer, never a crash in a callback or a record made up from
    half an answer.
    """
    stub = StubTreq(Scripted(status, body, headers))
    error = error_of(CALLS[call](make_client(stub, MemoryReactorClock(), call)), stub)
    assert isinstance(error, BadReplicaAnswer), error
    assert (error.node, error.code) == (NODE_ID, "bad_gateway")
    assert NODE_ID in error.message


def test_a_good_answer_is_not_an_error() -> None:
    """The same scripted node, answering properly, gives the record and the applied flag."""
    get = StubTreq(Scripted(200, b"v", {**GOOD_VERSION, b"content-type": b"text/plain"}))
    client = make_client(get, MemoryReactorClock(), "get")
    expected = Record(Version(1, 1, "w"), b"v", "text/plain")
    assert outcome(client.replica_get(NODE_ID, "k"), get) == expected
    put = StubTreq(Scripted(200, b'{"applied": true}'))
    client = make_client(put, MemoryReactorClock(), "put")
    assert outcome(client.replica_put(NODE_ID, "k", Record(V1, b"v")), put) is True
    missing = StubTreq(Scripted(404, b'{"error": "not_found", "message": "no record"}'))
    client = make_client(missing, MemoryReactorClock(), "get")
    assert outcome(client.replica_get(NODE_ID, "k"), missing) is None


def test_an_unhealthy_node_is_unreachable() -> None:
    """
    A health check answered with an error status is NodeUnreachable with
    the reason the node gave (or the status), so the proxy marks it down.
    """
    for status, body, reason in [
        (503, b'{"reason": "disk full"}', "disk full"),
        (500, b"<html>oops</html>", "health is HTTP 500"),
    ]:
        stub = StubTreq(Scripted(status, body))
        client = make_client(stub, MemoryReactorClock(), "get")
        error = error_of(Deferred.fromCoroutine(client.health(NODE_ID)), stub)
        assert isinstance(error, NodeUnreachable), error
        assert (error.reason, error.sent) == (reason, False)
    stub = StubTreq(Scripted(200, b'{"status": "ok"}'))
    client = make_client(stub, MemoryReactorClock(), "get")
    assert outcome(Deferred.fromCoroutine(client.health(NODE_ID)), stub) == {"status": "ok"}


def test_every_failure_is_a_replica_call_failure() -> None:
    """Callers catch ReplicaCallFailed; every class the client raises must be one."""
    for cls in (NodeUnreachable, NodeTimeout, ReplicaRefused, BadReplicaAnswer):
        assert issubclass(cls, ReplicaCallFailed)


# -- records too large for a batch, against a real node ----------------------------


# -- record bytes in flight per node ------------------------------------------------

OTHER_NODE = "127.0.0.1:8082"


class Counting:
    """An HTTP client that hangs every request (like a busy node) and counts them."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def request(self, method: str, url: bytes, **kwargs: Any) -> Deferred[Any]:
        self.sent.append((method, url))
        return Deferred(lambda d: d.errback(ResponseNeverReceived([Failure(CancelledError())])))


def capped(cap: int, depth: int = 0) -> tuple[ReplicaClient, Counting, MemoryReactorClock]:
    """A client whose nodes' windows are open to ``cap`` (as after a slow start)."""
    http, clock = Counting(), MemoryReactorClock()
    client = ReplicaClient(http, clock, TIMEOUT, depth, node_inflight_bytes=cap)
    for node in (NODE_ID, OTHER_NODE):
        client.window(node).resize(ceiling=cap)
    return client, http, clock


def value_of(size: int) -> Record:
    return Record(V1, b"x" * size, "")


def cost(size: int) -> int:
    """What a write of ``size`` value bytes under a one-letter key costs."""
    return write_cost("k", value_of(size))


def in_flight(client: ReplicaClient, node: str = NODE_ID) -> int:
    return client.pipeline_stats(node)["bytes"]["in_flight"]


def test_a_write_costs_its_key_value_content_type_and_overhead() -> None:
    """So that a full node refuses tombstones too (their value is empty)."""
    record = Record(V1, b"12345", "text/plain")
    assert write_cost("key", record) == 3 + 5 + 10 + RECORD_OVERHEAD
    assert write_cost("k", Record.deleted(V1)) == 1 + RECORD_OVERHEAD


def test_a_write_past_the_cap_fails_at_once_and_is_not_sent() -> None:
    """
    With cost(6) of cost(6) + cost(4) in flight to a node, another
    cost(6) write fails at once with NodeBusy (sent=False: nothing left,
    the node is not suspected), while a cost(4) write still fits exactly
    and another node is not affected. Once the writes in flight time out,
    the bytes are free again.
    """
    cap = cost(6) + cost(4)
    client, http, clock = capped(cap)
    first = client.replica_put(NODE_ID, "a", value_of(6))
    assert not answered(first)
    busy = error_of(client.replica_put(NODE_ID, "b", value_of(6)))
    assert isinstance(busy, NodeBusy), busy
    assert (busy.node, busy.sent, busy.code) == (NODE_ID, False, "node_busy")
    assert f"{cost(6)} bytes of records in flight" in busy.message
    assert len(http.sent) == 1
    fits_exactly = client.replica_put(NODE_ID, "c", value_of(4))
    elsewhere = client.replica_put(OTHER_NODE, "d", value_of(cap))
    assert len(http.sent) == 3
    stats = client.pipeline_stats(NODE_ID)
    assert stats == {"bytes": {"in_flight": cap, "window": cap, "limit": cap, "busy": 1}}
    assert isinstance(error_of(client.replica_put(NODE_ID, "e", Record.deleted(V1))), NodeBusy)

    clock.advance(TIMEOUT)
    for d in (first, fits_exactly, elsewhere):
        assert isinstance(error_of(d), NodeTimeout)
    assert (in_flight(client), in_flight(client, OTHER_NODE)) == (0, 0)
    assert not answered(client.replica_put(NODE_ID, "b", value_of(6)))


def test_batched_and_single_key_writes_share_one_cap() -> None:
    """
    A record too large for a batch (sent alone) and small ones (queued in
    the node's write pipeline, sent as a batch) count against the same
    per-node cap, queued ones included; a small write past it is refused
    before it reaches the pipeline.
    """
    big = MAX_INLINE_VALUE + 1
    client, http, clock = capped(cost(big) + 3 * cost(100), depth=1)
    calls = [client.replica_put(NODE_ID, "k", value_of(big))]
    calls += [client.replica_put(NODE_ID, "k", value_of(100)) for _ in range(3)]
    assert in_flight(client) == cost(big) + 3 * cost(100)
    assert client.pipeline_stats(NODE_ID)["write"]["queued"] == 2  # one batch out, two wait
    busy = error_of(client.replica_put(NODE_ID, "k", value_of(0)))
    assert isinstance(busy, NodeBusy), busy
    assert client.pipeline_stats(NODE_ID)["write"]["queued"] == 2
    assert [m for m, _ in http.sent] == ["PUT", "POST"]

    calls[2].cancel()  # a queued op whose caller gave up frees its bytes
    assert in_flight(client) == cost(big) + 2 * cost(100)
    clock.advance(TIMEOUT)
    for d in calls:
        outcome(d)
    assert in_flight(client) == 0


def test_an_idle_node_takes_a_record_larger_than_the_cap() -> None:
    """A cap below the largest value must not starve it: with nothing in flight it goes."""
    client, http, _ = capped(4)
    assert not answered(client.replica_put(NODE_ID, "a", value_of(10)))
    assert len(http.sent) == 1
    assert isinstance(error_of(client.replica_put(NODE_ID, "b", value_of(1))), NodeBusy)


@pytest.mark.parametrize("call", ["put", "pipelined put"])
def test_bytes_are_freed_by_an_answer_a_failure_and_a_cancellation(call: str) -> None:
    """However a write ends, its bytes stop counting."""
    ok = StubTreq(Scripted(body=b'{"applied": true}'))
    if "pipelined" in call:
        ok = StubTreq(Scripted(body=encode_response([Result(200, applied=True)])))
    for http, stubs in [(ok, (ok,)), (Broken(ConnectionLost()), ())]:
        client = make_client(http, MemoryReactorClock(), call)
        d = CALLS[call](client)
        outcome(d, *stubs)
        assert in_flight(client) == 0, http
    hung = FaultyHTTP(ok)
    hung.hung.add(NODE_ID)
    client = make_client(hung, MemoryReactorClock(), call)
    d = CALLS[call](client)
    assert in_flight(client) == write_cost("k", Record(V1, b"v"))
    d.cancel()
    assert type(error_of(d)) is CancelledError
    assert in_flight(client) == 0


class Held:
    """An HTTP client whose answers (from ``inner``) wait until the test lets them go."""

    def __init__(self, inner: StubTreq) -> None:
        self.inner: Any = inner  # StubTreq's request methods are made at run time
        self.waiting: list[tuple[Deferred[Any], str, bytes, dict[str, Any]]] = []

    def request(self, method: str, url: bytes, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.waiting.append((d, method, url, kwargs))
        return d

    def answer(self) -> None:
        """Answer every request sent so far, and those sent as they are answered."""
        while self.waiting:
            waiting, self.waiting = self.waiting, []
            for d, method, url, kwargs in waiting:
                self.inner.request(method, url, **kwargs).chainDeferred(d)
            self.inner.flush()


class BatchApplied(Resource):
    """A node that applies every write of every batch it is sent."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        ops = decode_request(request.content.read())
        return encode_response([Result(200, applied=True)] * len(ops))


def window_of(client: ReplicaClient) -> int:
    return client.pipeline_stats(NODE_ID)["bytes"]["window"]


BIG = 1000
"""The value size of the writes that steer windows here (a cost(BIG) is the floor)."""


@pytest.mark.parametrize("call", ["put", "pipelined put"])
def test_a_node_that_answers_slowly_gets_a_smaller_window(call: str) -> None:
    """
    Four writes answered after a whole second show a node slower than a
    window of four writes can take within a quarter of the timeout: its window
    shrinks, and a write past it is refused unsent (NodeBusy) though it is
    under the cap; writes answered at once open it back to the cap.
    """
    stub = StubTreq(Scripted(body=b'{"applied": true}'))
    if "pipelined" in call:
        stub = StubTreq(BatchApplied())
    http, clock = Held(stub), MemoryReactorClock()
    cap = 16 * cost(BIG)
    client = ReplicaClient(http, clock, TIMEOUT, 1 if "pipelined" in call else 0)
    client.node_inflight_bytes = cap
    client.window(NODE_ID).resize(ceiling=cap)  # open, as after a fast start
    slow = [client.replica_put(NODE_ID, "k", value_of(BIG)) for _ in range(4)]
    clock.advance(1.0)
    http.answer()
    assert [outcome(d) for d in slow] == [True] * 4
    shrunk = window_of(client)
    assert shrunk < 4 * cost(BIG), shrunk

    sent = []
    while window_of(client) - in_flight(client) >= cost(BIG):
        sent.append(client.replica_put(NODE_ID, "k", value_of(BIG)))
    busy = error_of(client.replica_put(NODE_ID, "k", value_of(BIG)))
    assert isinstance(busy, NodeBusy), busy
    assert in_flight(client) + cost(BIG) <= cap
    http.answer()
    assert [outcome(d) for d in sent] == [True] * len(sent)
    for _ in range(20):
        fast = [client.replica_put(NODE_ID, "k", value_of(BIG)) for _ in range(4)]
        http.answer()
        assert [outcome(d) for d in fast] == [True] * 4
    assert window_of(client) == cap


def test_timeouts_shrink_the_window_and_a_refused_connection_does_not() -> None:
    """A hung node's timeouts show it slow; a refused connection says nothing of speed."""
    network = FaultyHTTP(StubTreq(Scripted()))
    clock = MemoryReactorClock()
    cap = 16 * cost(BIG)
    client = ReplicaClient(network, clock, TIMEOUT, node_inflight_bytes=cap)
    window = client.window(NODE_ID)
    network.down.add(NODE_ID)
    refused = [client.replica_put(NODE_ID, "k", value_of(BIG)) for _ in range(4)]
    assert all(isinstance(error_of(d), NodeUnreachable) for d in refused)
    assert (window.limit, window.rate, in_flight(client)) == (cap // START_FRACTION, None, 0)
    network.down.clear()
    network.hung.add(NODE_ID)
    hung = [client.replica_put(NODE_ID, "k", value_of(BIG)) for _ in range(2)]
    clock.advance(TIMEOUT)
    assert all(isinstance(error_of(d), NodeTimeout) for d in hung)
    assert (window.limit, in_flight(client)) == (window.floor, 0)


def test_a_reload_moves_the_window_target_and_cap() -> None:
    client = ReplicaClient(FaultyHTTP(StubTreq(Scripted())), MemoryReactorClock(), TIMEOUT)
    client.replica_put(NODE_ID, "k", value_of(1)).addErrback(lambda _: None)
    client.set_timeout(4.0)
    client.node_inflight_bytes = 1000
    window = client.windows[NODE_ID]
    assert (window.target, window.ceiling, window.limit) == (4.0 * TARGET_FRACTION, 1000, 1000)


def test_a_stopped_http_client_is_an_unreachable_node_and_nothing_is_sent() -> None:
    """
    Work still running when a process stops (a hint being handed back) meets
    a stopped HTTP client: that is a node not reached, nothing sent, never an
    unexpected error.
    """
    service = HTTPClientService(MemoryReactorClock())
    client = ReplicaClient(service, MemoryReactorClock(), TIMEOUT)
    got = error_of(client.replica_put(NODE_ID, "k", value_of(1)))
    assert isinstance(got, NodeUnreachable), got
    assert (got.sent, got.reason) == (False, "this process is shutting down")
    assert in_flight(client) == 0


class OneNodeTests(OneNodeCase):
    """A pipelining client in front of one real node on a memory engine."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.serve(make_node(NODE_ID, self.clock, members=[NODE_ID, "127.0.0.1:8085"]))
        engine = self.node.store.engine
        assert isinstance(engine, MemoryEngine)
        self.engine = engine

    def test_a_large_record_is_fetched_on_its_own(self) -> None:
        """
        A record too large to answer inline comes back ``inline: false`` in
        the batch, and ReplicaClient.replica_get then fetches it with a single
        GET, so the caller still gets the whole record.
        """
        large = Record(V2, bytes(range(256)) * 300, "image/png")
        self.assertFalse(fits(large))
        self.engine.put("large", large)
        (result,) = self.send([GetOp("large")])
        self.assertEqual(result, Result(200, inline=False))

        client, calls = self.client()
        got = self.wait(client.replica_get(NODE_ID, "large"))
        self.assertTrue(same_data(large, got))
        self.assertEqual(
            [(c.method, c.path) for c in calls.calls],
            [("POST", "/replica/batch"), ("GET", "/replica/kv/large")],
        )

    def test_a_write_answers_what_the_node_held_both_ways(self) -> None:
        """
        ReplicaClient.replica_write gives the node's whole answer, on the
        single-key route (a record over the inline limit) as in a batch:
        applied, and what the node held before (its version and whether it was
        live); a hint says only applied.
        """
        client, _ = self.client()
        for size in (MAX_INLINE_VALUE + 1, 10):
            key = f"k{size}"
            first = self.wait(client.replica_write(NODE_ID, key, Record(V1, b"L" * size)))
            self.assertEqual((first.applied, first.held, first.live), (True, None, False), size)
            newer = self.wait(client.replica_write(NODE_ID, key, Record.deleted(V2)))
            self.assertEqual((newer.applied, newer.held, newer.live), (True, V1, True), size)
            older = self.wait(client.replica_write(NODE_ID, key, Record(V1, b"x")))
            self.assertEqual((older.applied, older.held, older.live), (False, V2, False), size)
            hint = self.wait(client.replica_write(NODE_ID, key, Record(V1, b"x"), "127.0.0.1:8085"))
            self.assertEqual((hint.applied, hint.live), (True, None), size)

    def test_a_record_that_does_not_fit_is_put_on_its_own(self) -> None:
        """
        ReplicaClient.replica_put sends a record over the inline limit as a
        single /replica/kv PUT (hint target included), and one at the limit
        in a batch.
        """
        client, calls = self.client()
        large = Record(V2, b"L" * (MAX_INLINE_VALUE + 1), "text/plain")
        edge = Record(V2, b"E" * MAX_INLINE_VALUE, "text/plain")
        self.assertTrue(self.wait(client.replica_put(NODE_ID, "large", large)))
        self.assertTrue(self.wait(client.replica_put(NODE_ID, "hint", large, "127.0.0.1:8085")))
        self.assertTrue(self.wait(client.replica_put(NODE_ID, "edge", edge)))
        self.assertEqual(
            [(c.method, c.path, c.hint_for) for c in calls.calls],
            [
                ("PUT", "/replica/kv/large", None),
                ("PUT", "/replica/kv/hint", "127.0.0.1:8085"),
                ("POST", "/replica/batch", None),
            ],
        )
        self.assertTrue(same_data(large, self.engine.get("large")))
        self.assertTrue(same_data(edge, self.engine.get("edge")))
        self.assertEqual([k for k, _ in self.engine.hints("127.0.0.1:8085")], ["hint"])
        self.assertEqual(client.pipeline_stats(NODE_ID)["write"]["ops"], 1)


# -- batching through the proxy ------------------------------------------------------
RTT = 0.01
"""How long each node takes to answer in the batching tests (clock time)."""


class ClusterBatchingTests(SynchronousTestCase):
    """
    A 3-node cluster (N=3, R=2, W=2) whose proxy batches. Nodes answer
    after RTT of clock time, so requests started together overlap the way
    they do under real load and their replica operations share batches.
    """

    cluster: MemoryCluster
    http: HTTP
    faults: NetworkFaults

    def use(self, pipeline_depth: int = 1, slow: bool = True) -> None:
        self.cluster = memory_cluster(NODES_3, TIMEOUT, pipeline_depth=pipeline_depth)
        # Batching, not hedging, is tested here: every read asks all three
        # replicas, so the queues hold what these tests count (hedged reads:
        # tests/proxy/test_coordinator.py).
        self.cluster.coordinator.read_all_fraction = 1.0
        self.http = cluster_http(self, self.cluster)
        self.faults = NetworkFaults(self.cluster.network.inner, self.cluster.clock)
        self.cluster.network.inner = self.faults
        if slow:
            self.faults.delay.update(dict.fromkeys(NODES_3, RTT))

    def run_all(self, requests: list[Deferred[Reply]]) -> list[Reply]:
        """Move the clock an RTT at a time until every request is answered."""
        for _ in range(100):
            settle(self.cluster)
            if all(answered(d) for d in requests):
                break
            self.cluster.clock.advance(RTT)
        return [self.successResultOf(d) for d in requests]

    def put(self, key: str, value: bytes, ctype: str = "text/plain") -> Deferred[Reply]:
        return self.http.start("PUT", "/kv/" + key, value, {"Content-Type": ctype})

    def get(self, key: str) -> Deferred[Reply]:
        return self.http.start("GET", "/kv/" + key)

    def assertBatched(self) -> None:
        """Every pipeline is idle, sent fewer batches than ops, and only batches went out."""
        total = 0
        for node in NODES_3:
            stats = self.cluster.replica_client.pipeline_stats(node)
            self.assertEqual(sorted(stats), ["bytes", "read", "write"])
            self.assertEqual(stats.pop("bytes")["in_flight"], 0, node)
            for kind, s in stats.items():
                self.assertEqual((s["in_flight"], s["queued"]), (0, 0), (node, kind))
                self.assertLess(s["batches"], s["ops"], (node, kind, s))
                total += s["batches"]
        self.assertEqual(
            {(c.method, c.path) for c in self.faults.calls}, {("POST", "/replica/batch")}
        )
        self.assertEqual(len(self.faults.calls), total)

    def test_concurrent_requests_share_batches_and_answer_correctly(self) -> None:
        """
        Thirty writes started together, then reads, new writes and misses
        mixed together, all answer exactly as they would unbatched, every
        replica ends with the newest value, and the proxy sent far fewer
        batches than replica operations.
        """
        self.use()
        names = [f"key-{i}" for i in range(30)]
        created = self.run_all([self.put(n, b"v1 " + n.encode()) for n in names])
        self.assertEqual({r.code for r in created}, {201})

        mixed: list[tuple[str, str, Deferred[Reply]]] = []
        for i, name in enumerate(names):
            if i % 3 == 0:
                mixed.append(("put", name, self.put(name, b"v2 " + name.encode(), "text/x-v2")))
            else:
                mixed.append(("get", name, self.get(name)))
            if i % 6 == 0:
                mixed.append(("miss", f"missing-{i}", self.get(f"missing-{i}")))
        replies = self.run_all([d for _, _, d in mixed])
        for (kind, name, _), reply in zip(mixed, replies, strict=True):
            if kind == "put":
                self.assertEqual(reply.code, 200, reply.body)
            elif kind == "miss":
                self.assertEqual(reply.error(), (404, "not_found"))
            else:
                self.assertEqual((reply.code, reply.body), (200, b"v1 " + name.encode()))
                self.assertEqual(reply.header("content-type"), "text/plain")
        settle(self.cluster)

        for i, name in enumerate(names):
            value, ctype = (b"v2 ", "text/x-v2") if i % 3 == 0 else (b"v1 ", "text/plain")
            for node in NODES_3:
                record = self.cluster.nodes[node].store.engine.get(name)
                assert record is not None, (node, name)
                self.assertEqual(
                    (record.value, record.content_type), (value + name.encode(), ctype)
                )
        self.assertBatched()

    def test_depth_zero_makes_no_pipelines(self) -> None:
        """With pipeline_depth=0 every replica operation is its own request, as before batching."""
        self.use(pipeline_depth=0)
        replies = self.run_all([self.put("a", b"1"), self.put("b", b"2")])
        self.assertEqual({r.code for r in replies}, {201})
        self.assertEqual(self.run_all([self.get("a")])[0].body, b"1")
        self.assertEqual(self.cluster.replica_client.pipelines, {})
        self.assertEqual(
            self.cluster.replica_client.pipeline_stats(NODES_3[0]),
            {
                "bytes": {
                    "in_flight": 0,
                    "window": DEFAULT_NODE_INFLIGHT_BYTES // START_FRACTION,
                    "limit": DEFAULT_NODE_INFLIGHT_BYTES,
                    "busy": 0,
                }
            },
        )
        self.assertTrue(self.faults.calls)
        self.assertTrue(all(c.path.startswith("/replica/kv/") for c in self.faults.calls))

    def test_a_hung_node_does_not_hold_up_batches_to_the_others(self) -> None:
        """
        With one replica hung, its batch never comes back and its ops queue,
        but reads answer from the other two and writes reach W=2 without
        the clock moving. Once the timeout passes the hung node's ops fail
        with NodeTimeout, its queue drains, its record bytes in flight drop
        to zero, and the writes it missed are kept as hints on the others.
        It is not marked down: a timeout is not a failure (failed health
        checks mark a hung node down).
        """
        self.use(slow=False)
        hung = NODES_3[0]
        live = NODES_3[1:]
        self.cluster.network.hung.add(hung)
        names = [f"h{i}" for i in range(10)]

        writes = [self.put(n, n.encode()) for n in names]
        for d in writes:
            self.http.pump(d)
        self.assertEqual([self.successResultOf(d).code for d in writes], [201] * 10)
        reads = [self.get(n) for n in names]
        for d in reads:
            self.http.pump(d)
        self.assertEqual([self.successResultOf(d).body for d in reads], [n.encode() for n in names])
        for name in names:
            self.assertIsNone(self.cluster.nodes[hung].store.engine.get(name))
            for node in live:
                self.assertIsNotNone(self.cluster.nodes[node].store.engine.get(name))

        stats = self.cluster.replica_client.pipeline_stats(hung)
        self.assertEqual(
            {kind: s["in_flight"] for kind, s in stats.items()},
            {
                "read": 1,
                "write": 1,
                "bytes": sum(write_cost(n, Record(V1, n.encode(), "text/plain")) for n in names),
            },
        )
        # Ten GETs; the PUTs wrote in one round, with no version read.
        self.assertEqual(stats["read"]["queued"], 9)
        self.assertEqual(stats["write"]["queued"], 9)

        probe = self.cluster.replica_client.replica_get(hung, "h0")
        self.assertNoResult(probe)
        self.cluster.clock.advance(TIMEOUT + 0.01)
        self.failureResultOf(probe, NodeTimeout)
        self.cluster.clock.advance(TIMEOUT + 0.01)  # the batch that took the queue times out too
        settle(self.cluster)
        stats = self.cluster.replica_client.pipeline_stats(hung)
        self.assertEqual(stats.pop("bytes")["in_flight"], 0)
        for kind, s in stats.items():
            self.assertEqual((s["in_flight"], s["queued"]), (0, 0), kind)
        self.assertFalse(self.cluster.health.is_down(hung))
        for name in names:
            kept = hints_for_key(self.cluster, name)
            self.assertEqual([t for targets in kept.values() for t in targets], [hung])
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_a_long_content_type_does_not_fail_its_batch(self) -> None:
        """
        The proxy takes any ASCII Content-Type a client sends. A write with a
        long one (2000 characters) must not make the node refuse the batch it
        travels in, failing the unrelated writes beside it; it should be
        stored like any other.
        """
        self.use()
        ctype = "application/x." + "a" * 2000
        requests = [self.put(f"n{i}", b"v") for i in range(2)]
        requests.append(self.put("long", b"x", ctype))
        requests += [self.put(f"n{i}", b"v") for i in range(2, 5)]
        replies = self.run_all(requests)
        self.assertEqual([r.code for r in replies], [201] * 6, [r.body[:200] for r in replies])
        got = self.run_all([self.get("long")])[0]
        self.assertEqual((got.code, got.header("content-type")), (200, ctype))

    def test_a_stored_long_content_type_reads_in_a_batch(self) -> None:
        """
        A record with a long content type written without batching (depth 0
        is a supported setting) must stay readable once batching is on, and
        must not fail the other reads that share its batch.
        """
        self.use(pipeline_depth=0)
        ctype = "application/x." + "a" * 2000
        self.assertEqual(self.run_all([self.put("long", b"x", ctype)])[0].code, 201)
        self.assertEqual(self.run_all([self.put("short", b"y")])[0].code, 201)
        self.cluster.replica_client.pipeline_depth = 1
        replies = self.run_all([self.get("short"), self.get("long"), self.get("short")])
        self.assertEqual([r.code for r in replies], [200] * 3, [r.body[:200] for r in replies])
        self.assertEqual(replies[1].header("content-type"), ctype)


# -- what the client counts ---------------------------------------------------------


def test_calls_are_counted_by_node_op_and_outcome() -> None:
    """Found, missing, refused and busy, each under its own outcome, with a latency each."""
    found = StubTreq(Scripted(200, b"v", {**GOOD_VERSION, b"content-type": b"text/plain"}))
    client = make_client(found, MemoryReactorClock(), "get")
    outcome(client.replica_get(NODE_ID, "k"), found)
    missing = StubTreq(Scripted(404, b'{"error": "not_found", "message": "no record"}'))
    client2 = ReplicaClient(missing, MemoryReactorClock(), TIMEOUT, metrics=client.metrics)
    outcome(client2.replica_get(NODE_ID, "k"), missing)
    refused = StubTreq(Scripted(507, b'{"error": "storage_full", "message": "full"}'))
    client3 = ReplicaClient(refused, MemoryReactorClock(), TIMEOUT, metrics=client.metrics)
    error_of(client3.replica_put(NODE_ID, "k", Record(V1, b"v")), refused)
    busy, _, _ = capped(1)
    busy.replica_put(NODE_ID, "a", value_of(10))
    error_of(busy.replica_put(NODE_ID, "b", value_of(10)))

    def count(c: ReplicaClient, op: str, result: str) -> float | None:
        labels = {"node": NODE_ID, "op": op, "outcome": result}
        return c.metrics.registry.get_sample_value("shardkv_replica_operations_total", labels)

    assert [count(client, "get", o) for o in ("ok", "not_found")] == [1, 1]
    assert count(client, "put", "refused") == 1
    assert count(busy, "put", "busy") == 1
    seconds = client.metrics.registry.get_sample_value(
        "shardkv_replica_operation_duration_seconds_count", {"node": NODE_ID, "op": "get"}
    )
    assert seconds == 2


def test_batch_counts_carry_over_epochs_and_the_queue_is_a_gauge() -> None:
    """A new epoch's pipeline keeps counting where the old one stopped; what waits is served."""
    client, http, _ = capped(1 << 30, depth=1)
    for n, epoch in enumerate((1, 2, 2)):
        client.replica_put(NODE_ID, f"k{n}", value_of(1), epoch=epoch)
    stats = client.pipeline_stats(NODE_ID)["write"]
    assert (stats["batches"], stats["ops"], stats["queued"]) == (2, 2, 1)
    assert len(http.sent) == 2
    registry = client.metrics.registry
    labels = {"node": NODE_ID, "kind": "write"}
    assert registry.get_sample_value("shardkv_pipeline_batches_total", labels) == 2
    assert registry.get_sample_value("shardkv_pipeline_queue_depth", labels) == 1
    assert registry.get_sample_value("shardkv_pipeline_batch_operations_count", labels) == 2
