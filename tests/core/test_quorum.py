"""
Tests of the quorum rules in L{shardkv.core.quorum}, with no I/O.

Hypothesis draws preference lists, down sets, quorum sizes and every order
of replica replies, and each property is checked against a small model
computed independently of the code under test. The per-request sizes
(L{quorum_sizes}) are checked the same way, since a wrong R or W silently
weakens every read or write that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shardkv.core.quorum import (
    Consistency,
    LatencyWindow,
    Outcome,
    QuorumSizes,
    ReadQuorum,
    Reply,
    Target,
    WriteQuorum,
    quorum_sizes,
    replica_targets,
)
from shardkv.core.records import Record
from shardkv.core.versions import Version
from shardkv.errors import InvalidRequest

# No example database: the tests must not leave a .hypothesis/ in the tree,
# and a deadline only makes a loaded CI machine flaky.
PROPERTY = settings(database=None, deadline=None, max_examples=300)

NODE_POOL = [f"n{i}" for i in range(9)]


@dataclass(frozen=True)
class Scenario:
    """A key's preference list, its N, and which nodes the proxy thinks are down."""

    preference: list[str]
    n: int
    down: frozenset[str]

    def is_down(self, node: str) -> bool:
        return node in self.down

    @property
    def home(self) -> list[str]:
        return self.preference[: self.n]

    @property
    def live(self) -> list[str]:
        return [p for p in self.preference if p not in self.down]


@st.composite
def scenarios(draw: st.DrawFn, max_nodes: int = len(NODE_POOL)) -> Scenario:
    preference = draw(st.permutations(NODE_POOL).map(lambda p: p[:max_nodes]))
    preference = preference[: draw(st.integers(1, len(preference)))]
    n = draw(st.integers(1, len(preference)))
    down = frozenset(draw(st.sets(st.sampled_from(preference))))
    return Scenario(list(preference), n, down)


replies = st.sampled_from(list(Reply))

# Small ranges so that versions tie on counter, and sometimes on clock too.
versions = st.builds(
    Version,
    counter=st.integers(1, 4),
    clock_ms=st.integers(0, 3),
    writer=st.sampled_from(["a", "b", "proxy"]),
)
records = st.builds(Record, version=versions, value=st.binary(max_size=4))


# -- quorum_sizes ---------------------------------------------------------------

DEFAULT = QuorumSizes(3, 2, 2)


def test_consistency_defaults_to_the_cluster_settings() -> None:
    """No ``?r=``, ``?w=`` or ``?sloppy=`` means the cluster's own sizes and a strict quorum."""
    assert Consistency() == Consistency(r=None, w=None, sloppy=False)
    assert quorum_sizes(DEFAULT, 5, Consistency()) == DEFAULT
    assert quorum_sizes(DEFAULT, 3, Consistency(sloppy=True)) == DEFAULT


@pytest.mark.parametrize(
    ("members", "sizes"),
    [(1, QuorumSizes(1, 1, 1)), (2, QuorumSizes(2, 2, 2)), (3, DEFAULT), (10, DEFAULT)],
)
def test_n_shrinks_with_a_small_cluster(members: int, sizes: QuorumSizes) -> None:
    """
    A cluster smaller than N keeps one copy per node, and the default R and
    W shrink with it, so a one- or two-node cluster still answers.
    """
    assert quorum_sizes(DEFAULT, members, Consistency()) == sizes


@pytest.mark.parametrize(
    ("c", "sizes"),
    [
        (Consistency(r=1), QuorumSizes(3, 1, 2)),
        (Consistency(w=3), QuorumSizes(3, 2, 3)),
        (Consistency(r=3, w=1), QuorumSizes(3, 3, 1)),
        (Consistency(r=3, w=3, sloppy=True), QuorumSizes(3, 3, 3)),
    ],
)
def test_a_request_may_choose_r_and_w(c: Consistency, sizes: QuorumSizes) -> None:
    assert quorum_sizes(DEFAULT, 5, c) == sizes


@pytest.mark.parametrize(
    ("members", "c"),
    [
        (5, Consistency(r=4)),
        (5, Consistency(w=4)),
        (2, Consistency(w=3)),
        (1, Consistency(r=2, w=1)),
    ],
)
def test_r_or_w_above_n_is_an_invalid_request(members: int, c: Consistency) -> None:
    """
    Asking for more answers than a key has copies can never succeed, so it
    is refused as the client's mistake (400 invalid_quorum) instead of
    failing as an unavailable quorum (503) that a retry would not fix.
    """
    with pytest.raises(InvalidRequest) as info:
        quorum_sizes(DEFAULT, members, c)
    assert info.value.code == "invalid_quorum"
    n = min(DEFAULT.n, members)
    assert f"must not exceed the {n} replicas" in info.value.message


