"""shardkv's benchmark: one command, a real cluster, paired rounds.

    python bench/run.py                  # proxy mode: GET/SET, direct node vs proxied
    python bench/run.py --replicas 1 --r 1 --w 1   # the same with one copy per key
    python bench/run.py latency          # the same at c=1, 32 and 128: p50/p99, issue 10's targets
    python bench/run.py floor            # latency mode beside the least an R=W=2 proxy costs
    python bench/run.py ceiling          # node GET vs a bare twisted.web server from a dict
    python bench/run.py storage          # PUT throughput, memory vs lmdb --durability always
    python bench/run.py replication      # GET/SET through an N=1 proxy vs an N=3 proxy
    python bench/run.py --help

Proxy mode starts three ``twistd -n shardkv node --storage memory`` processes
and one ``twistd -n shardkv proxy`` on free loopback ports (never 8080-8083),
preloads keys through the proxy, then runs wrk in rounds. Each round measures
direct GET, proxied GET, direct SET and proxied SET back to back, so each
proxied/direct ratio compares two runs made under the same machine load (this
box is shared and noisy; absolute numbers drift by up to 2x, paired ratios by
10-20 %). See bench/README.md for what every number means. The proxy runs
with its own defaults (N/R/W as ``shardkv proxy`` ships them, read back from
its ``/cluster``) unless ``--replicas``, ``--r`` or ``--w`` are given.

Latency mode is proxy mode's cluster and runs at each ``--concurrency`` (1,
32 and 128 connections) in the same round: proxied p50 / direct p50 at c=1
(target <= 4, GET and SET) and proxied/direct ops/s at c=32 (GET >= 0.5, SET
>= 0.35), each the median of its per-round values, with a PASS/MISS line.

Floor mode is latency mode (at c=1 and 32 by default) with two more targets
beside direct and proxied, both forwarding to the same two nodes. The floor,
``bench/floor_proxy.py``, is a leaf twisted.web Resource sending each GET or
SET as it is to both nodes over kept-alive connections with a hand-written
client and answering once both replied, with no placement, versions, quorum
rules, timeouts or errors. The stack floor, ``bench/stack_floor.py``, does
the same through Klein's routes and treq's calls, the stack issue 10 fixes.
What they cost is the least two replica requests cost on this machine, and
on that stack; so floor/direct and stack/direct say how far any proxy here
can get towards issue 10's targets, stack/floor what Klein and treq cost,
and proxied/stack how far the shardkv proxy is from its own stack's floor.

Ceiling mode starts one memory node and ``bench/bare_server.py`` (a leaf
twisted.web Resource answering ``GET /get?key=`` from a dict), both holding
the same keys, and measures GET at c=32 against each, paired per round: node
/ bare ops/s (target >= 0.75), plus the node's ``GET /kv/<key>``.

Storage mode starts one node per engine (``memory`` first, as the baseline,
then ``lmdb:always`` by default) and measures PUT /kv/<random key> with a
~100-byte body, interleaved per round, with the ratio durable/memory.

Replication mode starts two proxies, one with ``--replicas 1 --r 1 --w 1``
and one with ``--replicas 3 --r 2 --w 2``, each over its own three memory
nodes (the nodes hold the cluster map, N, R and W included). Each proxy
preloads its own keys (``n1k*``, ``n3k*``) and SETs its own key range
(``n1w*``, ``n3w*``), so neither reads the other's writes. Each round
runs N=1 GET, N=3 GET, N=1 SET, N=3 SET (same Lua scripts as proxy mode),
with the ratios N=3/N=1 for GET and SET: what the two extra copies cost.

The parts live beside this file: machine.py (machine line, tools),
wrkrun.py (wrk runs), cluster.py (servers and keys), report.py (tables,
ratios, targets), profiles.py (py-spy). Every process started here is stopped
at the end (try/finally and atexit). Exit status: 0 if every run was clean, 1
if any run saw non-2xx answers or socket errors, 2 if the benchmark could not
run. Targets never change the exit status.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cluster import (
    STACK_FLOOR,
    Processes,
    api,
    check_get,
    data_root,
    fmt_levels,
    parse_engine,
    parse_engines,
    post_keys,
    preload,
    proxied_cluster,
    quorum_levels,
    start_bare,
    start_floor,
    start_nodes,
    start_proxy,
    storage_args,
    storage_name,
    write_keys,
)

# bench/move.py imports CLK_TCK, cpu_ticks, find_twistd, find_wrk, machine_info,
# WrkResult and parse_wrk from here: re-exported (``X as X``) from their modules.
from machine import CLK_TCK as CLK_TCK
from machine import STARTUP_SECONDS, STOP_SECONDS, BenchError, loadavg, print_machine
from machine import cpu_ticks as cpu_ticks
from machine import find_twistd as find_twistd
from machine import find_wrk as find_wrk
from machine import machine_info as machine_info
from profiles import find_pyspy, profile
from report import HEADER, Goal, Ratio, print_round_ratios, print_summary, row, summarize
from wrkrun import Run, Target, run_wrk
from wrkrun import WrkResult as WrkResult
from wrkrun import parse_wrk as parse_wrk

from shardkv.client.blocking import TransportError
from shardkv.client.blocking import request as http_request
from shardkv.testing.polling import ProcessError
from shardkv.testing.processes import Proc


@dataclass
class Plan:
    """What a mode measures: its targets in a round's order, the ratios it reports,
    what it set up (for the JSON), and the targets ``--profile`` profiles, each
    with the file stem of its profile."""

    targets: list[Target]
    ratios: list[Ratio]
    setup: dict[str, Any]
    profiled: list[tuple[Target, str]] = field(default_factory=list)


# -- the benchmark loop ---------------------------------------------------------


def measure(
    wrk: str,
    targets: Sequence[Target],
    ratios: Sequence[Ratio],
    args: argparse.Namespace,
) -> list[Run]:
    if args.warmup > 0:
        print(f"\nwarm-up: {args.warmup} s per target, not measured")
        for t in targets:
            run_wrk(wrk, t, args.threads, args.warmup, 0, args.wrk_timeout)
    runs: list[Run] = []
    for n in range(1, args.rounds + 1):
        print(
            f"\nround {n}/{args.rounds}  ({args.duration} s per run, -t{args.threads}, "
            f"loadavg {loadavg():.2f})"
        )
        print(HEADER)
        for t in targets:
            run = run_wrk(wrk, t, args.threads, args.duration, n, args.wrk_timeout)
            runs.append(run)
            print(row(run), flush=True)
            if args.pause > 0:
                time.sleep(args.pause)
        print_round_ratios([r for r in runs if r.round == n], ratios)
    return runs


# -- proxy mode -----------------------------------------------------------------


def proxy_mode(args: argparse.Namespace, procs: Processes) -> Plan:
    cluster = proxied_cluster(args, procs)
    targets = cluster.targets(args.connections, args.keyspace, args.value_bytes)
    ratios = [
        Ratio("GET proxied/direct", ("GET", "proxied"), ("GET", "direct")),
        Ratio("SET proxied/direct", ("SET", "proxied"), ("SET", "direct")),
    ]
    profiled = [(t, f"{t.server.name}-{t.op.lower()}") for t in targets if t.target == "proxied"]
    return Plan(targets, ratios, cluster.setup, profiled)


# -- latency mode -----------------------------------------------------------------

LATENCY_GOALS: dict[tuple[str, str, int], Goal] = {
    # (op, metric, connections): issue 10's targets for proxied/direct.
    ("GET", "p50", 1): Goal("<=", 4.0),
    ("SET", "p50", 1): Goal("<=", 4.0),
    ("GET", "ops/s", 32): Goal(">=", 0.5),
    ("SET", "ops/s", 32): Goal(">=", 0.35),
}
DEFAULT_CONCURRENCY = (1, 32, 128)
PROFILED_CONCURRENCY = 32


def parse_concurrency(text: str) -> list[int]:
    """``1,32,128`` into [1, 32, 128]: distinct positive integers, in the order given
    (the order of the runs in a round)."""
    values: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            value = int(item)
        except ValueError:
            raise ValueError(f"{item!r} is not a number of connections") from None
        if value < 1:
            raise ValueError(f"{value} connections: must be at least 1")
        if value in values:
            raise ValueError(f"{value} is given twice")
        values.append(value)
    if not values:
        raise ValueError("name at least one concurrency, e.g. 1,32,128")
    return values


def latency_ratio(op: str, metric: str, connections: int) -> Ratio:
    """proxied/direct for ``op`` at ``connections``: ops/s (fraction kept) or p50
    (times slower), with its target from L{LATENCY_GOALS} if it has one."""
    suffix = f" c={connections}"
    return Ratio(
        f"{op} {metric} proxied/direct{suffix}",
        (op, "proxied" + suffix),
        (op, "direct" + suffix),
        metric,
        LATENCY_GOALS.get((op, metric, connections)),
    )


def latency_ratios(concurrency: Sequence[int]) -> list[Ratio]:
    """p50 and ops/s ratios, GET and SET, at every concurrency measured; and the
    targets' ratios at a concurrency not measured (reported as not measured)."""
    ratios = [
        latency_ratio(op, metric, c)
        for c in concurrency
        for metric in ("p50", "ops/s")
        for op in ("GET", "SET")
    ]
    for op, metric, c in LATENCY_GOALS:
        if c not in concurrency:
            ratios.append(latency_ratio(op, metric, c))
    return ratios


