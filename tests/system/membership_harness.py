"""Real-process machinery for the live-membership tests and ``bench/move.py``.

What a membership test needs beyond L{shardkv.testing.processes}:

- **A fast preload.** 100,000 keys through the proxy take minutes here, and
  300,000 replica puts in ``POST /replica/batch`` requests of 64 still take
  7-8 s (measured: 4,689 batches from 24 threads, 41k records/s, most of it
  the nodes decoding JSON and base64). So L{preload_data_dirs} writes the
  records straight into each node's LMDB data directory *before the node
  starts*, with the engine's own layout (L{shardkv.storage.lmdb.layout}) and
  record encoding, one write transaction per node: 0.5 s to place and encode
  100k keys and 0.3 s to write 300k records. Each key goes to the first N
  nodes of its preference list under the ring the first proxy's epoch-1 map
  describes (every node at weight 1, L{DEFAULT_VNODES}); L{start_cluster}
  checks that map against the one the proxy created, so a preload that the
  map disagrees with fails at once instead of looking like lost data.
- **A fast read of every replica.** ``GET /replica/kv/<key>`` for 300k copies
  is far too slow. L{scan_node} opens a node's LMDB environment *read-only
  from this process while the node runs* (LMDB supports readers in other
  processes; the node's own lock, ``shardkv.lock``, only keeps a second node
  out), and decodes every record in one read transaction: a consistent
  snapshot of everything the node has committed. Every node writes through
  its group committer before it acknowledges, so after the load has stopped
  and the move is idle the snapshot is the node's final state.
- **A watch on the move.** L{MoveWatch} polls every node's ``GET
  /replica/move`` and a proxy's ``GET /admin/rebalance`` ten times a second
  from a thread, so a test can wait for a fraction of the copy to be done
  (the kill window) and read the streams' counters afterwards (moved keys
  against the plan, the copy rate for the benchmark).
- **Checks.** L{check_placement} (every key on exactly the first N nodes of
  its preference list under the final map, no orphans anywhere) and
  L{check_fresh_reads} (no read older than a write acknowledged, by any
  client, before the read began: stronger than the history module's
  read-your-writes check).

Everything is synchronous, like the process helpers. No helper sleeps to
synchronise: waits poll with a deadline.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from shardkv.client.blocking import request as send
from shardkv.core.clustermap import ring_for
from shardkv.core.placement import DEFAULT_VNODES, Ring
from shardkv.core.records import CorruptRecord, Record, decode, encode
from shardkv.core.versions import Version
from shardkv.node.mover import cleanup_meta, stream_meta
from shardkv.storage.lmdb.datadir import MAX_DBS, open_database
from shardkv.storage.lmdb.layout import (
    META_DB,
    RECORDS_DB,
    db_key,
    meta_key,
    pack_stored,
    unpack_stored,
)
from shardkv.testing.history import History, Op, Violation
from shardkv.testing.polling import HOST, free_port, poll_until
from shardkv.testing.processes import Proc, ProcessSet

N, R, W = 3, 2, 2
"""The proxy's defaults, which the preload places keys by."""
TEXT = "text/plain; charset=utf-8"
"""The content type ``POST /set`` stores, so the preloaded keys read like written ones."""
PRELOAD_WRITER = "preload"
PRELOAD_CLIENT = "preload"
MAP_DEADLINE = 15.0
"""Seconds a proxy gets to create or find the map after it is healthy."""
EPOCH_DEADLINE = 5.0
"""Seconds every proxy gets to serve an epoch once it is committed (the issue: 2 s)."""
POLL = 0.1


def addr(proc: Proc) -> str:
    return f"{HOST}:{proc.port}"


# -- HTTP --------------------------------------------------------------------------------


def get_json(url: str, timeout: float = 5.0) -> Any:
    reply = send("GET", url, timeout=timeout)
    assert reply.status == 200, f"GET {url}: {reply.status} {reply.body[:500]!r}"
    return reply.json()


