"""
Tests for L{shardkv.core.consensus}: the acceptor's rules one by one, the
acceptor state's JSON, and a Hypothesis model of whole rounds.

The model is what the rules are for: several proposers run prepare and
accept steps in any interleaving over three to five acceptors, any message
(request or reply) may be lost, and each proposer builds its value on what
its promises showed, as the map proposer does (epoch + 1). Whatever
happens, two different values must never be chosen for one epoch, where
chosen means accepted by a majority at one ballot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardkv.core.consensus import (
    AcceptorState,
    Ballot,
    Promise,
    is_majority,
    newest_accepted,
    next_ballot,
    on_accept,
    on_prepare,
    parse_ballot,
)
from shardkv.errors import InvalidMap
from tests.core.helpers import PROPERTY

V1 = {"epoch": 1}
V2 = {"epoch": 2}


def test_prepare_promises_only_higher_ballots() -> None:
    state, promise = on_prepare(AcceptorState(), (1, "p"))
    assert promise == Promise(True, (1, "p"), None, None)
    assert state.promised == (1, "p")
    same, again = on_prepare(state, (1, "p"))
    assert (same, again.promised, again.promised_ballot) == (state, False, (1, "p"))
    lower, refused = on_prepare(state, (0, "z"))
    assert lower == state and not refused.promised
    # Ballots compare as (counter, proposer): the id breaks a tie of counters.
    higher, ok = on_prepare(state, (1, "q"))
    assert ok.promised and higher.promised == (1, "q")


def test_prepare_reports_what_was_accepted() -> None:
    state, accepted = on_accept(AcceptorState(), (2, "p"), V1)
    assert accepted
    assert state == AcceptorState((2, "p"), (2, "p"), V1)
    _, promise = on_prepare(state, (3, "q"))
    assert promise == Promise(True, (3, "q"), (2, "p"), V1)
    _, refused = on_prepare(state, (1, "q"))
    assert refused == Promise(False, (2, "p"), (2, "p"), V1)


def test_accept_unless_a_higher_ballot_was_promised() -> None:
    promised, _ = on_prepare(AcceptorState(), (5, "p"))
    after, ok = on_accept(promised, (5, "p"), V1)
    assert ok and after == AcceptorState((5, "p"), (5, "p"), V1)
    unchanged, refused = on_accept(promised, (4, "z"), V2)
    assert not refused and unchanged == promised
    later, ok = on_accept(after, (7, "q"), V2)
    assert ok and later == AcceptorState((7, "q"), (7, "q"), V2)


def test_newest_accepted() -> None:
    promises = [
        Promise(True, (9, "a"), (3, "b"), {"epoch": 3}),
        Promise(True, (9, "a"), None, None),
        Promise(True, (9, "a"), (3, "c"), {"epoch": 4}),
        Promise(True, (9, "a"), (2, "z"), {"epoch": 2}),
    ]
    assert newest_accepted(promises) == {"epoch": 4}
    assert newest_accepted(promises[1:2]) is None
    assert newest_accepted([]) is None


def test_is_majority() -> None:
    members = ["a", "b", "c", "d"]
    assert not is_majority(["a", "b"], members)
    assert is_majority(["a", "b", "c"], members)
    assert not is_majority(["a", "b", "x", "y"], members)  # outsiders do not count
    assert is_majority(["a", "a", "b", "c"], members)
    assert is_majority(["a"], ["a"])
    assert not is_majority([], ["a"])
    assert not is_majority(["a"], [])
    assert is_majority(["a", "b"], ["a", "b", "c"])


def test_next_ballot() -> None:
    assert next_ballot([], "p") == (1, "p")
    assert next_ballot([None, (4, "z"), (2, "a")], "p") == (5, "p")
    assert next_ballot([(4, "z")], "z") > (4, "z")


# --- JSON ---------------------------------------------------------------------------


def test_acceptor_state_round_trips() -> None:
    for state in (
        AcceptorState(),
        AcceptorState((3, "p"), None, None),
        AcceptorState((3, "p"), (2, "q"), V1),
    ):
        assert AcceptorState.from_json(state.to_json()) == state
    assert AcceptorState((3, "p"), (2, "q"), V1).to_json() == {
        "promised": [3, "p"],
        "accepted_ballot": [2, "q"],
        "accepted": V1,
    }


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {},
        {"promised": None, "accepted_ballot": None},
        {"promised": None, "accepted_ballot": None, "accepted": None, "extra": 1},
        {"promised": [1], "accepted_ballot": None, "accepted": None},
        {"promised": [1, ""], "accepted_ballot": None, "accepted": None},
        {"promised": [-1, "p"], "accepted_ballot": None, "accepted": None},
        {"promised": [True, "p"], "accepted_ballot": None, "accepted": None},
        {"promised": ["1", "p"], "accepted_ballot": None, "accepted": None},
        {"promised": [1, "p"], "accepted_ballot": [1, "p"], "accepted": None},
        {"promised": [1, "p"], "accepted_ballot": None, "accepted": V1},
        {"promised": [1, "p"], "accepted_ballot": [1, "p"], "accepted": "map"},
        {"promised": [1, "p"], "accepted_ballot": [2, "p"], "accepted": V1},
        {"promised": None, "accepted_ballot": [1, "p"], "accepted": V1},
    ],
)
def test_acceptor_state_rejects_bad_json(data: object) -> None:
    with pytest.raises(InvalidMap):
        AcceptorState.from_json(data)


def test_parse_ballot() -> None:
    assert parse_ballot([0, "p"]) == (0, "p")
    assert parse_ballot(None) is None
    for bad in ([1, 2], [1, "p", 3], "1:p", {"counter": 1}, [1.0, "p"]):
        with pytest.raises(InvalidMap):
            parse_ballot(bad)


# --- the model ------------------------------------------------------------------------


@dataclass
class Proposer:
    id: str
    seen: list[Ballot | None] = field(default_factory=list)
    pending: tuple[Ballot, dict[str, Any]] | None = None


@dataclass
class Cluster:
    acceptors: dict[str, AcceptorState]
    proposers: list[Proposer]
    # Every acceptance that happened: ballot -> (value, acceptors that accepted it).
    log: dict[Ballot, tuple[dict[str, Any], set[str]]] = field(default_factory=dict)
    # Every value proposed, by its ballot: its "parent" is the ballot of the value it built on.
    proposed: dict[Ballot, dict[str, Any]] = field(default_factory=dict)

    def prepare(self, p: Proposer, reached: set[str], answered: set[str]) -> None:
        """A prepare reaches ``reached``; the replies of ``answered`` come back."""
        ballot = next_ballot(p.seen, p.id)
        p.seen.append(ballot)
        promises = {}
        for a in sorted(reached):
            self.acceptors[a], promise = on_prepare(self.acceptors[a], ballot)
            if a in answered:
                promises[a] = promise
                p.seen += [promise.promised_ballot, promise.accepted_ballot]
        granted = [a for a, promise in promises.items() if promise.promised]
        if not is_majority(granted, self.acceptors):
            p.pending = None
            return
        current = newest_accepted(promises[a] for a in granted)
        epoch = 0 if current is None else current["epoch"]
        parent = None if current is None else current["ballot"]
        value = {"epoch": epoch + 1, "by": p.id, "ballot": list(ballot), "parent": parent}
        p.pending = (ballot, value)
        self.proposed[ballot] = value

    def accept(self, p: Proposer, reached: set[str], answered: set[str]) -> None:
        """The pending accept reaches ``reached``; it may be sent again to others later."""
        if p.pending is None:
            return
        ballot, value = p.pending
        for a in sorted(reached):
            self.acceptors[a], ok = on_accept(self.acceptors[a], ballot, value)
            if ok:
                self.log.setdefault(ballot, (value, set()))[1].add(a)
            elif a in answered:
                p.seen.append(self.acceptors[a].promised)

    def lineage(self, value: dict[str, Any]) -> set[Ballot]:
        """The ballots of C{value} and of every value it was built on."""
        found: set[Ballot] = set()
        node: dict[str, Any] | None = value
        while node is not None:
            found.add((node["ballot"][0], node["ballot"][1]))
            parent = node["parent"]
            node = None if parent is None else self.proposed[(parent[0], parent[1])]
        return found

    def chosen(self) -> dict[Ballot, dict[str, Any]]:
        return {
            ballot: value
            for ballot, (value, voters) in self.log.items()
            if is_majority(voters, self.acceptors)
        }


# Which acceptors a request reaches, and which of those answer, as bit masks.
# Half the time everything arrives: races between proposers that all reach
# a majority are what could choose two values, so they must be common.
masks = st.one_of(st.just(31), st.integers(0, 31))
steps = st.tuples(st.sampled_from(["prepare", "accept"]), st.integers(0, 2), masks, masks)


@settings(PROPERTY, max_examples=1000)
@given(st.integers(3, 5), st.integers(2, 3), st.lists(steps, max_size=40))
def test_no_two_values_are_chosen_for_one_epoch(
    size: int, proposers: int, schedule: list[tuple[str, int, int, int]]
) -> None:
    """
    Under any interleaving and any loss, every value chosen for an epoch is
    the same value, and a value chosen at a higher ballot was built, through
    any number of proposals, on the value chosen before it: no chosen
    change is ever lost.
    """
    names = [f"n{i}" for i in range(size)]
    cluster = Cluster(
        {a: AcceptorState() for a in names}, [Proposer(f"p{i}") for i in range(proposers)]
    )
    for kind, who, reach_mask, answer_mask in schedule:
        p = cluster.proposers[who % proposers]
        reached = {a for i, a in enumerate(names) if reach_mask >> i & 1}
        answered = {a for i, a in enumerate(names) if answer_mask >> i & 1} & reached
        if kind == "prepare":
            cluster.prepare(p, reached, answered)
        else:
            cluster.accept(p, reached, answered)
        chosen = sorted(cluster.chosen().items())
        by_epoch: dict[int, dict[str, Any]] = {}
        for _, value in chosen:
            assert by_epoch.setdefault(value["epoch"], value) == value, chosen
        for (earlier, _), (_, later) in pairwise(chosen):
            assert earlier in cluster.lineage(later), chosen


def test_the_model_can_choose_values() -> None:
    """The safety property above means little if nothing is ever chosen: a
    proposer that reaches everyone chooses, and a rival then builds on it."""
    names = {"a", "b", "c"}
    cluster = Cluster({a: AcceptorState() for a in names}, [Proposer("p"), Proposer("q")])
    p, q = cluster.proposers
    cluster.prepare(p, names, names)
    cluster.accept(p, {"a", "b"}, {"a", "b"})
    assert [v["epoch"] for v in cluster.chosen().values()] == [1]
    cluster.prepare(q, {"b", "c"}, {"b", "c"})
    assert q.pending is not None and q.pending[1]["epoch"] == 2
    cluster.accept(p, {"c"}, {"c"})  # p's old ballot is refused now
    cluster.accept(q, {"b", "c"}, set())
    assert sorted(v["epoch"] for v in cluster.chosen().values()) == [1, 2]
