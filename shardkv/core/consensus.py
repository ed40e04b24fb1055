"""CASPaxos rules for changing the cluster map, with no I/O.

Why consensus at all: two operators (or two proxies) may change the map at
the same moment. If each wrote its map to the nodes it could reach, two
maps could hold one epoch and the cluster would place keys two ways. With
CASPaxos (Rystsov, 2018) a change is a compare-and-set that a majority of
acceptors must accept, and any two majorities share an acceptor, so only
one value can be chosen per round; the loser of a race reads the winner's
map in its next prepare, and its change function (which checks the epoch
the operator planned against) refuses to apply on top of it.

A round, run by L{shardkv.cluster.proposer} over HTTP:

1. Prepare: pick a ballot higher than any seen (L{next_ballot}); each
   acceptor promises to ignore lower ballots (L{on_prepare}) and returns
   what it accepted last.
2. With promises from a majority, the current value is the one accepted at
   the highest ballot among them (L{newest_accepted}); apply the change.
3. Accept: each acceptor takes the new value unless it has promised a
   higher ballot (L{on_accept}). Accepted by a majority, it is chosen.

Ballots are C{(counter, proposer_id)} compared as tuples, so two proposers
never use the same ballot. The acceptor's state must be stored durably
before its answer is sent; that is the node's job (C{MapStore}).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from shardkv.errors import InvalidMap

Ballot = tuple[int, str]


@dataclass(frozen=True)
class AcceptorState:
    """What one acceptor has promised and accepted. C{accepted} is a MAP as JSON."""

    promised: Ballot | None = None
    accepted_ballot: Ballot | None = None
    accepted: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "promised": ballot_json(self.promised),
            "accepted_ballot": ballot_json(self.accepted_ballot),
            "accepted": self.accepted,
        }

    @classmethod
    def from_json(cls, data: object) -> AcceptorState:
        """@raise InvalidMap: not an acceptor state as L{to_json} writes it."""
        if not isinstance(data, dict) or set(data) != {"promised", "accepted_ballot", "accepted"}:
            raise InvalidMap("acceptor state needs exactly promised, accepted_ballot, accepted")
        accepted = data["accepted"]
        if accepted is not None and not isinstance(accepted, dict):
            raise InvalidMap("acceptor state: accepted must be a map object or null")
        promised = parse_ballot(data["promised"])
        accepted_ballot = parse_ballot(data["accepted_ballot"])
        if (accepted_ballot is None) != (accepted is None):
            raise InvalidMap("acceptor state: accepted and accepted_ballot go together")
        if accepted_ballot is not None and (promised is None or accepted_ballot > promised):
            raise InvalidMap("acceptor state: accepted a ballot above its promise")
        return cls(promised, accepted_ballot, accepted)


@dataclass(frozen=True)
class Promise:
    """An acceptor's answer to a prepare; with C{promised} false, C{promised_ballot}
    is the higher ballot that beat it, for the proposer's next try."""

    promised: bool
    promised_ballot: Ballot | None
    accepted_ballot: Ballot | None
    accepted: dict[str, Any] | None


def on_prepare(state: AcceptorState, ballot: Ballot) -> tuple[AcceptorState, Promise]:
    """Promise C{ballot} if it is above every ballot promised so far."""
    if state.promised is None or ballot > state.promised:
        state = AcceptorState(ballot, state.accepted_ballot, state.accepted)
        return state, Promise(True, ballot, state.accepted_ballot, state.accepted)
    return state, Promise(False, state.promised, state.accepted_ballot, state.accepted)


def on_accept(
    state: AcceptorState, ballot: Ballot, value: dict[str, Any]
) -> tuple[AcceptorState, bool]:
    """Accept C{value} unless a higher ballot was promised.

    Equal is accepted: it is the ballot this acceptor promised, in the round
    it promised it for.
    """
    if state.promised is None or ballot >= state.promised:
        return AcceptorState(ballot, ballot, value), True
    return state, False


def newest_accepted(promises: Iterable[Promise]) -> dict[str, Any] | None:
    """The value accepted at the highest ballot among C{promises} (None: none accepted yet).

    Any value that may have been chosen was accepted by a majority, and so
    by one of any majority of promisers, at the highest ballot accepted so
    far: building on anything older could lose it.
    """
    best: Ballot | None = None
    value: dict[str, Any] | None = None
    for promise in promises:
        if promise.accepted_ballot is not None and (best is None or promise.accepted_ballot > best):
            best, value = promise.accepted_ballot, promise.accepted
    return value


def is_majority(ids: Iterable[str], members: Iterable[str]) -> bool:
    """Whether more than half of C{members} are in C{ids}; other ids do not count."""
    voters = set(members)
    return 2 * len(voters.intersection(ids)) > len(voters)


def next_ballot(seen: Iterable[Ballot | None], proposer: str) -> Ballot:
    """A ballot above every one in C{seen}, owned by C{proposer}."""
    return (1 + max((b[0] for b in seen if b is not None), default=0), proposer)


def ballot_json(ballot: Ballot | None) -> list[Any] | None:
    return None if ballot is None else [ballot[0], ballot[1]]


def parse_ballot(data: object) -> Ballot | None:
    """A ballot from JSON: C{[counter, proposer]} or null. @raise InvalidMap: anything else."""
    if data is None:
        return None
    if (
        isinstance(data, list | tuple)
        and len(data) == 2
        and isinstance(data[0], int)
        and not isinstance(data[0], bool)
        and data[0] >= 0
        and isinstance(data[1], str)
        and data[1]
    ):
        return (data[0], data[1])
    raise InvalidMap(f"a ballot must be [counter >= 0, proposer id], not {data!r}")
