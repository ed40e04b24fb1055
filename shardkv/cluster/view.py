"""The map a proxy routes by, and the rings it implies.

A proxy holds no state of its own: the map lives on the nodes, and the view
is this process's copy of the newest one it has seen. Until it has seen one
it serves from a *provisional* map built from ``--nodes`` (epoch 0): an
operation planned at epoch 0 is refused by any node that holds a real map,
with that map, and the view switches (L{MapView.install}).

The rings of a map cost a few tenths of a second to build, so a view builds
them once per installed map (L{Placement}) and every request reads the
placement it captured when it was planned: one request never mixes rings of
two epochs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from shardkv.core.clustermap import ClusterMap, Member, MemberState, ring_for
from shardkv.core.placement import DEFAULT_VNODES, Ring
from shardkv.core.quorum import QuorumSizes
from shardkv.errors import InvalidMap

log = Logger(namespace="shardkv.cluster.view")

RingKey = tuple[tuple[tuple[str, float], ...], int]
Builder = Callable[[Callable[[], Any]], "Deferred[Any]"]
"""Runs a function off the reactor and fires with its result."""

PROVISIONAL_CLUSTER_ID = "provisional"
"""The cluster id of a provisional map; no real map has it (they are hex)."""


@dataclass(frozen=True, eq=False)
class Placement:
    """One map with its rings, as an operation planned at its epoch uses them."""

    map: ClusterMap
    read_ring: Ring
    write_rings: tuple[Ring, ...]

    @property
    def epoch(self) -> int:
        return self.map.epoch

    @property
    def sizes(self) -> QuorumSizes:
        return QuorumSizes(self.map.n, self.map.r, self.map.w)

    @property
    def members(self) -> int:
        """Nodes in the smallest ring in use: N cannot exceed it."""
        return min(len(ring.nodes) for ring in (self.read_ring, *self.write_rings))

    def write_sets(self, key: str, n: int) -> list[list[str]]:
        """The first ``n`` of ``key``'s preference list under each write ring."""
        return [ring.preference_list(key, n) for ring in self.write_rings]


def provisional_map(
    nodes: Mapping[str, float], n: int, r: int, w: int, vnodes: int = DEFAULT_VNODES
) -> ClusterMap:
    """An epoch-0 map of ``nodes``, all active: what to serve before the real map is known."""
    members = tuple(
        Member(node, node, float(weight), MemberState.ACTIVE) for node, weight in nodes.items()
    )
    return ClusterMap(PROVISIONAL_CLUSTER_ID, 0, members, n, min(r, n), min(w, n), vnodes)