@PROPERTY
@given(
    st.integers(1, 7).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(1, n), st.integers(1, n))
    ),
    st.integers(1, 9),
    st.none() | st.integers(1, 9),
    st.none() | st.integers(1, 9),
    st.booleans(),
)
def test_quorum_sizes_model(
    default: tuple[int, int, int],
    members: int,
    r: int | None,
    w: int | None,
    sloppy: bool,
) -> None:
    """
    N is the smaller of the configured N and the cluster; an override is
    taken as given and a default is capped at N; anything above N raises.
    """
    base = QuorumSizes(*default)
    n = min(base.n, members)
    want_r = r if r is not None else min(base.r, n)
    want_w = w if w is not None else min(base.w, n)
    c = Consistency(r, w, sloppy)
    if want_r > n or want_w > n:
        with pytest.raises(InvalidRequest):
            quorum_sizes(base, members, c)
    else:
        assert quorum_sizes(base, members, c) == (n, want_r, want_w)


# -- replica_targets ----------------------------------------------------------


@PROPERTY
@given(scenarios())
@example(Scenario(["n0", "n1", "n2", "n3"], 2, frozenset({"n0", "n1", "n2"})))
def test_targets_are_the_live_home_replicas_plus_one_stand_in_per_down_one(s: Scenario) -> None:
    """
    A write goes to every live home replica once (no hint), and each down home
    replica gets exactly one stand-in that keeps a hint for it, as long as any
    node at all is live. No target is a down node, and nothing is hinted for a
    node that is live or not a home replica.

    (The explicit example once failed: with every home replica down and one
    live spare, only the first down replica got a stand-in.)
    """
    targets = replica_targets(s.preference, s.n, s.is_down)

    plain = [t.node for t in targets if t.hint_for is None]
    assert plain == [p for p in s.home if p not in s.down]
    assert len(plain) == len(set(plain))

    hinted = [t.hint_for for t in targets if t.hint_for is not None]
    down_home = [p for p in s.home if p in s.down]
    expected = down_home if s.live else []
    assert sorted(hinted) == sorted(expected)  # each exactly once

    for t in targets:
        assert not s.is_down(t.node), t
        assert t.node != t.hint_for
    assert len(targets) == len(set(targets))


@PROPERTY
@given(scenarios())
def test_stand_ins_come_from_beyond_the_home_replicas_in_ring_order(s: Scenario) -> None:
    """
    The i-th down home replica's stand-in is the i-th live node after the
    first N (Dynamo's sloppy quorum). Down replicas beyond the live spares
    share them in turn, or, with no live spare, the live home replicas.
    """
    targets = replica_targets(s.preference, s.n, s.is_down)
    spares = [p for p in s.preference[s.n :] if p not in s.down]
    live_home = [p for p in s.home if p not in s.down]
    down_home = [p for p in s.home if p in s.down]
    sharing = spares or live_home
    stand_in = {t.hint_for: t.node for t in targets if t.hint_for is not None}
    for i, home in enumerate(down_home):
        if i < len(spares):
            assert stand_in[home] == spares[i]
        elif sharing:
            assert stand_in[home] == sharing[i % len(sharing)]
        else:
            assert home not in stand_in


# -- WriteQuorum --------------------------------------------------------------


@dataclass(frozen=True)
class WriteCase:
    scenario: Scenario
    w: int
    sloppy: bool
    replies: list[tuple[Target, Reply]]  # in arrival order; targets left out never answer


@st.composite
def write_cases(draw: st.DrawFn) -> WriteCase:
    s = draw(scenarios(max_nodes=6))
    targets = replica_targets(s.preference, s.n, s.is_down)
    w = draw(st.integers(1, s.n))
    sloppy = draw(st.booleans())
    order = draw(st.permutations(targets))
    answered = order[: draw(st.integers(0, len(order)))]
    return WriteCase(s, w, sloppy, [(t, draw(replies)) for t in answered])


def counts(target: Target, sloppy: bool) -> bool:
    return target.hint_for is None or sloppy


def acked_nodes(replies: dict[Target, Reply], sloppy: bool) -> set[str]:
    return {t.node for t, r in replies.items() if r is Reply.OK and counts(t, sloppy)}


