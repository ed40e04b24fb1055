"""Prometheus metrics: what a proxy or a node counts, on a registry of its own.

Why a registry per service and never the global default: ``twistd shardkv
cluster`` runs three nodes and a proxy in one process, and the tests build
many services side by side; each must count its own requests and serve its
own ``GET /metrics`` (L{shardkv.web.metricsroutes}). So every metric here is
created on the registry its service passes in, and every part that counts
takes its metrics object as an optional argument: without one it makes a
private one (L{ProxyMetrics.private}, L{NodeMetrics.private}), which counts
into a registry nobody reads, so existing constructors and tests keep working.

The hot path pays only for cheap increments: a labelled child is bound once
(per node, per outcome) and kept, so an operation never looks up labels, and
HTTP requests are counted in plain numbers that become metric families only
when scraped (L{HTTPMetrics}); what is *state* rather than an event (queue depths, health, bytes on
disk, the map's epoch, a move's progress) is read only when ``/metrics`` is
scraped, by L{StateCollector}s. The names are the shared notes' (issue 9);
the dashboard reads them.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

from shardkv.errors import (
    NodeBusy,
    NodeTimeout,
    NodeUnreachable,
    Overloaded,
    QuorumTimeout,
    QuorumUnavailable,
)

__all__ = [
    "CONTENT_TYPE",
    "HTTPMetrics",
    "NodeMetrics",
    "PipelineMeter",
    "ProxyMetrics",
    "ReplicaMetrics",
    "StateCollector",
    "StorageMetrics",
    "counter_value",
    "render",
]

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format, as ``generate_latest`` writes it."""

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Seconds: a replica call takes ~0.2 ms on loopback and up to the timeout (2 s by default)."""

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Operations per batch or commit group: the pipeline caps a batch at 512, a group at 1000."""

