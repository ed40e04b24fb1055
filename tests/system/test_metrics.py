"""``/metrics`` of real processes, read as Prometheus reads it.

Three lmdb nodes and a proxy run as separate ``twistd`` processes; the test
sends a known number of requests through the proxy, scrapes the proxy and
a node, and parses both answers with C{prometheus_client}'s own parser. The
counts must have grown by exactly what was sent (the scrape itself is a
request too, so each scrape is compared with the one before), and every
family of the shared notes must be there, the node's storage included.
Every wait polls with a deadline.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardkv.client.blocking import request as send
from shardkv.testing.polling import free_port, poll_until
from shardkv.testing.processes import Proc, ProcessSet
from tests.system.procs import process_set
from tests.test_metrics import NODE_FAMILIES, PROXY_FAMILIES

pytestmark = pytest.mark.slow

WRITES = 20
READS = 30
DEADLINE = 10.0


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessSet]:
    yield from process_set(request, tmp_path)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> tuple[set[str], Samples]:
    """The family names and every sample (name and labels to value) of ``url``'s /metrics."""
    reply = send("GET", url + "/metrics")
    assert reply.status == 200, reply
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4"), reply
    names: set[str] = set()
    samples: Samples = {}
    for family in text_string_to_metric_families(reply.body.decode("utf-8")):
        names.add(family.name)
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return names, samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over every sample whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def kv(key: str) -> str:
    return f"/kv/{key}"


def all_up(proxy: Proc, nodes: list[Proc]) -> bool:
    _, samples = scrape(proxy.url)
    up = "shardkv_node_up"
    return all(samples.get((up, frozenset({("node", f"127.0.0.1:{n.port}")}))) == 1 for n in nodes)


def test_metrics_count_what_was_sent(procs: ProcessSet, tmp_path: Path) -> None:
    """
    If WRITES puts and READS gets go through the proxy, then its requests on
    route /kv/<key> grew by exactly those, every one an ok quorum; the
    nodes' replica operations and the proxy's batches grew; a node's storage
    committed and reports its bytes; and a path no route takes is counted
    under ``other``, never under its own name.
    """
    nodes = [
        procs.start_node(None, tmp_path / f"data-{i}", name=f"node{i}", wait=False)
        for i in (1, 2, 3)
    ]
    proxy = procs.start_proxy(None, nodes, wait=False)
    for node in nodes:
        node.wait_healthy()
    proxy.wait_healthy()
    poll_until(lambda: all_up(proxy, nodes), DEADLINE, "every node up in the proxy's metrics")

    _, before = scrape(proxy.url)
    for i in range(WRITES):
        reply = send("PUT", proxy.url + kv(f"m{i}"), f"value {i}")
        assert reply.status == 201, reply
    for i in range(READS):
        reply = send("GET", proxy.url + kv(f"m{i % WRITES}"))
        assert reply.status == 200, reply
    assert send("GET", proxy.url + "/no/such/thing").status == 404
    names, after = scrape(proxy.url)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    requests = "shardkv_http_requests_total"
    assert grew(requests, route="/kv/<key>", method="PUT", status="201") == WRITES
    assert grew(requests, route="/kv/<key>", method="GET", status="200") == READS
    assert grew(requests, route="other", status="404") == 1
    assert grew(requests, route="/metrics", method="GET", status="200") == 1
    assert not any("no/such" in dict(ls).get("route", "") for _, ls in after)
    latency = "shardkv_http_request_duration_seconds_count"
    assert grew(latency, route="/kv/<key>") == WRITES + READS
    assert grew("shardkv_quorum_outcomes_total", op="write", outcome="ok") == WRITES
    assert grew("shardkv_quorum_outcomes_total", op="read", outcome="ok") == READS
    # Each write sends N copies in one round (no version read: a fresh key, one
    # proxy); each read asks R replicas, and one in ten all N.
    assert grew("shardkv_replica_operations_total", op="put", outcome="ok") >= 2 * WRITES
    assert grew("shardkv_replica_operations_total", op="get") >= 2 * READS
    assert grew("shardkv_one_round_fallbacks_total") == 0
    assert grew("shardkv_pipeline_batches_total") > 0
    assert total(after, "shardkv_map_epoch") >= 1
    assert names >= PROXY_FAMILIES
    assert total(after, "shardkv_rebalance_state", state="idle") == 1

    node_names, node_samples = scrape(nodes[0].url)
    assert node_names >= NODE_FAMILIES
    assert total(node_samples, "shardkv_storage_commits_total") >= 1
    assert total(node_samples, "shardkv_storage_used_bytes") > 0
    assert total(node_samples, "shardkv_storage_free_bytes") > 0
    groups = total(node_samples, "shardkv_storage_group_operations_count")
    assert groups == total(node_samples, "shardkv_storage_commit_seconds_count") > 0
    batch = "shardkv_http_requests_total"
    assert total(node_samples, batch, route="/replica/batch", method="POST") >= 1


def test_the_one_process_cluster_serves_each_service_its_own_metrics(
    procs: ProcessSet,
) -> None:
    """``twistd shardkv cluster`` runs three nodes and a proxy in one process:
    each answers ``/metrics`` with its own counts (one registry per service)."""
    node_ports = [free_port() for _ in range(3)]
    cluster = procs.start_cluster(None, node_ports)
    node_url = f"http://127.0.0.1:{node_ports[0]}"
    poll_until(lambda: send("GET", node_url + "/health").status == 200, DEADLINE, "node 1")
    _, proxy_before = scrape(cluster.url)
    for i in range(5):
        assert send("PUT", cluster.url + kv(f"c{i}"), "v").status == 201
    proxy_names, proxy_after = scrape(cluster.url)
    node_names, _ = scrape(node_url)
    puts = "shardkv_http_requests_total"
    grew = total(proxy_after, puts, route="/kv/<key>", method="PUT") - total(
        proxy_before, puts, route="/kv/<key>", method="PUT"
    )
    assert grew == 5
    assert "shardkv_quorum_outcomes" in proxy_names
    assert "shardkv_quorum_outcomes" not in node_names
    assert "shardkv_storage_commits" in node_names
