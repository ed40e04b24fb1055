"""The node's share of the cluster map: its CASPaxos acceptor state, the map it
learned, and the epoch fence every replica call passes.

Every node is an acceptor for map changes (L{shardkv.core.consensus} holds the
rules; this module only keeps them durable). A promise or an acceptance is
answered only once it is on disk: an acceptor that forgot a promise after a
crash could let two proposers choose two maps under one epoch.

The learned map is installed through the engine's metadata (``put_meta``),
which the LMDB engine commits in order with every write queued before it. The
fence (L{check_epoch}) moves to the new epoch at once, when the install is
queued, so from that moment a replica call planned at an older epoch is
refused, and every one accepted before it was queued ahead of the install:
when L{learn} fires, they are all committed, and any scan started after it
(a move's stream, a cleanup) sees them. L{learned} and L{epoch} say what is
durable, so the node never reports an epoch it could forget in a crash.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from shardkv.core import consensus
from shardkv.core.clustermap import ClusterMap
from shardkv.core.consensus import AcceptorState, Ballot, Promise, on_accept, on_prepare
from shardkv.errors import (
    ForeignCluster,
    InvalidMap,
    InvalidRequest,
    StaleEpoch,
    StorageStartupError,
)
from shardkv.storage.engine import StorageEngine

log = Logger(namespace="shardkv.node.mapstore")

ACCEPTOR_META = "cluster.acceptor"
"""The engine metadata holding the acceptor state (L{AcceptorState.to_json})."""
MAP_META = "cluster.map"
"""The engine metadata holding the learned map (L{ClusterMap.to_json})."""

MAX_EPOCH_DIGITS = 18
"""An epoch header longer than this is refused: epochs count map changes."""
MAX_PROPOSER_CHARS = 255


def parse_epoch(header: bytes | None) -> int | None:
    """The epoch an ``X-Shardkv-Epoch`` header names (None without one).

    L{InvalidRequest} ``invalid_epoch`` unless it is a non-negative decimal.
    """
    if header is None:
        return None
    text = header.strip()
    if not text or len(text) > MAX_EPOCH_DIGITS or not text.isdigit():
        shown = header[:40].decode("latin-1")
        raise InvalidRequest(
            f"X-Shardkv-Epoch must be a non-negative integer, not {shown!r}", "invalid_epoch"
        )
    return int(text)


def parse_ballot(value: object) -> Ballot:
    """A request's ballot, ``[counter, "proposer"]`` (L{consensus.parse_ballot}),
    which must be there and have a proposer name of sensible length; L{InvalidMap}
    (400) otherwise."""
    ballot = consensus.parse_ballot(value)
    if ballot is None:
        raise InvalidMap('the request needs a ballot, [counter, "proposer"]')
    if len(ballot[1]) > MAX_PROPOSER_CHARS or ballot[0] >= 2**63:
        raise InvalidMap(f"a ballot's counter or proposer name is too long: {value!r:.80}")
    return ballot


MAX_GRACE_KEYS = 100_000
"""Keys written in one grace that are kept for a stream to send again; past it
the stream scans everything once more."""


class MapStore:
    """One node's acceptor state and learned map, kept in its engine's metadata."""

    def __init__(
        self,
        node_id: str,
        engine: StorageEngine,
        clock: IReactorTime | None = None,
        grace: float = 0.0,
    ) -> None:
        """``grace``: seconds after an install during which a call planned at the
        epoch before is still taken (L{FENCE_GRACE}; needs ``clock``)."""
        self.node_id = node_id
        self._engine = engine
        self._clock = clock
        self._grace = grace if clock is not None else 0.0
        self._fenced_at = float("-inf")
        self._grace_keys: set[str] = set()
        self._grace_overflow = False
        self._state = AcceptorState()
        self._learned: ClusterMap | None = None
        self._fence: ClusterMap | None = None
        """The newest map an install was queued for (durable or not): what the fence checks."""
        self._planned: ClusterMap | None = None
        self._subscribers: list[Callable[[ClusterMap], None]] = []

    # start-up

    def load(self) -> None:
        """Read the acceptor state and the learned map; call once the engine has started.

        A stored document that does not parse stops the node
        (L{StorageStartupError}): an acceptor that silently forgot its
        promises would break the consensus, so an operator must look.
        """
        raw_state = self._engine.get_meta(ACCEPTOR_META)
        raw_map = self._engine.get_meta(MAP_META)
        try:
            state = (
                AcceptorState() if raw_state is None else AcceptorState.from_json(_json(raw_state))
            )
            learned = None if raw_map is None else ClusterMap.from_json(_json(raw_map))
        except (InvalidRequest, ValueError, TypeError, KeyError) as e:
            raise StorageStartupError(
                f"the cluster map state stored on node {self.node_id} is unreadable: {e}"
            ) from None
        self._state = state
        self._learned = self._fence = learned
        # What an earlier run took in its grace is not known here (see grace_writes).
        self._grace_overflow = learned is not None
        if learned is not None:
            self._tell(learned)

    # what the node knows

    @property
    def learned(self) -> ClusterMap | None:
        """The newest map durably installed here, or None on a blank node."""
        return self._learned

    @property
    def epoch(self) -> int:
        """The learned map's epoch; 0 when there is none."""
        return 0 if self._learned is None else self._learned.epoch

    @property
    def state(self) -> AcceptorState:
        return self._state

    @property
    def cluster_id(self) -> str | None:
        """The cluster this node belongs to, by its learned or else its accepted map."""
        if self._fence is not None:
            return self._fence.cluster_id
        accepted = self._state.accepted
        if accepted is not None:
            cid = accepted.get("cluster_id")
            return cid if isinstance(cid, str) else None
        return None

    def as_json(self) -> dict[str, Any]:
        """The ``GET /replica/map`` answer; ``planned`` only while a plan is newer
        than every map this node holds (L{note_planned})."""
        accepted = self._state.accepted
        epoch = accepted.get("epoch") if accepted is not None else None
        answer = {
            "node": self.node_id,
            "learned": None if self._learned is None else self._learned.to_json(),
            "accepted_epoch": epoch if isinstance(epoch, int) else None,
            "cluster_id": self.cluster_id,
        }
        planned = self._planned
        if planned is not None and planned.epoch > self.fence_epoch:
            answer["planned"] = planned.to_json()
        return answer

    def note_planned(self, m: ClusterMap) -> None:
        """A proxy staged ``m`` and asked this node what it would send: say so in
        L{as_json}. Only advice, never a map to serve: every proxy's poll sees it
        and builds its rings in the background, so that none has to build them
        at the commit, when the requests in flight would wait for it."""
        if m.cluster_id == self.cluster_id and m.epoch > self.fence_epoch:
            self._planned = m

    def subscribe(self, fn: Callable[[ClusterMap], None]) -> None:
        """Call ``fn`` with each map this node comes to hold, in epoch order: the
        one L{load} reads at start, then each newly learned one once durable."""
        self._subscribers.append(fn)

    # the fence

    def check_epoch(self, header: bytes | None) -> bool:
        """Refuse a replica call planned at an epoch older than this node's.

        No header: no check. The check uses the newest install queued, durable
        or not (see the module docstring); a call of the epoch just before it
        passes while L{grace_left}, and True says so: its writes are for
        L{note_grace_write}. L{StaleEpoch} carries the node's
        epoch and map so that the caller can switch and retry.
        """
        epoch = parse_epoch(header)
        fence = self._fence
        if epoch is None or fence is None or epoch >= fence.epoch:
            return False
        if epoch == fence.epoch - 1 and self.grace_left() > 0:
            return True
        raise StaleEpoch(
            f"{self.node_id} has map epoch {fence.epoch}; the request was planned at {epoch}",
            epoch=fence.epoch,
            map=fence.to_json(),
        )

    # the acceptor

    def prepare(self, ballot: Ballot) -> Deferred[Promise]:
        """Phase 1: promise ``ballot`` if it is the highest seen; answered once durable."""
        self._state, promise = on_prepare(self._state, ballot)
        return self._save_state().addCallback(lambda _: promise)

    def accept(self, ballot: Ballot, value: dict[str, Any]) -> Deferred[bool]:
        """Phase 2: accept ``value`` (a map's JSON) under ``ballot`` unless a higher
        ballot was promised; answered once durable. L{ForeignCluster} if the
        node belongs to another cluster."""
        try:
            self._check_cluster(value.get("cluster_id"))
        except ForeignCluster as e:
            return fail(e)
        self._state, accepted = on_accept(self._state, ballot, value)
        return self._save_state().addCallback(lambda _: accepted)

    def _save_state(self) -> Deferred[None]:
        # Every answer writes the whole state, even unchanged: the engine commits
        # in order, so the answer also waits for any earlier change it reflects.
        raw = json.dumps(self._state.to_json(), sort_keys=True).encode("utf-8")
        return self._engine.put_meta(ACCEPTOR_META, raw)

    # learning

    def learn(self, m: ClusterMap) -> Deferred[int]:
        """Install ``m`` if it is newer than the map held; fires with the epoch held
        after, once durable, and then tells the subscribers.

        An older or equal map changes nothing. L{ForeignCluster} if ``m`` is of
        another cluster than the one this node belongs to.
        """
        try:
            self._check_cluster(m.cluster_id)
        except ForeignCluster as e:
            return fail(e)
        fence = self._fence
        if fence is not None and m.epoch <= fence.epoch:
            if fence is self._learned:
                return succeed(fence.epoch)
            # The newer install is still on its way to disk: answer after it.
            return self._install(fence)
        self._fence = m
        if self._clock is not None:
            self._fenced_at = self._clock.seconds()
        self._grace_keys = set()
        self._grace_overflow = False
        return self._install(m)

    def note_grace_write(self, key: str) -> None:
        """A write of the epoch before was taken in the grace: a move's stream,
        which may have scanned past ``key`` already, sends it again at its end."""
        if len(self._grace_keys) < MAX_GRACE_KEYS:
            self._grace_keys.add(key)
        else:
            self._grace_overflow = True

    def grace_writes(self) -> list[str] | None:
        """The keys of L{note_grace_write} since the newest install, sorted; None
        when they are not all known (too many, or the map was installed by an
        earlier run of the node): a stream then scans everything again."""
        return None if self._grace_overflow else sorted(self._grace_keys)

    @property
    def fence_epoch(self) -> int:
        """The epoch the fence checks: the newest install queued (0 when none)."""
        return 0 if self._fence is None else self._fence.epoch

    def grace_left(self) -> float:
        """Seconds the call of the epoch before the newest install is still taken."""
        if self._clock is None:
            return 0.0
        return max(0.0, self._fenced_at + self._grace - self._clock.seconds())

    def _install(self, m: ClusterMap) -> Deferred[int]:
        raw = json.dumps(m.to_json(), sort_keys=True).encode("utf-8")
        return self._engine.put_meta(MAP_META, raw).addCallback(lambda _: self._installed(m))

    def _installed(self, m: ClusterMap) -> int:
        if self._learned is None or m.epoch > self._learned.epoch:
            self._learned = m
            self._tell(m)
        return self.epoch

    def _tell(self, m: ClusterMap) -> None:
        for fn in list(self._subscribers):
            try:
                fn(m)
            except Exception:
                log.failure("a subscriber failed on map epoch {epoch}", epoch=m.epoch)

    def _check_cluster(self, cluster_id: object) -> None:
        mine = self.cluster_id
        if mine is not None and cluster_id != mine:
            raise ForeignCluster(
                f"{self.node_id} belongs to cluster {mine}, not {cluster_id}",
                cluster_id=mine,
            )


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise InvalidMap(f"not JSON: {e}") from None