def profiled_concurrency(concurrency: Sequence[int]) -> int:
    """The concurrency whose proxied runs ``--profile`` profiles: 32, or the nearest."""
    return min(concurrency, key=lambda c: (abs(c - PROFILED_CONCURRENCY), c))


def profiled_runs(
    targets: Sequence[Target], servers: Sequence[Proc], concurrency: Sequence[int]
) -> list[tuple[Target, str]]:
    """The runs ``--profile`` profiles: those of ``servers`` at the L{profiled_concurrency},
    each with its file stem (``proxy-get-c32``)."""
    pc = profiled_concurrency(concurrency)
    return [
        (t, f"{t.server.name}-{t.op.lower()}-c{pc}")
        for t in targets
        if t.server in servers and t.connections == pc
    ]


def latency_mode(args: argparse.Namespace, procs: Processes) -> Plan:
    """Proxy mode's cluster, loaded at each ``--concurrency`` in every round: direct
    GET, proxied GET, direct SET, proxied SET at the first, then the same at the
    next, so every proxied/direct pair is back to back under the same load."""
    cluster = proxied_cluster(args, procs)
    targets: list[Target] = []
    for c in args.concurrency:
        targets += cluster.targets(c, args.keyspace, args.value_bytes, suffix=f" c={c}")
    setup = {**cluster.setup, "concurrency": list(args.concurrency)}
    profiled = profiled_runs(targets, [cluster.proxy], args.concurrency)
    return Plan(targets, latency_ratios(args.concurrency), setup, profiled)