def post_json(url: str, payload: object, timeout: float = 60.0) -> tuple[int, Any]:
    """POST a JSON body; the status and the JSON answer (or the raw text if not JSON)."""
    reply = send("POST", url, json=payload, timeout=timeout)
    try:
        return reply.status, reply.json()
    except ValueError:
        return reply.status, reply.body.decode("utf-8", "replace")


def admin_map(proxy: Proc) -> dict[str, Any]:
    answer: dict[str, Any] = get_json(proxy.url + "/admin/map")
    return answer


def rebalance(proxy: Proc) -> dict[str, Any]:
    answer: dict[str, Any] = get_json(proxy.url + "/admin/rebalance")
    return answer


def node_map(node: str) -> dict[str, Any]:
    answer: dict[str, Any] = get_json(f"http://{node}/replica/map")
    return answer


def weights_of(m: Mapping[str, Any]) -> dict[str, float]:
    """The current ring's weights (joining and active members) of a map's JSON."""
    return {
        x["id"]: float(x["weight"]) for x in m["members"] if x["state"] in ("joining", "active")
    }


# -- the preload ---------------------------------------------------------------------------


def preload_value(key: str, size: int | None = None) -> str:
    """The preloaded value of ``key``: unique per key, so a read names the write it saw;
    padded with dots to ``size`` characters when given (the benchmark's 100 bytes)."""
    value = f"pre:{key}"
    if size is not None and len(value) < size:
        value += "." * (size - len(value))
    return value


@dataclass
class Preload:
    """What was written before any process started, and where."""

    keys: list[str]
    weights: dict[str, float]
    homes: dict[str, tuple[str, ...]]
    """Key -> the first N nodes of its preference list under the preload's ring."""
    value_size: int | None
    version: Version
    seconds: float
    records: int
    start: float = field(default_factory=time.monotonic)
    end: float = 0.0

    def value(self, key: str) -> str:
        return preload_value(key, self.value_size)

    def history_ops(self, keys: Iterable[str] | None = None) -> list[Op]:
        """The preload as acknowledged writes that finished before the load began,
        so that the history checker knows the value a read of an untouched key sees."""
        chosen = self.keys if keys is None else keys
        return [
            Op(PRELOAD_CLIENT, "put", k, self.value(k), "ok", self.start, self.end) for k in chosen
        ]


def preload_data_dirs(
    dirs: Mapping[str, Path],
    keys: Sequence[str],
    *,
    weights: Mapping[str, float] | None = None,
    n: int = N,
    value_size: int | None = None,
    vnodes: int = DEFAULT_VNODES,
) -> Preload:
    """Write every key into the data directories of its first ``n`` nodes.

    ``dirs`` maps node ids (``host:port``) to data directories of nodes not
    started yet. The ring is the epoch-1 map's: ``weights`` (default 1.0 each)
    and ``vnodes``. Records carry version ``1-<now>-preload``, older than any
    write a proxy mints afterwards (a proxy reads the stored version and
    writes a larger counter).
    """
    started = time.monotonic()
    weights = dict(weights or dict.fromkeys(dirs, 1.0))
    ring = ring_for(weights, vnodes)
    version = Version(1, int(time.time() * 1000), PRELOAD_WRITER)
    per_node: dict[str, list[tuple[bytes, bytes]]] = {node: [] for node in dirs}
    homes: dict[str, tuple[str, ...]] = {}
    for key in keys:
        kb = key.encode("utf-8")
        value = preload_value(key, value_size).encode("utf-8")
        stored = pack_stored(kb, encode(Record(version, value, TEXT)))
        home = tuple(ring.preference_list(key, n))
        homes[key] = home
        for node in home:
            per_node[node].append((db_key(kb), stored))

    def write(node: str) -> None:
        items = sorted(per_node[node])
        size = 64 * 1024 * 1024 + 2 * sum(len(k) + len(v) + 64 for k, v in items)
        db = open_database(str(dirs[node]), size, sync=True)
        try:
            with db.env.begin(write=True, db=db.records) as txn:
                cursor = txn.cursor()
                cursor.putmulti(items, append=True)
        finally:
            db.env.close()

    with ThreadPoolExecutor(len(dirs)) as pool:
        list(pool.map(write, dirs))
    ended = time.monotonic()
    return Preload(
        keys=list(keys),
        weights=weights,
        homes=homes,
        value_size=value_size,
        version=version,
        seconds=ended - started,
        records=sum(map(len, per_node.values())),
        start=started,
        end=ended,
    )


