"""Membership changes as an operator makes them: stage a plan, look at it, commit or abort.

A plan is staged against the newest map (refreshed from the nodes first, so
a proxy that has not polled yet cannot plan against an old epoch). Before
anything is installed every node to be added must answer and must not belong
to another cluster, and every node of the current ring says what it would
send (``POST /replica/plan``), so the operator sees the exact cost of the
change before any key moves. The staged plan lives in this proxy's memory
only: a plan is advice to a person, not state of the cluster, and committing
it re-checks everything against the map as it then is.

Commit and abort are compare-and-sets on the map (L{MapProposer.propose}):
the change function insists on the epoch the plan was made at, so of two
plans committed at once through two proxies exactly one wins and the other
gets L{MapConflict}. A change function may run more than once (the proposer
retries a rejected ballot); when it meets the very map it would write, it
keeps it, so a retry never turns into a second change.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from shardkv.cluster.stepwise import run_steps
from shardkv.core.clustermap import MAX_WEIGHT, ClusterMap, ring_steps
from shardkv.core.membership import abort, expect_epoch, ideal_fraction, stage
from shardkv.errors import (
    ForeignCluster,
    InvalidChange,
    InvalidRequest,
    MapConflict,
    MapUnavailable,
    MemberUnreachable,
    NodeHasNewerMap,
    NoPlan,
    ReplicaCallFailed,
    ReplicaRefused,
    UnknownMember,
)
from shardkv.replica.protocol import FENCE_GRACE
from shardkv.web.dataroutes import parse_json_object

T = TypeVar("T")


DEFAULT_KEYS_LIMIT = 100
MAX_KEYS_LIMIT = 1000

_CHANGE_FIELDS = ("add", "remove", "weights", "rate")
_ADD_FIELDS = ("address", "weight")


# -- what the proxy needs from the map machinery (shardkv.cluster) --------------------


class View(Protocol):
    """The proxy's current map (L{shardkv.cluster.view.MapView})."""

    @property
    def current(self) -> ClusterMap: ...

    @property
    def provisional(self) -> bool: ...

    def install(self, m: ClusterMap) -> bool: ...


class Sync(Protocol):
    """Asks the nodes for their maps (L{shardkv.cluster.sync.MapSync})."""

    def refresh(self) -> Awaitable[ClusterMap]: ...

    def learned_epochs(self) -> dict[str, int | None]: ...

    def agreed_for(self, epoch: int) -> float: ...


class Proposer(Protocol):
    """Compare-and-set of the map at a majority (L{shardkv.cluster.proposer.MapProposer})."""

    async def propose(
        self, change: Callable[[ClusterMap | None], ClusterMap], acceptors: Sequence[str]
    ) -> ClusterMap: ...


class Nodes(Protocol):
    """The node calls a change makes (L{shardkv.replica.client.ReplicaClient})."""

    async def get_map(self, node: str) -> dict[str, Any]: ...

    async def plan(self, node: str, map_json: dict[str, Any]) -> dict[str, Any]: ...

    async def plan_keys(
        self, node: str, map_json: dict[str, Any], to: str, cursor: str, limit: int
    ) -> dict[str, Any]: ...


# -- the request body -------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """A parsed ``POST /admin/plan`` body."""

    add: tuple[tuple[str, float], ...] = ()
    remove: tuple[str, ...] = ()
    weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
    rate: int | None = None


