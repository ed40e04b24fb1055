"""Replication under faults, with real ``twistd`` processes (C1, C2, C8, D1).

Every test starts storage nodes (LMDB, each with its own data directory) and
one or two proxies (N=3, R=2, W=2) on free ports of 127.0.0.1, drives them
with the recording load generator of L{tests.system.workload}, injects one kind of
fault, quiesces, and then checks the recorded history against what every
home replica holds, read directly with ``GET /replica/kv/{key}`` (homes come
from the proxy's ring, checked against its /explain; see L{home_replicas}):

- C1: kill -9 churn of random nodes under load;
- C2: SIGSTOP pauses of a node under load;
- C8: two proxies whose clocks are 180 s apart, alternating writes per key;
- D1: hinted handoff to a node that was down while 1,000 of its keys were written.

Each test prints a one-line summary (ops by status, violations, convergence
time, write p99) for CI logs and dumps its history as JSON lines into its
tmp_path (``history.jsonl``). Every wait polls with a deadline; the only
sleeps pace the load and the fault schedule. The seed of the random choices
is printed and can be fixed with ``SHARDKV_FAULT_SEED``.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import pytest

from shardkv.client.blocking import request as send
from shardkv.core.placement import Ring
from shardkv.core.versions import Version
from shardkv.testing.history import Violation, check_convergence, check_final, check_reads, summary
from shardkv.testing.polling import poll_until
from shardkv.testing.processes import Proc, ProcessSet
from tests.system.procs import process_set
from tests.system.workload import Client, Recorder, Workload, WorkloadConfig, percentile

pytestmark = pytest.mark.slow

T = TypeVar("T")
K = TypeVar("K")

SEED = int(os.environ.get("SHARDKV_FAULT_SEED", str(random.randrange(1 << 30))))
STATUS_DEADLINE = 10.0
"""Seconds the proxy gets to show a node's new health state (checks run every second)."""
CONVERGE_DEADLINE = 30.0
"""Seconds after the last fault ends by which every replica must be identical."""
POOL = 8
"""Threads for bulk reads of /explain and of replicas."""


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessSet]:
    yield from process_set(request, tmp_path)


# -- the cluster -------------------------------------------------------------------


def addr(proc: Proc) -> str:
    return f"127.0.0.1:{proc.port}"


@dataclass
class Cluster:
    nodes: list[Proc]
    proxies: list[Proc]

    @property
    def proxy(self) -> Proc:
        return self.proxies[0]

    def node(self, address: str) -> Proc:
        return next(n for n in self.nodes if addr(n) == address)


def start_cluster(
    procs: ProcessSet,
    root: Path,
    nodes: int,
    proxies: Sequence[Sequence[str]] = ((),),
    node_args: Callable[[int], Sequence[str]] = lambda i: (),
) -> Cluster:
    """``nodes`` LMDB nodes and one proxy per entry of ``proxies`` (its extra options),
    started in parallel; returns once every proxy sees every node up.
    """
    started = [
        procs.start_node(None, root / f"data-{i}", *node_args(i), name=f"node{i}", wait=False)
        for i in range(1, nodes + 1)
    ]
    front = [
        procs.start_proxy(None, started, *extra, name=f"proxy{j}", wait=False)
        for j, extra in enumerate(proxies, 1)
    ]
    for proc in [*started, *front]:
        proc.wait_healthy()
    for proxy in front:
        proxy.wait_sees_up(started, STATUS_DEADLINE)
    return Cluster(started, front)


def cluster_nodes(proxy: Proc) -> dict[str, dict[str, Any]]:
    """The proxy's /cluster entry for each node, by address."""
    reply = send("GET", proxy.url + "/cluster")
    assert reply.status == 200, reply
    return {n["node"]: n for n in reply.json()["nodes"]}


def wait_status(proxy: Proc, node: Proc, status: str, deadline: float = STATUS_DEADLINE) -> None:
    def check() -> bool:
        seen = cluster_nodes(proxy)[addr(node)]["health"]["status"]
        assert seen == status, f"{addr(node)} is {seen}"
        return True

    poll_until(check, deadline, f"{proxy.name} to show {node.name} {status}")


def wait_caught_up(proxy: Proc, node: Proc, deadline: float = CONVERGE_DEADLINE) -> None:
    """Until the proxy sees ``node`` up with no hints for it waiting elsewhere.

    Only then does the proxy count the node's replies towards R again: a
    replica that may still lack writes it missed is read and repaired, but
    not trusted on its own.
    """

    def check() -> bool:
        entry = cluster_nodes(proxy)[addr(node)]
        status, hints = entry["health"]["status"], entry["hints_waiting"]
        assert (status, hints) == ("up", 0), f"{addr(node)} is {status}, {hints} hints waiting"
        return True

    poll_until(check, deadline, f"{proxy.name} to show {node.name} up and caught up")


