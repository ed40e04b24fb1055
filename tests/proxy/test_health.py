"""
Tests of the proxy's view of which nodes are up (L{shardkv.proxy.health}).

The unit tests drive a L{HealthMonitor} with a fake check and a
C{twisted.internet.task.Clock}; the last ones watch it through the proxy,
over a one-copy cluster whose owner fails, where "down" means requests for
its keys fail at once until a health check finds it answering again. The
rule under test: a refused or broken connection marks a node down at once; a
slow answer (a request timeout, or a health check without an answer) never
does, except that C{strikes} health checks in a row without an answer do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from shardkv.errors import (
    BadReplicaAnswer,
    NodeBusy,
    NodeTimeout,
    NodeUnreachable,
    ReplicaRefused,
)
from shardkv.proxy.health import HealthMonitor
from tests.helpers import check_health
from tests.proxy.cluster_case import NODES, UNKNOWN, OwnerCase, holders

Checker = Callable[[str], Deferred[object]]


def answering(reports: dict[str, Any], calls: list[str] | None = None) -> Checker:
    """A health check that answers C{reports[node]} and fails for any other node."""

    def check(node: str) -> Deferred[object]:
        if calls is not None:
            calls.append(node)
        if node in reports:
            return succeed(reports[node])
        return fail(NodeUnreachable(node, f"{node} is down", sent=False))

    return check


class HealthMonitorTests(SynchronousTestCase):
    """The monitor's view of each node: set by checks and by calls that got no answer."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.reports: dict[str, Any] = {node: {"hints": {}} for node in NODES}
        self.health = HealthMonitor(NODES, answering(self.reports), self.clock)

    def check(self) -> None:
        self.successResultOf(self.health.check_all())

    def test_nodes_start_unknown_and_not_down(self) -> None:
        for node in NODES:
            self.assertEqual(self.health.state(node).as_json(), UNKNOWN)
            self.assertFalse(self.health.is_down(node))

    def test_mark_records_status_since_and_error(self) -> None:
        """
        C{since} is when the status last changed; C{last_check} and the
        error follow every mark.
        """
        node = NODES[0]
        self.clock.advance(3)
        self.health.mark(node, up=False, error="refused")
        self.assertTrue(self.health.is_down(node))
        self.clock.advance(2)
        self.health.mark(node, up=False, error="refused again")
        state = self.health.state(node)
        self.assertEqual(
            (state.status, state.since, state.last_check, state.error),
            ("down", 3.0, 5.0, "refused again"),
        )
        self.clock.advance(1)
        self.health.mark(node, up=True)
        self.assertEqual(
            self.health.state(node).as_json(),
            {"status": "up", "since": 6.0, "last_check": 6.0, "error": None},
        )
        self.assertFalse(self.health.is_down(node))

    def test_each_change_of_status_is_counted(self) -> None:
        """
        C{shardkv_node_health_flips_total} counts changes, by the status changed
        to; marking a node what it already is counts nothing.
        """
        node = NODES[0]
        self.health.mark(node, up=False, error="refused")
        self.health.mark(node, up=False, error="refused again")
        self.health.mark(node, up=True)
        registry = self.health.metrics.registry
        flips = {
            to: registry.get_sample_value(
                "shardkv_node_health_flips_total", {"node": node, "to": to}
            )
            for to in ("down", "up")
        }
        self.assertEqual(flips, {"down": 1, "up": 1})

    def test_call_failed_marks_down_only_a_refused_or_broken_connection(self) -> None:
        """
        Only a connection that was refused or broke says a node is down. A
        timeout (the node, or this proxy, was slow under load), a busy queue
        here, or an error the node answered with says nothing about the
        node: marking it down would take a working replica out of every
        quorum until the next check. (A timeout marked the node down before
        overload was told apart from failure.)
        """
        node = NODES[1]
        answered_errors: list[BaseException | None] = [
            NodeTimeout(node, 2.0),
            NodeTimeout(node, 2.0, sent=False),
            NodeBusy(node, 64),
            NodeBusy(node, 16 << 20, "bytes of records in flight"),
            ReplicaRefused(node, "insufficient_storage", "the disk is full"),
            BadReplicaAnswer(node, "nonsense"),
            ValueError("not a replica call at all"),
            None,
        ]
        self.health.mark(node, up=True)
        for error in answered_errors:
            self.health.call_failed(node, error)
            self.assertFalse(self.health.is_down(node), error)
        for error in [
            NodeUnreachable(node, "connection refused", sent=False),
            NodeUnreachable(node, "connection lost", sent=True),
        ]:
            self.health.mark(node, up=True)
            self.health.call_failed(node, error)
            self.assertTrue(self.health.is_down(node), error)
            self.assertEqual(self.health.state(node).error, str(error))

    def test_check_all_marks_each_node_by_its_answer(self) -> None:
        down = NODES[2]
        del self.reports[down]
        self.clock.advance(4)
        self.check()
        self.assertEqual([self.health.state(n).status for n in NODES], ["up", "up", "down"])
        self.assertEqual({self.health.state(n).last_check for n in NODES}, {4.0})
        self.assertEqual(
            self.health.state(down).error, f"node {down} is unreachable: {down} is down"
        )
        self.assertEqual(self.health.state(NODES[0]).report, {"hints": {}})
        self.reports[down] = "not a mapping"
        self.check()
        self.assertEqual(
            (self.health.state(down).status, self.health.state(down).report), ("up", {})
        )

    def test_hints_waiting_counts_reports_of_live_nodes(self) -> None:
        """
        Hints for a node are counted from the last reports of nodes that are
        up: a down node's hints cannot be handed over, so its old report
        does not count.
        """
        a, b, c = NODES
        self.reports[a] = {"hints": {c: 2}}
        self.reports[b] = {"hints": {c: 3, a: 1}}
        self.check()
        self.assertEqual([self.health.hints_waiting(n) for n in NODES], [1, 0, 5])
        self.assertEqual([self.health.has_hints_waiting(n) for n in NODES], [True, False, True])
        self.health.mark(b, up=False, error="test")
        self.assertEqual([self.health.hints_waiting(n) for n in NODES], [0, 0, 2])
        self.assertFalse(self.health.has_hints_waiting(a))


