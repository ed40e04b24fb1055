"""
Tests for L{shardkv.core.keys}: which keys every route accepts, measured in bytes.

Keys arrive by JSON, query argument and percent-encoded path; Hypothesis
checks that all three agree, since a key one route accepts and another
refuses could be written and never read back.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardkv.core.keys import (
    MAX_KEY_BYTES,
    InvalidKey,
    KeyTooLong,
    check_key,
    key_from_bytes,
    key_from_path,
)
from tests.core.helpers import PROPERTY, utf8_text


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
    assert isinstance(info.value, KeyTooLong) is too_long
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
    assert (isinstance(info.value, KeyTooLong), str(info.value)) == (too_long, message)


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
    assert isinstance(info.value, KeyTooLong) is too_long


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
            assert isinstance(info.value, KeyTooLong) is (size > MAX_KEY_BYTES)


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
    assert isinstance(info.value, KeyTooLong)