def hints_waiting(proxy: Proc, node: Proc) -> int:
    return int(cluster_nodes(proxy)[addr(node)]["hints_waiting"])


def bulk(f: Callable[[K], T], items: Iterable[K]) -> dict[K, T]:
    """``f`` over ``items`` on a small thread pool."""
    items = list(items)
    with ThreadPoolExecutor(POOL) as pool:
        return dict(zip(items, pool.map(f, items), strict=True))


def explain_homes(proxy: Proc, keys: Iterable[str]) -> dict[str, list[str]]:
    """The N home replicas of each key, as the proxy's /explain names them."""

    def homes(key: str) -> list[str]:
        reply = send("GET", f"{proxy.url}/explain?key={quote(key, safe='')}")
        assert reply.status == 200, reply
        return [r["node"] for r in reply.json()["replicas"]]

    return bulk(homes, keys)


def home_replicas(
    proxy: Proc, nodes: Sequence[Proc], keys: Sequence[str], n: int = 3, sample: int = 40
) -> dict[str, list[str]]:
    """The N home replicas of each key.

    /explain costs the proxy three replica reads per key, which on a busy
    two-core box adds up to tens of seconds for a few thousand keys. So the
    placement is computed with the same L{Ring} the proxy builds from its
    --nodes, and checked against the proxy's /explain for a sample of the
    keys; if any of them disagrees, every key is asked of /explain instead.
    """
    ring = Ring([addr(node) for node in nodes])
    local = {key: ring.preference_list(key, n) for key in keys}
    checked = explain_homes(proxy, random.Random(SEED).sample(list(keys), min(sample, len(keys))))
    if all(local[key] == homes for key, homes in checked.items()):
        return local
    print(f"local placement disagrees with {proxy.name}'s /explain; asking it for every key")
    return explain_homes(proxy, keys)


def read_all(client: Client, keys: Iterable[str]) -> dict[str, str | None]:
    """Read every key through ``client`` (in parallel); key -> value read."""
    return bulk(lambda key: client.get(key).value, keys)


# -- replicas read directly ----------------------------------------------------------

State = dict[str, Any] | None
"""One replica's record for a key: version, tombstone and value; None when absent."""


def replica_state(node: str, key: str) -> State:
    reply = send("GET", f"http://{node}/replica/kv/{quote(key, safe='')}")
    if reply.status == 404:
        return None
    assert reply.status == 200, f"{node} {key}: {reply}"
    return {
        "version": reply.headers["x-shardkv-version"],
        "tombstone": reply.headers["x-shardkv-tombstone"] == "1",
        "value": reply.body.decode("utf-8", "replace"),
    }


def read_replicas(homes: Mapping[str, Sequence[str]]) -> dict[str, dict[str, State]]:
    """node -> key -> state, for every home replica of every key in ``homes``."""
    pairs = [(node, key) for key, nodes in homes.items() for node in nodes]
    states = bulk(lambda pair: replica_state(*pair), pairs)
    out: dict[str, dict[str, State]] = {}
    for (node, key), state in states.items():
        out.setdefault(node, {})[key] = state
    return out


def newest_values(replicas: Mapping[str, Mapping[str, State]]) -> dict[str, str | None]:
    """Per key, the value of the newest record any replica holds (None: none, or deleted)."""
    best: dict[str, tuple[Version, str | None]] = {}
    keys: set[str] = set()
    for per_key in replicas.values():
        for key, state in per_key.items():
            keys.add(key)
            if state is None:
                continue
            version = Version.parse(state["version"])
            if key not in best or version > best[key][0]:
                best[key] = (version, None if state["tombstone"] else state["value"])
    return {key: best[key][1] if key in best else None for key in keys}


@dataclass
class Convergence:
    converged: bool
    seconds: float
    """From the reference time to the first fully identical pass (or the deadline)."""
    replicas: dict[str, dict[str, State]]
    diverged: list[Violation]


