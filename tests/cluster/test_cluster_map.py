"""
Tests of L{shardkv.cluster}: the proxy's map view, the CASPaxos proposer over
HTTP and the sync service, against real node apps in a L{MemoryCluster}.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from shardkv.cluster.proposer import MapProposer
from shardkv.cluster.view import MapView
from shardkv.core.clustermap import ClusterMap, bootstrap
from shardkv.core.membership import expect_epoch, stage
from shardkv.core.placement import Ring
from shardkv.core.quorum import QuorumSizes
from shardkv.errors import MapConflict, MapUnavailable
from shardkv.testing.memory import MemoryCluster
from tests.cluster.turns import one_turn
from tests.helpers import NODES_3, shared_ring

SIZES = QuorumSizes(3, 2, 2)
NEW_NODE = "127.0.0.1:8084"


def cluster(nodes: tuple[str, ...] = tuple(NODES_3), seed: int = 0) -> MemoryCluster:
    return MemoryCluster(nodes, ring=shared_ring(nodes), seed=seed)


def proxy(c: MemoryCluster) -> Any:
    """The proxy's StubTreq, typed loosely (treq has no stubs for its methods)."""
    return c.proxy


def bumped(m: ClusterMap, epoch: int) -> ClusterMap:
    return dataclasses.replace(m, epoch=epoch)


# -- the view ------------------------------------------------------------------------


def test_a_provisional_view_takes_any_real_map_then_only_newer_ones_of_its_cluster() -> None:
    view = MapView.of_ring(shared_ring(tuple(NODES_3)), SIZES)
    assert (view.epoch, view.provisional) == (0, True)
    seen: list[int] = []
    view.subscribe(lambda m: seen.append(m.epoch))
    first = bootstrap("a" * 16, dict.fromkeys(NODES_3, 1.0), 3, 2, 2, view.current.vnodes)
    assert view.install(first)
    assert not view.install(first)
    assert not view.install(dataclasses.replace(bumped(first, 5), cluster_id="b" * 16))
    assert view.install(bumped(first, 3))
    assert not view.install(bumped(first, 2))
    assert seen == [1, 3]
    assert (view.epoch, view.provisional) == (3, False)
    assert view.health_json() == {"epoch": 3, "provisional": False}
    assert not view.install_json({"not": "a map"})


def test_a_received_map_with_new_rings_is_installed_once_they_are_built_step_by_step() -> None:
    """
    A map whose rings the view has not built is built a step per reactor turn
    (a proxy's clock), so requests keep the old placement meanwhile instead of
    stalling behind a ring build; L{MapView.settled} fires once it is in. A
    map with rings already built goes in at once, and a map already arriving
    is not built twice.
    """
    clock = Clock()
    ring = shared_ring(tuple(NODES_3))
    view = MapView.from_nodes(NODES_3, SIZES, ring.vnodes, ring, clock=clock)
    same = bootstrap("a" * 16, dict.fromkeys(NODES_3, 1.0), 3, 2, 2, ring.vnodes)
    view.receive(same)
    assert view.epoch == 1 and clock.getDelayedCalls() == []
    grown = stage(same, add=[(NEW_NODE, 1.0)])
    view.receive(grown)
    waiting = view.settled()
    assert view.epoch == 1 and len(clock.getDelayedCalls()) == 1 and not waiting.called
    view.receive(grown)
    assert len(clock.getDelayedCalls()) == 1, "a map already arriving is not built twice"
    turns = 0
    while clock.getDelayedCalls():
        assert view.epoch == 1
        one_turn(clock)
        turns += 1
    assert turns > 100, "the ring is built in many small steps"
    assert view.epoch == 2 and waiting.called
    assert set(view.write_rings()[-1].nodes) == {*NODES_3, NEW_NODE}
    assert view.write_rings()[-1] == Ring([*NODES_3, NEW_NODE], ring.vnodes)
    assert view.settled().called


