"""What ``shardkv`` shows a person: rich tables of the API's JSON answers.

Pure functions from the answers (``/cluster``, ``/explain``, ``/admin/plan``,
``/admin/rebalance``) to ``rich`` renderables and short lines, so that the
formatting is tested without a cluster and the commands in
L{shardkv.client.cli} only fetch and print. ``--json`` bypasses all of this.
A value that the answer does not carry is shown as ``-``, never guessed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

MISSING = "-"

_HEALTH_STYLE = {"up": "green", "down": "bold red", "failing": "bold red", "unknown": "yellow"}


# -- numbers ---------------------------------------------------------------------


def count(n: object) -> str:
    """A whole number with thousands separators, or ``-``."""
    if isinstance(n, bool) or not isinstance(n, int | float):
        return MISSING
    return f"{int(n):,}"


def percent(fraction: object, digits: int = 1) -> str:
    """0.3361 as ``33.6%``, or ``-``."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        return MISSING
    return f"{fraction * 100:.{digits}f}%"


def seconds(s: object) -> str:
    """A latency: ``850 µs``, ``12.3 ms``, ``1.50 s``, or ``-``."""
    if isinstance(s, bool) or not isinstance(s, int | float):
        return MISSING
    if s < 0.001:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def size(n: object) -> str:
    """Bytes in binary units: ``512 B``, ``7.4 MiB``, or ``-``."""
    if isinstance(n, bool) or not isinstance(n, int | float):
        return MISSING
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def weight(w: object) -> str:
    if isinstance(w, bool) or not isinstance(w, int | float):
        return MISSING
    return f"{w:g}"


def health(status: object) -> Text:
    """A health word in its colour (``up`` green, ``down`` red)."""
    word = status if isinstance(status, str) and status else MISSING
    return Text(word, style=_HEALTH_STYLE.get(word, ""))


# -- status ------------------------------------------------------------------------


def status_rows(
    cluster: Mapping[str, Any],
    p99: Mapping[str, Mapping[str, float | None]] | None,
    reports: Mapping[str, Mapping[str, Any] | None],
) -> list[dict[str, Any]]:
    """One row per node, from ``/cluster``, the p99s of ``/metrics`` (None: no
    metrics) and each node's own ``/health`` (None: it did not answer).

    The map's members lead (they carry the member state, such as ``joining``),
    then any ring node the map does not list. ``keys`` is what the node's
    storage reports (``keys`` for the memory engine, ``entries`` for LMDB: its
    records, tombstones included).
    """
    ring = {n["node"]: n for n in cluster.get("nodes", []) if isinstance(n, dict) and "node" in n}
    members = [m for m in cluster.get("members", []) if isinstance(m, dict) and "id" in m]
    order = [m["id"] for m in members] + [n for n in ring if n not in {m["id"] for m in members}]
    by_id = {m["id"]: m for m in members}
    rows = []
    for node in order:
        on_ring, member = ring.get(node, {}), by_id.get(node, {})
        state = (on_ring.get("health") or member.get("health") or {}).get("status")
        report = reports.get(node)
        if report is not None and report.get("status") == "failing":
            state = "failing"
        storage = (report or {}).get("storage") or {}
        keys = storage.get("keys", storage.get("entries"))
        latency = (p99 or {}).get(node) or {}
        rows.append(
            {
                "node": node,
                "state": member.get("state"),
                "health": state,
                "weight": on_ring.get("weight", member.get("weight")),
                "share": on_ring.get("share"),
                "keys": keys if isinstance(keys, int) else None,
                "hints": on_ring.get("hints_waiting"),
                "p99_s": latency.get("all"),
                "p99_by_op_s": {k: v for k, v in latency.items() if k != "all"},
            }
        )
    return rows


def status_summary(cluster: Mapping[str, Any]) -> str:
    """The line above the table: epoch, N/R/W and what the move is doing."""
    parts = []
    if "epoch" in cluster:
        parts.append(f"epoch {cluster['epoch']}")
    parts.append(
        f"N={cluster.get('replicas', '?')} R={cluster.get('r', '?')} W={cluster.get('w', '?')}"
    )
    move = cluster.get("rebalance")
    if isinstance(move, dict) and move.get("state") not in (None, "idle"):
        parts.append(f"move {move['state']}: {rebalance_line(move)}")
    elif cluster.get("phase"):
        parts.append(f"move {cluster['phase']}")
    else:
        parts.append("no move")
    undelivered = cluster.get("undelivered")
    if isinstance(undelivered, int) and undelivered:
        parts.append(f"{undelivered:,} hints undelivered")
    return " · ".join(parts)


def status_table(rows: Sequence[Mapping[str, Any]], title: str | None = None) -> Table:
    """``shardkv status``: health, weight, share, keys, hints and p99 per node."""
    table = Table(title=title, title_justify="left")
    table.add_column("node")
    table.add_column("health")
    table.add_column("weight", justify="right")
    table.add_column("share", justify="right")
    table.add_column("keys", justify="right")
    table.add_column("hints", justify="right")
    table.add_column("p99", justify="right")
    for row in rows:
        name = Text(str(row["node"]))
        if row.get("state") not in (None, "active"):
            name.append(f" ({row['state']})", style="dim")
        table.add_row(
            name,
            health(row.get("health")),
            weight(row.get("weight")),
            percent(row.get("share")),
            count(row.get("keys")),
            count(row.get("hints")),
            seconds(row.get("p99_s")),
        )
    return table