# -- floor mode --------------------------------------------------------------------

DEFAULT_FLOOR_CONCURRENCY = (1, 32)


def floor_ratios(concurrency: Sequence[int]) -> list[Ratio]:
    """At every concurrency, GET and SET, for p50 (times slower) and ops/s: the
    floor, the stack floor and the shardkv proxy each against the direct node (with
    issue 10's targets: what a floor misses, no proxy built like it meets here);
    the stack floor against the floor (what Klein and treq cost); and the shardkv
    proxy against the stack floor (what it costs beyond them)."""
    ratios = []
    for c in concurrency:
        suffix = f" c={c}"
        for metric in ("p50", "ops/s"):
            for op in ("GET", "SET"):
                direct, floor = (op, "direct" + suffix), (op, "floor" + suffix)
                stack, proxied = (op, "stack" + suffix), (op, "proxied" + suffix)
                goal = LATENCY_GOALS.get((op, metric, c))
                ratios += [
                    Ratio(f"{op} {metric} floor/direct{suffix}", floor, direct, metric, goal),
                    Ratio(f"{op} {metric} stack/direct{suffix}", stack, direct, metric, goal),
                    Ratio(f"{op} {metric} proxied/direct{suffix}", proxied, direct, metric, goal),
                    Ratio(f"{op} {metric} stack/floor{suffix}", stack, floor, metric),
                    Ratio(f"{op} {metric} proxied/stack{suffix}", proxied, stack, metric),
                ]
    return ratios


