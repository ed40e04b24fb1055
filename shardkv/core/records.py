"""Records: what a node stores under a key, and its on-disk encoding.

A record carries the value bytes, their content type, the version that wrote
them, and whether it is a tombstone (a delete that must keep its version so a
stale replica cannot resurrect the key). ``stored_ms`` is the local time the
node stored it; it is not replicated and only drives tombstone collection.

The encoding ends in a CRC-32 of everything before it. LMDB has no page
checksums, so a flipped bit on disk would otherwise be served as data;
L{decode} raises L{CorruptRecord} instead.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from shardkv.core.versions import Version, VersionError
from shardkv.errors import ShardkvError

_MAGIC = b"SKR1"
_HEAD = struct.Struct(
    ">4sBQQQHH"
)  # magic, flags, counter, clock_ms, stored_ms, len(writer), len(ctype)
_CRC = struct.Struct(">I")
_TOMBSTONE = 1

DEFAULT_CONTENT_TYPE = "application/octet-stream"


class CorruptRecord(ShardkvError, ValueError):
    """Stored bytes that fail their checksum or do not parse."""

    code = "corrupt_record"


@dataclass(frozen=True, slots=True)
class Record:
    version: Version
    value: bytes = b""
    content_type: str = DEFAULT_CONTENT_TYPE
    tombstone: bool = False
    stored_ms: int = 0

    @classmethod
    def deleted(cls, version: Version, stored_ms: int = 0) -> Record:
        return cls(version, b"", "", True, stored_ms)


def encode(record: Record) -> bytes:
    writer = record.version.writer.encode("ascii")
    ctype = record.content_type.encode("utf-8")
    head = _HEAD.pack(
        _MAGIC,
        _TOMBSTONE if record.tombstone else 0,
        record.version.counter,
        record.version.clock_ms,
        record.stored_ms,
        len(writer),
        len(ctype),
    )
    body = b"".join((head, writer, ctype, record.value))
    return body + _CRC.pack(zlib.crc32(body))


def decode(data: bytes) -> Record:
    """Decode bytes from L{encode}, verifying the checksum first."""
    if len(data) < _HEAD.size + _CRC.size:
        raise CorruptRecord(f"record too short ({len(data)} bytes)")
    body, (crc,) = data[: -_CRC.size], _CRC.unpack(data[-_CRC.size :])
    if zlib.crc32(body) != crc:
        raise CorruptRecord("record checksum mismatch")
    magic, flags, counter, clock_ms, stored_ms, wlen, clen = _HEAD.unpack_from(body)
    if magic != _MAGIC:
        raise CorruptRecord(f"unknown record format {magic!r}")
    start = _HEAD.size
    try:
        writer = body[start : start + wlen].decode("ascii")
        ctype = body[start + wlen : start + wlen + clen].decode("utf-8")
        version = Version(counter, clock_ms, writer)
    except (UnicodeDecodeError, VersionError) as e:
        raise CorruptRecord(f"record header does not parse: {e}") from None
    value = bytes(body[start + wlen + clen :])
    return Record(version, value, ctype, bool(flags & _TOMBSTONE), stored_ms)
