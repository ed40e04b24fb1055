"""The ring as the dashboard draws it: each node's arcs, aggregated to a bounded number.

A ring has C{weight * vnodes} points per node (about 100k for three nodes),
so its true arcs are far too many and too thin to draw. The circle is cut
into equal buckets instead, and each bucket into one segment per node that
owns part of it, as long as that node's part of the bucket. Every node's
segments then add up to exactly its share of the hash space, so the picture
shows the ring's balance truthfully, though not which node owns a given
position inside a bucket (``/explain`` answers that for a key).

Each bucket starts with the node the previous bucket ended with, so that the
two segments join; a bucket then adds at most one segment per node but
one, and L{ring_segments} picks the number of buckets to stay within its
bound. The result depends only on the ring, which is immutable, so it is
computed once per ring (L{ring_segments} is cached).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from shardkv.cluster.view import MapView
from shardkv.core.placement import HASH_SPACE, Ring

MAX_SEGMENTS = 128
"""Segments drawn for the whole ring by default: each stays a few pixels wide on the
page (at 512, three nodes' segments are under 1 degree and their colours blur)."""

LIMIT_SEGMENTS = 512
"""The most a request may ask for (``?segments=``)."""


@dataclass(frozen=True, slots=True)
class Segment:
    """Part of the circle, ``start`` to ``end`` in fractions of a turn, one node owns."""

    node: str
    start: float
    end: float

    def as_json(self) -> dict[str, Any]:
        return {"node": self.node, "start": round(self.start, 7), "end": round(self.end, 7)}


def _bucket_bound(bucket: int, buckets: int) -> int:
    """The first position of ``bucket``: the least C{x} with C{x * buckets >> 64 == bucket}."""
    return -(-(bucket << 64) // buckets)


def _owned_per_bucket(ring: Ring, buckets: int) -> list[list[int]]:
    """How much of each bucket each node owns, as positions (node order: C{ring.nodes}).

    A key hashing to a point belongs to it, so a point owns the positions
    after the previous point up to and including its own; past the last
    point the ring wraps to the first. One pass over the points, walking the
    bucket bounds alongside: this runs over every point of the ring.
    """
    index = {node: i for i, node in enumerate(ring.nodes)}
    owned = [[0] * len(index) for _ in range(buckets)]
    bounds = [_bucket_bound(b, buckets) for b in range(1, buckets)] + [HASH_SPACE]
    bucket, row, edge = 0, owned[0], bounds[0]
    start = 0
    first_owner = -1
    for position, node in ring.points():
        owner = index[node]
        if first_owner < 0:
            first_owner = owner
        end = position + 1
        while end > edge:  # the arc crosses into the next bucket
            row[owner] += edge - start
            start = edge
            bucket += 1
            row, edge = owned[bucket], bounds[bucket]
        row[owner] += end - start
        start = end
    while True:  # the wrap-around arc, up to the end of the circle
        row[first_owner] += edge - start
        start = edge
        if bucket + 1 == buckets:
            break
        bucket += 1
        row, edge = owned[bucket], bounds[bucket]
    return owned


@functools.lru_cache(maxsize=8)
def ring_segments(ring: Ring, max_segments: int = MAX_SEGMENTS) -> tuple[Segment, ...]:
    """The ring's arcs, clockwise from position 0, in at most ``max_segments`` segments.

    @raise ValueError: fewer segments than nodes: a node would not be drawn.
    """
    nodes = ring.nodes
    if max_segments < len(nodes):
        raise ValueError(f"cannot draw {len(nodes)} nodes in {max_segments} segments")
    if len(nodes) == 1:
        return (Segment(nodes[0], 0.0, 1.0),)
    # The first bucket may hold every node; each later one adds at most len(nodes) - 1.
    buckets = max(1, min(4096, (max_segments - 1) // (len(nodes) - 1)))
    owned = _owned_per_bucket(ring, buckets)
    # Built in integer positions, so the segments tile the circle with no gap or overlap.
    spans: list[list[int]] = []  # [owner, start, end]
    cursor = 0
    for shares in owned:
        lead = spans[-1][0] if spans else -1
        order = [lead] if lead >= 0 and shares[lead] else []
        order += [i for i, amount in enumerate(shares) if amount and i != lead]
        for owner in order:
            end = cursor + shares[owner]
            if spans and spans[-1][0] == owner:
                spans[-1][2] = end
            else:
                spans.append([owner, cursor, end])
            cursor = end
    return tuple(Segment(nodes[o], start / HASH_SPACE, end / HASH_SPACE) for o, start, end in spans)


def ring_json(view: MapView, max_segments: int = MAX_SEGMENTS) -> dict[str, Any]:
    """``GET /dashboard/ring.json``: the read ring of ``view``'s map, drawn in segments.

    The read ring is the one reads are placed by; during a move the write
    rings differ, which ``/cluster`` shows as the move's phase.
    """
    ring = view.read_ring()
    segments = ring_segments(ring, max_segments)
    shares = ring.shares()
    vnodes = ring.vnode_counts()
    counts = dict.fromkeys(ring.nodes, 0)
    for segment in segments:
        counts[segment.node] += 1
    m = view.current
    return {
        "epoch": m.epoch,
        "provisional": view.provisional,
        "phase": None if m.move is None else m.move.phase.value,
        "vnodes": ring.vnodes,
        "max_segments": max_segments,
        "nodes": [
            {
                "node": node,
                "weight": ring.weight(node),
                "vnodes": vnodes[node],
                "share": round(shares[node], 6),
                "segments": counts[node],
            }
            for node in ring.nodes
        ],
        "segments": [segment.as_json() for segment in segments],
    }