# -- reading every replica -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Copy:
    """One node's record for a key, as far as the checks care."""

    version: Version
    value: str | None  # None: a tombstone
    stored_bytes: int


def scan_node(data_dir: Path) -> dict[str, Copy]:
    """Every record in a node's LMDB data directory, read-only, while the node runs.

    One read transaction: a consistent snapshot of what the node has
    committed. A record that fails its checksum is reported as an
    AssertionError naming the key (a move must never corrupt a copy).
    """
    env = lmdb.open(
        str(data_dir), readonly=True, max_dbs=MAX_DBS, subdir=True, lock=True, create=False
    )
    out: dict[str, Copy] = {}
    try:
        records = env.open_db(RECORDS_DB.encode(), create=False)
        with env.begin(db=records) as txn:
            for dbk, raw in txn.cursor().iternext():
                kb, encoded = unpack_stored(bytes(dbk), bytes(raw))
                key = kb.decode("utf-8")
                try:
                    record = decode(encoded)
                except CorruptRecord as e:
                    raise AssertionError(f"{data_dir}: corrupt record for {key!r}: {e}") from None
                value = None if record.tombstone else record.value.decode("utf-8", "replace")
                out[key] = Copy(record.version, value, len(raw))
    finally:
        env.close()
    return out


def move_progress(data_dir: Path, epoch: int) -> dict[str, dict[str, Any] | None]:
    """The stream and cleanup progress a node persisted for ``epoch`` (None: none),
    read from its LMDB metadata while it runs.

    A node persists its stream's counters with its cursor after each
    acknowledged round, and ``done`` at the end, so this is exact where
    ``GET /replica/move`` is not: that route reports the node's *learned*
    epoch only, and a node may learn the next epoch before a poll sees its
    last count.
    """
    env = lmdb.open(
        str(data_dir), readonly=True, max_dbs=MAX_DBS, subdir=True, lock=True, create=False
    )
    try:
        meta = env.open_db(META_DB.encode(), create=False)
        with env.begin(db=meta) as txn:
            found = {
                part: txn.get(meta_key(name))
                for part, name in (("stream", stream_meta(epoch)), ("cleanup", cleanup_meta(epoch)))
            }
    finally:
        env.close()
    return {part: None if raw is None else json.loads(bytes(raw)) for part, raw in found.items()}


def scan_nodes(dirs: Mapping[str, Path]) -> dict[str, dict[str, Copy]]:
    """node id -> key -> copy, for every node (in parallel: LMDB reads release the GIL
    only partly, but decoding is the cost, so this is about one core's worth)."""
    with ThreadPoolExecutor(max(1, len(dirs))) as pool:
        scanned = dict(zip(dirs, pool.map(scan_node, dirs.values()), strict=True))
    return scanned


def newest(copies: Mapping[str, Mapping[str, Copy]]) -> dict[str, str | None]:
    """Per key, the value of the newest copy any node holds (None: deleted)."""
    best: dict[str, Copy] = {}
    for per_key in copies.values():
        for key, c in per_key.items():
            if key not in best or c.version > best[key].version:
                best[key] = c
    return {key: c.value for key, c in best.items()}


# -- the cluster -----------------------------------------------------------------------------


@dataclass
class Cluster:
    """Nodes (by id) and proxies of one test, and what was preloaded."""

    procs: ProcessSet
    root: Path
    nodes: dict[str, Proc]
    dirs: dict[str, Path]
    proxies: list[Proc]
    preload: Preload
    cluster_id: str = ""
    spares: list[str] = field(default_factory=list)
    """Ids of nodes started blank, not in the first map (the ones a test adds)."""

    def node(self, id: str) -> Proc:
        return self.nodes[id]

    @property
    def members(self) -> list[str]:
        return sorted(self.preload.weights)


