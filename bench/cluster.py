"""The servers a benchmark runs against: nodes, proxies, the bare server, their keys.

Every mode of ``bench/run.py`` starts its servers here, with the process
helpers the system tests use (L{shardkv.testing.processes}), and fills them
through the package's own blocking client. Proxy and latency mode share one
setup (L{proxied_cluster}): three nodes, one proxy, keys preloaded through the
proxy, and the node that owns the most keys as the direct target.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from machine import BENCH_DIR, STARTUP_SECONDS, BenchError, filesystem_of
from wrkrun import Target

from shardkv.client.blocking import BlockingClient, shared
from shardkv.testing.polling import ProcessError, free_port, wait_healthy
from shardkv.testing.processes import Proc, ProcessSet


class Processes(ProcessSet):
    """The run's servers (L{ProcessSet}: free ports, logs, readiness, stop by pid),
    plus directories to remove once they have stopped."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.cleanup: list[Path] = []


def api(server: Proc) -> BlockingClient:
    """The shared one-off client (one connection per request), aimed at ``server``."""
    return shared().at(server.url)


# -- storage ----------------------------------------------------------------------

Storage = tuple[str, str | None]  # (engine, durability): ("memory", None), ("lmdb", "always")


def parse_engine(item: str) -> Storage:
    """``memory`` or ``lmdb:always|batch|os`` into (engine, durability)."""
    engine, _, durability = item.strip().partition(":")
    if engine == "memory" and not durability:
        return ("memory", None)
    if engine == "lmdb" and durability in ("always", "batch", "os"):
        return ("lmdb", durability)
    raise BenchError(f"{item!r} is not memory or lmdb:always|batch|os")


def parse_engines(text: str) -> list[Storage]:
    """``memory,lmdb:always,lmdb:batch`` into (engine, durability) pairs."""
    try:
        engines = [parse_engine(item) for item in text.split(",") if item.strip()]
    except BenchError as e:
        raise BenchError(f"--engines: {e}") from None
    if len(engines) < 2:
        raise BenchError("--engines: name a baseline and at least one engine to compare")
    return engines


def storage_name(storage: Storage) -> str:
    engine, durability = storage
    return engine if durability is None else f"{engine}-{durability}"


def storage_args(storage: Storage) -> list[str]:
    """The node options for ``storage`` (the data directory aside)."""
    engine, durability = storage
    return ["--storage", engine] + ([] if durability is None else ["--durability", durability])


def data_root(procs: Processes, parent: str | None) -> tuple[Path, str]:
    """A new directory for LMDB data under ``parent`` (or the temp dir), removed after
    the run, and its file system type. Warns on a RAM file system: fsync costs
    nothing there, so durable writes would look as cheap as memory ones."""
    root = Path(tempfile.mkdtemp(prefix="shardkv-bench-data-", dir=parent))
    procs.cleanup.append(root)
    fs = filesystem_of(root)
    if fs in ("tmpfs", "ramfs"):
        print("WARNING: the data directory is on a RAM file system: fsync costs nothing there")
    return root, fs


def start_nodes(
    procs: Processes,
    count: int,
    storage: Storage = ("memory", None),
    data_dir: Path | None = None,
    first: int = 1,
) -> list[Proc]:
    """``count`` nodes on free ports with the same storage, started together, then
    waited for, named ``node<first>`` and on. LMDB nodes keep their data in
    ``data_dir``/<name>."""
    if storage[0] != "memory" and data_dir is None:
        raise BenchError(f"{storage_name(storage)} nodes need a data directory")
    nodes = []
    for i in range(first, first + count):
        name = f"node{i}"
        node_dir = None if storage[0] == "memory" or data_dir is None else data_dir / name
        nodes.append(
            procs.start_node(None, node_dir, *storage_args(storage), name=name, wait=False)
        )
    for node in nodes:
        node.wait_healthy(STARTUP_SECONDS)
    return nodes


