"""The history checkers of L{shardkv.testing.history}, on small hand-made histories.

The fault tests trust these checkers to say "no acknowledged write was lost"
and the like; a checker that never flags anything would let every fault test
pass. So each kind of violation gets a history that must be flagged, and each
legal outcome the checkers must tolerate (a failed write missing, an ``info``
write present or not, concurrent writes in either order) gets one that must
not be.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shardkv.testing.history import (
    History,
    Op,
    Violation,
    check_all,
    check_convergence,
    check_final,
    check_reads,
    summary,
)

PROPERTY = settings(database=None, deadline=None, max_examples=200)


def put(value: str, start: float, end: float, status: str = "ok", client: str = "c1") -> Op:
    """A write of ``value`` to key ``k``."""
    return Op(client, "put", "k", value, status, start, end)


def get(value: str | None, start: float, end: float, status: str = "ok", client: str = "c1") -> Op:
    """A read of key ``k`` that saw ``value`` (None: absent)."""
    return Op(client, "get", "k", value, status, start, end)


def kinds(violations: list[Violation]) -> list[tuple[str, str]]:
    return [(v.kind, v.key) for v in violations]


# -- check_final: lost writes ---------------------------------------------------------


@pytest.mark.parametrize("final", [{}, {"k": None}], ids=["key missing", "key absent"])
def test_an_acknowledged_write_that_is_gone_is_lost(final: dict[str, str | None]) -> None:
    """The key ends absent although a write to it was acknowledged."""
    history = History([put("a", 0, 1)])
    found = check_final(history, final)
    assert kinds(found) == [("lost", "k")]
    assert "1 writes acked" in found[0].detail


def test_a_final_value_nobody_wrote_loses_the_acknowledged_write() -> None:
    """Ending with a value no write stored means the acknowledged one is gone."""
    assert kinds(check_final(History([put("a", 0, 1)]), {"k": "zzz"})) == [("lost", "k")]


def test_a_write_overwritten_by_one_that_finished_before_it_started_is_lost() -> None:
    """``b`` was invoked after ``a`` was answered, so ``a`` must not win."""
    history = History([put("a", 0, 1), put("b", 2, 3, client="c2")])
    found = check_final(history, {"k": "a"})
    assert kinds(found) == [("lost", "k")]
    assert "'b' was acked after it" in found[0].detail


def test_the_last_acknowledged_write_winning_is_not_lost() -> None:
    history = History([put("a", 0, 1), put("b", 2, 3, client="c2")])
    assert check_final(history, {"k": "b"}) == []


@pytest.mark.parametrize("winner", ["a", "b"])
def test_concurrent_writes_may_end_in_either_order(winner: str) -> None:
    """Overlapping writes have no order, so either may be the final value."""
    history = History([put("a", 0, 2), put("b", 1, 3, client="c2")])
    assert check_final(history, {"k": winner}) == []


def test_a_failed_write_may_be_absent() -> None:
    """A definitely failed write is not expected in the final state."""
    history = History([put("a", 0, 1), put("b", 2, 3, status="fail")])
    assert check_final(history, {"k": "a"}) == []


@pytest.mark.parametrize("winner", ["a", "b"])
def test_an_info_write_may_be_present_or_absent(winner: str) -> None:
    """An ``info`` write may or may not have happened: both outcomes are legal."""
    history = History([put("a", 0, 1), put("b", 2, 3, status="info")])
    assert check_final(history, {"k": winner}) == []


@pytest.mark.parametrize("final", [{}, {"k": "a"}, {"k": "b"}])
def test_a_key_without_acknowledged_writes_may_end_any_way(final: dict[str, str | None]) -> None:
    """With nothing acknowledged, nothing can be lost."""
    history = History([put("a", 0, 1, status="fail"), put("b", 2, 3, status="info")])
    assert check_final(history, final) == []


def test_lost_writes_are_reported_per_key() -> None:
    """One key's loss does not hide or taint another key."""
    history = History(
        [put("a", 0, 1), Op("c1", "put", "other", "x", "ok", 0, 1), put("b", 2, 3, client="c2")]
    )
    assert kinds(check_final(history, {"k": "a", "other": "x"})) == [("lost", "k")]


