"""Calls to one node's replica routes, with every failure given a clear meaning.

The proxy uses it to reach replicas; nodes use it to hand hints back.

Each call has a deadline covering the whole exchange (connect, headers and
body). Failures are L{shardkv.errors.ReplicaCallFailed} subclasses, sorted by
what the caller may conclude: L{NodeUnreachable} and L{NodeTimeout} say
whether the request may have been applied (``sent``), L{NodeBusy} that it was
not sent, L{ReplicaRefused} that the node answered with an error of its own,
L{BadReplicaAnswer} that its answer made no sense.

Each node gets at most ``node_inflight_bytes`` of records in flight (single-key
writes and batched ones alike, counted from the call until its answer, failure
or cancellation; a record costs its value, key and content type plus
L{RECORD_OVERHEAD}, so a full node takes no tombstones either). Past it a write fails at once with
L{NodeBusy}, nothing sent: a slow node then costs the proxy a bounded amount
of memory, and the caller learns "busy" in microseconds instead of a timeout
seconds later that looks like a failure. A write to an idle node always goes,
whatever its size, so a cap below the largest value cannot starve it.

With a pipeline depth above zero, replica reads and writes of small records
go through one L{NodePipeline} per node and travel in batches.

A cancellation from above (the client hung up) is re-raised as a bare
CancelledError, which Klein drops silently.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import treq
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from shardkv.core.records import Record
from shardkv.core.versions import VersionError
from shardkv.errors import (
    BadReplicaAnswer,
    NodeBusy,
    NodeTimeout,
    NodeUnreachable,
    ReplicaCallFailed,
    ReplicaRefused,
)
from shardkv.replica import codec
from shardkv.replica.pipeline import NodePipeline
from shardkv.replica.protocol import (
    BATCH_PATH,
    HEALTH_PATH,
    MEMBERS_PATH,
    TOMBSTONE_HEADER,
    VERSION_HEADER,
    key_path,
    record_from_headers,
    record_headers,
    replica_put_path,
)

_NOT_SENT = (
    neterror.ConnectionRefusedError,
    neterror.ConnectError,
    neterror.DNSLookupError,
    neterror.NoRouteError,
)


DEFAULT_NODE_INFLIGHT_BYTES = 32 << 20
"""Record bytes in flight to one node: a few hundred milliseconds of a node's
write throughput, so a busy node stays busy while the proxy's memory for it
stays bounded."""


RECORD_OVERHEAD = 64
"""Bytes a replica write costs beyond its key, value and content type: the
version, headers and framing, rounded up."""


def write_cost(key: str, record: Record) -> int:
    """What a replica write of ``record`` counts against its node's cap."""
    return len(key) + len(record.content_type) + len(record.value) + RECORD_OVERHEAD


def _cancelled(exc: BaseException) -> bool:
    if isinstance(exc, CancelledError | neterror.ConnectingCancelledError):
        return True
    reasons = getattr(exc, "reasons", None) or []
    return any(r.check(CancelledError) for r in reasons)


