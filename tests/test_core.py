"""
Pure unit tests for L{shardkv.core}: keys, versions, records and preconditions.

No HTTP and no reactor here; Hypothesis checks the properties the rest of the
system relies on (a version clock never repeats, a record survives its own
encoding and any single damaged byte is caught).
"""

from __future__ import annotations

import re
import zlib
from urllib.parse import quote

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shardkv.core.conditions import Precondition, parse_etags
from shardkv.core.keys import (
    MAX_KEY_BYTES,
    InvalidKey,
    check_key,
    key_from_bytes,
    key_from_path,
)
from shardkv.core.records import (
    _CRC,
    _HEAD,
    DEFAULT_CONTENT_TYPE,
    CorruptRecord,
    Record,
    decode,
    encode,
)
from shardkv.core.versions import Version, VersionClock, VersionError, newest
from tests.helpers import U64, WRITER_ALPHABET

# No example database: the tests must not leave a .hypothesis/ in the tree,
# and a deadline only makes a loaded CI machine flaky.
PROPERTY = settings(database=None, deadline=None, max_examples=200)

NINETY_SECONDS_MS = 90_000

writers = st.text(alphabet=WRITER_ALPHABET, min_size=1, max_size=128)
versions = st.builds(
    Version,
    counter=st.integers(min_value=1, max_value=2**63),
    clock_ms=st.integers(min_value=0, max_value=U64),
    writer=writers,
)
# Text that can be encoded as UTF-8 (no lone surrogates).
utf8_text = st.text(alphabet=st.characters(codec="utf-8"))
records = st.builds(
    Record,
    version=versions,
    value=st.binary(max_size=512),
    content_type=st.text(alphabet=st.characters(codec="utf-8"), max_size=64),
    tombstone=st.booleans(),
    stored_ms=st.integers(min_value=0, max_value=U64),
)

V1 = Version(1, 1000, "n1")
V2 = Version(2, 2000, "n2")


