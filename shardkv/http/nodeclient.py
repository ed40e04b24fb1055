"""Calls to one node's HTTP API, with every failure given a clear meaning.

The proxy uses it to reach replicas; nodes use it to hand hints back.

Each call has a deadline covering the whole exchange (connect, headers and
body). Failures are sorted by what the caller may conclude:

- L{NodeUnreachable} with ``sent=False``: the request never left (connection
  refused); a write definitely did not happen.
- L{NodeUnreachable} with ``sent=True``: the connection broke after the
  request may have been delivered; a write's outcome is unknown.
- L{NodeTimeout}: no answer in time; a write's outcome is unknown.
- L{ApiError}: the node answered with an error of its own.

A cancellation from above (the client hung up) is re-raised as a bare
CancelledError, which Klein drops silently.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import treq
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from shardkv.core.conditions import Precondition
from shardkv.core.records import DEFAULT_CONTENT_TYPE, Record
from shardkv.core.versions import Version, VersionError
from shardkv.http.dataroutes import WriteResult
from shardkv.http.errors import ApiError

_NOT_SENT = (
    neterror.ConnectionRefusedError,
    neterror.ConnectError,
    neterror.DNSLookupError,
    neterror.NoRouteError,
)


class NodeUnreachable(Exception):
    def __init__(self, node: str, reason: str, sent: bool) -> None:
        super().__init__(f"node {node} is unreachable: {reason}")
        self.node = node
        self.reason = reason
        self.sent = sent


class NodeTimeout(Exception):
    def __init__(self, node: str, seconds: float) -> None:
        super().__init__(f"node {node} did not answer within {seconds:g} s")
        self.node = node
        self.seconds = seconds


def _cancelled(exc: BaseException) -> bool:
    if isinstance(exc, CancelledError | neterror.ConnectingCancelledError):
        return True
    reasons = getattr(exc, "reasons", None) or []
    return any(r.check(CancelledError) for r in reasons)


def key_path(key: str, prefix: str = "/kv/") -> str:
    return prefix + quote(key.encode("utf-8"), safe="")


REPLICA = "/replica/kv/"
VERSION_HEADER = b"X-Shardkv-Version"
TOMBSTONE_HEADER = b"X-Shardkv-Tombstone"


class NodeClient:
    """The node API as seen from the proxy."""

    def __init__(self, http: Any, clock: Any, timeout: float) -> None:
        self._http = http
        self._clock = clock
        self.timeout = timeout

    async def _call(
        self, node: str, method: str, path: str, **kwargs: Any
    ) -> tuple[int, Any, bytes]:
        url = f"http://{node}{path}".encode("ascii")

        async def exchange() -> tuple[int, Any, bytes]:
            # A node never redirects, and the body is read at once: skip
            # treq's redirect and buffering wrappers on this hot path.
            response = await self._http.request(
                method, url, allow_redirects=False, unbuffered=True, **kwargs
            )
            body = await treq.content(response)
            return response.code, response.headers, body

        timed_out = []

        def on_timeout(result: Any, timeout: float) -> Any:
            timed_out.append(True)
            return result

        d = Deferred.fromCoroutine(exchange())
        d.addTimeout(self.timeout, self._clock, on_timeout)
        try:
            return await d
        except _NOT_SENT as e:
            raise NodeUnreachable(node, str(e) or type(e).__name__, sent=False) from None
        except (ResponseNeverReceived, ResponseFailed, neterror.ConnectionLost) as e:
            if timed_out:
                raise NodeTimeout(node, self.timeout) from None
            if _cancelled(e):
                raise CancelledError() from None
            raise NodeUnreachable(node, "the connection broke mid-request", sent=True) from None
        except CancelledError:
            if timed_out:
                raise NodeTimeout(node, self.timeout) from None
            raise

    def _node_error(self, node: str, status: int, body: bytes) -> ApiError:
        try:
            payload = json.loads(body)
            code, message = str(payload["error"]), str(payload["message"])
        except (ValueError, KeyError, TypeError):
            code, message = "bad_gateway", f"unexpected answer (HTTP {status})"
            status = 502
        return ApiError(status, code, f"node {node}: {message}")

    @staticmethod
    def _version(node: str, headers: Any) -> Version:
        raw = headers.getRawHeaders(b"etag", [b""])[0].decode("latin-1")
        try:
            return Version.parse(raw)
        except VersionError:
            raise ApiError(502, "bad_gateway", f"node {node} sent a bad ETag {raw!r}") from None

    async def get(self, node: str, key: str) -> Record | None:
        status, headers, body = await self._call(node, "GET", key_path(key))
        if status == 404:
            return None
        if status != 200:
            raise self._node_error(node, status, body)
        ctype = headers.getRawHeaders(b"content-type", [DEFAULT_CONTENT_TYPE.encode()])[0]
        return Record(self._version(node, headers), body, ctype.decode("latin-1"))

    async def put(
        self, node: str, key: str, value: bytes, content_type: str, pre: Precondition
    ) -> WriteResult:
        headers = {b"Content-Type": content_type.encode("ascii"), **pre.header_values()}
        status, rheaders, body = await self._call(
            node, "PUT", key_path(key), data=value, headers=headers
        )
        if status not in (200, 201):
            raise self._node_error(node, status, body)
        return WriteResult(self._version(node, rheaders), created=status == 201)

    async def delete(self, node: str, key: str, pre: Precondition) -> Version:
        status, _, body = await self._call(
            node, "DELETE", key_path(key), headers=pre.header_values()
        )
        if status != 200:
            raise self._node_error(node, status, body)
        try:
            return Version.parse(json.loads(body)["version"])
        except (ValueError, KeyError, TypeError):
            raise ApiError(502, "bad_gateway", f"node {node} sent an unexpected answer") from None

    async def replica_get(self, node: str, key: str) -> Record | None:
        """The node's stored record for ``key``, tombstones included."""
        status, headers, body = await self._call(node, "GET", key_path(key, REPLICA))
        if status == 404:
            return None
        if status != 200:
            raise self._node_error(node, status, body)
        raw = headers.getRawHeaders(VERSION_HEADER, [b""])[0].decode("latin-1")
        try:
            version = Version.parse(raw)
        except VersionError:
            raise ApiError(502, "bad_gateway", f"node {node} sent a bad version {raw!r}") from None
        tombstone = headers.getRawHeaders(TOMBSTONE_HEADER, [b"0"])[0] == b"1"
        ctype = headers.getRawHeaders(b"content-type", [b""])[0].decode("latin-1")
        return Record(version, body, ctype, tombstone)

    async def replica_put(
        self, node: str, key: str, record: Record, hint_for: str | None = None
    ) -> bool:
        """Store ``record`` on ``node`` if newer; True if it was applied."""
        path = key_path(key, REPLICA)
        if hint_for is not None:
            path += "?hint_for=" + quote(hint_for, safe="")
        headers = {
            VERSION_HEADER: str(record.version).encode(),
            TOMBSTONE_HEADER: b"1" if record.tombstone else b"0",
            b"Content-Type": record.content_type.encode("ascii"),
        }
        status, _, body = await self._call(node, "PUT", path, data=record.value, headers=headers)
        if status != 200:
            raise self._node_error(node, status, body)
        try:
            return bool(json.loads(body)["applied"])
        except (ValueError, KeyError, TypeError):
            raise ApiError(502, "bad_gateway", f"node {node} sent an unexpected answer") from None

    async def health(self, node: str) -> dict[str, Any]:
        status, _, body = await self._call(node, "GET", "/health")
        try:
            payload = json.loads(body)
        except ValueError:
            payload = {}
        if status != 200:
            raise NodeUnreachable(node, payload.get("reason", f"health is HTTP {status}"), False)
        return dict(payload)
