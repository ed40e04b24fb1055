"""
Tests for L{shardkv.core.membership}: staging a change, stepping a move
through its phases, aborting it, and the ideal fraction a plan is judged by.

Each error an operator can meet has a test of its own, since the admin API
answers with its code and status. A Hypothesis walk over random changes,
phases and aborts checks what must hold on every path: each step is one
epoch, every map it yields is valid, and a move always ends on either the
old membership or the new one.
"""

from __future__ import annotations

import math
from random import Random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardkv.core.clustermap import ClusterMap, MemberState, Phase, bootstrap
from shardkv.core.membership import abort, expect_epoch, ideal_fraction, next_phase, stage
from shardkv.errors import (
    InvalidChange,
    MapConflict,
    MoveInProgress,
    NoMove,
    TooFewMembers,
    TooLateToAbort,
    UnknownMember,
)
from tests.core.helpers import PROPERTY

A, B, C, D, E = (f"127.0.0.1:808{i}" for i in range(1, 6))


def three() -> ClusterMap:
    return bootstrap("c", {A: 1, B: 1, C: 1}, 3, 2, 2, 16)


def states(m: ClusterMap) -> dict[str, str]:
    return {x.id: x.state.value for x in m.members}


# --- stage -------------------------------------------------------------------------


def test_stage_an_addition() -> None:
    m = three()
    staged = stage(m, add=[(D, 2)], rate=500, now_ms=1234)
    assert staged.epoch == m.epoch + 1
    assert staged.move is not None
    assert staged.move.phase is Phase.COPYING
    assert staged.move.previous == {A: 1.0, B: 1.0, C: 1.0}
    assert (staged.move.rate, staged.move.started_ms, staged.move.copy) == (500, 1234, True)
    assert not staged.move.aborted
    assert staged.current_weights() == {A: 1.0, B: 1.0, C: 1.0, D: 2.0}
    assert states(staged) == {A: "active", B: "active", C: "active", D: "joining"}
    assert staged.member(D).address == D
    assert m.epoch == 1 and m.move is None  # the argument is left alone
    assert ClusterMap.from_json(staged.to_json()) == staged


def test_stage_a_removal_and_a_reweight() -> None:
    staged = stage(
        bootstrap("c", {A: 1, B: 1, C: 1, D: 1}, 3, 2, 2, 16), remove=[A], weights={B: 3}
    )
    assert states(staged) == {A: "leaving", B: "active", C: "active", D: "active"}
    assert staged.current_weights() == {B: 3.0, C: 1.0, D: 1.0}
    assert staged.previous_weights() == {A: 1.0, B: 1.0, C: 1.0, D: 1.0}
    assert staged.member(A).weight == 1.0


def test_a_removed_member_may_join_again() -> None:
    m = idle(stage(bootstrap("c", {A: 1, B: 1, C: 1, D: 1}, 3, 2, 2, 16), remove=[D]))
    assert m.member(D).state is MemberState.REMOVED
    again = stage(m, add=[(D, 1.5)])
    assert again.member(D).state is MemberState.JOINING
    assert again.member(D).weight == 1.5
    with pytest.raises(UnknownMember):
        stage(m, remove=[D])
    with pytest.raises(UnknownMember):
        stage(m, weights={D: 2})


def test_adding_a_member_twice_is_invalid() -> None:
    with pytest.raises(InvalidChange, match="already a member"):
        stage(three(), add=[(A, 1)])
    with pytest.raises(InvalidChange, match="more than once"):
        stage(three(), add=[(D, 1), (D, 1)])
    with pytest.raises(InvalidChange, match="more than once"):
        stage(three(), add=[(D, 1)], remove=[A], weights={A: 2})


@pytest.mark.parametrize("name", ["127.0.0.1:9", ""])
def test_removing_or_reweighting_an_unknown_member(name: str) -> None:
    with pytest.raises(UnknownMember) as caught:
        stage(three(), remove=[name])
    assert caught.value.details == {"member": name}
    with pytest.raises(UnknownMember):
        stage(three(), weights={name: 2})


@pytest.mark.parametrize("weight", [0, -1, math.nan, math.inf, True, "1", None, 10**400])
def test_bad_weights(weight: object) -> None:
    with pytest.raises(InvalidChange, match="weight"):
        stage(three(), add=[(D, weight)])  # type: ignore[list-item]
    with pytest.raises(InvalidChange, match="weight"):
        stage(three(), weights={A: weight})  # type: ignore[dict-item]


