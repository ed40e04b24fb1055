"""
Tests for L{shardkv.metrics}: the metric objects each service keeps on its own registry.

Each object is fed directly and its registry read back, through the text
format and C{prometheus_client}'s own parser where the output matters, so
the names the dashboard reads stay what the shared notes say.
"""

from __future__ import annotations

import re
import time
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

from shardkv.core.records import Record
from shardkv.errors import (
    BadReplicaAnswer,
    NodeBusy,
    NodeTimeout,
    NodeUnreachable,
    NotFound,
    Overloaded,
    QuorumTimeout,
    QuorumUnavailable,
    ReplicaRefused,
)
from shardkv.metrics import (
    HTTPMetrics,
    NodeMetrics,
    PipelineMeter,
    ProxyMetrics,
    ReplicaMetrics,
    counter_value,
    render,
)
from tests.replica.helpers import V1

NODE = "127.0.0.1:8081"


PROXY_FAMILIES = {
    "shardkv_http_requests",
    "shardkv_http_request_duration_seconds",
    "shardkv_replica_operations",
    "shardkv_replica_operation_duration_seconds",
    "shardkv_pipeline_batches",
    "shardkv_pipeline_batch_operations",
    "shardkv_pipeline_queue_depth",
    "shardkv_quorum_outcomes",
    "shardkv_read_repairs",
    "shardkv_read_hedges",
    "shardkv_reads_of_all",
    "shardkv_one_round_retries",
    "shardkv_one_round_fallbacks",
    "shardkv_hints_queued",
    "shardkv_hints_delivered",
    "shardkv_hints_waiting",
    "shardkv_node_up",
    "shardkv_node_health_flips",
    "shardkv_map_epoch",
    "shardkv_rebalance_keys_moved",
    "shardkv_rebalance_keys_total",
    "shardkv_rebalance_state",
}
"""The families a proxy exports (the shared notes' names), for this module and the
real-process test."""

NODE_FAMILIES = {
    "shardkv_http_requests",
    "shardkv_storage_commits",
    "shardkv_storage_group_operations",
    "shardkv_storage_commit_seconds",
    "shardkv_storage_fsync_seconds",
    "shardkv_storage_used_bytes",
    "shardkv_storage_free_bytes",
    "shardkv_handoff_delivered",
    "shardkv_tombstones_collected",
    "shardkv_hints_waiting",
    "shardkv_map_epoch",
}
"""The families a node exports."""


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def families(registry: CollectorRegistry) -> dict[str, Any]:
    """The registry's text output, parsed back: family name to family."""
    return {f.name: f for f in text_string_to_metric_families(render(registry).decode())}


def test_http_counts_by_route_method_and_status_with_latency() -> None:
    """One request is one count under its route, method and status, and one observation."""
    registry = CollectorRegistry()
    http = HTTPMetrics(registry)
    http.observe("/kv/<key>", b"GET", 200, 0.002)
    http.observe("/kv/<key>", b"GET", 200, 0.004)
    http.observe("/kv/<key>", b"PUT", 201, 0.001)
    labels = {"route": "/kv/<key>", "method": "GET", "status": "200"}
    assert sample(registry, "shardkv_http_requests_total", **labels) == 2
    put = {"route": "/kv/<key>", "method": "PUT", "status": "201"}
    assert sample(registry, "shardkv_http_requests_total", **put) == 1
    count = "shardkv_http_request_duration_seconds_count"
    assert sample(registry, count, route="/kv/<key>") == 3
    seconds = sample(registry, "shardkv_http_request_duration_seconds_sum", route="/kv/<key>")
    assert seconds is not None and abs(seconds - 0.007) < 1e-9


def test_an_invented_method_is_counted_as_other() -> None:
    """A client picks the method: one it made up must not become a label value of its own."""
    registry = CollectorRegistry()
    http = HTTPMetrics(registry)
    for method in (b"BREW", b"WHEN", b"GET"):
        http.observe("other", method, 405, 0.0)
    other = {"route": "other", "method": "OTHER", "status": "405"}
    assert sample(registry, "shardkv_http_requests_total", **other) == 2
    names = {s.labels["method"] for s in families(registry)["shardkv_http_requests"].samples}
    assert names == {"OTHER", "GET"}


