"""The CLI's tables and lines (L{shardkv.client.render}), from answers shaped like the API's."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console, RenderableType

from shardkv.client import render


def text(renderable: RenderableType) -> str:
    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(renderable)
    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(output, str)
    return output


def test_numbers() -> None:
    assert render.count(75012) == "75,012"
    assert render.count(None) == render.count(True) == "-"
    assert render.percent(0.336142) == "33.6%"
    assert render.seconds(0.00085) == "850 µs"
    assert render.seconds(0.0123) == "12.3 ms"
    assert render.seconds(1.5) == "1.50 s"
    assert render.seconds(None) == "-"
    assert render.size(512) == "512 B"
    assert render.size(7801248) == "7.4 MiB"
    assert render.weight(2.0) == "2"


CLUSTER: dict[str, Any] = {
    "replicas": 3,
    "r": 2,
    "w": 2,
    "undelivered": 0,
    "epoch": 4,
    "phase": None,
    "nodes": [
        {
            "node": "a:1",
            "weight": 1.0,
            "share": 0.5,
            "health": {"status": "up"},
            "hints_waiting": 0,
        },
        {
            "node": "b:1",
            "weight": 1.0,
            "share": 0.5,
            "health": {"status": "down"},
            "hints_waiting": 7,
        },
    ],
    "members": [
        {
            "id": "a:1",
            "address": "a:1",
            "weight": 1.0,
            "state": "active",
            "health": {"status": "up"},
        },
        {
            "id": "b:1",
            "address": "b:1",
            "weight": 1.0,
            "state": "active",
            "health": {"status": "down"},
        },
        {
            "id": "c:1",
            "address": "c:1",
            "weight": 1.0,
            "state": "joining",
            "health": {"status": "up"},
        },
    ],
    "rebalance": {"state": "idle"},
}


def test_status_rows_join_the_cluster_metrics_and_node_reports() -> None:
    reports = {
        "a:1": {"status": "ok", "storage": {"keys": 12}},
        "b:1": None,
        "c:1": {"status": "failing", "storage": {"entries": 3}},
    }
    rows = render.status_rows(CLUSTER, {"a:1": {"all": 0.004, "get": 0.004}}, reports)
    by_node = {row["node"]: row for row in rows}
    assert [row["node"] for row in rows] == ["a:1", "b:1", "c:1"]
    assert by_node["a:1"]["keys"] == 12
    assert by_node["a:1"]["p99_s"] == 0.004
    assert by_node["a:1"]["p99_by_op_s"] == {"get": 0.004}
    assert by_node["b:1"]["health"] == "down"
    assert by_node["b:1"]["hints"] == 7
    assert by_node["b:1"]["keys"] is None
    assert by_node["c:1"]["health"] == "failing"  # the node's own word beats the proxy's
    assert by_node["c:1"]["keys"] == 3  # LMDB reports entries
    assert by_node["c:1"]["share"] is None  # not on the ring yet

    shown = text(render.status_table(rows, title=render.status_summary(CLUSTER)))
    assert "epoch 4 · N=3 R=2 W=2 · no move" in shown
    assert "4.0 ms" in shown
    assert "c:1 (joining)" in shown
    lines = [line for line in shown.splitlines() if "b:1" in line]
    assert "down" in lines[0] and "-" in lines[0]


def test_status_without_metrics_shows_dashes() -> None:
    rows = render.status_rows(CLUSTER, None, {})
    assert all(row["p99_s"] is None and row["keys"] is None for row in rows)


def test_status_summary_of_a_running_move() -> None:
    cluster = {**CLUSTER, "rebalance": {"state": "copying", "keys_moved": 10, "keys_total": 40}}
    assert "move copying: 10/40 keys" in render.status_summary(cluster)


def test_explain_view() -> None:
    answer = {
        "key": "name",
        "hash": 123,
        "position": 7,
        "owner": "a:1",
        "replicas": [
            {"node": "a:1", "status": "up", "version": "1-2-p", "tombstone": False},
            {"node": "b:1", "status": "up", "version": None},
            {"node": "c:1", "status": "down", "version": None, "error": "refused"},
        ],
        "preference_list": ["a:1", "b:1", "c:1", "d:1"],
    }
    shown = text(render.explain_view(answer))
    assert "owner a:1" in shown
    assert "1-2-p" in shown
    assert "(none)" in shown
    assert "error: refused" in shown
    assert "then: d:1" in shown


PLAN: dict[str, Any] = {
    "base_epoch": 1,
    "keys_moving": 75012,
    "bytes_moving": 7801248,
    "keys_total": 300000,
    "fraction": 0.25004,
    "ideal_fraction": 0.25,
    "pairs": [{"from": "a:1", "to": "d:1", "keys": 25004, "bytes": 2600416}],
    "shares": {"before": {"a:1": 1.0}, "after": {"a:1": 0.75, "d:1": 0.25}},
    "weights": {"before": {"a:1": 1.0}, "after": {"a:1": 1.0, "d:1": 1.0}},
}


def test_plan_view() -> None:
    shown = text(render.plan_view(PLAN))
    assert "plan from epoch 1: moves 75,012 of 300,000 copies (25.0%, ideal 25.0%), 7.4 MiB" in (
        shown
    )
    assert "100.0% → 75.0%" in shown
    assert "- → 1" in shown  # d:1 is new
    assert "25,004" in shown
    assert "no keys move" in text(render.plan_view({**PLAN, "pairs": []}))


def test_rebalance_line_and_view() -> None:
    status = {
        "state": "waiting",
        "epoch": 2,
        "keys_moved": 40000,
        "keys_total": 75012,
        "keys_per_s": 21450.0,
        "eta_s": 1.6,
        "waiting_for": ["b:1"],
        "error": None,
        "transfers": [{"node": "a:1", "state": "streaming", "keys_moved": 13300}],
    }
    line = render.rebalance_line(status)
    assert line == "40,000/75,012 keys, 21,450 keys/s, eta 2 s, waiting for b:1"
    shown = text(render.rebalance_view(status))
    assert "waiting at epoch 2" in shown and "streaming" in shown and "13,300" in shown
    assert "eta" not in render.rebalance_line({**status, "state": "idle"})
