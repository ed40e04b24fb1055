"""Membership changes as pure transitions of the cluster map.

A change runs through four map epochs (see the table in
C{docs/architecture.md}): L{stage} starts a move in phase C{copying},
L{next_phase} steps it through C{handover} and C{cleanup} back to idle, and
L{abort} turns it back. Each returns a new map with C{epoch + 1} and leaves
its argument alone, so the proposer can run one as the "change" of a
compare-and-set, and tests can walk every path without a network.

Member states are never set by hand: L{_rebuild} derives them from the two
weight sets (current, previous), which is what keeps C{abort}, a swap of
the two sets, a two-line function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from shardkv.core.clustermap import (
    ClusterMap,
    Member,
    MemberState,
    Move,
    Phase,
    derive_state,
    positive_weight,
)
from shardkv.errors import (
    InvalidChange,
    MapConflict,
    MoveInProgress,
    NoMove,
    TooFewMembers,
    TooLateToAbort,
    UnknownMember,
)


def stage(
    current: ClusterMap,
    add: Sequence[tuple[str, float]] = (),
    remove: Sequence[str] = (),
    weights: Mapping[str, float] = {},
    rate: int = 0,
    now_ms: int = 0,
) -> ClusterMap:
    """The map that starts moving to a new membership: phase C{copying}, epoch + 1.

    C{add} holds (address, weight) pairs; a new member's id is its address.
    A removed member may be added again (it joins afresh).

    @raise MoveInProgress: a move already runs.
    @raise UnknownMember: C{remove} or C{weights} names an id that is not a
        member, or is already removed.
    @raise InvalidChange: nothing to change, a bad weight, an id named twice,
        or a change that leaves every weight as it was.
    @raise TooFewMembers: the new ring would hold fewer than N members (and
        fewer than it holds now: a cluster that was bootstrapped below N may
        still add nodes or change weights).
    """
    if current.move is not None:
        raise MoveInProgress(
            f"a move ({current.move.phase.value}) is in progress at epoch {current.epoch}; "
            "wait for it to finish or abort it",
            epoch=current.epoch,
        )
    if not add and not remove and not weights:
        raise InvalidChange("the change adds, removes and reweights nothing")
    before = current.current_weights()
    after = dict(before)
    addresses: dict[str, str] = {}
    named: set[str] = set()

    def once(id: str) -> None:
        if id in named:
            raise InvalidChange(f"member {id!r} is named more than once in the change")
        named.add(id)

    for address, weight in add:
        if not isinstance(address, str) or not address:
            raise InvalidChange(f"an added member needs a non-empty address, not {address!r}")
        once(address)
        if address in before:
            raise InvalidChange(f"{address} is already a member", member=address)
        after[address] = _weight(address, weight)
        addresses[address] = address
    for id in remove:
        once(id)
        if id not in before:
            raise UnknownMember(f"no member {id!r} to remove", member=id)
        del after[id]
    for id, weight in weights.items():
        once(id)
        if id not in before:
            raise UnknownMember(f"no member {id!r} to reweight", member=id)
        after[id] = _weight(id, weight)
    if after == before:
        raise InvalidChange("the change leaves every member's weight as it is")
    if len(after) < current.n and len(after) < len(before):
        what = f"removing {', '.join(remove)}" if remove else "this change"
        raise TooFewMembers(
            f"{what} would leave {len(after)} members, fewer than N={current.n} replicas",
            members=len(after),
            n=current.n,
        )
    move = Move(Phase.COPYING, before, rate=rate, started_ms=now_ms)
    return _rebuild(current, after, move, addresses)


def next_phase(current: ClusterMap) -> ClusterMap:
    """The next step of the move: copying -> handover -> cleanup -> idle.

    Going idle drops the move, so joining members become active and leaving
    ones removed.

    @raise NoMove: no move runs.
    """
    move = _move(current)
    if move.phase is Phase.COPYING:
        return _rebuild(current, current.current_weights(), _phase(move, Phase.HANDOVER))
    if move.phase is Phase.HANDOVER:
        return _rebuild(current, current.current_weights(), _phase(move, Phase.CLEANUP))
    return _rebuild(current, current.current_weights(), None)


def abort(current: ClusterMap) -> ClusterMap:
    """Turn the move back by swapping its previous and current weights.

    Reads never switch rings on an abort: from C{copying} (reads on the old
    ring) it goes to C{handover} of the swapped move (reads on its current
    ring, the old one); from C{handover} (reads on the new ring) it goes to
    C{copying} of the swapped move (reads on its previous ring, the new one).
    That second case skips the copy, since the old owners kept their records
    and took every write since: unless the move had been aborted already
    from C{copying}, in which case the ring it now moves to was never filled
    and must be copied after all.

    @raise NoMove: no move runs.
    @raise TooLateToAbort: the move is in C{cleanup}, deleting old copies.
    """
    move = _move(current)
    if move.phase is Phase.CLEANUP:
        raise TooLateToAbort(
            f"the move at epoch {current.epoch} is already deleting the old copies; "
            "it can only finish",
            epoch=current.epoch,
        )
    previous = current.current_weights()
    if move.phase is Phase.COPYING:
        swapped = dataclasses.replace(move, phase=Phase.HANDOVER, previous=previous, aborted=True)
    else:
        copy = move.aborted and move.copy
        swapped = dataclasses.replace(
            move, phase=Phase.COPYING, previous=previous, copy=copy, aborted=True
        )
    return _rebuild(current, dict(move.previous), swapped)


def expect_epoch(current: ClusterMap | None, epoch: int) -> ClusterMap:
    """C{current}, if it is still at C{epoch}: a plan made at one epoch must not
    be committed over another. @raise MapConflict: it is not (or there is no map)."""
    if current is None:
        raise MapConflict(f"the cluster has no map, not one at epoch {epoch}", epoch=None)
    if current.epoch != epoch:
        raise MapConflict(
            f"the map is at epoch {current.epoch}, not {epoch}; plan again",
            epoch=current.epoch,
        )
    return current


def ideal_fraction(before: Mapping[str, float], after: Mapping[str, float]) -> float:
    """The least share of all copies that any placement must move for this change.

    A node whose share of the hash space grows from s to s' must receive
    s' - s of the data, and nothing else has to move, so the ideal is the sum
    of the gains; adding k equal nodes to n gives k / (n + k). Computed from
    weights, not rings, so that it measures the ring's own overhead too.
    """
    total_before = sum(before.values())
    total_after = sum(after.values())
    if total_before <= 0 or total_after <= 0:
        raise ValueError("ideal_fraction needs at least one weight > 0 on each side")
    return sum(
        max(0.0, after.get(id, 0.0) / total_after - before.get(id, 0.0) / total_before)
        for id in set(before) | set(after)
    )


# -- helpers -----------------------------------------------------------------------


def _weight(id: str, weight: object) -> float:
    number = positive_weight(weight)
    if number is None:
        raise InvalidChange(
            f"member {id!r}: weight must be a finite number > 0, not {weight!r}", member=id
        )
    return number


def _move(current: ClusterMap) -> Move:
    if current.move is None:
        raise NoMove(f"no move is in progress at epoch {current.epoch}", epoch=current.epoch)
    return current.move


def _phase(move: Move, phase: Phase) -> Move:
    return dataclasses.replace(move, phase=phase)


def _rebuild(
    m: ClusterMap,
    current: Mapping[str, float],
    move: Move | None,
    addresses: Mapping[str, str] = {},
) -> ClusterMap:
    """C{m} at the next epoch with these current weights and move; every member's
    weight and state follow from them (a member in neither ring keeps its last
    weight, for the record)."""
    previous = move.previous if move is not None else current
    old = {x.id: x for x in m.members}
    members = []
    for id in sorted(set(old) | set(current) | set(previous)):
        weight = current.get(id, previous.get(id))
        if weight is None:
            weight = old[id].weight
        address = addresses.get(id) or old[id].address
        state = derive_state(id in current, id in previous)
        members.append(Member(id, address, weight, state))
    assert any(x.state is not MemberState.REMOVED for x in members)
    return dataclasses.replace(m, epoch=m.epoch + 1, members=tuple(members), move=move)