def test_a_planned_map_is_built_ahead_and_then_installed_at_once() -> None:
    """
    L{MapView.prewarm} builds the rings of the next map (one a plan staged)
    in the background; received once committed, the map goes in at once.
    A map received while its rings are still being built ahead waits for
    that build, hurried, rather than starting a second one.
    """
    clock = Clock()
    ring = shared_ring(tuple(NODES_3))
    view = MapView.from_nodes(NODES_3, SIZES, ring.vnodes, ring, clock=clock)
    first = bootstrap("b" * 16, dict.fromkeys(NODES_3, 1.0), 3, 2, 2, ring.vnodes)
    view.receive(first)
    # Nodes no other test uses: rings are cached process-wide.
    grown = stage(first, add=[("127.0.0.1:8091", 1.0)])
    view.prewarm(grown)
    assert view.epoch == 1 and len(clock.getDelayedCalls()) == 1
    view.prewarm(grown)
    assert len(clock.getDelayedCalls()) == 1, "one build at a time"
    while clock.getDelayedCalls():
        one_turn(clock)
    assert view.epoch == 1, "built ahead, not installed"
    view.receive(grown)
    assert view.epoch == 2 and clock.getDelayedCalls() == []
    assert set(view.write_rings()[-1].nodes) == {*NODES_3, "127.0.0.1:8091"}

    # Received while still being built ahead: the same build, finished.
    again = stage(bumped(first, 5), add=[("127.0.0.1:8092", 1.0)])
    view2 = MapView.from_nodes(NODES_3, SIZES, ring.vnodes, ring, clock=clock)
    view2.receive(bumped(first, 5))
    view2.prewarm(again)
    one_turn(clock)
    view2.receive(again)
    assert view2.epoch == 5 and len(clock.getDelayedCalls()) == 1
    while clock.getDelayedCalls():
        one_turn(clock)
    assert view2.epoch == 6 and view2.settled().called


def test_a_planned_map_of_another_cluster_or_a_past_epoch_is_not_built() -> None:
    clock = Clock()
    ring = shared_ring(tuple(NODES_3))
    view = MapView.from_nodes(NODES_3, SIZES, ring.vnodes, ring, clock=clock)
    first = bootstrap("c" * 16, dict.fromkeys(NODES_3, 1.0), 3, 2, 2, ring.vnodes)
    new = [("127.0.0.1:8093", 1.0)]
    view.prewarm(stage(first, add=new))
    assert clock.getDelayedCalls() == [], "a provisional view has no next epoch"
    view.receive(bumped(first, 3))
    view.prewarm(stage(first, add=new))  # epoch 2: passed
    view.prewarm(stage(bumped(dataclasses.replace(first, cluster_id="d" * 16), 3), add=new))
    assert clock.getDelayedCalls() == []


def test_a_poll_that_sees_a_plan_for_the_next_epoch_builds_its_rings_ahead() -> None:
    """
    A node asked what it would send for a plan says so in ``GET /replica/map``
    (``planned``), until it learns that epoch; a proxy's poll hands a planned
    map of its next epoch to its view (L{MapView.prewarm}), whichever proxy
    staged it, and ignores any other.
    """
    c = cluster()
    m = c.bootstrap()
    seen: list[ClusterMap] = []
    c.view.prewarm = seen.append  # type: ignore[method-assign,assignment]
    planned = stage(m, add=[(NEW_NODE, 1.0)])
    c.nodes[NODES_3[1]].store.mapstore.note_planned(bumped(planned, 3))
    c.pump(c.sync.refresh())
    assert seen == [], "not the next epoch"
    c.nodes[NODES_3[0]].store.mapstore.note_planned(planned)
    c.pump(c.sync.refresh())
    assert seen == [planned]
    for node in c.nodes.values():
        c.pump(node.store.mapstore.learn(bumped(m, 2)))
    answer = c.nodes[NODES_3[0]].store.mapstore.as_json()
    assert "planned" not in answer, "said only until that epoch is learned"


def test_the_view_reuses_a_given_ring() -> None:
    ring = shared_ring(tuple(NODES_3))
    view = MapView.of_ring(ring, SIZES)
    assert view.read_ring() is ring
    assert view.write_rings() == (ring,)
    assert view.nodes() == tuple(sorted(NODES_3))


# -- bootstrap and the proposer ---------------------------------------------------


def test_bootstrap_creates_epoch_1_on_every_node() -> None:
    c = cluster()
    m = c.bootstrap()
    assert m.epoch == 1 and c.view.epoch == 1 and not c.view.provisional
    for node in c.nodes.values():
        assert node.store.mapstore.epoch == 1
    # A second proxy (or a restart) changes nothing: an identity proposal.
    again = c.pump(Deferred.fromCoroutine(c.sync.bootstrap()))
    assert again == m


