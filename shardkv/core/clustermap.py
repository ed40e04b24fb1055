"""The cluster map: the one document that says which nodes hold which keys.

Every node keeps the map durably and every proxy routes by it. Its
C{epoch} only grows: each change of the map is a compare-and-set at a
majority of the members (L{shardkv.core.consensus}), so two maps with one
epoch can never both be installed, and "which map is newer" is always an
integer comparison.

A map holds up to two rings' worth of weights. Between moves there is one:
the weights of the members that are C{joining} or C{active}. While a move
runs, C{move.previous} keeps the weights the move started from, so that
reads and writes can use the old owners, the new ones, or both, as the move's
phase says (see L{ClusterMap.read_weights}, L{ClusterMap.write_weight_sets}).
A member's state is not free data but follows from the two weight sets: in
both it is C{active}, only in the current one C{joining}, only in the
previous one C{leaving}, in neither C{removed}. L{ClusterMap.from_json}
refuses a map whose states say otherwise, so no node acts on a map that
contradicts itself.

This module is pure: it parses, checks and answers questions. The
transitions are in L{shardkv.core.membership}.
"""

from __future__ import annotations

import enum
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from shardkv.core.placement import Ring, Steps, complete
from shardkv.errors import InvalidMap, UnknownMember

MAX_WEIGHT = 32.0
"""The heaviest weight a change may give. A node puts ``weight x vnodes`` points
on the ring (32,768 per unit), and every proxy and node builds the ring; past
this a ring costs seconds of CPU and hundreds of MB."""


class MemberState(enum.StrEnum):
    JOINING = "joining"
    ACTIVE = "active"
    LEAVING = "leaving"
    REMOVED = "removed"


class Phase(enum.StrEnum):
    COPYING = "copying"
    HANDOVER = "handover"
    CLEANUP = "cleanup"


@dataclass(frozen=True)
class Member:
    """One node of the cluster. C{id} is how placement names it (today its address)."""

    id: str
    address: str
    weight: float
    state: MemberState


@dataclass(frozen=True)
class Move:
    """The move in progress: its phase and the weights it started from.

    C{copy} is false when the destinations already hold everything (after an
    abort from C{handover}); C{rate} is keys/s for the whole cluster (0:
    unlimited); C{keys_total}/C{bytes_total} are the plan's totals, for
    progress reports; C{aborted} says the move has been turned back.
    """

    phase: Phase
    previous: Mapping[str, float]
    copy: bool = True
    rate: int = 0
    keys_total: int = 0
    bytes_total: int = 0
    started_ms: int = 0
    aborted: bool = False

    def __post_init__(self) -> None:
        # A private sorted copy: the caller's dict may change, and JSON is stable.
        object.__setattr__(self, "previous", {k: self.previous[k] for k in sorted(self.previous)})