def reserve_nodes(count: int) -> list[str]:
    """Ids (``127.0.0.1:PORT``) for nodes to be started later on those ports."""
    return [f"{HOST}:{free_port()}" for _ in range(count)]


def start_cluster(
    procs: ProcessSet,
    root: Path,
    members: int,
    keys: Sequence[str],
    *,
    spares: int = 1,
    weights: Mapping[str, float] | None = None,
    proxy_args: Sequence[Sequence[str]] = ((), ()),
    node_args: Sequence[str] = (),
    value_size: int | None = None,
) -> Cluster:
    """``members`` preloaded LMDB nodes, ``spares`` blank ones, and one proxy per
    entry of ``proxy_args`` (its extra options), all on ``--nodes`` = the members.

    The first proxy is started alone and creates epoch 1 on the blank-mapped
    nodes; each further proxy is started once that map exists, so it must pick
    the map up from the nodes. Returns once every proxy serves epoch 1 of the
    same cluster, and that map places keys exactly as the preload did.
    """
    ids = reserve_nodes(members + spares)
    member_ids, spare_ids = ids[:members], ids[members:]
    dirs = {node: root / f"data-{node.rsplit(':', 1)[1]}" for node in ids}
    w = {node: 1.0 for node in member_ids} if weights is None else dict(weights)
    preload = preload_data_dirs(
        {n: dirs[n] for n in member_ids}, keys, weights=w, value_size=value_size
    )
    nodes = {
        node: procs.start_node(
            int(node.rsplit(":", 1)[1]),
            dirs[node],
            *node_args,
            name=f"node{i}",
            wait=False,
        )
        for i, node in enumerate(ids, 1)
    }
    for proc in nodes.values():
        proc.wait_healthy()
    seeds = [f"{n}={w[n]:g}" if w[n] != 1.0 else n for n in member_ids]
    first = procs.start_proxy(None, seeds, *proxy_args[0], name="proxy1")
    m = wait_map(first, lambda m: m["epoch"] >= 1)
    expected = {node: w[node] for node in member_ids}
    assert m["epoch"] == 1 and weights_of(m) == expected, f"unexpected first map: {m}"
    assert (m["replication"]["n"], m["vnodes"]) == (N, DEFAULT_VNODES), m
    proxies = [first]
    for j, extra in enumerate(proxy_args[1:], 2):
        proxies.append(procs.start_proxy(None, seeds, *extra, name=f"proxy{j}"))
    for proxy in proxies[1:]:
        other = wait_map(proxy, lambda m: m["epoch"] >= 1)
        assert other["cluster_id"] == m["cluster_id"] and other["epoch"] == 1, other
    return Cluster(procs, root, nodes, dirs, proxies, preload, m["cluster_id"], spare_ids)


def wait_map(
    proxy: Proc, ready: Callable[[dict[str, Any]], bool], deadline: float = MAP_DEADLINE
) -> dict[str, Any]:
    """Poll the proxy's ``GET /admin/map`` until ``ready(map)``; that map."""

    def check() -> dict[str, Any] | None:
        m = admin_map(proxy)
        return m if ready(m) else None

    return poll_until(check, deadline, f"{proxy.name} to serve a map", alive=proxy.check_running)


def wait_proxies_on(cluster: Cluster, epoch: int, deadline: float = EPOCH_DEADLINE) -> float:
    """Until every running proxy serves ``epoch`` (with no move); seconds it took."""
    started = time.monotonic()
    for proxy in cluster.proxies:
        wait_map(
            proxy,
            lambda m: m["epoch"] >= epoch and m["move"] is None,
            max(0.1, started + deadline - time.monotonic()),
        )
    return time.monotonic() - started


class MoveStalled(Exception):
    """A move made no progress for too long (not an AssertionError, so that
    L{poll_until} stops at once instead of waiting out its deadline)."""