def test_replica_operations_by_outcome() -> None:
    """Each way a replica call ends is one outcome; the result passes through untouched."""
    registry = CollectorRegistry()
    ops = ReplicaMetrics(registry).node(NODE)
    record = Record(V1, b"v")
    assert ops.got(record, 0.0) is record
    assert ops.got(None, 0.0) is None
    failures = {
        "timeout": NodeTimeout(NODE, 1.0),
        "unreachable": NodeUnreachable(NODE, "refused", sent=False),
        "busy": NodeBusy(NODE, 10),
        "refused": ReplicaRefused(NODE, "stale_epoch", "old"),
        "cancelled": CancelledError(),
    }
    for failure in failures.values():
        f = Failure(failure)
        assert ops.got(f, 0.0) is f
        f.trap(Exception)
    ops.put(Failure(BadReplicaAnswer(NODE, "nonsense")), 0.0).trap(BadReplicaAnswer)
    assert ops.put(True, 0.0) is True

    def count(op: str, outcome: str) -> float | None:
        name = "shardkv_replica_operations_total"
        return sample(registry, name, node=NODE, op=op, outcome=outcome)

    for outcome in ("ok", "not_found", *failures):
        assert count("get", outcome) == 1, outcome
    assert (count("put", "ok"), count("put", "refused"), count("put", "busy")) == (1, 1, 0)
    duration = "shardkv_replica_operation_duration_seconds_count"
    assert sample(registry, duration, node=NODE, op="get") == 7
    assert sample(registry, duration, node=NODE, op="put") == 2


def test_pipeline_meters_last_per_node_and_kind() -> None:
    """A meter is shared by every pipeline of a node and kind; batches and sizes are served."""
    registry = CollectorRegistry()
    replica = ReplicaMetrics(registry)
    meter = replica.meter(NODE, "read")
    assert replica.meter(NODE, "read") is meter
    meter.batch(1)
    meter.batch(5)
    replica.watch(lambda: [(NODE, "read", 3)])
    assert (meter.batches, meter.ops) == (2, 6)
    labels = {"node": NODE, "kind": "read"}
    assert sample(registry, "shardkv_pipeline_batches_total", **labels) == 2
    assert sample(registry, "shardkv_pipeline_batch_operations_sum", **labels) == 6
    assert sample(registry, "shardkv_pipeline_batch_operations_bucket", le="4.0", **labels) == 1
    assert sample(registry, "shardkv_pipeline_queue_depth", **labels) == 3


def test_a_meter_without_a_histogram_still_counts() -> None:
    """What a lone pipeline (a test's, a tool's) uses."""
    meter = PipelineMeter()
    meter.batch(3)
    assert (meter.batches, meter.ops) == (1, 3)


def test_quorum_outcomes() -> None:
    """Quorum errors count by kind; other errors (a failed precondition) are not about quorums."""
    metrics = ProxyMetrics.private()
    metrics.quorum_outcome(False, None)
    metrics.quorum_outcome(True, QuorumUnavailable("few"))
    metrics.quorum_outcome(True, QuorumTimeout("slow"))
    metrics.quorum_outcome(False, Overloaded("busy"))
    metrics.quorum_outcome(False, NotFound("no"))

    def count(op: str, outcome: str) -> float | None:
        return sample(metrics.registry, "shardkv_quorum_outcomes_total", op=op, outcome=outcome)

    assert count("read", "ok") == 1
    assert count("write", "insufficient") == 1
    assert count("write", "timeout") == 1
    assert count("read", "overloaded") == 1
    assert count("write", "ok") == 0


def test_proxy_state_is_read_at_scrape_time() -> None:
    """Health, hints waiting, the epoch and a move's progress come from the callables given."""
    metrics = ProxyMetrics.private()
    state: dict[str, Any] = {"epoch": 3, "up": True}
    status = {"state": "copying", "keys_moved": 40, "keys_total": 100}
    metrics.watch(
        up=lambda: [("a", bool(state["up"])), ("b", False)],
        hints_waiting=lambda: [("b", 7)],
        epoch=lambda: int(state["epoch"]),
        rebalance=lambda: status,
    )
    metrics.flipped("b", "down")
    r = metrics.registry
    assert (sample(r, "shardkv_node_up", node="a"), sample(r, "shardkv_node_up", node="b")) == (
        1,
        0,
    )
    assert sample(r, "shardkv_hints_waiting", node="b") == 7
    assert sample(r, "shardkv_map_epoch") == 3
    assert sample(r, "shardkv_rebalance_keys_moved") == 40
    assert sample(r, "shardkv_rebalance_keys_total") == 100
    assert sample(r, "shardkv_rebalance_state", state="copying") == 1
    assert sample(r, "shardkv_rebalance_state", state="idle") == 0
    assert sample(r, "shardkv_node_health_flips_total", node="b", to="down") == 1
    state.update(epoch=4, up=False)
    assert sample(r, "shardkv_map_epoch") == 4
    assert sample(r, "shardkv_node_up", node="a") == 0