@PROPERTY
@given(write_cases())
def test_write_quorum_decides_by_counted_acks(case: WriteCase) -> None:
    """
    After every reply: the outcome is OK exactly when W distinct nodes
    acknowledged, as home replicas (or as anything when sloppy); it is
    neither FAILED nor UNKNOWN while W can still be reached; it is FAILED
    only when every target answered and none may have applied the write;
    and OK and FAILED are final, while UNKNOWN can only settle to FAILED.
    """
    s = case.scenario
    targets = replica_targets(s.preference, s.n, s.is_down)
    quorum = WriteQuorum(targets, case.w, case.sloppy)
    seen: dict[Target, Reply] = {}
    before: Outcome | None = None
    for target, reply in case.replies:
        quorum.add(target, reply)
        seen[target] = reply
        outcome = quorum.outcome()

        acked = acked_nodes(seen, case.sloppy)
        waiting = {t.node for t in targets if t not in seen and counts(t, case.sloppy)} - acked
        assert quorum.acks == len(acked)
        assert quorum.pending == len(waiting)
        assert (outcome is Outcome.OK) == (len(acked) >= case.w), (outcome, acked)
        if len(acked) + len(waiting) >= case.w:
            assert outcome in (None, Outcome.OK), outcome
        else:
            assert outcome is not None
        if outcome is Outcome.FAILED:
            assert set(seen) == set(targets), "FAILED while a target may still apply it"
            assert all(r is Reply.FAILED for r in seen.values()), seen
        if outcome is Outcome.UNKNOWN:
            in_flight = set(targets) - set(seen)
            assert in_flight or any(r in (Reply.OK, Reply.UNKNOWN) for r in seen.values())
        if before in (Outcome.OK, Outcome.FAILED):
            assert outcome is before, (before, outcome)
        if before is Outcome.UNKNOWN:
            assert outcome in (Outcome.UNKNOWN, Outcome.FAILED), outcome
        before = outcome


@PROPERTY
@given(write_cases())
def test_write_quorum_cannot_be_had_when_too_few_nodes_count(case: WriteCase) -> None:
    """
    With fewer distinct counting nodes among the targets than W, the write is
    hopeless before anything is sent (the coordinator then sends nothing);
    otherwise it is undecided until replies arrive.
    """
    s = case.scenario
    targets = replica_targets(s.preference, s.n, s.is_down)
    quorum = WriteQuorum(targets, case.w, case.sloppy)
    counting = {t.node for t in targets if counts(t, case.sloppy)}
    assert quorum.pending == len(counting)
    if len(counting) < case.w:
        assert quorum.outcome() in (Outcome.FAILED, Outcome.UNKNOWN)
    else:
        assert quorum.outcome() is None


A, B, C = Target("a"), Target("b"), Target("c")


@PROPERTY
@given(write_cases())
@example(
    WriteCase(
        Scenario(["a", "b", "c"], 3, frozenset()),
        2,
        False,
        [(A, Reply.FAILED), (B, Reply.FAILED)],
    )
)
def test_write_quorum_fails_only_when_no_target_can_still_apply_it(case: WriteCase) -> None:
    """
    A definite failure tells the client the write is nowhere and never will
    be. So while a target has not answered, W out of reach is UNKNOWN.

    (The explicit example once answered FAILED with c's write in flight; c
    then applied it, and a write the client was told had failed became
    readable.)
    """
    s = case.scenario
    targets = replica_targets(s.preference, s.n, s.is_down)
    quorum = WriteQuorum(targets, case.w, case.sloppy)
    for target, reply in case.replies:
        quorum.add(target, reply)
        if quorum.outcome() is Outcome.FAILED:
            assert all(t in quorum.replies for t in targets), "FAILED with targets in flight"


@PROPERTY
@given(write_cases())
@example(
    WriteCase(
        Scenario(["a", "b", "c"], 3, frozenset({"a", "b"})),
        2,
        True,
        [(Target("c"), Reply.OK), (Target("c", hint_for="a"), Reply.OK)],
    )
)
def test_write_quorum_counts_distinct_nodes(case: WriteCase) -> None:
    """
    W acknowledgements mean W different nodes hold the write durably, even
    when one node keeps hints for several down replicas.

    (The explicit example once counted c twice: a sloppy W=2 met by one copy.)
    """
    s = case.scenario
    targets = replica_targets(s.preference, s.n, s.is_down)
    quorum = WriteQuorum(targets, case.w, case.sloppy)
    for target, reply in case.replies:
        quorum.add(target, reply)
        if quorum.outcome() is Outcome.OK:
            assert len(acked_nodes(quorum.replies, case.sloppy)) >= case.w