def wait_idle(
    proxy: Proc, after_epoch: int, deadline: float, stall: float = 30.0
) -> dict[str, Any]:
    """Until ``GET /admin/rebalance`` says idle at an epoch past ``after_epoch``.

    Raises L{MoveStalled} with the last status if neither the epoch, the
    state nor ``keys_moved`` changed for ``stall`` seconds: a stuck stream
    then fails in seconds, naming the node and its last error, rather than
    at the deadline.
    """
    last: list[Any] = [None, time.monotonic()]

    def check() -> dict[str, Any] | None:
        status = rebalance(proxy)
        seen = (status["epoch"], status["state"], status["keys_moved"])
        now = time.monotonic()
        if seen != last[0]:
            last[:] = [seen, now]
        elif now - last[1] > stall:
            raise MoveStalled(f"no progress for {stall:g} s on {proxy.name}: {status}")
        idle = status["state"] == "idle" and status["epoch"] > after_epoch
        assert idle, f"state {status['state']} at epoch {status['epoch']}: {status}"
        return status

    return poll_until(check, deadline, f"the move to be idle on {proxy.name}", interval=POLL)


# -- watching a move -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeSample:
    t: float
    node: str
    epoch: int | None
    phase: str | None
    stream_state: str
    keys_moved: int
    bytes_moved: int
    cleanup_state: str
    keys_deleted: int


class MoveWatch:
    """Polls every node's ``/replica/move`` and the first answering proxy's
    ``/admin/rebalance`` from a thread, ten times a second, keeping every sample.

    A node that is down (killed by the test) simply has no samples for a while.
    Stop it with L{stop} (or use it as a context manager).
    """

    def __init__(self, nodes: Sequence[str], proxies: Sequence[Proc], interval: float = POLL):
        self.nodes = list(nodes)
        self.proxies = list(proxies)
        self.interval = interval
        self.node_samples: list[NodeSample] = []
        self.proxy_samples: list[tuple[float, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="move-watch", daemon=True)
        self._pool = ThreadPoolExecutor(len(self.nodes) + 1)

    def __enter__(self) -> MoveWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10.0)
        self._pool.shutdown(wait=True)

    def _node(self, node: str) -> NodeSample | None:
        try:
            report = get_json(f"http://{node}/replica/move", timeout=1.0)
        except (OSError, AssertionError, ValueError):
            return None
        stream = report.get("stream") or {}
        cleanup = report.get("cleanup") or {}
        return NodeSample(
            time.monotonic(),
            node,
            report.get("epoch"),
            report.get("phase"),
            str(stream.get("state")),
            int(stream.get("keys_moved", 0)),
            int(stream.get("bytes_moved", 0)),
            str(cleanup.get("state")),
            int(cleanup.get("keys_deleted", 0)),
        )

    def _proxy(self) -> tuple[float, dict[str, Any]] | None:
        for proxy in self.proxies:
            if not proxy.running:
                continue
            try:
                return time.monotonic(), get_json(proxy.url + "/admin/rebalance", timeout=1.0)
            except (OSError, AssertionError, ValueError):
                continue
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            futures = [self._pool.submit(self._node, n) for n in self.nodes]
            status = self._proxy()
            samples = [s for s in (f.result() for f in futures) if s is not None]
            with self._lock:
                self.node_samples.extend(samples)
                if status is not None:
                    self.proxy_samples.append(status)
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def latest_status(self) -> dict[str, Any] | None:
        with self._lock:
            return self.proxy_samples[-1][1] if self.proxy_samples else None

    def samples(self, epoch: int | None = None) -> list[NodeSample]:
        with self._lock:
            return [s for s in self.node_samples if epoch is None or s.epoch == epoch]

    def resent(self, epoch: int) -> dict[str, int]:
        """Keys each node counted, lost from its count in a crash and sent again, at
        ``epoch``: the sum of every drop of its ``keys_moved`` between two polls."""
        again: dict[str, int] = {}
        last: dict[str, int] = {}
        for s in self.samples(epoch):
            if s.keys_moved < last.get(s.node, 0):
                again[s.node] = again.get(s.node, 0) + last[s.node] - s.keys_moved
            last[s.node] = s.keys_moved
        return again

    def moved(self, epoch: int) -> dict[str, int]:
        """Keys each node sent as primary source at ``epoch``, re-sends included.

        The nodes persist their counters with their cursor, once a round is
        acknowledged, so a node killed mid-round restarts from a smaller
        count and sends that round again. Each drop of a counter is added
        back: what was counted before the restart and is counted again after
        it was sent twice, and both sends are moved keys.
        """
        return self._summed(epoch, lambda s: s.keys_moved)

    def bytes_moved(self, epoch: int) -> dict[str, int]:
        return self._summed(epoch, lambda s: s.bytes_moved)

    def _summed(self, epoch: int, value: Callable[[NodeSample], int]) -> dict[str, int]:
        again: dict[str, int] = {}
        last: dict[str, int] = {}
        for s in self.samples(epoch):
            v = value(s)
            if v < last.get(s.node, 0):
                again[s.node] = again.get(s.node, 0) + last[s.node] - v
            last[s.node] = v
        return {n: again.get(n, 0) + last[n] for n in last}

    def copy_done_at(self, epoch: int, sources: Iterable[str]) -> float | None:
        """When every source first reported its stream ``done`` at ``epoch``
        (or the first sample of a later epoch, if a source's last ``done`` was missed)."""
        wanted = set(sources)
        done: dict[str, float] = {}
        for s in self.samples():
            if s.node not in wanted or s.node in done or s.epoch is None:
                continue
            if (s.epoch == epoch and s.stream_state == "done") or s.epoch > epoch:
                done[s.node] = s.t
        return max(done.values()) if set(done) == wanted else None

    def wait_fraction(self, low: float, deadline: float, what: str = "the copy") -> dict[str, Any]:
        """Until the proxy's /admin/rebalance shows copying with keys_moved/keys_total
        >= ``low``; that status."""

        def check() -> dict[str, Any] | None:
            status = self.latest_status()
            if status is None or status.get("phase") != "copying" or not status["keys_total"]:
                return None
            return status if status["keys_moved"] / status["keys_total"] >= low else None

        return poll_until(check, deadline, f"{what} to pass {low:.0%}", interval=0.02)