def test_node_state_is_read_at_scrape_time() -> None:
    """Commits and bytes come from the engine's health details; unknown sizes are left out."""
    metrics = NodeMetrics.private()
    details: dict[str, object] = {"commits": 5, "used_bytes": 4096, "free_bytes": None}
    metrics.watch(storage=lambda: details, hints_waiting=lambda: {"b": 2}, epoch=lambda: 9)
    r = metrics.registry
    assert sample(r, "shardkv_storage_commits_total") == 5
    assert sample(r, "shardkv_storage_used_bytes") == 4096
    assert sample(r, "shardkv_storage_free_bytes") is None
    assert sample(r, "shardkv_hints_waiting", node="b") == 2
    assert sample(r, "shardkv_map_epoch") == 9
    metrics.storage.commit_seconds.observe(0.001)
    metrics.storage.group_operations.observe(12)
    metrics.tombstones_collected.inc()
    assert sample(r, "shardkv_storage_commit_seconds_count") == 1
    assert sample(r, "shardkv_storage_group_operations_sum") == 12
    assert counter_value(metrics.tombstones_collected) == 1
    assert counter_value(metrics.handoff_delivered) == 0


def test_services_in_one_process_do_not_collide() -> None:
    """Two proxies and two nodes in one process: each registry holds its own counts."""
    first, second = ProxyMetrics.private(), ProxyMetrics.private()
    NodeMetrics.private()
    NodeMetrics.private()
    first.read_repairs.inc()
    assert counter_value(first.read_repairs) == 1
    assert counter_value(second.read_repairs) == 0


def test_every_named_family_is_served() -> None:
    """The names of the shared notes, as C{prometheus_client}'s parser reads them back."""
    proxy = ProxyMetrics.private()
    proxy.watch(up=list, hints_waiting=list, epoch=lambda: 0, rebalance=lambda: {})
    proxy.replica.watch(list)
    node = NodeMetrics.private()
    node.watch(storage=lambda: {"used_bytes": 1, "free_bytes": 2}, hints_waiting=dict, epoch=int)
    assert set(families(proxy.registry)) >= PROXY_FAMILIES
    assert set(families(node.registry)) >= NODE_FAMILIES


def test_http_metrics_export_what_a_prometheus_counter_and_histogram_would() -> None:
    """The counts are plain numbers kept by the site; scraped, they read exactly as the
    prometheus_client metrics they replace (names, help, labels, buckets, created)."""
    from prometheus_client import Counter, Histogram

    from shardkv.metrics import HTTP_METHODS, LATENCY_BUCKETS

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    http = HTTPMetrics(ours)
    requests = Counter(
        HTTPMetrics.REQUESTS,
        HTTPMetrics.REQUESTS_HELP,
        ["route", "method", "status"],
        registry=theirs,
    )
    duration = Histogram(
        HTTPMetrics.DURATION,
        HTTPMetrics.DURATION_HELP,
        ["route"],
        buckets=LATENCY_BUCKETS,
        registry=theirs,
    )
    seen = [
        ("/get", b"GET", 200, 0.0003),
        ("/get", b"GET", 200, 0.0005),  # on a bucket's bound: counted in it
        ("/get", b"HEAD", 404, 0.002),
        ("/kv/<key>", b"PUT", 201, 0.7),
        ("other", b"BREW", 405, 20.0),  # past the last bound: +Inf only
        ("other", b"GET", 404, 0.0),
    ]
    for route, method, status, seconds in seen:
        http.observe(route, method, status, seconds)
        shown = method.decode() if method in HTTP_METHODS else "OTHER"
        requests.labels(route, shown, str(status)).inc()
        duration.labels(route).observe(seconds)

    def text(registry: CollectorRegistry) -> str:
        return re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", render(registry).decode())

    assert text(ours) == text(theirs)
    created = sample(
        ours, "shardkv_http_requests_created", route="/get", method="GET", status="200"
    )
    assert created is not None and abs(created - time.time()) < 60
