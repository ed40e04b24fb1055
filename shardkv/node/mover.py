"""A node's part of a move: stream its records to their new owners, drop the ones it no longer owns.

The node learns each map of a move from its L{MapStore} and does what the
phase asks (see the design in L{shardkv.core.membership}):

``copying`` (with ``move.copy``)
    Scan the node's own records in engine key order. For each record whose
    preference set changes (L{MovePlanner.for_hash}) and of which this node
    is one of the sources, send a copy, version and tombstone included, to
    every destination. Copies leave in per-destination batches of up to
    L{codec.MAX_STREAM_OPS} records (``POST /replica/stream``); the receiver
    keeps the newer version, so a copy sent twice is harmless.
``cleanup``
    Scan again and delete every record this node does not own under the
    current ring, with L{StorageEngine.discard} (which keeps a record a
    newer write replaced meanwhile), and drop the hints kept for nodes that
    are no longer in the ring.

Why scans and not ranges: the engines keep records in key order, not ring
order, so the one sequential read is the whole key space; hashing a key costs
a microsecond, far less than the copy it may cause.

Progress is durable. Each task keeps a cursor (the last key whose copies were
all acknowledged, or whose deletion is committed) and its counters in the
engine's metadata (``move/<epoch>/stream``, ``move/<epoch>/cleanup``), so a
node killed mid-move resumes after the last acknowledged round; the copies
re-sent from there are harmless. A task that finished stores ``done``.

Everything runs on the reactor, a chunk of records per turn (a smaller one
under a rate cap), and the rings a task needs are built a step per turn
(L{shardkv.cluster.stepwise}): a move never holds the node's foreground
requests for more than one chunk's work. Two
rounds of batches at most are in flight (backpressure: the scan waits for the
older round's acknowledgement before it reads further). A failed batch (the
destination is down, busy or slow) is retried, the same batch, after a
backoff, and never skipped; the stream says ``waiting`` meanwhile.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from shardkv.cluster.stepwise import run_steps
from shardkv.core.clustermap import ClusterMap, Phase, ring_steps
from shardkv.core.movement import MovePlanner, owns
from shardkv.core.placement import Steps, hash_key
from shardkv.core.records import CorruptRecord, Record
from shardkv.errors import InvalidMap, ReplicaCallFailed, ReplicaRefused, StorageError
from shardkv.replica import codec
from shardkv.storage.engine import StorageEngine

log = Logger(namespace="shardkv.node.mover")

T = TypeVar("T")

BATCH_RECORDS = 512
"""Records scanned per reactor turn."""
PACED_RECORDS = 64
"""Records scanned per reactor turn by a stream under a rate cap. A turn of
512 records (read, decode, place on two rings) holds the reactor for 5 ms of
CPU on a quiet box and 20-40 ms on a busy one, and every read of a key this
node holds waits behind it; a capped stream has time to spare, so it takes
smaller bites."""
ROUND_CHUNKS = 16
"""A round (the unit of acknowledgement and of the durable cursor) ends after
this many chunks even if no destination's batch filled up, so that a node
sending little still records its progress."""
WINDOW = 2
CATCH_UP_KEYS = 256
CATCH_UP_VALUE = 8192
"""Keys per batch sent again after the fence's grace, and the largest value
batched among them (larger ones go alone): a batch stays well under
L{codec.MAX_STREAM_OPS} and L{codec.MAX_STREAM_BYTES}."""
"""Rounds in flight at once: one being acknowledged while the next is sent."""
BATCH_TARGET_BYTES = 1 << 20
"""A batch closes once its records' values reach this many bytes."""
RETRY_FIRST = 0.5
RETRY_MAX = 5.0
RATE_SLICE = 0.1
"""Under a rate cap a batch holds about this many seconds of the node's share,
so the copies trickle out instead of leaving in bursts of a thousand."""
MIN_PACED_BATCH = 16
MAX_PLAN_KEYS = 1000