def _warnings(events: Sequence[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]


def test_a_proxy_started_with_other_replication_options_serves_the_nodes_map_and_says_so() -> None:
    c = cluster()
    c.bootstrap()
    other = c.add_proxy(sizes=QuorumSizes(1, 1, 1))
    with capturedLogs() as events:
        chosen = c.pump(Deferred.fromCoroutine(other.sync.bootstrap()))
        c.pump(Deferred.fromCoroutine(other.sync.bootstrap()))
    assert (chosen.n, chosen.r, chosen.w) == (3, 2, 2)
    assert other.view.placement.sizes == SIZES
    assert _warnings(events) == [
        "ignoring --replicas 1 --r 1 --w 1: the nodes hold the cluster map (epoch 1) "
        "with N=3 R=2 W=2, which this proxy serves"
    ]


def test_a_proxy_started_with_the_maps_own_options_warns_of_nothing() -> None:
    c = cluster()
    with capturedLogs() as events:
        c.bootstrap()
        c.pump(Deferred.fromCoroutine(c.add_proxy().sync.bootstrap()))
    assert _warnings(events) == []


def test_requests_work_before_and_after_bootstrap() -> None:
    c = cluster()
    assert c.pump(proxy(c).put("http://proxy/kv/k", data=b"v")).code == 201
    c.bootstrap()
    reply = c.pump(proxy(c).get("http://proxy/kv/k"))
    assert reply.code == 200
    assert c.pump(reply.content()) == b"v"


def test_no_majority_is_map_unavailable() -> None:
    c = cluster()
    c.network.down.update(NODES_3[:2])
    with pytest.raises(MapUnavailable):
        c.bootstrap()
    assert c.view.provisional


def test_a_change_is_learned_by_every_member() -> None:
    c = cluster()
    m = c.bootstrap()
    c.add_node(NEW_NODE)
    change = lambda cur: stage(expect_epoch(cur, m.epoch), add=[(NEW_NODE, 1.0)])  # noqa: E731
    new = c.pump(Deferred.fromCoroutine(c.proposer.propose(change, c.view.nodes())))
    assert new.epoch == 2
    for node in [*NODES_3, NEW_NODE]:
        assert c.nodes[node].store.mapstore.epoch == 2


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("delay_first", [0.0, 0.001, 0.01])
def test_two_proposers_racing_from_one_epoch_never_both_win(seed: int, delay_first: float) -> None:
    """
    Two proxies stage different changes against epoch 1 at once. Whatever the
    interleaving (the proposers' jitter, and one starting a little later),
    exactly one wins and the other's change function raises MapConflict, and
    every node ends on the winner's map.
    """
    c = cluster(seed=seed)
    m = c.bootstrap()
    # The second proposer (another proxy) reaches the same nodes.
    rival = MapProposer(c.replica_client, "rival", c.clock, random.Random(seed + 7))
    c.add_node(NEW_NODE)
    changes = {
        "add": lambda cur: stage(expect_epoch(cur, m.epoch), add=[(NEW_NODE, 1.0)]),
        "weight": lambda cur: stage(expect_epoch(cur, m.epoch), weights={NODES_3[0]: 2.0}),
    }
    outcomes: dict[str, Any] = {}

    def run(name: str, proposer: Any) -> None:
        d = Deferred.fromCoroutine(proposer.propose(changes[name], list(NODES_3)))
        d.addBoth(lambda r: outcomes.__setitem__(name, r))

    run("add", c.proposer)
    if delay_first:
        c.clock.advance(delay_first)
    run("weight", rival)
    for _ in range(400):
        c.node_http.flush()
        if len(outcomes) == 2:
            break
        c.clock.advance(0.01)
    assert len(outcomes) == 2
    won = [n for n, r in outcomes.items() if isinstance(r, ClusterMap)]
    lost = [n for n, r in outcomes.items() if not isinstance(r, ClusterMap)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    assert outcomes[lost[0]].check(MapConflict)
    winner = outcomes[won[0]]
    assert winner.epoch == 2
    for node in NODES_3:
        assert c.nodes[node].store.mapstore.learned == winner


# -- switching on stale_epoch, and polling -----------------------------------------


def test_a_proxy_behind_switches_on_the_first_stale_epoch_answer() -> None:
    """
    The nodes hold epoch 5; a proxy that never polled (provisional) plans at
    epoch 0, is refused with the map, switches, and the client's write and
    read still succeed.
    """
    c = cluster()
    m = c.bootstrap()
    five = bumped(m, 5)
    for node in c.nodes.values():
        c.pump(node.store.mapstore.learn(five))
    fresh = MemoryCluster(NODES_3, ring=shared_ring(tuple(NODES_3)))
    fresh.nodes = c.nodes
    fresh.dispatch.hosts = c.dispatch.hosts
    assert fresh.view.provisional
    put = fresh.pump(proxy(fresh).put("http://proxy/kv/k", data=b"v"))
    assert put.code == 201, fresh.pump(put.content())
    assert fresh.view.epoch == 5
    assert fresh.coordinator.epoch_retries >= 1
    got = fresh.pump(proxy(fresh).get("http://proxy/kv/k"))
    assert got.code == 200


def test_a_proxy_one_epoch_behind_is_served_in_the_grace_and_fetches_the_map() -> None:
    """
    Nodes that have just learned epoch 2 still take the proxy's calls of epoch
    1 (the fence's grace): the request succeeds with no retry, and the answers'
    notice makes the proxy fetch epoch 2 at once, before any poll.
    """
    c = cluster()
    m = c.bootstrap()
    for node in c.nodes.values():
        c.pump(node.store.mapstore.learn(bumped(m, 2)))
    assert c.view.epoch == 1
    got = c.pump(proxy(c).put("http://proxy/kv/k", data=b"v"))
    assert got.code == 201
    assert c.coordinator.epoch_retries == 0
    c.pump(proxy(c).get("http://proxy/kv/k"))
    assert c.view.epoch == 2


def test_agreed_for_counts_from_the_poll_that_found_every_member_at_the_epoch() -> None:
    c = cluster()
    m = c.bootstrap()
    c.pump(c.sync.refresh())
    assert c.sync.agreed_for(m.epoch) == 0.0
    c.clock.advance(0.5)
    assert c.sync.agreed_for(m.epoch) == 0.5
    assert c.sync.agreed_for(m.epoch + 1) == 0.0


def test_refresh_installs_the_newest_and_pushes_to_the_behind() -> None:
    c = cluster()
    m = c.bootstrap()
    two = bumped(m, 2)
    c.pump(c.nodes[NODES_3[0]].store.mapstore.learn(two))
    assert c.pump(c.sync.refresh()) == two
    assert c.view.epoch == 2
    for node in c.nodes.values():
        assert node.store.mapstore.epoch == 2
    assert c.sync.learned_epochs() == dict.fromkeys(NODES_3, 1) | {NODES_3[0]: 2} or all(
        e is not None for e in c.sync.learned_epochs().values()
    )


def test_the_service_bootstraps_then_serves_a_commit_within_two_seconds() -> None:
    c = cluster()
    service = c.sync.service()
    service.startService()
    for _ in range(20):
        c.node_http.flush()
        c.clock.advance(0.1)
    assert c.view.epoch == 1
    # Another proxy commits epoch 2 at the nodes; this one learns it by polling.
    m = c.view.current
    for node in c.nodes.values():
        c.pump(node.store.mapstore.learn(bumped(m, 2)))
    for _ in range(20):
        c.node_http.flush()
        c.clock.advance(0.1)
    assert c.view.epoch == 2
    service.stopService()


def test_an_unfinished_change_is_settled_by_an_identity_proposal() -> None:
    """A map accepted by a majority but never learned (its proposer died) gets chosen."""
    c = cluster()
    m = c.bootstrap()
    two = bumped(m, 2).to_json()
    ballot = (50, "dead-proxy")
    for node in NODES_3[:2]:
        c.pump(Deferred.fromCoroutine(c.replica_client.prepare(node, ballot)))
        c.pump(Deferred.fromCoroutine(c.replica_client.accept(node, ballot, two)))
    service = c.sync.service()
    service.startService()
    for _ in range(60):
        c.node_http.flush()
        c.clock.advance(0.1)
    service.stopService()
    assert c.view.epoch == 2
    for app in c.nodes.values():
        assert app.store.mapstore.epoch == 2