# -- check_reads: fabricated and stale reads -------------------------------------------


def test_a_read_of_a_value_never_written_is_fabricated() -> None:
    history = History([put("a", 0, 1), get("ghost", 2, 3, client="c2")])
    found = check_reads(history)
    assert kinds(found) == [("fabricated", "k")]
    assert "'ghost' by c2" in found[0].detail


def test_a_read_of_a_failed_writes_value_is_fabricated() -> None:
    """A ``fail`` write was definitely not applied, so nobody may read it."""
    history = History([put("a", 0, 1, status="fail"), get("a", 2, 3, client="c2")])
    assert kinds(check_reads(history)) == [("fabricated", "k")]


def test_a_read_of_a_write_invoked_after_the_read_finished_is_fabricated() -> None:
    """A read cannot see the future."""
    history = History([get("a", 0, 1, client="c2"), put("a", 2, 3)])
    assert kinds(check_reads(history)) == [("fabricated", "k")]


@pytest.mark.parametrize("status", ["ok", "info"])
def test_a_read_of_an_in_flight_write_is_fine(status: str) -> None:
    """A write that had started (and may have landed) before the read ended may be seen."""
    history = History([put("a", 0, 5, status=status), get("a", 1, 2, client="c2")])
    assert check_reads(history) == []


def test_a_client_reading_absent_after_its_own_acknowledged_write_is_stale() -> None:
    history = History([put("a", 0, 1), get(None, 2, 3)])
    found = check_reads(history)
    assert kinds(found) == [("stale", "k")]
    assert "c1 read None after its own acked write 'a'" in found[0].detail


def test_a_client_reading_older_than_its_own_acknowledged_write_is_stale() -> None:
    """``old`` finished before c1's ``a`` started, so c1 must not read it after ``a``."""
    history = History([put("old", 0, 1, client="c2"), put("a", 2, 3), get("old", 4, 5)])
    assert kinds(check_reads(history)) == [("stale", "k")]


def test_reading_a_concurrent_write_over_ones_own_is_not_stale() -> None:
    """c2's ``b`` overlapped c1's ``a``, so either may be newer."""
    history = History([put("a", 0, 2), put("b", 1, 3, client="c2"), get("b", 4, 5)])
    assert check_reads(history) == []


def test_read_your_writes_binds_only_the_writer() -> None:
    """Another client may still read the old value (R + W > N is not linearizability)."""
    history = History([put("old", 0, 1, client="c2"), put("a", 2, 3), get("old", 4, 5, "ok", "c3")])
    assert check_reads(history) == []


def test_a_read_overlapping_ones_own_write_may_see_the_old_value() -> None:
    """Read-your-writes starts once the write was acknowledged, not when it was sent."""
    history = History([put("old", 0, 1, client="c2"), put("a", 2, 4), get("old", 3, 5)])
    assert check_reads(history) == []


@pytest.mark.parametrize("status", ["fail", "info"])
def test_reads_that_did_not_answer_are_not_checked(status: str) -> None:
    """A read that failed or timed out saw nothing, whatever its value field says."""
    history = History([put("a", 0, 1), get("ghost", 2, 3, status=status), get(None, 2, 3, status)])
    assert check_reads(history) == []


def test_a_fabricated_read_is_not_also_reported_stale() -> None:
    """One bad read, one violation: the most telling one."""
    history = History([put("a", 0, 1), get("ghost", 2, 3)])
    assert kinds(check_reads(history)) == [("fabricated", "k")]


# -- check_convergence ------------------------------------------------------------------


def test_replicas_that_agree_have_converged() -> None:
    """States compare as JSON with sorted keys, so dict order does not matter."""
    replicas = {
        "n1": {"k": {"v": "a", "version": 2}, "j": None},
        "n2": {"k": {"version": 2, "v": "a"}, "j": None},
    }
    assert check_convergence(replicas) == []


def test_replicas_that_disagree_have_diverged() -> None:
    replicas = {"n1": {"k": "a", "j": "x"}, "n2": {"k": "b", "j": "x"}, "n3": {"k": "a"}}
    found = check_convergence(replicas)
    assert found == [Violation("diverged", "k", "2 states on ['n1', 'n2', 'n3']")]