def record_bytes(key: str, record: Record) -> int:
    """What a copy counts in ``bytes_moved`` and a plan's ``bytes``: key (UTF-8) and value."""
    return len(key.encode("utf-8")) + len(record.value)


def stream_meta(epoch: int) -> str:
    return f"move/{epoch}/stream"


def cleanup_meta(epoch: int) -> str:
    return f"move/{epoch}/cleanup"


class MapSource(Protocol):
    """What the mover needs of the node's L{shardkv.node.mapstore.MapStore}."""

    @property
    def learned(self) -> ClusterMap | None: ...

    def subscribe(self, fn: Callable[[ClusterMap], None]) -> None: ...

    def grace_left(self) -> float: ...

    def grace_writes(self) -> list[str] | None: ...

    def note_planned(self, m: ClusterMap) -> None: ...


class StreamPeers(Protocol):
    """What the mover needs of the node's L{shardkv.replica.client.ReplicaClient}."""

    def send_stream(
        self, node: str, ops: Sequence[codec.PutOp], epoch: int | None
    ) -> Coroutine[Any, Any, list[codec.Result]] | Deferred[list[codec.Result]]: ...

    def replica_put(
        self,
        node: str,
        key: str,
        record: Record,
        hint_for: str | None = None,
        epoch: int | None = None,
    ) -> Deferred[bool]: ...


@dataclass
class StreamProgress:
    """A stream's state and counters; what is persisted covers acknowledged rounds only."""

    state: str = "idle"
    cursor: str = ""
    keys_scanned: int = 0
    keys_moved: int = 0
    bytes_moved: int = 0
    copies_sent: int = 0
    copies_refused: int = 0
    last_error: str | None = None
    caught_up: bool = False
    """The writes taken in the fence's grace have been sent again (L{_Stream._catch_up})."""

    def status(self) -> dict[str, Any]:
        out = asdict(self)
        del out["cursor"], out["caught_up"]
        return out


@dataclass
class CleanupProgress:
    state: str = "idle"
    cursor: str = ""
    keys_scanned: int = 0
    keys_deleted: int = 0
    bytes_deleted: int = 0
    hints_dropped: int = 0
    last_error: str | None = None

    def status(self) -> dict[str, Any]:
        out = asdict(self)
        del out["cursor"]
        return out


def _load(engine: StorageEngine, name: str, cls: type[Any]) -> Any:
    """The progress stored under ``name``, or None.

    A damaged entry starts the task over: copies and deletions are idempotent.
    """
    raw = engine.get_meta(name)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
    except (ValueError, TypeError, AttributeError):
        log.warn("ignoring unreadable move progress {name}", name=name)
        return None


def _dump(progress: StreamProgress | CleanupProgress) -> bytes:
    return json.dumps(asdict(progress), ensure_ascii=False).encode("utf-8")


@dataclass
class _Batch:
    """Copies for one destination, sent and retried as one request."""

    ops: list[codec.PutOp] = field(default_factory=list)
    cost: int = 0
    value_bytes: int = 0


@dataclass
class _Round:
    """The copies of a run of scanned records, up to and including ``cursor``."""

    cursor: str
    scanned: int = 0
    keys_moved: int = 0
    bytes_moved: int = 0
    copies: int = 0
    batches: dict[str, _Batch] = field(default_factory=dict)
    singles: list[tuple[str, str, Record]] = field(default_factory=list)