@dataclass(frozen=True)
class ClusterMap:
    """A map at one epoch. Values: equal maps place every key alike."""

    cluster_id: str
    epoch: int
    members: tuple[Member, ...]
    n: int
    r: int
    w: int
    vnodes: int
    move: Move | None = None
    _by_id: dict[str, Member] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        members = tuple(sorted(self.members, key=lambda m: m.id))
        object.__setattr__(self, "members", members)
        object.__setattr__(self, "_by_id", {m.id: m for m in members})

    # -- questions -------------------------------------------------------------

    def member(self, id: str) -> Member:
        """The member C{id}, in any state. @raise UnknownMember: no such member."""
        try:
            return self._by_id[id]
        except KeyError:
            raise UnknownMember(f"no member {id!r} in the map", member=id) from None

    def address(self, id: str) -> str:
        return self.member(id).address

    def acceptors(self) -> tuple[str, ...]:
        """Who votes on the next map: every member not removed (leaving ones too,
        since they still hold data the move needs), sorted."""
        return tuple(m.id for m in self.members if m.state is not MemberState.REMOVED)

    def current_weights(self) -> dict[str, float]:
        """The ring the cluster is moving to (or is on): joining and active members."""
        return {
            m.id: m.weight
            for m in self.members
            if m.state in (MemberState.JOINING, MemberState.ACTIVE)
        }

    def previous_weights(self) -> dict[str, float]:
        """The ring a move started from; between moves, the current one."""
        return dict(self.move.previous) if self.move is not None else self.current_weights()

    def read_weights(self) -> dict[str, float]:
        """Reads stay on the old owners until the new ones have every copy (handover)."""
        if self.move is not None and self.move.phase is Phase.COPYING:
            return self.previous_weights()
        return self.current_weights()

    def write_weight_sets(self) -> tuple[dict[str, float], ...]:
        """Each set must acknowledge W copies: during copying and handover both rings do,
        so that whichever ring reads use, before or after the switch, sees the write."""
        if self.move is not None and self.move.phase in (Phase.COPYING, Phase.HANDOVER):
            return (self.previous_weights(), self.current_weights())
        return (self.current_weights(),)

    def current_ring(self) -> Ring:
        return ring_for(self.current_weights(), self.vnodes)

    def previous_ring(self) -> Ring:
        return ring_for(self.previous_weights(), self.vnodes)

    def read_ring(self) -> Ring:
        return ring_for(self.read_weights(), self.vnodes)

    def write_rings(self) -> tuple[Ring, ...]:
        return tuple(ring_for(w, self.vnodes) for w in self.write_weight_sets())

    def writes_to(self, node: str, key: str) -> bool:
        """Whether a write of ``key`` goes to ``node`` under this map.

        A hint for a node that no longer holds the key is dropped rather than
        delivered: the key's owners have the write (their quorum, and a move's
        copies), and a delivered copy would be an orphan no cleanup removes.
        """
        return any(node in ring.preference_list(key, self.n) for ring in self.write_rings())

    # -- JSON --------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "cluster_id": self.cluster_id,
            "epoch": self.epoch,
            "members": [
                {"id": m.id, "address": m.address, "weight": m.weight, "state": m.state.value}
                for m in self.members
            ],
            "replication": {"n": self.n, "r": self.r, "w": self.w},
            "vnodes": self.vnodes,
            "move": None if self.move is None else _move_json(self.move),
        }

    @classmethod
    def from_json(cls, data: object) -> ClusterMap:
        """Parse and check a map from disk, the wire or a test.

        Checks everything a node would otherwise trip over later: types,
        ranges, unique ids, quorum sizes, and that members' states agree with
        the move's weights (see the module docstring).

        @raise InvalidMap: anything wrong, with a message that says what.
        """
        top = _object(data, "map", _MAP_KEYS)
        members = tuple(
            _member(item, f"members[{i}]") for i, item in enumerate(_list(top, "members"))
        )
        ids = [m.id for m in members]
        if len(set(ids)) != len(ids):
            duplicates = sorted({i for i in ids if ids.count(i) > 1})
            raise InvalidMap(f"map: duplicate member ids {duplicates}")
        replication = _object(top["replication"], "replication", {"n", "r", "w"})
        n, r, w = (_int(replication, k, "replication", 1) for k in ("n", "r", "w"))
        if r > n or w > n:
            raise InvalidMap(f"replication: r={r} and w={w} must not exceed n={n}")
        move = None if top["move"] is None else _move(top["move"])
        result = cls(
            cluster_id=_str(top, "cluster_id", "map"),
            epoch=_int(top, "epoch", "map", 0),
            members=members,
            n=n,
            r=r,
            w=w,
            vnodes=_int(top, "vnodes", "map", 1),
            move=move,
        )
        _check_states(result)
        return result


def bootstrap(
    cluster_id: str, nodes: Mapping[str, float], n: int, r: int, w: int, vnodes: int
) -> ClusterMap:
    """Epoch 1 of a new cluster: every node active, no move.

    @raise InvalidMap: no nodes, or sizes or weights out of range (checked as
        any map from the wire would be).
    """
    members = [Member(id, id, weight, MemberState.ACTIVE) for id, weight in nodes.items()]
    m = ClusterMap(cluster_id, 1, tuple(members), n, r, w, vnodes)
    return ClusterMap.from_json(m.to_json())


# Rings cost a few tenths of a second to build at the default vnodes, and a
# process needs at most two or three at a time (previous, current, a plan).
_RINGS_CACHED = 8
_rings: dict[tuple[tuple[tuple[str, float], ...], int], Ring] = {}
_rings_lock = threading.Lock()


def ring_for(weights: Mapping[str, float], vnodes: int) -> Ring:
    """The ring for C{weights}, built once for the last few weight sets asked for."""
    return complete(ring_steps(weights, vnodes))


def ring_steps(weights: Mapping[str, float], vnodes: int) -> Steps[Ring]:
    """L{ring_for} a step at a time (L{Ring.stepwise}): no step when it is cached.

    For a process that builds a new map's rings on its reactor, between
    requests (L{shardkv.cluster.stepwise}).
    """
    key = (tuple(sorted(weights.items())), vnodes)
    with _rings_lock:
        ring = _rings.pop(key, None)
    if ring is None:
        ring = yield from Ring.stepwise(dict(key[0]), vnodes)
    with _rings_lock:
        _rings[key] = ring
        while len(_rings) > _RINGS_CACHED:
            del _rings[next(iter(_rings))]
    return ring


# -- parsing helpers ---------------------------------------------------------------

_MAP_KEYS = {"cluster_id", "epoch", "members", "replication", "vnodes", "move"}
_MEMBER_KEYS = {"id", "address", "weight", "state"}
_MOVE_KEYS = {
    "phase",
    "previous",
    "copy",
    "rate",
    "keys_total",
    "bytes_total",
    "started_ms",
    "aborted",
}


