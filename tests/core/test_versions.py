"""
Tests for L{shardkv.core.versions}: text forms, the total order, and a clock
that never repeats.

Hypothesis moves the wall clock back and forth by up to 90 s, because the
point of L{VersionClock} is that versions keep moving a key forward whatever
the machine's clock does.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardkv.core.versions import (
    MAX_COUNTER,
    MAX_FUTURE_MS,
    Version,
    VersionClock,
    VersionError,
    check_incoming,
)
from tests.core.helpers import NINETY_SECONDS_MS, PROPERTY, V1, Wall, versions
from tests.helpers import U64


def test_version_text_forms() -> None:
    v = Version(3, 1700000000123, "127.0.0.1:8081")
    assert str(v) == "3-1700000000123-127.0.0.1:8081"
    assert v.etag() == '"3-1700000000123-127.0.0.1:8081"'
    assert Version.parse('"3-1700000000123-127.0.0.1:8081"') == v
    assert Version.parse(" 3-1700000000123-127.0.0.1:8081 ") == v


def test_version_writer_may_contain_dashes() -> None:
    v = Version(1, 2, "node-a-1")
    assert Version.parse(str(v)) == v
    assert Version.parse(str(v)).writer == "node-a-1"


@PROPERTY
@given(versions)
def test_version_round_trips(v: Version) -> None:
    assert Version.parse(str(v)) == v
    assert Version.parse(v.etag()) == v
    assert v.etag() == f'"{v}"'
    assert re.fullmatch(r'"\d+-\d+-[A-Za-z0-9_.:\-]+"', v.etag())


@pytest.mark.parametrize(
    ("counter", "clock_ms", "writer"),
    [
        (0, 0, "w"),
        (-1, 0, "w"),
        (1, -1, "w"),
        (1, 0, ""),
        (1, 0, "a b"),
        (1, 0, "café"),
        (1, 0, "w/x"),
        (1, 0, "w" * 129),
    ],
)
def test_invalid_versions(counter: int, clock_ms: int, writer: str) -> None:
    with pytest.raises(VersionError):
        Version(counter, clock_ms, writer)


@pytest.mark.parametrize(
    "text",
    [
        "",
        '""',
        '"',
        "garbage",
        "1-2",
        "1--w",
        "-1-2-w",
        "1--2-w",
        "a-2-w",
        "1-b-w",
        "0-2-w",
        "1-2-",
        "1-2-w w",
        '"1-2-w',
        '1-2-w"',
        "1.5-2-w",
        "+1-2-w",
    ],
)
def test_version_parse_rejects(text: str) -> None:
    with pytest.raises(VersionError):
        Version.parse(text)


@pytest.mark.parametrize("text", ["\u00b2-1-w", "1-\u00b9-w", "1" * 5000 + "-0-w"])
def test_version_parse_rejects_odd_digits(text: str) -> None:
    with pytest.raises(VersionError):
        Version.parse(text)


@PROPERTY
@given(versions, versions)
def test_versions_are_totally_ordered_as_tuples(a: Version, b: Version) -> None:
    key_a, key_b = (a.counter, a.clock_ms, a.writer), (b.counter, b.clock_ms, b.writer)
    assert [a < b, a == b, a > b].count(True) == 1
    assert (a < b) == (key_a < key_b)
    assert (a == b) == (key_a == key_b)
    assert (a <= b) == (not a > b)


def test_counter_beats_clock_and_clock_beats_writer() -> None:
    assert Version(2, 0, "a") > Version(1, 10**15, "z")
    assert Version(1, 2, "a") > Version(1, 1, "z")
    assert Version(1, 1, "b") > Version(1, 1, "a")


def test_clock_follows_a_wall_clock_that_moves_forward() -> None:
    wall = Wall(5000)
    clock = VersionClock("n1", wall)
    assert clock.mint(None) == Version(1, 5000, "n1")
    wall.ms = 9000
    assert clock.mint(V1) == Version(2, 9000, "n1")


def test_clock_survives_a_wall_clock_going_backwards() -> None:
    wall = Wall(100_000)
    clock = VersionClock("n1", wall)
    first = clock.mint(None)
    wall.ms = 100_000 - NINETY_SECONDS_MS
    second = clock.mint(None)
    third = clock.mint(None)
    assert [first.clock_ms, second.clock_ms, third.clock_ms] == [100_000, 100_001, 100_002]
    assert first < second < third


def test_clock_never_goes_negative() -> None:
    clock = VersionClock("n1", Wall(-NINETY_SECONDS_MS))
    assert clock.mint(None) == Version(1, 0, "n1")
    assert clock.mint(None) == Version(1, 1, "n1")


@pytest.mark.parametrize("writer", ["", "a b", "w/x", "é"])
def test_clock_rejects_bad_writer(writer: str) -> None:
    with pytest.raises(VersionError):
        VersionClock(writer, Wall(0))


@PROPERTY
@given(
    start=st.integers(min_value=0, max_value=10**13),
    moves=st.lists(
        st.tuples(
            st.integers(min_value=-NINETY_SECONDS_MS, max_value=NINETY_SECONDS_MS),
            # Versions a node takes (L{check_incoming}): at the counter's cap the
            # clock moves past the seen one's, which at the format's top has no
            # successor (and no node stores such a version).
            st.one_of(st.none(), versions.filter(lambda v: v.clock_ms < U64 // 2)),
        ),
        min_size=1,
        max_size=40,
    ),
)
def test_clock_never_repeats(start: int, moves: list[tuple[int, Version | None]]) -> None:
    """
    Whatever the wall clock does (jumps back or forward by up to 90 s), each
    minted version is newer than what the caller saw, and no two versions
    from one clock share a clock_ms: the clock strictly increases.
    """
    wall = Wall(start)
    clock = VersionClock("w", wall)
    minted = []
    for step, prior in moves:
        wall.ms += step
        v = clock.mint(prior)
        if prior is not None:
            assert v > prior
            assert v.counter == min(prior.counter + 1, MAX_COUNTER)
        else:
            assert v.counter == 1
        assert v.clock_ms >= max(wall.ms, 0)
        minted.append(v)
    stamps = [v.clock_ms for v in minted]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == len(stamps)


@PROPERTY
@given(
    skew_a=st.integers(min_value=-NINETY_SECONDS_MS, max_value=NINETY_SECONDS_MS),
    skew_b=st.integers(min_value=-NINETY_SECONDS_MS, max_value=NINETY_SECONDS_MS),
    moves=st.lists(
        st.tuples(st.booleans(), st.integers(min_value=-NINETY_SECONDS_MS, max_value=1000)),
        min_size=1,
        max_size=50,
    ),
)
def test_skewed_writers_always_move_a_key_forward(
    skew_a: int, skew_b: int, moves: list[tuple[bool, int]]
) -> None:
    """
    Two writers whose clocks are skewed by up to +-90 s take turns writing one
    key, each starting from the version the other wrote: every write wins
    over the one before it, whatever the clocks say.
    """
    now = Wall(10**12)
    a = VersionClock("a", lambda: now.ms + skew_a)
    b = VersionClock("b", lambda: now.ms + skew_b)
    last: Version | None = None
    for use_a, step in moves:
        now.ms += step
        v = (a if use_a else b).mint(last)
        assert last is None or v > last
        last = v


NOW_MS = 1_800_000_000_000


@pytest.mark.parametrize(
    ("counter", "clock_ms"),
    [
        (2**64 - 1, 0),
        (MAX_COUNTER + 1, 0),
        (1, NOW_MS + MAX_FUTURE_MS + 1),
        (1, 2**64 - 1),
        (MAX_COUNTER, 2**64 - 1),
    ],
)
def test_versions_out_of_range_are_refused_where_they_enter(counter: int, clock_ms: int) -> None:
    """
    The record format holds 64-bit numbers, but a node refuses a counter
    above 2^63 or a clock far in its future: from 2^64 - 1 nothing newer
    could be minted, and every later write of that key would fail.
    """
    with pytest.raises(VersionError, match="out of range"):
        check_incoming(Version(counter, clock_ms, "attacker"), NOW_MS)


def test_versions_at_the_limits_enter() -> None:
    version = Version(MAX_COUNTER, NOW_MS + MAX_FUTURE_MS, "w")
    assert check_incoming(version, NOW_MS) is version
    assert check_incoming(Version(1, MAX_FUTURE_MS, "w"), -5)


def test_at_the_cap_the_counter_stays_and_the_clock_decides() -> None:
    seen = Version(MAX_COUNTER, NOW_MS + MAX_FUTURE_MS, "z" * 128)
    minted = VersionClock("p", Wall(NOW_MS)).mint(seen)
    assert minted == Version(MAX_COUNTER, NOW_MS + MAX_FUTURE_MS + 1, "p")
    assert minted > seen


@PROPERTY
@given(
    counter=st.integers(min_value=1, max_value=MAX_COUNTER),
    ahead_ms=st.integers(min_value=-NOW_MS, max_value=MAX_FUTURE_MS),
    writer=st.sampled_from(["a", "z" * 128, "p"]),
    steps=st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=20),
)
def test_every_version_that_enters_has_successors_that_enter(
    counter: int, ahead_ms: int, writer: str, steps: list[int]
) -> None:
    """
    Closure, the property that keeps a key usable: from any version a node
    takes, a writer mints a newer one, and a node takes that too (each node
    checks against its own clock, which moves on between writes, here by 0
    to 5 ms), however many writes follow. No version that can enter pins a key.
    """
    now = Wall(NOW_MS)
    clock = VersionClock("p", now)
    held = check_incoming(Version(counter, NOW_MS + ahead_ms, writer), now.ms)
    for step in steps:
        now.ms += step
        minted = clock.mint(held)
        assert minted > held
        now.ms += 1
        held = check_incoming(minted, now.ms)


def test_mint_never_fails_for_a_version_that_can_enter() -> None:
    for seen in [
        Version(MAX_COUNTER - 1, 0, "w"),
        Version(MAX_COUNTER, 0, "w"),
        Version(MAX_COUNTER, NOW_MS + MAX_FUTURE_MS, "w"),
    ]:
        for wall in [-(2**64), 0, NOW_MS, 2**62]:
            assert VersionClock("n1", Wall(wall)).mint(seen) > seen