def _weight(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidChange(f"{where} must be a number, not {json.dumps(value)}")
    if not math.isfinite(value) or value <= 0 or value > MAX_WEIGHT:
        raise InvalidChange(f"{where} must be above 0 and at most {MAX_WEIGHT:g}, not {value}")
    return float(value)


def _address(value: object) -> str:
    """A node id as ``--nodes`` writes one: ``host:port`` (the id is the address)."""
    if not isinstance(value, str):
        raise InvalidChange('"address" must be a string "host:port"')
    host, _, port = value.rpartition(":")
    if "://" in value:
        raise InvalidChange(
            f"address {value!r}: give host:port without a scheme (the node id is its address)"
        )
    if (
        not host
        or "/" in host
        or any(c.isspace() for c in value)
        or not port.isdigit()
        or not 0 < int(port) < 65536
        or len(value) > 120
    ):
        raise InvalidChange(f"address {value!r} is not host:port")
    return value


def _id(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidChange(f"{where} must be a member id (a non-empty string)")
    return value


def parse_change(raw: bytes) -> Change:
    """The body of ``POST /admin/plan``; L{InvalidChange} for anything malformed.

    Unknown fields are refused rather than ignored, so that a typo such as
    ``"removes"`` cannot turn into a plan that changes something else.
    """
    try:
        body = parse_json_object(raw or b"{}")
    except InvalidRequest as e:
        raise InvalidChange(f"{e.message}, with add, remove and/or weights") from None
    unknown = sorted(set(body) - set(_CHANGE_FIELDS))
    if unknown:
        raise InvalidChange(
            f"unknown field(s) {', '.join(map(repr, unknown))}; a plan takes "
            + ", ".join(_CHANGE_FIELDS)
        )
    add: list[tuple[str, float]] = []
    raw_add = body.get("add", [])
    if not isinstance(raw_add, list):
        raise InvalidChange('"add" must be a list of {"address": "host:port", "weight": w}')
    for item in raw_add:
        if not isinstance(item, dict):
            raise InvalidChange('each "add" item must be {"address": "host:port", "weight": w}')
        extra = sorted(set(item) - set(_ADD_FIELDS))
        if extra:
            raise InvalidChange(
                f'unknown field(s) {", ".join(map(repr, extra))} in an "add" item; '
                "it takes address and weight"
            )
        address = _address(item.get("address"))
        weight = _weight(item.get("weight", 1.0), f"the weight of {address}")
        if any(address == a for a, _ in add):
            raise InvalidChange(f"{address} is added twice")
        add.append((address, weight))
    raw_remove = body.get("remove", [])
    if not isinstance(raw_remove, list):
        raise InvalidChange('"remove" must be a list of member ids')
    remove = [_id(item, 'each "remove" item') for item in raw_remove]
    if len(set(remove)) != len(remove):
        raise InvalidChange('"remove" names a member twice')
    raw_weights = body.get("weights", {})
    if not isinstance(raw_weights, dict):
        raise InvalidChange('"weights" must be an object of member id to weight')
    weights = {
        _id(k, "a key of weights"): _weight(v, f"the weight of {k}") for k, v in raw_weights.items()
    }
    rate = body.get("rate")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int) or rate < 0):
        raise InvalidChange('"rate" must be a whole number of keys per second (0: unlimited)')
    return Change(tuple(add), tuple(remove), weights, rate)


# -- the staged plan --------------------------------------------------------------------


@dataclass(frozen=True)
class StagedPlan:
    """A plan waiting for commit: the target map and what it was computed from."""

    base_epoch: int
    target: ClusterMap
    answer: dict[str, Any]


def same_map(a: ClusterMap | None, b: ClusterMap) -> bool:
    """Is ``a`` exactly ``b``? (A proposer retrying a change meets its own value.)"""
    return a is not None and a.epoch == b.epoch and a.to_json() == b.to_json()


def cas_to(base_epoch: int, wanted: ClusterMap) -> Callable[[ClusterMap | None], ClusterMap]:
    """The change "from epoch ``base_epoch``, install ``wanted``", safe to run twice."""

    def change(current: ClusterMap | None) -> ClusterMap:
        if same_map(current, wanted):
            assert current is not None
            return current
        expect_epoch(current, base_epoch)
        return wanted

    return change


def unreachable(nodes: Sequence[str], errors: Mapping[str, Exception], what: str) -> None:
    """Raise L{MemberUnreachable} naming every node in ``nodes`` that failed."""
    if nodes:
        reasons = {n: str(errors[n]) for n in nodes}
        raise MemberUnreachable(
            f"{what}: {', '.join(nodes)} could not be reached; nothing was changed",
            members=list(nodes),
            reasons=reasons,
        )


async def call_all(
    nodes: Sequence[str], call: Callable[[str], Awaitable[T]]
) -> tuple[dict[str, T], dict[str, Exception]]:
    """``call(node)`` for every node in parallel: the answers and the failures, by node."""

    async def one(node: str) -> tuple[str, T | None, Exception | None]:
        try:
            return node, await call(node), None
        except ReplicaCallFailed as e:
            return node, None, e

    results = await gatherResults([Deferred.fromCoroutine(one(n)) for n in nodes])
    answers = {n: a for n, a, e in results if e is None}
    failures = {n: e for n, _, e in results if e is not None}
    return answers, failures  # type: ignore[return-value]


def _node_failure(node: str, error: Exception, what: str) -> Exception:
    """What a node's refusal means for the operator."""
    if isinstance(error, NodeHasNewerMap):
        return MapConflict(
            f"{what}: node {node} holds a newer map than this proxy planned against; plan again"
        )
    if isinstance(error, ReplicaRefused) and error.code == "foreign_cluster":
        return ForeignCluster(f"{what}: {error.message}", member=node)
    return error


