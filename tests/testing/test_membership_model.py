"""
A Hypothesis stateful model of live membership over a L{MemoryCluster}.

One client puts unique values and gets keys through the proxies (one or two,
sharing the nodes) of a 3-5 node cluster (N=3, R=W=2, 64 ring points per unit
of weight) while an operator plans and commits joins of fresh nodes, leaves
and reweights, sometimes with a rate cap so the copy trickles, aborts running
moves, and nodes crash (their data kept, as LMDB keeps it) and restart with a
new app, map store and mover over the same engine, mid-move too. Time passes
in steps, and with it everything the real processes run on their timers: the
proxies' rebalancers, map polls, health checks and hint retries, the nodes'
movers and hinted handoff. Some operations run while time passes, so that
writes race the phase changes.

Every operation goes into a L{History} as ok, fail or info at clock times
(made strictly increasing); after every step no read returns a value no write
tried to store, the client reads its own acknowledged writes, and no member
of the map is more than one epoch behind the newest (rule 2, the barrier).

At the end (L{MembershipModel.teardown}) every crashed node restarts, the
move (if any) is driven to idle within a bound of clock time, and then:
every member has learned the same epoch and every proxy serves it; after one
read of every key (read repair), every key is on exactly the first N nodes of
its preference list under the final map and nowhere else (inspecting the
engines directly), the N copies agree, removed members hold no records, no
acknowledged write is lost and no read was stale.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.clustermap import ClusterMap, MemberState
from shardkv.core.records import Record
from shardkv.core.versions import Version
from shardkv.errors import MapConflict, MapUnavailable, NodeUnreachable
from shardkv.node.handoff import HintHandoff
from shardkv.testing.history import History, Op, check_final, check_reads, summary
from shardkv.testing.memory import MemoryCluster, MemoryProxy
from tests.helpers import HTTP, PROXY_URL, Reply, flusher, quorum_status

TIMEOUT = 2.0
VNODES = 64
N = 3
ALL_NODES = [f"127.0.0.1:{port}" for port in range(8081, 8090)]
KEYS = [f"key-{i:02d}" for i in range(16)]
MAX_MEMBERS = 6
IDLE_WITHIN = 120.0
"""Seconds of clock time a move may take to reach idle once every node is up."""

HEALTH_LAG = 3.0
"""Seconds after a restart during which the proxies may still count a node down."""

keys = st.sampled_from(KEYS)
weights = st.sampled_from([0.5, 2.0, 3.0])
rates = st.sampled_from([0, 0, 30])
"""Keys/s for the whole cluster; 0 is unlimited. A cap makes the copy last
several steps, so crashes and aborts land mid-stream."""

EXPECTED_CHANGE_ERRORS = (MapConflict, MapUnavailable)
"""What a plan, commit or abort may meet in a cluster with a node down or a
move already running (MemberUnreachable, MoveInProgress, TooLateToAbort,
NoMove and TooFewMembers are MapConflicts)."""


class MembershipModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.case = SynchronousTestCase()
        self.history = History()
        self.serial = itertools.count()
        self.last_time = -1.0
        self.spare: list[str] = []
        self.changes: list[str] = []
        self.cluster: MemoryCluster
        self.http: list[HTTP] = []
        self.maps: dict[int, ClusterMap] = {}
        self.down: dict[str, list[list[float]]] = {}
        """Each node's crashes: [crashed at, restarted at (inf while down)]."""

    # -- driving the cluster --------------------------------------------------

    def now(self) -> float:
        """The cluster's clock, made strictly increasing, so that operations one
        after the other never share a time (the checkers compare strictly)."""
        t = max(self.cluster.clock.seconds(), self.last_time + 1e-6)
        self.last_time = t
        return t

    def proxy_http(self, proxy: MemoryProxy) -> HTTP:
        return HTTP(self.case, proxy.proxy, PROXY_URL, flusher(self.cluster.node_http, proxy.proxy))

    def finish(self, d: Deferred[Any]) -> Any:
        """The result of ``d``, moving the clock if it waits (a retry's pause, a timeout)."""
        return self.cluster.pump(d, seconds=4 * TIMEOUT)

    def start_op(self, f: str, key: str, via: int, client: str = "client") -> Deferred[Op]:
        """Invoke a put of a fresh value, or a get; fires with the op as recorded."""
        http = self.http[via % len(self.http)]
        path = "/kv/" + quote(key, safe="")
        value = f"{key}={next(self.serial)}" if f == "put" else None
        start = self.now()
        d = http.start(
            "PUT" if f == "put" else "GET", path, None if value is None else value.encode()
        )

        def done(reply: Reply) -> Op:
            expected = (200, 201, 503, 504) if f == "put" else (200, 404, 503, 504)
            self.case.assertIn(reply.code, expected, reply.body)
            got = value if f == "put" else (reply.body.decode() if reply.code == 200 else None)
            op = Op(client, f, key, got, quorum_status(f, reply), start, self.now())
            self.history.add(op)
            return op

        return d.addCallback(done)

    def op(self, f: str, key: str, via: int) -> Op:
        result: Op = self.finish(self.start_op(f, key, via))
        return result

    def admin_call(self, call: Callable[[], Any], what: str) -> Any:
        """An admin operation through proxy 0; None if the cluster refused it as it may."""
        try:
            return self.finish(Deferred.fromCoroutine(call()))
        except EXPECTED_CHANGE_ERRORS as e:
            event(f"{what} refused: {e.code}")
            return None

    def change(self, body: dict[str, Any], what: str, put_between: bool) -> None:
        """Plan a change, then commit it (maybe with a write in between)."""
        admin = self.cluster.admin
        raw = json.dumps(body).encode()
        plan = self.admin_call(lambda: admin.plan(raw), f"{what} plan")
        if plan is None:
            return
        if put_between:
            self.op("put", KEYS[0], 0)
        committed = self.admin_call(admin.commit, f"{what} commit")
        if committed is not None:
            self.changes.append(f"{what}@{committed['epoch']}")
            event(f"{what} committed")
            # A write and a read back while the copy runs, of the keys that
            # change the most replicas: the dual writes at work.
            m = ClusterMap.from_json(committed["map"])
            before, after = m.previous_ring(), m.current_ring()

            def shared(key: str) -> int:
                return len(
                    set(before.preference_list(key, m.n)) & set(after.preference_list(key, m.n))
                )

            for key in sorted(KEYS, key=shared)[:3]:
                self.put_then_get(key, 0)

    @property
    def map(self) -> ClusterMap:
        return self.cluster.view.current

    def members(self) -> list[str]:
        """In the current ring (joining and active)."""
        return sorted(self.map.current_weights())

    def running(self) -> list[str]:
        """Every node of the map not removed, and not crashed."""
        return [n for n in self.map.acceptors() if n not in self.cluster.crashed]

    def saw(self, m: ClusterMap) -> None:
        """Every map chosen is installed by the proxy that chose it."""
        self.maps.setdefault(m.epoch, m)

    # -- rules ----------------------------------------------------------------

    @initialize(size=st.integers(3, 5), proxies=st.integers(1, 2))
    def start(self, size: int, proxies: int) -> None:
        self.cluster = MemoryCluster(ALL_NODES[:size], TIMEOUT, vnodes=VNODES)
        for _ in range(proxies - 1):
            self.cluster.add_proxy()
        for proxy in self.cluster.proxies:
            proxy.view.subscribe(self.saw)
        self.saw(self.cluster.bootstrap())
        self.cluster.start_services()
        self.http = [self.proxy_http(p) for p in self.cluster.proxies]
        self.spare = ALL_NODES[size:]
        for key in KEYS:
            self.case.assertEqual(self.op("put", key, 0).status, "ok")

    @rule(key=keys, via=st.integers(0, 1))
    def put(self, key: str, via: int) -> None:
        self.op("put", key, via)

    @rule(key=keys, via=st.integers(0, 1))
    def put_then_get(self, key: str, via: int) -> None:
        self.op("put", key, via)
        self.op("get", key, 1 - via)

    @rule(key=keys, via=st.integers(0, 1))
    def get(self, key: str, via: int) -> None:
        self.op("get", key, via)

    @rule(
        ops=st.lists(
            st.tuples(st.sampled_from(["put", "get"]), keys, st.integers(0, 1)), max_size=6
        ),
        seconds=st.sampled_from([0.5, 1.0, 2.0]),
    )
    def race(self, ops: list[tuple[str, str, int]], seconds: float) -> None:
        """Operations in flight while the clock runs (and the move goes on)."""
        pending = [
            self.start_op(f, key, via, client=f"racer-{i}") for i, (f, key, via) in enumerate(ops)
        ]
        self.cluster.advance(seconds)
        for d in pending:
            self.finish(d)

    @precondition(lambda self: self.map.move is None and len(self.members()) < MAX_MEMBERS)
    @rule(weight=st.sampled_from([1.0, 1.0, 2.0]), rate=rates, put_between=st.booleans())
    def join(self, weight: float, rate: int, put_between: bool) -> None:
        if not self.spare:
            return
        node = self.spare.pop(0)
        self.cluster.add_node(node)
        self.change(
            {"add": [{"address": node, "weight": weight}], "rate": rate}, "join", put_between
        )

    @precondition(lambda self: self.map.move is None and len(self.members()) > N)
    @rule(data=st.data(), rate=rates, put_between=st.booleans())
    def leave(self, data: st.DataObject, rate: int, put_between: bool) -> None:
        node = data.draw(st.sampled_from(self.members()), label="leaving")
        self.change({"remove": [node], "rate": rate}, "leave", put_between)

    @precondition(lambda self: self.map.move is None)
    @rule(data=st.data(), weight=weights, rate=rates, put_between=st.booleans())
    def reweight(self, data: st.DataObject, weight: float, rate: int, put_between: bool) -> None:
        node = data.draw(st.sampled_from(self.members()), label="reweighted")
        if self.map.member(node).weight == weight:
            return
        self.change({"weights": {node: weight}, "rate": rate}, "reweight", put_between)

    @precondition(lambda self: self.map.move is not None)
    @rule()
    def abort(self) -> None:
        answer = self.admin_call(self.cluster.admin.abort, "abort")
        if answer is not None:
            self.changes.append(f"abort@{answer['epoch']}")
            event("abort")

    @precondition(lambda self: not self.cluster.crashed)
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        """A node of the map dies (mid-move or not); one at a time, so quorums stay."""
        running = self.running()
        node = data.draw(st.sampled_from(running), label="crashed")
        if self.map.move is not None:
            event(f"crash during {self.map.move.phase}")
        self.kill(node)

    @precondition(lambda self: not self.cluster.crashed and self.map.move is not None)
    @rule(data=st.data(), after=st.sampled_from([0.0, 0.1, 0.3, 0.6]))
    def crash_mid_move(self, data: st.DataObject, after: float) -> None:
        """A node the move needs (a source, a destination, one leaving) dies
        a moment into the phase: the stream is likely half sent."""
        self.cluster.advance(after)
        m = self.map
        if m.move is None:
            return
        involved = sorted(
            (set(m.previous_weights()) | set(m.current_weights())) - self.cluster.crashed
        )
        node = data.draw(st.sampled_from(involved), label="crashed mid-move")
        event(f"crash mid-move during {m.move.phase}")
        self.kill(node)

    def kill(self, node: str) -> None:
        self.cluster.crash(node)
        self.down.setdefault(node, []).append([self.cluster.clock.seconds(), float("inf")])

    @precondition(lambda self: bool(self.cluster.crashed))
    @rule()
    def restart(self) -> None:
        for node in sorted(self.cluster.crashed):
            self.cluster.restart(node)
            self.down[node][-1][1] = self.cluster.clock.seconds()

    @rule(seconds=st.sampled_from([0.2, 0.5, 1.0, 3.0]))
    def advance(self, seconds: float) -> None:
        self.cluster.advance(seconds)

    # -- invariants -----------------------------------------------------------

    @invariant()
    def reads_are_written_values_and_see_own_writes(self) -> None:
        if self.history.ops:
            self.case.assertEqual(check_reads(self.history), [])

    @invariant()
    def live_epochs_are_compatible(self) -> None:
        """Rule 2, as what it is for: of the epochs an operation may still be
        accepted at (from the oldest learned by a member to the newest), every
        two are compatible: each one's reads use a ring the other writes to.

        (The barrier keeps the commits and phase changes to two adjacent
        epochs; aborts need no barrier, since reads never switch rings on an
        abort, so a node that is down may fall further behind.)"""
        if not self.http:
            return
        learned = self.cluster.learned_epochs()
        newest = max(learned.values())
        m = self.maps.get(newest)
        if m is None:
            return
        keep_up = set(m.acceptors()) | {x.id for x in m.members if x.state == MemberState.LEAVING}
        oldest = min(e for n, e in learned.items() if n in keep_up)
        live = [self.maps[e] for e in range(oldest, newest + 1) if e in self.maps]
        for a, b in itertools.combinations(live, 2):
            for x, y in ((a, b), (b, a)):
                self.case.assertIn(
                    _key(x.read_weights()),
                    [_key(w) for w in y.write_weight_sets()],
                    f"epoch {x.epoch} reads a ring epoch {y.epoch} does not write "
                    f"(live epochs {oldest}..{newest}, learned {learned})",
                )

    def last_acked_version(self, key: str) -> Version | None:
        """The version of the key's last acknowledged write, if a node still holds it."""
        acked = [w for w in self.history.writes().get(key, []) if w.status == "ok"]
        if not acked:
            return None
        last = max(acked, key=lambda w: w.end)
        for engine in self.cluster.engines.values():
            record = engine.get(key)
            if record is not None and record.value.decode() == last.value:
                return record.version
        return None

    # -- the end ----------------------------------------------------------------

    def idle_everywhere(self) -> bool:
        views = {p.view.current.epoch for p in self.cluster.proxies}
        if len(views) != 1 or any(p.view.current.move is not None for p in self.cluster.proxies):
            return False
        m = self.map
        return all(self.cluster.nodes[n].store.mapstore.epoch == m.epoch for n in m.acceptors())

    def teardown(self) -> None:
        if not self.http:
            return
        cluster = self.cluster
        if cluster.crashed:
            self.restart()
        cluster.drive(self.idle_everywhere, IDLE_WITHIN, what="the move reaching idle everywhere")
        cluster.advance(3.0)  # hinted handoff and the proxies' retries run
        m = self.map
        self.case.assertTrue(self.idle_everywhere(), "a map change after idle")
        learned = {n: cluster.nodes[n].store.mapstore.epoch for n in m.acceptors()}
        self.case.assertEqual(set(learned.values()), {m.epoch}, learned)

        ring = m.current_ring()
        behind = {}
        for key in KEYS:
            floor = self.last_acked_version(key)
            if floor is None:
                continue
            owners = ring.preference_list(key, m.n)
            lacking = [n for n in owners if not _at_least(cluster.engines[n].get(key), floor)]
            if lacking:
                behind[key] = lacking
        detail = json.dumps({"changes": self.changes, "epoch": m.epoch}, indent=1)
        # Before any read repair: the copies, the joint writes and the hints put
        # the last acknowledged write on every owner.
        self.case.assertEqual(behind, {}, f"owners without the last acked write; {detail}")

        final: dict[str, str | None] = {}
        for key in KEYS:
            op = self.op("get", key, 0)
            self.case.assertEqual(op.status, "ok", op)
            final[key] = op.value
        cluster.advance(1.0)  # read repair lands

        removed = {x.id for x in m.members if x.state == MemberState.REMOVED}
        misplaced = {}
        diverged = {}
        for key in KEYS:
            home = set(ring.preference_list(key, m.n))
            holders = cluster.holders(key)
            if holders != home:
                misplaced[key] = {
                    "missing": sorted(home - holders),
                    "extra": sorted(holders - home),
                }
            versions = {
                str(r.version) for n in holders & home if (r := cluster.engines[n].get(key))
            }
            if len(versions) > 1:
                diverged[key] = sorted(versions)
        leftovers = {n: len(list(cluster.engines[n].scan())) for n in removed}
        detail = json.dumps(
            {"changes": self.changes, "epoch": m.epoch, "removed": sorted(removed)}, indent=1
        )
        self.case.assertEqual(misplaced, {}, detail)
        self.case.assertEqual(diverged, {}, detail)
        self.case.assertEqual({n: c for n, c in leftovers.items() if c}, {}, detail)
        violations = check_final(self.history, final) + check_reads(self.history)
        self.case.assertEqual(violations, [], detail)
        event(summary(self.history, violations))
        event(f"{len(self.changes)} changes")


