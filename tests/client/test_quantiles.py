"""p99 from Prometheus histogram buckets (L{shardkv.client.quantiles}), as PromQL estimates it."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from shardkv.client.quantiles import REPLICA_LATENCY, merged, node_buckets, p99_by_node, quantile


def test_interpolates_inside_the_bucket_holding_the_rank() -> None:
    # 100 observations: 50 up to 0.1 s, 40 more up to 0.2 s, 10 more up to 0.4 s.
    buckets = {0.1: 50.0, 0.2: 90.0, 0.4: 100.0, math.inf: 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.7, buckets) == pytest.approx(0.15)
    assert quantile(0.99, buckets) == pytest.approx(0.38)
    assert quantile(0.25, buckets) == pytest.approx(0.05)  # the first bucket starts at 0


def test_a_rank_in_the_inf_bucket_gives_the_largest_bound() -> None:
    assert quantile(0.99, {0.1: 10.0, 1.0: 50.0, math.inf: 100.0}) == 1.0


def test_empty_or_incomplete_histograms_have_no_quantile() -> None:
    assert quantile(0.99, {}) is None
    assert quantile(0.99, {0.1: 0.0, math.inf: 0.0}) is None
    assert quantile(0.99, {0.1: 3.0}) is None  # no +Inf bucket: not a histogram
    with pytest.raises(ValueError):
        quantile(1.5, {math.inf: 1.0})


def test_merged_adds_counts() -> None:
    assert merged([{1.0: 1.0, math.inf: 2.0}, {1.0: 3.0, math.inf: 3.0}]) == {
        1.0: 4.0,
        math.inf: 5.0,
    }


def metrics_page() -> str:
    registry = CollectorRegistry()
    h = Histogram(
        REPLICA_LATENCY,
        "replica operation latency",
        ["node", "op"],
        buckets=(0.001, 0.01, 0.1, 1.0),
        registry=registry,
    )
    for _ in range(99):
        h.labels(node="n1", op="get").observe(0.0005)
    h.labels(node="n1", op="put").observe(0.5)
    h.labels(node="n2", op="get").observe(0.05)
    other = Histogram("shardkv_other_seconds", "not this one", ["node"], registry=registry)
    other.labels(node="n1").observe(100)
    return generate_latest(registry).decode()


def test_p99_by_node_from_a_scrape() -> None:
    page = metrics_page()
    assert set(node_buckets(page)) == {"n1", "n2"}
    p99 = p99_by_node(page)
    assert p99["n1"]["get"] == pytest.approx(0.00099)
    assert p99["n1"]["put"] == pytest.approx(0.991)
    assert p99["n1"]["all"] == pytest.approx(0.001)  # 99 of the 100 were under 1 ms
    assert p99["n2"]["all"] == pytest.approx(0.0991)


def test_a_page_without_the_histogram_gives_nothing() -> None:
    assert p99_by_node("# nothing here\n") == {}
    with pytest.raises(ValueError):
        p99_by_node("<html>not metrics</html>")


def test_the_workers_of_one_proxy_add_up() -> None:
    """
    If the page is a proxy's with --workers (each series once per worker, labelled
    worker="i"), then each node's buckets are the sum over the workers.
    """
    from shardkv.proxy.workers import merge_metrics

    page = metrics_page()
    both = merge_metrics({0: page, 1: page}, 2).decode()
    single, double = node_buckets(page), node_buckets(both)
    assert double["n1"]["get"] == {le: 2 * count for le, count in single["n1"]["get"].items()}
    assert p99_by_node(both) == p99_by_node(page)
