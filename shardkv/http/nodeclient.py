"""Calls to one node's HTTP API, with every failure given a clear meaning.

The proxy uses it to reach replicas; nodes use it to hand hints back.

Each call has a deadline covering the whole exchange (connect, headers and
body). Failures are sorted by what the caller may conclude, with the
exceptions of L{shardkv.http.nodeerrors}; L{ApiError} means the node
answered with an error of its own.

With a pipeline depth above zero, replica reads and writes of small records
go through one L{NodePipeline} per node and travel in batches.

A cancellation from above (the client hung up) is re-raised as a bare
CancelledError, which Klein drops silently.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import treq
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from shardkv.core import batch
from shardkv.core.conditions import Precondition
from shardkv.core.records import DEFAULT_CONTENT_TYPE, Record
from shardkv.core.versions import Version, VersionError
from shardkv.http.dataroutes import WriteResult
from shardkv.http.errors import ApiError
from shardkv.http.nodeerrors import NodeBusy, NodeTimeout, NodeUnreachable
from shardkv.http.pipeline import NodePipeline

__all__ = ["NodeBusy", "NodeClient", "NodeTimeout", "NodeUnreachable"]

_NOT_SENT = (
    neterror.ConnectionRefusedError,
    neterror.ConnectError,
    neterror.DNSLookupError,
    neterror.NoRouteError,
)


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

    def __init__(self, http: Any, clock: Any, timeout: float, pipeline_depth: int = 0) -> None:
        self._http = http
        self._clock = clock
        self.timeout = timeout
        self.pipeline_depth = pipeline_depth
        self.pipelines: dict[tuple[str, str], NodePipeline] = {}

    def _pipeline(self, node: str, kind: str) -> NodePipeline | None:
        """The node's pipeline for reads or for writes.

        Reads and writes queue apart so that a read never waits behind a
        batch of writes that is waiting for its group commit.
        """
        if self.pipeline_depth <= 0:
            return None
        pipeline = self.pipelines.get((node, kind))
        if pipeline is None:
            pipeline = NodePipeline(
                node,
                lambda n, ops: Deferred.fromCoroutine(self.send_batch(n, ops)),
                self._clock,
                self.timeout,
                self.pipeline_depth,
            )
            self.pipelines[(node, kind)] = pipeline
        return pipeline

    def pipeline_stats(self, node: str) -> dict[str, dict[str, int]]:
        """Batches and operations sent so far to ``node``, and what is waiting."""
        return {
            kind: pipeline.stats()
            for (name, kind), pipeline in sorted(self.pipelines.items())
            if name == node
        }

    async def send_batch(self, node: str, ops: Sequence[batch.Op]) -> list[batch.Result]:
        """Send ``ops`` as one ``POST /replica/batch``; one result per operation."""
        status, _, body = await self._call(
            node,
            "POST",
            "/replica/batch",
            data=batch.encode_request(ops),
            headers={b"Content-Type": b"application/json"},
        )
        if status != 200:
            raise self._node_error(node, status, body)
        try:
            return batch.decode_response(body, len(ops))
        except batch.BatchError as e:
            raise ApiError(502, "bad_gateway", f"node {node} sent a bad batch: {e}") from None

    def _result_error(self, node: str, result: batch.Result) -> ApiError:
        return ApiError(result.status, result.error, f"node {node}: {result.message}")

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

    def replica_get(self, node: str, key: str) -> Deferred[Record | None]:
        """The node's stored record for ``key``, tombstones included.

        Not a coroutine: on the pipelined path this is the proxy's hottest
        call, and a plain Deferred chain skips a coroutine per replica.
        """
        pipeline = self._pipeline(node, "read")
        if pipeline is None:
            return Deferred.fromCoroutine(self._replica_get_alone(node, key))
        got: Deferred[Any] = pipeline.submit(batch.GetOp(key))
        return got.addCallback(self._got, node, key)

    def _got(self, result: batch.Result, node: str, key: str) -> Any:
        if result.status == 404:
            return None
        if result.status != 200:
            raise self._result_error(node, result)
        if result.inline:
            return result.record
        return Deferred.fromCoroutine(self._replica_get_alone(node, key))

    async def _replica_get_alone(self, node: str, key: str) -> Record | None:
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

    def replica_put(
        self, node: str, key: str, record: Record, hint_for: str | None = None
    ) -> Deferred[bool]:
        """Store ``record`` on ``node`` if newer; True if it was applied."""
        pipeline = self._pipeline(node, "write")
        if pipeline is None or not batch.fits(record):
            return Deferred.fromCoroutine(self._replica_put_alone(node, key, record, hint_for))
        put: Deferred[Any] = pipeline.submit(batch.PutOp(key, record, hint_for))
        return put.addCallback(self._put, node)

    def _put(self, result: batch.Result, node: str) -> bool:
        if result.status != 200:
            raise self._result_error(node, result)
        return result.applied

    async def _replica_put_alone(
        self, node: str, key: str, record: Record, hint_for: str | None
    ) -> bool:
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
