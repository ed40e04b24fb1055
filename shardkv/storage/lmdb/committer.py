"""Group commit: one thread owns every LMDB write transaction.

Why a thread, and only one: LMDB allows one write transaction at a time, and a
durable commit costs two fsyncs (about 0.1-1 ms each, far more on a real
disk). Run on the reactor thread, that would stall every request; run one
transaction per write in a thread pool, commits serialise and throughput stays
at one write per commit (~1-3k/s measured). A single thread that takes
*everything queued* into one transaction pays the fsyncs once per group, so
batches grow by themselves when commits are slow (34k-108k durable puts/s
measured with 64 in flight). py-lmdb drops the GIL around the commit, so the
reactor keeps serving reads meanwhile.

A write is acknowledged (its Deferred fires, via ``callFromThread``) only
after the group containing it has committed; that is the whole durability
contract, and nothing else in this module may weaken it.

Failures are told apart because they call for opposite reactions:

- the map is full (``MapFullError``): grow the map on the reactor thread (LMDB
  requires that no transaction is active while ``set_mapsize`` runs, and the
  reactor holds no read transaction between callbacks) and redo the group; at
  the cap, fail the writes that do not fit with L{StorageFull} and go on;
- the disk is full (ENOSPC, EDQUOT): fail that group with L{StorageFull}; the
  next group simply tries again, so writes resume once there is room;
- anything else in the write path (EIO from fsync, a read-only file system,
  LMDB panics): fail-stop. The group fails with L{StorageFailed}, every later
  write fails at once, and the commit is never retried: after a failed fsync
  the kernel may already have dropped the dirty pages, so a retry that
  "succeeds" can still have lost data (PostgreSQL's fsyncgate).

Operations are generic: each names its sub-database and carries a function
that runs inside the write transaction, so records, hints or anything else
share one thread and one commit.

Failpoints (L{shardkv.storage.failpoints}) let fault tests reach the paths
above without a broken disk.

Each committed group's size and commit time, and each explicit sync's time,
go to the node's L{StorageMetrics} (histograms: safe to observe from this
thread); the counts stay in L{CommitStats}, read at scrape time.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import lmdb
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads

from shardkv.errors import StorageError, StorageFailed, StorageFull
from shardkv.metrics import StorageMetrics
from shardkv.storage.durability import check_durability
from shardkv.storage.failpoints import Failpoints, injected_error, maybe_exit
from shardkv.storage.lmdb.capacity import disk_full_reason, next_map_size, resize_from_thread
from shardkv.storage.lmdb.operations import (
    CommitStats,
    Failed,
    ItemError,
    WriteOp,
    fire,
)

T = TypeVar("T")

DEFAULT_MAX_BATCH = 1000
DEFAULT_MAX_BATCH_BYTES = 64 * 1024 * 1024


def _now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- the committer ------------------------------------------------------------


class GroupCommitter:
    """The one thread that writes to an LMDB environment.

    Call L{submit} and L{stop} on the reactor thread only. ``max_map_size`` may
    be raised at any time (from the reactor thread); the next write that needs
    room grows the map up to it.
    """

    def __init__(
        self,
        env: lmdb.Environment,
        dbs: Mapping[str, lmdb._Database],
        reactor: IReactorFromThreads,
        *,
        max_map_size: int,
        durability: str = "always",
        batch_interval: float = 1.0,
        failpoints: Failpoints | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        bump_db: str | None = None,
        free_bytes: Callable[[], int] | None = None,
        name: str = "shardkv-commit",
        metrics: StorageMetrics | None = None,
    ) -> None:
        self._env = env
        self._metrics = metrics
        self._dbs = dict(dbs)
        self._reactor = reactor
        self.max_map_size = max_map_size
        self.durability = check_durability(durability)
        self.batch_interval = batch_interval
        self.failpoints = failpoints if failpoints is not None else Failpoints()
        self._max_batch = max_batch
        self._max_batch_bytes = max_batch_bytes
        self._bump_db = bump_db
        self._free_bytes = free_bytes
        self.stats = CommitStats(last_sync_wall=time.time())
        self.failed: str | None = None
        self.full: str | None = None
        self._queue: deque[WriteOp[Any]] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closing = False
        self._dirty = False
        self._last_sync = time.monotonic()
        self._stop_waiters: list[Deferred[None]] = []
        self._exited = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # reactor side

    def start(self) -> None:
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def submit(self, op: WriteOp[T]) -> Deferred[T]:
        if self._closing:
            return fail(StorageError("the storage engine is stopping"))
        if self.failed is not None:
            return fail(StorageFailed(self.failed))
        with self._cond:
            self._queue.append(op)
            self._cond.notify()
        return op.deferred

    def stop(self) -> Deferred[None]:
        """Commit everything queued, then end the thread; fires once it has ended."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.ident is None or self._exited:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._stop_waiters.append(d)
        return d

    def _on_exit(self) -> None:
        self._thread.join()
        self._exited = True
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)

    # committer thread

    def _run(self) -> None:
        try:
            while True:
                batch = self._take()
                if batch is None:
                    break
                if batch:
                    self._process(batch)
                if self.durability == "batch" and self._sync_due() == 0.0:
                    self._sync()
            if self.durability != "always" and self._dirty and self.failed is None:
                self._sync()
        except BaseException as e:
            self._fail_stop(f"the storage commit thread crashed: {e!r}")
            raise
        finally:
            self._fail_queued()
            self._reactor.callFromThread(self._on_exit)

    def _take(self) -> list[WriteOp[Any]] | None:
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                timeout = self._sync_due() if self.durability == "batch" else None
                if timeout == 0.0:
                    return []
                self._cond.wait(timeout)
            batch: list[WriteOp[Any]] = []
            size = 0
            while self._queue and len(batch) < self._max_batch:
                op = self._queue[0]
                if batch and size + op.size > self._max_batch_bytes:
                    break
                batch.append(self._queue.popleft())
                size += op.size
            return batch

    def _process(self, batch: list[WriteOp[Any]]) -> None:
        if self.failed is not None:
            outcomes: list[object] = [Failed(StorageFailed(self.failed))] * len(batch)
        else:
            try:
                outcomes = self._commit(batch, bumped=False)
            except Exception as e:
                self._fail_stop(f"unexpected error in the storage commit thread: {e!r}")
                outcomes = [Failed(StorageFailed(self.failed or str(e)))] * len(batch)
        self._reactor.callFromThread(fire, batch, outcomes)
        if self.failed is not None:
            self._fail_queued()

    def _fail_queued(self) -> None:
        with self._cond:
            rest = list(self._queue)
            self._queue.clear()
        if rest:
            reason = self.failed or "the storage engine stopped"
            error = StorageFailed(reason) if self.failed else StorageError(reason)
            self._reactor.callFromThread(fire, rest, [Failed(error)] * len(rest))

    def _commit(self, ops: list[WriteOp[Any]], bumped: bool) -> list[object]:
        """Outcomes for ``ops`` (results, or Failed), committing as few groups as possible."""
        outcomes: list[object] = [None] * len(ops)
        live = list(range(len(ops)))
        need_bump = False
        while live:
            try:
                if need_bump:
                    need_bump = False
                    self._bump()
                results = self._attempt([ops[i] for i in live])
            except ItemError as e:
                outcomes[live.pop(e.index)] = Failed(e.error)
            except lmdb.MapFullError as e:
                if self._grow():
                    continue
                if not bumped:
                    # Pages freed by earlier commits (removed tombstones) become
                    # reusable only after one more commit; make one and retry.
                    bumped = need_bump = True
                    continue
                if len(live) > 1:
                    for i in live:
                        if self.failed is not None:
                            outcomes[i] = Failed(StorageFailed(self.failed))
                        else:
                            outcomes[i] = self._commit([ops[i]], bumped=True)[0]
                    return outcomes
                outcomes[live[0]] = Failed(self._map_full(e))
                return outcomes
            except lmdb.TxnFullError as e:
                if len(live) > 1:
                    half = len(live) // 2
                    for part in (live[:half], live[half:]):
                        sub = self._commit([ops[i] for i in part], bumped)
                        for i, out in zip(part, sub, strict=True):
                            outcomes[i] = out
                    return outcomes
                outcomes[live[0]] = Failed(StorageError(f"write too large for LMDB: {e}"))
                return outcomes
            except Exception as e:
                err = Failed(self._classify(e, sum(ops[i].size for i in live)))
                for i in live:
                    outcomes[i] = err
                return outcomes
            else:
                for i, result in zip(live, results, strict=True):
                    outcomes[i] = result
                return outcomes
        return outcomes

    def _attempt(self, ops: list[WriteOp[Any]]) -> list[object]:
        fp = self.failpoints
        delay = fp.take("storage.commit.sleep_ms")
        if delay is not None:
            time.sleep(int(delay) / 1000.0)
        txn = self._env.begin(write=True)
        try:
            results: list[object] = []
            for n, op in enumerate(ops):
                try:
                    results.append(op.apply(txn, self._dbs[op.db]))
                except (lmdb.MapFullError, lmdb.TxnFullError):
                    raise
                except lmdb.BadValsizeError as e:
                    raise ItemError(n, StorageError(f"key or value size not storable: {e}")) from e
                except lmdb.Error:
                    raise
                except Exception as e:
                    raise ItemError(n, StorageError(f"write failed: {e!r}")) from e
            maybe_exit(fp, "storage.before_commit")
            self.stats.commit_calls += 1
            action = fp.take("storage.commit")
            if action is not None:
                raise injected_error(action, "storage.commit")
            started = time.monotonic()
            txn.commit()
        except BaseException:
            with contextlib.suppress(lmdb.Error):
                txn.abort()
            raise
        maybe_exit(fp, "storage.after_commit")
        seconds = time.monotonic() - started
        ms = seconds * 1000.0
        if self._metrics is not None:
            self._metrics.commit_seconds.observe(seconds)
            self._metrics.group_operations.observe(len(ops))
        st = self.stats
        st.commits += 1
        st.committed_ops += len(ops)
        st.last_commit_ms = ms
        st.total_commit_ms += ms
        st.largest_batch = max(st.largest_batch, len(ops))
        self._dirty = True
        self.full = None
        return results

    def _bump(self) -> None:
        if self._bump_db is None:
            return
        marker = str(time.time_ns()).encode()

        def touch(txn: lmdb.Transaction[bytes], db: lmdb._Database) -> None:
            txn.put(b"last_bump", marker, db=db)

        with contextlib.suppress(lmdb.MapFullError):
            self._attempt([WriteOp(self._bump_db, touch)])

    def _grow(self) -> bool:
        target = next_map_size(self._env.info()["map_size"], self.max_map_size)
        if target is None:
            return False
        problem = resize_from_thread(self._reactor, self._env, target)
        if problem is not None:
            self.full = f"{_now_text()} {problem}"
            return False
        self.stats.map_grows += 1
        return True

    def _map_full(self, error: Exception) -> StorageFull:
        size = self._env.info()["map_size"]
        text = (
            f"the storage map is full at {size} bytes (cap {self.max_map_size}); "
            "writes resume once space is freed or the cap is raised"
        )
        self.full = f"{_now_text()} {text}"
        return StorageFull(text)

    def _classify(self, error: Exception, group_bytes: int) -> StorageError:
        self.stats.failed_commits += 1
        text = disk_full_reason(error, group_bytes, self._free_bytes)
        if text is not None:
            self.full = f"{_now_text()} {text}"
            return StorageFull(text)
        self._fail_stop(f"a commit failed: {error}")
        return StorageFailed(self.failed or str(error))

    def _sync_due(self) -> float | None:
        """Seconds until the next ``batch`` sync is due, or None when nothing is unsynced."""
        if not self._dirty or self.failed is not None:
            return None
        return max(0.0, self._last_sync + self.batch_interval - time.monotonic())

    def _sync(self) -> None:
        try:
            action = self.failpoints.take("storage.sync")
            if action is not None:
                raise injected_error(action, "storage.sync")
            started = time.monotonic()
            self._env.sync(True)
            if self._metrics is not None:
                self._metrics.fsync_seconds.observe(time.monotonic() - started)
        except Exception as e:
            since = datetime.fromtimestamp(self.stats.last_sync_wall, UTC)
            self._fail_stop(
                f"env.sync failed: {e}; writes acknowledged since the last good sync "
                f"({since.isoformat(timespec='seconds')}) may be lost on power loss"
            )
            return
        self._dirty = False
        self._last_sync = time.monotonic()
        self.stats.syncs += 1
        self.stats.last_sync_wall = time.time()

    def _fail_stop(self, text: str) -> None:
        if self.failed is None:
            self.failed = (
                f"{_now_text()} {text}. The storage engine is now read-only and will "
                "not retry; check the disk (dmesg, df, mount) and restart the node."
            )
