"""
Tests for the map-era parts of L{shardkv.replica.client}: the epoch fence's
header, a node's ``stale_epoch`` refusal as L{NodeHasNewerMap} (and the
``newer_map`` hook), pipelines kept per epoch, the per-call timeout, and the
JSON calls of the map and move routes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from shardkv.core.records import Record
from shardkv.errors import BadReplicaAnswer, NodeHasNewerMap, NodeTimeout, ReplicaRefused
from shardkv.replica import codec
from shardkv.replica.client import PLAN_TIMEOUT, ReplicaClient
from shardkv.replica.codec import GetOp, PutOp, Result, encode_response
from shardkv.testing.memory import FaultyHTTP
from tests.helpers import answered, flusher
from tests.replica.helpers import NODE_ID, TIMEOUT, V1

MAP = {"cluster_id": "c" * 16, "epoch": 5, "members": []}


class Recorder(Resource):
    """A node that records each request and answers with ``answer(request)``."""

    isLeaf = True

    def __init__(self, answer: Callable[[Request, bytes], tuple[int, bytes]]) -> None:
        super().__init__()
        self.answer = answer
        self.seen: list[dict[str, Any]] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        body = request.content.read()
        self.seen.append(
            {
                "method": request.method.decode(),
                "path": request.path.decode(),
                "epoch": request.getHeader(b"x-shardkv-epoch"),
                "body": body,
            }
        )
        status, payload = self.answer(request, body)
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return payload


def ok_batch(request: Request, body: bytes) -> tuple[int, bytes]:
    """Answer a batch (or stream, or a single PUT/GET) as a healthy node would."""
    path = request.path.decode()
    if path in ("/replica/batch", "/replica/stream"):
        ops = codec.decode_request(body)
        results = [
            Result(404) if isinstance(op, GetOp) else Result(200, applied=True) for op in ops
        ]
        return 200, encode_response(results)
    if request.method == b"PUT":
        return 200, b'{"applied": true}'
    return 404, b'{"error": "not_found", "message": "no"}'


def stale(request: Request, body: bytes) -> tuple[int, bytes]:
    payload = {"error": "stale_epoch", "message": "the node has epoch 5", "epoch": 5, "map": MAP}
    return 409, json.dumps(payload).encode()


def run(d: Deferred[Any], stub: StubTreq) -> Any:
    flusher(stub)(d)
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the call did not finish"
    return box[0]


def client_for(
    resource: Resource, depth: int = 0, clock: MemoryReactorClock | None = None
) -> tuple[ReplicaClient, StubTreq]:
    stub = StubTreq(resource)
    return ReplicaClient(stub, clock or MemoryReactorClock(), TIMEOUT, depth), stub


CALLS: dict[str, Callable[[ReplicaClient, int | None], Deferred[Any]]] = {
    "get": lambda c, e: c.replica_get(NODE_ID, "k", epoch=e),
    "put": lambda c, e: c.replica_put(NODE_ID, "k", Record(V1, b"v"), epoch=e),
    "batch": lambda c, e: Deferred.fromCoroutine(c.send_batch(NODE_ID, [GetOp("k")], e)),
    "stream": lambda c, e: Deferred.fromCoroutine(
        c.send_stream(NODE_ID, [PutOp("k", Record(V1, b"v"))], e)
    ),
}


@pytest.mark.parametrize("depth", [0, 1])
@pytest.mark.parametrize("call", sorted(CALLS))
def test_every_replica_call_carries_its_epoch(call: str, depth: int) -> None:
    """
    The epoch an operation was planned at travels in X-Shardkv-Epoch, batched
    or not; without an epoch no header is sent (a node then checks nothing).
    """
    node = Recorder(ok_batch)
    client, stub = client_for(node, depth)
    run(CALLS[call](client, 7), stub)
    run(CALLS[call](client, None), stub)
    assert [s["epoch"] for s in node.seen] == [b"7", None]


def test_stream_posts_to_the_stream_route() -> None:
    node = Recorder(ok_batch)
    client, stub = client_for(node)
    results = run(CALLS["stream"](client, 3), stub)
    assert [r.applied for r in results] == [True]
    assert node.seen[0]["path"] == "/replica/stream"


@pytest.mark.parametrize("depth", [0, 1])
@pytest.mark.parametrize("call", sorted(CALLS))
def test_stale_epoch_raises_node_has_newer_map_and_calls_the_hook(call: str, depth: int) -> None:
    """
    A node that learned a newer map refuses with 409 stale_epoch and its map:
    the call fails with NodeHasNewerMap (nothing applied, sent=False) holding
    the map, after the newer_map hook saw it.
    """
    client, stub = client_for(Recorder(stale), depth)
    seen: list[dict[str, Any]] = []
    client.newer_map = seen.append
    result = run(CALLS[call](client, 1), stub)
    assert isinstance(result, Failure)
    error = result.value
    assert isinstance(error, NodeHasNewerMap), error
    assert isinstance(error, ReplicaRefused)
    assert (error.code, error.sent, error.node, error.map) == ("stale_epoch", False, NODE_ID, MAP)
    assert seen == [MAP]


def test_a_failing_hook_does_not_change_the_error() -> None:
    client, stub = client_for(Recorder(stale))

    def broken(_: dict[str, Any]) -> None:
        raise ValueError("not a map")

    client.newer_map = broken
    result = run(client.replica_get(NODE_ID, "k", epoch=1), stub)
    assert isinstance(result.value, NodeHasNewerMap)


def test_stale_epoch_without_a_map_is_a_plain_refusal() -> None:
    def answer(request: Request, body: bytes) -> tuple[int, bytes]:
        return 409, b'{"error": "stale_epoch", "message": "old"}'

    client, stub = client_for(Recorder(answer))
    error = run(client.replica_get(NODE_ID, "k", epoch=1), stub).value
    assert type(error) is ReplicaRefused and error.code == "stale_epoch"


def test_pipelines_are_kept_per_epoch_and_older_ones_are_dropped() -> None:
    """
    A batch never mixes epochs: each epoch has its own pipeline, and once a
    newer epoch is used the older pipeline leaves the dict (its counters carry
    over into the new one, so /cluster's totals keep counting).
    """
    node = Recorder(ok_batch)
    client, stub = client_for(node, depth=1)
    run(client.replica_get(NODE_ID, "a", epoch=1), stub)
    run(client.replica_put(NODE_ID, "a", Record(V1, b"v"), epoch=1), stub)
    assert set(client.pipelines) == {(NODE_ID, "read", 1), (NODE_ID, "write", 1)}
    run(client.replica_get(NODE_ID, "b", epoch=2), stub)
    assert set(client.pipelines) == {(NODE_ID, "read", 2), (NODE_ID, "write", 1)}
    assert client.pipeline_stats(NODE_ID)["read"]["batches"] == 2
    # A late operation planned at epoch 1 still goes (and is refused or not by
    # the node), in a pipeline of its own that is not kept.
    run(client.replica_get(NODE_ID, "c", epoch=1), stub)
    assert set(client.pipelines) == {(NODE_ID, "read", 2), (NODE_ID, "write", 1)}
    assert [s["epoch"] for s in node.seen] == [b"1", b"1", b"2", b"1"]


def test_ops_of_two_epochs_queued_together_leave_in_separate_batches() -> None:
    """
    Operations queued behind in-flight batches leave with their own epoch's
    batch: the epoch-1 pipeline, though dropped from the dict, still sends
    what waited in it, at epoch 1.
    """
    held: list[Deferred[list[Result]]] = []
    sent: list[tuple[int | None, list[str]]] = []
    client = ReplicaClient(None, MemoryReactorClock(), TIMEOUT, pipeline_depth=1)

    def fake(node: str, ops: Any, epoch: int | None = None) -> Deferred[list[Result]]:
        sent.append((epoch, [op.key for op in ops]))
        d: Deferred[list[Result]] = Deferred()
        held.append(d)
        return d

    client._send_batch = fake  # type: ignore[method-assign]
    gets = [
        client.replica_get(NODE_ID, k, epoch=e) for k, e in [("a", 1), ("b", 1), ("c", 2), ("d", 2)]
    ]
    assert sent == [(1, ["a"]), (2, ["c"])]
    held[0].callback([Result(404)])
    held[1].callback([Result(404)])
    assert sent == [(1, ["a"]), (2, ["c"]), (1, ["b"]), (2, ["d"])]
    for d in held[2:]:
        d.callback([Result(404)])
    assert all(answered(g) for g in gets)


def json_node(answer: dict[str, Any], status: int = 200) -> Recorder:
    return Recorder(lambda request, body: (status, json.dumps(answer).encode()))


MAP_CALLS: dict[str, tuple[Callable[[ReplicaClient], Any], str, str, Any]] = {
    "get_map": (lambda c: c.get_map(NODE_ID), "GET", "/replica/map", None),
    "prepare": (
        lambda c: c.prepare(NODE_ID, (3, "p")),
        "POST",
        "/replica/map/prepare",
        {"ballot": [3, "p"]},
    ),
    "accept": (
        lambda c: c.accept(NODE_ID, (3, "p"), MAP),
        "POST",
        "/replica/map/accept",
        {"ballot": [3, "p"], "map": MAP},
    ),
    "learn": (lambda c: c.learn(NODE_ID, MAP), "POST", "/replica/map/learn", {"map": MAP}),
    "move_status": (lambda c: c.move_status(NODE_ID), "GET", "/replica/move", None),
    "plan": (lambda c: c.plan(NODE_ID, MAP), "POST", "/replica/plan", {"map": MAP}),
    "plan_keys": (
        lambda c: c.plan_keys(NODE_ID, MAP, "n2", "k", 100),
        "POST",
        "/replica/plan/keys",
        {"map": MAP, "to": "n2", "cursor": "k", "limit": 100},
    ),
}


@pytest.mark.parametrize("name", sorted(MAP_CALLS))
def test_map_and_move_calls_are_json_exchanges(name: str) -> None:
    call, method, path, body = MAP_CALLS[name]
    node = json_node({"answer": name})
    client, stub = client_for(node)
    assert run(Deferred.fromCoroutine(call(client)), stub) == {"answer": name}
    seen = node.seen[0]
    assert (seen["method"], seen["path"]) == (method, path)
    assert (json.loads(seen["body"]) if seen["body"] else None) == body


@pytest.mark.parametrize("name", sorted(MAP_CALLS))
def test_map_call_errors_are_domain_errors(name: str) -> None:
    call = MAP_CALLS[name][0]
    client, stub = client_for(json_node({"error": "foreign_cluster", "message": "other"}, 409))
    error = run(Deferred.fromCoroutine(call(client)), stub).value
    assert isinstance(error, ReplicaRefused) and error.code == "foreign_cluster"
    client, stub = client_for(Recorder(lambda r, b: (200, b"[1, 2]")))
    error = run(Deferred.fromCoroutine(call(client)), stub).value
    assert isinstance(error, BadReplicaAnswer)


def test_plan_calls_get_a_longer_timeout_and_others_an_override() -> None:
    """
    A plan scans every record on the node, so it gets PLAN_TIMEOUT rather
    than the replica timeout; any map call may pass its own timeout.
    """
    clock = MemoryReactorClock()
    network = FaultyHTTP(StubTreq(json_node({})))
    network.hung.add(NODE_ID)
    client = ReplicaClient(network, clock, TIMEOUT)
    plan = Deferred.fromCoroutine(client.plan(NODE_ID, MAP))
    quick = Deferred.fromCoroutine(client.get_map(NODE_ID, timeout=0.5))
    plain = Deferred.fromCoroutine(client.get_map(NODE_ID))
    clock.advance(0.5)
    assert answered(quick) and not answered(plain)
    clock.advance(TIMEOUT)
    assert answered(plain) and not answered(plan)
    clock.advance(PLAN_TIMEOUT)
    failures: list[Failure] = []
    for d in (quick, plain, plan):
        d.addErrback(failures.append)
    assert [f.value.seconds for f in failures if isinstance(f.value, NodeTimeout)] == [
        0.5,
        TIMEOUT,
        PLAN_TIMEOUT,
    ]