class MapView:
    """The newest map this proxy knows, with its subscribers."""

    def __init__(
        self, initial: ClusterMap, rings: Iterable[Ring] = (), build: Builder | None = None
    ) -> None:
        """``rings``: rings already built (a test's shared ring) to use instead of
        building equal ones again. ``build(f)`` runs ``f`` off the reactor (the
        proxy passes a thread pool's), so that a map that arrives while requests
        are served has its rings built without stalling them (see L{receive});
        without it rings are built inline."""
        self._built: dict[RingKey, Ring] = {
            _ring_key(_weights_of(ring), ring.vnodes): ring for ring in rings
        }
        self._warm: dict[RingKey, Ring] = {}
        self._build = build
        self._arriving: tuple[int, Deferred[None]] | None = None
        self._subscribers: list[Callable[[ClusterMap], None]] = []
        self.current = initial
        self._placement = self._place(initial)

    @classmethod
    def from_nodes(
        cls,
        nodes: Mapping[str, float] | Iterable[str],
        sizes: QuorumSizes,
        vnodes: int = DEFAULT_VNODES,
        ring: Ring | None = None,
        build: Builder | None = None,
    ) -> MapView:
        """A provisional view of ``nodes`` (the ``--nodes`` seeds)."""
        weights = dict(nodes) if isinstance(nodes, Mapping) else dict.fromkeys(nodes, 1.0)
        if ring is not None:
            vnodes = ring.vnodes
        initial = provisional_map(weights, sizes.n, sizes.r, sizes.w, vnodes)
        return cls(initial, () if ring is None else (ring,), build)

    @classmethod
    def of_ring(cls, ring: Ring, sizes: QuorumSizes) -> MapView:
        """A provisional view placing exactly like ``ring``."""
        return cls.from_nodes(_weights_of(ring), sizes, ring.vnodes, ring)

    # -- what requests read --------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.current.epoch

    @property
    def provisional(self) -> bool:
        return self.current.epoch == 0

    @property
    def placement(self) -> Placement:
        """The current map and its rings, for one operation to capture."""
        return self._placement

    def read_ring(self) -> Ring:
        return self._placement.read_ring

    def write_rings(self) -> tuple[Ring, ...]:
        return self._placement.write_rings

    def nodes(self) -> tuple[str, ...]:
        """Every member this proxy talks to: all but the removed, sorted."""
        return self.current.acceptors()

    def address(self, node: str) -> str:
        return self.current.address(node)

    def health_json(self) -> dict[str, Any]:
        """What the proxy's ``/health`` says about its map."""
        return {"epoch": self.epoch, "provisional": self.provisional}

    # -- changes -------------------------------------------------------------------

    def subscribe(self, fn: Callable[[ClusterMap], None]) -> None:
        """Call ``fn(map)`` after each install (not for the map current now)."""
        self._subscribers.append(fn)

    def install(self, m: ClusterMap) -> bool:
        """Switch to ``m`` if it is newer; True if it was installed.

        A provisional view takes any real map. Otherwise only a map of the same
        cluster with a higher epoch: an older or equal one changes nothing, and
        one of another cluster is refused (logged), whatever its epoch.
        """
        if m.epoch <= self.current.epoch:
            return False
        if not self.provisional and m.cluster_id != self.current.cluster_id:
            log.warn(
                "ignoring a map of cluster {other} (epoch {epoch}); this proxy serves {ours}",
                other=m.cluster_id,
                epoch=m.epoch,
                ours=self.current.cluster_id,
            )
            return False
        placement = self._place(m)
        previous = self.current.epoch
        self.current, self._placement = m, placement
        log.info(
            "serving cluster map epoch {epoch} (was {previous}){phase}",
            epoch=m.epoch,
            previous=previous,
            phase=f", move {m.move.phase.value}" if m.move is not None else "",
        )
        for fn in list(self._subscribers):
            try:
                fn(m)
            except Exception:
                log.failure("a subscriber of the cluster map failed")
        return True

    def install_json(self, data: object) -> bool:
        """L{install} a map as the wire carries it; a malformed one is logged and ignored."""
        m = _parsed(data)
        return m is not None and self.install(m)

    def receive(self, m: ClusterMap) -> None:
        """L{install} ``m`` once its rings are built, off the reactor when they are new.

        A new ring of 32768 points per node takes tens of milliseconds to
        build; inline, every request in flight would wait that long at the
        start of a move. L{settled} says when the newest map received is in.
        """
        if m.epoch <= self.current.epoch:
            return
        if self._arriving is not None and self._arriving[0] >= m.epoch:
            return
        wanted = {_ring_key(w, m.vnodes): w for w in (m.read_weights(), *m.write_weight_sets())}
        missing = {k: w for k, w in wanted.items() if k not in self._built and k not in self._warm}
        if self._build is None or not missing:
            self.install(m)
            return
        arriving: Deferred[None] = Deferred()
        self._arriving = (m.epoch, arriving)

        def build() -> dict[RingKey, Ring]:
            return {k: ring_for(w, m.vnodes) for k, w in missing.items()}

        def built(rings: dict[RingKey, Ring]) -> None:
            self._warm = {**self._warm, **rings}

        def done(result: object) -> None:
            if isinstance(result, Failure):
                log.failure("building the rings of epoch {epoch}", result, epoch=m.epoch)
            self.install(m)
            if self._arriving is not None and self._arriving[1] is arriving:
                self._arriving = None
            arriving.callback(None)

        self._build(build).addCallback(built).addBoth(done)

    def receive_json(self, data: object) -> None:
        """L{receive} a map as the wire carries it (a node's stale-epoch answer)."""
        m = _parsed(data)
        if m is not None:
            self.receive(m)

    def settled(self) -> Deferred[None]:
        """Fires once the newest map received (L{receive}) is installed."""
        if self._arriving is None:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._arriving[1].addBoth(lambda _: waiting.callback(None))
        return waiting

    def _place(self, m: ClusterMap) -> Placement:
        read = m.read_weights()
        writes = m.write_weight_sets()
        wanted = {_ring_key(w, m.vnodes): w for w in (read, *writes)}
        built = {key: self._ring(key, w, m.vnodes) for key, w in wanted.items()}
        self._built = built
        return Placement(
            m,
            built[_ring_key(read, m.vnodes)],
            tuple(built[_ring_key(w, m.vnodes)] for w in writes),
        )

    def _ring(
        self,
        key: RingKey,
        weights: Mapping[str, float],
        vnodes: int,
    ) -> Ring:
        ring = self._built.get(key) or self._warm.pop(key, None)
        return ring if ring is not None else ring_for(weights, vnodes)


def _parsed(data: object) -> ClusterMap | None:
    try:
        return ClusterMap.from_json(data)
    except InvalidMap as e:
        log.warn("ignoring a malformed cluster map: {why}", why=e.message)
        return None


def _weights_of(ring: Ring) -> dict[str, float]:
    return {node: ring.weight(node) for node in ring.nodes}


def _ring_key(weights: Mapping[str, float], vnodes: int) -> RingKey:
    return tuple(sorted((k, float(v)) for k, v in weights.items())), vnodes
