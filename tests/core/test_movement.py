"""
Tests for L{shardkv.core.movement}: which keys a move copies, from where to
where, and which arcs of the ring change hands.

Hypothesis draws a cluster and a change (add, remove, reweight, or several
at once) and an N up to the cluster size, and checks over a sample of keys
that the planner moves exactly the keys whose preference set changes, that
the copies it plans make up the new replica set, and that the copies moved
stay within 1.1 x the ideal fraction. Rings here have 2048 points per node:
few enough to build in milliseconds, enough for the share of each node to
be within a few percent.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import cache
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardkv.core.clustermap import ClusterMap, bootstrap
from shardkv.core.membership import ideal_fraction, next_phase, stage
from shardkv.core.movement import KeyMove, MovePlanner, RangeChange, changed_ranges, owns
from shardkv.core.placement import DEFAULT_VNODES, HASH_SPACE, Ring, hash_key
from tests.core.helpers import PROPERTY

VNODES = 2048
SAMPLE = 3000
MOVED_OVER_IDEAL = 1.1
SAMPLING_SLACK = 0.02
POOL = [f"10.0.0.{i}:8081" for i in range(1, 10)]


@cache
def sample() -> tuple[int, ...]:
    return tuple(hash_key(f"key-{i}") for i in range(SAMPLE))


@cache
def ring(weights: tuple[tuple[str, float], ...], vnodes: int = VNODES) -> Ring:
    return Ring(dict(weights), vnodes)


def frozen(weights: dict[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted(weights.items()))


Change = tuple[dict[str, float], dict[str, float], int, int, bool]


@st.composite
def changes(draw: st.DrawFn) -> Change:
    """Weights before and after a change, N and W that fit both, and whether
    the change is of one kind only (see L{test_the_planner_moves_exactly_what_changes})."""
    weight = st.sampled_from([1.0, 1.0, 2.0])
    size = draw(st.integers(2, 6))
    before = {node: draw(weight) for node in POOL[:size]}
    after = dict(before)
    kind = draw(st.sampled_from(["add", "remove", "reweight", "mixed"]))
    if kind in ("add", "mixed"):
        for node in POOL[size : size + draw(st.integers(1, 2))]:
            after[node] = draw(weight)
    if kind in ("remove", "mixed"):
        for node in draw(
            st.lists(st.sampled_from(list(before)), min_size=1, max_size=2, unique=True)
        ):
            if len(after) > 1:
                del after[node]
    if kind in ("reweight", "mixed"):
        node = draw(st.sampled_from(sorted(after)))
        after[node] = draw(st.sampled_from([0.5, 1.5, 2.0, 3.0]).filter(lambda w: w != after[node]))
    n = draw(st.integers(1, min(3, len(before), len(after))))
    w = draw(st.integers(1, n))
    return before, after, n, w, kind != "mixed"


@settings(PROPERTY, max_examples=40)
@given(changes())
def test_the_planner_moves_exactly_what_changes(change: Change) -> None:
    """
    Exactly the keys whose preference set changes move, each to the nodes
    that join its set, from its first N - W + 1 old replicas.

    The copies moved stay within 1.1 x the least that reaches the same
    per-node loads, and within 1.1 x L{ideal_fraction} (from weights)
    where the loads follow the weights: with N = 1, or equal weights. With
    N > 1 and unequal weights a node holds at most one copy of a key, so
    heavy nodes hold less than their weight's share of the copies, light
    ones more, and the weights understate what a light newcomer receives.

    Both bounds hold for a change of one kind (adding nodes, removing nodes,
    or reweighting one). A change that mixes kinds may move more on any
    ring: when a member is removed while another loses weight, the second
    takes some of the first's keys and hands its own to a third, so the
    test only checks what moves, not how much.
    """
    before, after, n, w, single_kind = change
    old_ring, new_ring = ring(frozen(before)), ring(frozen(after))
    planner = MovePlanner(old_ring, new_ring, n, w)
    copies = 0
    load_before: Counter[str] = Counter()
    load_after: Counter[str] = Counter()
    for position in sample():
        old = old_ring.preference_of_hash(position, n)
        new = new_ring.preference_of_hash(position, n)
        load_before.update(old)
        load_after.update(new)
        move = planner.for_hash(position)
        if set(old) == set(new):
            assert move is None
            continue
        assert move is not None
        assert move.sources == tuple(old[: n - w + 1])
        assert move.primary == old[0]
        assert set(move.destinations) | (set(old) & set(new)) == set(new)
        assert set(move.drops) | (set(old) & set(new)) == set(old)
        assert not set(move.destinations) & set(old)
        assert not set(move.drops) & set(new)
        assert list(move.destinations) == [x for x in new if x not in old]
        copies += len(move.destinations)
    if not single_kind:
        return
    total = len(sample()) * n
    moved = copies / total
    # The least any placement could move to reach the loads this ring reaches.
    least = sum(max(0, load_after[x] - load_before[x]) for x in load_after) / total
    assert moved <= MOVED_OVER_IDEAL * least + SAMPLING_SLACK, (before, after, n, moved, least)
    if n == 1 or len(set(before.values()) | set(after.values())) == 1:
        # Then the loads follow the weights, so the ideal from weights applies.
        ideal = ideal_fraction(before, after)
        assert moved <= MOVED_OVER_IDEAL * ideal + SAMPLING_SLACK, (before, after, n, moved, ideal)


@pytest.mark.parametrize(("size", "added"), [(3, 1), (4, 1), (3, 2)])
def test_adding_equal_nodes_moves_about_the_ideal(size: int, added: int) -> None:
    """
    The moved fraction is bounded from below too: adding k nodes to n moves
    close to k / (n + k) of the copies, not less (the planner does not skip
    copies the new nodes need).
    """
    before = dict.fromkeys(POOL[:size], 1.0)
    after = dict.fromkeys(POOL[: size + added], 1.0)
    planner = MovePlanner(ring(frozen(before)), ring(frozen(after)), 3, 2)
    moves = [planner.for_hash(p) for p in sample()]
    moved = sum(len(m.destinations) for m in moves if m is not None) / (SAMPLE * 3)
    assert moved == pytest.approx(added / (size + added), abs=SAMPLING_SLACK)


def test_a_key_move_is_explicit() -> None:
    """One hand-checked key: adding a node to three with N=3, W=2."""
    before = {"a:1": 1.0, "b:1": 1.0, "c:1": 1.0}
    old_ring, new_ring = ring(frozen(before)), ring(frozen({**before, "d:1": 1.0}))
    planner = MovePlanner(old_ring, new_ring, 3, 2)
    key = next(f"k{i}" for i in range(1000) if planner.for_key(f"k{i}") is not None)
    old = old_ring.preference_list(key, 3)
    new = new_ring.preference_list(key, 3)
    (dropped,) = set(old) - set(new)
    assert planner.for_key(key) == KeyMove(tuple(old[:2]), ("d:1",), (dropped,))
    assert planner.for_key(key.encode()) == planner.for_key(key)


def test_a_planner_between_equal_rings_moves_nothing() -> None:
    same = ring(frozen({"a:1": 1.0, "b:1": 1.0}))
    planner = MovePlanner(same, Ring({"b:1": 1.0, "a:1": 1.0}, VNODES), 2, 1)
    assert all(planner.for_hash(p) is None for p in sample()[:100])
    with pytest.raises(ValueError):
        MovePlanner(same, same, 2, 3)
    with pytest.raises(ValueError):
        MovePlanner(same, same, 0, 0)


def test_for_map_uses_the_moves_rings() -> None:
    m = bootstrap("c", {"a:1": 1, "b:1": 1, "c:1": 1}, 2, 1, 2, 64)
    copying = stage(m, add=[("d:1", 1)])
    planner = MovePlanner.for_map(copying)
    reference = MovePlanner(
        Ring(m.current_weights(), 64), Ring(copying.current_weights(), 64), 2, 2
    )
    assert [planner.for_hash(p) for p in sample()] == [reference.for_hash(p) for p in sample()]
    idle: ClusterMap = next_phase(next_phase(next_phase(copying)))
    assert all(MovePlanner.for_map(idle).for_hash(p) is None for p in sample())


def test_owns() -> None:
    r = ring(frozen({"a:1": 1.0, "b:1": 1.0, "c:1": 1.0}))
    for position in sample()[:200]:
        preference = r.preference_of_hash(position, 2)
        for node in r.nodes:
            assert owns(r, 2, node, position) == (node in preference)


# --- changed ranges ---------------------------------------------------------------


def check_ranges(
    previous: Ring, current: Ring, n: int, positions: Iterator[int]
) -> list[RangeChange]:
    ranges = list(changed_ranges(previous, current, n))
    for a, b in pairwise(ranges):
        assert a.end <= b.start
        if a.end == b.start:
            assert (a.old, a.new) != (b.old, b.new)  # adjacent equal arcs are merged
    for r in ranges:
        assert 0 <= r.start < r.end <= HASH_SPACE
        assert set(r.old) != set(r.new)

    def find(position: int) -> RangeChange | None:
        for r in ranges:
            if r.start <= position < r.end:
                return r
        return None

    for position in positions:
        old = tuple(previous.preference_of_hash(position, n))
        new = tuple(current.preference_of_hash(position, n))
        found = find(position)
        if set(old) == set(new):
            assert found is None, position
        else:
            assert found is not None and (found.old, found.new) == (old, new), position
    return ranges


@settings(PROPERTY, max_examples=30)
@given(changes())
def test_changed_ranges_cover_exactly_the_changed_positions(change: Change) -> None:
    """
    Every position, including both sides of every range edge and of every
    ring point, is in a range exactly when its preference set changes, and
    that range names its old and new preference lists.
    """
    before, after, n, _, _ = change
    previous, current = Ring(before, 8), Ring(after, 8)
    ranges = list(changed_ranges(previous, current, n))
    edges = [e for r in ranges for e in (r.start, r.end - 1, r.start - 1, r.end)]
    points = [p + d for p in previous._positions for d in (-1, 0, 1)]
    probes = [
        p for p in [0, HASH_SPACE - 1, *edges, *points, *sample()[:500]] if 0 <= p < HASH_SPACE
    ]
    check_ranges(previous, current, n, iter(probes))


def test_the_arc_across_zero_is_split() -> None:
    """
    Positions after the last point belong to the first point, so when the
    first point changes hands the change shows at both ends of the space.
    """
    previous = Ring({"a:1": 1.0, "b:1": 1.0}, 4)
    for extra in (f"c{i}:1" for i in range(200)):
        current = previous.with_node(extra)
        if current.owner_of_hash(0) == extra and current.owner_of_hash(HASH_SPACE - 1) == extra:
            break
    else:
        pytest.fail("no node took the arc across zero")
    ranges = check_ranges(previous, current, 1, iter([0, 1, HASH_SPACE - 1, HASH_SPACE - 2]))
    assert ranges[0].start == 0
    assert ranges[-1].end == HASH_SPACE
    assert ranges[0].new == ranges[-1].new == (extra,)


def test_no_ranges_between_equal_rings() -> None:
    same = Ring({"a:1": 1.0, "b:1": 2.0}, 8)
    assert list(changed_ranges(same, Ring({"b:1": 2.0, "a:1": 1.0}, 8), 2)) == []


# --- cost ---------------------------------------------------------------------------


@pytest.fixture
def report() -> Iterator[Callable[[str], None]]:
    lines: list[str] = []
    yield lines.append
    print()
    for line in lines:
        print(f"  [movement] {line}")


def test_planner_cost(report: Callable[[str], None]) -> None:
    """
    A node asks the planner about every record it holds, so it must be
    cheap: for 4 nodes at the default vnodes a few microseconds a key (the
    docstring of L{shardkv.core.movement} quotes the figure). The bound is
    loose, to stay green on a loaded machine.
    """
    three = dict.fromkeys(POOL[:3], 1.0)
    previous, current = Ring(three, DEFAULT_VNODES), Ring({**three, POOL[3]: 1.0}, DEFAULT_VNODES)
    planner = MovePlanner(previous, current, 3, 2)
    keys = [f"key-{i}" for i in range(20_000)]
    positions = [hash_key(k) for k in keys]
    best_hash = best_key = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for p in positions:
            planner.for_hash(p)
        best_hash = min(best_hash, time.perf_counter() - start)
        start = time.perf_counter()
        for k in keys:
            planner.for_key(k)
        best_key = min(best_key, time.perf_counter() - start)
    per_hash, per_key = best_hash / len(keys) * 1e6, best_key / len(keys) * 1e6
    report(f"planner, 3 -> 4 nodes, N=3: {per_hash:.2f} us per position, {per_key:.2f} us per key")
    assert per_hash < 25
