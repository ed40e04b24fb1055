"""Changing the cluster map at the nodes: a CASPaxos proposer over HTTP.

Every node is an acceptor (L{shardkv.node.mapstore}); the rules are in
L{shardkv.core.consensus}. One L{MapProposer.propose} is one compare-and-set:

1. Prepare at the acceptors with a fresh ballot until a majority of the
   acceptors *of the current value* promised. The caller names where to start
   (its view's members; the seed nodes for a blank cluster); when the newest
   accepted map has other acceptors, they are asked too.
2. ``change(current)`` gives the new map; it may raise a domain error (a
   L{MapConflict} when the map is not the one the operator planned against),
   which ends the proposal and propagates.
3. Accept at acceptors(current) and acceptors(new) together; the change is
   chosen once a majority of EACH accepted, so that a majority of the old
   members and one of the new both hold it whichever set the next proposal
   starts from.
4. Learn: push the chosen map to every member of it (and, best effort, to
   the members it removes), so nodes switch without waiting for a poll.

A ballot refused by an acceptor that promised a higher one is retried with a
higher ballot after a random pause (jitter from the injected ``random``, so
that two racing proposers stop colliding), a bounded number of times.
Without a majority of answers the proposal fails with L{MapUnavailable}.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from shardkv.core.clustermap import ClusterMap, MemberState
from shardkv.core.consensus import Ballot, Promise, is_majority, newest_accepted, next_ballot
from shardkv.core.consensus import parse_ballot as parse_wire_ballot
from shardkv.errors import (
    ForeignCluster,
    InvalidMap,
    MapConflict,
    MapUnavailable,
    ReplicaCallFailed,
    ReplicaRefused,
)
from shardkv.replica.client import ReplicaClient

log = Logger(namespace="shardkv.cluster.proposer")

Change = Callable[[ClusterMap | None], ClusterMap]

DEFAULT_ATTEMPTS = 8
"""Ballots tried before giving up on a contended change."""
DEFAULT_BACKOFF = 0.05
"""Seconds: the first retry waits up to this long, each later one up to twice the last."""


class _Rejected(Exception):
    """An acceptor promised a higher ballot: try again above it."""


class MapProposer:
    """Proposes map changes at the nodes; one instance per process (its id is in its ballots)."""

    def __init__(
        self,
        replica_client: ReplicaClient,
        proposer_id: str,
        clock: IReactorTime,
        random: _random.Random | None = None,
        *,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff: float = DEFAULT_BACKOFF,
        timeout: float | None = None,
    ) -> None:
        """``timeout``: seconds per call to an acceptor (default: the client's)."""
        self.client = replica_client
        self.proposer_id = proposer_id
        self.clock = clock
        self.random = random or _random.Random()
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self._highest: Ballot | None = None
        self.rounds = 0

    async def propose(self, change: Change, acceptors: Sequence[str]) -> ClusterMap:
        """Apply ``change`` to the map the nodes hold, as one compare-and-set.

        @param acceptors: where to start asking (the proxy's members or seeds).
        @return: the map chosen (and learned by its members).
        @raise MapUnavailable: no majority could be reached.
        @raise MapConflict: contention outlasted every retry, or ``change``'s own.
        """
        if not acceptors:
            raise MapUnavailable("no nodes to propose a map to")
        for attempt in range(self.attempts):
            if attempt:
                pause = self.random.uniform(0, self.backoff * 2 ** (attempt - 1))
                await deferLater(self.clock, pause, lambda: None)
            try:
                return await self._round(change, acceptors)
            except _Rejected:
                continue
        raise MapConflict(
            f"another proposer kept winning the cluster map; gave up after {self.attempts} ballots"
        )

    def _ballot(self) -> Ballot:
        ballot = next_ballot([self._highest], self.proposer_id)
        self._highest = ballot
        return ballot

    def _saw(self, ballot: Ballot | None) -> None:
        if ballot is not None and (self._highest is None or ballot > self._highest):
            self._highest = ballot

    async def _round(self, change: Change, start: Sequence[str]) -> ClusterMap:
        self.rounds += 1
        ballot = self._ballot()
        asked: set[str] = set()
        promised: dict[str, Promise] = {}
        answered: set[str] = set()
        rejected = False
        target = sorted(set(start))
        while True:
            fresh = [node for node in target if node not in asked]
            asked.update(fresh)
            for node, promise in zip(
                fresh, await self._gather([self._prepare(n, ballot) for n in fresh]), strict=True
            ):
                if isinstance(promise, Promise):
                    answered.add(node)
                    self._saw(promise.promised_ballot)
                    self._saw(promise.accepted_ballot)
                    if promise.promised:
                        promised[node] = promise
                    else:
                        rejected = True
            accepted = newest_accepted(promised.values())
            current = _parse(accepted)
            voters = list(current.acceptors()) if current is not None else target
            if is_majority(promised, voters):
                break
            missing = [node for node in voters if node not in asked]
            if missing:
                target = sorted(set(target) | set(missing))
                continue
            if rejected:
                raise _Rejected()
            raise MapUnavailable(
                f"no majority of the cluster map's acceptors promised: "
                f"{len(promised)} of {len(voters)} ({', '.join(sorted(set(voters) - answered))} "
                "did not answer)",
                promised=sorted(promised),
                acceptors=sorted(voters),
            )
        new = change(current)
        old_voters = list(current.acceptors()) if current is not None else sorted(set(start))
        new_voters = list(new.acceptors())
        everyone = sorted(set(old_voters) | set(new_voters))
        body = new.to_json()
        results = await self._gather([self._accept(n, ballot, body) for n in everyone])
        took: set[str] = set()
        foreign: list[str] = []
        for node, result in zip(everyone, results, strict=True):
            if result is True:
                took.add(node)
            elif result is False:
                rejected = True
            elif isinstance(result, ReplicaRefused) and result.code == "foreign_cluster":
                foreign.append(node)
        if not (is_majority(took, old_voters) and is_majority(took, new_voters)):
            if foreign:
                raise ForeignCluster(
                    f"{', '.join(foreign)} already belong to another cluster; "
                    "the map was not changed",
                    members=foreign,
                )
            if rejected:
                raise _Rejected()
            raise MapUnavailable(
                f"the new map (epoch {new.epoch}) was accepted by {len(took)} of "
                f"{len(everyone)} acceptors, not by a majority of both the old and the new members",
                accepted=sorted(took),
            )
        removed = [
            m.id
            for m in new.members
            if m.state is MemberState.REMOVED and (current is None or m.id in old_voters)
        ]
        await self._gather([self._learn(n, body) for n in sorted(set(new_voters) | set(removed))])
        log.info(
            "cluster map epoch {epoch} chosen (ballot {ballot})", epoch=new.epoch, ballot=ballot
        )
        return new

    async def _gather(self, calls: Iterable[Deferred[Any]]) -> list[Any]:
        results = await DeferredList(list(calls), consumeErrors=True)
        return [value if ok else value.value for ok, value in results]

    def _prepare(self, node: str, ballot: Ballot) -> Deferred[Promise | Exception]:
        async def call() -> Promise | Exception:
            try:
                answer = await self.client.prepare(node, ballot, timeout=self.timeout)
                return Promise(
                    bool(answer["promised"]),
                    parse_wire_ballot(answer.get("promised_ballot")),
                    parse_wire_ballot(answer.get("accepted_ballot")),
                    _map_or_none(answer.get("accepted")),
                )
            except (ReplicaCallFailed, KeyError, TypeError, InvalidMap) as e:
                log.debug("prepare at {node} failed: {why}", node=node, why=e)
                return e

        return Deferred.fromCoroutine(call())

    def _accept(self, node: str, ballot: Ballot, body: dict[str, Any]) -> Deferred[Any]:
        async def call() -> bool | Exception:
            try:
                answer = await self.client.accept(node, ballot, body, timeout=self.timeout)
                ok = bool(answer["accepted"])
                if not ok:
                    self._saw(parse_wire_ballot(answer.get("promised_ballot")))
                return ok
            except (ReplicaCallFailed, KeyError, TypeError, InvalidMap) as e:
                log.debug("accept at {node} failed: {why}", node=node, why=e)
                return e

        return Deferred.fromCoroutine(call())

    def _learn(self, node: str, body: dict[str, Any]) -> Deferred[Any]:
        async def call() -> None:
            try:
                await self.client.learn(node, body, timeout=self.timeout)
            except ReplicaCallFailed as e:
                log.debug("could not tell {node} the new map: {why}", node=node, why=e.message)

        return Deferred.fromCoroutine(call())


def _map_or_none(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidMap("an accepted map must be an object")
    return value


def _parse(value: dict[str, Any] | None) -> ClusterMap | None:
    return None if value is None else ClusterMap.from_json(value)
