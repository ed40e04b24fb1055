"""
Tests of L{shardkv.core.quorum.JointWriteQuorum}: the write quorum of a map
change's pending-ranges phases, W acknowledgements within each of the
previous and the current replica sets.

Hypothesis draws two overlapping sets, W, and a prefix of replies in any
order; the outcome is checked against a model: OK exactly when every set has
W acks, undecided while every set can still reach W, and never FAILED while
any target may hold the write (it answered OK or UNKNOWN, or has not
answered yet).
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from shardkv.core.quorum import JointWriteQuorum, Outcome, Reply, Target

PROPERTY = settings(database=None, deadline=None, max_examples=400)
POOL = [f"n{i}" for i in range(7)]


def test_targets_are_the_union_in_order_each_once() -> None:
    q = JointWriteQuorum([["a", "b", "c"], ["b", "c", "d"]], w=2)
    assert q.targets == [Target("a"), Target("b"), Target("c"), Target("d")]
    assert all(t.hint_for is None for t in q.targets)


def test_ok_needs_w_in_each_set() -> None:
    """
    Acks from a, b satisfy the old set only; the write is acknowledged once
    the new set also has two (b and d), not before.
    """
    q = JointWriteQuorum([["a", "b", "c"], ["b", "c", "d"]], w=2)
    q.add(Target("a"), Reply.OK)
    q.add(Target("b"), Reply.OK)
    assert q.set_acks() == [2, 1]
    assert q.outcome() is None
    q.add(Target("d"), Reply.OK)
    assert q.outcome() is Outcome.OK
    assert q.acks == 2


def test_one_set_out_of_reach_decides_unknown_when_anything_may_hold_it() -> None:
    q = JointWriteQuorum([["a", "b", "c"], ["b", "c", "d"]], w=2)
    q.add(Target("a"), Reply.OK)
    q.add(Target("c"), Reply.FAILED)
    q.add(Target("d"), Reply.FAILED)
    # The new set {b, c, d} can reach at most 1.
    assert not q.reachable()
    assert q.outcome() is Outcome.UNKNOWN


def test_failed_only_when_every_target_answered_and_none_may_hold_it() -> None:
    q = JointWriteQuorum([["a", "b"], ["b", "c"]], w=2)
    for node in "abc":
        q.add(Target(node), Reply.FAILED)
    assert q.outcome() is Outcome.FAILED


def test_identical_sets_behave_like_one() -> None:
    q = JointWriteQuorum([["a", "b", "c"], ["c", "b", "a"]], w=2)
    q.add(Target("a"), Reply.OK)
    q.add(Target("c"), Reply.OK)
    assert q.outcome() is Outcome.OK


@dataclass
class Case:
    sets: list[list[str]]
    w: int
    replies: list[tuple[str, Reply]]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    n = draw(st.integers(1, 4))
    old = draw(st.lists(st.sampled_from(POOL), min_size=n, max_size=n, unique=True))
    new = draw(st.lists(st.sampled_from(POOL), min_size=n, max_size=n, unique=True))
    w = draw(st.integers(1, n))
    union = list(dict.fromkeys(old + new))
    order = draw(st.permutations(union))
    answered = draw(st.integers(0, len(union)))
    kinds = draw(st.lists(st.sampled_from(list(Reply)), min_size=answered, max_size=answered))
    return Case([old, new], w, list(zip(order[:answered], kinds, strict=True)))


@given(cases())
@PROPERTY
def test_joint_quorum_model(case: Case) -> None:
    q = JointWriteQuorum(case.sets, case.w)
    for node, reply in case.replies:
        q.add(Target(node), reply)
        outcome = q.outcome()
        replies = dict(q.replies)
        acked = {t.node for t, r in replies.items() if r is Reply.OK}
        per_set = [len(acked & set(s)) for s in case.sets]
        if outcome is Outcome.OK:
            assert all(a >= case.w for a in per_set)
        else:
            assert not all(a >= case.w for a in per_set)
        in_flight = len(replies) < len(q.targets)
        maybe = any(r in (Reply.OK, Reply.UNKNOWN) for r in replies.values())
        if in_flight or maybe:
            assert outcome is not Outcome.FAILED
        answered = {t.node for t in replies}
        can = [
            a + len(set(s) - answered) >= case.w for a, s in zip(per_set, case.sets, strict=True)
        ]
        if outcome is None:
            assert all(can)
        elif outcome is not Outcome.OK:
            assert not all(can)
    if len(case.replies) == len(q.targets):
        assert q.complete
        assert q.outcome() is not None
