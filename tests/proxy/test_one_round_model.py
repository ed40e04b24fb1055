"""
A Hypothesis stateful model of one-round writes through several proxies.

Three proxies over one 5-node L{MemoryCluster} (N=3, R=W=2; two batch their
replica calls, one sends each alone) write and read a few keys, one at a time
or two proxies at once on the same key, while nodes crash or hang and recover
and proxies forget the versions they saw (as a restarted proxy does), so that
their tentative versions are often too small and get refused. Every operation
goes into a L{shardkv.testing.history.History} with logical start and end
times, and the answers' versions (the ETag) are kept. After every step:

- *later writes win* (guarantee 4): of two acknowledged writes of a key, one
  that started after the other was acknowledged has the larger version,
  whichever proxies wrote them;
- a read that started after a write was acknowledged (through any proxy)
  returns its version or a newer one, and only values some write tried
  (L{check_reads}: nothing fabricated, and each proxy reads its own writes);
- no replica's version of a key ever goes back.

At the end, with every fault healed and the hints handed over, every key
reads through each proxy as its acknowledged write with the largest version
(L{check_final}: no acknowledged write is lost). The runs are derandomized.
"""

from __future__ import annotations

import itertools
import random
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.versions import SeenCounters, Version
from shardkv.node.handoff import HintHandoff
from shardkv.proxy.coordinator import Coordinator
from shardkv.testing.history import History, Op, check_final, check_reads
from shardkv.testing.memory import MemoryCluster
from tests.helpers import (
    HTTP,
    NODES_5,
    Reply,
    answered,
    flusher,
    memory_cluster,
    quorum_status,
    settle,
)

TIMEOUT = 2.0
KEYS = ["apple", "kiwi"]
MAX_FAILED = 1
PROXIES = 3

nodes = st.sampled_from(NODES_5)
keys = st.sampled_from(KEYS)
proxies = st.integers(min_value=0, max_value=PROXIES - 1)


class OneRoundModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.case = SynchronousTestCase()
        self.cluster: MemoryCluster = memory_cluster(NODES_5, TIMEOUT)
        while len(self.cluster.proxies) < PROXIES:
            self.cluster.add_proxy()
        self.cluster.proxies[2].replica_client.pipeline_depth = 0
        self.https: list[HTTP] = []
        self.coordinators: list[Coordinator] = []
        for i, proxy in enumerate(self.cluster.proxies):
            proxy.coordinator._random = random.Random(i)
            pump = flusher(self.cluster.node_http, *(p.proxy for p in self.cluster.proxies))
            self.https.append(HTTP(self.case, proxy.proxy, f"http://127.0.0.1:{9080 + i}", pump))
            self.coordinators.append(proxy.coordinator)
        self.history = History()
        self.ticks = itertools.count()
        self.serial = itertools.count()
        self.acked: dict[str, list[tuple[int, int, Version]]] = {k: [] for k in KEYS}
        """Per key: (start, end, version) of each acknowledged write."""
        self.reads: list[tuple[str, int, Version | None]] = []
        """(key, start, version read) of each ok read."""
        self.replica_versions: dict[tuple[str, str], Version] = {}

    @property
    def failed(self) -> set[str]:
        return self.cluster.network.down | self.cluster.network.hung

    def finish(self, d: Deferred[Any]) -> Any:
        """Pump ``d``; while it waits, let the clock run a hedge delay, then a timeout."""
        http = self.https[0]
        for _ in range(6):
            http.pump(d)
            if answered(d):
                return self.case.successResultOf(d)
            self.cluster.clock.advance(0.1)
            http.pump(d)
            if answered(d):
                return self.case.successResultOf(d)
            self.cluster.clock.advance(TIMEOUT + 0.01)
        raise AssertionError("no answer even after the timeouts")

    def start_put(self, proxy: int, key: str) -> tuple[Deferred[Reply], str, int]:
        value = f"{key}-{next(self.serial)}"
        start = next(self.ticks)
        d = self.https[proxy].start("PUT", "/kv/" + quote(key, safe=""), value.encode())
        return d, value, start

    def end_put(self, proxy: int, key: str, value: str, start: int, reply: Reply) -> None:
        end = next(self.ticks)
        self.case.assertIn(reply.code, (200, 201, 503, 504), reply.body)
        status = quorum_status("put", reply)
        self.history.add(Op(f"p{proxy}", "put", key, value, status, start, end))
        if status == "ok":
            version = Version.parse(reply.json()["version"])
            self.acked[key].append((start, end, version))

    # -- rules ----------------------------------------------------------------

    @rule(proxy=proxies, key=keys)
    def put(self, proxy: int, key: str) -> None:
        d, value, start = self.start_put(proxy, key)
        self.end_put(proxy, key, value, start, self.finish(d))

    @rule(first=proxies, second=proxies, key=keys)
    def race(self, first: int, second: int, key: str) -> None:
        """Two proxies write the key at once (the second may be the first)."""
        a = self.start_put(first, key)
        b = self.start_put(second, key)
        reply_a, reply_b = self.finish(a[0]), self.finish(b[0])
        self.end_put(first, key, a[1], a[2], reply_a)
        self.end_put(second, key, b[1], b[2], reply_b)

    @rule(proxy=proxies, key=keys)
    def get(self, proxy: int, key: str) -> None:
        start = next(self.ticks)
        reply: Reply = self.finish(self.https[proxy].start("GET", "/kv/" + quote(key, safe="")))
        end = next(self.ticks)
        self.case.assertIn(reply.code, (200, 404, 503, 504), reply.body)
        status = quorum_status("get", reply)
        value = reply.body.decode() if reply.code == 200 else None
        self.history.add(Op(f"p{proxy}", "get", key, value, status, start, end))
        if status == "ok":
            etag = reply.header("etag")
            self.reads.append((key, start, Version.parse(etag) if etag else None))

    @rule(proxy=proxies)
    def forget(self, proxy: int) -> None:
        """The proxy forgets every version it saw (a restart): its next tries guess low."""
        self.coordinators[proxy].seen = SeenCounters()

    @precondition(lambda self: len(self.failed) < MAX_FAILED)
    @rule(node=nodes, partition=st.booleans())
    def fail(self, node: str, partition: bool) -> None:
        (self.cluster.network.hung if partition else self.cluster.network.down).add(node)

    @precondition(lambda self: bool(self.failed))
    @rule()
    def recover(self) -> None:
        self.cluster.network.down.clear()
        self.cluster.network.hung.clear()
        self.check_health()

    @rule()
    def tick(self) -> None:
        self.cluster.clock.advance(TIMEOUT + 0.01)
        settle(self.cluster, *(p.proxy for p in self.cluster.proxies))

    def check_health(self) -> None:
        for proxy in self.cluster.proxies:
            self.finish(proxy.health.check_all())

    # -- invariants -----------------------------------------------------------

    @invariant()
    def later_writes_win(self) -> None:
        for key, writes in self.acked.items():
            for a_start, a_end, a in writes:
                for b_start, _, b in writes:
                    if b_start > a_end:
                        self.case.assertGreater(b, a, (key, a_start, b_start))

    @invariant()
    def reads_see_acknowledged_writes(self) -> None:
        self.case.assertEqual(check_reads(self.history), [])
        for key, start, version in self.reads:
            before = [v for _, end, v in self.acked[key] if end < start]
            if before:
                self.case.assertIsNotNone(version, (key, start))
                assert version is not None
                self.case.assertGreaterEqual(version, max(before), (key, start))

    @invariant()
    def replica_versions_never_go_back(self) -> None:
        for node, app in self.cluster.nodes.items():
            for key, record in app.store.engine.scan():
                seen = self.replica_versions.get((node, key))
                if seen is not None:
                    self.case.assertGreaterEqual(record.version, seen, (node, key))
                self.replica_versions[(node, key)] = record.version

    def teardown(self) -> None:
        self.cluster.network.down.clear()
        self.cluster.network.hung.clear()
        self.tick()
        self.check_health()
        for node in NODES_5:
            handoff = HintHandoff(
                self.cluster.nodes[node].store.engine, self.cluster.replica_client
            )
            self.finish(Deferred.fromCoroutine(handoff.deliver_all()))
        final: dict[str, str | None] = {}
        for key in KEYS:
            newest = max((v for _, _, v in self.acked[key]), default=None)
            finals = set()
            for http in self.https:
                reply = self.finish(http.start("GET", "/kv/" + quote(key, safe="")))
                self.case.assertIn(reply.code, (200, 404), reply.body)
                finals.add(reply.body.decode() if reply.code == 200 else None)
                if newest is not None:
                    self.case.assertGreaterEqual(Version.parse(reply.header("etag")), newest)
            self.case.assertEqual(len(finals), 1, (key, finals))
            final[key] = finals.pop()
        self.case.assertEqual(check_final(self.history, final), [])
        retries = sum(c.one_round_retries for c in self.coordinators)
        fallbacks = sum(c.one_round_fallbacks for c in self.coordinators)
        event(f"one-round retries: {min(retries, 5)}{'+' if retries > 5 else ''}")
        event(f"fallbacks: {min(fallbacks, 1)}{'+' if fallbacks > 1 else ''}")


OneRoundModel.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
TestOneRoundModel = OneRoundModel.TestCase
