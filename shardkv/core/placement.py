"""Placement: which nodes hold a key.

A consistent-hash ring with virtual nodes and weights. A node puts
C{round(weight * vnodes)} points on a ring of C{2**64} positions; a key
belongs to the first point at or after its own position (clockwise), and its
preference list is the distinct nodes met walking on from there.

Why a ring: adding a node only moves keys I{to} it and removing a node only
moves I{its} keys, which is what lets a cluster grow without reshuffling
data. Jump hashing can only drop the last bucket, and rendezvous hashing
costs a hash per node per lookup.

Why so many points: a node's share is the sum of the gaps in front of its
points, so its relative error is about C{sqrt((N - 1) / N / points)}.
Ketama's 160 points leave the busiest of 10 nodes 13 % above average and
1000 points still 5 %. Placing a node's points with regard to the other
nodes could do better, but would then move keys that did not have to move.
With L{DEFAULT_VNODES} = 32768 the error is 0.5 %, below the binomial noise
of a 100k-key sample (0.95 % per node at N = 10); the busiest of 10 nodes
then exceeds 1.05 x the mean key count in fewer than 1 ring in 20000,
against 1 in 3500 with 16384 points and every other ring with 1000
(C{bench/placement_quality.py}). The price is 330k points for 10 nodes:
4 MB, built in a few tenths of a second.

How it stays cheap: a node's points are the first C{round(weight * vnodes)}
numbers of the SHAKE-128 stream of its id, so a heavier weight only adds
points, and re-weighting moves only the keys the node gains or loses. Each
node's points are sorted on their own and merged into the ring arc by arc,
which costs less than one sort of all points. A ring can also be built a
step of about a millisecond at a time (L{Ring.stepwise}), so that a process
can build one on its reactor between requests. A lookup first finds its
slice of the ring in a table, so that the binary search runs over a few
dozen neighbouring points instead of missing the CPU cache at every step.

Why these hashes: positions must agree across processes and machines, so
never Python's C{hash()}. Keys are hashed with 8-byte BLAKE2b, the fastest
well-mixing hash in C{hashlib} here (0.6 us against 0.8 us for MD5).
"""

from __future__ import annotations

import hashlib
import math
import struct
import threading
from array import array
from bisect import bisect_left
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import repeat
from typing import TypeVar

T = TypeVar("T")
Steps = Generator[None, None, T]
"""Work cut into steps: each C{next()} does a slice of it; the last returns the result."""

HASH_SPACE: int = 2**64
DEFAULT_VNODES: int = 32768

_POINT_DOMAIN = b"shardkv-ring\x00"
_POINTS_PER_ARC = 1024
_POINTS_PER_SLICE = 32
_POINTS_PER_SORT = 4096
_ARCS_PER_STEP = 2
_SLICES_PER_STEP = 512
_SHARE_POINTS_PER_STEP = 4096
"""How much of a build one step does: a few tenths of a millisecond on a quiet box."""