def floor_mode(args: argparse.Namespace, procs: Processes) -> Plan:
    """Latency mode's cluster plus ``bench/floor_proxy.py`` and ``bench/stack_floor.py``
    over two of its nodes: at each ``--concurrency``, direct, floor, stack floor and
    proxied GET, then the same for SET, back to back, so each ratio compares runs
    made under the same load."""
    cluster = proxied_cluster(args, procs)
    floor = start_floor(procs, cluster.nodes[:2], "k0")
    stack = start_floor(procs, cluster.nodes[:2], "k0", "stack", STACK_FLOOR)
    print(
        f"floor proxy on {floor.port} and stack floor on {stack.port}, forwarding to "
        f"{cluster.nodes[0].name} and {cluster.nodes[1].name}"
    )
    targets: list[Target] = []
    watch = {floor.name: [floor, *cluster.nodes[:2]], stack.name: [stack, *cluster.nodes[:2]]}
    for c in args.concurrency:
        suffix = f" c={c}"
        direct_get, proxied_get, direct_set, proxied_set = cluster.targets(
            c, args.keyspace, args.value_bytes, suffix=suffix
        )
        for direct, proxied in ((direct_get, proxied_get), (direct_set, proxied_set)):
            floors = [
                replace(
                    proxied, target=server.name + suffix, server=server, watch=watch[server.name]
                )
                for server in (floor, stack)
            ]
            targets += [direct, *floors, proxied]
    floors_setup = {"r": 2, "w": 2, "nodes": [n.name for n in cluster.nodes[:2]]}
    setup = {
        **cluster.setup,
        "concurrency": list(args.concurrency),
        "floor": {"port": floor.port, "server": "bench/floor_proxy.py", **floors_setup},
        "stack": {"port": stack.port, "server": "bench/stack_floor.py", **floors_setup},
    }
    profiled = profiled_runs(targets, [floor, stack, cluster.proxy], args.concurrency)
    return Plan(targets, floor_ratios(args.concurrency), setup, profiled)


# -- ceiling mode ------------------------------------------------------------------

CEILING_GOAL = Goal(">=", 0.75)
BARE, NODE_GET, NODE_KV = ("GET", "bare /get"), ("GET", "node /get"), ("GET", "node /kv")


def ceiling_ratios() -> list[Ratio]:
    """node/bare ops/s for the same request (``/get``, issue 10's target 3); the
    node's ``/kv/<key>`` against the same bare ``/get``; and the p50s alike."""
    return [
        Ratio("ops/s node/bare, /get", NODE_GET, BARE, goal=CEILING_GOAL),
        Ratio("ops/s node /kv / bare /get", NODE_KV, BARE),
        Ratio("p50 node/bare, /get", NODE_GET, BARE, "p50"),
        Ratio("p50 node /kv / bare /get", NODE_KV, BARE, "p50"),
    ]


def answer_difference(node_body: bytes, bare_body: bytes) -> set[str]:
    """The fields in which the node's ``/get`` answer differs from the bare server's.

    The bare server answers ``{"key", "value"}``; the node adds ``version``.
    Anything else differing means the two do not do the same work.
    """
    node, bare = json.loads(node_body), json.loads(bare_body)
    if not isinstance(node, dict) or not isinstance(bare, dict):
        return {"<not a JSON object>"}
    return {k for k in node.keys() | bare.keys() if node.get(k) != bare.get(k)}