class ReplicaClient:
    """The replica routes of every node, as seen from the proxy or another node."""

    def __init__(
        self,
        http: Any,
        clock: IReactorTime,
        timeout: float,
        pipeline_depth: int = 0,
        *,
        urls: Mapping[str, str] | None = None,
        node_inflight_bytes: int = DEFAULT_NODE_INFLIGHT_BYTES,
    ) -> None:
        """``urls``: each node's base URL (``https://host:port``); a node not in it is
        reached at ``http://{node}``.
        """
        self._http = http
        self._urls: Mapping[str, str] = {} if urls is None else urls
        self._clock = clock
        self.timeout = timeout
        self.pipeline_depth = pipeline_depth
        self.pipelines: dict[tuple[str, str], NodePipeline] = {}
        self.node_inflight_bytes = node_inflight_bytes
        self.inflight_bytes: dict[str, int] = {}
        self.busy: dict[str, int] = {}

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
        """Batches and operations sent so far to ``node``, and what is waiting;
        once it has been written to, its record bytes in flight (``bytes``)."""
        stats = {
            kind: pipeline.stats()
            for (name, kind), pipeline in sorted(self.pipelines.items())
            if name == node
        }
        if node in self.inflight_bytes:
            stats["bytes"] = {
                "in_flight": self.inflight_bytes[node],
                "limit": self.node_inflight_bytes,
                "busy": self.busy.get(node, 0),
            }
        return stats

    def has_room(self, node: str, size: int) -> bool:
        """Would a write costing ``size`` (L{write_cost}) to ``node`` be sent now?"""
        used = self.inflight_bytes.get(node, 0)
        return used == 0 or used + size <= self.node_inflight_bytes

    def _admit(self, node: str, size: int) -> NodeBusy | None:
        """Count ``size`` bytes as in flight to ``node``, or say why not."""
        if not self.has_room(node, size):
            self.busy[node] = self.busy.get(node, 0) + 1
            return NodeBusy(node, self.inflight_bytes[node], "bytes of records in flight")
        self.inflight_bytes[node] = self.inflight_bytes.get(node, 0) + size
        return None

    def _release(self, result: Any, node: str, size: int) -> Any:
        self.inflight_bytes[node] -= size
        return result

    async def send_batch(self, node: str, ops: Sequence[codec.Op]) -> list[codec.Result]:
        """Send ``ops`` as one ``POST /replica/batch``; one result per operation."""
        status, _, body = await self._call(
            node,
            "POST",
            BATCH_PATH,
            data=codec.encode_request(ops),
            headers={b"Content-Type": b"application/json"},
        )
        if status != 200:
            raise self._node_error(node, status, body)
        try:
            return codec.decode_response(body, len(ops))
        except codec.BatchError as e:
            raise BadReplicaAnswer(node, f"node {node} sent a bad batch: {e}") from None

    @staticmethod
    def _result_error(node: str, result: codec.Result) -> ReplicaRefused:
        return ReplicaRefused(node, result.error, result.message)

    async def _call(
        self, node: str, method: str, path: str, **kwargs: Any
    ) -> tuple[int, Any, bytes]:
        url = f"{self._urls.get(node, f'http://{node}')}{path}".encode("ascii")

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

    @staticmethod
    def _node_error(node: str, status: int, body: bytes) -> ReplicaCallFailed:
        try:
            payload = json.loads(body)
            return ReplicaRefused(node, str(payload["error"]), str(payload["message"]))
        except (ValueError, KeyError, TypeError):
            return BadReplicaAnswer(node, f"node {node} sent an unexpected answer (HTTP {status})")

    def replica_get(self, node: str, key: str) -> Deferred[Record | None]:
        """The node's stored record for ``key``, tombstones included.

        Not a coroutine: on the pipelined path this is the proxy's hottest
        call, and a plain Deferred chain skips a coroutine per replica.
        """
        pipeline = self._pipeline(node, "read")
        if pipeline is None:
            return Deferred.fromCoroutine(self._replica_get_alone(node, key))
        got: Deferred[Any] = pipeline.submit(codec.GetOp(key))
        return got.addCallback(self._got, node, key)

    def _got(self, result: codec.Result, node: str, key: str) -> Any:
        if result.status == 404:
            return None
        if result.status != 200:
            raise self._result_error(node, result)
        if result.inline:
            return result.record
        return Deferred.fromCoroutine(self._replica_get_alone(node, key))

    async def _replica_get_alone(self, node: str, key: str) -> Record | None:
        status, headers, body = await self._call(node, "GET", key_path(key))
        if status == 404:
            return None
        if status != 200:
            raise self._node_error(node, status, body)

        def header(name: bytes) -> bytes | None:
            values = headers.getRawHeaders(name)
            return values[0] if values else None

        try:
            return record_from_headers(
                header(VERSION_HEADER), header(TOMBSTONE_HEADER), header(b"content-type"), body
            )
        except VersionError as e:
            raise BadReplicaAnswer(node, f"node {node} sent a bad version: {e}") from None

    def replica_put(
        self, node: str, key: str, record: Record, hint_for: str | None = None
    ) -> Deferred[bool]:
        """Store ``record`` on ``node`` if newer; True if it was applied.

        Fails at once with L{NodeBusy} (nothing sent) while ``node`` has too
        many record bytes in flight.
        """
        size = write_cost(key, record)
        busy = self._admit(node, size)
        if busy is not None:
            return fail(busy)
        pipeline = self._pipeline(node, "write")
        put: Deferred[Any]
        if pipeline is None or not codec.fits(record):
            put = Deferred.fromCoroutine(self._replica_put_alone(node, key, record, hint_for))
        else:
            put = pipeline.submit(codec.PutOp(key, record, hint_for)).addCallback(self._put, node)
        return put.addBoth(self._release, node, size)

    def _put(self, result: codec.Result, node: str) -> bool:
        if result.status != 200:
            raise self._result_error(node, result)
        return result.applied

    async def _replica_put_alone(
        self, node: str, key: str, record: Record, hint_for: str | None
    ) -> bool:
        path = replica_put_path(key, hint_for)
        status, _, body = await self._call(
            node, "PUT", path, data=record.value, headers=record_headers(record)
        )
        if status != 200:
            raise self._node_error(node, status, body)
        try:
            return bool(json.loads(body)["applied"])
        except (ValueError, KeyError, TypeError):
            raise BadReplicaAnswer(node, f"node {node} sent an unexpected answer") from None

    async def put_members(self, node: str, body: bytes) -> None:
        """Tell ``node`` the cluster's members (``body`` is the JSON the node's route takes)."""
        status, _, answer = await self._call(
            node, "PUT", MEMBERS_PATH, data=body, headers={b"Content-Type": b"application/json"}
        )
        if status != 200:
            raise self._node_error(node, status, answer)

    async def health(self, node: str) -> dict[str, Any]:
        status, _, body = await self._call(node, "GET", HEALTH_PATH)
        try:
            payload = json.loads(body)
        except ValueError:
            payload = {}
        if status != 200:
            raise NodeUnreachable(node, payload.get("reason", f"health is HTTP {status}"), False)
        return dict(payload)