def start_proxy(
    procs: Processes, name: str, nodes: Sequence[Proc], options: dict[str, int | None]
) -> Proc:
    """A proxy over ``nodes``, ready once it counts every node as up and serves the
    cluster map the nodes chose (not its provisional one: only that map's N, R and
    W are the ones it keeps).

    ``options`` maps proxy options (pool_size, replicas, r, w) to values;
    None leaves the proxy's own default.
    """
    extra: list[str] = []
    for option, value in options.items():
        if value is not None:
            extra += [f"--{option.replace('_', '-')}", str(value)]
    proxy = procs.start_proxy(None, nodes, *extra, name=name, deadline=STARTUP_SECONDS)
    proxy.wait_healthy(STARTUP_SECONDS, ready=lambda reply: ready_over(reply.json(), len(nodes)))
    return proxy


def ready_over(health: Any, count: int) -> bool:
    """Does a proxy's ``/health`` say it counts all ``count`` nodes up and serves the
    map they chose (``map.provisional`` false)?"""
    if not isinstance(health, dict):
        return False
    chosen = isinstance(health.get("map"), dict) and health["map"].get("provisional") is False
    return chosen and health.get("nodes_up") == health.get("nodes_total") == count


def quorum_levels(proxy: Proc) -> dict[str, int | None]:
    """The N, R and W the proxy actually uses by default, from its GET /cluster."""
    levels: dict[str, int | None] = dict.fromkeys(("replicas", "r", "w"))
    try:
        reply = api(proxy).cluster()
        payload = reply.json() if reply.status == 200 else {}
    except (OSError, ValueError):
        payload = {}
    if isinstance(payload, dict):
        for name in levels:
            if isinstance(payload.get(name), int):
                levels[name] = payload[name]
    return levels


def fmt_levels(levels: dict[str, int | None]) -> str:
    def show(v: int | None) -> str:
        return "?" if v is None else str(v)

    return f"N={show(levels['replicas'])} R={show(levels['r'])} W={show(levels['w'])}"


# -- keys -------------------------------------------------------------------------

PRELOAD_WORKERS = 8


def _set_chunk(
    client: BlockingClient, keys: Sequence[str], value: str, explain: bool
) -> list[tuple[str, str | None]]:
    """POST /set each key (on kept-alive connections); with ``explain``, its owner
    from the proxy's /explain (None if that answers no 200)."""
    owners: list[tuple[str, str | None]] = []
    for key in keys:
        reply = client.set(key, value)
        if reply.status != 200:
            raise BenchError(
                f"preload: POST /set {key} answered {reply.status}: {reply.body[:300]!r}"
            )
        owner = None
        if explain:
            reply = client.explain(key)
            owner = reply.json()["owner"] if reply.status == 200 else None
        owners.append((key, owner))
    return owners


def post_keys(
    server: Proc, keys: Sequence[str], value: str, explain: bool = False
) -> list[tuple[str, str | None]]:
    """POST /set every key to ``server``, 8 at a time; (key, owner) pairs sorted by key
    (owners only with ``explain``, for a proxy)."""
    chunks = [keys[i::PRELOAD_WORKERS] for i in range(PRELOAD_WORKERS)]
    with (
        BlockingClient(server.url, timeout=30) as client,
        ThreadPoolExecutor(PRELOAD_WORKERS) as pool,
    ):
        done = list(pool.map(lambda c: _set_chunk(client, c, value, explain), chunks))
    return sorted((pair for chunk in done for pair in chunk), key=lambda p: p[0])


