"""
A Hypothesis stateful model of replication through the proxy.

One client puts unique values and gets keys through the proxy of a 5-node
L{MemoryCluster} (N=3, R=W=2) while nodes crash (connections refused),
restart, get partitioned (requests hang until the caller's timeout) and
heal, nodes hand their hints over, the proxy's timers fire and time passes.
Every operation goes into a L{shardkv.testing.history.History} as ok, fail or info
(see L{tests.helpers.quorum_status}), and the checkers of
L{shardkv.testing.history} run over it:

- after every step: no read returns a value no write tried to store (or
  only a definitely failed one did), the client reads its own acknowledged
  writes (R + W > N), and no replica's version of a key ever goes back;
- at the end (L{ReplicationModel.teardown}), after one more fault while
  every key is rewritten and then healing everything: read repair alone
  (one read of each key that asks all N) or hinted handoff alone (every node hands its
  hints over) makes each key's N home replicas identical, no hint or
  undelivered record is left, and every key ends with its last
  acknowledged write.

Faults never wipe a node's data (a memory engine outlives its "crash"), so
no acknowledged write may be lost however many replicas of a key fail; the
model keeps at most C{MAX_FAILED} nodes failed at once only so that quorums
are reachable often enough for the checks to bite. (It also passes with 3
or 4.) The runs are derandomized: the same 60 every time.
"""

from __future__ import annotations

import itertools
import json
import random
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.versions import Version
from shardkv.node.handoff import HintHandoff
from shardkv.testing.history import (
    History,
    Op,
    check_convergence,
    check_final,
    check_reads,
    summary,
)
from shardkv.testing.memory import MemoryCluster
from tests.helpers import (
    HTTP,
    NODES_5,
    Reply,
    answered,
    cluster_http,
    home_replicas,
    memory_cluster,
    quorum_status,
    settle,
)

TIMEOUT = 2.0
KEYS = ["apple", "kiwi", "plum"]
MAX_FAILED = 2

nodes = st.sampled_from(NODES_5)
keys = st.sampled_from(KEYS)


class ReplicationModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.case = SynchronousTestCase()  # for its assertions and successResultOf
        self.cluster: MemoryCluster = memory_cluster(NODES_5, TIMEOUT)
        # Hedged reads (one in ten asks all N) draw from the coordinator's
        # random: seeded, so that the derandomized runs stay the same runs.
        self.cluster.coordinator._random = random.Random(0)
        self.http: HTTP = cluster_http(self.case, self.cluster)
        self.history = History()
        self.ticks = itertools.count()
        self.serial = itertools.count()
        self.versions: dict[tuple[str, str], Version] = {}
        self.repair_first = False
        self.last_fault = NODES_5[0]

    # -- driving the cluster --------------------------------------------------

    @property
    def failed(self) -> set[str]:
        return self.cluster.network.down | self.cluster.network.hung

    def finish(self, d: Deferred[Any]) -> Any:
        """Pump C{d}; while it waits on a hung node, let the clock run to the timeout."""
        for _ in range(5):
            self.http.pump(d)
            if answered(d):
                return self.case.successResultOf(d)
            self.cluster.clock.advance(TIMEOUT + 0.01)
        raise AssertionError("no answer even after the timeouts")

    def request(self, method: str, key: str, body: bytes | None = None) -> Reply:
        reply: Reply = self.finish(self.http.start(method, "/kv/" + quote(key, safe=""), body))
        return reply

    def check_health(self) -> None:
        self.finish(self.cluster.health.check_all())

    def record(self, f: str, key: str, value: str | None, reply: Reply, start: int) -> None:
        op = Op("client", f, key, value, quorum_status(f, reply), start, next(self.ticks))
        self.history.add(op)

    # -- rules ----------------------------------------------------------------

    @initialize(key=keys, repair_first=st.booleans(), last_fault=nodes)
    def first_write(self, key: str, repair_first: bool, last_fault: str) -> None:
        """The first write; and how the run ends (see L{teardown})."""
        self.repair_first = repair_first
        self.last_fault = last_fault
        self.put(key)

    @rule(key=keys)
    def put(self, key: str) -> None:
        value = f"{key}-{next(self.serial)}"
        start = next(self.ticks)
        reply = self.request("PUT", key, value.encode())
        self.case.assertIn(reply.code, (200, 201, 503, 504), reply.body)
        self.record("put", key, value, reply, start)

    @rule(key=keys)
    def get(self, key: str) -> None:
        start = next(self.ticks)
        reply = self.request("GET", key)
        self.case.assertIn(reply.code, (200, 404, 503, 504), reply.body)
        self.record("get", key, reply.body.decode() if reply.code == 200 else None, reply, start)

    @rule(key=keys)
    def put_then_get(self, key: str) -> None:
        self.put(key)
        self.get(key)

    @rule()
    def sweep(self) -> None:
        """Read, then overwrite, every key: a stale replica gets many chances to show."""
        for key in KEYS:
            self.get(key)
            self.put(key)

    @precondition(lambda self: len(self.failed) < MAX_FAILED)
    @rule(node=nodes, partition=st.booleans())
    def fail(self, node: str, partition: bool) -> None:
        """Crash C{node} (connections refused) or cut it off (requests hang)."""
        if node not in self.failed:
            (self.cluster.network.hung if partition else self.cluster.network.down).add(node)

    @precondition(lambda self: bool(self.failed))
    @rule(data=st.data())
    def recover(self, data: st.DataObject) -> None:
        """Restart a crashed node or heal a partition, then run a health check round."""
        node = data.draw(st.sampled_from(sorted(self.failed)))
        self.cluster.network.down.discard(node)
        self.cluster.network.hung.discard(node)
        self.check_health()

    @rule(what=st.sampled_from(["health check", "retry undelivered", "tick"]))
    def background(self, what: str) -> None:
        """One of the proxy's timers fires: health checks, undelivered retries, or time passes."""
        if what == "health check":
            self.check_health()
        elif what == "retry undelivered":
            self.retry_undelivered()
        else:
            self.tick()

    @rule(node=nodes)
    def deliver_hints(self, node: str) -> None:
        """One node's hinted handoff runs once (a failed node's does nothing)."""
        if node not in self.failed:
            handoff = HintHandoff(
                self.cluster.nodes[node].store.engine, self.cluster.replica_client
            )
            self.finish(Deferred.fromCoroutine(handoff.deliver_all()))

    def retry_undelivered(self) -> None:
        """The proxy's timer retries records that no node could keep as hints."""
        self.finish(Deferred.fromCoroutine(self.cluster.hints.retry()))

    def tick(self) -> None:
        self.cluster.clock.advance(TIMEOUT + 0.01)
        settle(self.cluster)

    # -- invariants -----------------------------------------------------------

    @invariant()
    def reads_are_written_values_and_see_own_writes(self) -> None:
        self.case.assertEqual(check_reads(self.history), [])

    @invariant()
    def replica_versions_never_go_back(self) -> None:
        for node, app in self.cluster.nodes.items():
            for key, record in app.store.engine.scan():
                seen = self.versions.get((node, key))
                if seen is not None:
                    self.case.assertGreaterEqual(record.version, seen, (node, key))
                self.versions[(node, key)] = record.version

    def replica_states(self) -> dict[str, dict[str, object]]:
        """Home replica -> key -> (version, value) or None, for every key."""
        replicas: dict[str, dict[str, object]] = {}
        for key in KEYS:
            for node in home_replicas(self.cluster, key):
                record = self.cluster.nodes[node].store.engine.get(key)
                state = None if record is None else [str(record.version), record.value.decode()]
                replicas.setdefault(node, {})[key] = state
        return replicas

    def assertConverged(self, how: str) -> None:
        replicas = self.replica_states()
        detail = json.dumps({"after": how, "replicas": replicas}, indent=1)
        self.case.assertEqual(check_convergence(replicas), [], detail)

    def hand_off_everything(self) -> None:
        self.retry_undelivered()
        for node in NODES_5:
            self.deliver_hints(node)
        self.check_health()
        hints = {n: a.store.engine.hint_counts() for n, a in self.cluster.nodes.items()}
        self.case.assertEqual({n: c for n, c in hints.items() if c}, {})
        self.case.assertEqual(self.cluster.hints.undelivered, {})

    def read_everything(self) -> dict[str, str | None]:
        """One read of every key, each asking all N replicas (a hedged read
        repairs only the replicas it asked; one in ten reads asks all, and this
        pass checks what such a read repairs)."""
        final: dict[str, str | None] = {}
        coordinator = self.cluster.coordinator
        share, coordinator.read_all_fraction = coordinator.read_all_fraction, 1.0
        for key in KEYS:
            start = next(self.ticks)
            reply = self.request("GET", key)
            self.case.assertIn(reply.code, (200, 404), reply.body)
            final[key] = reply.body.decode() if reply.code == 200 else None
            self.record("get", key, final[key], reply, start)
        coordinator.read_all_fraction = share
        settle(self.cluster)
        return final

    def teardown(self) -> None:
        """
        One last fault while every key is written again, so that some
        replicas are surely behind; then heal everything and let the clock
        run. Either mechanism alone must bring every home replica up to date
        (read repair, after one read of each key; or hinted handoff, once
        every node handed its hints over), and every key must end with its
        last acknowledged write.
        """
        network = self.cluster.network
        if len(self.failed) < MAX_FAILED:
            self.fail(self.last_fault, partition=False)
        self.sweep()
        network.down.clear()
        network.hung.clear()
        self.tick()  # calls still hanging from before the heal time out
        self.check_health()
        if self.repair_first:
            final = self.read_everything()
            self.assertConverged("one read of every key")
            self.hand_off_everything()
        else:
            self.hand_off_everything()
            self.assertConverged("hinted handoff")
            final = self.read_everything()
        self.assertConverged("both")
        violations = check_final(self.history, final) + check_reads(self.history)
        self.case.assertEqual(violations, [])
        event(summary(self.history, violations))


ReplicationModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    database=None,
    derandomize=True,  # the same runs every time: a failure here is a regression
    suppress_health_check=[HealthCheck.too_slow],
)
TestReplicationModel = ReplicationModel.TestCase