def test_a_replica_listing_a_key_as_absent_disagrees_with_one_holding_it() -> None:
    assert kinds(check_convergence({"n1": {"k": "a"}, "n2": {"k": None}})) == [("diverged", "k")]


def test_a_key_a_node_does_not_list_is_not_compared_there() -> None:
    """Each node lists only the keys it is a home replica for."""
    assert check_convergence({"n1": {"k": "a"}, "n2": {"j": "b"}}) == []


# -- check_all and summary --------------------------------------------------------------


def test_check_all_runs_every_checker() -> None:
    """Lost, fabricated and (given replica states) diverged, in one list."""
    history = History([put("a", 0, 1), get("ghost", 2, 3, client="c2")])
    found = check_all(history, {}, {"n1": {"k": "a"}, "n2": {"k": None}})
    assert sorted(v.kind for v in found) == ["diverged", "fabricated", "lost"]
    assert sorted(v.kind for v in check_all(history, {})) == ["fabricated", "lost"]


def test_summary_counts_operations_and_violations() -> None:
    history = History([put("a", 0, 1), put("b", 2, 3, "fail"), get("a", 4, 5), put("c", 6, 7)])
    violations = [
        Violation("lost", "k", ""),
        Violation("lost", "j", ""),
        Violation("stale", "k", ""),
    ]
    assert summary(history, violations) == (
        "ops {'get:ok': 1, 'put:fail': 1, 'put:ok': 2}; violations {'lost': 2, 'stale': 1}"
    )
    assert summary(History(), []) == "ops {}; violations none"


# -- dump and load ----------------------------------------------------------------------


def test_dump_and_load_round_trip(tmp_path: Path) -> None:
    """A history written by one run can be checked again later, unchanged."""
    history = History(
        [
            put("a", 0.125, 1.5),
            put("b", 1.0 / 3.0, 2.0, status="info", client="c2"),
            get(None, 2.5, 3.0, status="fail"),
            Op("c3", "get", "key with spaces/ünï", "a", "ok", 1e-9, 12345.678901234),
        ]
    )
    path = tmp_path / "history.jsonl"
    history.dump(str(path))
    assert len(path.read_text().splitlines()) == 4
    assert History.load(str(path)) == history


def test_load_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    History([put("a", 0, 1)]).dump(str(path))
    path.write_text("\n" + path.read_text() + "\n  \n")
    assert History.load(str(path)).ops == [put("a", 0, 1)]


# -- properties ---------------------------------------------------------------------------

Step = tuple[str, str, bool]  # (client, key, read the key back after writing it)

steps = st.lists(
    st.tuples(st.sampled_from(["c1", "c2", "c3"]), st.sampled_from(["k", "j"]), st.booleans()),
    min_size=1,
    max_size=30,
)


def sequential(plan: list[Step]) -> tuple[History, dict[str, str | None]]:
    """One acknowledged write after another, each read back if asked; the final
    state is each key's last write, as a correct store must end."""
    history = History()
    final: dict[str, str | None] = {}
    t = 0.0
    for i, (client, key, read_back) in enumerate(plan):
        value = f"{client}-{i}"
        history.add(Op(client, "put", key, value, "ok", t, t + 1))
        final[key] = value
        t += 2
        if read_back:
            history.add(Op(client, "get", key, value, "ok", t, t + 1))
            t += 2
    return history, final


@PROPERTY
@given(steps)
def test_a_sequential_history_ending_with_each_keys_last_write_is_clean(plan: list[Step]) -> None:
    history, final = sequential(plan)
    assert check_all(history, final) == []


@PROPERTY
@given(steps, st.data())
def test_ending_with_any_earlier_write_is_a_lost_write(
    plan: list[Step], data: st.DataObject
) -> None:
    """In a sequential history every later write was invoked after the earlier
    ones finished, so any key ending with an older value lost a write."""
    history, final = sequential(plan)
    rewritten = sorted(k for k, ws in history.writes().items() if len(ws) > 1)
    assume(rewritten)
    key = data.draw(st.sampled_from(rewritten))
    older = data.draw(st.sampled_from(history.writes()[key][:-1]))
    assert kinds(check_final(history, {**final, key: older.value})) == [("lost", key)]
