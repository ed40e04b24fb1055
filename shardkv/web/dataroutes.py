"""The data API, served identically by nodes and by the proxy.

Routes only parse, check and render; where the data lives is the backend's
business. A node's backend is its store over the storage engine; the proxy's
is the coordinator that talks to nodes, at the request's quorum settings. So a
client can call either one, and the two can never drift apart in what they
accept. Failures are domain errors (L{shardkv.errors}); L{shardkv.web.errors}
turns them into answers.

Seed API (kept exactly):   POST /set {"key", "value"}   GET /get?key=K
                           POST /delete {"key"}
REST API:                  PUT / GET / HEAD / DELETE /kv/{key}
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from typing import Any, Protocol, TypeAlias, TypeVar, Union

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest
from werkzeug.routing import BaseConverter

from shardkv.core.conditions import Precondition, parse_etag, parse_etags
from shardkv.core.keys import check_key, key_from_bytes, key_from_path
from shardkv.core.quorum import Consistency
from shardkv.core.records import DEFAULT_CONTENT_TYPE, Record
from shardkv.core.versions import Version, VersionError
from shardkv.core.writes import WriteResult
from shardkv.errors import InvalidRequest, NotFound, ValueTooLarge
from shardkv.replica import codec
from shardkv.replica.protocol import (
    BATCH_PATH,
    MAP_ACCEPT_PATH,
    MAP_LEARN_PATH,
    MAP_PREPARE_PATH,
    PLAN_KEYS_PATH,
    PLAN_PATH,
    REPLICA_KV_PREFIX,
    STREAM_PATH,
    InvalidContentType,
    check_content_type,
    wire_content_type,
)
from shardkv.web.errors import json_body

T = TypeVar("T")
R = TypeVar("R")
Maybe: TypeAlias = Union[T, Deferred[T]]  # noqa: UP007

DEFAULT_MAX_VALUE_BYTES = 1 << 20
JSON_ENVELOPE_SLACK = 16 << 10
SMALL_BODY_LIMIT = 16 << 10
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
_QUORUM_NUMBER = re.compile(rb"[0-9]{1,9}")
"""R and W: ASCII digits only (bytes.isdigit agrees, but int() refuses past
4,300 digits); nine are far more than any cluster's N."""


class KVBackend(Protocol):
    """What the data routes need from whatever holds the data.

    Each method may answer synchronously (a node reading memory) or with a
    Deferred (anything that waits), so the fast path stays free of Deferreds.
    Failures are raised as domain errors.
    """

    def read(self, key: str) -> Maybe[Record | None]:
        """The live record for ``key``, or None when absent or deleted."""

    def write(
        self, key: str, value: bytes, content_type: str, pre: Precondition
    ) -> Maybe[WriteResult]: ...

    def remove(self, key: str, pre: Precondition) -> Maybe[Version]:
        """Delete ``key``; the tombstone's version. L{NotFound} if absent."""


class DataService(Protocol):
    """What an app serving the data routes provides."""

    max_value_bytes: int

    def backend(self, request: IRequest) -> KVBackend:
        """The backend that serves ``request`` (the proxy's reads its quorum settings)."""


def _then(value: Maybe[T], f: Callable[[T], R]) -> Maybe[R]:
    if isinstance(value, Deferred):
        return value.addCallback(f)
    return f(value)


def body_limit_for(
    max_value_bytes: int, replica_routes: bool = False
) -> Callable[[bytes, bytes], int]:
    """The body limit per route, checked before the body is read.

    A ``/kv`` PUT carries the raw value. The seed API's JSON body may escape
    every byte of the value as ``\\u00XX`` (six bytes), so it gets six times
    the value limit plus room for the key; the decoded value is then held to
    the value limit itself. Only nodes (``replica_routes``) take the larger
    bodies of the replica routes; a proxy refuses them before reading.
    """
    json_limit = 6 * max_value_bytes + JSON_ENVELOPE_SLACK

    def limit(method: bytes, path: bytes) -> int:
        if method == b"PUT" and path.startswith(b"/kv/"):
            return max_value_bytes
        if method == b"POST" and path in (b"/set", b"/delete"):
            return json_limit
        if replica_routes:
            if method == b"PUT" and path.startswith(_REPLICA_KV):
                return max_value_bytes
            if method == b"POST" and path == _BATCH:
                return codec.MAX_REQUEST_BYTES
            if method == b"POST" and path == _STREAM:
                return codec.MAX_STREAM_BYTES
            if method == b"POST" and path in _MAP_ROUTES:
                return MAP_BODY_LIMIT
        return SMALL_BODY_LIMIT

    return limit