class StrikeTests(SynchronousTestCase):
    """Health checks without an answer: a node is down only after several in a row."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.node = NODES[0]
        self.answers: list[Deferred[object]] = []
        self.cancelled: list[str] = []
        self.health = HealthMonitor(
            [self.node], self.check, self.clock, check_timeout=1.0, strikes=3
        )

    def check(self, node: str) -> Deferred[object]:
        """A check whose answer the test gives (or never gives), noting cancellations."""
        d: Deferred[object] = Deferred(lambda _: self.cancelled.append(node))
        self.answers.append(d)
        return d

    def silent_round(self) -> None:
        """One round whose check gets no answer: it times out after check_timeout."""
        round_ = self.health.check_all()
        self.assertNoResult(round_)
        self.clock.advance(0.99)
        self.assertNoResult(round_)
        self.clock.advance(0.01)
        self.successResultOf(round_)

    def test_down_after_three_silent_checks_in_a_row(self) -> None:
        """
        A check with no answer within check_timeout is cancelled (its own
        deadline, not the request timeout) and is a strike; the node stays up
        for two strikes and is down at the third, with a message saying why.
        """
        self.health.mark(self.node, up=True)
        for strike in (1, 2):
            self.silent_round()
            self.assertEqual(len(self.cancelled), strike)
            state = self.health.state(self.node)
            self.assertEqual(state.status, "up", strike)
            self.assertIn("no answer to its health", state.error)
        self.silent_round()
        state = self.health.state(self.node)
        self.assertEqual(
            (state.status, state.since, state.error),
            ("down", 3.0, "no answer to its health 3 checks in a row (each 1 s)"),
        )

    def test_an_answer_clears_the_strikes(self) -> None:
        """Two silent checks, an answer, two silent checks: never three in a row, so up."""
        for _ in range(2):
            self.silent_round()
        round_ = self.health.check_all()
        self.answers[-1].callback({"hints": {}})
        self.successResultOf(round_)
        self.assertEqual(self.health.state(self.node).as_json()["error"], None)
        for _ in range(2):
            self.silent_round()
        self.assertFalse(self.health.is_down(self.node))

    def test_request_timeout_in_a_check_is_a_strike(self) -> None:
        """The replica client's own NodeTimeout inside a check counts like silence."""
        for _ in range(2):
            round_ = self.health.check_all()
            self.answers[-1].errback(NodeTimeout(self.node, 2.0))
            self.successResultOf(round_)
        self.assertFalse(self.health.is_down(self.node))
        round_ = self.health.check_all()
        self.answers[-1].errback(NodeTimeout(self.node, 2.0))
        self.successResultOf(round_)
        self.assertTrue(self.health.is_down(self.node))

    def test_a_definite_no_marks_down_at_once(self) -> None:
        """
        A refused or broken connection, or an answer saying the node is not
        healthy, is not slowness: one such check marks the node down, even
        right after a silent one.
        """
        for error in [
            NodeUnreachable(self.node, "connection refused", sent=False),
            NodeUnreachable(self.node, "the connection broke mid-request", sent=True),
            NodeUnreachable(self.node, "storage failed", sent=False),
            ReplicaRefused(self.node, "forbidden", "wrong token"),
        ]:
            self.health.mark(self.node, up=True)
            self.silent_round()
            round_ = self.health.check_all()
            self.answers[-1].errback(error)
            self.successResultOf(round_)
            state = self.health.state(self.node)
            self.assertEqual((state.status, state.error), ("down", str(error)))

    def test_a_cancelled_check_says_nothing(self) -> None:
        """A check cancelled from elsewhere neither marks the node nor counts a strike."""
        self.health.mark(self.node, up=True)
        round_ = self.health.check_all()
        self.answers[-1].errback(CancelledError())
        self.successResultOf(round_)
        state = self.health.state(self.node)
        self.assertEqual((state.status, state.strikes), ("up", 0))