# -- checks ------------------------------------------------------------------------------------


@dataclass
class Placement:
    """Where every key is, against where the final map says it belongs."""

    wrong: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]
    """Key -> (the nodes holding it, the first N of its preference list), where they differ."""
    per_node: dict[str, int]
    orphans: dict[str, int]
    """Node -> copies it holds that it should not."""
    missing: dict[str, int]
    """Node -> copies it should hold and does not."""

    def describe(self, limit: int = 10) -> str:
        lines = [
            f"{len(self.wrong)} keys misplaced; orphans per node {self.orphans}; "
            f"missing per node {self.missing}; records per node {self.per_node}"
        ]
        for key, (held, want) in list(self.wrong.items())[:limit]:
            lines.append(f"  {key}: held by {list(held)}, belongs on {list(want)}")
        return "\n".join(lines)


def check_placement(
    copies: Mapping[str, Mapping[str, Copy]],
    keys: Iterable[str],
    final_weights: Mapping[str, float],
    n: int = N,
    vnodes: int = DEFAULT_VNODES,
) -> Placement:
    """Every key of ``keys`` (and any other key found) on exactly the first ``n`` nodes
    of its preference list under the ring of ``final_weights``; ``copies`` holds every
    node's records, members or not."""
    ring = ring_for(final_weights, vnodes)
    holders: dict[str, set[str]] = {key: set() for key in keys}
    for node, per_key in copies.items():
        for key in per_key:
            holders.setdefault(key, set()).add(node)
    wrong: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    orphans = dict.fromkeys(copies, 0)
    missing = dict.fromkeys(copies, 0)
    for key, held in holders.items():
        want = ring.preference_list(key, n)
        if held != set(want):
            wrong[key] = (tuple(sorted(held)), tuple(want))
            for node in held - set(want):
                orphans[node] = orphans.get(node, 0) + 1
            for node in set(want) - held:
                missing[node] = missing.get(node, 0) + 1
    return Placement(
        wrong,
        {node: len(per_key) for node, per_key in copies.items()},
        {k: v for k, v in orphans.items() if v},
        {k: v for k, v in missing.items() if v},
    )