# -- explain -------------------------------------------------------------------------


def explain_view(answer: Mapping[str, Any]) -> RenderableType:
    """``shardkv explain KEY``: where the key hashes and what each replica holds."""
    head = Text()
    head.append(f"key {answer.get('key')!r}: hash {answer.get('hash')}, ")
    head.append(f"ring position {answer.get('position')}, owner {answer.get('owner')}")
    table = Table()
    table.add_column("#", justify="right")
    table.add_column("replica")
    table.add_column("health")
    table.add_column("version")
    replicas = [r for r in answer.get("replicas", []) if isinstance(r, dict)]
    for i, replica in enumerate(replicas, 1):
        version = replica.get("version")
        if replica.get("error"):
            shown = Text(f"error: {replica['error']}", style="red")
        elif version is None:
            shown = Text("(none)", style="dim")
        else:
            shown = Text(str(version) + (" (deleted)" if replica.get("tombstone") else ""))
        table.add_row(str(i), str(replica.get("node")), health(replica.get("status")), shown)
    listed = {r.get("node") for r in replicas}
    after = [n for n in answer.get("preference_list", []) if n not in listed]
    parts: list[RenderableType] = [head, table]
    if after:
        parts.append(Text("then: " + ", ".join(map(str, after)), style="dim"))
    return Group(*parts)


# -- plans and moves -------------------------------------------------------------------


def plan_view(plan: Mapping[str, Any]) -> RenderableType:
    """A staged plan: what it moves against the ideal, each node before and after, the pairs."""
    summary = Text(
        f"plan from epoch {plan.get('base_epoch')}: moves {count(plan.get('keys_moving'))} of "
        f"{count(plan.get('keys_total'))} copies ({percent(plan.get('fraction'))}, ideal "
        f"{percent(plan.get('ideal_fraction'))}), {size(plan.get('bytes_moving'))}"
    )
    shares = plan.get("shares") or {}
    weights = plan.get("weights") or {}
    before_w, after_w = weights.get("before") or {}, weights.get("after") or {}
    before_s, after_s = shares.get("before") or {}, shares.get("after") or {}
    nodes = list(dict.fromkeys([*before_w, *after_w, *before_s, *after_s]))
    table = Table(title="nodes", title_justify="left")
    table.add_column("node")
    table.add_column("weight", justify="right")
    table.add_column("share", justify="right")
    for node in nodes:
        table.add_row(
            node,
            _change(weight(before_w.get(node)), weight(after_w.get(node))),
            _change(percent(before_s.get(node)), percent(after_s.get(node))),
        )
    pairs = Table(title="moves", title_justify="left")
    pairs.add_column("from")
    pairs.add_column("to")
    pairs.add_column("keys", justify="right")
    pairs.add_column("bytes", justify="right")
    for pair in plan.get("pairs", []):
        if isinstance(pair, dict):
            pairs.add_row(
                str(pair.get("from")),
                str(pair.get("to")),
                count(pair.get("keys")),
                size(pair.get("bytes")),
            )
    parts: list[RenderableType] = [summary, table]
    if pairs.row_count:
        parts.append(pairs)
    else:
        parts.append(Text("no keys move", style="dim"))
    return Group(*parts)


def _change(before: str, after: str) -> str:
    return before if before == after else f"{before} → {after}"


def rebalance_line(status: Mapping[str, Any]) -> str:
    """One line of a move's progress: keys, rate, eta, and what it waits for."""
    parts = [f"{count(status.get('keys_moved'))}/{count(status.get('keys_total'))} keys"]
    rate = status.get("keys_per_s")
    if isinstance(rate, int | float) and not isinstance(rate, bool):
        parts.append(f"{rate:,.0f} keys/s")
    eta = status.get("eta_s")
    if isinstance(eta, int | float) and not isinstance(eta, bool) and status.get("state") != "idle":
        parts.append(f"eta {eta:.0f} s")
    if status.get("aborted"):
        parts.append("aborted")
    waiting = status.get("waiting_for")
    if waiting:
        parts.append("waiting for " + ", ".join(map(str, waiting)))
    if status.get("error"):
        parts.append(f"error: {status['error']}")
    return ", ".join(parts)


def rebalance_view(status: Mapping[str, Any]) -> RenderableType:
    """``shardkv rebalance``: the move's state and each node's stream."""
    head = Text(f"{status.get('state')} at epoch {status.get('epoch')}: {rebalance_line(status)}")
    transfers = [t for t in status.get("transfers", []) if isinstance(t, dict)]
    if not transfers:
        return head
    table = Table()
    table.add_column("node")
    table.add_column("stream")
    table.add_column("keys moved", justify="right")
    table.add_column("bytes moved", justify="right")
    table.add_column("keys deleted", justify="right")
    table.add_column("last error")
    for t in transfers:
        table.add_row(
            str(t.get("node")),
            str(t.get("state", MISSING)),
            count(t.get("keys_moved")),
            size(t.get("bytes_moved")),
            count(t.get("keys_deleted")),
            str(t.get("last_error") or ""),
        )
    return Group(head, table)
