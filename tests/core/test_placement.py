"""
Tests for L{shardkv.core.placement}: the ring's balance, what moves when
membership changes, weights, lookup cost, preference lists and agreement
between processes.

The quality tests measure over 100k sampled keys (C{key-0} ... C{key-99999}),
assert the bounds the issue sets and print what they measured; run with
C{pytest -s} to see the numbers. Node sets come from Hypothesis: a bound that
held only for the node names we happened to pick would be worth nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from random import Random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardkv.core.placement import (
    DEFAULT_VNODES,
    HASH_SPACE,
    KeyPlacement,
    Ring,
    complete,
    hash_key,
)

KEY_COUNT = 100_000
MAX_OVER_AVERAGE = 1.05
MOVED_OVER_IDEAL = 1.1
WEIGHT_ERROR = 0.05
LOOKUP_BUDGET_US = 5.0
BUILD_BUDGET_S = 1.0

# No example database (the tests must not leave .hypothesis/ in the tree) and
# no deadline: building a ring and placing 100k keys takes a few tenths of a
# second, more on a loaded machine.
QUALITY = settings(
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROPERTY = settings(database=None, deadline=None, max_examples=150)

octets = st.integers(min_value=0, max_value=255)
hosts = st.builds(lambda a, b, c, d: f"{a}.{b}.{c}.{d}", octets, octets, octets, octets)
node_ids = st.builds(lambda host, port: f"{host}:{port}", hosts, st.integers(1, 65535))
keys = st.text(alphabet=st.characters(codec="utf-8")) | st.binary()


def node_sets(size: int) -> st.SearchStrategy[list[str]]:
    return st.lists(node_ids, min_size=size, max_size=size, unique=True)


@cache
def key_hashes() -> tuple[int, ...]:
    """The sample keys' positions, hashed once for every ring in this module."""
    return tuple(hash_key(f"key-{i}") for i in range(KEY_COUNT))


def owners(ring: Ring) -> list[str]:
    return list(map(ring.owner_of_hash, key_hashes()))


def max_over_average(counts: Counter[str], ring: Ring) -> float:
    average = KEY_COUNT / len(ring.nodes)
    return max(counts[node] for node in ring.nodes) / average


@pytest.fixture
def report() -> Iterator[Callable[[str], None]]:
    """Collect lines and print them once the test has run, so C{-s} shows them."""
    lines: list[str] = []
    yield lines.append
    print()
    for line in lines:
        print(f"  [placement] {line}")


# --- quality: balance, movement, weights, cost --------------------------------


@pytest.mark.parametrize(("size", "examples"), [(3, 10), (5, 12), (10, 20)])
def test_balance(size: int, examples: int, report: Callable[[str], None]) -> None:
    """
    For any set of C{size} equal nodes, the busiest node holds at most 1.05 x
    the average number of the 100k sample keys.
    """
    seen: list[float] = []

    @settings(QUALITY, max_examples=examples)
    @given(node_sets(size))
    def check(nodes: list[str]) -> None:
        ring = Ring(nodes)
        ratio = max_over_average(Counter(owners(ring)), ring)
        seen.append(ratio)
        assert ratio <= MAX_OVER_AVERAGE, (nodes, ratio)

    check()
    report(
        f"balance N={size}, {len(seen)} node sets, 100k keys: busiest/average "
        f"worst {max(seen):.4f}, mean {statistics.mean(seen):.4f} (bound {MAX_OVER_AVERAGE})"
    )


@pytest.mark.parametrize(("size", "examples"), [(3, 2), (5, 2), (10, 2)])
def test_movement(size: int, examples: int, report: Callable[[str], None]) -> None:
    """
    Adding a node moves keys only to it, and at most 1.1 x the ideal
    1/(N+1) of them; removing a node moves only its keys, at most 1.1 x 1/N.
    """
    added: list[float] = []
    removed: list[float] = []

    @settings(QUALITY, max_examples=examples)
    @given(node_sets(size + 1), st.integers(min_value=0, max_value=size - 1))
    def check(nodes: list[str], victim: int) -> None:
        *nodes, newcomer = nodes
        ring = Ring(nodes)
        before = owners(ring)

        after = owners(ring.with_node(newcomer))
        moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
        assert {new for _, new in moved} <= {newcomer}
        added.append(len(moved) / KEY_COUNT * (size + 1))
        assert added[-1] <= MOVED_OVER_IDEAL

        gone = nodes[victim]
        after = owners(ring.without_node(gone))
        moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
        assert {old for old, _ in moved} <= {gone}
        assert len(moved) == before.count(gone)
        removed.append(len(moved) / KEY_COUNT * size)
        assert removed[-1] <= MOVED_OVER_IDEAL

    check()
    report(
        f"movement N={size}, {len(added)} node sets: add {size}->{size + 1} moved "
        f"worst {max(added):.3f} x ideal {1 / (size + 1):.2%}, remove {size}->{size - 1} moved "
        f"worst {max(removed):.3f} x ideal {1 / size:.2%}; every moved key moved to the new "
        "node / came from the removed one"
    )


