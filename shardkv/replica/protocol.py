"""The replica protocol's names, defined once for both ends.

A proxy (or a node handing hints back) reads and writes another node's own
copy of a key through these routes; the batch route carries many such
operations in one exchange (L{shardkv.replica.codec}).

``GET /replica/kv/{key}``
    The stored record, tombstones included: the value as the body, the
    version in L{VERSION_HEADER}, ``1`` in L{TOMBSTONE_HEADER} for a
    tombstone. 404 when there is none, or when the stored copy is corrupt
    (so read repair overwrites it).
``PUT /replica/kv/{key}[?hint_for=NODE]``
    Store a record minted elsewhere if it is newer; ``{"applied": bool}``.
    With ``hint_for`` the node only keeps it for NODE, which was down.
``POST /replica/batch``
    Many of the above at once.
``GET /health``
    The node's health report, which the proxy polls.
"""

from __future__ import annotations

from urllib.parse import quote

from shardkv.core.records import Record
from shardkv.core.versions import Version

REPLICA_KV_PREFIX = "/replica/kv/"
BATCH_PATH = "/replica/batch"
HEALTH_PATH = "/health"

VERSION_HEADER = b"X-Shardkv-Version"
TOMBSTONE_HEADER = b"X-Shardkv-Tombstone"
HINT_FOR = "hint_for"


def key_path(key: str, prefix: str = REPLICA_KV_PREFIX) -> str:
    """The path of ``key`` under ``prefix``, every byte of the key percent-encoded."""
    return prefix + quote(key.encode("utf-8"), safe="")


def replica_put_path(key: str, hint_for: str | None) -> str:
    path = key_path(key)
    if hint_for is not None:
        path += f"?{HINT_FOR}=" + quote(hint_for, safe="")
    return path


def record_headers(record: Record) -> dict[bytes, bytes]:
    """The headers that carry everything of ``record`` but its value."""
    return {
        VERSION_HEADER: str(record.version).encode(),
        TOMBSTONE_HEADER: b"1" if record.tombstone else b"0",
        b"Content-Type": record.content_type.encode("ascii"),
    }


def record_from_headers(
    version: bytes | None, tombstone: bytes | None, content_type: bytes | None, value: bytes
) -> Record:
    """The record that L{record_headers} and a body describe; L{VersionError} if the
    version does not parse."""
    return Record(
        Version.parse((version or b"").decode("latin-1")),
        value,
        (content_type or b"").decode("ascii", "replace"),
        tombstone == b"1",
    )
