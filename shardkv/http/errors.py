"""JSON errors for every failure a client can see.

Klein's defaults are HTML pages (404, 405) and a bare 500. Every handler here
answers ``{"error": code, "message": text}`` instead, so a client never has to
parse HTML or guess what went wrong.
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

log = Logger(namespace="shardkv.http")

JSON = b"application/json"


class ApiError(Exception):
    """An error with an HTTP status and a stable machine-readable code."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[bytes, bytes] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


def bad_request(message: str, code: str = "bad_request") -> ApiError:
    return ApiError(400, code, message)


def json_body(request: IRequest, status: int, payload: object) -> bytes:
    """Set the status and JSON content type; return the encoded body."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON)
    return json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n"


def install_error_handlers(app: Klein) -> None:
    """Register JSON error handlers on ``app``.

    Klein tries handlers in registration order, so the catch-all comes last;
    registered first it would swallow NotFound as a 500.
    """

    @app.handle_errors(ApiError)
    def api_error(self: Any, request: IRequest, failure: Failure) -> bytes:
        err = failure.value
        assert isinstance(err, ApiError)
        for name, value in err.headers.items():
            request.setHeader(name, value)
        return json_body(request, err.status, err.body())

    @app.handle_errors(NotFound)
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