def ceiling_mode(args: argparse.Namespace, procs: Processes) -> Plan:
    """A memory node and the bare twisted.web server, both holding ``--keys`` keys
    with the same values (the node's preloaded with ``POST /set``), loaded with
    the same ``GET /get?key=`` requests, back to back in every round."""
    node = procs.start_node(
        None, None, "--storage", "memory", name="node", deadline=STARTUP_SECONDS
    )
    value = "v" * args.value_bytes
    keys = [f"k{i}" for i in range(args.keys)]
    started = time.monotonic()
    post_keys(node, keys, value)
    bare = start_bare(procs, dict.fromkeys(keys, value))
    print(f"servers: node (memory) on {node.port}, bare twisted.web on {bare.port}")
    print(f"         logs in {procs.root}")
    print(
        f"preloaded {args.keys} keys into the node (POST /set) and the bare server's dict "
        f"in {time.monotonic() - started:.1f} s"
    )
    answers = {}
    for server, path in ((node, "/get?key=k0"), (bare, "/get?key=k0"), (node, "/kv/k0")):
        reply = http_request("GET", server.url + path, timeout=10)
        if reply.status != 200:
            raise BenchError(f"GET {path} on {server.name} answered {reply.status}")
        answers[(server.name, path)] = reply.body
    node_get, bare_get = answers[(node.name, "/get?key=k0")], answers[(bare.name, "/get?key=k0")]
    differ = answer_difference(node_get, bare_get)
    if differ - {"version"}:
        raise BenchError(
            f"the node and the bare server answer /get differently in {sorted(differ)}: "
            f"{node_get[:200]!r} vs {bare_get[:200]!r}"
        )
    print(
        f"answers to GET /get?key=k0: node {len(node_get)} bytes, bare {len(bare_get)} bytes "
        f'(same but the node\'s "version"); node /kv/k0 {len(answers[(node.name, "/kv/k0")])}'
        " bytes (the raw value)"
    )
    key_file = write_keys(procs.root / "keys.txt", keys)
    c = args.connections
    targets = [
        Target("GET", "bare /get", bare, "get.lua", [str(key_file)], c, "/", [bare]),
        Target("GET", "node /get", node, "get.lua", [str(key_file)], c, "/", [node]),
        Target("GET", "node /kv", node, "get.lua", [str(key_file), "/kv/"], c, "/", [node]),
    ]
    setup = {
        "keys": args.keys,
        "value_bytes": args.value_bytes,
        "node": {"name": node.name, "port": node.port, "storage": "memory"},
        "bare": {"name": bare.name, "port": bare.port, "server": "bench/bare_server.py"},
        "answer_bytes": {"node /get": len(node_get), "bare /get": len(bare_get)},
    }
    profiled = [(targets[1], f"{node.name}-get"), (targets[2], f"{node.name}-kv")]
    return Plan(targets, ceiling_ratios(), setup, profiled)


# -- replication mode -----------------------------------------------------------

REPLICATION_LEVELS: dict[str, dict[str, int]] = {
    # target name: proxy options. The order is the order of the runs in a round.
    "N=1": {"replicas": 1, "r": 1, "w": 1},
    "N=3": {"replicas": 3, "r": 2, "w": 2},
}


