"""
Tests for L{shardkv.core.records}: a record survives its own encoding, and
any damaged or truncated byte is caught as L{CorruptRecord} rather than
served as data.
"""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardkv.core.records import (
    _CRC,
    _HEAD,
    DEFAULT_CONTENT_TYPE,
    CorruptRecord,
    Record,
    decode,
    encode,
)
from tests.core.helpers import PROPERTY, V1, V2, versions
from tests.helpers import U64, same_data

records = st.builds(
    Record,
    version=versions,
    value=st.binary(max_size=512),
    content_type=st.text(alphabet=st.characters(codec="utf-8"), max_size=64),
    tombstone=st.booleans(),
    stored_ms=st.integers(min_value=0, max_value=U64),
)


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
    assert same_data(a, Record(V1, b"x", "text/plain", stored_ms=999))
    assert not same_data(a, None)
    assert not same_data(a, Record(V2, b"x", "text/plain"))
    assert not same_data(a, Record(V1, b"y", "text/plain"))
    assert not same_data(a, Record(V1, b"x", "text/html"))
    assert not same_data(a, Record(V1, b"x", "text/plain", tombstone=True))
