"""Calls to one node's replica routes, with every failure given a clear meaning.

The proxy uses it to reach replicas; nodes use it to hand hints back.

Each call has a deadline covering the whole exchange (connect, headers and
body). Failures are L{shardkv.errors.ReplicaCallFailed} subclasses, sorted by
what the caller may conclude: L{NodeUnreachable} and L{NodeTimeout} say
whether the request may have been applied (``sent``), L{NodeBusy} that it was
not sent, L{ReplicaRefused} that the node answered with an error of its own,
L{BadReplicaAnswer} that its answer made no sense.

Each node gets a window of record bytes in flight (single-key writes and
batched ones alike, counted from the call until its answer, failure or
cancellation; a record costs its value, key and content type plus
L{RECORD_OVERHEAD}, so a full node takes no tombstones either). Past it a
write fails at once with L{NodeBusy}, nothing sent: a slow node then costs the
proxy a bounded amount of memory, and the caller learns "busy" in
microseconds instead of a timeout seconds later that looks like a failure.
The window is at most ``node_inflight_bytes``, and is what the node has
lately been answering in a quarter of the timeout (L{shardkv.core.window}),
so that what a busy node is given it answers in time. A write to an idle node always
goes, whatever its size, so a cap below the largest value cannot starve it.

With a pipeline depth above zero, replica reads and writes of small records
go through one L{NodePipeline} per node and travel in batches.

A cancellation from above (the client hung up) is re-raised as a bare
CancelledError, which Klein drops silently.

Every replica read and write may carry the map epoch it was planned at
(L{EPOCH_HEADER}); a node that learned a newer map refuses it with 409
``stale_epoch`` and the map, raised here as L{NodeHasNewerMap} (nothing was
applied) after the L{ReplicaClient.newer_map} hook saw the map, so a proxy
switches on the first such answer. Pipelines are kept per epoch, so one batch
never mixes operations planned at different epochs (the node refuses a batch
whole).

The map routes (``/replica/map``, prepare, accept, learn) and the move routes
(``/replica/move``, plan, stream) are plain JSON calls with the same failures.

Every replica read and write is counted in the client's L{ReplicaMetrics}
(by node and outcome, with its latency, queueing included), and so is every
batch its pipelines send.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast

import treq
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)

from shardkv.core.records import Record
from shardkv.core.versions import VersionError
from shardkv.core.window import ByteWindow, Room
from shardkv.errors import (
    BadReplicaAnswer,
    ClientStopped,
    NodeBusy,
    NodeHasNewerMap,
    NodeTimeout,
    NodeUnreachable,
    ReplicaCallFailed,
    ReplicaRefused,
)
from shardkv.metrics import ReplicaMetrics, now
from shardkv.replica import codec
from shardkv.replica.pipeline import NodePipeline
from shardkv.replica.protocol import (
    BATCH_PATH,
    EPOCH_HEADER,
    HEALTH_PATH,
    MAP_ACCEPT_PATH,
    MAP_EPOCH_HEADER,
    MAP_LEARN_PATH,
    MAP_PATH,
    MAP_PREPARE_PATH,
    MEMBERS_PATH,
    MOVE_PATH,
    PLAN_KEYS_PATH,
    PLAN_PATH,
    STREAM_PATH,
    TOMBSTONE_HEADER,
    VERSION_HEADER,
    key_path,
    record_from_headers,
    record_headers,
    replica_put_path,
)

log = Logger(namespace="shardkv.replica.client")

_NOT_SENT = (
    neterror.ConnectionRefusedError,
    neterror.ConnectError,
    neterror.DNSLookupError,
    neterror.NoRouteError,
    RequestNotSent,
)
_BROKEN = (
    ResponseNeverReceived,
    ResponseFailed,
    RequestTransmissionFailed,
    neterror.ConnectionLost,
)


DEFAULT_NODE_INFLIGHT_BYTES = 32 << 20
"""Record bytes in flight to one node: a few hundred milliseconds of a node's
write throughput, so a busy node stays busy while the proxy's memory for it
stays bounded."""


TARGET_FRACTION = 0.25
"""The part of the timeout a node's window keeps its answers within (L{ByteWindow})."""


RECORD_OVERHEAD = 64
"""Bytes a replica write costs beyond its key, value and content type: the
version, headers and framing, rounded up."""