def test_a_change_must_change_something() -> None:
    with pytest.raises(InvalidChange):
        stage(three())
    with pytest.raises(InvalidChange, match="as it is"):
        stage(three(), weights={A: 1.0})
    with pytest.raises(InvalidChange, match="address"):
        stage(three(), add=[("", 1)])


def test_no_change_while_a_move_runs() -> None:
    staged = stage(three(), add=[(D, 1)])
    for m in (staged, next_phase(staged), next_phase(next_phase(staged)), abort(staged)):
        with pytest.raises(MoveInProgress) as caught:
            stage(m, add=[(E, 1)])
        assert caught.value.code == "move_in_progress"
        assert isinstance(caught.value, MapConflict)


def test_too_few_members_says_so() -> None:
    with pytest.raises(TooFewMembers) as caught:
        stage(three(), remove=[A])
    assert caught.value.message == f"removing {A} would leave 2 members, fewer than N=3 replicas"
    assert caught.value.details == {"members": 2, "n": 3}
    # Replacing a member keeps N members, so it is allowed.
    assert stage(three(), remove=[A], add=[(D, 1)]).current_weights().keys() == {B, C, D}


def test_a_cluster_below_n_may_still_grow_and_reweight() -> None:
    """
    A cluster bootstrapped with fewer nodes than N (two nodes, N=3) must be
    able to reach N, and reweighting does not make it any smaller.
    """
    small = bootstrap("c", {A: 1, B: 1}, 3, 2, 2, 16)
    assert stage(small, add=[(C, 1)]).current_weights().keys() == {A, B, C}
    assert stage(small, weights={A: 2}).current_weights() == {A: 2.0, B: 1.0}
    with pytest.raises(TooFewMembers):
        stage(small, remove=[B])


# --- phases ------------------------------------------------------------------------


def idle(m: ClusterMap) -> ClusterMap:
    while m.move is not None:
        m = next_phase(m)
    return m


def test_a_move_steps_through_its_phases() -> None:
    staged = stage(bootstrap("c", {A: 1, B: 1, C: 1}, 3, 2, 2, 16), add=[(D, 1)], remove=[A])
    handover = next_phase(staged)
    cleanup = next_phase(handover)
    done = next_phase(cleanup)
    assert [m.epoch for m in (staged, handover, cleanup, done)] == [2, 3, 4, 5]
    assert handover.move is not None and handover.move.phase is Phase.HANDOVER
    assert cleanup.move is not None and cleanup.move.phase is Phase.CLEANUP
    assert handover.move.previous == cleanup.move.previous == staged.previous_weights()
    assert states(handover) == states(cleanup) == states(staged)
    assert done.move is None
    assert states(done) == {A: "removed", B: "active", C: "active", D: "active"}
    with pytest.raises(NoMove) as caught:
        next_phase(done)
    assert caught.value.code == "no_move"


def test_abort_from_copying_keeps_reads_on_the_old_ring() -> None:
    staged = stage(three(), add=[(D, 1), (E, 1)], remove=[A, B], weights={C: 2}, rate=7)
    back = abort(staged)
    assert back.epoch == staged.epoch + 1
    assert back.move is not None
    assert (back.move.phase, back.move.aborted, back.move.rate) == (Phase.HANDOVER, True, 7)
    assert back.read_weights() == staged.read_weights() == {A: 1.0, B: 1.0, C: 1.0}
    assert set(map(frozenset, back.write_weight_sets())) == set(
        map(frozenset, staged.write_weight_sets())
    )
    assert states(back) == {A: "joining", B: "joining", C: "active", D: "leaving", E: "leaving"}
    assert ClusterMap.from_json(back.to_json()) == back
    done = idle(back)
    assert done.current_weights() == {A: 1.0, B: 1.0, C: 1.0}
    assert states(done) == {A: "active", B: "active", C: "active", D: "removed", E: "removed"}


def test_abort_from_handover_skips_the_copy() -> None:
    """
    In handover the old owners still hold every record and took every write
    since, so the way back has nothing to copy; reads stay on the new ring.
    """
    handover = next_phase(stage(three(), add=[(D, 1)]))
    back = abort(handover)
    assert back.move is not None
    assert (back.move.phase, back.move.copy, back.move.aborted) == (Phase.COPYING, False, True)
    assert back.read_weights() == handover.read_weights() == {A: 1.0, B: 1.0, C: 1.0, D: 1.0}
    assert states(back) == {A: "active", B: "active", C: "active", D: "leaving"}
    assert idle(back).current_weights() == {A: 1.0, B: 1.0, C: 1.0}


