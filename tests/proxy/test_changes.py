"""
L{MembershipAdmin}: staging a plan, paging its keys, commit and abort, over fakes
of the map machinery (L{tests.proxy.admin_fakes}).
"""

from __future__ import annotations

import json
from collections.abc import Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.clustermap import ClusterMap, MemberState, Phase
from shardkv.core.membership import next_phase, stage
from shardkv.errors import (
    ForeignCluster,
    InvalidChange,
    InvalidRequest,
    MapConflict,
    MapUnavailable,
    MemberUnreachable,
    MoveInProgress,
    NoMove,
    NoPlan,
    ShardkvError,
    TooFewMembers,
    TooLateToAbort,
    UnknownMember,
)
from shardkv.proxy.changes import cas_to, parse_change
from tests.proxy.admin_fakes import (
    CLUSTER_ID,
    NEW,
    NODES,
    FakeNodes,
    MapStore,
    Proxy,
    first_map,
    foreign,
    plan_answers,
    stale,
)

T = TypeVar("T")
ADD = json.dumps({"add": [{"address": NEW, "weight": 1}]}).encode()


class ChangeCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = MapStore(first_map())
        self.nodes = FakeNodes()
        plan_answers(self.nodes)
        self.proxy = Proxy(self.store, self.nodes, rate=500)
        self.admin = self.proxy.admin

    def run_(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.successResultOf(self.turned(Deferred.fromCoroutine(coro)))

    def turned(self, d: Deferred[T]) -> Deferred[T]:
        """``d``, after the reactor turns a plan's ring building takes (now due)."""
        clock = self.proxy.clock
        while not d.called and any(c.getTime() <= clock.seconds() for c in clock.calls):
            clock.advance(0)
        return d

    def fails(self, coro: Coroutine[Any, Any, Any], error: type[ShardkvError]) -> ShardkvError:
        failure = self.failureResultOf(self.turned(Deferred.fromCoroutine(coro)))
        value = failure.value
        self.assertIs(type(value), error, failure.getTraceback())
        assert isinstance(value, ShardkvError)
        return value


class ParseChangeTests(SynchronousTestCase):
    def test_a_full_change(self) -> None:
        change = parse_change(
            b'{"add": [{"address": "127.0.0.1:8084", "weight": 2}, {"address": "h:1"}],'
            b' "remove": ["127.0.0.1:8081"], "weights": {"127.0.0.1:8082": 0.5}, "rate": 100}'
        )
        self.assertEqual(change.add, (("127.0.0.1:8084", 2.0), ("h:1", 1.0)))
        self.assertEqual(change.remove, ("127.0.0.1:8081",))
        self.assertEqual(change.weights, {"127.0.0.1:8082": 0.5})
        self.assertEqual(change.rate, 100)
        self.assertEqual(parse_change(b"").add, ())

    def test_malformed_bodies_are_invalid_change(self) -> None:
        bodies = [
            b"{",
            b"\xff",
            b"[" * 100000,
            b"[]",
            b'"add"',
            b'{"adds": []}',
            b'{"add": {}}',
            b'{"add": ["127.0.0.1:8084"]}',
            b'{"add": [{"address": "127.0.0.1:8084", "id": "x"}]}',
            b'{"add": [{"address": 8084}]}',
            b'{"add": [{"address": "http://127.0.0.1:8084"}]}',
            b'{"add": [{"address": "127.0.0.1"}]}',
            b'{"add": [{"address": "127.0.0.1:99999"}]}',
            b'{"add": [{"address": "a b:1"}]}',
            b'{"add": [{"address": "h:1"}, {"address": "h:1"}]}',
            b'{"add": [{"address": "h:1", "weight": 0}]}',
            b'{"add": [{"address": "h:1", "weight": -1}]}',
            b'{"add": [{"address": "h:1", "weight": "1"}]}',
            b'{"add": [{"address": "h:1", "weight": true}]}',
            b'{"add": [{"address": "h:1", "weight": 1e9}]}',
            b'{"add": [{"address": "h:1", "weight": NaN}]}',
            b'{"remove": "127.0.0.1:8081"}',
            b'{"remove": [1]}',
            b'{"remove": [""]}',
            b'{"remove": ["a", "a"]}',
            b'{"weights": []}',
            b'{"weights": {"a": null}}',
            b'{"rate": -1}',
            b'{"rate": 1.5}',
            b'{"rate": true}',
        ]
        for body in bodies:
            with self.assertRaises(InvalidChange, msg=body[:60]) as caught:
                parse_change(body)
            self.assertEqual(caught.exception.code, "invalid_change")


class PlanTests(ChangeCase):
    def test_plan_adding_a_node(self) -> None:
        answer = self.run_(self.admin.plan(ADD))
        self.assertEqual(answer["base_epoch"], 1)
        target = ClusterMap.from_json(answer["map"])
        self.assertEqual(target.epoch, 2)
        assert target.move is not None
        self.assertEqual(target.move.phase, Phase.COPYING)
        self.assertEqual(target.member(NEW).state, MemberState.JOINING)
        self.assertEqual(
            answer["pairs"],
            [
                {"from": n, "to": NEW, "keys": 10 + i, "bytes": 1000 + i}
                for i, n in enumerate(NODES)
            ],
        )
        self.assertEqual(answer["keys_moving"], 33)
        self.assertEqual(answer["bytes_moving"], 3003)
        self.assertEqual(answer["keys_total"], 300)
        self.assertAlmostEqual(answer["fraction"], 0.11)
        self.assertAlmostEqual(answer["ideal_fraction"], 0.25)
        self.assertEqual(set(answer["shares"]["before"]), set(NODES))
        self.assertEqual(set(answer["shares"]["after"]), {*NODES, NEW})
        self.assertAlmostEqual(sum(answer["shares"]["after"].values()), 1.0, places=4)
        self.assertEqual(answer["weights"]["after"][NEW], 1.0)
        # The move carries the plan's totals and the proxy's --rebalance-rate.
        self.assertEqual((target.move.keys_total, target.move.bytes_total), (33, 3003))
        self.assertEqual(target.move.rate, 500)
        # Nothing is installed; the new node was asked for its map, the old ring for plans.
        self.assertEqual(self.store.value.epoch, 1)
        self.assertEqual(
            sorted(self.nodes.calls), sorted([("map", NEW)] + [("plan", n) for n in NODES])
        )
        assert self.admin.staged is not None
        self.assertEqual(self.admin.staged.base_epoch, 1)

    def test_a_plan_may_set_its_own_rate(self) -> None:
        body = json.dumps({"add": [{"address": NEW}], "rate": 7}).encode()
        answer = self.run_(self.admin.plan(body))
        self.assertEqual(answer["map"]["move"]["rate"], 7)

    def test_plan_refreshes_the_map_first(self) -> None:
        """A proxy that has not polled yet still plans against the newest epoch."""
        newer = next_phase(next_phase(next_phase(stage(first_map(), weights={NODES[0]: 2}))))
        self.store.value = newer
        answer = self.run_(self.admin.plan(ADD))
        self.assertEqual(answer["base_epoch"], newer.epoch)
        self.assertEqual(self.proxy.view.current, newer)

    def test_a_new_plan_replaces_the_staged_one(self) -> None:
        self.run_(self.admin.plan(ADD))
        self.run_(self.admin.plan(b'{"weights": {"127.0.0.1:8081": 2}}'))
        assert self.admin.staged is not None
        self.assertNotIn(NEW, self.admin.staged.target.current_weights())

    def test_removal_and_reweight(self) -> None:
        body = json.dumps(
            {"add": [{"address": NEW}], "remove": [NODES[0]], "weights": {NODES[1]: 2}}
        ).encode()
        answer = self.run_(self.admin.plan(body))
        self.assertEqual(answer["weights"]["after"], {NODES[1]: 2.0, NODES[2]: 1.0, NEW: 1.0})
        states = {m["id"]: m["state"] for m in answer["map"]["members"]}
        self.assertEqual(states[NODES[0]], "leaving")

    def test_errors(self) -> None:
        self.fails(self.admin.plan(b"{"), InvalidChange)
        self.fails(self.admin.plan(b"{}"), InvalidChange)
        self.fails(self.admin.plan(b'{"remove": ["127.0.0.1:9999"]}'), UnknownMember)
        self.fails(self.admin.plan(b'{"remove": ["127.0.0.1:8081"]}'), TooFewMembers)
        self.fails(self.admin.plan(b'{"add": [{"address": "127.0.0.1:8081"}]}'), InvalidChange)
        self.assertIsNone(self.admin.staged)
        self.assertEqual(self.nodes.calls, [])

    def test_a_plan_while_a_move_runs(self) -> None:
        self.store.value = stage(first_map(), weights={NODES[0]: 2})
        self.fails(self.admin.plan(ADD), MoveInProgress)

    def test_an_unreachable_new_node(self) -> None:
        self.nodes.down.add(NEW)
        error = self.fails(self.admin.plan(ADD), MemberUnreachable)
        self.assertEqual(error.details["members"], [NEW])
        self.assertIn(NEW, error.message)
        self.assertIsNone(self.admin.staged)
        self.assertNotIn("plan", [what for what, _ in self.nodes.calls])

    def test_a_new_node_of_another_cluster(self) -> None:
        for answer in (
            {"node": NEW, "learned": None, "accepted_epoch": 3, "cluster_id": "0000"},
            {"node": NEW, "learned": {"cluster_id": "0000"}, "accepted_epoch": 3},
        ):
            self.nodes.maps[NEW] = answer
            error = self.fails(self.admin.plan(ADD), ForeignCluster)
            self.assertEqual(error.details["member"], NEW)
        self.assertIsNone(self.admin.staged)

    def test_a_new_node_that_was_ours_may_return(self) -> None:
        self.nodes.maps[NEW] = {
            "node": NEW,
            "learned": first_map().to_json(),
            "accepted_epoch": 1,
            "cluster_id": CLUSTER_ID,
        }
        self.run_(self.admin.plan(ADD))

    def test_an_unreachable_old_node(self) -> None:
        self.nodes.down.add(NODES[1])
        error = self.fails(self.admin.plan(ADD), MemberUnreachable)
        self.assertEqual(error.details["members"], [NODES[1]])
        self.assertIsNone(self.admin.staged)

    def test_an_old_node_with_a_newer_map(self) -> None:
        self.nodes.refuse[NODES[2]] = stale(NODES[2])
        self.fails(self.admin.plan(ADD), MapConflict)
        self.nodes.refuse[NODES[2]] = foreign(NODES[2])
        self.fails(self.admin.plan(ADD), ForeignCluster)

    def test_no_map_yet(self) -> None:
        self.proxy.sync.fail = MapUnavailable("no majority")
        self.fails(self.admin.plan(ADD), MapUnavailable)
        self.proxy.sync.fail = None
        self.proxy.sync.stale = True
        self.proxy.view.provisional = True
        self.fails(self.admin.plan(ADD), MapUnavailable)


class PlanKeysTests(ChangeCase):
    def test_pages_through_a_node(self) -> None:
        self.fails(self.admin.plan_keys(NODES[0], NEW), NoPlan)
        self.run_(self.admin.plan(ADD))
        self.nodes.keys[(NODES[0], NEW)] = {"keys": ["a", "b"], "cursor": "b"}
        answer = self.run_(self.admin.plan_keys(NODES[0], NEW, "", 2))
        self.assertEqual(answer, {"keys": ["a", "b"], "cursor": "b"})
        self.assertEqual(
            self.run_(self.admin.plan_keys(NODES[1], NEW)), {"keys": [], "cursor": None}
        )

    def test_errors(self) -> None:
        self.run_(self.admin.plan(ADD))
        self.fails(self.admin.plan_keys(NEW, NODES[0]), UnknownMember)
        self.fails(self.admin.plan_keys(NODES[0], "127.0.0.1:9"), UnknownMember)
        self.fails(self.admin.plan_keys(NODES[0], NEW, "", 0), InvalidRequest)
        self.fails(self.admin.plan_keys(NODES[0], NEW, "", 1001), InvalidRequest)
        self.nodes.down.add(NODES[0])
        self.fails(self.admin.plan_keys(NODES[0], NEW), MemberUnreachable)
        self.nodes.down.clear()
        self.nodes.refuse[NODES[0]] = stale(NODES[0])
        self.fails(self.admin.plan_keys(NODES[0], NEW), MapConflict)


class CommitTests(ChangeCase):
    def test_commit_installs_the_staged_map(self) -> None:
        self.fails(self.admin.commit(), NoPlan)
        planned = self.run_(self.admin.plan(ADD))
        self.proxy.clock.advance(12.5)
        answer = self.run_(self.admin.commit())
        self.assertEqual(answer["epoch"], 2)
        installed = self.store.value
        self.assertEqual(installed.epoch, 2)
        self.assertEqual(answer["map"], installed.to_json())
        self.assertEqual(self.proxy.view.current, installed)
        assert installed.move is not None
        self.assertEqual(installed.move.started_ms, 12500)
        self.assertEqual(installed.member(NEW).state, MemberState.JOINING)
        self.assertEqual(
            {k: v for k, v in answer["map"].items() if k != "move"},
            {k: v for k, v in planned["map"].items() if k != "move"},
        )
        self.assertEqual(answer["rebalance"]["state"], "copying")
        self.assertEqual(answer["rebalance"]["keys_total"], 33)
        self.assertEqual(self.proxy.proposer.calls, [list(NODES)])
        self.assertIsNone(self.admin.staged)
        self.fails(self.admin.commit(), NoPlan)

    def test_the_barrier_needs_every_member_at_the_epoch(self) -> None:
        self.run_(self.admin.plan(ADD))
        self.proxy.sync.behind = {NODES[1]: None, NODES[2]: 0}
        error = self.fails(self.admin.commit(), MemberUnreachable)
        self.assertEqual(error.details["members"], [NODES[1], NODES[2]])
        self.assertEqual(self.store.value.epoch, 1)
        self.assertIsNotNone(self.admin.staged, "the plan may be committed once they are back")
        self.proxy.sync.behind = {}
        self.assertEqual(self.run_(self.admin.commit())["epoch"], 2)

    def test_two_plans_committed_through_two_proxies(self) -> None:
        """Exactly one wins; the other gets map_conflict, and nothing of it is installed."""
        other = Proxy(self.store, self.nodes)
        self.run_(self.admin.plan(ADD))
        self.run_(other.admin.plan(b'{"weights": {"127.0.0.1:8081": 2}}'))
        self.run_(self.admin.commit())
        self.fails(other.admin.commit(), MapConflict)
        self.assertIn(NEW, self.store.value.current_weights())
        self.assertEqual(self.store.value.member(NODES[0]).weight, 1.0)

    def test_the_race_is_decided_by_the_compare_and_set(self) -> None:
        """Even a proxy that has not heard of the winner yet loses at the CAS."""
        other = Proxy(self.store, self.nodes)
        self.run_(self.admin.plan(ADD))
        self.run_(other.admin.plan(b'{"weights": {"127.0.0.1:8081": 2}}'))
        self.run_(self.admin.commit())
        other.sync.stale = True
        self.fails(other.admin.commit(), MapConflict)
        self.assertEqual(self.store.value.epoch, 2)
        self.assertIn(NEW, self.store.value.current_weights())

    def test_a_retried_change_keeps_its_own_value(self) -> None:
        """The proposer may run a change again over the value it just accepted."""
        base = first_map()
        wanted = stage(base, add=[(NEW, 1.0)])
        change = cas_to(base.epoch, wanted)
        self.assertIs(change(base), wanted)
        again = ClusterMap.from_json(wanted.to_json())
        self.assertIs(change(again), again)
        with self.assertRaises(MapConflict):
            change(stage(base, weights={NODES[0]: 2}))
        with self.assertRaises(MapConflict):
            change(None)


class AbortTests(ChangeCase):
    def test_abort_from_copying(self) -> None:
        self.fails(self.admin.abort(), NoMove)
        self.run_(self.admin.plan(ADD))
        self.run_(self.admin.commit())
        answer = self.run_(self.admin.abort())
        self.assertEqual(answer["epoch"], 3)
        m = self.store.value
        self.assertEqual(answer["map"], m.to_json())
        assert m.move is not None
        self.assertEqual((m.move.phase, m.move.aborted), (Phase.HANDOVER, True))
        self.assertEqual(m.member(NEW).state, MemberState.LEAVING)
        self.assertEqual(self.proxy.view.current, m)

    def test_too_late_in_cleanup(self) -> None:
        self.store.value = next_phase(next_phase(stage(first_map(), add=[(NEW, 1.0)])))
        self.fails(self.admin.abort(), TooLateToAbort)
        self.assertEqual(self.store.value.epoch, 4)

    def test_abort_follows_a_phase_that_moved_meanwhile(self) -> None:
        """A rebalancer that advances the phase between refresh and CAS costs a retry."""
        self.store.value = stage(first_map(), add=[(NEW, 1.0)])
        proposer = self.proxy.proposer
        real = proposer.propose
        moved: list[bool] = []

        async def racing(change: Any, acceptors: Any) -> ClusterMap:
            if not moved:
                moved.append(True)
                self.store.value = next_phase(self.store.value)  # handover, epoch 3
            return await real(change, acceptors)

        proposer.propose = racing  # type: ignore[method-assign]
        answer = self.run_(self.admin.abort())
        self.assertEqual(answer["epoch"], 4)
        m = self.store.value
        assert m.move is not None
        self.assertEqual((m.move.phase, m.move.copy, m.move.aborted), (Phase.COPYING, False, True))