def replication_mode(args: argparse.Namespace, procs: Processes) -> Plan:
    """Two proxies, N=1 and N=3 (R=2, W=2), each over its own ``--nodes`` nodes, same load.

    Their own nodes, because the nodes hold the cluster map and its N, R and W
    (``--replicas``, ``--r`` and ``--w`` only shape a blank cluster's first map):
    two proxies over the same nodes would serve one map. Each proxy also gets its
    own keys for GET (``n1k*``, ``n3k*``) and for SET (``n1w*``, ``n3w*``).
    """
    storage = parse_engine(args.storage)
    data_dir = data_root(procs, args.data_dir)[0] if storage[0] != "memory" else None
    nodes: dict[str, list[Proc]] = {}
    proxies: dict[str, Proc] = {}
    levels: dict[str, dict[str, int | None]] = {}
    for i, (label, wanted) in enumerate(REPLICATION_LEVELS.items()):
        name = "proxy" + label.replace("=", "")  # proxyN1, proxyN3
        own = start_nodes(procs, args.nodes, storage, data_dir, first=1 + i * args.nodes)
        nodes[label] = own
        proxies[label] = start_proxy(procs, name, own, {"pool_size": args.pool_size, **wanted})
        levels[label] = quorum_levels(proxies[label])
        got = {k: v for k, v in levels[label].items() if v is not None}
        if got and got != wanted:
            raise BenchError(f"{name} reports {fmt_levels(levels[label])}, not {wanted}")
    for label, p in proxies.items():
        print(
            f"cluster {label}: {storage_name(storage)} nodes on "
            f"{', '.join(str(n.port) for n in nodes[label])}; "
            f"{p.name} on {p.port} ({fmt_levels(levels[label])})"
        )
    print(f"         logs in {procs.root}")

    c = args.connections
    targets: list[Target] = []
    key_counts: dict[str, dict[str, int]] = {}
    key_files: dict[str, Path] = {}
    for label, proxy in proxies.items():
        tag = label.replace("=", "").lower()  # n1, n3
        started = time.monotonic()
        owners = preload(proxy, nodes[label], args.keys, args.value_bytes, prefix=f"{tag}k")
        by_address = {f"127.0.0.1:{n.port}": n.name for n in nodes[label]}
        key_counts[label] = {by_address.get(a, a): len(k) for a, k in owners.items()}
        spread = ", ".join(f"{name} {count}" for name, count in key_counts[label].items())
        print(
            f"preloaded {args.keys} keys {tag}k0..{tag}k{args.keys - 1} through {proxy.name} "
            f"in {time.monotonic() - started:.1f} s (owners: {spread})"
        )
        keys = (f"{tag}k{i}" for i in range(args.keys))
        key_files[label] = write_keys(procs.root / f"keys-{tag}.txt", keys)
        check_get(proxy, f"{tag}k0")
    for op in ("GET", "SET"):
        for label, proxy in proxies.items():
            tag = label.replace("=", "").lower()
            watch = [proxy, *nodes[label]]
            if op == "GET":
                targets.append(
                    Target("GET", label, proxy, "get.lua", [str(key_files[label])], c, "/", watch)
                )
            else:
                set_args = [str(args.keyspace), str(args.value_bytes), f"{tag}w"]
                targets.append(Target("SET", label, proxy, "set.lua", set_args, c, "/set", watch))
    ratios = [
        Ratio("GET N=3/N=1", ("GET", "N=3"), ("GET", "N=1")),
        Ratio("SET N=3/N=1", ("SET", "N=3"), ("SET", "N=1")),
    ]
    setup = {
        "nodes": args.nodes,
        "storage": storage_name(storage),
        "keys": args.keys,
        "keys_per_node": key_counts,
        "pool_size": args.pool_size,
        "proxies": {
            label: {
                "name": proxies[label].name,
                "asked": REPLICATION_LEVELS[label],
                "effective": levels[label],
            }
            for label in proxies
        },
    }
    profiled = [(t, f"{t.server.name}-{t.op.lower()}") for t in targets]
    return Plan(targets, ratios, setup, profiled)


# -- storage mode ---------------------------------------------------------------


def storage_mode(args: argparse.Namespace, procs: Processes) -> Plan:
    engines = parse_engines(args.engines)
    root, fs = data_root(procs, args.data_dir)
    targets: list[Target] = []
    names: Counter[str] = Counter()
    for storage in engines:
        base = storage_name(storage)
        names[base] += 1
        name = base if names[base] == 1 else f"{base}#{names[base]}"
        data_dir = None if storage[0] == "memory" else root / name
        extra = storage_args(storage)
        server = procs.start_node(None, data_dir, *extra, name=name, deadline=STARTUP_SECONDS)
        put_args = [str(args.keyspace), str(args.value_bytes), "p"]
        targets.append(
            Target("PUT", name, server, "put.lua", put_args, args.connections, "/", [server])
        )
    print(f"nodes: {', '.join(f'{t.target} on {t.server.port}' for t in targets)}")
    print(f"       lmdb data under {root} ({fs}); logs in {procs.root}")
    baseline = targets[0]
    ratios = [
        Ratio(f"{t.target}/{baseline.target}", ("PUT", t.target), ("PUT", baseline.target))
        for t in targets[1:]
    ]
    setup = {"engines": args.engines, "data_dir": str(root), "data_fs": fs}
    return Plan(targets, ratios, setup, [(targets[-1], f"{targets[-1].server.name}-put")])


STORAGE_FIELDS = (
    "entries",
    "keys",
    "commits",
    "committed_writes",
    "average_batch",
    "largest_batch",
    "syncs",
    "used_bytes",
)


def storage_details(targets: Sequence[Target]) -> dict[str, dict[str, Any]]:
    """What each node's /health says about its engine after the runs (group commit sizes)."""
    out: dict[str, dict[str, Any]] = {}
    for t in targets:
        try:
            storage = api(t.server).health().json().get("storage", {})
        except (OSError, ValueError, AttributeError):
            continue
        out[t.target] = {k: storage[k] for k in STORAGE_FIELDS if k in storage}
    print("\nengines after the runs (from /health):")
    for name, fields in out.items():
        print(f"  {name:<14} " + ", ".join(f"{k} {v}" for k, v in fields.items()))
    return out


