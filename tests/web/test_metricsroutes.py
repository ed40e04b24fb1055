"""
Tests for L{shardkv.web.metricsroutes}: ``GET /metrics`` on a node and on a proxy.

The services run in the test process on loopback through pytest-twisted and
are called over real sockets, so the counts go through the site's hook
exactly as in production: each request under the Klein rule that answered
it, a path no rule took under ``other``. Who may scrape follows the guard.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import MultiService
from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import Agent, HTTPConnectionPool

from shardkv.node.service import make_node_service
from shardkv.proxy.service import make_proxy_service
from shardkv.storage.memory import MemoryEngine
from shardkv.testing.polling import free_port
from shardkv.web.auth import Access, node_policy, proxy_policy
from shardkv.web.metricsroutes import route_label

reactor = cast(Any, _reactor)
TOKEN = "metrics-test-token-0123456789"


def now_ms() -> int:
    return int(cast(IReactorTime, reactor).seconds() * 1000)


def test_route_labels_drop_the_converters() -> None:
    """The label is the rule as an operator reads it, one per route whatever the key."""
    assert route_label("/kv/<key:_key>") == "/kv/<key>"
    assert route_label("/replica/kv/<key:_key>") == "/replica/kv/<key>"
    assert route_label("/metrics") == "/metrics"
    assert route_label("/a/<int:n>/<b>") == "/a/<n>/<b>"


def test_metrics_is_a_view_on_the_proxy_and_a_cluster_route_on_a_node() -> None:
    """As ``/cluster`` on the proxy (the client token if set, else the cluster token);
    like every node route but ``/health`` on a node."""
    assert proxy_policy(b"GET", b"/metrics") is Access.VIEW
    assert node_policy(b"GET", b"/metrics") is Access.CLUSTER


class Served:
    def __init__(self, service: MultiService, port: int) -> None:
        self.service = service
        self.url = f"http://127.0.0.1:{port}"


async def start(build: Any, **options: Any) -> Served:
    port = free_port()
    service = build(listen=[f"tcp:{port}:interface=127.0.0.1"], **options)
    service.startService()
    return Served(service, port)


@pytest_twisted.async_yield_fixture
async def http() -> AsyncIterator[Any]:
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield treq.client.HTTPClient(Agent(reactor, pool=pool))
    await pool.closeCachedConnections()


def node_service(**options: Any) -> MultiService:
    return make_node_service(
        reactor=reactor,
        node_id="metrics-node",
        engine=MemoryEngine(),
        max_value_bytes=1 << 16,
        now_ms=now_ms,
        **options,
    )


async def scrape(http: Any, url: str, **headers: str) -> dict[str, Any]:
    response = await http.get(url + "/metrics", headers=headers)
    assert response.code == 200, await response.text()
    content_type = response.headers.getRawHeaders(b"content-type")[0]
    assert content_type.startswith(b"text/plain; version=0.0.4")
    text = await response.text()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict[str, Any], family: str, sample: str, **labels: str) -> float | None:
    for s in families[family].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return None


@pytest_twisted.ensureDeferred
async def test_a_node_counts_requests_by_route_and_status(http: Any) -> None:
    """Two keys are one route; an unknown path is ``other``; the storage is there too."""
    node = await start(node_service)
    try:
        for key in ("a", "b"):
            put = await http.put(f"{node.url}/kv/{key}", data=b"v")
            assert put.code in (200, 201)
            await put.content()
        missing = await http.get(f"{node.url}/kv/nothing-here")
        await missing.content()
        unknown = await http.get(f"{node.url}/no/such/route")
        await unknown.content()
        families = await scrape(http, node.url)
        requests = "shardkv_http_requests_total"
        puts = value(families, "shardkv_http_requests", requests, route="/kv/<key>", method="PUT")
        assert puts == 2
        got = value(families, "shardkv_http_requests", requests, route="/kv/<key>", status="404")
        assert got == 1
        other = value(families, "shardkv_http_requests", requests, route="other", status="404")
        assert other == 1
        routes = {s.labels["route"] for s in families["shardkv_http_requests"].samples}
        assert not any("nothing-here" in r or "such" in r for r in routes)
        count = "shardkv_http_request_duration_seconds_count"
        assert (value(families, "shardkv_http_request_duration_seconds", count) or 0) >= 3
        assert {"shardkv_storage_commits", "shardkv_map_epoch"} <= set(families)
    finally:
        await node.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_node_with_a_token_wants_it_for_metrics(http: Any) -> None:
    node = await start(node_service, token=TOKEN)
    try:
        refused = await http.get(node.url + "/metrics")
        assert refused.code == 401
        await refused.content()
        await scrape(http, node.url, Authorization=f"Bearer {TOKEN}")
    finally:
        await node.service.stopService()


@pytest.mark.parametrize("client_token", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_proxy_serves_its_metrics_as_a_view(http: Any, client_token: bool) -> None:
    """The client token when one is set; the proxy's own families in any case."""
    node = await start(node_service)
    proxy = await start(
        make_proxy_service,
        reactor=reactor,
        nodes={node.url.removeprefix("http://"): 1.0},
        max_value_bytes=1 << 16,
        timeout=2.0,
        replicas=1,
        r=1,
        w=1,
        client_token=TOKEN if client_token else None,
    )
    try:
        headers = {"Authorization": f"Bearer {TOKEN}"} if client_token else {}
        if client_token:
            refused = await http.get(proxy.url + "/metrics")
            assert refused.code == 401
            await refused.content()
        families = await scrape(http, proxy.url, **headers)
        assert {
            "shardkv_http_requests",
            "shardkv_quorum_outcomes",
            "shardkv_node_up",
            "shardkv_map_epoch",
            "shardkv_rebalance_state",
        } <= set(families)
    finally:
        await proxy.service.stopService()
        await node.service.stopService()
