"""JSON errors for every failure a client can see.

The domain raises L{shardkv.errors.ShardkvError}s and knows nothing of HTTP;
L{STATUS} below is the one table that gives each its status. Klein's own
defaults are HTML pages (404, 405) and a bare 500; every handler here answers
``{"error": code, "message": text}`` instead, so a client never has to parse
HTML or guess what went wrong.
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.exceptions import NotFound as NoRoute

from shardkv.core.keys import InvalidKey, KeyTooLong
from shardkv.core.records import CorruptRecord
from shardkv.errors import (
    Forbidden,
    InvalidChange,
    InvalidHintTarget,
    InvalidMap,
    InvalidRequest,
    MapConflict,
    MapUnavailable,
    NotFound,
    Overloaded,
    PreconditionFailed,
    QuorumTimeout,
    QuorumUnavailable,
    ReplicaCallFailed,
    ShardkvError,
    StorageError,
    StorageFull,
    Unauthorized,
    UnknownMember,
    ValueTooLarge,
)

log = Logger(namespace="shardkv.web")

JSON = b"application/json"


STATUS: dict[type[ShardkvError], int] = {
    InvalidRequest: 400,
    InvalidKey: 400,
    KeyTooLong: 414,
    ValueTooLarge: 413,
    NotFound: 404,
    PreconditionFailed: 412,
    QuorumUnavailable: 503,
    QuorumTimeout: 504,
    Overloaded: 503,
    CorruptRecord: 503,
    StorageError: 503,
    StorageFull: 507,
    InvalidHintTarget: 400,
    ReplicaCallFailed: 502,
    Unauthorized: 401,
    Forbidden: 403,
    InvalidMap: 400,
    InvalidChange: 400,
    UnknownMember: 404,
    MapConflict: 409,
    MapUnavailable: 503,
}
"""The one place where a domain error becomes an HTTP status. The most
specific class listed wins; a domain error not listed here is a 500."""


def status_for(error: ShardkvError) -> int:
    for cls in type(error).__mro__:
        status = STATUS.get(cls)
        if status is not None:
            return status
    return 500


def error_body(error: ShardkvError) -> dict[str, Any]:
    """The JSON body: code and message first, then the details, which can never replace them."""
    body: dict[str, Any] = {"error": error.code, "message": error.message}
    body.update((k, v) for k, v in error.details.items() if k not in body)
    return body


_ENCODER = json.JSONEncoder(ensure_ascii=False)
"""What ``json.dumps(payload, ensure_ascii=False)`` builds on every call, built once."""


def json_body(request: IRequest, status: int, payload: object) -> bytes:
    """Set the status and JSON content type; return the encoded body."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON)
    return _ENCODER.encode(payload).encode("utf-8") + b"\n"


def install_error_handlers(app: Klein) -> None:
    """Register JSON error handlers on ``app``.

    Klein tries handlers in registration order, so the catch-all comes last;
    registered first it would swallow NotFound as a 500.
    """

    @app.handle_errors(ShardkvError)
    def domain_error(self: Any, request: IRequest, failure: Failure) -> bytes:
        err = failure.value
        assert isinstance(err, ShardkvError)
        status = status_for(err)
        retry_after = getattr(err, "retry_after", None)
        if retry_after is not None:
            request.setHeader(b"retry-after", b"%d" % retry_after)
        if status == 500:
            log.failure(
                "unmapped {code} handling {path}", failure, code=err.code, path=request.path
            )
        return json_body(request, status, error_body(err))

    @app.handle_errors(NoRoute)
    def not_found(self: Any, request: IRequest, failure: Failure) -> bytes:
        path = request.path.decode("utf-8", "replace")
        return json_body(request, 404, {"error": "no_route", "message": f"no route for {path}"})

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(self: Any, request: IRequest, failure: Failure) -> bytes:
        err = failure.value
        assert isinstance(err, MethodNotAllowed)
        allowed = sorted(err.valid_methods or [])
        request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("utf-8", "replace")
        return json_body(
            request,
            405,
            {
                "error": "method_not_allowed",
                "message": f"{method} is not allowed on {path}; use {', '.join(allowed)}",
            },
        )

    @app.handle_errors(HTTPException)
    def other_http(self: Any, request: IRequest, failure: Failure) -> bytes:
        err = failure.value
        assert isinstance(err, HTTPException)
        status = err.code if err.code and 400 <= err.code < 500 else 400
        return json_body(request, status, {"error": "bad_request", "message": str(err.description)})

    @app.handle_errors(CancelledError)
    def cancelled(self: Any, request: IRequest, failure: Failure) -> bytes:
        """The client hung up; nobody reads this answer, so log nothing."""
        return json_body(request, 499, {"error": "cancelled", "message": "client went away"})

    @app.handle_errors(Exception)
    def internal(self: Any, request: IRequest, failure: Failure) -> bytes:
        log.failure(
            "unexpected error handling {method} {path}",
            failure,
            method=request.method,
            path=request.path,
        )
        return json_body(
            request,
            500,
            {"error": "internal", "message": "internal error; see the server log"},
        )