def moved_copies(
    keys: Iterable[str], before: Mapping[str, float], after: Mapping[str, float], n: int = N
) -> dict[tuple[str, str], int]:
    """(from primary source, to) -> copies, for the keys whose preference set changes
    between the two rings: what an exact plan must say."""
    old, new = ring_for(before, DEFAULT_VNODES), ring_for(after, DEFAULT_VNODES)
    pairs: dict[tuple[str, str], int] = {}
    for key in keys:
        was, will = old.preference_list(key, n), new.preference_list(key, n)
        for node in will:
            if node not in was:
                pairs[(was[0], node)] = pairs.get((was[0], node), 0) + 1
    return pairs


def changed_keys(
    keys: Iterable[str], before: Mapping[str, float], after: Mapping[str, float], n: int = N
) -> list[str]:
    old, new = ring_for(before, DEFAULT_VNODES), ring_for(after, DEFAULT_VNODES)
    return [k for k in keys if set(old.preference_list(k, n)) != set(new.preference_list(k, n))]


def ring_shares(weights: Mapping[str, float], keys: Sequence[str]) -> dict[str, float]:
    """Each node's share of the keys it is the first replica of (a sample's view of
    the ring's shares)."""
    ring: Ring = ring_for(weights, DEFAULT_VNODES)
    counts = dict.fromkeys(weights, 0)
    for key in keys:
        counts[ring.preference_list(key, 1)[0]] += 1
    return {node: c / len(keys) for node, c in counts.items()}


def check_fresh_reads(history: History) -> list[Violation]:
    """Reads older than a write acknowledged (by any client) before the read began.

    With R + W > N a read that starts after a write was acknowledged must see
    that write or a later one. A read "sees older" when the write it names
    (None: absent) ended before the latest such acknowledged write started, so
    that write was certainly ordered after it. Fabricated values are the
    history module's L{shardkv.testing.history.check_reads}' business.
    """
    by_key: dict[str, list[Op]] = {}
    for op in history.ops:
        if op.f == "put":
            by_key.setdefault(op.key, []).append(op)
    by_value = {(w.key, w.value): w for ws in by_key.values() for w in ws}
    found = []
    for op in history.ops:
        if op.f != "get" or op.status != "ok":
            continue
        acked = [w for w in by_key.get(op.key, []) if w.status == "ok" and w.end < op.start]
        if not acked:
            continue
        last = max(acked, key=lambda w: w.start)
        seen = by_value.get((op.key, op.value)) if op.value is not None else None
        if seen is None or seen.end < last.start:
            found.append(
                Violation(
                    "stale",
                    op.key,
                    f"{op.client} read {op.value!r} at [{op.start:.3f}, {op.end:.3f}] after "
                    f"{last.client}'s {last.value!r} was acked at {last.end:.3f}",
                )
            )
    return found


def sample_keys(
    keys: Sequence[str], count: int, seed: int, prefer: Sequence[str] = ()
) -> list[str]:
    """``count`` keys for the load: half (or all of ``prefer``, if fewer) from
    ``prefer`` (the keys that move), the rest from the others."""
    rng = random.Random(seed)
    chosen = rng.sample(list(prefer), min(len(prefer), count // 2)) if prefer else []
    taken = set(chosen)
    rest = [k for k in keys if k not in taken]
    chosen += rng.sample(rest, count - len(chosen))
    return chosen


def data_bytes(path: Path) -> int:
    """The size of a node's LMDB data file."""
    return os.path.getsize(path / "data.mdb")