class _Task:
    """One running stream or cleanup, for one epoch; stopped by cancelling its Deferred."""

    def __init__(self, mover: Mover, m: ClusterMap) -> None:
        self.mover = mover
        self.map = m
        self.epoch = m.epoch
        self.stopped = False
        self._inflight: set[Deferred[Any]] = set()
        self.finished: Deferred[None] | None = None

    def start(self, work: Callable[[], Any]) -> None:
        self.finished = ensureDeferred(work())
        self.finished.addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        """A task must not die quietly and leave the move waiting for it forever:
        log why, and start it again from its saved progress after a pause."""
        if self.stopped or failure.check(CancelledError):
            return
        log.failure("move task for epoch {epoch} failed; restarting it", failure, epoch=self.epoch)
        progress = getattr(self, "progress", None)
        if progress is not None:
            progress.last_error = str(failure.value) or repr(failure.value)
        self.mover.clock.callLater(RETRY_MAX, self.mover.restart, self)

    def track(self, d: Deferred[Any]) -> Deferred[Any]:
        self._inflight.add(d)
        d.addBoth(self._untrack, d)
        return d

    def _untrack(self, result: Any, d: Deferred[Any]) -> Any:
        self._inflight.discard(d)
        return result

    def stop(self) -> None:
        self.stopped = True
        for d in list(self._inflight):
            d.cancel()
        if self.finished is not None:
            self.finished.cancel()

    async def fence_settled(self, meta: str, progress: StreamProgress | CleanupProgress) -> None:
        """Wait out the fence's grace (L{shardkv.replica.protocol.FENCE_GRACE}), then
        write ``progress`` through the engine's committer: every call of the
        previous epoch this node took is then committed, so the scan sees it."""
        left = self.mover.mapstore.grace_left()
        if left > 0:
            await self.pause(left)
        await self.track(ensureDeferred(self.mover.engine.put_meta(meta, _dump(progress))))

    async def pause(self, seconds: float = 0.0) -> None:
        """Let the reactor run (``seconds`` of the mover's clock at least)."""
        await self.track(deferLater(self.mover.clock, seconds, lambda: None))

    def scan(self, after: str, size: int | None = None) -> list[tuple[str, Record]]:
        return self.mover.chunk(after, size)