PLAN_TIMEOUT = 120.0
"""Seconds a plan call may take: the node scans and hashes all its records."""

_JSON = {b"Content-Type": b"application/json"}


def epoch_headers(
    epoch: int | None, headers: Mapping[bytes, bytes] | None = None
) -> dict[bytes, bytes]:
    """``headers`` plus the epoch fence (none when ``epoch`` is None: no check)."""
    out = dict(headers or {})
    if epoch is not None:
        out[EPOCH_HEADER] = str(epoch).encode("ascii")
    return out


def write_cost(key: str, record: Record) -> int:
    """What a replica write of ``record`` counts against its node's cap."""
    return len(key) + len(record.content_type) + len(record.value) + RECORD_OVERHEAD


def _applied(result: codec.Result) -> bool:
    return result.applied


def _cancelled(exc: BaseException) -> bool:
    if isinstance(exc, CancelledError | neterror.ConnectingCancelledError):
        return True
    reasons = getattr(exc, "reasons", None) or []
    return any(r.check(CancelledError) for r in reasons)


class Cancellable(Protocol):
    def cancel(self) -> object: ...


def _failed_to(failure: Failure, failed: Callable[[BaseException, Any], object], tag: Any) -> None:
    failed(cast(BaseException, failure.value), tag)


class _Sent:
    """A write counted against its node's window: what its end hands back."""

    __slots__ = ("at", "in_flight", "node", "size")

    def __init__(self, node: str, size: int, in_flight: int, at: float) -> None:
        self.node = node
        self.size = size
        self.in_flight = in_flight
        self.at = at


class _Then:
    """Where one pipelined operation's outcome goes (L{ReplicaClient.get_into},
    L{ReplicaClient.write_into}): the caller's functions and tag, and what the
    client needs to finish it (its node, latency start, bytes to release)."""

    __slots__ = ("epoch", "failed", "key", "node", "ok", "sent", "started", "tag")

    def __init__(
        self,
        node: str,
        key: str,
        epoch: int | None,
        started: float,
        ok: Callable[[Any, Any], object],
        failed: Callable[[BaseException, Any], object],
        tag: Any,
        sent: _Sent | None = None,
    ) -> None:
        self.node = node
        self.key = key
        self.epoch = epoch
        self.started = started
        self.ok = ok
        self.failed = failed
        self.tag = tag
        self.sent = sent