class MembershipAdmin:
    """``/admin/plan``, ``/admin/plan/keys``, ``/admin/commit``, ``/admin/abort``.

    ``rate`` (keys/s for the whole cluster, 0 unlimited) is what
    ``--rebalance-rate`` gave; a plan may set its own. ``status`` gives the
    rebalancer's progress for the commit's answer.
    """

    def __init__(
        self,
        view: View,
        sync: Sync,
        proposer: Proposer,
        nodes: Nodes,
        clock: IReactorTime,
        rate: int = 0,
        status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.view = view
        self.sync = sync
        self.proposer = proposer
        self.nodes = nodes
        self.clock = clock
        self.rate = rate
        self.status = status
        self.staged: StagedPlan | None = None

    def _now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    async def _fresh(self) -> ClusterMap:
        current = await self.sync.refresh()
        if self.view.provisional or current.epoch < 1:
            raise MapUnavailable(
                "this proxy has no cluster map from the nodes yet; try again shortly"
            )
        return current

    def map(self) -> dict[str, Any]:
        """``GET /admin/map``."""
        return self.view.current.to_json()

    async def plan(self, raw: bytes) -> dict[str, Any]:
        """``POST /admin/plan``: stage the change and say what it would move."""
        change = parse_change(raw)
        current = await self._fresh()
        rate = self.rate if change.rate is None else change.rate
        target = stage(
            current, change.add, change.remove, change.weights, rate=rate, now_ms=self._now_ms()
        )
        await self._check_new_nodes(current, [a for a, _ in change.add])
        previous = sorted(target.previous_weights())
        answers, failures = await call_all(previous, lambda n: self.nodes.plan(n, target.to_json()))
        for node, error in failures.items():
            problem = _node_failure(node, error, "plan")
            if problem is not error:
                raise problem
        unreachable(sorted(failures), failures, "plan")
        pairs, keys_moving, bytes_moving, keys_total = _aggregate(answers)
        assert target.move is not None
        target = dataclasses.replace(
            target,
            move=dataclasses.replace(target.move, keys_total=keys_moving, bytes_total=bytes_moving),
        )
        before, after = current.current_weights(), target.current_weights()
        answer = {
            "base_epoch": current.epoch,
            "map": target.to_json(),
            "pairs": pairs,
            "keys_moving": keys_moving,
            "bytes_moving": bytes_moving,
            "keys_total": keys_total,
            "fraction": keys_moving / keys_total if keys_total else 0.0,
            "ideal_fraction": ideal_fraction(before, after),
            "shares": {
                "before": await self._shares(before, current.vnodes),
                "after": await self._shares(after, target.vnodes),
            },
            "weights": {"before": before, "after": after},
        }
        self.staged = StagedPlan(current.epoch, target, answer)
        return answer

    async def _shares(self, weights: Mapping[str, float], vnodes: int) -> dict[str, float]:
        """Each node's share of the ring of ``weights``. The ring and the walk of its
        points cost tens of ms: a step per reactor turn, between requests."""
        ring = await run_steps(self.clock, ring_steps(weights, vnodes))
        shares = await run_steps(self.clock, ring.shares_steps())
        return {n: round(s, 6) for n, s in sorted(shares.items())}

    async def _check_new_nodes(self, current: ClusterMap, added: Sequence[str]) -> None:
        """Every node to be added answers, and holds no map but ours."""
        answers, failures = await call_all(added, self.nodes.get_map)
        unreachable(sorted(failures), failures, "plan")
        for node in sorted(answers):
            answer = answers[node]
            learned = answer.get("learned") if isinstance(answer, dict) else None
            ids = {answer.get("cluster_id") if isinstance(answer, dict) else None}
            if isinstance(learned, dict):
                ids.add(learned.get("cluster_id"))
            foreign = sorted(str(i) for i in ids if i is not None and i != current.cluster_id)
            if foreign:
                raise ForeignCluster(
                    f"node {node} already belongs to cluster {foreign[0]}, not "
                    f"{current.cluster_id}; give it an empty data directory to add it",
                    member=node,
                    cluster_id=foreign[0],
                )

    async def plan_keys(
        self, source: str, to: str, cursor: str = "", limit: int | None = None
    ) -> dict[str, Any]:
        """``GET /admin/plan/keys``: one page of the keys ``source`` would send ``to``."""
        staged = self._staged()
        if limit is None:
            limit = DEFAULT_KEYS_LIMIT
        if not 1 <= limit <= MAX_KEYS_LIMIT:
            raise InvalidRequest(f"limit must be 1 to {MAX_KEYS_LIMIT}", "invalid_query")
        if source not in staged.target.previous_weights():
            raise UnknownMember(f"{source} is not a member of the current ring; no keys leave it")
        if to not in staged.target.current_weights():
            raise UnknownMember(f"{to} is not a member of the planned ring; no keys go to it")
        try:
            answer = await self.nodes.plan_keys(source, staged.target.to_json(), to, cursor, limit)
        except ReplicaCallFailed as e:
            problem = _node_failure(source, e, "plan keys")
            if problem is not e:
                raise problem from None
            if isinstance(e, ReplicaRefused):
                raise
            raise MemberUnreachable(
                f"plan keys: {source} could not be reached: {e}", members=[source]
            ) from None
        return {"keys": list(answer.get("keys", [])), "cursor": answer.get("cursor")}

    def staged_plan(self) -> dict[str, Any]:
        """``GET /admin/plan``: the staged plan as ``POST /admin/plan`` answered it.

        So that a second look (``shardkv plan``) need not stage the change
        again; L{NoPlan} when nothing is staged on this proxy. It is the answer
        from when it was staged: commit re-checks it against the map as it is.
        """
        return self._staged().answer

    def _staged(self) -> StagedPlan:
        if self.staged is None:
            raise NoPlan("no plan is staged on this proxy; POST /admin/plan first")
        return self.staged

    async def commit(self) -> dict[str, Any]:
        """``POST /admin/commit``: install the staged map (epoch + 1); the move starts."""
        staged = self._staged()
        current = await self._fresh()
        if current.epoch != staged.base_epoch:
            self.staged = None
            raise MapConflict(
                f"the map is at epoch {current.epoch}, but the plan was made at epoch "
                f"{staged.base_epoch}; plan again",
                epoch=current.epoch,
            )
        self.barrier(current)
        left = FENCE_GRACE - self.sync.agreed_for(current.epoch)
        if left > 0:
            # Nodes may still take calls of the epoch before; wait until none do.
            await deferLater(self.clock, left, lambda: None)
        assert staged.target.move is not None
        target = dataclasses.replace(
            staged.target, move=dataclasses.replace(staged.target.move, started_ms=self._now_ms())
        )
        installed = await self.proposer.propose(
            cas_to(staged.base_epoch, target), current.acceptors()
        )
        if self.staged is staged:
            self.staged = None
        self.view.install(installed)
        return {
            "epoch": installed.epoch,
            "map": installed.to_json(),
            "rebalance": self.status() if self.status is not None else None,
        }

    def barrier(self, current: ClusterMap) -> None:
        """Every acceptor has learned ``current`` (rule 2), else L{MemberUnreachable}."""
        learned = self.sync.learned_epochs()
        behind = [n for n in current.acceptors() if (learned.get(n) or 0) < current.epoch]
        if behind:
            raise MemberUnreachable(
                f"{', '.join(behind)} could not be reached or has not learned epoch "
                f"{current.epoch}; every member must be up to change the map",
                members=behind,
            )

    async def abort(self) -> dict[str, Any]:
        """``POST /admin/abort``: head back to the previous placement (rule 4)."""
        for _ in range(3):
            current = await self._fresh()
            wanted = abort(current)
            try:
                installed = await self.proposer.propose(
                    cas_to(current.epoch, wanted), current.acceptors()
                )
            except MapConflict as e:
                if type(e) is not MapConflict:
                    raise
                continue  # a rebalancer moved the phase on meanwhile: abort from there
            self.view.install(installed)
            self.staged = None
            return {"epoch": installed.epoch, "map": installed.to_json()}
        raise MapConflict("the map kept changing while aborting; try again")


def _aggregate(
    answers: Mapping[str, dict[str, Any]],
) -> tuple[list[dict[str, Any]], int, int, int]:
    """The nodes' plan answers as one list of pairs and totals."""
    totals: dict[tuple[str, str], list[int]] = {}
    keys_total = 0
    for node in sorted(answers):
        answer = answers[node]
        keys_total += int(answer.get("keys_scanned", 0))
        for pair in answer.get("pairs", []):
            key = (str(pair.get("from", node)), str(pair["to"]))
            sums = totals.setdefault(key, [0, 0])
            sums[0] += int(pair.get("keys", 0))
            sums[1] += int(pair.get("bytes", 0))
    pairs = [
        {"from": f, "to": t, "keys": k, "bytes": b} for (f, t), (k, b) in sorted(totals.items())
    ]
    keys_moving = sum(k for k, _ in totals.values())
    bytes_moving = sum(b for _, b in totals.values())
    return pairs, keys_moving, bytes_moving, keys_total