# --- keys -------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "name",
        "a/b",
        "café",
        "sp ace",
        "a" * MAX_KEY_BYTES,
        "é" * (MAX_KEY_BYTES // 2),  # 2 bytes each: exactly the limit
        "🙂" * (MAX_KEY_BYTES // 4),
    ],
)
def test_check_key_accepts(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize(
    ("key", "too_long", "message"),
    [
        ("", False, "the key is empty"),
        ("\ud800", False, "the key is not valid UTF-8 (it contains a lone surrogate)"),
        ("a" * (MAX_KEY_BYTES + 1), True, "the key is 1025 bytes; the limit is 1024"),
        ("é" * (MAX_KEY_BYTES // 2) + "a", True, "the key is 1025 bytes; the limit is 1024"),
        ("é" * MAX_KEY_BYTES, True, "the key is 2048 bytes; the limit is 1024"),
    ],
)
def test_check_key_rejects(key: str, too_long: bool, message: str) -> None:
    with pytest.raises(InvalidKey) as info:
        check_key(key)
    assert info.value.too_long is too_long
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (b"name", "name"),
        (b"caf\xc3\xa9", "café"),
        (b"a/b", "a/b"),
        (b"x" * MAX_KEY_BYTES, "x" * MAX_KEY_BYTES),
    ],
)
def test_key_from_bytes(raw: bytes, key: str) -> None:
    assert key_from_bytes(raw) == key


@pytest.mark.parametrize(
    ("raw", "too_long", "message"),
    [
        (b"", False, "the key is empty"),
        (b"\xff", False, "the key is not valid UTF-8"),
        (b"caf\xe9", False, "the key is not valid UTF-8"),
        (b"x" * (MAX_KEY_BYTES + 1), True, "the key is 1025 bytes; the limit is 1024"),
    ],
)
def test_key_from_bytes_rejects(raw: bytes, too_long: bool, message: str) -> None:
    with pytest.raises(InvalidKey) as info:
        key_from_bytes(raw)
    assert (info.value.too_long, str(info.value)) == (too_long, message)


@pytest.mark.parametrize(
    ("segment", "key"),
    [
        (b"a%2Fb", "a/b"),
        (b"a%2fb", "a/b"),
        (b"a/b", "a/b"),
        (b"caf%C3%A9", "café"),
        (b"caf\xc3\xa9", "café"),
        (b"sp%20ace", "sp ace"),
        (b"a+b", "a+b"),  # a path is not a form: "+" stays "+"
        (b"100%25", "100%"),
        (b"%3Fq%3D1", "?q=1"),
        (b"%2", "%2"),  # not an escape: kept as is
        (b"%61" * MAX_KEY_BYTES, "a" * MAX_KEY_BYTES),  # the limit is on the decoded key
    ],
)
def test_key_from_path(segment: bytes, key: str) -> None:
    assert key_from_path(segment) == key


@pytest.mark.parametrize(
    ("segment", "too_long"),
    [
        (b"%FF", False),
        (b"caf%E9", False),
        (b"", False),
        (b"%61" * (MAX_KEY_BYTES + 1), True),
        (b"%C3%A9" * (MAX_KEY_BYTES // 2) + b"a", True),
    ],
)
def test_key_from_path_rejects(segment: bytes, too_long: bool) -> None:
    with pytest.raises(InvalidKey) as info:
        key_from_path(segment)
    assert info.value.too_long is too_long


@PROPERTY
@given(utf8_text)
def test_every_entry_point_agrees_on_keys(key: str) -> None:
    """
    A key is accepted iff it is 1..1024 UTF-8 bytes, and then the JSON, the
    query and the path routes all decode it to the same string.
    """
    size = len(key.encode("utf-8"))
    if 1 <= size <= MAX_KEY_BYTES:
        assert check_key(key) == key
        assert key_from_bytes(key.encode("utf-8")) == key
        assert key_from_path(quote(key.encode("utf-8"), safe="").encode("ascii")) == key
    else:
        for parse in (
            lambda: check_key(key),
            lambda: key_from_bytes(key.encode("utf-8")),
            lambda: key_from_path(quote(key.encode("utf-8"), safe="").encode("ascii")),
        ):
            with pytest.raises(InvalidKey) as info:
                parse()
            assert info.value.too_long is (size > MAX_KEY_BYTES)


@PROPERTY
@given(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=300))
def test_long_keys_are_measured_in_bytes(key: str) -> None:
    """
    Padding any key past 1024 UTF-8 bytes makes it too long, however few
    characters it has.
    """
    padded = key * (MAX_KEY_BYTES // len(key.encode("utf-8")) + 1)
    assert len(padded.encode("utf-8")) > MAX_KEY_BYTES
    with pytest.raises(InvalidKey) as info:
        check_key(padded)
    assert info.value.too_long


# --- versions ---------------------------------------------------------------


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
    assert newest([a, None, b]) == max(a, b)


def test_counter_beats_clock_and_clock_beats_writer() -> None:
    assert Version(2, 0, "a") > Version(1, 10**15, "z")
    assert Version(1, 2, "a") > Version(1, 1, "z")
    assert Version(1, 1, "b") > Version(1, 1, "a")


@pytest.mark.parametrize(
    ("given_", "expected"),
    [([], None), ([None], None), ([None, V1], V1), ([V2, None, V1], V2), ([V1, V1], V1)],
)
def test_newest(given_: list[Version | None], expected: Version | None) -> None:
    assert newest(given_) == expected


class _Wall:
    """A settable wall clock in milliseconds."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def test_clock_follows_a_wall_clock_that_moves_forward() -> None:
    wall = _Wall(5000)
    clock = VersionClock("n1", wall)
    assert clock.mint(None) == Version(1, 5000, "n1")
    wall.ms = 9000
    assert clock.mint(V1) == Version(2, 9000, "n1")


def test_clock_survives_a_wall_clock_going_backwards() -> None:
    wall = _Wall(100_000)
    clock = VersionClock("n1", wall)
    first = clock.mint(None)
    wall.ms = 100_000 - NINETY_SECONDS_MS
    second = clock.mint(None)
    third = clock.mint(None)
    assert [first.clock_ms, second.clock_ms, third.clock_ms] == [100_000, 100_001, 100_002]
    assert first < second < third


def test_clock_never_goes_negative() -> None:
    clock = VersionClock("n1", _Wall(-NINETY_SECONDS_MS))
    assert clock.mint(None) == Version(1, 0, "n1")
    assert clock.mint(None) == Version(1, 1, "n1")


@pytest.mark.parametrize("writer", ["", "a b", "w/x", "é"])
def test_clock_rejects_bad_writer(writer: str) -> None:
    with pytest.raises(VersionError):
        VersionClock(writer, _Wall(0))


@PROPERTY
@given(
    start=st.integers(min_value=0, max_value=10**13),
    moves=st.lists(
        st.tuples(
            st.integers(min_value=-NINETY_SECONDS_MS, max_value=NINETY_SECONDS_MS),
            st.one_of(st.none(), versions),
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
    wall = _Wall(start)
    clock = VersionClock("w", wall)
    minted = []
    for step, prior in moves:
        wall.ms += step
        v = clock.mint(prior)
        if prior is not None:
            assert v > prior
            assert v.counter == prior.counter + 1
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
    now = _Wall(10**12)
    a = VersionClock("a", lambda: now.ms + skew_a)
    b = VersionClock("b", lambda: now.ms + skew_b)
    last: Version | None = None
    for use_a, step in moves:
        now.ms += step
        v = (a if use_a else b).mint(last)
        assert last is None or v > last
        last = v


# --- records ----------------------------------------------------------------


@PROPERTY
@given(records)
def test_record_round_trips(record: Record) -> None:
    data = encode(record)
    assert decode(data) == record
    assert data.startswith(b"SKR1")
    assert len(data) == (
        _HEAD.size
        + len(record.version.writer)
        + len(record.content_type.encode("utf-8"))
        + len(record.value)
        + _CRC.size
    )


@PROPERTY
@given(records, st.data())
def test_any_flipped_byte_is_caught(record: Record, data: st.DataObject) -> None:
    encoded = encode(record)
    index = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1), label="index")
    mask = data.draw(st.integers(min_value=1, max_value=255), label="mask")
    damaged = bytearray(encoded)
    damaged[index] ^= mask
    with pytest.raises(CorruptRecord):
        decode(bytes(damaged))


@PROPERTY
@given(records, st.data())
def test_truncated_records_are_caught(record: Record, data: st.DataObject) -> None:
    encoded = encode(record)
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1), label="cut")
    with pytest.raises(CorruptRecord):
        decode(encoded[:cut])


def _sealed(body: bytes) -> bytes:
    """C{body} with a valid checksum, so decoding gets past the CRC check."""
    return body + _CRC.pack(zlib.crc32(body))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "record too short (0 bytes)"),
        (b"SKR1" + b"\0" * 10, "record too short (14 bytes)"),
        (_sealed(_HEAD.pack(b"XXXX", 0, 1, 0, 0, 1, 0) + b"w"), "unknown record format b'XXXX'"),
        (
            _sealed(_HEAD.pack(b"SKR1", 0, 0, 0, 0, 1, 0) + b"w"),
            "record header does not parse: not a valid version",
        ),
        (
            _sealed(_HEAD.pack(b"SKR1", 0, 1, 0, 0, 3, 0) + b"a b"),
            "record header does not parse: not a valid version",
        ),
        (
            _sealed(_HEAD.pack(b"SKR1", 0, 1, 0, 0, 1, 1) + b"w\xff"),
            "record header does not parse: 'utf-8' codec",
        ),
        (
            _sealed(_HEAD.pack(b"SKR1", 0, 1, 0, 0, 1, 0) + b"\xff"),
            "record header does not parse: 'ascii' codec",
        ),
    ],
)
def test_decode_rejects(data: bytes, message: str) -> None:
    with pytest.raises(CorruptRecord) as info:
        decode(data)
    assert str(info.value).startswith(message)


def test_decode_reports_checksum_mismatch() -> None:
    encoded = bytearray(encode(Record(V1, b"value")))
    encoded[-1] ^= 1
    with pytest.raises(CorruptRecord, match=r"^record checksum mismatch$"):
        decode(bytes(encoded))


def test_record_defaults_and_tombstones() -> None:
    record = Record(V1)
    assert (record.value, record.content_type, record.tombstone, record.stored_ms) == (
        b"",
        DEFAULT_CONTENT_TYPE,
        False,
        0,
    )
    assert DEFAULT_CONTENT_TYPE == "application/octet-stream"
    gone = Record.deleted(V2, stored_ms=77)
    assert gone == Record(V2, b"", "", True, 77)
    assert decode(encode(gone)) == gone


def test_same_data_ignores_local_stored_time() -> None:
    a = Record(V1, b"x", "text/plain", stored_ms=1)
    assert a.same_data(Record(V1, b"x", "text/plain", stored_ms=999))
    assert not a.same_data(None)
    assert not a.same_data(Record(V2, b"x", "text/plain"))
    assert not a.same_data(Record(V1, b"y", "text/plain"))
    assert not a.same_data(Record(V1, b"x", "text/html"))
    assert not a.same_data(Record(V1, b"x", "text/plain", tombstone=True))
    assert a.checksum() == zlib.crc32(b"x")


# --- conditions -------------------------------------------------------------

_CURRENT = {"absent": None, "v1": V1, "v2": V2}
_PRECONDITIONS = {
    "none": Precondition(),
    "match *": Precondition(match_any=True),
    "none-match *": Precondition(none_match_any=True),
    "match v1": Precondition(if_match=frozenset([V1])),
    "match v1,v2": Precondition(if_match=frozenset([V2, V1])),
}


@pytest.mark.parametrize(
    ("pre", "current", "failure"),
    [
        ("none", "absent", None),
        ("none", "v1", None),
        ("match *", "absent", "the key does not exist and If-Match: * was given"),
        ("match *", "v1", None),
        ("none-match *", "absent", None),
        (
            "none-match *",
            "v1",
            "the key exists (version 1-1000-n1) and If-None-Match: * was given",
        ),
        ("match v1", "v1", None),
        ("match v1", "v2", "If-Match wants 1-1000-n1 but the key has 2-2000-n2"),
        (
            "match v1",
            "absent",
            "If-Match wants 1-1000-n1 but the key has no version (the key is absent)",
        ),
        ("match v1,v2", "v1", None),
        ("match v1,v2", "v2", None),
        (
            "match v1,v2",
            "absent",
            "If-Match wants 1-1000-n1, 2-2000-n2 but the key has no version (the key is absent)",
        ),
    ],
)
def test_precondition_failure(pre: str, current: str, failure: str | None) -> None:
    assert _PRECONDITIONS[pre].failure(_CURRENT[current]) == failure


def test_unconditional() -> None:
    assert [name for name, p in _PRECONDITIONS.items() if p.unconditional] == ["none"]


@pytest.mark.parametrize(
    ("pre", "headers"),
    [
        ("none", {}),
        ("match *", {b"If-Match": b"*"}),
        ("none-match *", {b"If-None-Match": b"*"}),
        ("match v1", {b"If-Match": b'"1-1000-n1"'}),
        ("match v1,v2", {b"If-Match": b'"1-1000-n1", "2-2000-n2"'}),
    ],
)
def test_precondition_header_values(pre: str, headers: dict[bytes, bytes]) -> None:
    assert _PRECONDITIONS[pre].header_values() == headers


@pytest.mark.parametrize(
    ("header", "star", "tags"),
    [
        ("*", True, set()),
        ("  *  ", True, set()),
        ('"1-1000-n1"', False, {V1}),
        ("1-1000-n1", False, {V1}),
        ('W/"1-1000-n1"', False, {V1}),
        ('"1-1000-n1", "2-2000-n2"', False, {V1, V2}),
        ('"1-1000-n1","2-2000-n2"', False, {V1, V2}),
        (' "1-1000-n1" ,, W/"2-2000-n2" ', False, {V1, V2}),
        ('"1-1000-n1", "1-1000-n1"', False, {V1}),
    ],
)
def test_parse_etags(header: str, star: bool, tags: set[Version]) -> None:
    assert parse_etags(header) == (star, frozenset(tags))


@pytest.mark.parametrize(
    "header",
    ["", "  ", ",", " , ", "garbage", '"1-1000"', '"*"', '*, "1-1000-n1"', '"1-1000-n1", junk'],
)
def test_parse_etags_rejects(header: str) -> None:
    with pytest.raises(VersionError):
        parse_etags(header)


@PROPERTY
@given(st.frozensets(versions, min_size=1, max_size=5))
def test_forwarded_if_match_parses_back(tags: frozenset[Version]) -> None:
    """What the proxy forwards as If-Match means the same to the node."""
    header = Precondition(if_match=tags).header_values()[b"If-Match"]
    assert parse_etags(header.decode("latin-1")) == (False, tags)


@PROPERTY
@given(versions, st.one_of(st.none(), versions))
def test_if_match_passes_only_for_the_current_version(
    tag: Version, current: Version | None
) -> None:
    assume(current is None or current != tag)
    pre = Precondition(if_match=frozenset([tag]))
    assert pre.failure(tag) is None
    assert pre.failure(current) is not None