class _Stream(_Task):
    def __init__(self, mover: Mover, m: ClusterMap, progress: StreamProgress) -> None:
        super().__init__(mover, m)
        self.progress = progress
        self._planner: MovePlanner | None = None
        assert m.move is not None
        nodes = len(m.previous_weights())
        self.share = m.move.rate / nodes if m.move.rate > 0 else 0.0
        if self.share:
            self.max_ops = max(
                MIN_PACED_BATCH, min(codec.MAX_STREAM_OPS, int(self.share * RATE_SLICE))
            )
            self.records_per_turn = min(mover.batch_records, PACED_RECORDS)
        else:
            self.max_ops = codec.MAX_STREAM_OPS
            self.records_per_turn = mover.batch_records
        self._next_at = 0.0
        self._failing: set[str] = set()
        self._refusal: str | None = None
        """The last copy refused for good: still worth saying once the stream is done."""
        self._backlog: deque[tuple[str, Record]] = deque()
        self._scan_from = progress.cursor
        self._last = progress.cursor
        self._scan_done = False

    @property
    def planner(self) -> MovePlanner:
        assert self._planner is not None, "the planner is built first thing in run()"
        return self._planner

    async def run(self) -> None:
        p = self.progress
        p.state = "streaming"
        me = self.mover.node_id
        # Both rings, a step per reactor turn: tens of ms of CPU unless a plan built them.
        self._planner = await self.track(self.mover.build(MovePlanner.steps_for_map(self.map)))
        log.info(
            "epoch {epoch}: {node} streams copies from key {cursor!r} (rate share {share}/s)",
            epoch=self.epoch,
            node=me,
            cursor=p.cursor,
            share=self.share or "unlimited",
        )
        catching = self.track(ensureDeferred(self._catch_up()))
        window: deque[tuple[_Round, Deferred[Any]]] = deque()
        while True:
            r = await self._fill()
            if r is None:
                break
            await self._pace(r.keys_moved)
            window.append((r, self.track(ensureDeferred(self._send(r)))))
            if len(window) >= WINDOW:
                await self._acknowledged(*window.popleft())
        while window:
            await self._acknowledged(*window.popleft())
        await catching
        if not p.caught_up:
            await self._scan_again()
        p.state = "done"
        p.last_error = self._refusal
        await self.track(self.mover.engine.put_meta(stream_meta(self.epoch), _dump(p)))
        log.info(
            "epoch {epoch}: stream done, {moved} keys ({bytes} bytes) moved, {copies} copies sent",
            epoch=self.epoch,
            moved=p.keys_moved,
            bytes=p.bytes_moved,
            copies=p.copies_sent,
        )

    async def _catch_up(self) -> None:
        """Once the fence's grace is over, send again what the node took in it.

        The scan starts at once, so a write of the epoch before, taken in the
        grace, may be behind its cursor; its key was noted
        (L{shardkv.node.mapstore.MapStore.note_grace_write}) and goes again
        here, after a write through the committer has made it visible. When
        the keys are not known (the node restarted since it learned the map),
        the stream scans everything again at its end (L{_scan_again}).
        """
        if self.progress.caught_up:
            return
        await self.fence_settled(stream_meta(self.epoch), self.progress)
        keys = self.mover.mapstore.grace_writes()
        if keys is None:
            return
        me, engine = self.mover.node_id, self.mover.engine
        for start in range(0, len(keys), CATCH_UP_KEYS):
            r = _Round(self._last)
            for key in keys[start : start + CATCH_UP_KEYS]:
                try:
                    record = engine.get(key)
                except CorruptRecord:
                    continue
                km = None if record is None else self.planner.for_key(key)
                if record is None or km is None or me not in km.sources:
                    continue
                for dest in km.destinations:
                    if codec.fits_stream(key, record) and len(record.value) <= CATCH_UP_VALUE:
                        r.batches.setdefault(dest, _Batch()).ops.append(codec.PutOp(key, record))
                    else:
                        r.singles.append((dest, key, record))
            if r.batches or r.singles:
                await self._send(r)
        self.progress.caught_up = True

    async def _scan_again(self) -> None:
        """Send every copy once more (what an earlier run took in its grace is unknown)."""
        log.info("epoch {epoch}: sending every copy once more after a restart", epoch=self.epoch)
        await self.fence_settled(stream_meta(self.epoch), self.progress)
        self._scan_from = self._last = ""
        self._scan_done = False
        while (r := await self._fill()) is not None:
            await self._send(r)
        self.progress.caught_up = True

    async def _acknowledged(self, r: _Round, sent: Deferred[Any]) -> None:
        """Wait for round ``r``, then count it and persist the cursor after it."""
        await sent
        p = self.progress
        p.cursor = r.cursor
        p.keys_scanned += r.scanned
        p.keys_moved += r.keys_moved
        p.bytes_moved += r.bytes_moved
        p.copies_sent += r.copies
        await self.track(self.mover.engine.put_meta(stream_meta(self.epoch), _dump(p)))

    async def _fill(self) -> _Round | None:
        """Classify scanned records into a round until a batch is full; None once nothing is left.

        A record joins a round whole (its copies to every destination) or not
        at all, so the round's cursor covers exactly what it carries.
        """
        me, for_hash, max_ops = self.mover.node_id, self.planner.for_hash, self.max_ops
        r: _Round | None = None
        chunks = 0
        while True:
            if not self._backlog:
                if self._scan_done or chunks >= ROUND_CHUNKS:
                    return r
                if chunks:
                    await self.pause()
                chunk = self.scan(self._scan_from, self.records_per_turn)
                chunks += 1
                if not chunk:
                    self._scan_done = True
                    return r
                self._scan_from = chunk[-1][0]
                self._backlog.extend(chunk)
            if r is None:
                r = _Round(self._last)
            backlog, batches = self._backlog, r.batches
            while backlog:
                key, record = backlog[0]
                km = for_hash(hash_key(key))
                if km is None or me not in km.sources:
                    backlog.popleft()
                    r.scanned += 1
                    r.cursor = self._last = key
                    continue
                alone = not codec.fits_stream(key, record)
                cost = 0 if alone else codec.stream_cost(key, record)
                if not alone and any(
                    _full(batches.get(dest), cost, len(record.value), max_ops)
                    for dest in km.destinations
                ):
                    return r
                backlog.popleft()
                r.scanned += 1
                r.cursor = self._last = key
                for dest in km.destinations:
                    if alone:
                        r.singles.append((dest, key, record))
                    else:
                        b = batches.get(dest)
                        if b is None:
                            b = batches[dest] = _Batch()
                        b.ops.append(codec.PutOp(key, record))
                        b.cost += cost
                        b.value_bytes += len(record.value)
                r.copies += len(km.destinations)
                if km.primary == me:
                    r.keys_moved += len(km.destinations)
                    r.bytes_moved += len(km.destinations) * record_bytes(key, record)

    async def _pace(self, copies: int) -> None:
        """Under a rate cap, wait until this round's primary copies fit the node's share."""
        if not self.share or not copies:
            return
        now = self.mover.clock.seconds()
        wait = self._next_at - now
        self._next_at = max(now, self._next_at) + copies / self.share
        if wait > 0:
            await self.pause(wait)

    async def _send(self, r: _Round) -> None:
        sends = [self._deliver(dest, b.ops) for dest, b in sorted(r.batches.items())]
        sends += [self._deliver_one(dest, key, rec) for dest, key, rec in r.singles]
        await gatherResults([ensureDeferred(s) for s in sends], consumeErrors=True)

    async def _deliver(self, dest: str, ops: list[codec.PutOp]) -> None:
        """Send one batch to ``dest`` until it is acknowledged.

        A record the destination refuses for good is counted, not retried.
        """
        await self._retrying(dest, lambda: self._stream_once(dest, ops))

    async def _stream_once(self, dest: str, ops: list[codec.PutOp]) -> None:
        results = await self.track(
            ensureDeferred(self.mover.peers.send_stream(dest, ops, self.epoch))
        )
        retry = [res for res in results if res.status >= 500]
        if retry:
            # The destination's storage failed for some: send the batch again
            # (the ones it stored are kept once more, harmlessly).
            first = retry[0]
            raise StorageError(f"{dest} could not store {len(retry)} copies: {first.message}")
        for op, res in zip(ops, results, strict=True):
            if res.status != 200:
                self._refused(dest, op.key, f"{res.error}: {res.message}")

    async def _deliver_one(self, dest: str, key: str, record: Record) -> None:
        async def once() -> None:
            try:
                await self.track(self.mover.peers.replica_put(dest, key, record, epoch=self.epoch))
            except ReplicaRefused as e:
                if e.code in _PERMANENT:
                    self._refused(dest, key, str(e))
                    return
                raise

        await self._retrying(dest, once)

    def _refused(self, dest: str, key: str, why: str) -> None:
        """A copy the destination will never take (too large for it, a version it refuses)."""
        self.progress.copies_refused += 1
        self.progress.last_error = self._refusal = f"{dest} refused {key!r}: {why}"
        log.warn(
            "epoch {epoch}: {dest} refused the copy of {key!r}: {why}",
            epoch=self.epoch,
            dest=dest,
            key=key,
            why=why,
        )

    async def _retrying(self, dest: str, attempt: Callable[[], Awaitable[None]]) -> None:
        delay = RETRY_FIRST
        while True:
            try:
                await attempt()
            except (ReplicaCallFailed, StorageError) as e:
                if self.stopped:
                    raise CancelledError() from None
                if dest not in self._failing:
                    log.info(
                        "epoch {epoch}: sending to {dest} failed ({error}); retrying",
                        epoch=self.epoch,
                        dest=dest,
                        error=str(e),
                    )
                self._failing.add(dest)
                self.progress.state = "waiting"
                self.progress.last_error = f"{dest}: {e}"
                await self.pause(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            if dest in self._failing:
                self._failing.discard(dest)
                log.info("epoch {epoch}: {dest} takes copies again", epoch=self.epoch, dest=dest)
                if not self._failing:
                    self.progress.state = "streaming"
            return


_PERMANENT = frozenset({"value_too_large", "invalid_version", "invalid_request", "invalid_key"})
"""Refusals of one record that no retry can change."""


def _full(b: _Batch | None, cost: int, value_bytes: int, max_ops: int) -> bool:
    """Would a record of ``cost`` overflow batch ``b``? An empty batch always takes one."""
    if b is None or not b.ops:
        return False
    return (
        len(b.ops) >= max_ops
        or b.cost + cost > codec.MAX_STREAM_BYTES
        or b.value_bytes + value_bytes > BATCH_TARGET_BYTES
    )


class _Cleanup(_Task):
    def __init__(self, mover: Mover, m: ClusterMap, progress: CleanupProgress) -> None:
        super().__init__(mover, m)
        self.progress = progress
        self.member = mover.node_id in m.current_weights()

    async def run(self) -> None:
        p = self.progress
        p.state = "running"
        await self.fence_settled(cleanup_meta(self.epoch), p)
        m = self.map
        ring = await self.track(self.mover.build(ring_steps(m.current_weights(), m.vnodes)))
        engine, me, n = self.mover.engine, self.mover.node_id, self.map.n
        log.info("epoch {epoch}: cleanup from key {cursor!r}", epoch=self.epoch, cursor=p.cursor)
        while True:
            chunk = self.scan(p.cursor)
            if not chunk:
                break
            doomed = [
                (key, record)
                for key, record in chunk
                if not (self.member and owns(ring, n, me, hash_key(key)))
            ]
            deleted = await self._retrying(partial(self._discard, doomed))
            p.keys_deleted += len(deleted)
            p.bytes_deleted += sum(record_bytes(k, rec) for k, rec in deleted)
            p.keys_scanned += len(chunk)
            p.cursor = chunk[-1][0]
            await self._retrying(lambda: engine.put_meta(cleanup_meta(self.epoch), _dump(p)))
            await self.pause()
        current = self.map.current_weights()
        for target in sorted(engine.hint_counts()):
            if target not in current:
                p.hints_dropped += await self._retrying(partial(engine.drop_hints, target))
        p.state = "done"
        p.last_error = None
        await self._retrying(lambda: engine.put_meta(cleanup_meta(self.epoch), _dump(p)))
        log.info(
            "epoch {epoch}: cleanup done, {deleted} records ({bytes} bytes) deleted",
            epoch=self.epoch,
            deleted=p.keys_deleted,
            bytes=p.bytes_deleted,
        )

    async def _discard(self, doomed: list[tuple[str, Record]]) -> list[tuple[str, Record]]:
        engine = self.mover.engine
        done = await gatherResults(
            [engine.discard(key, record) for key, record in doomed], consumeErrors=True
        )
        return [pair for pair, gone in zip(doomed, done, strict=True) if gone]

    async def _retrying(
        self, attempt: Callable[[], Coroutine[Any, Any, Any] | Deferred[Any]]
    ) -> Any:
        """``attempt()`` until the engine takes it (a full disk may drain); StorageError only."""
        delay = RETRY_FIRST
        while True:
            try:
                return await self.track(ensureDeferred(attempt()))
            except StorageError as e:
                self.progress.last_error = str(e)
                log.warn("epoch {epoch}: cleanup waits: {error}", epoch=self.epoch, error=str(e))
            except Exception as e:
                if _first_error(e) is None:
                    raise
                self.progress.last_error = str(_first_error(e))
            await self.pause(delay)
            delay = min(delay * 2, RETRY_MAX)


def _first_error(e: BaseException) -> StorageError | None:
    """The StorageError inside gatherResults' FirstError, if that is what it wraps."""
    sub = getattr(e, "subFailure", None)
    if isinstance(sub, Failure) and isinstance(sub.value, StorageError):
        return sub.value
    return None


class Mover:
    """The node's streams and cleanups, one of each at most, for its learned epoch.

    ``peers`` is the node's replica client (the mover calls its
    ``send_stream`` and, for records too large for a stream batch,
    ``replica_put``); ``clock`` paces the stream and its retries.
    Construct it, then call L{start} once the map store is loaded.
    """

    def __init__(
        self,
        node_id: str,
        engine: StorageEngine,
        mapstore: MapSource,
        peers: StreamPeers,
        clock: IReactorTime,
        batch_records: int = BATCH_RECORDS,
    ) -> None:
        self.node_id = node_id
        self.engine = engine
        self.mapstore = mapstore
        self.peers = peers
        self.clock = clock
        self.batch_records = batch_records
        self.stream: _Stream | None = None
        self.cleanup: _Cleanup | None = None
        self.running = False
        self._progress: dict[str, StreamProgress | CleanupProgress] = {}
        """Progress of this process's tasks (and of streams with nothing to send), by meta name."""
        mapstore.subscribe(self.learned)

    def start(self) -> None:
        """Resume whatever the learned map calls for (after the map store's L{load})."""
        self.running = True
        m = self.mapstore.learned
        if m is not None:
            self.learned(m)

    def stop(self) -> None:
        """Stop every task; what they acknowledged is persisted, and L{start} resumes from it."""
        self.running = False
        for task in (self.stream, self.cleanup):
            if task is not None:
                task.stop()
        self.stream = self.cleanup = None

    def restart(self, task: _Task) -> None:
        """Start ``task`` again from its saved progress, if nothing replaced it meanwhile."""
        if self.stream is task:
            self.stream = None
        elif self.cleanup is task:
            self.cleanup = None
        else:
            return
        m = self.mapstore.learned
        if m is not None:
            self.learned(m)

    def learned(self, m: ClusterMap) -> None:
        """A map was installed: stop the tasks of older epochs, start what this one asks for."""
        for task in (self.stream, self.cleanup):
            if task is not None and task.epoch < m.epoch:
                task.stop()
        if self.stream is not None and self.stream.epoch < m.epoch:
            self.stream = None
        if self.cleanup is not None and self.cleanup.epoch < m.epoch:
            self.cleanup = None
        for name in [k for k in self._progress if not k.startswith(f"move/{m.epoch}/")]:
            del self._progress[name]
        if not self.running or m.move is None:
            return
        if m.move.phase == Phase.COPYING and self.stream is None:
            self._start_stream(m)
        elif m.move.phase == Phase.CLEANUP and self.cleanup is None:
            self._start_cleanup(m)

    def _start_stream(self, m: ClusterMap) -> None:
        assert m.move is not None
        progress = _load(self.engine, stream_meta(m.epoch), StreamProgress)
        if progress is not None and progress.state == "done":
            return
        if not m.move.copy or self.node_id not in m.previous_weights():
            # Nothing to send: the destinations have it all, or this node held nothing.
            done = StreamProgress(state="done")
            self._progress[stream_meta(m.epoch)] = done
            self.engine.put_meta(stream_meta(m.epoch), _dump(done)).addErrback(
                lambda f: log.failure("recording an empty stream", f)
            )
            return
        task = _Stream(self, m, progress or StreamProgress())
        task.progress.last_error = None
        self._progress[stream_meta(m.epoch)] = task.progress
        self.stream = task
        task.start(task.run)

    def _start_cleanup(self, m: ClusterMap) -> None:
        progress = _load(self.engine, cleanup_meta(m.epoch), CleanupProgress)
        if progress is not None and progress.state == "done":
            return
        task = _Cleanup(self, m, progress or CleanupProgress())
        self._progress[cleanup_meta(m.epoch)] = task.progress
        self.cleanup = task
        task.start(task.run)

    def status(self) -> dict[str, Any]:
        """``GET /replica/move``: the stream and the cleanup of the learned epoch."""
        m = self.mapstore.learned
        if m is None:
            return {
                "node": self.node_id,
                "epoch": None,
                "phase": None,
                "stream": StreamProgress().status(),
                "cleanup": CleanupProgress().status(),
            }
        stream = self._progress.get(stream_meta(m.epoch)) or _load(
            self.engine, stream_meta(m.epoch), StreamProgress
        )
        cleanup = self._progress.get(cleanup_meta(m.epoch)) or _load(
            self.engine, cleanup_meta(m.epoch), CleanupProgress
        )
        return {
            "node": self.node_id,
            "epoch": m.epoch,
            "phase": None if m.move is None else str(m.move.phase),
            "stream": (stream or StreamProgress()).status(),
            "cleanup": (cleanup or CleanupProgress()).status(),
        }

    # the plan

    async def plan(self, m: ClusterMap) -> dict[str, Any]:
        """``POST /replica/plan``: the copies this node would send as primary, by destination.

        ``bytes`` counts each copy's key (UTF-8) and value, as ``bytes_moved`` does.
        """
        steps = _planner_steps(m)
        self.mapstore.note_planned(m)
        planner = await self.build(steps)
        me, for_hash = self.node_id, planner.for_hash
        pairs: dict[str, list[int]] = {}
        scanned = 0
        cursor = ""
        while True:
            chunk = self.chunk(cursor)
            if not chunk:
                break
            for key, record in chunk:
                km = for_hash(hash_key(key))
                if km is not None and km.primary == me:
                    size = record_bytes(key, record)
                    for dest in km.destinations:
                        pair = pairs.setdefault(dest, [0, 0])
                        pair[0] += 1
                        pair[1] += size
            scanned += len(chunk)
            cursor = chunk[-1][0]
            await deferLater(self.clock, 0, lambda: None)
        return {
            "node": me,
            "pairs": [
                {"from": me, "to": dest, "keys": keys, "bytes": size}
                for dest, (keys, size) in sorted(pairs.items())
            ],
            "keys_scanned": scanned,
        }

    async def plan_keys(self, m: ClusterMap, to: str, cursor: str, limit: int) -> dict[str, Any]:
        """``POST /replica/plan/keys``: up to ``limit`` keys after ``cursor`` that this node
        would send ``to`` as their primary source."""
        planner = await self.build(_planner_steps(m))
        me, for_hash = self.node_id, planner.for_hash
        limit = max(1, min(limit, MAX_PLAN_KEYS))
        keys: list[str] = []
        while True:
            chunk = self.chunk(cursor)
            if not chunk:
                return {"keys": keys, "cursor": None}
            for key, _ in chunk:
                km = for_hash(hash_key(key))
                if km is not None and km.primary == me and to in km.destinations:
                    keys.append(key)
                    if len(keys) >= limit:
                        return {"keys": keys, "cursor": key}
            cursor = chunk[-1][0]
            await deferLater(self.clock, 0, lambda: None)

    def build(self, steps: Steps[T]) -> Deferred[T]:
        """Work cut into steps (a ring: tens of ms in all), a step per reactor turn
        (L{shardkv.cluster.stepwise})."""
        return run_steps(self.clock, steps)

    def chunk(self, after: str, size: int | None = None) -> list[tuple[str, Record]]:
        """The next records after key ``after`` ("" from the start), in engine order:
        ``size`` of them, by default L{batch_records}."""
        size = self.batch_records if size is None else size
        chunk = list(self.engine.scan(after, size + 1))
        if chunk and chunk[0][0] == after:
            del chunk[0]
        return chunk[:size]


def _planner_steps(m: ClusterMap) -> Steps[MovePlanner]:
    if m.move is None or m.move.phase != Phase.COPYING:
        raise InvalidMap("a plan needs a map in phase copying")
    return MovePlanner.steps_for_map(m)
