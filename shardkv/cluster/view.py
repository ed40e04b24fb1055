"""The map a proxy routes by, and the rings it implies.

A proxy holds no state of its own: the map lives on the nodes, and the view
is this process's copy of the newest one it has seen. Until it has seen one
it serves from a *provisional* map built from ``--nodes`` (epoch 0): an
operation planned at epoch 0 is refused by any node that holds a real map,
with that map, and the view switches (L{MapView.install}).

The rings of a map cost tens of milliseconds of CPU to build, so a view
builds them once per installed map (L{Placement}), a step per reactor turn
when a map arrives (L{MapView.receive}, L{shardkv.cluster.stepwise}), and
every request reads the placement it captured when it was planned: one
request never mixes rings of two epochs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from shardkv.cluster.stepwise import Pace, run_steps
from shardkv.core.clustermap import ClusterMap, Member, MemberState, ring_for, ring_steps
from shardkv.core.placement import DEFAULT_VNODES, Ring
from shardkv.core.quorum import QuorumSizes
from shardkv.errors import InvalidMap

log = Logger(namespace="shardkv.cluster.view")

RingKey = tuple[tuple[tuple[str, float], ...], int]

PROVISIONAL_CLUSTER_ID = "provisional"
"""The cluster id of a provisional map; no real map has it (they are hex)."""

BUILD_REST = 1.0
"""A map that arrived has its new rings built at half duty (L{Pace}): the
requests meanwhile go at the epoch before, which the nodes take for their
fence's grace (0.5 s), and a proxy that rests between steps keeps the CPU
for them on a busy box."""
PREWARM_REST = 4.0
"""The rings of a planned map (L{MapView.prewarm}) are built at a fifth of
a core: nothing waits for them yet."""
WARM_RINGS = 4
"""Rings built ahead and not used yet that a view keeps (a plan never committed)."""


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
        self, initial: ClusterMap, rings: Iterable[Ring] = (), clock: IReactorTime | None = None
    ) -> None:
        """``rings``: rings already built (a test's shared ring) to use instead of
        building equal ones again. With ``clock`` (the proxy's reactor), a map
        that arrives while requests are served has its new rings built a step
        per reactor turn, between the requests (see L{receive}); without it
        they are built at once."""
        self._built: dict[RingKey, Ring] = {
            _ring_key(_weights_of(ring), ring.vnodes): ring for ring in rings
        }
        self._warm: dict[RingKey, Ring] = {}
        self._building: dict[RingKey, tuple[Pace, list[Deferred[Ring]]]] = {}
        self._clock = clock
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
        clock: IReactorTime | None = None,
    ) -> MapView:
        """A provisional view of ``nodes`` (the ``--nodes`` seeds)."""
        weights = dict(nodes) if isinstance(nodes, Mapping) else dict.fromkeys(nodes, 1.0)
        if ring is not None:
            vnodes = ring.vnodes
        initial = provisional_map(weights, sizes.n, sizes.r, sizes.w, vnodes)
        return cls(initial, () if ring is None else (ring,), clock)

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
        """L{install} ``m`` once its rings are built, a step per reactor turn when
        they are new.

        A new ring of 32768 points per node takes tens of milliseconds to
        build; in one go, every request in flight would wait that long at the
        start of a move. Meanwhile requests keep the placement before, which
        the nodes still take for their fence's grace. L{settled} says when
        the newest map received is in.
        """
        if m.epoch <= self.current.epoch:
            return
        if self._arriving is not None and self._arriving[0] >= m.epoch:
            return
        missing = self._missing(m)
        if self._clock is None or not missing:
            self.install(m)
            return
        arriving: Deferred[None] = Deferred()
        self._arriving = (m.epoch, arriving)

        def done(result: object) -> None:
            if isinstance(result, Failure):
                log.failure("building the rings of epoch {epoch}", result, epoch=m.epoch)
            self.install(m)
            if self._arriving is not None and self._arriving[1] is arriving:
                self._arriving = None
            arriving.callback(None)

        rings = [self._ring_built(k, w, m.vnodes, BUILD_REST) for k, w in missing.items()]
        gatherResults(rings, consumeErrors=True).addBoth(done)

    def prewarm(self, m: ClusterMap) -> None:
        """Build the rings of ``m``, the map a plan staged somewhere would install
        next, slowly and in the background (L{PREWARM_REST}), so that they are
        there when it is committed (L{receive} then installs it at once).

        Advice only: nothing is installed, and a map of another cluster or of
        an epoch this view has passed is ignored.
        """
        if self._clock is None or m.epoch <= self.current.epoch:
            return
        if self.provisional or m.cluster_id != self.current.cluster_id:
            return
        for k, w in self._missing(m).items():
            if k not in self._building:
                self._ring_built(k, w, m.vnodes, PREWARM_REST).addErrback(
                    lambda f: log.failure("building the rings of a planned map", f)
                )

    def _missing(self, m: ClusterMap) -> dict[RingKey, dict[str, float]]:
        wanted = {_ring_key(w, m.vnodes): w for w in (m.read_weights(), *m.write_weight_sets())}
        return {k: w for k, w in wanted.items() if k not in self._built and k not in self._warm}

    def _ring_built(
        self, key: RingKey, weights: Mapping[str, float], vnodes: int, rest: float
    ) -> Deferred[Ring]:
        """The ring ``key`` once built: a build under way goes on (at ``rest`` if
        that is faster), else one starts. Built, it is kept warm for L{_place}."""
        ready: Deferred[Ring] = Deferred()
        building = self._building.get(key)
        if building is not None:
            pace, waiters = building
            pace.rest = min(pace.rest, rest)
            waiters.append(ready)
            return ready
        pace, waiters = Pace(rest), [ready]
        self._building[key] = (pace, waiters)

        def finished(result: Ring | Failure) -> None:
            del self._building[key]
            if not isinstance(result, Failure):
                self._warm[key] = result
                while len(self._warm) > WARM_RINGS:
                    del self._warm[next(iter(self._warm))]
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        run_steps(self._clock, ring_steps(weights, vnodes), pace).addBoth(finished)
        return ready

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
