"""The dashboard in a real browser: headless Chromium against three nodes and a proxy.

The page is loaded once and never reloaded; everything checked after that is
what its polling drew. It checks the DOM (one arc group per node, with the
ring's segments), the node table, the key ``/explain`` places, request rate
and p99 from the proxy's metrics (or "-" when the proxy has none), and that
a stopped node is marked down within 5 s. It saves the screenshot the README
shows, ``docs/dashboard.png``.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardkv.client.blocking import request as send
from shardkv.testing.polling import poll_until
from shardkv.testing.processes import Proc, ProcessSet
from tests.system.chromium import Chromium, ensure_chromium
from tests.system.procs import process_set

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "dashboard.png"
DOWN_DEADLINE = 5.0
"""Seconds from a node's stop to the page showing it down (health checks and polls: 1 s each)."""
PAGE_DEADLINE = 15.0

ARC_GROUPS = "[...document.querySelectorAll('#arcs g.node-arcs')]"
ROWS = "[...document.querySelectorAll('#nodes tbody tr')]"

SAMPLE_METRICS = r"""
# HELP shardkv_replica_operations_total Replica calls.
# TYPE shardkv_replica_operations_total counter
shardkv_replica_operations_total{node="a:1",op="get",outcome="ok"} 7.0
shardkv_replica_operations_total{node="a:1",op="put",outcome="ok"} 3.0
shardkv_replica_operations_total{node="b:2",op="put",outcome="refused"} 1.0
shardkv_replica_operation_duration_seconds_bucket{node="a:1",op="get",le="0.001"} 5.0
shardkv_replica_operation_duration_seconds_bucket{node="a:1",op="get",le="0.01"} 7.0
shardkv_replica_operation_duration_seconds_bucket{node="a:1",op="get",le="+Inf"} 7.0
shardkv_replica_operation_duration_seconds_bucket{node="a:1",op="put",le="0.001"} 0.0
shardkv_replica_operation_duration_seconds_bucket{node="a:1",op="put",le="0.01"} 3.0
shardkv_replica_operation_duration_seconds_bucket{node="a:1",op="put",le="+Inf"} 3.0
shardkv_http_requests_total{route="/kv/{key}",method="GET",status="200"} 9.0
"""


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessSet]:
    yield from process_set(request, tmp_path)


def addr(proc: Proc) -> str:
    return f"127.0.0.1:{proc.port}"


def proxy_has_replica_metrics(proxy: Proc) -> bool:
    reply = send("GET", proxy.url + "/metrics")
    return reply.status == 200 and "shardkv_replica_operations_total" in reply.text


def test_the_page_on_sample_input(procs: ProcessSet, tmp_path: Path) -> None:
    """
    The page's own parser reads the text format: operations summed per node
    across op and outcome, histograms per node with ``+Inf``, and the p99
    of their buckets as Prometheus estimates it. A move in progress is drawn
    as its progress bar, counts, rate and what it waits for.
    """
    binary = ensure_chromium()
    proxy = procs.start_proxy(None, ["127.0.0.1:1"], "--replicas", "1", "--r", "1", "--w", "1")
    with Chromium(binary, tmp_path / "profile") as page:
        page.navigate(proxy.url + "/dashboard")
        page.wait_for("window.shardkvDashboard !== undefined", PAGE_DEADLINE, "the script")
        result = page.evaluate(
            "(() => { const d = window.shardkvDashboard;"
            f" const s = d.replicaSnapshot(d.parseMetrics({json.dumps(SAMPLE_METRICS)}), 0);"
            " const a = [...s.buckets['a:1']].map(([le, c]) => [String(le), c]);"
            " return {ops: s.ops, buckets: a, seen: s.seen,"
            "  p99: d.histogramQuantile(0.99, [...s.buckets['a:1']]),"
            "  p50: d.histogramQuantile(0.5, [...s.buckets['a:1']]),"
            "  none: d.histogramQuantile(0.99, [[Infinity, 0]])}; })()"
        )
        move = page.evaluate(
            "(() => { window.shardkvDashboard.drawMove({rebalance: {state: 'copying',"
            " phase: 'copying', epoch: 4, aborted: false, keys_moved: 250, keys_total: 1000,"
            " keys_per_s: 125.5, eta_s: 6, waiting_for: ['127.0.0.1:9'], error: null}});"
            " const $ = (id) => document.getElementById(id);"
            " return {state: $('move').dataset.state, text: $('move-text').textContent,"
            "  width: $('move-bar').style.width, rate: $('move-rate').textContent}; })()"
        )
    assert result["ops"] == {"a:1": 10, "b:2": 1}, result
    assert result["buckets"] == [["0.001", 5], ["0.01", 10], ["Infinity", 10]], result
    assert result["seen"] is True
    assert result["p99"] == pytest.approx(0.001 + 0.009 * (9.9 - 5) / 5), result
    assert result["p50"] == pytest.approx(0.001), result
    assert result["none"] is None

    assert move == {
        "state": "moving",
        "text": "epoch 4 copying: 250/1000 keys (25.0 %)",
        "width": "25%",
        "rate": "125.5 keys/s · eta 6 s · waiting for 127.0.0.1:9",
    }, move