HTTP_METHODS = frozenset(
    {b"GET", b"HEAD", b"PUT", b"POST", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE"}
)
"""Methods counted by name; any other is counted as ``OTHER`` (a client picks the
method, and a label value per invented method would grow without bound)."""

OTHER_ROUTE = "other"
"""The route label of a request that matched no route (404, 405, refused by the guard)."""

REPLICA_OUTCOMES = ("ok", "not_found", "refused", "unreachable", "timeout", "busy", "cancelled")
QUORUM_OUTCOMES = ("ok", "insufficient", "timeout", "overloaded")
REBALANCE_STATES = ("idle", "waiting", "copying", "handover", "cleanup")

now = time.monotonic
"""The clock every duration here is measured with."""


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format."""
    return generate_latest(registry)


def counter_value(counter: Counter) -> float:
    """The value of an unlabelled counter (or of one labelled child), read through its
    public C{collect}: for the JSON views and the tests, never on the hot path."""
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                return float(sample.value)
    return 0.0


class StateCollector(Collector):
    """Metrics read from live objects when ``/metrics`` is scraped.

    ``collect`` is a callable yielding metric families; it runs on the
    reactor thread (the scrape is a request like any other), so it may read
    any reactor-side state without a lock.
    """

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return list(self._collect())

    def describe(self) -> Iterable[Metric]:
        # No description up front: the families depend on the live objects.
        return []


def gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def counter_family(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    """``name`` without ``_total`` (the family adds it)."""
    return CounterMetricFamily(name, doc, labels=list(labels))


# -- HTTP ---------------------------------------------------------------------


class HTTPMetrics(Collector):
    """``shardkv_http_requests_total{route,method,status}`` and its latency by route.

    The route is the Klein rule that answered (``/kv/<key>``, not the path),
    so a key never becomes a label value. Fed by the site once each request
    has finished (L{shardkv.web.site.QuietSite.log}).

    Why plain counts instead of a prometheus_client C{Counter} and
    C{Histogram}: their children take a lock per increment, and the pair cost
    3.5 us per request, about 8 % of a node's CPU for a GET. Every
    request is counted on the reactor thread, and ``/metrics`` is scraped on
    it too, so a count is a list item incremented in place, and the families
    are built when scraped: the same names, help, labels, buckets and
    ``_created`` samples the two metrics gave.
    """

    REQUESTS = "shardkv_http_requests"
    REQUESTS_HELP = "HTTP requests answered, by Klein route (other: no route), method and status."
    DURATION = "shardkv_http_request_duration_seconds"
    DURATION_HELP = "Seconds from a request's last byte in to its answer's last byte out, by route."

    def __init__(self, registry: CollectorRegistry) -> None:
        self._counts: dict[tuple[str, bytes, int], list[float]] = {}
        """(route, method, status) -> [count, created]."""
        self._latency: dict[str, list[float]] = {}
        """route -> [count per bucket (the last one +Inf)..., sum, created]."""
        registry.register(self)

    def observe(self, route: str, method: bytes, status: int, seconds: float) -> None:
        if method not in HTTP_METHODS:
            method = b"OTHER"
        key = (route, method, status)
        counted = self._counts.get(key)
        if counted is None:
            counted = self._counts[key] = [0, time.time()]
        counted[0] += 1
        latency = self._latency.get(route)
        if latency is None:
            latency = self._latency[route] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0, time.time()]
        latency[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        latency[-2] += seconds

    def describe(self) -> Iterable[Metric]:
        return self._families(empty=True)

    def collect(self) -> Iterable[Metric]:
        return self._families()

    def _families(self, empty: bool = False) -> list[Metric]:
        requests = CounterMetricFamily(
            self.REQUESTS, self.REQUESTS_HELP, labels=["route", "method", "status"]
        )
        duration = HistogramMetricFamily(self.DURATION, self.DURATION_HELP, labels=["route"])
        if not empty:
            for (route, method, status), (count, created) in self._counts.items():
                labels = [route, method.decode("ascii"), str(status)]
                requests.add_metric(labels, count, created=created)
            for route, latency in self._latency.items():
                cumulative, buckets = 0.0, []
                for bound, count in zip(_BUCKET_LABELS, latency[:-2], strict=True):
                    cumulative += count
                    buckets.append((bound, cumulative))
                duration.add_metric([route], buckets, latency[-2])
                # HistogramMetricFamily takes no created time; a Histogram exports one.
                since = Sample(self.DURATION + "_created", {"route": route}, latency[-1])
                duration.samples.append(since)
        return [requests, duration]


_BUCKET_LABELS = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]


# -- replica calls and pipelines ------------------------------------------------


def _outcome(failure: Failure) -> str:
    return _outcome_of(failure.value)


def _outcome_of(error: BaseException | None) -> str:
    if isinstance(error, NodeBusy):
        return "busy"
    if isinstance(error, NodeTimeout):
        return "timeout"
    if isinstance(error, NodeUnreachable):
        return "unreachable"
    if isinstance(error, CancelledError):
        return "cancelled"
    # The node answered with an error or with nonsense (L{ReplicaCallFailed}'s
    # other kinds), or the call failed in a way it did not sort.
    return "refused"


class _NodeOps:
    """One node's replica-operation children, bound once: what each call increments."""

    __slots__ = ("get_outcomes", "get_seconds", "put_outcomes", "put_seconds")

    def __init__(self, ops: Counter, seconds: Histogram, node: str) -> None:
        self.get_outcomes = {o: ops.labels(node, "get", o) for o in REPLICA_OUTCOMES}
        self.put_outcomes = {o: ops.labels(node, "put", o) for o in REPLICA_OUTCOMES}
        self.get_seconds = seconds.labels(node, "get")
        self.put_seconds = seconds.labels(node, "put")

    def got(self, result: Any, started: float) -> Any:
        """addBoth for a replica read: count it, pass its result on untouched."""
        self.get_seconds.observe(now() - started)
        if isinstance(result, Failure):
            self.get_outcomes[_outcome(result)].inc()
        else:
            self.get_outcomes["ok" if result is not None else "not_found"].inc()
        return result

    def put(self, result: Any, started: float) -> Any:
        """addBoth for a replica write."""
        self.put_seconds.observe(now() - started)
        if isinstance(result, Failure):
            self.put_outcomes[_outcome(result)].inc()
        else:
            self.put_outcomes["ok"].inc()
        return result

    # The same counts for a caller answered by plain calls, not a Deferred
    # (L{shardkv.replica.client.ReplicaClient.get_into}).

    def got_record(self, found: bool, started: float) -> None:
        self.get_seconds.observe(now() - started)
        self.get_outcomes["ok" if found else "not_found"].inc()

    def put_ok(self, started: float) -> None:
        self.put_seconds.observe(now() - started)
        self.put_outcomes["ok"].inc()

    def failed(self, op: str, error: BaseException, started: float) -> None:
        """A read (``op`` "get") or write ("put") that failed with ``error``."""
        if op == "get":
            self.get_seconds.observe(now() - started)
            self.get_outcomes[_outcome_of(error)].inc()
        else:
            self.put_seconds.observe(now() - started)
            self.put_outcomes[_outcome_of(error)].inc()


class PipelineMeter:
    """One node's pipeline of one kind (read or write), across epochs.

    ``batches`` and ``ops`` are what ``/cluster`` shows; the registry reads
    ``batches`` at scrape time (``shardkv_pipeline_batches_total``) and gets
    each batch's size as it leaves (``shardkv_pipeline_batch_operations``).
    """

    __slots__ = ("_sizes", "batches", "ops")

    def __init__(self, sizes: Any = None) -> None:
        """``sizes``: the histogram child batch sizes go to (None: counts only)."""
        self._sizes = sizes
        self.batches = 0
        self.ops = 0

    def batch(self, size: int) -> None:
        self.batches += 1
        self.ops += size
        if self._sizes is not None:
            self._sizes.observe(size)


class ReplicaMetrics:
    """Replica operations by node and outcome, and the pipelines' batches.

    ``shardkv_replica_operations_total{node,op,outcome}`` (op get|put; outcome
    ok, not_found, refused, unreachable, timeout, busy, or cancelled when the
    client hung up first), ``shardkv_replica_operation_duration_seconds{node,op}``,
    ``shardkv_pipeline_batches_total{node,kind}``,
    ``shardkv_pipeline_batch_operations{node,kind}``. The queue depth gauge is
    read from the replica client at scrape time (L{ReplicaMetrics.watch}).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.ops = Counter(
            "shardkv_replica_operations",
            "Replica reads and writes by node, op and outcome.",
            ["node", "op", "outcome"],
            registry=registry,
        )
        self.seconds = Histogram(
            "shardkv_replica_operation_duration_seconds",
            "Seconds a replica read or write took, queueing in its pipeline included.",
            ["node", "op"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_sizes = Histogram(
            "shardkv_pipeline_batch_operations",
            "Operations per batch sent to a node.",
            ["node", "kind"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self._nodes: dict[str, _NodeOps] = {}
        self.meters: dict[tuple[str, str], PipelineMeter] = {}
        self._queues: list[Callable[[], Iterable[tuple[str, str, int]]]] = []

    @classmethod
    def private(cls) -> ReplicaMetrics:
        """Metrics nobody scrapes: for a replica client built without a service."""
        return cls(CollectorRegistry())

    def node(self, node: str) -> _NodeOps:
        ops = self._nodes.get(node)
        if ops is None:
            ops = self._nodes[node] = _NodeOps(self.ops, self.seconds, node)
        return ops

    def meter(self, node: str, kind: str) -> PipelineMeter:
        meter = self.meters.get((node, kind))
        if meter is None:
            meter = PipelineMeter(self.batch_sizes.labels(node, kind))
            self.meters[(node, kind)] = meter
        return meter

    def watch(self, queued: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        """Serve the batch counts, and ``queued()``'s (node, kind, depth) as the queue gauge
        (summed over every client that shares these metrics)."""
        self._queues.append(queued)
        if len(self._queues) == 1:
            self.registry.register(StateCollector(self._collect))

    def _collect(self) -> Iterable[Metric]:
        batches = counter_family(
            "shardkv_pipeline_batches", "Batches sent to a node.", ["node", "kind"]
        )
        for (node, kind), meter in sorted(self.meters.items()):
            batches.add_metric([node, kind], meter.batches)
        depth = gauge(
            "shardkv_pipeline_queue_depth",
            "Operations waiting for a batch to a node.",
            ["node", "kind"],
        )
        depths: dict[tuple[str, str], int] = {}
        for queued in self._queues:
            for node, kind, n in queued():
                depths[(node, kind)] = depths.get((node, kind), 0) + n
        for (node, kind), n in sorted(depths.items()):
            depth.add_metric([node, kind], n)
        return [batches, depth]


# -- the proxy ------------------------------------------------------------------


class ProxyMetrics:
    """Everything a proxy counts (see the module docstring and the shared notes)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.http = HTTPMetrics(registry)
        self.replica = ReplicaMetrics(registry)
        quorum = Counter(
            "shardkv_quorum_outcomes",
            "Client reads and writes by quorum outcome (insufficient: too few replicas).",
            ["op", "outcome"],
            registry=registry,
        )
        self.quorum = {
            (op, outcome): quorum.labels(op, outcome)
            for op in ("read", "write")
            for outcome in QUORUM_OUTCOMES
        }
        self.read_repairs = Counter(
            "shardkv_read_repairs",
            "Stale replicas a read sent the newest record to.",
            registry=registry,
        )
        self.epoch_retries = Counter(
            "shardkv_epoch_retries",
            "Requests run again at a newer cluster map after nodes refused their epoch.",
            registry=registry,
        )
        self.read_hedges = Counter(
            "shardkv_read_hedges",
            "Reads that asked their spare replicas because the first R had not answered "
            "within the hedge delay.",
            registry=registry,
        )
        self.reads_of_all = Counter(
            "shardkv_reads_of_all",
            "Reads that asked all N replicas (the read-all share, or a move) instead of R.",
            registry=registry,
        )
        self.one_round_retries = Counter(
            "shardkv_one_round_retries",
            "One-round write tries sent again, past the newer version a replica refused with.",
            registry=registry,
        )
        self.one_round_fallbacks = Counter(
            "shardkv_one_round_fallbacks",
            "One-round writes that fell back to reading the version first.",
            registry=registry,
        )
        self.hints_queued = Counter(
            "shardkv_hints_queued",
            "Writes a replica missed, for which the proxy sought a hint holder.",
            registry=registry,
        )
        self.hints_delivered = Counter(
            "shardkv_hints_delivered",
            "Missed writes a node took, as a hint or as its own copy.",
            registry=registry,
        )
        self.health_flips = Counter(
            "shardkv_node_health_flips",
            "Times a node's health changed, by the status it changed to.",
            ["node", "to"],
            registry=registry,
        )

    @classmethod
    def private(cls) -> ProxyMetrics:
        """Metrics nobody scrapes: for parts built without a service (tests, tools)."""
        return cls(CollectorRegistry())

    def quorum_outcome(self, write: bool, error: BaseException | None) -> None:
        """Count one client operation; errors that are not about a quorum are not counted."""
        op = "write" if write else "read"
        if error is None:
            outcome = "ok"
        elif isinstance(error, Overloaded):
            outcome = "overloaded"
        elif isinstance(error, QuorumTimeout):
            outcome = "timeout"
        elif isinstance(error, QuorumUnavailable):
            outcome = "insufficient"
        else:
            return
        self.quorum[(op, outcome)].inc()

    def flipped(self, node: str, to: str) -> None:
        self.health_flips.labels(node, to).inc()

    def watch(
        self,
        *,
        up: Callable[[], Iterable[tuple[str, bool]]],
        hints_waiting: Callable[[], Iterable[tuple[str, int]]],
        epoch: Callable[[], int],
        rebalance: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """Serve the state gauges, read at scrape time from the proxy's parts."""

        def collect() -> Iterable[Metric]:
            node_up = gauge("shardkv_node_up", "1 if the node's last check said up.", ["node"])
            for node, is_up in up():
                node_up.add_metric([node], 1 if is_up else 0)
            waiting = gauge(
                "shardkv_hints_waiting",
                "Missed writes waiting for a node: hints its peers hold for it plus the "
                "proxy's own queue.",
                ["node"],
            )
            for node, n in hints_waiting():
                waiting.add_metric([node], n)
            families: list[Metric] = [node_up, waiting, _epoch_gauge(epoch())]
            if rebalance is not None:
                families.extend(_rebalance_gauges(rebalance()))
            return families

        self.registry.register(StateCollector(collect))


def _epoch_gauge(epoch: int) -> GaugeMetricFamily:
    g = gauge("shardkv_map_epoch", "Epoch of the cluster map in force here (0: provisional).")
    g.add_metric([], epoch)
    return g


def _rebalance_gauges(status: dict[str, Any]) -> list[Metric]:
    moved = gauge("shardkv_rebalance_keys_moved", "Keys copied so far by the move in progress.")
    moved.add_metric([], int(status.get("keys_moved") or 0))
    total = gauge("shardkv_rebalance_keys_total", "Keys the move in progress has to copy.")
    total.add_metric([], int(status.get("keys_total") or 0))
    state = gauge(
        "shardkv_rebalance_state", "1 for the move's state (idle when none runs).", ["state"]
    )
    current = str(status.get("state") or "idle")
    for s in sorted({*REBALANCE_STATES, current}):
        state.add_metric([s], 1 if s == current else 0)
    return [moved, total, state]


# -- the node -------------------------------------------------------------------


class StorageMetrics:
    """What the storage engine's commit thread observes (histograms are thread-safe).

    ``shardkv_storage_group_operations``, ``shardkv_storage_commit_seconds``,
    ``shardkv_storage_fsync_seconds`` (explicit syncs: ``--durability batch``
    and shutdown; with ``always`` LMDB syncs inside each commit, so the fsyncs
    are in the commit time). Commit counts and bytes are read at scrape time.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.group_operations = Histogram(
            "shardkv_storage_group_operations",
            "Writes per committed group.",
            buckets=(*BATCH_BUCKETS[:-1], 1000),
            registry=registry,
        )
        self.commit_seconds = Histogram(
            "shardkv_storage_commit_seconds",
            "Seconds a group's commit took (its fsyncs included with --durability always).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.fsync_seconds = Histogram(
            "shardkv_storage_fsync_seconds",
            "Seconds an explicit sync of the storage took.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


class NodeMetrics:
    """Everything a node counts: its requests, its storage, its background work."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.http = HTTPMetrics(registry)
        self.replica = ReplicaMetrics(registry)
        self.storage = StorageMetrics(registry)
        self.handoff_delivered = Counter(
            "shardkv_handoff_delivered",
            "Hints this node handed back to their home node.",
            registry=registry,
        )
        self.tombstones_collected = Counter(
            "shardkv_tombstones_collected",
            "Tombstones dropped after their grace period.",
            registry=registry,
        )

    @classmethod
    def private(cls) -> NodeMetrics:
        """Metrics nobody scrapes: for parts built without a service (tests, tools)."""
        return cls(CollectorRegistry())

    def watch(
        self,
        *,
        storage: Callable[[], dict[str, object]],
        hints_waiting: Callable[[], dict[str, int]],
        epoch: Callable[[], int],
    ) -> None:
        """Serve the state read at scrape time: ``storage()`` gives the engine's health
        details (commits, used and free bytes where the engine knows them)."""

        def collect() -> Iterable[Metric]:
            details = storage()
            families: list[Metric] = []
            commits = counter_family("shardkv_storage_commits", "Groups committed.")
            commits.add_metric([], float(_number(details.get("commits"))))
            families.append(commits)
            for key, name, doc in (
                ("used_bytes", "shardkv_storage_used_bytes", "Bytes the store's pages use."),
                ("free_bytes", "shardkv_storage_free_bytes", "Bytes free on its file system."),
            ):
                value = details.get(key)
                if isinstance(value, int | float):
                    g = gauge(name, doc)
                    g.add_metric([], float(value))
                    families.append(g)
            waiting = gauge("shardkv_hints_waiting", "Hints this node holds for another.", ["node"])
            for node, n in sorted(hints_waiting().items()):
                waiting.add_metric([node], n)
            families.extend([waiting, _epoch_gauge(epoch())])
            return families

        self.registry.register(StateCollector(collect))


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0
