"""
Tests of L{MemberAnnouncer}: the proxy's health check also tells each node
the members, when (and only when) the node's report shows another list.
In memory: a L{MemoryCluster} whose nodes forget their members, as a
restarted node does.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from shardkv.node.app import NodeApp
from shardkv.node.members import Members
from shardkv.proxy.health import HealthMonitor
from shardkv.proxy.members import MemberAnnouncer
from shardkv.web.auth import Guard
from tests.helpers import NODES_3, memory_cluster, settle, wait

TOKEN = "cluster-token-0123456789abcdef"


class MemberAnnouncerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cluster = memory_cluster(NODES_3, 2.0)
        for app in self.cluster.nodes.values():
            app.store.members = Members()  # restarted: told nothing yet
        self.announcer = MemberAnnouncer(
            self.cluster.ring.nodes, self.cluster.replica_client.health, self.cluster.replica_client
        )
        self.sent: list[tuple[str, bytes]] = []
        inner = self.cluster.network.inner

        class Recording:
            def request(self, method: str, url: bytes, **kwargs: Any) -> Deferred[Any]:
                outer.sent.append((method, url))
                answer: Deferred[Any] = inner.request(method, url, **kwargs)
                return answer

        outer = self
        self.cluster.network.inner = Recording()

    def check(self, node: str) -> Any:
        """One health check, then everything it set going (the push) to its end."""
        report = wait(self, self.cluster, Deferred.fromCoroutine(self.announcer.check(node)))
        settle(self.cluster)
        return report

    def test_a_node_that_forgot_learns_the_members_once(self) -> None:
        node = NODES_3[0]
        report = self.check(node)
        self.assertIsNone(report["members"], "the check does not wait for the push")
        self.assertEqual(self.cluster.nodes[node].store.members.as_json(), sorted(NODES_3))
        self.assertEqual([m for m, _ in self.sent], ["GET", "PUT"], "a health check, one push")
        self.sent.clear()
        self.assertEqual(self.check(node)["members"], sorted(NODES_3))
        self.assertEqual([m for m, _ in self.sent], ["GET"])
        self.assertEqual(self.announcer.pushes, 1)

    def test_within_one_health_round(self) -> None:
        health = HealthMonitor(self.cluster.ring.nodes, self.announcer.check, self.cluster.clock)
        wait(self, self.cluster, health.check_all())
        settle(self.cluster)
        for node in NODES_3:
            self.assertEqual(health.state(node).status, "up")
            self.assertEqual(self.cluster.nodes[node].store.members.as_json(), sorted(NODES_3))

    def test_a_node_refusing_our_token_fails_its_checks_until_a_push_gets_through(self) -> None:
        """The node answers /health, but every other call would be refused: say so."""
        node = NODES_3[1]
        guarded = NodeApp(self.cluster.nodes[node].store, Guard(TOKEN))
        self.cluster.dispatch.hosts[node.encode()] = guarded.resource()
        health = HealthMonitor(self.cluster.ring.nodes, self.announcer.check, self.cluster.clock)
        for _ in range(3):
            wait(self, self.cluster, health.check_all())
            settle(self.cluster)
            self.assertEqual(health.state(node).status, "down")
            self.assertIn("cluster token", health.state(node).error)
            self.assertNotIn(TOKEN, health.state(node).error)
        self.cluster.dispatch.hosts[node.encode()] = self.cluster.nodes[node].resource()
        wait(self, self.cluster, health.check_all())  # still down; this push gets through
        settle(self.cluster)
        wait(self, self.cluster, health.check_all())
        self.assertEqual(health.state(node).status, "up")

    def test_a_hung_push_does_not_delay_the_check_and_is_tried_again(self) -> None:
        node = NODES_3[2]
        real = self.cluster.network.request

        def hang_members(method: str, url: bytes, **kwargs: Any) -> Deferred[Any]:
            if url.endswith(b"/replica/members"):
                return Deferred()
            return real(method, url, **kwargs)

        self.cluster.network.request = hang_members  # type: ignore[method-assign]
        self.assertIsNone(self.check(node)["members"])
        self.check(node)
        self.assertEqual([m for m, _ in self.sent], ["GET", "GET"], "one push at a time")
        self.cluster.clock.advance(2.5)  # the replica client's deadline ends the push
        self.assertEqual(self.announcer.pushes, 0)
        self.cluster.network.request = real  # type: ignore[method-assign]
        self.check(node)
        self.assertEqual(self.cluster.nodes[node].store.members.as_json(), sorted(NODES_3))
        self.assertEqual(self.announcer.pushes, 1)