@pytest.mark.parametrize("weight", [0.5, 2.0, 3.0])
def test_weights(weight: float, report: Callable[[str], None]) -> None:
    """
    Among weight-1 nodes, a node of another weight gets a share of the sample
    keys in proportion, within 5 %, and so does every other node.
    """
    worst: list[float] = []

    @settings(QUALITY, max_examples=2)
    @given(st.integers(min_value=3, max_value=6).flatmap(node_sets))
    def check(nodes: list[str]) -> None:
        weights = dict.fromkeys(nodes, 1.0)
        weights[nodes[0]] = weight
        ring = Ring(weights)
        counts = Counter(owners(ring))
        total = sum(weights.values())
        errors = [counts[n] / KEY_COUNT / (weights[n] / total) - 1 for n in nodes]
        exact = ring.shares()
        assert all(abs(exact[n] / (weights[n] / total) - 1) <= WEIGHT_ERROR for n in nodes)
        worst.append(max(map(abs, errors)))
        assert worst[-1] <= WEIGHT_ERROR, (weights, errors)

    check()
    report(
        f"weights, one node of weight {weight} among 2-5 weight-1 nodes, 100k keys: "
        f"worst relative share error {max(worst):.2%} (bound {WEIGHT_ERROR:.0%})"
    )


def test_lookup_cost(report: Callable[[str], None]) -> None:
    """
    On a 10-node ring a lookup, key hashing included, costs at most 5 us.

    The 100k sample keys are timed in chunks of 1000, each chunk's best of
    three rounds counts: a chunk is short enough to often run without being
    preempted, so a loaded machine measures the lookup, not the queue.
    """
    ring = Ring([f"10.0.0.{i}:8081" for i in range(10)])
    sample = [f"key-{i}" for i in range(KEY_COUNT)]
    chunks = [sample[i : i + 1000] for i in range(0, KEY_COUNT, 1000)]

    def per_call(lookup: Callable[[str], object], rounds: int = 3) -> float:
        best = [math.inf] * len(chunks)
        for _ in range(rounds):
            for i, chunk in enumerate(chunks):
                start = time.perf_counter()
                for key in chunk:
                    lookup(key)
                best[i] = min(best[i], time.perf_counter() - start)
        return sum(best) / KEY_COUNT * 1e6

    owner_us = per_call(ring.owner)
    hash_us = per_call(hash_key, rounds=2)
    preference_us = per_call(lambda key: ring.preference_list(key, 3), rounds=2)
    report(
        f"lookup, 10 nodes x {DEFAULT_VNODES} points: owner {owner_us:.2f} us "
        f"(of which hashing {hash_us:.2f} us), preference_list(n=3) {preference_us:.2f} us"
    )
    assert owner_us <= LOOKUP_BUDGET_US


def test_build_cost(report: Callable[[str], None]) -> None:
    """
    Building a 10-node ring takes a few tenths of a second of CPU time (best
    of three; CPU time, because a loaded machine stretches wall time). The
    aim is well under 0.5 s; the assertion only catches a gross regression.
    """
    best_cpu = best_wall = math.inf
    for attempt in range(3):
        nodes = [f"10.1.{attempt}.{i}:8081" for i in range(10)]
        wall, cpu = time.perf_counter(), time.process_time()
        Ring(nodes)
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    report(
        f"build, 10 nodes x {DEFAULT_VNODES} points: {best_cpu * 1e3:.0f} ms CPU, "
        f"{best_wall * 1e3:.0f} ms wall"
    )
    assert best_cpu < BUILD_BUDGET_S


# --- preference lists and explain ---------------------------------------------


