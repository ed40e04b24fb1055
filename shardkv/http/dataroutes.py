"""The data API, served identically by nodes and by the proxy.

Routes only parse, check and render; where the data lives is the backend's
business. A node's backend is its storage engine; the proxy's is the
coordinator that talks to nodes. So a client can call either one, and the
two can never drift apart in what they accept.

Seed API (kept exactly):   POST /set {"key", "value"}   GET /get?key=K
                           POST /delete {"key"}
REST API:                  PUT / GET / HEAD / DELETE /kv/{key}
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, TypeVar, Union

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest
from werkzeug.routing import BaseConverter

from shardkv.core import batch
from shardkv.core.conditions import Precondition, parse_etags
from shardkv.core.keys import InvalidKey, check_key, key_from_bytes, key_from_path
from shardkv.core.records import DEFAULT_CONTENT_TYPE, Record
from shardkv.core.versions import Version, VersionError
from shardkv.http.errors import ApiError, bad_request, json_body

T = TypeVar("T")
R = TypeVar("R")
Maybe: TypeAlias = Union[T, Deferred[T]]  # noqa: UP007

DEFAULT_MAX_VALUE_BYTES = 1 << 20
JSON_ENVELOPE_SLACK = 16 << 10
SMALL_BODY_LIMIT = 16 << 10
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Consistency:
    """Per-request quorum settings: ``?r=``, ``?w=``, ``?sloppy=true`` or the
    ``X-Shardkv-R`` / ``X-Shardkv-W`` / ``X-Shardkv-Sloppy`` headers.

    None means the cluster default. A node serves only its own copy and
    ignores them.
    """

    r: int | None = None
    w: int | None = None
    sloppy: bool = False


@dataclass(frozen=True, slots=True)
class WriteResult:
    version: Version
    created: bool


class KVBackend(Protocol):
    """What the data routes need from whatever holds the data.

    Each method may answer synchronously (a node reading memory) or with a
    Deferred (anything that waits), so the fast path stays free of Deferreds.
    Failures are raised as L{ApiError}.
    """

    max_value_bytes: int

    def read(self, key: str, c: Consistency) -> Maybe[Record | None]:
        """The live record for ``key``, or None when absent or deleted."""

    def write(
        self, key: str, value: bytes, content_type: str, pre: Precondition, c: Consistency
    ) -> Maybe[WriteResult]: ...

    def remove(self, key: str, pre: Precondition, c: Consistency) -> Maybe[Version]:
        """Delete ``key``; the tombstone's version. ApiError 404 if absent."""


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
            if method == b"PUT" and path.startswith(b"/replica/kv/"):
                return max_value_bytes
            if method == b"POST" and path == b"/replica/batch":
                return batch.MAX_REQUEST_BYTES
        return SMALL_BODY_LIMIT

    return limit


def _invalid_key(e: InvalidKey) -> ApiError:
    if e.too_long:
        return ApiError(414, "key_too_long", str(e))
    return ApiError(400, "invalid_key", str(e))


def path_key(request: IRequest, prefix: bytes = b"/kv/") -> str:
    """The key from the raw path after ``prefix``, percent-decoded and checked."""
    try:
        return key_from_path(request.path[len(prefix) :])
    except InvalidKey as e:
        raise _invalid_key(e) from None


def query_key(request: IRequest) -> str:
    """The key from ``?key=``, checked."""
    raw = request.args.get(b"key")
    if not raw:
        raise bad_request("the query parameter ?key= is required", "invalid_key")
    try:
        return key_from_bytes(raw[0])
    except InvalidKey as e:
        raise _invalid_key(e) from None


def _quorum_number(request: IRequest, name: bytes) -> int | None:
    raw = request.args.get(name, [None])[0] or request.getHeader(b"x-shardkv-" + name)
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise bad_request(
            f"{name.decode()} must be a positive whole number, not {raw.decode('latin-1')!r}",
            "invalid_quorum",
        )
    return int(raw)


def consistency(request: IRequest) -> Consistency:
    sloppy = request.args.get(b"sloppy", [None])[0] or request.getHeader(b"x-shardkv-sloppy")
    return Consistency(
        r=_quorum_number(request, b"r"),
        w=_quorum_number(request, b"w"),
        sloppy=(sloppy or b"").lower() in (b"1", b"true", b"yes"),
    )