_REPLICA_KV = REPLICA_KV_PREFIX.encode()
_BATCH = BATCH_PATH.encode()
_STREAM = STREAM_PATH.encode()
_MAP_ROUTES = frozenset(
    p.encode()
    for p in (MAP_PREPARE_PATH, MAP_ACCEPT_PATH, MAP_LEARN_PATH, PLAN_PATH, PLAN_KEYS_PATH)
)
MAP_BODY_LIMIT = 1 << 20
"""The cluster map's routes and the plan's carry a whole map: room for
thousands of members, and still bounded before the body is read."""


def path_key(request: IRequest, prefix: bytes = b"/kv/") -> str:
    """The key from the raw path after ``prefix``, percent-decoded and checked."""
    return key_from_path(request.path[len(prefix) :])


def query_key(request: IRequest) -> str:
    """The key from ``?key=``, checked."""
    raw = request.args.get(b"key")
    if not raw:
        raise InvalidRequest("the query parameter ?key= is required", "invalid_key")
    return key_from_bytes(raw[0])


def _quorum_number(request: IRequest, name: bytes) -> int | None:
    raw = request.args.get(name, [None])[0] or request.getHeader(b"x-shardkv-" + name)
    if raw is None:
        return None
    if _QUORUM_NUMBER.fullmatch(raw) is None or int(raw) < 1:
        shown = raw[:40].decode("latin-1") + ("..." if len(raw) > 40 else "")
        raise InvalidRequest(
            f"{name.decode()} must be a positive whole number, not {shown!r}", "invalid_quorum"
        )
    return int(raw)


def consistency(request: IRequest) -> Consistency:
    sloppy = request.args.get(b"sloppy", [None])[0] or request.getHeader(b"x-shardkv-sloppy")
    return Consistency(
        r=_quorum_number(request, b"r"),
        w=_quorum_number(request, b"w"),
        sloppy=(sloppy or b"").lower() in (b"1", b"true", b"yes"),
    )


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object; L{InvalidRequest}
    (``invalid_json``, 400) for anything else. Every JSON route reads its
    body through this, so all of them refuse bad input alike."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"the body is not valid JSON: {e}", "invalid_json") from None
    except RecursionError:
        raise InvalidRequest(
            "the body is not valid JSON: nested too deep", "invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", "invalid_json")
    return body


def json_object(request: IRequest) -> dict[str, Any]:
    """The request's body as a JSON object (see L{parse_json_object})."""
    return parse_json_object(request.content.read())


def _json_key(body: dict[str, Any]) -> str:
    key = body.get("key")
    if not isinstance(key, str):
        raise InvalidRequest('"key" is required and must be a string', "invalid_key")
    return check_key(key)


def _json_precondition(body: dict[str, Any]) -> Precondition:
    """The seed API's optional ``"version"`` field, meaning If-Match.

    It holds an entity tag, usually bare as the API writes it: a well-formed
    tag that is no version of ours can never match (412 from the write rule);
    only a value that is not an entity tag is refused here.
    """
    version = body.get("version")
    if version is None:
        return Precondition()
    if not isinstance(version, str):
        raise InvalidRequest('"version" must be a string (an ETag from a read)', "invalid_version")
    try:
        tag = parse_etag(version, bare_opaque=True)
    except VersionError as e:
        raise InvalidRequest(str(e), "invalid_version") from None
    if isinstance(tag, Version):
        return Precondition(if_match=frozenset([tag]))
    return Precondition(other_tags=frozenset([tag]))


def header_precondition(request: IRequest) -> Precondition:
    """If-Match / If-None-Match: * from a write request."""
    try:
        match_any, match, others = False, frozenset[Version](), frozenset[str]()
        raw = request.getHeader(b"if-match")
        if raw is not None:
            tags = parse_etags(raw.decode("latin-1"))
            match_any, match, others = tags.any, tags.versions, tags.others
        none_any = False
        raw = request.getHeader(b"if-none-match")
        if raw is not None:
            none_any = parse_etags(raw.decode("latin-1")).any
            if not none_any:
                raise InvalidRequest(
                    "only If-None-Match: * is supported on writes", "invalid_precondition"
                )
    except VersionError as e:
        raise InvalidRequest(f"bad entity tag: {e}", "invalid_precondition") from None
    return Precondition(
        if_match=match, match_any=match_any, none_match_any=none_any, other_tags=others
    )


def _none_match(header: bytes | None, version: Version) -> bool:
    """Does a GET's If-None-Match name this version? (weak comparison, RFC 9110)"""
    if header is None:
        return False
    for tag in header.decode("latin-1").split(","):
        tag = tag.strip().removeprefix("W/")
        if tag == "*":
            return True
        try:
            if Version.parse(tag) == version:
                return True
        except VersionError:
            continue
    return False


def _content_type(request: IRequest) -> str:
    raw = request.getHeader(b"content-type")
    if raw is None:
        return DEFAULT_CONTENT_TYPE
    try:
        return check_content_type(raw.decode("ascii"))
    except UnicodeDecodeError:
        raise InvalidRequest("the Content-Type header is not ASCII") from None
    except InvalidContentType as e:
        raise InvalidRequest(str(e)) from None