def preload(
    proxy: Proc, nodes: Sequence[Proc], count: int, value_bytes: int, prefix: str = "k"
) -> dict[str, list[str]]:
    """Store ``count`` keys (``prefix``0, ``prefix``1, ...) through the proxy; map each
    node's address to the keys it owns.

    Owners come from the proxy's /explain?key=. If the proxy has no /explain,
    the keys are also written straight to the first node (PUT /kv), which then
    owns them all as far as the direct GETs are concerned.
    """
    value = "v" * value_bytes
    keys = [f"{prefix}{i}" for i in range(count)]
    owners: dict[str, list[str]] = {f"127.0.0.1:{n.port}": [] for n in nodes}
    explained = True
    for key, owner in post_keys(proxy, keys, value, explain=True):
        if owner is None:
            explained = False
            break
        owners.setdefault(owner, []).append(key)
    if explained:
        return owners
    print("  the proxy has no /explain; writing the keys straight to the first node too")
    first = nodes[0]
    with BlockingClient(first.url, timeout=30) as client:
        for key in keys:
            status = client.put(key, value).status
            if status not in (200, 201):
                raise BenchError(f"preload: PUT /kv/{key} on {first.name} answered {status}")
    return {f"127.0.0.1:{first.port}": keys}


def write_keys(path: Path, keys: Iterable[str]) -> Path:
    """A key file for get.lua: one URL-encoded key a line."""
    path.write_text("".join(quote(k, safe="") + "\n" for k in keys), encoding="utf-8")
    return path


def check_get(server: Proc, key: str) -> None:
    reply = api(server).get(key)
    if reply.status != 200:
        raise BenchError(
            f"GET {key} on {server.name} answered {reply.status}: {reply.body[:300]!r}"
        )


# -- proxy and latency modes: direct node vs proxied --------------------------------


@dataclass
class ProxiedCluster:
    """Nodes, a proxy over them, preloaded keys, and the node the direct runs load."""

    nodes: list[Proc]
    proxy: Proc
    direct: Proc
    all_keys: Path  # key file: every preloaded key (proxied GETs)
    own_keys: Path  # key file: the keys the direct node owns (direct GETs)
    setup: dict[str, Any]

    def targets(
        self, connections: int, keyspace: int, value_bytes: int, suffix: str = ""
    ) -> list[Target]:
        """Direct GET, proxied GET, direct SET, proxied SET at ``connections``, in that
        order (a round's order). ``suffix`` tells apart the same pair at another
        concurrency (``direct c=1``)."""
        c = connections
        direct, proxy = self.direct, self.proxy
        both = [proxy, *self.nodes]  # the proxied runs report the nodes' CPU too
        set_args = [str(keyspace), str(value_bytes), "w"]
        get_direct = [str(self.own_keys)]
        get_proxied = [str(self.all_keys)]
        return [
            Target("GET", "direct" + suffix, direct, "get.lua", get_direct, c, "/", [direct]),
            Target("GET", "proxied" + suffix, proxy, "get.lua", get_proxied, c, "/", both),
            Target("SET", "direct" + suffix, direct, "set.lua", set_args, c, "/set", [direct]),
            Target("SET", "proxied" + suffix, proxy, "set.lua", set_args, c, "/set", both),
        ]


