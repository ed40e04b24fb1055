"""
Tests for L{shardkv.core.writes}: the rule both a node and the proxy's
coordinator follow for every write.

The two apply it to different records (a node to its own, the coordinator
to the newest its read quorum saw), so the rule must be right on its own:
a tombstone counts as absent for preconditions and for ``created``, and yet
its version is still the one a new write must beat.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardkv.core.conditions import Precondition
from shardkv.core.records import Record
from shardkv.core.versions import MAX_COUNTER, Version, VersionClock
from shardkv.core.writes import WriteResult, next_tombstone, next_value
from shardkv.errors import NotFound, PreconditionFailed
from tests.core.helpers import PROPERTY, V1, V2, Wall, versions
from tests.helpers import U64

NOW_MS = 50_000
WRITER = "writer-1"

LIVE = Record(V2, b"old", "text/plain")
GONE = Record.deleted(V2)


def clock(ms: int = NOW_MS) -> VersionClock:
    return VersionClock(WRITER, Wall(ms))


# -- next_value -------------------------------------------------------------------


def test_a_first_write_creates_version_one() -> None:
    record, result = next_value(None, Precondition(), clock(), b"v", "text/plain", stored_ms=7)
    version = Version(1, NOW_MS, WRITER)
    assert record == Record(version, b"v", "text/plain", tombstone=False, stored_ms=7)
    assert result == WriteResult(version, created=True)


def test_an_overwrite_counts_one_past_the_current_version() -> None:
    """
    The new counter is the current one plus one, whatever the wall clock
    says (here it is behind the current version's clock), so the write wins.
    """
    record, result = next_value(LIVE, Precondition(), clock(ms=1), b"new", "text/x", 9)
    assert record == Record(Version(V2.counter + 1, 1, WRITER), b"new", "text/x", False, 9)
    assert result == WriteResult(record.version, created=False)
    assert record.version > LIVE.version


def test_a_write_over_a_tombstone_creates_and_beats_the_tombstone() -> None:
    """
    A deleted key is absent to the client (``created`` is True: 201), but
    the new version must still be newer than the tombstone's, or replicas
    still holding the tombstone would keep the key deleted.
    """
    record, result = next_value(GONE, Precondition(), clock(), b"back", "text/plain")
    assert record.version == Version(GONE.version.counter + 1, NOW_MS, WRITER)
    assert record.version > GONE.version
    assert not record.tombstone
    assert result.created is True
    assert record.stored_ms == 0


@pytest.mark.parametrize(
    ("current", "pre", "reason"),
    [
        (
            LIVE,
            Precondition(none_match_any=True),
            f"the key exists (version {V2}) and If-None-Match: * was given",
        ),
        (None, Precondition(match_any=True), "the key does not exist and If-Match: * was given"),
        (GONE, Precondition(match_any=True), "the key does not exist and If-Match: * was given"),
        (LIVE, Precondition(if_match=frozenset([V1])), f"If-Match wants {V1} but the key has {V2}"),
        (
            GONE,
            Precondition(if_match=frozenset([V2])),
            f"If-Match wants {V2} but the key has no version (the key is absent)",
        ),
    ],
    ids=["none-match-live", "match-any-absent", "match-any-gone", "stale-tag", "gone-tag"],
)
def test_a_failed_precondition_raises_and_mints_nothing(
    current: Record | None, pre: Precondition, reason: str
) -> None:
    """
    A precondition that does not hold raises L{PreconditionFailed} with the
    reason, before a version is minted. A tombstone's version is not a live
    version: If-Match naming it fails, as it would for an absent key.
    """
    versions_ = VersionClock(WRITER, Wall(NOW_MS))
    with pytest.raises(PreconditionFailed) as info:
        next_value(current, pre, versions_, b"v", "text/plain")
    assert (info.value.code, info.value.message) == ("precondition_failed", reason)
    assert versions_.mint(None).clock_ms == NOW_MS, "a version was minted for a refused write"


@pytest.mark.parametrize(
    ("current", "pre", "created"),
    [
        (None, Precondition(none_match_any=True), True),
        (GONE, Precondition(none_match_any=True), True),
        (LIVE, Precondition(match_any=True), False),
        (LIVE, Precondition(if_match=frozenset([V1, V2])), False),
    ],
)
def test_a_holding_precondition_lets_the_write_through(
    current: Record | None, pre: Precondition, created: bool
) -> None:
    _, result = next_value(current, pre, clock(), b"v", "text/plain")
    assert result.created is created


# -- next_tombstone -----------------------------------------------------------------


def test_a_delete_writes_a_newer_tombstone() -> None:
    tombstone = next_tombstone("k", LIVE, Precondition(), clock(ms=1), stored_ms=33)
    assert tombstone == Record.deleted(Version(V2.counter + 1, 1, WRITER), stored_ms=33)
    assert tombstone.version > LIVE.version


@pytest.mark.parametrize("current", [None, GONE], ids=["absent", "tombstone"])
@pytest.mark.parametrize(
    "pre",
    [Precondition(), Precondition(match_any=True), Precondition(if_match=frozenset([V2]))],
    ids=["none", "match-any", "match-tag"],
)
def test_deleting_nothing_live_is_not_found(current: Record | None, pre: Precondition) -> None:
    """
    A delete of an absent or already deleted key is L{NotFound} naming the
    key, whatever the precondition says: there is nothing to delete.
    """
    with pytest.raises(NotFound) as info:
        next_tombstone("some/key", current, pre, clock())
    assert info.value.code == "not_found"
    assert info.value.message == "no value for key 'some/key'"


def test_a_delete_with_a_stale_tag_fails_its_precondition() -> None:
    with pytest.raises(PreconditionFailed, match="If-Match wants"):
        next_tombstone("k", LIVE, Precondition(if_match=frozenset([V1])), clock())
    with pytest.raises(PreconditionFailed, match="If-None-Match"):
        next_tombstone("k", LIVE, Precondition(none_match_any=True), clock())


# -- properties -------------------------------------------------------------------

# A version at the counter's cap and the clock's top has no successor; no node
# takes one (L{check_incoming}), so a write never sees it.
successors = versions.filter(lambda v: v.counter < MAX_COUNTER or v.clock_ms < U64)
currents = st.one_of(
    st.none(),
    st.builds(Record, successors, st.binary(max_size=8)),
    st.builds(Record.deleted, successors),
)


@PROPERTY
@given(currents, st.integers(min_value=0, max_value=10**13), st.binary(max_size=8))
def test_every_write_moves_the_key_forward(
    current: Record | None, now_ms: int, value: bytes
) -> None:
    """
    Without a precondition a write always goes through with a version one
    counter past the current record's (tombstone or not) and so newer than
    it, and reports ``created`` exactly when nothing live was there.
    """
    record, result = next_value(current, Precondition(), clock(now_ms), value, "a/b", 5)
    assert (record.value, record.content_type, record.tombstone, record.stored_ms) == (
        value,
        "a/b",
        False,
        5,
    )
    assert result == WriteResult(record.version, current is None or current.tombstone)
    expected = min(current.version.counter + 1, MAX_COUNTER) if current is not None else 1
    assert record.version.counter == expected
    assert current is None or record.version > current.version


@PROPERTY
@given(currents, st.integers(min_value=0, max_value=10**13))
def test_a_delete_succeeds_exactly_on_a_live_key(current: Record | None, now_ms: int) -> None:
    """A delete of a live record is a tombstone newer than it; anything else is NotFound."""
    if current is None or current.tombstone:
        with pytest.raises(NotFound):
            next_tombstone("k", current, Precondition(), clock(now_ms))
        return
    tombstone = next_tombstone("k", current, Precondition(), clock(now_ms))
    assert tombstone.tombstone
    assert tombstone.version.counter == min(current.version.counter + 1, MAX_COUNTER)
    assert tombstone.version > current.version
