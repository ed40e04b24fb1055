"""What a move copies: for each key, who sends it, who receives it, who drops it.

A node in a move scans its own records and asks L{MovePlanner.for_hash}
about each; the answer depends only on the two rings, so every node and the
proxy's plan agree on every key without talking to each other.

Why C{n - w + 1} sources: a write acknowledged under the old ring is on at
least W of the key's N old replicas, so any C{n - w + 1} of them include
one that holds it. Each of the first C{n - w + 1} old replicas sends its
copy to every destination, and the receiver keeps the newer version, so
every destination ends with the newest acknowledged write (the dual writes
of the move cover whatever is written after the scan). The first old
replica is the key's I{primary} source: plans and progress count its
copies only, so that a key is counted once per destination.

Cost: L{MovePlanner.for_hash} places the position on both rings and
compares the two lists, allocating nothing more when they are equal. For
3 -> 4 nodes at the default 32768 vnodes with N=3 (75 % of keys change
their set) it takes 2.8-3.0 us per position, 3.5-4.4 us per key with
the hash (C{pytest -s tests/core/test_movement.py -k cost}), so planning
a node's 100k records costs about 0.3 s of CPU: far below the move rate.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise

from shardkv.core.clustermap import ClusterMap, ring_steps
from shardkv.core.placement import HASH_SPACE, Ring, Steps, hash_key


@dataclass(frozen=True, slots=True)
class KeyMove:
    """The copies one key needs: every source sends to every destination;
    the drops are old replicas that no longer hold it after cleanup."""

    sources: tuple[str, ...]
    destinations: tuple[str, ...]
    drops: tuple[str, ...]

    @property
    def primary(self) -> str:
        """The source whose copies plans and progress count."""
        return self.sources[0]


class MovePlanner:
    """Answers L{KeyMove}s for keys between two rings (previous -> current)."""

    __slots__ = ("_current", "_n", "_previous", "_same", "_sources")

    def __init__(self, previous: Ring, current: Ring, n: int, w: int) -> None:
        if n < 1 or not 1 <= w <= n:
            raise ValueError(f"need 1 <= w <= n, not n={n}, w={w}")
        self._previous = previous
        self._current = current
        self._n = n
        self._sources = n - w + 1
        self._same = previous == current

    @classmethod
    def for_map(cls, m: ClusterMap) -> MovePlanner:
        """The planner of C{m}'s move (between moves every answer is None)."""
        return cls(m.previous_ring(), m.current_ring(), m.n, m.w)

    @classmethod
    def steps_for_map(cls, m: ClusterMap) -> Steps[MovePlanner]:
        """L{for_map}, its rings built a step at a time (L{ring_steps}): a node
        builds them on its reactor between requests."""
        previous = yield from ring_steps(m.previous_weights(), m.vnodes)
        current = yield from ring_steps(m.current_weights(), m.vnodes)
        return cls(previous, current, m.n, m.w)

    def for_hash(self, position: int) -> KeyMove | None:
        """The copies for the key at C{position} (from L{hash_key}), or None if
        its preference set does not change: then nothing is copied or dropped,
        even if the order of its replicas does change."""
        if self._same:
            return None
        old = self._previous.preference_of_hash(position, self._n)
        new = self._current.preference_of_hash(position, self._n)
        if old == new:
            return None
        gained = [x for x in new if x not in old]
        if not gained and len(new) == len(old):
            return None  # the same replicas in another order
        lost = [x for x in old if x not in new]
        return KeyMove(tuple(old[: self._sources]), tuple(gained), tuple(lost))

    def for_key(self, key: str | bytes) -> KeyMove | None:
        return self.for_hash(hash_key(key))


@dataclass(frozen=True, slots=True)
class RangeChange:
    """Positions C{start <= p < end} of the ring, all with the same old and new
    preference lists, whose preference sets differ.

    Ranges never wrap: the arc across zero is reported as two ranges, one
    ending at C{HASH_SPACE} and one starting at 0.
    """

    start: int
    end: int
    old: tuple[str, ...]
    new: tuple[str, ...]


def changed_ranges(previous: Ring, current: Ring, n: int) -> Iterator[RangeChange]:
    """Every range of positions whose preference set differs, in order.

    A key belongs to the first point at or after its position, so positions
    in C{(a, b]} for consecutive points C{a < b} of the two rings together
    place alike on both; each such arc is C{[a + 1, b + 1)} here. Adjacent
    arcs with the same lists are merged. This walks every point of both
    rings, so it is for tests, docs and plans, not for the data path.
    """
    points = sorted({p for p, _ in previous.points()} | {p for p, _ in current.points()})
    # Positions above the last point wrap to the first point.
    arcs = [(0, points[0] + 1, points[0])]
    arcs += [(a + 1, b + 1, b) for a, b in pairwise(points)]
    if points[-1] + 1 < HASH_SPACE:
        arcs.append((points[-1] + 1, HASH_SPACE, points[0]))
    pending: RangeChange | None = None
    for start, end, probe in arcs:
        old = tuple(previous.preference_of_hash(probe, n))
        new = tuple(current.preference_of_hash(probe, n))
        changed = set(old) != set(new)
        if pending is not None and changed and (pending.old, pending.new) == (old, new):
            pending = RangeChange(pending.start, end, old, new)
            continue
        if pending is not None:
            yield pending
        pending = RangeChange(start, end, old, new) if changed else None
    if pending is not None:
        yield pending


def owns(ring: Ring, n: int, node: str, position: int) -> bool:
    """Whether C{node} is one of the C{n} replicas of the key at C{position}."""
    return node in ring.preference_of_hash(position, n)
