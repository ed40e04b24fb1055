"""Latency quantiles from a Prometheus histogram, for ``shardkv status``.

The proxy exports ``shardkv_replica_operation_duration_seconds{node,op}`` as a
cumulative histogram; a quantile is estimated from its buckets the way
PromQL's ``histogram_quantile`` does (linear interpolation inside the bucket
that holds the rank), so the CLI and a Prometheus dashboard agree. The
buckets count since the proxy started: this is a lifetime p99, not a recent
one, which one scrape cannot give.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping

from prometheus_client.parser import text_string_to_metric_families

REPLICA_LATENCY = "shardkv_replica_operation_duration_seconds"

Buckets = Mapping[float, float]
"""Upper bound (``le``, ``math.inf`` for +Inf) to the cumulative count."""


def quantile(q: float, buckets: Buckets) -> float | None:
    """The ``q`` quantile (0 to 1) of a cumulative histogram; None when it is empty.

    A rank that falls in the +Inf bucket gives the largest finite bound: all
    one can say is "at least that".
    """
    if not 0 <= q <= 1:
        raise ValueError(f"a quantile is between 0 and 1, not {q}")
    bounds = sorted(buckets)
    if not bounds or bounds[-1] != math.inf:
        return None
    total = buckets[math.inf]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == math.inf:
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def node_buckets(
    metrics_text: str, name: str = REPLICA_LATENCY
) -> dict[str, dict[str, dict[float, float]]]:
    """``{node: {op: buckets}}`` of histogram ``name`` in a ``/metrics`` page.

    Raises ``ValueError`` if the page is not Prometheus text.
    """
    found: dict[str, dict[str, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    for family in text_string_to_metric_families(metrics_text):
        if family.name != name:
            continue
        for sample in family.samples:
            if not sample.name.endswith("_bucket"):
                continue
            node, op, le = (sample.labels.get(k) for k in ("node", "op", "le"))
            if node is None or le is None:
                continue
            # Summed: a proxy with --workers has one series per worker (``worker`` label).
            buckets = found[node][op or ""]
            buckets[float(le)] = buckets.get(float(le), 0.0) + float(sample.value)
    return {node: dict(ops) for node, ops in found.items()}


def merged(histograms: Iterable[Buckets]) -> dict[float, float]:
    """Several histograms with the same bounds as one (counts add up)."""
    total: dict[float, float] = defaultdict(float)
    for buckets in histograms:
        for bound, count in buckets.items():
            total[bound] += count
    return dict(total)


def p99_by_node(metrics_text: str) -> dict[str, dict[str, float | None]]:
    """``{node: {"all": s, op: s, ...}}``: each node's p99 replica latency in seconds,
    over every operation and per operation (None where nothing was counted)."""
    result: dict[str, dict[str, float | None]] = {}
    for node, ops in node_buckets(metrics_text).items():
        row: dict[str, float | None] = {"all": quantile(0.99, merged(ops.values()))}
        for op in sorted(ops):
            row[op] = quantile(0.99, ops[op])
        result[node] = row
    return result
