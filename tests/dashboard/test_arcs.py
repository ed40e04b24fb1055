"""
The ring as the dashboard draws it (L{shardkv.dashboard.arcs}): bounded,
tiling the circle, and true to each node's share.
"""

from __future__ import annotations

from itertools import pairwise

from twisted.trial.unittest import SynchronousTestCase

from shardkv.cluster.view import MapView
from shardkv.core.placement import HASH_SPACE, Ring
from shardkv.core.quorum import QuorumSizes
from shardkv.dashboard.arcs import LIMIT_SEGMENTS, MAX_SEGMENTS, Segment, ring_json, ring_segments

SMALL = 512
"""Points per unit of weight in these rings: enough for many arcs, quick to build."""


def totals(segments: tuple[Segment, ...]) -> dict[str, float]:
    found: dict[str, float] = {}
    for s in segments:
        found[s.node] = found.get(s.node, 0.0) + (s.end - s.start)
    return found


class RingSegmentsTests(SynchronousTestCase):
    def assertTiles(self, segments: tuple[Segment, ...]) -> None:
        """The segments run clockwise from 0 to 1 with no gap, overlap or empty one."""
        self.assertEqual(segments[0].start, 0.0)
        self.assertEqual(segments[-1].end, 1.0)
        for before, after in pairwise(segments):
            self.assertEqual(before.end, after.start)
            self.assertNotEqual(before.node, after.node, "neighbours of one node are merged")
        for s in segments:
            self.assertLess(s.start, s.end)

    def test_bounded_tiling_and_true_to_shares(self) -> None:
        """
        For rings of 2, 3 and 10 nodes of mixed weights, the segments number at
        most the bound (the default and the limit), tile the circle, and add
        up per node to exactly the node's share of the hash space.
        """
        for nodes in (
            {"a": 1.0, "b": 2.0},
            {"a": 1.0, "b": 1.0, "c": 1.0},
            {f"n{i}": 1.0 + i % 3 for i in range(10)},
        ):
            ring = Ring(nodes, SMALL)
            for bound in (MAX_SEGMENTS, LIMIT_SEGMENTS):
                segments = ring_segments(ring, bound)
                self.assertLessEqual(len(segments), bound)
                self.assertGreater(len(segments), bound // 2, "the bound is used, not wasted")
                self.assertTiles(segments)
                shares = ring.shares()
                for node, total in totals(segments).items():
                    self.assertAlmostEqual(total, shares[node], places=12)
                self.assertEqual(set(totals(segments)), set(nodes))

    def test_smaller_bounds(self) -> None:
        """Any bound of at least one segment per node is kept; a smaller one is refused."""
        ring = Ring({"a": 1.0, "b": 1.0, "c": 1.0}, SMALL)
        for bound in (3, 4, 7, 64):
            segments = ring_segments(ring, bound)
            self.assertLessEqual(len(segments), bound)
            self.assertTiles(segments)
            self.assertEqual({s.node for s in segments}, {"a", "b", "c"})
        with self.assertRaises(ValueError):
            ring_segments(ring, 2)

    def test_one_node_owns_the_circle(self) -> None:
        self.assertEqual(ring_segments(Ring(["solo"], SMALL)), (Segment("solo", 0.0, 1.0),))

    def test_a_tiny_node_still_shows(self) -> None:
        """A node with a sliver of the ring gets segments of exactly that sliver."""
        ring = Ring({"big": 1.0, "tiny": 0.002}, SMALL)  # one point
        segments = ring_segments(ring)
        self.assertTiles(segments)
        self.assertAlmostEqual(totals(segments)["tiny"], ring.shares()["tiny"], places=12)

    def test_arcs_follow_the_points(self) -> None:
        """
        With one bucket per segment's worth of points, each segment's owner
        owns the ring at the segment's middle: the picture is the ring, not
        a shuffle of it.
        """
        ring = Ring({"a": 1.0, "b": 1.0}, 4)  # 8 points: every arc gets its own segment
        segments = ring_segments(ring, 4096)
        for s in segments:
            middle = int((s.start + s.end) / 2 * HASH_SPACE)
            self.assertEqual(ring.owner_of_hash(middle), s.node, s)


class RingJsonTests(SynchronousTestCase):
    def test_payload(self) -> None:
        """
        C{ring_json} gives the view's epoch and its read ring: each node's
        weight, points, share and segment count, then the segments in
        fractions of a turn, rounded.
        """
        ring = Ring({"a": 1.0, "b": 2.0}, SMALL)
        view = MapView.of_ring(ring, QuorumSizes(2, 1, 1))
        body = ring_json(view)
        self.assertEqual(
            {k: body[k] for k in ("epoch", "provisional", "phase", "vnodes", "max_segments")},
            {"epoch": 0, "provisional": True, "phase": None, "vnodes": SMALL, "max_segments": 128},
        )
        segments = ring_segments(ring)
        shares = ring.shares()
        self.assertEqual(
            body["nodes"],
            [
                {
                    "node": node,
                    "weight": ring.weight(node),
                    "vnodes": ring.vnode_counts()[node],
                    "share": round(shares[node], 6),
                    "segments": sum(1 for s in segments if s.node == node),
                }
                for node in ("a", "b")
            ],
        )
        self.assertEqual(body["segments"], [s.as_json() for s in segments])
        self.assertEqual(body["segments"][0]["start"], 0.0)
        self.assertEqual(body["segments"][-1]["end"], 1.0)