def hash_key(key: str | bytes) -> int:
    """The key's position on the ring, in C{[0, HASH_SPACE)}.

    Strings are hashed as UTF-8 so that a key has one position whichever
    route it arrived by. This function is part of the data layout: changing
    it moves almost every key.
    """
    data = key.encode("utf-8") if isinstance(key, str) else key
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def complete(steps: Steps[T]) -> T:
    """Run work cut into steps (L{Steps}) to its end, at once; its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


_POINTS_CACHED = 64
_points_cache: dict[tuple[str, int], array[int]] = {}
_points_lock = threading.Lock()


def _points(node: str, count: int) -> array[int]:
    """The first C{count} points of C{node}, sorted; the same in every process.

    Cached, the last L{_POINTS_CACHED} (a quarter of a megabyte per node at
    the default C{vnodes}): a membership change builds rings that share most
    nodes with the current one, and these points are over half the cost of
    building a ring.
    """
    return complete(_points_steps(node, count))


def _points_steps(node: str, count: int) -> Steps[array[int]]:
    """L{_points}, sorting a part per step (one sort of 32768 takes 9 ms; eight
    sorts of an eighth and one that merges the sorted runs take 5)."""
    key = (node, count)
    with _points_lock:
        run = _points_cache.pop(key, None)
    if run is None:
        stream = hashlib.shake_128(_POINT_DOMAIN + node.encode("utf-8")).digest(8 * count)
        values = struct.unpack(f">{count}Q", stream)
        parts: list[int] = []
        for start in range(0, count, _POINTS_PER_SORT):
            yield
            parts += sorted(values[start : start + _POINTS_PER_SORT])
        yield
        run = array("Q", sorted(parts))
    with _points_lock:
        _points_cache[key] = run
        while len(_points_cache) > _POINTS_CACHED:
            del _points_cache[next(iter(_points_cache))]
    return run


@dataclass(frozen=True, slots=True)
class KeyPlacement:
    """Where a key lives and why, for operators asking "where is my key?".

    C{position} is the index of the ring point the key landed on and C{token}
    that point's place on the ring, so the answer can be checked by hand:
    C{token} is the first point at or after C{hash}.
    """

    hash: int
    position: int
    token: int
    owner: str
    preference_list: tuple[str, ...]


class Ring:
    """An immutable consistent-hash ring.

    Rings are values: rings built from the same nodes, weights and C{vnodes}
    are equal and place every key alike, in any process, whatever order the
    nodes were listed in. A membership change builds a new ring
    (L{with_node}, L{without_node}), so no lookup sees a half-changed ring.
    """

    __slots__ = (
        "_nodes",
        "_owners",
        "_positions",
        "_shares",
        "_slice_shift",
        "_slices",
        "_vnode_counts",
        "_vnodes",
        "_weights",
    )

    def __init__(
        self, nodes: Mapping[str, float] | Iterable[str], vnodes: int = DEFAULT_VNODES
    ) -> None:
        """Build the ring (at once; L{stepwise} builds it a step at a time).

        @param nodes: node ids mapped to weights (relative capacity, > 0), or
            just node ids, which then all weigh 1.0.
        @param vnodes: points per unit of weight. Fewer points build faster
            and balance worse; see the module docstring.
        @raise ValueError: no nodes, a duplicate or empty id, a weight that is
            not a positive finite number, or C{vnodes < 1}.
        """
        self._setup(nodes, vnodes)
        complete(self._build())

    @classmethod
    def stepwise(
        cls, nodes: Mapping[str, float] | Iterable[str], vnodes: int = DEFAULT_VNODES
    ) -> Steps[Ring]:
        """The ring that C{Ring(nodes, vnodes)} builds, built a step at a time.

        Each C{next()} does well under a millisecond of the work (30-50 ms of
        CPU in all for 5 nodes at the default C{vnodes}), so that a process can
        build a ring on its reactor between requests; the last returns the
        ring. The arguments are checked at once, as C{Ring()} checks them.
        """
        ring = cls.__new__(cls)
        ring._setup(nodes, vnodes)
        return ring._steps()

    def _steps(self) -> Steps[Ring]:
        yield from self._build()
        return self

    def _setup(self, nodes: Mapping[str, float] | Iterable[str], vnodes: int) -> None:
        if isinstance(nodes, str | bytes):
            raise TypeError("nodes must be a collection of node ids, not a single id")
        if isinstance(vnodes, bool) or not isinstance(vnodes, int) or vnodes < 1:
            raise ValueError(f"vnodes must be a positive integer, not {vnodes!r}")
        pairs = nodes.items() if isinstance(nodes, Mapping) else ((n, 1.0) for n in nodes)
        weights: dict[str, float] = {}
        for node, weight in pairs:
            if not isinstance(node, str) or not node:
                raise ValueError(f"a node id must be a non-empty string, not {node!r}")
            if node in weights:
                raise ValueError(f"duplicate node id {node!r}")
            if not (isinstance(weight, int | float) and math.isfinite(weight) and weight > 0):
                raise ValueError(f"node {node!r} has weight {weight!r}; it must be > 0")
            weights[node] = float(weight)
        if not weights:
            raise ValueError("a ring needs at least one node")

        self._vnodes = vnodes
        self._nodes = tuple(sorted(weights))
        self._weights = {node: weights[node] for node in self._nodes}
        self._vnode_counts = {node: max(1, round(w * vnodes)) for node, w in self._weights.items()}
        self._shares: dict[str, float] | None = None

    def _build(self) -> Steps[None]:
        runs = []
        for node in self._nodes:
            runs.append((yield from _points_steps(node, self._vnode_counts[node])))
        arc_bits = min(8, (sum(map(len, runs)) // _POINTS_PER_ARC).bit_length())
        arcs = 1 << arc_bits
        cuts = [
            [bisect_left(run, arc << (64 - arc_bits)) for arc in range(arcs)] + [len(run)]
            for run in runs
        ]
        self._positions = array("Q")
        self._owners = array("I")
        for arc in range(arcs):
            # A position drawn twice (odds about 1e-9) goes to the later node id.
            owner_of: dict[int, int] = {}
            for index, (run, cut) in enumerate(zip(runs, cuts, strict=True)):
                owner_of.update(zip(run[cut[arc] : cut[arc + 1]], repeat(index)))
            block = sorted(owner_of)
            self._positions.extend(block)
            self._owners.extend(map(owner_of.__getitem__, block))
            if arc % _ARCS_PER_STEP == _ARCS_PER_STEP - 1:
                yield
        size = len(self._positions)
        slice_bits = min(20, (size // _POINTS_PER_SLICE).bit_length())
        shift = 64 - slice_bits
        slices = array("I")
        positions = self._positions
        for first in range(0, 1 << slice_bits, _SLICES_PER_STEP):
            last = min(first + _SLICES_PER_STEP, 1 << slice_bits)
            slices.extend(bisect_left(positions, s << shift) for s in range(first, last))
            yield
        slices.append(size)
        self._slice_shift = shift
        self._slices = slices

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node ids, sorted, so that every process lists them alike."""
        return self._nodes

    @property
    def vnodes(self) -> int:
        """Points per unit of weight that this ring was built with."""
        return self._vnodes

    def weight(self, node: str) -> float:
        """The weight C{node} was given. @raise KeyError: not in the ring."""
        return self._weights[node]

    def vnode_counts(self) -> dict[str, int]:
        """How many points each node has: its weight times C{vnodes}, at least 1."""
        return dict(self._vnode_counts)

    def shares(self) -> dict[str, float]:
        """The exact fraction of the hash space each node owns (they sum to 1).

        This is what a uniform key set converges to, so it shows the ring's
        own imbalance without sampling noise. It walks every point, so it is
        computed once per ring.
        """
        return complete(self.shares_steps())

    def shares_steps(self) -> Steps[dict[str, float]]:
        """L{shares}, a step at a time (a walk of 163,840 points costs 20 ms)."""
        if self._shares is None:
            arcs = [0] * len(self._nodes)
            positions, owners = self._positions, self._owners
            previous = positions[-1] - HASH_SPACE
            for first in range(0, len(positions), _SHARE_POINTS_PER_STEP):
                last = first + _SHARE_POINTS_PER_STEP
                for position, owner in zip(positions[first:last], owners[first:last], strict=True):
                    arcs[owner] += position - previous
                    previous = position
                yield
            self._shares = {n: arc / HASH_SPACE for n, arc in zip(self._nodes, arcs, strict=True)}
        return dict(self._shares)

    def points(self) -> Iterator[tuple[int, str]]:
        """Every point clockwise, as C{(position, owner)}.

        The owner holds the arc that ends at the point: the keys after the
        previous point up to this one. For views that draw the ring (the
        dashboard); like L{shares} it walks every point, so cache what it gives.
        """
        nodes = self._nodes
        return zip(self._positions, (nodes[owner] for owner in self._owners), strict=True)

    def _index(self, position: int) -> int:
        """Index of the first point at or after C{position}, wrapping to 0."""
        part = position >> self._slice_shift
        index = bisect_left(self._positions, position, self._slices[part], self._slices[part + 1])
        return index if index < len(self._positions) else 0

    def owner(self, key: str | bytes) -> str:
        """The node that owns C{key}: the first on its preference list."""
        return self._nodes[self._owners[self._index(hash_key(key))]]

    def owner_of_hash(self, position: int) -> str:
        """The owner of a position from L{hash_key}.

        For callers that check many keys against several rings (a rebalancing
        scan, the placement tests): hash each key once, look it up many times.
        """
        return self._nodes[self._owners[self._index(position)]]

    def preference_list(self, key: str | bytes, n: int) -> list[str]:
        """The first C{n} distinct nodes clockwise from C{key}.

        The owner comes first, and the list for C{n} is a prefix of the list
        for C{n + 1}, so raising the replication factor only adds replicas.
        With fewer than C{n} nodes, every node is listed once. The walk takes
        a few steps per node listed, unless it must reach a node with very
        few points (a tiny weight), which can take a good part of the ring.

        @raise ValueError: C{n < 1}.
        """
        return self._walk(self._index(hash_key(key)), n)

    def preference_of_hash(self, position: int, n: int) -> list[str]:
        """L{preference_list} for a position from L{hash_key}.

        For callers that hash a key once and then place it on two rings (the
        planner of a move compares the old and new preference lists of every
        record a node scans).

        @raise ValueError: C{n < 1}.
        """
        return self._walk(self._index(position), n)

    def _walk(self, start: int, n: int) -> list[str]:
        if n < 1:
            raise ValueError(f"a preference list needs n >= 1, not {n}")
        wanted = min(n, len(self._nodes))
        owners = self._owners
        found = [owners[start]]
        index = start
        while len(found) < wanted:
            index = index + 1 if index + 1 < len(owners) else 0
            if owners[index] not in found:
                found.append(owners[index])
        return [self._nodes[i] for i in found]

    def explain(self, key: str | bytes, n: int) -> KeyPlacement:
        """Everything L{preference_list} decided for C{key}, for debugging."""
        position = hash_key(key)
        index = self._index(position)
        preference = self._walk(index, n)
        return KeyPlacement(
            hash=position,
            position=index,
            token=self._positions[index],
            owner=preference[0],
            preference_list=tuple(preference),
        )

    def with_node(self, node: str, weight: float = 1.0) -> Ring:
        """A new ring with C{node} added; only keys moving to C{node} change owner.

        @raise ValueError: C{node} is already in the ring, or C{weight <= 0}.
        """
        if node in self._weights:
            raise ValueError(f"node {node!r} is already in the ring")
        return Ring({**self._weights, node: weight}, self._vnodes)

    def without_node(self, node: str) -> Ring:
        """A new ring without C{node}; only the keys C{node} owned change owner.

        @raise ValueError: C{node} is not in the ring, or is its last node.
        """
        if node not in self._weights:
            raise ValueError(f"node {node!r} is not in the ring")
        return Ring({n: w for n, w in self._weights.items() if n != node}, self._vnodes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return self._vnodes == other._vnodes and self._weights == other._weights

    def __hash__(self) -> int:
        return hash((self._vnodes, tuple(self._weights.items())))

    def __repr__(self) -> str:
        return f"Ring({self._weights!r}, vnodes={self._vnodes})"