# -- main ------------------------------------------------------------------------

MODES = {
    "proxy": proxy_mode,
    "latency": latency_mode,
    "floor": floor_mode,
    "ceiling": ceiling_mode,
    "storage": storage_mode,
    "replication": replication_mode,
}
QUORUM_MODES = ("proxy", "latency")  # where --replicas, --r and --w are the user's
STORAGE_MODES = ("proxy", "latency", "floor", "replication")  # where --storage applies
CONCURRENCY_MODES = ("latency", "floor")  # runs at each --concurrency, not --connections
NODES_MODES = ("proxy", "latency", "replication")  # where --nodes applies


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark shardkv with wrk against a cluster this command starts itself. "
        "See bench/README.md.",
    )
    p.add_argument(
        "mode",
        nargs="?",
        default="proxy",
        choices=list(MODES),
        help="proxy (default): GET and SET, straight at a node vs through the proxy; "
        "latency: the same at each --concurrency, with p50/p99 and issue 10's targets; "
        "floor: latency mode beside the least an R=W=2 proxy costs, by hand and on Klein and treq; "
        "ceiling: a node's GET vs a bare twisted.web server answering from a dict; "
        "storage: PUT throughput of one node per storage engine; "
        "replication: GET and SET through an N=1 proxy vs an N=3 (R=2, W=2) proxy",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds of interleaved runs (3)")
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (10)")
    p.add_argument(
        "--connections",
        type=int,
        default=None,
        help="wrk connections (proxy, ceiling and replication 32, storage 64; "
        "latency mode takes --concurrency)",
    )
    p.add_argument(
        "--concurrency",
        default=None,
        help="latency and floor modes: the wrk connection counts measured in each round, "
        f"in order ({','.join(map(str, DEFAULT_CONCURRENCY))}; floor "
        f"{','.join(map(str, DEFAULT_FLOOR_CONCURRENCY))})",
    )
    p.add_argument("--threads", type=int, default=1, help="wrk threads (1: leaves a core free)")
    p.add_argument(
        "--warmup", type=int, default=2, help="unmeasured seconds per target before round 1 (2)"
    )
    p.add_argument("--pause", type=float, default=1.0, help="seconds between runs (1)")
    p.add_argument("--keys", type=int, default=1000, help="keys preloaded for the GETs (1000)")
    p.add_argument(
        "--keyspace", type=int, default=100_000, help="random keys for SET and PUT (100000)"
    )
    p.add_argument("--value-bytes", type=int, default=100, help="value size in bytes (100)")
    p.add_argument(
        "--nodes", type=int, default=3, help="proxy, latency, replication modes: storage nodes (3)"
    )
    p.add_argument(
        "--storage",
        default=None,
        help="proxy, latency, replication modes: every node's engine, memory (default) or "
        "lmdb:always|batch|os; direct and proxied runs hit nodes with the same durability",
    )
    p.add_argument("--pool-size", type=int, help="passed to the proxy (default: the proxy's)")
    p.add_argument(
        "--replicas", type=int, help="proxy/latency: proxy --replicas N (default: the proxy's)"
    )
    p.add_argument(
        "--r", type=int, help="proxy/latency: proxy --r, the read quorum (default: the proxy's)"
    )
    p.add_argument(
        "--w", type=int, help="proxy/latency: proxy --w, the write quorum (default: the proxy's)"
    )
    p.add_argument(
        "--wrk-timeout", type=int, default=10, help="seconds before wrk counts a timeout (10)"
    )
    p.add_argument(
        "--engines",
        default="memory,lmdb:always",
        help="storage mode: the baseline first, then the engines to compare with it "
        "(memory,lmdb:always; also lmdb:batch, lmdb:os)",
    )
    p.add_argument(
        "--data-dir",
        help="where lmdb data goes (storage mode, or --storage lmdb:...; default: a new temp dir)",
    )
    p.add_argument("--json", metavar="FILE", help="also write every run and the summary here")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="after the rounds, run py-spy during one extra run per profiled target: the proxy "
        "(proxy mode: GET and SET; latency mode: GET and SET at c=32; replication mode: each "
        "proxy), the node (ceiling mode: /get and /kv) or the last node (storage mode); raw "
        "stacks and flame graphs go to DIR",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the defaults that depend on the mode, and refuse options the mode does
    not use (an option silently ignored would make a result mean something else)."""
    mode = args.mode
    if mode in CONCURRENCY_MODES:
        if args.connections is not None:
            p.error(f"{mode} mode takes --concurrency (e.g. 1,32,128), not --connections")
        default = DEFAULT_CONCURRENCY if mode == "latency" else DEFAULT_FLOOR_CONCURRENCY
        try:
            args.concurrency = parse_concurrency(args.concurrency or ",".join(map(str, default)))
        except ValueError as e:
            p.error(f"--concurrency: {e}")
    else:
        if args.concurrency is not None:
            p.error(
                f"--concurrency is for latency and floor modes; {mode} mode takes --connections"
            )
        if args.connections is None:
            args.connections = 64 if mode == "storage" else 32
        args.concurrency = [args.connections]
    if mode not in QUORUM_MODES:
        for name in ("replicas", "r", "w"):
            if getattr(args, name) is not None:
                p.error(f"--{name} is for proxy and latency modes; {mode} mode sets its own")
    if args.storage is not None and mode not in STORAGE_MODES:
        why = "its nodes are memory, as the bare dict is" if mode == "ceiling" else "use --engines"
        p.error(f"--storage is not for {mode} mode ({why})")
    if args.storage is None:
        args.storage = "memory"
    try:
        parse_engine(args.storage)
    except BenchError as e:
        p.error(f"--storage: {e}")
    if mode == "replication" and args.nodes < 3:
        p.error("replication mode needs --nodes 3 or more (its N=3 proxy keeps 3 copies)")
    positive = ("rounds", "duration", "connections", "threads", "keys", "keyspace", "nodes")
    for name in (*positive, "wrk_timeout"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads > min(args.concurrency):
        p.error("--threads may not exceed the connections (each wrk thread needs one)")
    if args.value_bytes < 0 or args.warmup < 0 or args.pause < 0:
        p.error("--value-bytes, --warmup and --pause may not be negative")


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        wrk = find_wrk()
        find_twistd()
        if args.profile:
            find_pyspy()  # before the rounds, not after them
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    machine = machine_info(wrk)
    print_machine(machine)

    workdir = Path(tempfile.mkdtemp(prefix="shardkv-bench-"))
    procs = Processes(workdir)
    atexit.register(procs.close, STOP_SECONDS)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    ok = False
    try:
        plan = MODES[args.mode](args, procs)
        runs = measure(wrk, plan.targets, plan.ratios, args)
        summary = summarize(runs, plan.ratios)
        print_summary(summary, args.rounds)
        machine["loadavg_end"] = list(os.getloadavg())
        print(
            "loadavg at end "
            + " ".join(f"{v:.2f}" for v in machine["loadavg_end"])
            + f"; per run: {min(r.loadavg for r in runs):.2f}..{max(r.loadavg for r in runs):.2f}"
        )
        if args.mode == "storage":
            plan.setup["engines_after"] = storage_details(plan.targets)
        flagged = [r for r in runs if r.flagged]
        for r in flagged:
            print(
                f"FLAGGED round {r.round} {r.op} {r.target}: {r.result.non_2xx} non-2xx, "
                f"socket errors {r.result.socket_errors}"
            )
        profiled = profile(wrk, plan.profiled, args) if args.profile else {}
        if args.json:
            report = {
                "mode": args.mode,
                "config": {k: v for k, v in vars(args).items() if k != "json"},
                "setup": plan.setup,
                "machine": machine,
                "runs": [asdict(r) for r in runs],
                "summary": summary,
                "profile": profiled,
            }
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            print(f"results written to {args.json}")
        ok = True
        return 1 if flagged else 0
    except (BenchError, ProcessError, TransportError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        procs.close(STOP_SECONDS)
        for path in procs.cleanup:
            shutil.rmtree(path, ignore_errors=True)
        if ok and not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"server logs kept in {workdir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