def wait_converged(
    homes: Mapping[str, Sequence[str]], since: float, deadline: float = CONVERGE_DEADLINE
) -> Convergence:
    """Poll until every home replica of every key holds the same record.

    Rounds after the first re-read only the keys that still disagreed; once
    none do, one more full pass confirms it. ``since`` is the monotonic time the
    deadline counts from (the end of the last fault).
    """
    end = since + deadline
    pending = dict(homes)
    replicas: dict[str, dict[str, State]] = {}
    while True:
        fresh = read_replicas(pending)
        for node, per_key in fresh.items():
            replicas.setdefault(node, {}).update(per_key)
        diverged = check_convergence(replicas)
        now = time.monotonic()
        if not diverged:
            if len(pending) == len(homes):
                return Convergence(True, now - since, replicas, [])
            pending = dict(homes)  # confirm with a full pass
            continue
        if now >= end:
            return Convergence(False, now - since, replicas, diverged)
        pending = {v.key: homes[v.key] for v in diverged}
        time.sleep(0.2)  # poll interval


@dataclass
class Churn:
    """A cluster under fault load: its proxy, the keys written and their homes."""

    cluster: Cluster
    keys: list[str]
    homes: dict[str, list[str]]
    phases: Phases

    @property
    def proxy(self) -> Proc:
        return self.cluster.proxy


def churn_cluster(procs: ProcessSet, tmp_path: Path, nodes: int, prefix: str, keys: int) -> Churn:
    """Nodes and one proxy (--health-interval 0.25, so it sees a victim back
    within a quarter second), with the home replicas of ``keys`` keys."""
    phases = Phases()
    cluster = start_cluster(procs, tmp_path, nodes, proxies=[("--health-interval", "0.25")])
    phases.done("start")
    names = [f"{prefix}/{i:04d}" for i in range(keys)]
    homes = home_replicas(cluster.proxy, cluster.nodes, names)
    phases.done("explain")
    return Churn(cluster, names, homes, phases)


def check_after_load(
    churn: Churn, recorder: Recorder, since: float, tmp_path: Path
) -> tuple[Convergence, list[Violation], list[Violation]]:
    """Wait for the written keys' replicas to converge (counting from
    ``since``), then check the history against them: (convergence, lost
    acknowledged writes, fabricated or stale reads)."""
    written = {op.key for op in recorder.writes()}
    convergence = wait_converged({k: churn.homes[k] for k in written}, since)
    churn.phases.done("converge")
    lost = check_final(recorder.history, newest_values(convergence.replicas))
    reads = check_reads(recorder.history)
    dump(recorder, tmp_path)
    return convergence, lost, reads


# -- reporting -----------------------------------------------------------------------