class _Exchange:
    """One HTTP exchange with a node: its deadline, its answer, its failures sorted.

    A chain of callbacks on treq's Deferred with one timer, rather than a
    coroutine wrapped in ``addTimeout`` (a Deferred, three closures and a
    timer): every replica call and every batch takes this path. Failures are
    sorted by what the caller may conclude (see the module docstring): not
    sent, sent and broken, timed out (L{NodeTimeout}), or cancelled from above
    (a bare CancelledError).
    """

    __slots__ = ("client", "d", "node", "response", "seconds", "timed_out", "timer")

    def __init__(
        self, client: ReplicaClient, node: str, seconds: float, requested: Deferred[Any]
    ) -> None:
        self.client = client
        self.node = node
        self.seconds = seconds
        self.timed_out = False
        self.response: Any = None
        self.d = requested
        self.timer = client.clock.callLater(seconds, self._time_out)
        requested.addCallback(self._body)
        requested.addCallbacks(self._answered, self._failed)

    def _time_out(self) -> None:
        self.timed_out = True
        self.d.cancel()

    def _body(self, response: Any) -> Deferred[bytes]:
        self.response = response
        body: Deferred[bytes] = treq.content(response)
        return body

    def _answered(self, body: bytes) -> tuple[int, Any, bytes]:
        if self.timer.active():
            self.timer.cancel()
        response = self.response
        headers = response.headers
        hook = self.client.newer_epoch
        if hook is not None:
            notice = headers.getRawHeaders(MAP_EPOCH_HEADER)
            if notice and notice[0].isdigit():
                hook(self.node, int(notice[0]))
        return response.code, headers, body

    def _failed(self, failure: Failure) -> Failure:
        if self.timer.active():
            self.timer.cancel()
        e, node = failure.value, self.node
        if isinstance(e, _NOT_SENT):
            raise NodeUnreachable(node, str(e) or type(e).__name__, sent=False)
        if isinstance(e, _BROKEN):
            if self.timed_out:
                raise NodeTimeout(node, self.seconds)
            if _cancelled(e):
                raise CancelledError()
            raise NodeUnreachable(node, "the connection broke mid-request", sent=True)
        if isinstance(e, CancelledError) and self.timed_out:
            raise NodeTimeout(node, self.seconds)
        return failure


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
        metrics: ReplicaMetrics | None = None,
    ) -> None:
        """``urls``: each node's base URL (``https://host:port``); a node not in it is
        reached at ``http://{node}``. ``metrics``: where calls and batches are counted
        (default: a private registry).
        """
        self._http = http
        self._urls: Mapping[str, str] = {} if urls is None else urls
        self._clock = clock
        self.timeout = timeout
        self.pipeline_depth = pipeline_depth
        self.pipelines: dict[tuple[str, str, int | None], NodePipeline] = {}
        self.newer_map: Callable[[dict[str, Any]], object] | None = None
        self.newer_epoch: Callable[[str, int], object] | None = None
        """Called with a node and its epoch when it took a call of an older one
        (its grace, L{shardkv.replica.protocol.FENCE_GRACE}): time to fetch the map."""
        """Called with the map of every ``stale_epoch`` answer (the proxy installs it)."""
        self._node_inflight_bytes = node_inflight_bytes
        self.windows: dict[str, ByteWindow] = {}
        """Each node's window of record bytes in flight, once it was written to."""
        self.busy: dict[str, int] = {}
        self.room_freed: Callable[[], object] | None = None
        """Called whenever a write's bytes stop counting against its node's window."""
        self.metrics = metrics if metrics is not None else ReplicaMetrics.private()
        self.metrics.watch(self.queue_depths)

    @property
    def clock(self) -> IReactorTime:
        """The reactor time its deadlines are counted in."""
        return self._clock

    def queue_depths(self) -> list[tuple[str, str, int]]:
        """(node, kind, operations waiting) for every pipeline kept: the queue gauge."""
        depths: dict[tuple[str, str], int] = {}
        for (node, kind, _), pipeline in self.pipelines.items():
            depths[(node, kind)] = depths.get((node, kind), 0) + pipeline.queued
        return [(node, kind, n) for (node, kind), n in sorted(depths.items())]

    def _pipeline(self, node: str, kind: str, epoch: int | None = None) -> NodePipeline | None:
        """The node's pipeline for reads or for writes planned at ``epoch``.

        Reads and writes queue apart so that a read never waits behind a
        batch of writes that is waiting for its group commit. Epochs queue
        apart because a node refuses a batch whole when its epoch is stale:
        an operation planned at the new epoch must not fail with an old one.
        Once a newer epoch is used, the older pipelines leave the dict (what
        they hold still lands); an operation planned at an epoch older than
        the newest gets a pipeline of its own that is not kept.
        """
        if self.pipeline_depth <= 0:
            return None
        pipeline = self.pipelines.get((node, kind, epoch))
        if pipeline is not None:
            return pipeline
        older: list[tuple[str, str, int | None]] = []
        if epoch is not None:
            for key in self.pipelines:
                e = key[2]
                if key[0] == node and key[1] == kind and e is not None:
                    if e > epoch:
                        return self._new_pipeline(node, kind, epoch)
                    older.append(key)
        pipeline = self._new_pipeline(node, kind, epoch)
        for key in older:
            del self.pipelines[key]
        self.pipelines[(node, kind, epoch)] = pipeline
        return pipeline

    def _new_pipeline(self, node: str, kind: str, epoch: int | None) -> NodePipeline:
        return NodePipeline(
            node,
            lambda n, ops: self._send_batch(n, ops, epoch),
            self._clock,
            self.timeout,
            self.pipeline_depth,
            meter=self.metrics.meter(node, kind),
        )

    def set_timeout(self, seconds: float) -> None:
        """Wait ``seconds`` for a node from now on, in every pipeline too (a reload)."""
        self.timeout = seconds
        for pipeline in self.pipelines.values():
            pipeline.set_timeout(seconds)
        for window in self.windows.values():
            window.resize(target=seconds * TARGET_FRACTION)

    @property
    def node_inflight_bytes(self) -> int:
        """The most record bytes any node may have in flight (its window's ceiling)."""
        return self._node_inflight_bytes

    @node_inflight_bytes.setter
    def node_inflight_bytes(self, limit: int) -> None:
        self._node_inflight_bytes = limit
        for window in self.windows.values():
            window.resize(ceiling=limit)

    def pipeline_stats(self, node: str) -> dict[str, dict[str, int]]:
        """Batches and operations sent so far to ``node``, and what is waiting;
        once it has been written to, its record bytes in flight (``bytes``)."""
        stats: dict[str, dict[str, int]] = {}
        for (name, kind, _), pipeline in self.pipelines.items():
            if name != node:
                continue
            meter = pipeline.meter
            was = stats.get(kind, {"in_flight": 0, "queued": 0})
            stats[kind] = {
                "in_flight": was["in_flight"] + pipeline.in_flight,
                "queued": was["queued"] + pipeline.queued,
                # One meter per node and kind, shared by its pipelines of every epoch.
                "batches": meter.batches,
                "ops": meter.ops,
            }
        stats = dict(sorted(stats.items()))
        window = self.windows.get(node)
        if window is not None:
            stats["bytes"] = {
                "in_flight": window.used,
                "window": window.limit,
                "limit": window.ceiling,
                "busy": self.busy.get(node, 0),
            }
        return stats

    def window(self, node: str) -> ByteWindow:
        """``node``'s window of record bytes in flight (a new one the first time)."""
        window = self.windows.get(node)
        if window is None:
            window = ByteWindow(self._node_inflight_bytes, self.timeout * TARGET_FRACTION)
            self.windows[node] = window
        return window

    def room_for(self, node: str, size: int) -> Room:
        """Whether a write costing ``size`` (L{write_cost}) to ``node`` would be
        sent now, and if not, whether it fits under ``node``'s cap."""
        window = self.windows.get(node)
        return Room.FREE if window is None else window.room(size)

    def _admit(self, node: str, size: int) -> NodeBusy | _Sent:
        """Count ``size`` bytes as in flight to ``node``, or say why not."""
        window = self.window(node)
        if window.room(size) is not Room.FREE:
            self.busy[node] = self.busy.get(node, 0) + 1
            return NodeBusy(node, window.used, "bytes of records in flight")
        return _Sent(node, size, window.take(size), self._clock.seconds())

    def _landed(self, sent: _Sent, outcome: object) -> None:
        """A write's bytes stop counting. Its answer (an error the node sent
        included) or its timeout is a sample of the node's speed."""
        window = self.windows[sent.node]
        if isinstance(outcome, Failure):
            outcome = outcome.value
        if isinstance(outcome, BaseException) and not isinstance(
            outcome, NodeTimeout | ReplicaRefused | BadReplicaAnswer
        ):
            window.release(sent.size)
        else:
            window.answered(sent.size, sent.in_flight, sent.at, self._clock.seconds())
        if self.room_freed is not None:
            self.room_freed()

    def _release(self, result: Any, sent: _Sent) -> Any:
        self._landed(sent, result)
        return result

    async def send_batch(
        self, node: str, ops: Sequence[codec.Op], epoch: int | None = None
    ) -> list[codec.Result]:
        """Send ``ops`` as one ``POST /replica/batch``; one result per operation."""
        return await self._send_batch(node, ops, epoch)

    def _send_batch(
        self, node: str, ops: Sequence[codec.Op], epoch: int | None
    ) -> Deferred[list[codec.Result]]:
        """L{send_batch} as a plain Deferred chain: what a pipeline sends each batch with."""
        d = self._exchange(
            node,
            "POST",
            BATCH_PATH,
            data=codec.encode_request(ops),
            headers=epoch_headers(epoch, _JSON),
        )
        return d.addCallback(self._batch_answer, node, len(ops))

    async def send_stream(
        self, node: str, ops: Sequence[codec.PutOp], epoch: int | None
    ) -> list[codec.Result]:
        """Send a move's copies as one ``POST /replica/stream``; one result per record."""
        answer = await self._exchange(
            node,
            "POST",
            STREAM_PATH,
            data=codec.encode_request(ops),
            headers=epoch_headers(epoch, _JSON),
        )
        return self._batch_answer(answer, node, len(ops))

    def _batch_answer(
        self, answer: tuple[int, Any, bytes], node: str, count: int
    ) -> list[codec.Result]:
        status, _, body = answer
        if status != 200:
            raise self._node_error(node, status, body)
        try:
            return codec.decode_response(body, count)
        except codec.BatchError as e:
            raise BadReplicaAnswer(node, f"node {node} sent a bad batch: {e}") from None

    @staticmethod
    def _result_error(node: str, result: codec.Result) -> ReplicaRefused:
        return ReplicaRefused(node, result.error, result.message)

    async def _call(
        self, node: str, method: str, path: str, timeout: float | None = None, **kwargs: Any
    ) -> tuple[int, Any, bytes]:
        """One exchange with ``node`` within ``timeout`` seconds (default: the client's)."""
        return await self._exchange(node, method, path, timeout, **kwargs)

    def _exchange(
        self, node: str, method: str, path: str, timeout: float | None = None, **kwargs: Any
    ) -> Deferred[tuple[int, Any, bytes]]:
        """L{_call} as a Deferred of (status, headers, body): see L{_Exchange}."""
        seconds = self.timeout if timeout is None else timeout
        try:
            url = f"{self._urls.get(node, f'http://{node}')}{path}".encode("ascii")
        except UnicodeEncodeError:
            return fail(NodeUnreachable(node, "the address is not ASCII", sent=False))
        try:
            # A node never redirects, and the body is read at once: skip
            # treq's redirect and buffering wrappers on this hot path.
            requested = self._http.request(
                method, url, allow_redirects=False, unbuffered=True, **kwargs
            )
        except ValueError as e:  # a host no URL can name (IDNA), so nothing was sent
            return fail(NodeUnreachable(node, f"not a usable address: {e}", sent=False))
        except ClientStopped:
            return fail(NodeUnreachable(node, "this process is shutting down", sent=False))
        except Exception:
            return fail()
        return _Exchange(self, node, seconds, requested).d

    def _node_error(self, node: str, status: int, body: bytes) -> ReplicaCallFailed:
        try:
            payload = json.loads(body)
            code, message = str(payload["error"]), str(payload["message"])
        except (ValueError, KeyError, TypeError):
            return BadReplicaAnswer(node, f"node {node} sent an unexpected answer (HTTP {status})")
        if status == 409 and code == "stale_epoch":
            newer = payload.get("map")
            if isinstance(newer, dict):
                self._saw_newer_map(newer)
                return NodeHasNewerMap(node, message, newer)
        return ReplicaRefused(node, code, message)

    def _saw_newer_map(self, newer: dict[str, Any]) -> None:
        hook = self.newer_map
        if hook is None:
            return
        try:
            hook(newer)
        except Exception:
            # A map the hook cannot take (malformed, another cluster) must not
            # turn the node's refusal into a crash of the request.
            log.failure("taking the newer map a node sent")

    def replica_get(self, node: str, key: str, epoch: int | None = None) -> Deferred[Record | None]:
        """The node's stored record for ``key``, tombstones included.

        Not a coroutine: on the pipelined path this is the proxy's hottest
        call, and a plain Deferred chain skips a coroutine per replica.
        """
        started = now()
        pipeline = self._pipeline(node, "read", epoch)
        got: Deferred[Any]
        if pipeline is None:
            got = Deferred.fromCoroutine(self._replica_get_alone(node, key, epoch))
        else:
            got = pipeline.submit(codec.GetOp(key)).addCallback(self._got, node, key, epoch)
        return got.addBoth(self.metrics.node(node).got, started)

    def _got(self, result: codec.Result, node: str, key: str, epoch: int | None) -> Any:
        if result.status == 404:
            return None
        if result.status != 200:
            raise self._result_error(node, result)
        if result.inline:
            return result.record
        return Deferred.fromCoroutine(self._replica_get_alone(node, key, epoch))

    def get_into(
        self,
        node: str,
        key: str,
        epoch: int | None,
        ok: Callable[[Record | None, Any], object],
        failed: Callable[[BaseException, Any], object],
        tag: Any,
    ) -> Cancellable:
        """L{replica_get}, answered by a call of ``ok(record, tag)`` or
        ``failed(error, tag)`` instead of a Deferred; returns what cancels it.

        The coordinator's reads take this path: on a pipeline, a batch's answer
        reaches the read's quorum in two plain calls (L{NodePipeline.submit_to}),
        where a Deferred per operation with its callbacks cost several times
        that. A cancelled read is not called back.
        """
        started = now()
        pipeline = self._pipeline(node, "read", epoch)
        if pipeline is None:
            d = Deferred.fromCoroutine(self._replica_get_alone(node, key, epoch))
            d.addBoth(self.metrics.node(node).got, started)
            d.addCallbacks(ok, _failed_to, callbackArgs=(tag,), errbackArgs=(failed, tag))
            return d
        then = _Then(node, key, epoch, started, ok, failed, tag)
        return pipeline.submit_to(codec.GetOp(key), self._got_into, then)

    def _got_into(self, outcome: codec.Result | BaseException, then: _Then) -> None:
        ops = self.metrics.node(then.node)
        if isinstance(outcome, codec.Result):
            status = outcome.status
            if status == 200 and not outcome.inline:
                d = Deferred.fromCoroutine(self._replica_get_alone(then.node, then.key, then.epoch))
                d.addBoth(ops.got, then.started)
                d.addCallbacks(
                    then.ok,
                    _failed_to,
                    callbackArgs=(then.tag,),
                    errbackArgs=(then.failed, then.tag),
                )
                return
            if status == 200 or status == 404:
                record = outcome.record if status == 200 else None
                ops.got_record(record is not None, then.started)
                then.ok(record, then.tag)
                return
            outcome = self._result_error(then.node, outcome)
        ops.failed("get", outcome, then.started)
        then.failed(outcome, then.tag)

    def write_into(
        self,
        node: str,
        key: str,
        record: Record,
        hint_for: str | None,
        epoch: int | None,
        ok: Callable[[codec.Result, Any], object],
        failed: Callable[[BaseException, Any], object],
        tag: Any,
    ) -> None:
        """L{replica_write}, answered by a call of ``ok(result, tag)`` or
        ``failed(error, tag)`` instead of a Deferred: the coordinator's writes
        (see L{get_into}). L{NodeBusy} comes at once, nothing sent."""
        started = now()
        size = write_cost(key, record)
        sent = self._admit(node, size)
        if isinstance(sent, NodeBusy):
            self.metrics.node(node).failed("put", sent, started)
            failed(sent, tag)
            return
        pipeline = self._pipeline(node, "write", epoch)
        if pipeline is None or not codec.fits(record):
            d = Deferred.fromCoroutine(self._replica_put_alone(node, key, record, hint_for, epoch))
            d.addBoth(self._release, sent)
            d.addBoth(self.metrics.node(node).put, started)
            d.addCallbacks(ok, _failed_to, callbackArgs=(tag,), errbackArgs=(failed, tag))
            return
        then = _Then(node, key, epoch, started, ok, failed, tag, sent)
        pipeline.submit_to(codec.PutOp(key, record, hint_for), self._put_into, then)

    def _put_into(self, outcome: codec.Result | BaseException, then: _Then) -> None:
        self._landed(cast(_Sent, then.sent), outcome)
        ops = self.metrics.node(then.node)
        if isinstance(outcome, codec.Result):
            if outcome.status == 200:
                ops.put_ok(then.started)
                then.ok(outcome, then.tag)
                return
            outcome = self._result_error(then.node, outcome)
        ops.failed("put", outcome, then.started)
        then.failed(outcome, then.tag)

    async def _replica_get_alone(self, node: str, key: str, epoch: int | None) -> Record | None:
        status, headers, body = await self._call(
            node, "GET", key_path(key), headers=epoch_headers(epoch)
        )
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
        self,
        node: str,
        key: str,
        record: Record,
        hint_for: str | None = None,
        epoch: int | None = None,
    ) -> Deferred[bool]:
        """Store ``record`` on ``node`` if newer; True if it was applied.

        Fails at once with L{NodeBusy} (nothing sent) while ``node`` has too
        many record bytes in flight.
        """
        return self.replica_write(node, key, record, hint_for, epoch).addCallback(_applied)

    def replica_write(
        self,
        node: str,
        key: str,
        record: Record,
        hint_for: str | None = None,
        epoch: int | None = None,
    ) -> Deferred[codec.Result]:
        """L{replica_put}, answered with the node's whole result: whether it was
        applied and what the node held before (``held``, ``live``; ``live`` is None
        from a node that does not say)."""
        started = now()
        size = write_cost(key, record)
        sent = self._admit(node, size)
        if isinstance(sent, NodeBusy):
            return fail(sent).addErrback(self.metrics.node(node).put, started)
        pipeline = self._pipeline(node, "write", epoch)
        put: Deferred[Any]
        if pipeline is None or not codec.fits(record):
            put = Deferred.fromCoroutine(
                self._replica_put_alone(node, key, record, hint_for, epoch)
            )
        else:
            put = pipeline.submit(codec.PutOp(key, record, hint_for)).addCallback(self._put, node)
        put.addBoth(self._release, sent)
        return put.addBoth(self.metrics.node(node).put, started)

    def _put(self, result: codec.Result, node: str) -> codec.Result:
        if result.status != 200:
            raise self._result_error(node, result)
        return result

    async def _replica_put_alone(
        self, node: str, key: str, record: Record, hint_for: str | None, epoch: int | None
    ) -> codec.Result:
        path = replica_put_path(key, hint_for)
        status, _, body = await self._call(
            node,
            "PUT",
            path,
            data=record.value,
            headers=epoch_headers(epoch, record_headers(record)),
        )
        if status != 200:
            raise self._node_error(node, status, body)
        try:
            answer = json.loads(body)
            if not isinstance(answer, dict) or not isinstance(answer["applied"], bool):
                raise TypeError
            return codec.put_answer(answer)
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

    # -- the cluster map and moves (JSON routes) ---------------------------------

    async def _json(
        self,
        node: str,
        method: str,
        path: str,
        payload: object = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """A JSON call: the answer's object, or the failure as a domain error."""
        kwargs: dict[str, Any] = {}
        if payload is not None:
            kwargs = {"data": json.dumps(payload).encode("utf-8"), "headers": dict(_JSON)}
        status, _, body = await self._call(node, method, path, timeout=timeout, **kwargs)
        if status != 200:
            raise self._node_error(node, status, body)
        try:
            answer = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            answer = None
        if not isinstance(answer, dict):
            raise BadReplicaAnswer(node, f"node {node} sent an unexpected answer to {path}")
        return answer

    async def get_map(self, node: str, timeout: float | None = None) -> dict[str, Any]:
        """``GET /replica/map``: the node's learned map and acceptor state."""
        return await self._json(node, "GET", MAP_PATH, timeout=timeout)

    async def prepare(
        self, node: str, ballot: Sequence[Any], timeout: float | None = None
    ) -> dict[str, Any]:
        """Phase 1 of a map change at one acceptor."""
        return await self._json(
            node, "POST", MAP_PREPARE_PATH, {"ballot": list(ballot)}, timeout=timeout
        )

    async def accept(
        self,
        node: str,
        ballot: Sequence[Any],
        map_json: Mapping[str, Any],
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Phase 2 of a map change at one acceptor."""
        body = {"ballot": list(ballot), "map": dict(map_json)}
        return await self._json(node, "POST", MAP_ACCEPT_PATH, body, timeout=timeout)

    async def learn(
        self, node: str, map_json: Mapping[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        """Tell ``node`` a committed map; it installs it if newer."""
        return await self._json(node, "POST", MAP_LEARN_PATH, {"map": dict(map_json)}, timeout)

    async def move_status(self, node: str, timeout: float | None = None) -> dict[str, Any]:
        """``GET /replica/move``: the node's stream and cleanup for its learned epoch."""
        return await self._json(node, "GET", MOVE_PATH, timeout=timeout)

    async def plan(
        self, node: str, map_json: Mapping[str, Any], timeout: float | None = PLAN_TIMEOUT
    ) -> dict[str, Any]:
        """The copies ``node`` would send as primary source under a ``copying`` map."""
        return await self._json(node, "POST", PLAN_PATH, {"map": dict(map_json)}, timeout)

    async def plan_keys(
        self,
        node: str,
        map_json: Mapping[str, Any],
        to: str,
        cursor: str,
        limit: int,
        timeout: float | None = PLAN_TIMEOUT,
    ) -> dict[str, Any]:
        """One page of the keys ``node`` would copy to ``to``."""
        body = {"map": dict(map_json), "to": to, "cursor": cursor, "limit": limit}
        return await self._json(node, "POST", PLAN_KEYS_PATH, body, timeout)