def test_aborting_an_abort_copies_again() -> None:
    """
    Aborted from copying, the move heads back to the old ring, and its
    previous ring (the new one) was never filled. Aborting that in turn
    goes back to the new ring, which then must be copied after all.
    """
    back = abort(stage(three(), add=[(D, 1)]))
    forth = abort(back)
    assert forth.move is not None
    assert (forth.move.phase, forth.move.copy) == (Phase.COPYING, True)
    assert forth.current_weights() == {A: 1.0, B: 1.0, C: 1.0, D: 1.0}
    # From handover of a copy-less way back, both rings are full: no copy.
    again = abort(next_phase(abort(next_phase(stage(three(), add=[(D, 1)])))))
    assert again.move is not None
    assert (again.move.phase, again.move.copy) == (Phase.COPYING, False)


def test_too_late_or_nothing_to_abort() -> None:
    cleanup = next_phase(next_phase(stage(three(), add=[(D, 1)])))
    with pytest.raises(TooLateToAbort) as caught:
        abort(cleanup)
    assert caught.value.code == "too_late_to_abort"
    with pytest.raises(NoMove):
        abort(three())


@PROPERTY
@given(
    st.lists(st.sampled_from([A, B, C, D, E]), min_size=3, max_size=5, unique=True),
    st.lists(st.sampled_from(["stage", "next", "abort"]), max_size=16),
    st.randoms(use_true_random=False),
)
def test_every_path_is_one_epoch_per_step_and_ends_old_or_new(
    start: list[str], steps: list[str], rnd: Random
) -> None:
    """
    On any path, each successful step adds one to the epoch and yields a
    map that parses back to itself; a move ends on the membership it was
    staged for or, aborted an odd number of times, on the one it left.
    """
    m = bootstrap("c", dict.fromkeys(start, 1.0), 2, 1, 2, 16)
    origin = target = m.current_weights()
    flips = 0
    for step in steps:
        try:
            if step == "stage":
                live = sorted(m.current_weights())
                spare = sorted({A, B, C, D, E} - set(live))
                add = [(x, rnd.choice([1.0, 2.0])) for x in spare if rnd.random() < 0.4]
                remove = [x for x in live if rnd.random() < 0.3]
                after = stage(m, add=add, remove=remove)
                origin, target, flips = m.current_weights(), after.current_weights(), 0
            elif step == "next":
                after = next_phase(m)
            else:
                after = abort(m)
                flips += 1
        except (MapConflict, InvalidChange, UnknownMember):
            continue
        assert after.epoch == m.epoch + 1
        assert ClusterMap.from_json(after.to_json()) == after
        m = after
        if m.move is None:
            assert m.current_weights() == (origin if flips % 2 else target)


# --- epochs and the ideal -------------------------------------------------------------


def test_expect_epoch() -> None:
    m = three()
    assert expect_epoch(m, 1) is m
    with pytest.raises(MapConflict) as caught:
        expect_epoch(m, 0)
    assert caught.value.details == {"epoch": 1}
    with pytest.raises(MapConflict):
        expect_epoch(None, 1)


@pytest.mark.parametrize(("n", "k"), [(1, 1), (3, 1), (3, 2), (4, 1), (10, 3)])
def test_ideal_for_adding_equal_nodes(n: int, k: int) -> None:
    before = {f"n{i}": 1.0 for i in range(n)}
    after = {f"n{i}": 1.0 for i in range(n + k)}
    assert ideal_fraction(before, after) == pytest.approx(k / (n + k))
    # Removing them again moves the same copies back.
    assert ideal_fraction(after, before) == pytest.approx(k / (n + k))


def test_ideal_for_reweighting_and_replacing() -> None:
    three_equal = {"a": 1.0, "b": 1.0, "c": 1.0}
    assert ideal_fraction(three_equal, {"a": 2.0, "b": 1.0, "c": 1.0}) == pytest.approx(1 / 6)
    assert ideal_fraction(three_equal, {"a": 1.0, "b": 1.0, "d": 1.0}) == pytest.approx(1 / 3)
    assert ideal_fraction(three_equal, {"a": 5.0, "b": 5.0, "c": 5.0}) == 0.0
    with pytest.raises(ValueError):
        ideal_fraction({}, three_equal)