@PROPERTY
@given(
    st.integers(min_value=1, max_value=8).flatmap(node_sets),
    st.sampled_from([1, 3, 64, 300]),
    keys,
    st.integers(min_value=1, max_value=10),
)
def test_preference_list(nodes: list[str], vnodes: int, key: str | bytes, n: int) -> None:
    """
    A preference list holds C{min(n, N)} distinct ring nodes, starts with
    the owner, and is a prefix of the list for C{n + 1}.
    """
    ring = Ring(nodes, vnodes=vnodes)
    preference = ring.preference_list(key, n)
    assert len(preference) == min(n, len(nodes))
    assert len(set(preference)) == len(preference)
    assert set(preference) <= set(nodes)
    assert preference[0] == ring.owner(key)
    assert ring.preference_list(key, n + 1)[: len(preference)] == preference


@PROPERTY
@given(
    st.dictionaries(node_ids, st.sampled_from([0.001, 0.3, 1.0, 2.5]), min_size=1, max_size=6),
    keys,
)
def test_preference_list_reaches_every_node(weights: dict[str, float], key: str | bytes) -> None:
    """
    However light a node, a preference list as long as the ring lists it:
    every node has at least one point.
    """
    ring = Ring(weights, vnodes=100)
    assert sorted(ring.preference_list(key, len(weights))) == sorted(weights)
    assert min(ring.vnode_counts().values()) >= 1


@PROPERTY
@given(st.integers(min_value=1, max_value=6).flatmap(node_sets), keys)
def test_explain(nodes: list[str], key: str | bytes) -> None:
    """
    L{Ring.explain} reports the key's hash and the first ring point at or
    after it (wrapping to point 0), and agrees with the other lookups.
    """
    ring = Ring(nodes, vnodes=50)
    placement = ring.explain(key, 3)
    assert isinstance(placement, KeyPlacement)
    assert placement.hash == hash_key(key)
    assert placement.owner == ring.owner(key)
    assert list(placement.preference_list) == ring.preference_list(key, 3)
    points = ring._positions
    assert points[placement.position] == placement.token
    if placement.hash > points[-1]:
        assert placement.position == 0
    else:
        assert placement.token >= placement.hash
        assert placement.position == 0 or points[placement.position - 1] < placement.hash


def test_preference_list_rejects_n_below_one() -> None:
    ring = Ring(["a:1", "b:2"], vnodes=8)
    for n in (0, -1):
        with pytest.raises(ValueError):
            ring.preference_list("k", n)
        with pytest.raises(ValueError):
            ring.explain("k", n)


# --- determinism --------------------------------------------------------------


@settings(PROPERTY, max_examples=40)
@given(
    st.integers(min_value=1, max_value=6).flatmap(node_sets),
    st.randoms(use_true_random=False),
)
def test_node_order_does_not_matter(nodes: list[str], rnd: Random) -> None:
    """
    A ring depends on the set of nodes, not on the order they were listed
    in, nor on whether they came as a list or as a mapping of weights.
    """
    shuffled = list(nodes)
    rnd.shuffle(shuffled)
    first = Ring(nodes, vnodes=40)
    second = Ring(dict.fromkeys(reversed(shuffled), 1.0), vnodes=40)
    assert first == second
    assert hash(first) == hash(second)
    assert second.nodes == tuple(sorted(nodes))
    for i in range(200):
        assert first.explain(f"key-{i}", 3) == second.explain(f"key-{i}", 3)


_OTHER_PROCESS = """
import json, sys
from shardkv.core.placement import Ring
nodes = json.loads(sys.argv[1])
ring = Ring(dict(reversed(list(nodes.items()))))
print(json.dumps([ring.preference_list(f"key-{i}", 3) for i in range(int(sys.argv[2]))]))
"""


