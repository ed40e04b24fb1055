"""
Tests for L{shardkv.core.clustermap}: the map's JSON, its strict parsing,
the questions the data path asks of it, and the ring cache.

Every node parses maps from disk and from other processes, so
L{ClusterMap.from_json} must turn anything malformed into L{InvalidMap} and
nothing else; Hypothesis throws arbitrary JSON and mutated maps at it. The
maps under test come from walking random changes with
L{shardkv.core.membership}, so they cover every phase and state.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardkv.core import membership
from shardkv.core.clustermap import (
    ClusterMap,
    Member,
    MemberState,
    Phase,
    bootstrap,
    ring_for,
)
from shardkv.core.placement import Ring
from shardkv.errors import InvalidChange, InvalidMap, MapConflict, UnknownMember
from tests.core.helpers import PROPERTY

NODES = [f"127.0.0.1:{8081 + i}" for i in range(8)]


@st.composite
def cluster_maps(draw: st.DrawFn, vnodes: int = 16) -> ClusterMap:
    """A map reached from a random bootstrap by a few random changes, phases and aborts."""
    size = draw(st.integers(1, 5))
    weights = st.sampled_from([0.5, 1.0, 1.0, 2.0, 3.0])
    nodes = {node: draw(weights) for node in NODES[:size]}
    n = draw(st.integers(1, size))
    r = draw(st.integers(1, n))
    w = draw(st.integers(1, n))
    m = bootstrap("c0ffee", nodes, n, r, w, vnodes)
    for _ in range(draw(st.integers(0, 6))):
        step = draw(st.sampled_from(["stage", "next", "abort"]))
        try:
            if step == "stage":
                live = list(m.current_weights())
                spare = [x for x in NODES if x not in live]
                add = [
                    (x, draw(weights))
                    for x in draw(st.lists(st.sampled_from(spare), unique=True, max_size=2))
                ]
                remove = draw(st.lists(st.sampled_from(live), unique=True, max_size=2))
                kept = [x for x in live if x not in remove]
                reweight = (
                    {
                        x: draw(weights)
                        for x in draw(st.lists(st.sampled_from(kept), unique=True, max_size=2))
                    }
                    if kept
                    else {}
                )
                m = membership.stage(
                    m, add, remove, reweight, rate=draw(st.integers(0, 9)), now_ms=7
                )
            elif step == "next":
                m = membership.next_phase(m)
            else:
                m = membership.abort(m)
        except (MapConflict, UnknownMember, InvalidChange):
            pass
    return m


def test_bootstrap_writes_the_documented_json() -> None:
    m = bootstrap("9f2c", {"127.0.0.1:8082": 2, "127.0.0.1:8081": 1.0}, 3, 2, 2, 32768)
    assert m.to_json() == {
        "cluster_id": "9f2c",
        "epoch": 1,
        "members": [
            {"id": "127.0.0.1:8081", "address": "127.0.0.1:8081", "weight": 1.0, "state": "active"},
            {"id": "127.0.0.1:8082", "address": "127.0.0.1:8082", "weight": 2.0, "state": "active"},
        ],
        "replication": {"n": 3, "r": 2, "w": 2},
        "vnodes": 32768,
        "move": None,
    }
    assert isinstance(m.members[1].weight, float)
    assert m.move is None


@pytest.mark.parametrize(
    ("nodes", "n", "r", "w", "vnodes"),
    [
        ({}, 1, 1, 1, 8),
        ({"a": 0}, 1, 1, 1, 8),
        ({"a": 1}, 1, 2, 1, 8),
        ({"a": 1}, 1, 1, 1, 0),
        ({"": 1}, 1, 1, 1, 8),
    ],
)
def test_bootstrap_checks_its_arguments(
    nodes: dict[str, float], n: int, r: int, w: int, vnodes: int
) -> None:
    with pytest.raises(InvalidMap):
        bootstrap("c", nodes, n, r, w, vnodes)


@PROPERTY
@given(cluster_maps())
def test_json_round_trips(m: ClusterMap) -> None:
    """
    Through real JSON text and back, a map is equal to itself and writes the
    same JSON, so a node that stores and reloads a map holds the same value.
    """
    data = json.loads(json.dumps(m.to_json()))
    again = ClusterMap.from_json(data)
    assert again == m
    assert again.to_json() == data
    assert [x.id for x in m.members] == sorted(x.id for x in m.members)


@PROPERTY
@given(cluster_maps())
def test_states_follow_from_the_rings(m: ClusterMap) -> None:
    """Whatever path led to a map, each state says which rings hold the member."""
    current, previous = m.current_weights(), m.previous_weights()
    assert current
    for x in m.members:
        assert (x.state in (MemberState.JOINING, MemberState.ACTIVE)) == (x.id in current)
        assert (x.state in (MemberState.ACTIVE, MemberState.LEAVING)) == (x.id in previous)
    assert m.acceptors() == tuple(sorted(set(current) | set(previous)))


def test_weights_for_reads_and_writes_by_phase() -> None:
    """
    Copying reads the old ring; handover the new; both write to both rings,
    each needing W acks; cleanup and idle use the new ring alone.
    """
    m = bootstrap("c", {"a": 1, "b": 1, "c": 1}, 3, 2, 2, 8)
    old = {"a": 1.0, "b": 1.0, "c": 1.0}
    new = {"b": 1.0, "c": 1.0, "d": 1.0}
    copying = membership.stage(m, add=[("d", 1)], remove=["a"])
    handover = membership.next_phase(copying)
    cleanup = membership.next_phase(handover)
    idle = membership.next_phase(cleanup)
    assert (m.read_weights(), m.write_weight_sets(), m.previous_weights()) == (old, (old,), old)
    assert copying.read_weights() == old
    assert copying.write_weight_sets() == (old, new)
    assert handover.read_weights() == new
    assert handover.write_weight_sets() == (old, new)
    assert (cleanup.read_weights(), cleanup.write_weight_sets()) == (new, (new,))
    assert (idle.read_weights(), idle.write_weight_sets(), idle.previous_weights()) == (
        new,
        (new,),
        new,
    )
    assert copying.acceptors() == ("a", "b", "c", "d")
    assert idle.acceptors() == ("b", "c", "d")
    assert idle.member("a").state is MemberState.REMOVED
    assert copying.read_ring() == Ring(old, 8)
    assert handover.write_rings() == (Ring(old, 8), Ring(new, 8))


def test_member_lookup() -> None:
    m = bootstrap("c", {"a": 1}, 1, 1, 1, 8)
    assert m.member("a") == Member("a", "a", 1.0, MemberState.ACTIVE)
    assert m.address("a") == "a"
    with pytest.raises(UnknownMember) as caught:
        m.member("z")
    assert caught.value.details == {"member": "z"}


def test_ring_for_builds_each_weight_set_once() -> None:
    """Rings are costly; the same weights in any order give the same ring object."""
    first = ring_for({"a": 1.0, "b": 2.0}, 8)
    assert ring_for({"b": 2.0, "a": 1.0}, 8) is first
    assert first == Ring({"a": 1.0, "b": 2.0}, 8)
    assert ring_for({"a": 1.0, "b": 2.0}, 9) is not first


# --- strict parsing -----------------------------------------------------------------


def valid() -> dict[str, Any]:
    m = bootstrap("c", {"a": 1, "b": 1, "c": 1}, 3, 2, 2, 8)
    return membership.stage(m, add=[("d", 2)], remove=["a"], rate=5, now_ms=9).to_json()


def test_a_copying_map_parses() -> None:
    m = ClusterMap.from_json(valid())
    assert m.move is not None
    assert (m.move.phase, m.move.previous, m.move.rate, m.move.started_ms) == (
        Phase.COPYING,
        {"a": 1.0, "b": 1.0, "c": 1.0},
        5,
        9,
    )
    assert m.member("a").state is MemberState.LEAVING
    assert m.member("d").state is MemberState.JOINING


def _set(path: str, value: object) -> dict[str, Any]:
    data = valid()
    target: Any = data
    *parents, last = path.split(".")
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    if value is _DELETE:
        del target[last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return data


_DELETE = object()

BAD: list[tuple[str, object]] = [
    ("cluster_id", ""),
    ("cluster_id", 5),
    ("epoch", -1),
    ("epoch", 1.0),
    ("epoch", True),
    ("epoch", "3"),
    ("vnodes", 0),
    ("members", {}),
    ("members", []),
    ("members.0", "a"),
    ("members.0.id", ""),
    ("members.0.id", "b"),
    ("members.0.address", None),
    ("members.0.weight", 0),
    ("members.0.weight", -1),
    ("members.0.weight", math.nan),
    ("members.0.weight", math.inf),
    ("members.0.weight", 10**400),
    ("members.0.weight", True),
    ("members.0.weight", "1"),
    ("members.0.state", "gone"),
    ("members.0.state", "joining"),
    ("members.0.state", ["leaving"]),
    ("members.0.extra", 1),
    ("members.3.state", "active"),
    ("replication", [3, 2, 2]),
    ("replication.n", 0),
    ("replication.r", 4),
    ("replication.w", 0),
    ("replication.w", 2.5),
    ("replication.extra", 1),
    ("move", "copying"),
    ("move.phase", "done"),
    ("move.phase", None),
    ("move.previous", {}),
    ("move.previous", []),
    ("move.previous.a", 0),
    ("move.previous.z", 1),
    ("move.previous.d", 1),
    ("move.copy", 1),
    ("move.rate", -1),
    ("move.keys_total", None),
    ("move.bytes_total", 1.5),
    ("move.started_ms", "0"),
    ("move.aborted", "no"),
    ("move.extra", 0),
    ("extra", 0),
    ("epoch", _DELETE),
    ("move", _DELETE),
    ("members.0.state", _DELETE),
    ("move.aborted", _DELETE),
]


@pytest.mark.parametrize(("path", "value"), BAD, ids=[f"{p}={v!r}"[:40] for p, v in BAD])
def test_rejects_a_bad_field(path: str, value: object) -> None:
    with pytest.raises(InvalidMap) as caught:
        ClusterMap.from_json(_set(path, value))
    assert caught.value.message


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        "map",
        {},
        {"members": []},
    ],
)
def test_rejects_what_is_not_a_map(data: object) -> None:
    with pytest.raises(InvalidMap):
        ClusterMap.from_json(data)


def test_states_must_match_the_move() -> None:
    """A joining or leaving member with no move, or a state that contradicts
    the weights, makes a map no node can act on."""
    idle = bootstrap("c", {"a": 1, "b": 1}, 2, 1, 1, 8).to_json()
    idle["members"][0]["state"] = "joining"
    with pytest.raises(InvalidMap, match="no move"):
        ClusterMap.from_json(idle)
    data = valid()
    data["members"][0]["weight"] = 3.0  # leaving "a" with a weight not its previous one
    with pytest.raises(InvalidMap, match="weight"):
        ClusterMap.from_json(data)
    everyone_gone = bootstrap("c", {"a": 1}, 1, 1, 1, 8).to_json()
    everyone_gone["members"][0]["state"] = "removed"
    with pytest.raises(InvalidMap, match="no member"):
        ClusterMap.from_json(everyone_gone)


def test_unsorted_members_are_sorted() -> None:
    data = valid()
    data["members"].reverse()
    assert ClusterMap.from_json(data).to_json() == valid()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


@PROPERTY
@given(json_values)
def test_any_json_is_a_map_or_invalid_map(data: object) -> None:
    with contextlib.suppress(InvalidMap):
        ClusterMap.from_json(data)


def _paths(data: object, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(data, dict):
        for key, value in data.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += _paths(value, (*prefix, index))
    return found


@PROPERTY
@given(cluster_maps(), st.data())
def test_a_mutated_map_parses_or_is_invalid(m: ClusterMap, data: st.DataObject) -> None:
    """
    Replace any one field of a real map with any JSON value: the result is a
    valid map, which then round-trips, or InvalidMap, never another error.
    """
    mutated = copy.deepcopy(m.to_json())
    path = data.draw(st.sampled_from(_paths(mutated)))
    target: Any = mutated
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = data.draw(json_values)
    try:
        parsed = ClusterMap.from_json(mutated)
    except InvalidMap:
        return
    assert ClusterMap.from_json(parsed.to_json()) == parsed
