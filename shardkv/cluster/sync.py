"""Keeping a proxy's map in step with the nodes': bootstrap, poll, push.

At start (L{MapSync.bootstrap}) the proxy runs one proposal at its seeds
(``--nodes``): on blank nodes it creates epoch 1 from them, and on nodes
that hold a map it changes nothing (an identity proposal, which also
finishes a change that a crashed proposer left accepted by a minority).
Either way the result is the map the proxy serves. When the nodes' map has
other members than ``--nodes``, the map wins, and the proxy says so once.
Without a majority it tries again every ``retry`` seconds, serving the
provisional map meanwhile (and whatever map a reachable node reports).

Then every ``interval`` seconds (L{MapSync.refresh}) it asks every member
for its map, installs the newest learned one, and pushes the map to members
that are behind, so a node that missed a learn (it was down) catches up
without a proposal. A node that reports an accepted epoch above every
learned one for more than ``settle_after`` seconds holds a change whose
proposer stopped between accept and learn: an identity proposal settles it
(chooses it, or the map it lost to).

Nodes refuse every call but ``/health`` without the cluster token, so the
poll is also where a token mismatch shows: L{MapSync.health_check} makes the
health check of such a node fail with the node's refusal, so that
``/cluster`` says why every call to it fails.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from shardkv.cluster.proposer import MapProposer
from shardkv.cluster.view import MapView
from shardkv.core.clustermap import MAX_WEIGHT, ClusterMap, bootstrap
from shardkv.core.quorum import QuorumSizes
from shardkv.errors import (
    InvalidMap,
    MapUnavailable,
    ReplicaCallFailed,
    ReplicaRefused,
    ShardkvError,
)
from shardkv.periodic import periodic
from shardkv.replica.client import ReplicaClient

log = Logger(namespace="shardkv.cluster.sync")

DEFAULT_INTERVAL = 1.0
DEFAULT_RETRY = 0.5
DEFAULT_SETTLE_AFTER = 2.0
_REFUSED_ACCESS = ("unauthorized", "forbidden")


def new_cluster_id() -> str:
    """16 hex digits: how a node tells its cluster's maps from another's."""
    return secrets.token_hex(8)


class MapSync:
    """Bootstraps, polls and pushes the cluster map for one proxy."""

    def __init__(
        self,
        view: MapView,
        proposer: MapProposer,
        client: ReplicaClient,
        clock: IReactorTime,
        seeds: Mapping[str, float],
        sizes: QuorumSizes,
        vnodes: int,
        *,
        interval: float = DEFAULT_INTERVAL,
        retry: float = DEFAULT_RETRY,
        settle_after: float = DEFAULT_SETTLE_AFTER,
        timeout: float | None = None,
        cluster_id: Callable[[], str] = new_cluster_id,
    ) -> None:
        """``seeds``/``sizes``/``vnodes``: ``--nodes``, ``--replicas/--r/--w`` and
        ``--vnodes``, which only ever shape epoch 1 of a blank cluster.
        ``timeout``: seconds per poll of a node (default: the client's)."""
        self.view = view
        self.proposer = proposer
        self.client = client
        self.clock = clock
        self.seeds = dict(seeds)
        self.sizes = sizes
        self.vnodes = vnodes
        self.interval = interval
        self.retry = retry
        self.settle_after = settle_after
        self.timeout = timeout
        self._cluster_id = cluster_id
        self._last_failure: str | None = None
        self._agreed: dict[int, float] = {}
        self._fetching = 0
        self.bootstrapped = False
        self._warned = False
        self._epochs: dict[str, int | None] = {}
        self._accepted: dict[str, int | None] = {}
        self._unsettled_since: float | None = None
        self._settling = False
        self._refreshing: Deferred[None] | None = None
        self._waiters: list[Deferred[ClusterMap]] = []
        self._last_refresh: float | None = None
        self.refused: dict[str, ReplicaRefused] = {}
        self.pushes = 0

    # -- start -------------------------------------------------------------------

    async def bootstrap(self) -> ClusterMap:
        """One proposal at the seeds: epoch 1 from them on a blank cluster, else the
        nodes' map unchanged. Installs and returns the map chosen."""
        seeds = self.seeds
        sizes, vnodes = self.sizes, self.vnodes

        def change(current: ClusterMap | None) -> ClusterMap:
            if current is not None:
                return current
            return bootstrap(self._cluster_id(), seeds, sizes.n, sizes.r, sizes.w, vnodes)

        start = sorted(set(seeds) | set(self.view.nodes()))
        chosen = await self.proposer.propose(change, start)
        self.view.install(chosen)
        self.bootstrapped = True
        self._warn_if_options_differ(chosen)
        return chosen

    def _warn_if_options_differ(self, m: ClusterMap) -> None:
        """Say once, at the first map the nodes chose, which start-up options it
        overrides: ``--nodes``, ``--replicas``, ``--r`` and ``--w`` only shape a
        blank cluster's first map, and an operator who passed others must learn
        that they do nothing."""
        if self._warned:
            return
        self._warned = True
        if m.current_weights() != {k: float(v) for k, v in self.seeds.items()}:
            log.warn(
                "ignoring --nodes {seeds}: the nodes hold the cluster map (epoch {epoch}) with "
                "members {members}; change membership through the admin API",
                seeds=",".join(sorted(self.seeds)),
                epoch=m.epoch,
                members=",".join(m.acceptors()),
            )
        ours, theirs = tuple(self.sizes), (m.n, m.r, m.w)
        if ours != theirs:
            log.warn(
                "ignoring --replicas {ours[0]} --r {ours[1]} --w {ours[2]}: the nodes hold the "
                "cluster map (epoch {epoch}) with N={theirs[0]} R={theirs[1]} W={theirs[2]}, "
                "which this proxy serves",
                ours=ours,
                theirs=theirs,
                epoch=m.epoch,
            )

    # -- polling -------------------------------------------------------------------

    def learned_epochs(self) -> dict[str, int | None]:
        """The epoch each member reported at the last poll (None: unreachable or blank)."""
        return {node: self._epochs.get(node) for node in self.view.nodes()}

    def agreed_for(self, epoch: int) -> float:
        """Seconds since a poll first found every member at ``epoch`` or later (0: not yet).

        The next epoch may be committed only once this passes the nodes'
        grace (L{shardkv.replica.protocol.FENCE_GRACE}): by then no node takes
        calls of the epoch before ``epoch`` any more.
        """
        since = self._agreed.get(epoch)
        return 0.0 if since is None else self.clock.seconds() - since

    def notice(self, node: str, epoch: int) -> None:
        """``node`` answered with a newer epoch (its grace): fetch its map now."""
        if epoch <= max(self.view.epoch, self._fetching):
            return
        self._fetching = epoch

        def got(answer: object) -> None:
            learned = answer.get("learned") if isinstance(answer, dict) else None
            if learned is not None:
                self.view.receive_json(learned)

        def failed(failure: Failure) -> None:
            self._fetching = self.view.epoch
            log.debug("fetching epoch {epoch} from {node}: {f}", epoch=epoch, node=node, f=failure)

        d = Deferred.fromCoroutine(self.client.get_map(node, timeout=self.timeout))
        d.addCallbacks(got, failed)

    def refresh(self) -> Deferred[ClusterMap]:
        """Ask every member now; install the newest learned map; push it to the
        members behind. Concurrent callers share one poll."""
        mine: Deferred[ClusterMap] = Deferred()
        self._waiters.append(mine)
        if self._refreshing is None:
            running: Deferred[Any] = Deferred()
            self._refreshing = running
            Deferred.fromCoroutine(self._refresh()).chainDeferred(running)
            running.addBoth(self._refreshed)
        return mine

    def _refreshed(self, result: Any) -> None:
        self._refreshing = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _refresh(self) -> ClusterMap:
        self._last_refresh = self.clock.seconds()
        asked = sorted(
            set(self.view.nodes()) | (set(self.seeds) if self.view.provisional else set())
        )
        results = await DeferredList(
            [Deferred.fromCoroutine(self._ask(node)) for node in asked], consumeErrors=True
        )
        answers: dict[str, dict[str, Any]] = {}
        for node, (ok, answer) in zip(asked, results, strict=True):
            if ok and isinstance(answer, dict):
                answers[node] = answer
        newest = max(answers.values(), key=_learned_epoch, default=None)
        if newest is not None and newest.get("learned") is not None:
            self.view.receive_json(newest["learned"])
            await self.view.settled()
        if not self.bootstrapped and not self.view.provisional:
            self._warn_if_options_differ(self.view.current)
        self._prewarm(answers)
        await self._push_behind(answers)
        epoch = self.view.epoch
        members = self.view.nodes()
        if epoch not in self._agreed and all((self._epochs.get(n) or 0) >= epoch for n in members):
            self._agreed = {epoch: self.clock.seconds()}
        self._watch_accepted(answers)
        return self.view.current

    def _prewarm(self, answers: Mapping[str, dict[str, Any]]) -> None:
        """A node says a plan for the next epoch is staged: build its rings now.

        The plan's nodes note the map they were asked about
        (L{shardkv.node.mapstore.MapStore.note_planned}); this proxy may not
        be the one that staged it, and without this it would build the new
        rings at the commit, while its requests wait (L{MapView.prewarm}).
        """
        epoch = self.view.epoch
        for answer in answers.values():
            planned = answer.get("planned")
            if not isinstance(planned, dict) or planned.get("epoch") != epoch + 1:
                continue
            try:
                m = ClusterMap.from_json(planned)
            except InvalidMap:
                continue
            if max(m.current_weights().values()) <= MAX_WEIGHT:
                self.view.prewarm(m)
            return

    async def _ask(self, node: str) -> dict[str, Any] | None:
        try:
            answer = await self.client.get_map(node, timeout=self.timeout)
        except ReplicaRefused as e:
            if e.code in _REFUSED_ACCESS:
                self.refused[node] = e
            self._epochs[node] = None
            return None
        except ReplicaCallFailed:
            self._epochs[node] = None
            return None
        self.refused.pop(node, None)
        self._epochs[node] = _learned_epoch(answer) or None
        accepted = answer.get("accepted_epoch")
        self._accepted[node] = accepted if isinstance(accepted, int) else None
        return answer

    async def _push_behind(self, answers: Mapping[str, dict[str, Any]]) -> None:
        if self.view.provisional:
            return
        m = self.view.current
        members = set(m.acceptors())
        behind = [
            node
            for node, answer in sorted(answers.items())
            if node in members and _learned_epoch(answer) < m.epoch
        ]
        if not behind:
            return
        body = m.to_json()
        results = await DeferredList(
            [Deferred.fromCoroutine(self.client.learn(node, body)) for node in behind],
            consumeErrors=True,
        )
        for node, (ok, answer) in zip(behind, results, strict=True):
            answer = cast(Any, answer)
            if ok:
                self.pushes += 1
                epoch = answer.get("epoch") if isinstance(answer, dict) else None
                self._epochs[node] = epoch if isinstance(epoch, int) else m.epoch
            else:
                why = answer.value.message if isinstance(answer.value, ShardkvError) else answer
                log.debug(
                    "could not bring {node} up to epoch {epoch}: {why}",
                    node=node,
                    epoch=m.epoch,
                    why=why,
                )

    def _watch_accepted(self, answers: Mapping[str, dict[str, Any]]) -> None:
        """Settle a change that was accepted but never learned (its proposer died)."""
        learned = max([self.view.epoch, *(_learned_epoch(a) for a in answers.values())])
        accepted = [a.get("accepted_epoch") for a in answers.values()]
        ahead = any(isinstance(e, int) and e > learned for e in accepted)
        now = self.clock.seconds()
        if not ahead:
            self._unsettled_since = None
            return
        if self._unsettled_since is None:
            self._unsettled_since = now
        if now - self._unsettled_since >= self.settle_after and not self._settling:
            self._settling = True
            Deferred.fromCoroutine(self._settle())

    async def _settle(self) -> None:
        try:
            chosen = await self.proposer.propose(
                lambda current: _unchanged(current), self.view.nodes()
            )
        except ShardkvError as e:
            log.info("could not settle an unfinished map change: {why}", why=e.message)
        else:
            log.info("settled an unfinished map change at epoch {epoch}", epoch=chosen.epoch)
            self.view.install(chosen)
            self._unsettled_since = None
        finally:
            self._settling = False

    # -- health --------------------------------------------------------------------

    def health_check(
        self, check: Callable[[str], Awaitable[dict[str, Any]]]
    ) -> Callable[[str], Awaitable[dict[str, Any]]]:
        """``check``, failing for a node that refused this proxy's token at the last poll:
        it answers /health, but every other call to it would be refused."""

        async def checked(node: str) -> dict[str, Any]:
            report = await check(node)
            refused = self.refused.get(node)
            if refused is not None:
                raise refused
            return report

        return checked

    # -- service -------------------------------------------------------------------

    async def tick(self) -> None:
        """One step of the service: bootstrap until it succeeds, then poll."""
        if not self.bootstrapped:
            try:
                await self.bootstrap()
            except (MapUnavailable, InvalidMap, ReplicaCallFailed) as e:
                if e.message != self._last_failure:
                    # Said once per reason: the retry runs every half second.
                    self._last_failure = e.message
                    log.info(
                        "no cluster map yet ({why}); trying again every {s} s",
                        why=e.message,
                        s=self.retry,
                    )
                await self.refresh()
            except ShardkvError as e:
                log.warn("could not bootstrap the cluster map: {why}", why=e.message)
                await self.refresh()
            return
        now = self.clock.seconds()
        if self._last_refresh is None or now - self._last_refresh >= self.interval - 1e-9:
            await self.refresh()

    def service(self) -> Service:
        """Bootstrap at start (retrying every ``retry`` s), then refresh every ``interval`` s."""
        return periodic(min(self.retry, self.interval), self.tick, self.clock)


def _learned_epoch(answer: Mapping[str, Any] | None) -> int:
    if not isinstance(answer, Mapping):
        return 0
    learned = answer.get("learned")
    epoch = learned.get("epoch") if isinstance(learned, dict) else None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else 0


def _unchanged(current: ClusterMap | None) -> ClusterMap:
    if current is None:
        raise MapUnavailable("no map has been accepted yet")
    return current