def _check_size(value: bytes, limit: int) -> None:
    if len(value) > limit:
        raise ValueTooLarge(f"the value is {len(value)} bytes; the limit is {limit}")


# The two reads render at module level, not in closures made per request: they
# are the hottest routes, and a read from memory answers without a Deferred.


def _render_get(record: Record | None, request: IRequest, key: str) -> bytes:
    """``GET /get``: the record as JSON, its value as text or, if not UTF-8, base64."""
    if record is None:
        raise NotFound.key(key)
    version = record.version
    request.setHeader(b"etag", version.etag().encode())
    try:
        payload = {"key": key, "value": record.value.decode("utf-8"), "version": str(version)}
    except UnicodeDecodeError:
        value = base64.b64encode(record.value).decode("ascii")
        payload = {"key": key, "value_base64": value, "version": str(version)}
    return json_body(request, 200, payload)


def _render_kv_get(record: Record | None, request: IRequest, key: str) -> bytes:
    """``GET /kv/{key}``: the raw value with its content type, or 304 if If-None-Match names it."""
    if record is None:
        raise NotFound.key(key)
    request.setHeader(b"etag", record.version.etag().encode())
    if _none_match(request.getHeader(b"if-none-match"), record.version):
        request.setResponseCode(304)
        return b""
    request.setHeader(b"content-type", wire_content_type(record.content_type))
    return record.value


class AnyPath(BaseConverter):
    """The rest of the path, slashes (even leading ones) and newlines included:
    ``.`` alone stops at a newline, so a key holding one (``/kv/a%0Ab``) would
    be stored through ``/set`` but answer ``no_route`` here."""

    regex = "[\\s\\S]+"
    part_isolating = False


def install_data_routes(app: Klein) -> None:
    """Register the data API on ``app``; its instances must be L{DataService}s."""
    # A key may begin with "/" (/kv/%2Fa decodes to /kv//a): match any
    # rest of the path, and never merge or redirect slashes.
    app.url_map.merge_slashes = False
    app.url_map.converters["key"] = AnyPath

    @app.route("/set", methods=["POST"])
    def set_(self: DataService, request: IRequest) -> Maybe[bytes]:
        body = json_object(request)
        key = _json_key(body)
        value = body.get("value")
        if not isinstance(value, str):
            raise InvalidRequest('"value" is required and must be a string', "invalid_value")
        data = value.encode("utf-8", "surrogatepass")
        _check_size(data, self.max_value_bytes)
        pre = _json_precondition(body)

        def done(result: WriteResult) -> bytes:
            request.setHeader(b"etag", result.version.etag().encode())
            return json_body(request, 200, {"key": key, "version": str(result.version)})

        return _then(self.backend(request).write(key, data, TEXT_CONTENT_TYPE, pre), done)

    @app.route("/get", methods=["GET"])
    def get_(self: DataService, request: IRequest) -> Maybe[bytes]:
        key = query_key(request)
        record = self.backend(request).read(key)
        if isinstance(record, Deferred):
            return record.addCallback(_render_get, request, key)
        return _render_get(record, request, key)

    @app.route("/delete", methods=["POST"])
    def delete_(self: DataService, request: IRequest) -> Maybe[bytes]:
        body = json_object(request)
        key = _json_key(body)
        pre = _json_precondition(body)

        def done(version: Version) -> bytes:
            return json_body(request, 200, {"key": key, "deleted": True, "version": str(version)})

        return _then(self.backend(request).remove(key, pre), done)

    @app.route("/kv/<key:_key>", methods=["GET"])
    def kv_get(self: DataService, request: IRequest, _key: str) -> Maybe[bytes]:
        key = path_key(request)
        record = self.backend(request).read(key)
        if isinstance(record, Deferred):
            return record.addCallback(_render_kv_get, request, key)
        return _render_kv_get(record, request, key)

    @app.route("/kv/<key:_key>", methods=["PUT"])
    def kv_put(self: DataService, request: IRequest, _key: str) -> Maybe[bytes]:
        key = path_key(request)
        value = request.content.read()
        _check_size(value, self.max_value_bytes)
        pre = header_precondition(request)

        def done(result: WriteResult) -> bytes:
            request.setHeader(b"etag", result.version.etag().encode())
            status = 201 if result.created else 200
            return json_body(request, status, {"key": key, "version": str(result.version)})

        return _then(self.backend(request).write(key, value, _content_type(request), pre), done)

    @app.route("/kv/<key:_key>", methods=["DELETE"])
    def kv_delete(self: DataService, request: IRequest, _key: str) -> Maybe[bytes]:
        key = path_key(request)
        pre = header_precondition(request)

        def done(version: Version) -> bytes:
            return json_body(request, 200, {"key": key, "deleted": True, "version": str(version)})

        return _then(self.backend(request).remove(key, pre), done)