class Phases:
    """Wall time per phase of a test, for the summary line."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.spent: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.monotonic()
        self.spent[name] = now - self.last
        self.last = now

    def __str__(self) -> str:
        return ", ".join(f"{name} {secs:.1f}s" for name, secs in self.spent.items())


def report(title: str, recorder: Recorder, violations: Sequence[Violation], **numbers: Any) -> str:
    """Print one summary line for CI logs; return it."""
    lat = recorder.write_latencies()
    writes = len(recorder.writes())
    parts = [
        summary(recorder.history, violations),
        f"writes {writes}, success {recorder.write_success():.2%}",
        f"write p50 {percentile(lat, 0.5) * 1000:.0f} ms",
        f"write p99 {percentile(lat, 0.99) * 1000:.0f} ms",
        *(f"{name} {value}" for name, value in numbers.items()),
        f"seed {SEED}",
    ]
    line = f"[{title}] " + "; ".join(parts)
    print("\n" + line)
    for v in violations[:10]:
        print(f"  {v.kind} {v.key}: {v.detail}")
    return line


def dump(recorder: Recorder, root: Path) -> Path:
    path = recorder.dump(root / "history.jsonl")
    print(f"history: {path}")
    return path


def history_excerpt(recorder: Recorder, keys: Iterable[str], limit: int = 40) -> str:
    """The recorded operations on ``keys`` (for a failure message)."""
    wanted = set(keys)
    lines = [
        f"{op.client} {op.f} {op.key}={op.value!r} {op.status} "
        f"[{op.start:.3f}, {op.end:.3f}] http={note.http} {note.detail[:120]}"
        for op, note in recorder.snapshot()
        if op.key in wanted
    ]
    return "\n".join(lines[:limit])


# -- C1: kill -9 churn ------------------------------------------------------------------

C1_NODES = 5
C1_KILLS = 20
C1_LOAD_SECONDS = 30.0
C1_KEYS = 400
C1_WRITE_RATE = 200.0
C1_KILL_EVERY = 1.5


def test_kill9_churn_loses_no_acknowledged_write(procs: ProcessSet, tmp_path: Path) -> None:
    """
    If a random node of five is killed with SIGKILL 20 times (at most one
    kill per 1.5 s) under a load of up to ~200 writes/s (N=3, W=2, R=2), each
    victim restarting at once on its own data directory and the next kill
    waiting until the previous victim is healthy again, then no acknowledged
    write is lost (final values read from every home replica), at least 99 %
    of the writes succeed, and every replica of every written key is
    identical within 30 s of the last restart.

    "Healthy again" means the proxy sees the victim up *and* no hints for it
    are waiting: until then the proxy does not count the victim's replies
    towards R, so killing a second home replica of a key sooner would leave
    that key one readable replica, two failed replicas in effect. The load
    runs for at least 30 s and until the last victim is back; a node restart
    takes 1.5-3 s here, so 20 kills take longer than 30 s. The proxy runs
    with --health-interval 0.25 (default --timeout 2) so that it sees a
    victim back, and its hints drained, within a quarter second.
    """
    rng = random.Random(SEED)
    churn = churn_cluster(procs, tmp_path, C1_NODES, "churn", C1_KEYS)
    cluster, proxy, phases = churn.cluster, churn.proxy, churn.phases

    recorder = Recorder()
    config = WorkloadConfig(
        urls=[proxy.url],
        keys=churn.keys,
        clients=48,
        write_rate=C1_WRITE_RATE,
        read_fraction=0.2,
        duration=4 * C1_LOAD_SECONDS,  # a cap; the end is set once the kills are done
        seed=SEED,
    )
    victims: list[str] = []
    last_restart = time.monotonic()
    with Workload(config, recorder) as load:
        assert load.started is not None
        last_kill = load.started
        for _ in range(C1_KILLS):
            at = last_kill + C1_KILL_EVERY
            if at > time.monotonic():
                time.sleep(at - time.monotonic())  # pacing the fault schedule
            victim = rng.choice(cluster.nodes)
            victims.append(victim.name)
            last_kill = time.monotonic()
            victim.kill(signal.SIGKILL)
            victim.start()
            victim.wait_healthy()
            last_restart = time.monotonic()
            wait_caught_up(proxy, victim)
        load.end_at(max(last_restart, load.started + C1_LOAD_SECONDS))
        load.join()
        load_seconds = time.monotonic() - load.started
    phases.done("load")
    quiesced = time.monotonic()

    convergence, lost, reads = check_after_load(churn, recorder, last_restart, tmp_path)
    report(
        "C1 kill-9 churn",
        recorder,
        lost + convergence.diverged + reads,
        load_s=f"{load_seconds:.1f}",
        write_rate=f"{len(recorder.writes()) / load_seconds:.0f}/s",
        kills=len(victims),
        lost=len(lost),
        converged=convergence.converged,
        convergence_s=f"{convergence.seconds:.1f} after the last restart, "
        f"{convergence.seconds - (quiesced - last_restart):.1f} after the load stopped",
        phases=phases,
    )
    assert not lost, history_excerpt(recorder, [v.key for v in lost])
    assert recorder.write_success() >= 0.99
    assert convergence.converged, convergence.diverged[:10]


# -- C2: SIGSTOP pauses ------------------------------------------------------------------

C2_NODES = 5
C2_PAUSES = 3
C2_PAUSE_SECONDS = 10.0
C2_GAP_SECONDS = 2.0
C2_KEYS = 400
C2_WRITE_RATE = 100.0


def test_sigstop_pauses_bound_latency_and_lose_nothing(procs: ProcessSet, tmp_path: Path) -> None:
    """
    If a random node of five is paused with SIGSTOP for 10 s, three times
    (SIGCONT after each; the next pause once the proxy sees the last one up
    and caught up, as in the kill -9 test), under steady writes, then no
    acknowledged write is lost and the p99 of the acknowledged writes'
    latency is at most 1 s: a request never waits for more than R or W
    replicas, so a paused one costs nothing. The proxy runs with the default
    --timeout (2 s) and --health-interval 0.25.
    """
    rng = random.Random(SEED)
    churn = churn_cluster(procs, tmp_path, C2_NODES, "pause", C2_KEYS)
    cluster, proxy, phases = churn.cluster, churn.proxy, churn.phases

    recorder = Recorder()
    config = WorkloadConfig(
        urls=[proxy.url],
        keys=churn.keys,
        clients=8,
        write_rate=C2_WRITE_RATE,
        read_fraction=0.2,
        duration=3 * C2_PAUSES * (C2_PAUSE_SECONDS + C2_GAP_SECONDS),  # a cap
        seed=SEED,
    )
    victims = rng.sample(cluster.nodes, C2_PAUSES)
    with Workload(config, recorder) as load:
        assert load.started is not None
        for victim in victims:
            time.sleep(C2_GAP_SECONDS)  # steady load before the pause
            victim.kill(signal.SIGSTOP)
            time.sleep(C2_PAUSE_SECONDS)  # the fault lasts this long
            victim.kill(signal.SIGCONT)
            wait_caught_up(proxy, victim)
        last_resume = time.monotonic()
        load.end_at(last_resume + C2_GAP_SECONDS)
        load.join()
        load_seconds = time.monotonic() - load.started
    phases.done("load")

    convergence, lost, reads = check_after_load(churn, recorder, last_resume, tmp_path)
    p99 = percentile(recorder.write_latencies(), 0.99)
    report(
        "C2 SIGSTOP pauses",
        recorder,
        lost + convergence.diverged + reads,
        load_s=f"{load_seconds:.1f}",
        write_rate=f"{len(recorder.writes()) / load_seconds:.0f}/s",
        paused=",".join(v.name for v in victims),
        lost=len(lost),
        converged=convergence.converged,
        convergence_s=f"{convergence.seconds:.1f}",
        phases=phases,
    )
    assert not lost, history_excerpt(recorder, [v.key for v in lost])
    assert p99 <= 1.0, f"write p99 {p99:.3f} s"


# -- C8: clock skew between two proxies ----------------------------------------------------

C8_NODES = 3
C8_KEYS = 500
C8_SKEW_MS = 90_000


def test_clock_skew_between_proxies_keeps_last_acknowledged_write(
    procs: ProcessSet, tmp_path: Path
) -> None:
    """
    If two proxies in front of the same three nodes run with clocks 90 s ahead
    (A) and 90 s behind (B), and each of 500 keys is written 2 or 3 times in
    sequence, alternating A, B, A (each write starting after the previous one
    was acknowledged), then all 500 keys end at their last acknowledged
    write, read through both proxies and on every home replica. Two of the
    nodes are skewed the same way (+90 s, -90 s). Wall-clock last-write-wins
    would lose the B writes that follow an A write.
    """
    phases = Phases()
    skew = {1: C8_SKEW_MS, 2: -C8_SKEW_MS}
    cluster = start_cluster(
        procs,
        tmp_path,
        C8_NODES,
        proxies=[
            ("--clock-offset-ms", str(C8_SKEW_MS), "--proxy-id", "ahead"),
            ("--clock-offset-ms", str(-C8_SKEW_MS), "--proxy-id", "behind"),
        ],
        node_args=lambda i: ("--clock-offset-ms", str(skew.get(i, 0))),
    )
    phases.done("start")
    ahead, behind = cluster.proxies
    keys = [f"skew/{i:03d}" for i in range(C8_KEYS)]
    homes = home_replicas(ahead, cluster.nodes, keys)
    phases.done("explain")
    recorder = Recorder()

    def write_key(key: str) -> None:
        index = int(key.rsplit("/", 1)[1])
        client = Client(f"w{index}", recorder, ahead.url)
        for step in range(2 + index % 2):
            url = (ahead if step % 2 == 0 else behind).url
            op = client.put(key, url=url)
            assert op.status == "ok", history_excerpt(recorder, [key])

    with ThreadPoolExecutor(POOL) as pool:
        list(pool.map(write_key, keys))
    wrote = time.monotonic()
    phases.done("write")

    expected = {key: op.value for key, op in recorder.last_acked().items()}
    assert len(expected) == C8_KEYS

    # Replicas first: reads through a proxy would repair them.
    convergence = wait_converged(homes, wrote)
    replicas = convergence.replicas
    phases.done("converge")
    wrong_on_replicas = [
        key
        for key in keys
        if any((replicas[node][key] or {}).get("value") != expected[key] for node in homes[key])
    ]
    on_replicas = C8_KEYS - len(wrong_on_replicas)

    by_proxy: dict[str, int] = {}
    wrong_via: list[str] = []
    for proxy in (ahead, behind):
        reader = Client(f"read-{proxy.name}", recorder, proxy.url)
        seen = read_all(reader, keys)
        wrong = [key for key in keys if seen[key] != expected[key]]
        by_proxy[proxy.name] = C8_KEYS - len(wrong)
        wrong_via += wrong
    phases.done("read")

    lost = check_final(recorder.history, newest_values(replicas))
    reads = check_reads(recorder.history)
    dump(recorder, tmp_path)
    report(
        "C8 clock skew",
        recorder,
        lost + reads,
        keys_at_last_write=f"ahead {by_proxy[ahead.name]}/{C8_KEYS}, "
        f"behind {by_proxy[behind.name]}/{C8_KEYS}, replicas {on_replicas}/{C8_KEYS}",
        lost=len(lost),
        converged=convergence.converged,
        convergence_s=f"{convergence.seconds:.1f}",
        phases=phases,
    )
    assert by_proxy == {ahead.name: C8_KEYS, behind.name: C8_KEYS}, history_excerpt(
        recorder, wrong_via[:5]
    )
    assert on_replicas == C8_KEYS, history_excerpt(recorder, wrong_on_replicas[:5])
    assert not lost


# -- D1: hinted handoff -------------------------------------------------------------------

D1_NODES = 5
D1_KEYS = 1000
D1_DEADLINE = 30.0


def test_hinted_handoff_delivers_every_missed_key(procs: ProcessSet, tmp_path: Path) -> None:
    """
    If one node of five is killed (SIGKILL) and 1,000 keys whose three home
    replicas include it (the proxy's placement; see L{home_replicas}) are
    written through the proxy, then the other nodes
    hold 1,000 hints for it (/cluster hints_waiting); once it restarts on its
    data directory it holds all 1,000 keys (read directly from it) and
    hints_waiting for it is 0, both within 30 s.
    """
    rng = random.Random(SEED)
    phases = Phases()
    cluster = start_cluster(procs, tmp_path, D1_NODES)
    phases.done("start")
    proxy = cluster.proxy
    victim = rng.choice(cluster.nodes)

    # About 3 keys in 5 have the victim among their three home replicas.
    candidates = [f"handoff/{i:04d}" for i in range(2 * D1_KEYS)]
    homes = home_replicas(proxy, cluster.nodes, candidates)
    keys = [key for key in candidates if addr(victim) in homes[key]][:D1_KEYS]
    assert len(keys) == D1_KEYS
    phases.done("explain")

    victim.kill(signal.SIGKILL)
    wait_status(proxy, victim, "down")
    recorder = Recorder()
    clients = [Client(f"d{i}", recorder, proxy.url, api="kv") for i in range(POOL)]
    with ThreadPoolExecutor(POOL) as pool:
        list(pool.map(lambda i: [clients[i].put(k) for k in keys[i::POOL]], range(POOL)))
    acked = recorder.last_acked()
    assert len(acked) == D1_KEYS, recorder.counts()
    phases.done("write")

    hinted = poll_until(
        lambda: (n := hints_waiting(proxy, victim)) >= D1_KEYS and n,
        STATUS_DEADLINE,
        f"the other nodes to report {D1_KEYS} hints for {victim.name}",
    )

    phases.done("hints")
    victim.start()
    victim.wait_healthy()
    restarted = time.monotonic()
    missing = set(keys)

    def holds_all() -> bool:
        got = bulk(lambda key: replica_state(addr(victim), key), sorted(missing))
        for key, state in got.items():
            if state is not None and state["value"] == acked[key].value:
                missing.discard(key)
        assert not missing, f"{len(missing)} keys still missing on {victim.name}"
        return True

    held_s = drained_s = None
    try:
        poll_until(holds_all, D1_DEADLINE, f"{victim.name} to hold all {D1_KEYS} keys")
        held_s = time.monotonic() - restarted
        poll_until(
            lambda: hints_waiting(proxy, victim) == 0,
            max(0.1, restarted + D1_DEADLINE - time.monotonic()),
            f"hints for {victim.name} to drain",
        )
        drained_s = time.monotonic() - restarted
    except AssertionError as e:
        print(e)
    phases.done("handoff")
    dump(recorder, tmp_path)
    report(
        "D1 hinted handoff",
        recorder,
        [],
        victim=victim.name,
        hints_while_down=hinted,
        held=f"{D1_KEYS - len(missing)}/{D1_KEYS}",
        held_s="-" if held_s is None else f"{held_s:.1f}",
        hints_drained_s="-" if drained_s is None else f"{drained_s:.1f}",
        hints_left=hints_waiting(proxy, victim),
        phases=phases,
    )
    assert hinted == D1_KEYS
    assert not missing, sorted(missing)[:10]
    assert held_s is not None and held_s <= D1_DEADLINE
    assert drained_s is not None and drained_s <= D1_DEADLINE