def test_same_placement_in_another_process() -> None:
    """
    A process with another C{PYTHONHASHSEED}, given the nodes in another
    order, places keys exactly as this one does: nothing depends on
    Python's per-process C{hash()} or on dict order.
    """
    seed = "1" if os.environ.get("PYTHONHASHSEED") == "0" else "0"
    nodes = {f"10.0.{i}.{7 * i}:{8081 + i}": 1.0 + (i % 2) for i in range(5)}
    count = 2000
    root = Path(__file__).resolve().parents[2]
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": path}
    result = subprocess.run(
        [sys.executable, "-c", _OTHER_PROCESS, json.dumps(nodes), str(count)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    ring = Ring(nodes)
    assert json.loads(result.stdout) == [ring.preference_list(f"key-{i}", 3) for i in range(count)]


def test_layout_is_pinned() -> None:
    """
    Key and point positions are part of the stored data's layout: if they
    change, nodes no longer hold the keys the proxy looks for. These values
    must only change together with a data migration.
    """
    assert hash_key("key-0") == int.from_bytes(
        hashlib.blake2b(b"key-0", digest_size=8).digest(), "big"
    )
    seed = hashlib.shake_128(b"shardkv-ring\x00" + b"10.0.0.1:8081").digest(16)
    two_points = Ring(["10.0.0.1:8081"], vnodes=2).explain("key-0", 1)
    assert two_points.token in {int.from_bytes(seed[:8], "big"), int.from_bytes(seed[8:], "big")}
    ring = Ring(["10.0.0.1:8081", "10.0.0.2:8081", "10.0.0.3:8081"])
    assert ring.explain("key-0", 3) == KeyPlacement(
        hash=9679884382612836663,
        position=51469,
        token=9679910060638660041,
        owner="10.0.0.2:8081",
        preference_list=("10.0.0.2:8081", "10.0.0.3:8081", "10.0.0.1:8081"),
    )


@PROPERTY
@given(keys)
def test_hash_key_range(key: str | bytes) -> None:
    assert 0 <= hash_key(key) < HASH_SPACE
    if isinstance(key, str):
        assert hash_key(key) == hash_key(key.encode("utf-8"))


# --- membership changes and weights as values ---------------------------------


def test_with_and_without_node_are_values() -> None:
    """
    L{Ring.with_node} and L{Ring.without_node} leave the ring alone and
    return rings equal to ones built from scratch.
    """
    ring = Ring(["a:1", "b:1"], vnodes=64)
    bigger = ring.with_node("c:1", 2.0)
    assert ring.nodes == ("a:1", "b:1")
    assert bigger == Ring({"a:1": 1.0, "b:1": 1.0, "c:1": 2.0}, vnodes=64)
    assert bigger.without_node("c:1") == ring
    assert bigger.weight("c:1") == 2.0
    assert bigger.vnodes == 64
    assert [bigger.without_node("c:1").owner(f"k{i}") for i in range(500)] == [
        ring.owner(f"k{i}") for i in range(500)
    ]
    with pytest.raises(ValueError):
        ring.with_node("a:1")
    with pytest.raises(ValueError):
        ring.without_node("z:1")
    with pytest.raises(ValueError):
        Ring(["a:1"]).without_node("a:1")
    with pytest.raises(KeyError):
        ring.weight("z:1")


def test_reweighting_moves_only_what_it_must() -> None:
    """
    Raising a node's weight only adds points to it, so keys only move to
    that node.
    """
    light = Ring({"a:1": 1.0, "b:1": 1.0, "c:1": 1.0}, vnodes=512)
    heavy = Ring({"a:1": 1.7, "b:1": 1.0, "c:1": 1.0}, vnodes=512)
    moved = [
        (old, new) for old, new in zip(owners(light), owners(heavy), strict=True) if old != new
    ]
    assert moved
    assert {new for _, new in moved} == {"a:1"}


def test_shares_and_vnode_counts() -> None:
    """
    Shares are exact fractions of the hash space: they sum to 1 and follow
    the weights; a node gets weight x vnodes points, at least one.
    """
    ring = Ring({"a:1": 1.0, "b:1": 2.0, "c:1": 0.0001}, vnodes=1000)
    assert ring.vnode_counts() == {"a:1": 1000, "b:1": 2000, "c:1": 1}
    shares = ring.shares()
    assert math.isclose(sum(shares.values()), 1.0)
    assert shares["b:1"] / shares["a:1"] == pytest.approx(2.0, rel=0.1)
    assert Ring(["solo:1"], vnodes=3).shares() == {"solo:1": 1.0}
    assert ring.shares() == shares
    counts = Counter(owners(ring))
    for node, share in shares.items():
        assert counts[node] / KEY_COUNT == pytest.approx(share, abs=0.005)


def test_points_are_the_ring() -> None:
    """
    C{points()} lists every point clockwise, each with the owner of the
    position it sits at, and the gaps in front of each node's points add up
    to its share.
    """
    ring = Ring({"a:1": 1.0, "b:1": 2.0}, vnodes=200)
    points = list(ring.points())
    assert len(points) == sum(ring.vnode_counts().values())
    assert [p for p, _ in points] == sorted({p for p, _ in points})
    assert all(ring.owner_of_hash(p) == node for p, node in points)
    gaps = Counter[str]()
    previous = points[-1][0] - HASH_SPACE
    for position, node in points:
        gaps[node] += position - previous
        previous = position
    assert {n: g / HASH_SPACE for n, g in gaps.items()} == pytest.approx(ring.shares())


@pytest.mark.parametrize(
    ("nodes", "vnodes", "error"),
    [
        ([], DEFAULT_VNODES, ValueError),
        ({}, DEFAULT_VNODES, ValueError),
        (["a:1", "a:1"], DEFAULT_VNODES, ValueError),
        ([""], DEFAULT_VNODES, ValueError),
        ({"a:1": 0.0}, DEFAULT_VNODES, ValueError),
        ({"a:1": -1.0}, DEFAULT_VNODES, ValueError),
        ({"a:1": math.nan}, DEFAULT_VNODES, ValueError),
        ({"a:1": math.inf}, DEFAULT_VNODES, ValueError),
        (["a:1"], 0, ValueError),
        ("a:1", DEFAULT_VNODES, TypeError),
    ],
)
def test_rejects_bad_rings(nodes: object, vnodes: int, error: type[Exception]) -> None:
    with pytest.raises(error):
        Ring(nodes, vnodes=vnodes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("nodes", "vnodes", "error"),
    [([], DEFAULT_VNODES, ValueError), ({"a:1": 0.0}, DEFAULT_VNODES, ValueError)],
)
def test_a_stepwise_ring_checks_its_arguments_at_once(
    nodes: object, vnodes: int, error: type[Exception]
) -> None:
    with pytest.raises(error):
        Ring.stepwise(nodes, vnodes=vnodes)  # type: ignore[arg-type]


def test_a_ring_built_step_by_step_is_the_same_ring() -> None:
    """
    L{Ring.stepwise} builds, a small step per C{next()}, exactly the ring
    C{Ring()} builds: the same points, owners and lookup table; the new
    node's points are sorted in parts, and each step is short (a proxy runs
    one per reactor turn, between requests).
    """
    weights = {"a:1": 1.0, "b:1": 2.0, "stepwise-new:1": 1.0}
    steps = Ring.stepwise(weights)
    durations = []
    while True:
        started = time.process_time()
        try:
            next(steps)
        except StopIteration as done:
            stepwise: Ring = done.value
            break
        finally:
            durations.append(time.process_time() - started)
    whole = Ring(weights)
    assert stepwise == whole
    assert list(stepwise.points()) == list(whole.points())
    assert stepwise._slices == whole._slices and stepwise._slice_shift == whole._slice_shift
    assert all(stepwise.owner(f"k{i}") == whole.owner(f"k{i}") for i in range(2000))
    assert len(durations) > 100
    # Most steps take a small fraction of the whole; CPU time, so a busy box does not matter.
    assert sorted(durations)[len(durations) // 2] < sum(durations) / 50
    assert complete(Ring.stepwise(weights)) == whole


def test_small_rings_still_work() -> None:
    """
    With one point per node the ring is badly balanced but still correct: a
    key past the last point wraps around to the first.
    """
    ring = Ring(["a:1", "b:1", "c:1"], vnodes=1)
    assert ring.vnode_counts() == {"a:1": 1, "b:1": 1, "c:1": 1}
    assert sorted(ring.preference_list("k", 5)) == ["a:1", "b:1", "c:1"]
    last = ring._positions[-1]
    wrapped = next(f"k{i}" for i in range(10_000) if hash_key(f"k{i}") > last)
    placement = ring.explain(wrapped, 3)
    assert placement.position == 0
    assert placement.token == ring._positions[0] < placement.hash
    assert placement.owner == ring.owner_of_hash(0)


@PROPERTY
@given(keys, st.integers(1, 4))
def test_preference_of_hash_is_the_keys_preference_list(key: str | bytes, n: int) -> None:
    """
    A caller that hashed a key once gets the same list from the hash as
    from the key, so a move's planner and the data path agree.
    """
    ring = Ring({"a:1": 1.0, "b:1": 2.0, "c:1": 1.0}, vnodes=64)
    assert ring.preference_of_hash(hash_key(key), n) == ring.preference_list(key, n)
    # Past the last point, positions wrap to the first one, as keys do.
    assert ring.preference_of_hash(HASH_SPACE - 1, n) == ring.preference_of_hash(0, n)
    with pytest.raises(ValueError):
        ring.preference_of_hash(hash_key(key), 0)
