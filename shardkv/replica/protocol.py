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

The cluster map's routes (L{MAP_PATH} and below) and the move's
(L{MOVE_PATH}, L{PLAN_PATH}, L{PLAN_KEYS_PATH}, L{STREAM_PATH}) take and give
JSON; every data route above, and L{STREAM_PATH}, checks L{EPOCH_HEADER}.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from shardkv.core.records import DEFAULT_CONTENT_TYPE, Record
from shardkv.core.versions import Version
from shardkv.errors import InvalidRequest

REPLICA_KV_PREFIX = "/replica/kv/"
BATCH_PATH = "/replica/batch"
HEALTH_PATH = "/health"

EPOCH_HEADER = b"X-Shardkv-Epoch"
"""The map epoch a replica call was planned at. A node that has learned a
newer epoch refuses the call (409 ``stale_epoch``, with its map), except a
call of the epoch just before within L{FENCE_GRACE}; without the header
nothing is checked."""
MAP_EPOCH_HEADER = b"X-Shardkv-Map-Epoch"
"""On a node's answer to a call of an older epoch that it still took (within
L{FENCE_GRACE}): the node's epoch, so that the caller fetches the new map."""
FENCE_GRACE = 0.5
"""Seconds a node still takes calls planned at the epoch before the one it
learned. A proxy learns the new map from the answers meanwhile and builds its
rings off the reactor, instead of having every request in flight refused and
waiting for them. The rules that keep this safe: a move's stream sends the
writes a node took in its grace again once the grace is over, a cleanup
starts only then, and the next epoch is committed only after every node has
held this one for longer than the grace (so at most two adjacent epochs are
ever taken at once)."""

MAP_PATH = "/replica/map"
"""``GET``: the node's learned map and acceptor state."""
MAP_PREPARE_PATH = "/replica/map/prepare"
MAP_ACCEPT_PATH = "/replica/map/accept"
MAP_LEARN_PATH = "/replica/map/learn"
MOVE_PATH = "/replica/move"
PLAN_PATH = "/replica/plan"
PLAN_KEYS_PATH = "/replica/plan/keys"
STREAM_PATH = "/replica/stream"

VERSION_HEADER = b"X-Shardkv-Version"
TOMBSTONE_HEADER = b"X-Shardkv-Tombstone"
HINT_FOR = "hint_for"

MEMBERS_PATH = "/replica/members"
"""``PUT`` ``{"members": ["host:port", ...]}``: the proxy tells a node the cluster's members."""
MAX_MEMBERS = 1024
MAX_MEMBER_CHARS = 255

MAX_CONTENT_TYPE = 16 * 1024
"""The longest Content-Type a record may carry, in characters: as long as any
header line twisted.web takes, so whatever a client could send is bounded
here and never refused later, on the way to a replica."""
_CONTENT_TYPE = re.compile(r"[\x20-\x7e\t]*")


class InvalidContentType(ValueError):
    """A content type no record may carry."""


def check_content_type(content_type: str) -> str:
    """``content_type`` if a record may carry it, else L{InvalidContentType}.

    The one rule for every entry (the data API's PUT, a replica PUT's header,
    a batch record): printable ASCII, at most L{MAX_CONTENT_TYPE} characters.
    A stored content type is sent back as a header, so anything else would
    make every later read of the key fail, on this node and, once read repair
    copied it, on every replica.
    """
    if len(content_type) > MAX_CONTENT_TYPE:
        raise InvalidContentType(
            f"the Content-Type is {len(content_type)} characters; the limit is {MAX_CONTENT_TYPE}"
        )
    if _CONTENT_TYPE.fullmatch(content_type) is None:
        raise InvalidContentType("the Content-Type header is not printable ASCII")
    return content_type


def wire_content_type(content_type: str) -> bytes:
    """The header value for a stored content type; one stored before the rule
    existed and breaking it is sent as the default, so the key stays readable."""
    try:
        return check_content_type(content_type).encode("ascii")
    except InvalidContentType:
        return DEFAULT_CONTENT_TYPE.encode("ascii")


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
        b"Content-Type": wire_content_type(record.content_type),
    }


def record_from_headers(
    version: bytes | None,
    tombstone: bytes | None,
    content_type: bytes | None,
    value: bytes,
    strict: bool = False,
) -> Record:
    """The record that L{record_headers} and a body describe.

    L{VersionError} if the version does not parse (whether a node may store
    it is for L{shardkv.core.versions.check_incoming} to say). A content
    type that breaks L{check_content_type} raises L{InvalidContentType} when
    ``strict`` (a node taking a write), and otherwise (a caller reading a
    node's answer) reads as the default, so that a bad copy stored before
    the rule existed cannot break the reader.
    """
    parsed = Version.parse((version or b"").decode("latin-1"))
    try:
        raw = content_type or b""
        if len(raw) > MAX_CONTENT_TYPE:
            raise InvalidContentType(
                f"the Content-Type is {len(raw)} bytes; the limit is {MAX_CONTENT_TYPE}"
            )
        try:
            text = check_content_type(raw.decode("ascii"))
        except UnicodeDecodeError:
            raise InvalidContentType("the Content-Type header is not ASCII") from None
    except InvalidContentType:
        if strict:
            raise
        text = DEFAULT_CONTENT_TYPE
    return Record(parsed, value, text, tombstone == b"1")


def parse_members(body: bytes) -> list[str]:
    """The list in a ``{"members": ["host:port", ...]}`` body; L{InvalidRequest} if malformed."""
    try:
        payload: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidRequest("the body is not valid JSON", "invalid_members") from None
    members = payload.get("members") if isinstance(payload, dict) else None
    if not isinstance(members, list) or len(members) > MAX_MEMBERS:
        raise InvalidRequest(
            f'the body must be {{"members": [...]}} with at most {MAX_MEMBERS} names',
            "invalid_members",
        )
    for member in members:
        if not (
            isinstance(member, str)
            and member.isascii()
            and member.isprintable()
            and 0 < len(member) <= MAX_MEMBER_CHARS
        ):
            raise InvalidRequest(
                f"each member must be a node address of 1 to {MAX_MEMBER_CHARS} ASCII characters",
                "invalid_members",
            )
    return members


def members_body(members: Iterable[str]) -> bytes:
    return json.dumps({"members": sorted(members)}).encode("ascii")