def _json_object(request: IRequest) -> dict[str, Any]:
    try:
        body = json.loads(request.content.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object", "invalid_json")
    return body


def _json_key(body: dict[str, Any]) -> str:
    key = body.get("key")
    if not isinstance(key, str):
        raise bad_request('"key" is required and must be a string', "invalid_key")
    try:
        return check_key(key)
    except InvalidKey as e:
        raise _invalid_key(e) from None


def _json_precondition(body: dict[str, Any]) -> Precondition:
    """The seed API's optional ``"version"`` field, meaning If-Match."""
    version = body.get("version")
    if version is None:
        return Precondition()
    if not isinstance(version, str):
        raise bad_request('"version" must be a string (an ETag from a read)', "invalid_version")
    try:
        return Precondition(if_match=frozenset([Version.parse(version)]))
    except VersionError as e:
        raise bad_request(str(e), "invalid_version") from None


def header_precondition(request: IRequest) -> Precondition:
    """If-Match / If-None-Match: * from a write request."""
    try:
        match_any, match = False, frozenset[Version]()
        raw = request.getHeader(b"if-match")
        if raw is not None:
            match_any, match = parse_etags(raw.decode("latin-1"))
        none_any = False
        raw = request.getHeader(b"if-none-match")
        if raw is not None:
            none_any, _ = parse_etags(raw.decode("latin-1"))
            if not none_any:
                raise bad_request(
                    "only If-None-Match: * is supported on writes", "invalid_precondition"
                )
    except VersionError as e:
        raise bad_request(f"bad entity tag: {e}", "invalid_precondition") from None
    return Precondition(if_match=match, match_any=match_any, none_match_any=none_any)


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
        text: str = raw.decode("ascii")
    except UnicodeDecodeError:
        raise bad_request("the Content-Type header is not ASCII") from None
    return text


def _check_size(value: bytes, limit: int) -> None:
    if len(value) > limit:
        raise ApiError(
            413,
            "payload_too_large",
            f"the value is {len(value)} bytes; the limit is {limit}",
        )


def not_found(key: str) -> ApiError:
    return ApiError(404, "not_found", f"no value for key {key!r}")


def _value_fields(record: Record) -> dict[str, str]:
    try:
        return {"value": record.value.decode("utf-8")}
    except UnicodeDecodeError:
        return {"value_base64": base64.b64encode(record.value).decode("ascii")}


class AnyPath(BaseConverter):
    """The rest of the path, slashes (even leading ones) included."""

    regex = ".+"
    part_isolating = False


def install_data_routes(app: Klein) -> None:
    """Register the data API on ``app``; its instances must be L{KVBackend}s."""
    # A key may begin with "/" (/kv/%2Fa decodes to /kv//a): match any
    # rest of the path, and never merge or redirect slashes.
    app.url_map.merge_slashes = False
    app.url_map.converters["key"] = AnyPath

    @app.route("/set", methods=["POST"])
    def set_(self: KVBackend, request: IRequest) -> Maybe[bytes]:
        body = _json_object(request)
        key = _json_key(body)
        value = body.get("value")
        if not isinstance(value, str):
            raise bad_request('"value" is required and must be a string', "invalid_value")
        data = value.encode("utf-8", "surrogatepass")
        _check_size(data, self.max_value_bytes)
        pre = _json_precondition(body)

        def done(result: WriteResult) -> bytes:
            request.setHeader(b"etag", result.version.etag().encode())
            return json_body(request, 200, {"key": key, "version": str(result.version)})

        return _then(self.write(key, data, TEXT_CONTENT_TYPE, pre, consistency(request)), done)

    @app.route("/get", methods=["GET"])
    def get_(self: KVBackend, request: IRequest) -> Maybe[bytes]:
        key = query_key(request)

        def render(record: Record | None) -> bytes:
            if record is None:
                raise not_found(key)
            request.setHeader(b"etag", record.version.etag().encode())
            payload = {"key": key, **_value_fields(record), "version": str(record.version)}
            return json_body(request, 200, payload)

        return _then(self.read(key, consistency(request)), render)

    @app.route("/delete", methods=["POST"])
    def delete_(self: KVBackend, request: IRequest) -> Maybe[bytes]:
        body = _json_object(request)
        key = _json_key(body)
        pre = _json_precondition(body)

        def done(version: Version) -> bytes:
            return json_body(request, 200, {"key": key, "deleted": True, "version": str(version)})

        return _then(self.remove(key, pre, consistency(request)), done)

    @app.route("/kv/<key:_key>", methods=["GET"])
    def kv_get(self: KVBackend, request: IRequest, _key: str) -> Maybe[bytes]:
        key = path_key(request)

        def render(record: Record | None) -> bytes:
            if record is None:
                raise not_found(key)
            etag = record.version.etag().encode()
            request.setHeader(b"etag", etag)
            if _none_match(request.getHeader(b"if-none-match"), record.version):
                request.setResponseCode(304)
                return b""
            request.setHeader(b"content-type", record.content_type.encode("ascii"))
            return record.value

        return _then(self.read(key, consistency(request)), render)

    @app.route("/kv/<key:_key>", methods=["PUT"])
    def kv_put(self: KVBackend, request: IRequest, _key: str) -> Maybe[bytes]:
        key = path_key(request)
        value = request.content.read()
        _check_size(value, self.max_value_bytes)
        pre = header_precondition(request)

        def done(result: WriteResult) -> bytes:
            request.setHeader(b"etag", result.version.etag().encode())
            status = 201 if result.created else 200
            return json_body(request, status, {"key": key, "version": str(result.version)})

        return _then(
            self.write(key, value, _content_type(request), pre, consistency(request)), done
        )

    @app.route("/kv/<key:_key>", methods=["DELETE"])
    def kv_delete(self: KVBackend, request: IRequest, _key: str) -> Maybe[bytes]:
        key = path_key(request)
        pre = header_precondition(request)

        def done(version: Version) -> bytes:
            return json_body(request, 200, {"key": key, "deleted": True, "version": str(version)})

        return _then(self.remove(key, pre, consistency(request)), done)