def proxied_cluster(args: argparse.Namespace, procs: Processes) -> ProxiedCluster:
    """Start ``--nodes`` nodes (all with ``--storage``) and a proxy, preload ``--keys``
    keys through the proxy, and choose the node that owns the most keys as the
    direct target. Direct runs hit one of the proxied path's own nodes, so a direct
    SET has the same durability as a proxied one's replica writes."""
    storage = parse_engine(args.storage)
    data_dir, fs = (None, None)
    if storage[0] != "memory":
        data_dir, fs = data_root(procs, args.data_dir)
    nodes = start_nodes(procs, args.nodes, storage, data_dir)
    options = {o: getattr(args, o) for o in ("pool_size", "replicas", "r", "w")}
    proxy = start_proxy(procs, "proxy", nodes, options)
    levels = quorum_levels(proxy)
    asked = any(v is not None for v in (args.replicas, args.r, args.w))
    chosen = "as asked" if asked else "the proxy's defaults"
    print(
        f"cluster: {storage_name(storage)} nodes on {', '.join(str(n.port) for n in nodes)}, "
        f"proxy on {proxy.port} ({fmt_levels(levels)}, {chosen})"
    )
    if data_dir is not None:
        print(f"         lmdb data under {data_dir} ({fs})")
    print(f"         logs in {procs.root}")

    started = time.monotonic()
    owners = preload(proxy, nodes, args.keys, args.value_bytes)
    by_address = {f"127.0.0.1:{n.port}": n for n in nodes}
    owner_address = max(owners, key=lambda a: len(owners[a]))
    direct = by_address[owner_address]
    spread = ", ".join(f"{by_address[a].name} {len(k)}" for a, k in owners.items())
    print(
        f"preloaded {args.keys} keys through the proxy in {time.monotonic() - started:.1f} s "
        f"({spread}); direct runs use {direct.name} and its {len(owners[owner_address])} keys"
    )
    all_keys = write_keys(procs.root / "keys-all.txt", (f"k{i}" for i in range(args.keys)))
    own_keys = write_keys(procs.root / "keys-direct.txt", owners[owner_address])
    check_get(direct, owners[owner_address][0])
    check_get(proxy, "k0")
    setup = {
        "nodes": args.nodes,
        "storage": storage_name(storage),
        "data_fs": fs,
        "keys": args.keys,
        "keys_per_node": {by_address[a].name: len(k) for a, k in owners.items()},
        "direct_node": direct.name,
        "pool_size": args.pool_size,
        "replicas": args.replicas,
        "r": args.r,
        "w": args.w,
        "effective": levels,  # what the proxy reported on /cluster
    }
    return ProxiedCluster(nodes, proxy, direct, all_keys, own_keys, setup)


# -- ceiling and floor modes: the bare servers ---------------------------------------


BARE_SERVER = BENCH_DIR / "bare_server.py"
FLOOR_PROXY = BENCH_DIR / "floor_proxy.py"
STACK_FLOOR = BENCH_DIR / "stack_floor.py"


def start_script(procs: Processes, name: str, script: Path, args: list[str], probe: str) -> Proc:
    """``python SCRIPT PORT ARGS...`` on a free port, ready once ``GET <probe>``
    answers 200. Its output goes to ``<name>.out``; it is stopped with the rest
    (SIGTERM; the reactor stops on it)."""
    for attempt in range(3):
        port = free_port()
        proc = Proc(
            name=name,
            args=[sys.executable, str(script), str(port), *args],
            log_path=procs.root / f"{name}.log",
            out_path=procs.root / f"{name}.out",
            cwd=procs.root,
            port=port,
        )
        procs.procs.append(proc)
        proc.start()
        try:
            wait_healthy(proc.url + probe, STARTUP_SECONDS, alive=proc.check_running)
        except ProcessError:
            if attempt < 2 and "Address already in use" in proc.tail():
                proc.stop()
                procs.procs.remove(proc)
                continue
            raise
        return proc
    raise AssertionError("unreachable")


def start_bare(procs: Processes, data: dict[str, str], name: str = "bare") -> Proc:
    """``bench/bare_server.py`` serving ``data``, ready once it answers the first key."""
    if not data:
        raise BenchError("the bare server needs at least one key")
    data_path = procs.root / f"{name}-data.json"
    data_path.write_text(json.dumps(data), encoding="utf-8")
    probe = "/get?key=" + quote(next(iter(data)), safe="")
    return start_script(procs, name, BARE_SERVER, [str(data_path)], probe)


def start_floor(
    procs: Processes,
    nodes: Sequence[Proc],
    key: str,
    name: str = "floor",
    script: Path = FLOOR_PROXY,
) -> Proc:
    """``script`` (``bench/floor_proxy.py``, or L{STACK_FLOOR}) over ``nodes``, ready
    once it answers ``key``."""
    ports = [str(n.port) for n in nodes]
    return start_script(procs, name, script, ports, "/get?key=" + quote(key, safe=""))