# -- ReadQuorum ---------------------------------------------------------------


@dataclass(frozen=True)
class ReadCase:
    replicas: list[str]
    r: int
    # (node, record or None for "no record", counts toward R, failure kind or None)
    events: list[tuple[str, Record | None, bool, Reply | None]]


@st.composite
def read_cases(draw: st.DrawFn) -> ReadCase:
    replicas = draw(st.permutations(NODE_POOL[:5]))
    replicas = replicas[: draw(st.integers(1, 5))]
    r = draw(st.integers(1, len(replicas)))
    order = draw(st.permutations(replicas))
    answered = order[: draw(st.integers(0, len(order)))]
    events = []
    for node in answered:
        failure = draw(st.none() | st.sampled_from([Reply.FAILED, Reply.UNKNOWN]))
        record = None if failure else draw(st.none() | records)
        events.append((node, record, draw(st.booleans()), failure))
    return ReadCase(list(replicas), r, events)


@PROPERTY
@given(read_cases())
def test_read_quorum(case: ReadCase) -> None:
    """
    After every reply: OK exactly when R replicas that count have answered
    ("no record" is an answer; a replica with hints waiting does not count);
    FAILED exactly when R can no longer be reached; newest() is the largest
    version seen; stale() is exactly the replicas that answered with an
    older record or none; and OK or FAILED never changes.
    """
    quorum = ReadQuorum(case.replicas, case.r)
    answers: dict[str, Record | None] = {}
    counted: set[str] = set()
    replied: set[str] = set()
    decided: Outcome | None = None
    for node, record, counts_, failure in case.events:
        if failure is None:
            quorum.add(node, record, counts=counts_)
            answers[node] = record
            if counts_:
                counted.add(node)
        else:
            quorum.fail(node, failure)
        replied.add(node)

        outcome = quorum.outcome()
        could_still = len(counted) + len(set(case.replicas) - replied)
        if len(counted) >= case.r:
            assert outcome is Outcome.OK
        elif could_still >= case.r:
            assert outcome is None
        else:
            assert outcome is Outcome.FAILED
        if decided is not None:
            assert outcome is decided
        decided = outcome

        present = [rec.version for rec in answers.values() if rec is not None]
        best = quorum.newest()
        assert (best.version if best else None) == (max(present) if present else None)
        if best is None:
            assert quorum.stale() == []
        else:
            expected = {
                n for n, rec in answers.items() if rec is None or rec.version < best.version
            }
            assert sorted(quorum.stale()) == sorted(expected)
            assert best in answers.values()


# -- the hedge delay ------------------------------------------------------------


def test_latency_window_starts_at_its_floor() -> None:
    window = LatencyWindow(floor=0.002, cap=0.1)
    assert window.delay() == 0.002
    for _ in range(window.every - 1):
        window.add(0.05)
    assert window.delay() == 0.002  # not recomputed until `every` samples came in
    window.add(0.05)
    assert window.delay() == pytest.approx(0.05)


def test_latency_window_takes_its_quantile_within_floor_and_cap() -> None:
    window = LatencyWindow(0.99, size=100, every=100, floor=0.001, cap=0.5)
    for i in range(100):
        window.add(0.001 * (i + 1))  # 1 ms .. 100 ms
    assert window.delay() == pytest.approx(0.100)
    window = LatencyWindow(0.5, size=100, every=100, multiple=2.0, floor=0.001, cap=0.5)
    for i in range(100):
        window.add(0.001 * (i + 1))
    assert window.delay() == pytest.approx(2 * 0.051)
    for _ in range(100):
        window.add(10.0)
    assert window.delay() == 0.5
    for _ in range(100):
        window.add(0.0)
    assert window.delay() == 0.001


@PROPERTY
@given(st.lists(st.floats(min_value=0.0, max_value=10.0), min_size=1, max_size=600))
def test_latency_window_forgets_old_samples(samples: list[float]) -> None:
    """The delay depends only on the last ``size`` samples, and stays within its bounds."""
    window = LatencyWindow(size=64, every=1, floor=0.002, cap=0.1)
    for s in samples:
        window.add(s)
    recent = sorted(samples[-64:])
    expected = min(0.1, max(0.002, recent[min(len(recent) - 1, int(len(recent) * 0.99))]))
    assert window.delay() == pytest.approx(expected)
