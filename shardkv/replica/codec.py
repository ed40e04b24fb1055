"""Batches of replica operations: the wire format between proxy and node.

Why batches: one HTTP exchange through treq costs the proxy close to a
millisecond of CPU on a small machine, far more than the record it carries.
Under load the proxy sends every replica read and write pending for one node
as a single ``POST /replica/batch``, so that cost is paid once per batch
instead of once per key (twemproxy and mcrouter pipeline for the same reason).

The body is JSON; values travel as base64 so any bytes survive. Results come
back in the order of the operations, one per operation, each with an HTTP
status of its own: one key failing (a corrupt record, a full disk) says
nothing about the others.

Sizes are bounded both ways. The proxy puts only records of at most
L{MAX_INLINE_VALUE} bytes in a batch and at most L{MAX_OPS} operations, so
a request body stays under L{MAX_REQUEST_BYTES}. A node answers a read
whose value would push the response past L{MAX_INLINE_TOTAL} with
``"inline": false`` and the proxy fetches that key on its own.

A move between nodes (``POST /replica/stream``) uses the same format with
larger bounds: up to L{MAX_STREAM_OPS} puts, and a body of at most
L{MAX_STREAM_BYTES}, which the sender keeps to by adding up each record's
L{stream_cost}. Per-request costs dominate a move of small records, so its
batches are sixteen times the proxy's.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shardkv.core.keys import MAX_KEY_BYTES, InvalidKey, check_key
from shardkv.core.records import Record
from shardkv.core.versions import Version, VersionError
from shardkv.replica.protocol import InvalidContentType, check_content_type

MAX_OPS = 64
MAX_INLINE_VALUE = 64 * 1024
MAX_INLINE_TOTAL = 1024 * 1024

MAX_CONTENT_TYPE = 1024
"""The longest content type that travels in a batch (longer ones, still within
L{shardkv.replica.protocol.check_content_type}'s bound, go on their own)."""

_MAX_OP_OVERHEAD = 6 * (2 * MAX_KEY_BYTES + MAX_CONTENT_TYPE) + 512
MAX_REQUEST_BYTES = MAX_OPS * (_MAX_OP_OVERHEAD + 4 * MAX_INLINE_VALUE // 3 + 4)
"""The largest body a proxy sends: every key and hint target JSON-escaped at
six bytes per byte, every value at the inline limit."""

MAX_STREAM_OPS = 1024
"""The most records one ``POST /replica/stream`` carries."""

MAX_STREAM_BYTES = 4 << 20
"""The largest stream body a node takes, and so the most L{stream_cost} a
sender puts in one batch. A record costing more travels on its own."""

_STREAM_OP_OVERHEAD = 160
"""A put's JSON beyond its escaped fields: the names, quotes, punctuation, the
version's two numbers and the tombstone flag."""


class BatchError(ValueError):
    """A batch body that does not follow this format."""


@dataclass(frozen=True, slots=True)
class GetOp:
    key: str


@dataclass(frozen=True, slots=True)
class PutOp:
    """Store ``record`` if newer; as a hint for ``hint_for`` when that is set."""

    key: str
    record: Record
    hint_for: str | None = None


Op = GetOp | PutOp


@dataclass(frozen=True, slots=True)
class Result:
    """One operation's answer.

    ``status`` is 200 for success, 404 for a read that found nothing, and
    otherwise the HTTP status the same operation would have got on its own,
    with ``error`` and ``message``. A read may come back with ``inline``
    False: the record exists but was left out to bound the response. A put
    says whether it was applied, and what the node held before (``held``,
    ``live``): what a proxy's one-round write needs (see
    L{shardkv.proxy.coordinator}). Old proxies ignore those fields.
    """

    status: int
    record: Record | None = None
    applied: bool = False
    inline: bool = True
    error: str = ""
    message: str = ""
    held: Version | None = None
    """For a put: the version the node held before it (a refused put: the newer
    one that won), None when it held nothing."""
    live: bool | None = None
    """For a put: whether what it held was a live record, not a tombstone. None
    when the node did not say (a hint; or a node older than this field, which
    also leaves ``held`` out), so a proxy knows it cannot rely on either."""


def fits(record: Record) -> bool:
    """May this record travel in a batch? Larger ones go on their own."""
    if len(record.value) > MAX_INLINE_VALUE or len(record.content_type) > MAX_CONTENT_TYPE:
        return False
    try:
        check_content_type(record.content_type)
    except InvalidContentType:
        return False
    return True


def stream_cost(key: str, record: Record) -> int:
    """An upper bound of the bytes ``record`` adds to a stream body.

    Six bytes per character of the key, content type and writer (the longest
    JSON escape; no character takes more in UTF-8), four thirds of the value
    for base64: a sum of lengths, cheap enough for every record of a move.
    """
    text = len(key) + len(record.content_type) + len(record.version.writer)
    return 6 * text + 4 * (len(record.value) + 2) // 3 + _STREAM_OP_OVERHEAD


def fits_stream(key: str, record: Record) -> bool:
    """May this record travel in a stream batch? Others go on their own."""
    if len(record.content_type) > MAX_CONTENT_TYPE:
        return False
    try:
        check_content_type(record.content_type)
    except InvalidContentType:
        return False
    return stream_cost(key, record) <= MAX_STREAM_BYTES


def _record_json(record: Record) -> dict[str, Any]:
    return {
        "version": str(record.version),
        "tombstone": record.tombstone,
        "content_type": record.content_type,
        "value": base64.b64encode(record.value).decode("ascii"),
    }


def _record(raw: Any) -> Record:
    if not isinstance(raw, dict):
        raise BatchError("a record must be a JSON object")
    version, value = raw.get("version"), raw.get("value")
    ctype, tombstone = raw.get("content_type"), raw.get("tombstone")
    if not isinstance(version, str) or not isinstance(value, str):
        raise BatchError("a record needs a string version and a base64 string value")
    if not isinstance(ctype, str) or len(ctype) > MAX_CONTENT_TYPE:
        raise BatchError(f"a record's content_type must be a string of at most {MAX_CONTENT_TYPE}")
    try:
        check_content_type(ctype)
    except InvalidContentType as e:
        raise BatchError(f"a record's content_type is refused: {e}") from None
    if not isinstance(tombstone, bool):
        raise BatchError("a record's tombstone must be true or false")
    try:
        return Record(
            Version.parse(version),
            base64.b64decode(value, validate=True),
            ctype,
            tombstone,
        )
    except (VersionError, ValueError) as e:
        raise BatchError(f"a record is malformed: {e}") from None


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise BatchError("the body is not valid JSON") from None


def _key(raw: Any) -> str:
    if not isinstance(raw, str):
        raise BatchError("every operation needs a string key")
    try:
        return check_key(raw)
    except InvalidKey as e:
        raise BatchError(str(e)) from None


def encode_request(ops: Sequence[Op]) -> bytes:
    out: list[dict[str, Any]] = []
    for op in ops:
        if isinstance(op, GetOp):
            out.append({"op": "get", "key": op.key})
        else:
            put: dict[str, Any] = {"op": "put", "key": op.key, "record": _record_json(op.record)}
            if op.hint_for is not None:
                put["hint_for"] = op.hint_for
            out.append(put)
    return json.dumps({"ops": out}, ensure_ascii=False).encode("utf-8")


def decode_request(body: bytes, max_ops: int = MAX_OPS) -> list[Op]:
    """The operations in a request body; L{BatchError} names what is wrong.

    ``max_ops``: how many a body may hold (L{MAX_STREAM_OPS} for a stream).
    """
    try:
        items = _json(body)["ops"]
    except (KeyError, TypeError):
        raise BatchError('the body must be a JSON object {"ops": [...]}') from None
    if not isinstance(items, list):
        raise BatchError('"ops" must be a list')
    if len(items) > max_ops:
        raise BatchError(f"a batch holds at most {max_ops} operations, not {len(items)}")
    ops: list[Op] = []
    for item in items:
        if not isinstance(item, dict):
            raise BatchError("every operation must be a JSON object")
        kind, key = item.get("op"), _key(item.get("key"))
        if kind == "get":
            ops.append(GetOp(key))
        elif kind == "put":
            hint_for = item.get("hint_for")
            if hint_for is not None and not (
                isinstance(hint_for, str) and hint_for.isascii() and len(hint_for) <= MAX_KEY_BYTES
            ):
                raise BatchError("hint_for must be a node address")
            ops.append(PutOp(key, _record(item.get("record")), hint_for or None))
        else:
            raise BatchError(f"unknown operation {kind!r}; expected get or put")
    return ops


def encode_response(results: Sequence[Result]) -> bytes:
    out: list[dict[str, Any]] = []
    for result in results:
        item: dict[str, Any] = {"status": result.status}
        if result.error:
            item["error"], item["message"] = result.error, result.message
        elif result.record is not None:
            item["record"] = _record_json(result.record)
        elif not result.inline:
            item["inline"] = False
        else:
            item["applied"] = result.applied
            if result.live is not None:
                item["live"] = result.live
                if result.held is not None:
                    item["held"] = str(result.held)
        out.append(item)
    return json.dumps({"results": out}, ensure_ascii=False).encode("utf-8")


def put_answer(item: dict[str, Any], status: int = 200) -> Result:
    """A put's result from its JSON object (a batch's item, or the single-key
    route's answer); L{BatchError} if its ``held`` or ``live`` is malformed."""
    live, held = item.get("live"), item.get("held")
    if live is not None and not isinstance(live, bool):
        raise BatchError("a put's live must be true or false")
    version = None
    if held is not None:
        if not isinstance(held, str):
            raise BatchError("a put's held must be a version string")
        try:
            version = Version.parse(held)
        except VersionError as e:
            raise BatchError(f"a put's held version is malformed: {e}") from None
    return Result(
        status,
        applied=item.get("applied") is True,
        inline=item.get("inline", True),
        held=version,
        live=live,
    )


def decode_response(body: bytes, expected: int) -> list[Result]:
    """The results of a batch of ``expected`` operations."""
    try:
        items = _json(body)["results"]
    except (KeyError, TypeError):
        raise BatchError('the body must be a JSON object {"results": [...]}') from None
    if not isinstance(items, list) or len(items) != expected:
        raise BatchError(f"expected {expected} results")
    results = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("status"), int):
            raise BatchError("every result needs an integer status")
        status = item["status"]
        if "error" in item:
            results.append(
                Result(status, error=str(item["error"]), message=str(item.get("message", "")))
            )
        elif "record" in item:
            results.append(Result(status, record=_record(item["record"])))
        else:
            results.append(put_answer(item, status))
    return results