class HealthServiceTests(SynchronousTestCase):
    """The monitor's service checks every node once per interval of its clock."""

    def test_checks_every_interval(self) -> None:
        clock = Clock()
        calls: list[str] = []
        health = HealthMonitor(NODES, answering({NODES[0]: {}}, calls), clock, interval=5.0)
        service = health.service()
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(calls, NODES)  # at once on start
        clock.advance(4.9)
        self.assertEqual(len(calls), 3)
        clock.advance(0.1)
        self.assertEqual(len(calls), 6)
        clock.advance(5.0)
        self.assertEqual(len(calls), 9)
        self.assertEqual([health.state(n).status for n in NODES], ["up", "down", "down"])
        self.assertEqual(health.state(NODES[0]).last_check, 10.0)


class HealthThroughTheProxyTests(OwnerCase):
    """A node that failed a request stays out of quorums until a check brings it back."""

    def test_health_check_brings_a_node_back(self) -> None:
        self.refuse()
        self.assertEqual(self.http.put(self.path, b"v").code, 503)

        # Still refusing: the check keeps it down.
        check_health(self, self.cluster)
        self.assertTrue(self.cluster.health.is_down(self.node))
        self.assertEqual(self.http.put(self.path, b"v").code, 503)

        self.cluster.network.down.clear()
        self.cluster.clock.advance(5)
        check_health(self, self.cluster)
        state = self.cluster.health.state(self.node)
        self.assertEqual((state.status, state.since, state.error), ("up", 5.0, ""))

        reply = self.http.put(self.path, b"v")
        self.assertEqual(reply.code, 201)
        self.assertEqual(holders(self.cluster, self.key), [self.node])
        self.assertEqual(self.http.get("/health").json()["nodes_up"], 3)

    def test_a_timeout_is_not_a_failure_but_silent_checks_are(self) -> None:
        """
        A node that timed out on a request is still up (it may just be busy):
        the next request goes to it again. Only three health checks in a row
        without an answer mark it down; from then on its keys fail at once
        until a check finds it answering again. (Before overload was told
        apart from failure, the first timeout marked it down.)
        """
        self.cluster.health.mark(self.node, up=True)
        self.assertEqual(self.hang("PUT", self.path, b"v").code, 504)
        self.assertFalse(self.cluster.health.is_down(self.node))
        # Asked again: a node marked down would give 503 at once.
        self.assertEqual(self.hang("PUT", self.path, b"v").code, 504)

        health = self.cluster.health
        for strike in range(1, health.strikes + 1):
            self.assertFalse(health.is_down(self.node), strike)
            round_ = health.check_all()
            self.cluster.clock.advance(health.check_timeout)
            self.successResultOf(round_)
        state = health.state(self.node)
        self.assertEqual(state.status, "down", state)
        self.faults.calls.clear()
        self.assertEqual(self.http.put(self.path, b"v").code, 503)  # no clock advance needed
        self.assertEqual(self.faults.calls, [])

        self.cluster.network.hung.clear()
        self.assertEqual(self.http.put(self.path, b"v").code, 503)
        check_health(self, self.cluster)
        reply = self.http.put(self.path, b"v")
        self.assertEqual(reply.code, 201)
        self.assertEqual(holders(self.cluster, self.key), [self.node])