def _move_json(move: Move) -> dict[str, Any]:
    return {
        "phase": move.phase.value,
        "previous": dict(move.previous),
        "copy": move.copy,
        "rate": move.rate,
        "keys_total": move.keys_total,
        "bytes_total": move.bytes_total,
        "started_ms": move.started_ms,
        "aborted": move.aborted,
    }


def _object(data: object, where: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InvalidMap(f"{where} must be a JSON object, not {type(data).__name__}")
    missing = keys - data.keys()
    if missing:
        raise InvalidMap(f"{where}: missing {sorted(missing)}")
    extra = data.keys() - keys
    if extra:
        raise InvalidMap(f"{where}: unknown fields {sorted(map(str, extra))}")
    return data


def _str(data: dict[str, Any], key: str, where: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not value:
        raise InvalidMap(f"{where}: {key} must be a non-empty string, not {value!r}")
    return value


def _int(data: dict[str, Any], key: str, where: str, minimum: int) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidMap(f"{where}: {key} must be an integer >= {minimum}, not {value!r}")
    return value


def _bool(data: dict[str, Any], key: str, where: str) -> bool:
    value = data[key]
    if not isinstance(value, bool):
        raise InvalidMap(f"{where}: {key} must be true or false, not {value!r}")
    return value


def positive_weight(value: object) -> float | None:
    """C{value} as a weight, or None unless it is a finite number > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) and number > 0 else None


def _weight(value: object, where: str) -> float:
    number = positive_weight(value)
    if number is None:
        raise InvalidMap(f"{where}: weight must be a finite number > 0, not {value!r}")
    return number


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data[key]
    if not isinstance(value, list):
        raise InvalidMap(f"map: {key} must be a list, not {type(value).__name__}")
    return value


_E = TypeVar("_E", bound=enum.StrEnum)


def _enum(cls: type[_E], value: object, where: str) -> _E:
    for member in cls:
        if member.value == value:
            return member
    allowed = ", ".join(e.value for e in cls)
    raise InvalidMap(f"{where}: {value!r} is not one of {allowed}")


def _member(data: object, where: str) -> Member:
    item = _object(data, where, _MEMBER_KEYS)
    return Member(
        id=_str(item, "id", where),
        address=_str(item, "address", where),
        weight=_weight(item["weight"], where),
        state=_enum(MemberState, item["state"], f"{where}.state"),
    )


def _move(data: object) -> Move:
    item = _object(data, "move", _MOVE_KEYS)
    previous = item["previous"]
    if not isinstance(previous, dict) or not previous:
        raise InvalidMap("move: previous must be a non-empty object of member ids to weights")
    weights = {}
    for id, weight in previous.items():
        if not isinstance(id, str) or not id:
            raise InvalidMap("move.previous: a member id must be a non-empty string")
        weights[id] = _weight(weight, f"move.previous[{id!r}]")
    return Move(
        phase=_enum(Phase, item["phase"], "move.phase"),
        previous=weights,
        copy=_bool(item, "copy", "move"),
        rate=_int(item, "rate", "move", 0),
        keys_total=_int(item, "keys_total", "move", 0),
        bytes_total=_int(item, "bytes_total", "move", 0),
        started_ms=_int(item, "started_ms", "move", 0),
        aborted=_bool(item, "aborted", "move"),
    )


def derive_state(in_current: bool, in_previous: bool) -> MemberState:
    """A member's state from the rings it is in (see the module docstring)."""
    if in_current:
        return MemberState.ACTIVE if in_previous else MemberState.JOINING
    return MemberState.LEAVING if in_previous else MemberState.REMOVED


def _check_states(m: ClusterMap) -> None:
    current = m.current_weights()
    if not current:
        raise InvalidMap("map: no member is joining or active, so no ring can be built")
    if m.move is None:
        odd = [x.id for x in m.members if x.state in (MemberState.JOINING, MemberState.LEAVING)]
        if odd:
            raise InvalidMap(f"map: members {odd} are joining or leaving, but no move runs")
        return
    unknown = sorted(set(m.move.previous) - {x.id for x in m.members})
    if unknown:
        raise InvalidMap(f"move.previous names {unknown}, which are not members")
    for x in m.members:
        expected = derive_state(x.id in current, x.id in m.move.previous)
        if x.state is not expected:
            raise InvalidMap(
                f"member {x.id!r} is {x.state.value}, but its place in the previous and "
                f"current rings makes it {expected.value}"
            )
        if x.state is MemberState.LEAVING and x.weight != m.move.previous[x.id]:
            raise InvalidMap(f"member {x.id!r} is leaving with a weight unlike its previous one")