def _at_least(record: Record | None, version: Version) -> bool:
    return record is not None and record.version >= version


def _key(weights: Mapping[str, float]) -> list[tuple[str, float]]:
    return sorted((n, float(w)) for n, w in weights.items())


MembershipModel.TestCase.settings = settings(
    max_examples=20,
    stateful_step_count=20,
    deadline=None,
    database=None,
    derandomize=True,  # the same runs every time: a failure here is a regression
    suppress_health_check=[HealthCheck.too_slow],
)
TestMembershipModel = MembershipModel.TestCase


# -- a bug the model found (fixed: ClusterMap.writes_to) ------------------------------


def test_a_hint_delivered_after_a_move_leaves_no_copy_on_a_node_that_no_longer_owns_the_key() -> (
    None
):
    """
    A write during a join's copying phase, while an old owner X is down, leaves
    a hint for X on another node. X comes back, the join finishes, X's cleanup
    runs, and only then is the hint delivered (the holder's handoff runs every
    second; here it runs after the move, as if the holder had been slow). X no
    longer owns the key under the final map, so the holder drops the hint
    rather than leave a copy there that no cleanup would remove.
    """
    cluster = MemoryCluster(ALL_NODES[:4], TIMEOUT, vnodes=VNODES)
    cluster.bootstrap()
    for proxy in cluster.proxies:
        proxy.start_services()  # the proxies' timers; the nodes' handoff is run by hand
    new = ALL_NODES[4]
    cluster.add_node(new)
    raw = json.dumps({"add": [{"address": new}]}).encode()
    plan = cluster.pump(Deferred.fromCoroutine(cluster.admin.plan(raw)))
    target = ClusterMap.from_json(plan["map"])
    before, after = target.previous_ring(), target.current_ring()
    key, x = next(
        (k, node)
        for k in (f"k{i}" for i in range(1000))
        for node in set(before.preference_list(k, N)) - set(after.preference_list(k, N))
    )
    stub: Any = cluster.proxy  # StubTreq builds its request methods at runtime
    assert cluster.pump(stub.put(f"http://proxy/kv/{key}", data=b"v1")).code == 201
    cluster.pump(Deferred.fromCoroutine(cluster.admin.commit()))
    cluster.crash(x)
    cluster.health.call_failed(x, NodeUnreachable(x, "down", sent=False))
    assert cluster.pump(stub.put(f"http://proxy/kv/{key}", data=b"v2")).code == 200
    held = {n for n, e in cluster.engines.items() if e.hint_counts().get(x)}
    assert held, "the write left a hint for the old owner that was down"
    cluster.restart(x)
    cluster.drive(
        lambda: (
            cluster.view.current.move is None
            and all(
                cluster.nodes[n].store.mapstore.epoch == cluster.view.epoch for n in cluster.nodes
            )
        ),
        IDLE_WITHIN,
        what="the join reaching idle",
    )
    for node in sorted(held):
        mapstore = cluster.nodes[node].store.mapstore
        handoff = HintHandoff(
            cluster.engines[node],
            cluster.replica_client,
            cluster_map=lambda store=mapstore: store.learned,  # type: ignore[misc]
        )
        cluster.pump(Deferred.fromCoroutine(handoff.deliver_all()))
    owners = set(cluster.view.current.current_ring().preference_list(key, N))
    assert x not in owners
    assert cluster.holders(key) == owners