def test_dashboard_live(procs: ProcessSet, tmp_path: Path) -> None:
    """
    If the dashboard is open on a proxy of three nodes, then it draws one
    arc group per node with that node's segments of the ring, lists every
    node up, places a typed key where /explain says, shows rate and p99 per
    node once there is traffic (when the proxy exports replica metrics), and
    within 5 s of a node being stopped marks it down, in the table and on
    the ring, without a reload.
    """
    binary = ensure_chromium()
    nodes = [
        procs.start_node(None, tmp_path / f"data-{i}", name=f"node{i}", wait=False)
        for i in (1, 2, 3)
    ]
    proxy = procs.start_proxy(None, nodes, wait=False)
    for node in nodes:
        node.wait_healthy()
    proxy.wait_healthy()
    proxy.wait_sees_up(nodes)
    ids = sorted(addr(n) for n in nodes)
    ring = send("GET", proxy.url + "/dashboard/ring.json").json()
    assert [n["node"] for n in ring["nodes"]] == ids, ring

    def traffic() -> None:
        for i in range(20):
            reply = send("PUT", f"{proxy.url}/kv/user%2F{i:03d}", f"value {i}")
            assert reply.status in (200, 201), reply

    traffic()
    with Chromium(binary, tmp_path / "profile") as page:
        page.navigate(proxy.url + "/dashboard")

        groups = page.wait_for(
            f"(() => {{ const g = {ARC_GROUPS}; return g.length ? g.map(e => ["
            "e.getAttribute('data-node'), e.id,"
            " (e.querySelector('path').getAttribute('d').match(/M/g) || []).length]) : null; })()",
            PAGE_DEADLINE,
            "the ring's arc groups",
        )
        assert [g[0] for g in groups] == ids, groups
        assert [g[1] for g in groups] == ["arcs-0", "arcs-1", "arcs-2"], groups
        assert [g[2] for g in groups] == [n["segments"] for n in ring["nodes"]], groups
        assert sum(g[2] for g in groups) <= 512

        statuses = page.wait_for(
            f"(() => {{ const r = {ROWS}.map(e => [e.dataset.node, e.dataset.status]);"
            " return r.length && r.every(x => x[1] === 'up') ? r : null; })()",
            PAGE_DEADLINE,
            "every node shown up",
        )
        assert sorted(s[0] for s in statuses) == ids, statuses

        key = "user/007"
        owner = send("GET", proxy.url + "/explain?key=user%2F007").json()["owner"]
        page.evaluate(
            f"document.getElementById('explain-key').value = {json.dumps(key)};"
            " document.getElementById('explain-form').requestSubmit(); true"
        )
        marker = page.wait_for(
            "(() => { const m = document.getElementById('marker');"
            " return m.hasAttribute('hidden') ? null : [m.dataset.key, m.dataset.owner,"
            " m.getAttribute('transform')]; })()",
            PAGE_DEADLINE,
            "the explained key's marker",
        )
        assert marker[:2] == [key, owner], marker
        assert marker[2].startswith("rotate("), marker

        cells = (
            f"{ROWS}.map(e => [e.querySelector('.rate').textContent,"
            " e.querySelector('.p99').textContent])"
        )
        metrics = proxy_has_replica_metrics(proxy)
        if metrics:

            def measured() -> list[list[str]] | None:
                traffic()  # between two of the page's polls, so that the rate is not 0
                shown: list[list[str]] = page.evaluate(cells)
                return shown if all(r != "-" and p != "-" for r, p in shown) else None

            shown = poll_until(measured, PAGE_DEADLINE, "rate and p99 per node")
            assert all(p.endswith("ms") or p.endswith(" s") for _, p in shown), shown
        else:
            page.wait_for("document.body.dataset.polls > 2", PAGE_DEADLINE, "three polls")
            assert page.evaluate(cells) == [["-", "-"]] * 3

        victim = next(n for n in nodes if addr(n) == ids[1])
        stopped = time.monotonic()
        victim.kill(signal.SIGKILL)
        page.wait_for(
            f"(() => {{ const r = {ROWS}.find(e => e.dataset.node === {json.dumps(ids[1])});"
            f" const g = {ARC_GROUPS}.find(e => e.dataset.node === {json.dumps(ids[1])});"
            " return r && r.dataset.status === 'down' && g.classList.contains('down'); })()",
            DOWN_DEADLINE - (time.monotonic() - stopped),
            f"{ids[1]} marked down on the page",
        )
        others = page.evaluate(
            f"{ROWS}.filter(e => e.dataset.node !== {json.dumps(ids[1])})"
            ".map(e => e.dataset.status)"
        )
        assert others == ["up", "up"], others
        assert page.evaluate("document.getElementById('connection').dataset.state") == "live"

        # For the screenshot: traffic while the node is down (its hints wait), and the key
        # explained again, now with a replica down.
        if metrics:

            def busy() -> bool:
                traffic()
                shown = page.evaluate(cells)
                return all(rate not in ("-", "0.0") for rate, _ in shown[:1] + shown[2:])

            poll_until(busy, PAGE_DEADLINE, "the traffic's rate on the live nodes")
        page.evaluate("document.getElementById('explain-form').requestSubmit(); true")
        page.wait_for(
            f"[...document.querySelectorAll('#explain-replicas li')].some(e =>"
            f" e.dataset.node === {json.dumps(ids[1])} && e.textContent.includes('(down)'))",
            PAGE_DEADLINE,
            "the explanation to show the stopped replica",
        )
        page.screenshot(SCREENSHOT)
    assert SCREENSHOT.read_bytes().startswith(b"\x89PNG"), SCREENSHOT
