"""The LMDB storage engine: records that survive restarts, crashes and power loss.

Why LMDB: a copy-on-write B+tree with no recovery step, so a killed process
never leaves a half-written database, and a point read from the memory map
takes a few microseconds (about 3 us here, plus ~10 us to decode the record).
That is why reads run inline on the reactor thread (one short read
transaction each; a thread hop would cost far more), while every write goes
through one group-commit thread (L{shardkv.storage.lmdb.committer}). LMDB has
no page checksums, so every record carries a CRC (L{shardkv.core.records}) and
a bad one is reported, never served.

Durability (``durability=``): see L{shardkv.storage.durability} for what each
mode promises. Keys of any length the API accepts are stored; see
L{shardkv.storage.lmdb.layout} for how, and for the scan order that follows.

Full and failed storage: the map grows by doubling up to ``max_map_size``;
at the cap, or on ENOSPC, writes fail with L{StorageFull} while
reads go on, and writes succeed again as soon as there is room, without a
restart (``health()`` says ``writable=False`` meanwhile, but every write is
still tried). LMDB reports a write cut short by a full disk as EIO, so an EIO
while the file system has (almost) no free space counts as full too; checked
on a full tmpfs. Any other write failure (EIO from fsync, a read-only remount)
makes the engine fail-stop: read-only, unhealthy, and it never retries the
commit.

Reads must come from the reactor thread: the map is resized there, between
callbacks, when no read is in progress.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from functools import partial
from typing import TypeVar

import lmdb
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads

from shardkv.core.records import CorruptRecord, Record, decode, encode
from shardkv.errors import InvalidHintTarget, StorageError
from shardkv.metrics import StorageMetrics
from shardkv.storage.durability import check_durability
from shardkv.storage.engine import EngineHealth
from shardkv.storage.failpoints import Failpoints
from shardkv.storage.lmdb.committer import GroupCommitter
from shardkv.storage.lmdb.datadir import DataDir, free_bytes, open_database
from shardkv.storage.lmdb.layout import (
    HINTS_DB,
    MAX_STORED_KEY_BYTES,
    META_DB,
    RECORDS_DB,
    apply_discard,
    apply_drop_hints,
    apply_put,
    apply_put_hint,
    apply_put_meta,
    apply_remove_hint,
    count_hints,
    db_key,
    decode_hint,
    first_hint_key,
    hint_key,
    is_bad_target,
    is_hint_of,
    meta_key,
    pack_hint,
    pack_stored,
    unpack_stored,
)
from shardkv.storage.lmdb.operations import WriteOp

_T = TypeVar("_T")

MiB = 1024 * 1024
DEFAULT_INITIAL_MAP_SIZE = 64 * MiB
DEFAULT_MAX_MAP_SIZE = 1024 * 1024 * MiB
DROP_HINTS_STEP = 10_000
"""How many hints one write operation of L{LMDBEngine.drop_hints} deletes at most."""


class LMDBEngine:
    """Records in sub-database ``records``; hints for down nodes in ``hints``;
    the node's metadata (L{put_meta}) in ``meta``.

    A record is stored under L{db_key} of its key (the key itself unless it is
    longer than 511 bytes); hints are kept by target, as
    L{shardkv.storage.lmdb.layout} describes.
    """

    name = "lmdb"

    def __init__(
        self,
        path: str,
        reactor: IReactorFromThreads,
        durability: str = "always",
        initial_map_size: int = DEFAULT_INITIAL_MAP_SIZE,
        max_map_size: int = DEFAULT_MAX_MAP_SIZE,
        batch_interval: float = 1.0,
        *,
        failpoints: Failpoints | None = None,
    ) -> None:
        check_durability(durability)
        if initial_map_size <= 0 or max_map_size < initial_map_size:
            raise ValueError("need 0 < initial_map_size <= max_map_size")
        if batch_interval <= 0:
            raise ValueError("batch_interval must be positive")
        self._dir = DataDir(path)
        self.path = self._dir.path
        self.durability = durability
        self._reactor = reactor
        self._initial_map_size = initial_map_size
        self._max_map_size = max_map_size
        self._batch_interval = batch_interval
        self.failpoints = failpoints if failpoints is not None else Failpoints.from_env()
        self._env: lmdb.Environment | None = None
        self._records: lmdb._Database | None = None
        self._committer: GroupCommitter | None = None
        self._pending: dict[str, list[Record]] = {}
        self._hints: lmdb._Database | None = None
        self._meta: lmdb._Database | None = None
        self._hint_counts: dict[str, int] = {}
        self._metrics: StorageMetrics | None = None

    def instrument(self, metrics: StorageMetrics) -> None:
        """Observe commits and syncs into ``metrics`` from the next L{start} on."""
        self._metrics = metrics

    # lifecycle

    def start(self) -> None:
        if self._env is not None:
            raise RuntimeError("the engine is already started")
        self._dir.acquire()
        try:
            self._open()
        except BaseException:
            self._dir.release()
            raise

    def stop(self) -> Deferred[None]:
        committer = self._committer
        if committer is None:
            self._close()
            return succeed(None)
        d = committer.stop()
        d.addCallback(lambda _: self._close())
        return d

    def _open(self) -> None:
        opened = open_database(self.path, self._initial_map_size, sync=self.durability == "always")
        env = opened.env
        self._env = env
        self._records = opened.records
        self._hints = opened.hints
        self._meta = opened.meta
        self._hint_counts = count_hints(env, opened.hints)
        self._committer = GroupCommitter(
            env,
            {RECORDS_DB: opened.records, HINTS_DB: opened.hints, META_DB: opened.meta},
            self._reactor,
            max_map_size=max(self._max_map_size, env.info()["map_size"]),
            durability=self.durability,
            batch_interval=self._batch_interval,
            failpoints=self.failpoints,
            bump_db=META_DB,
            free_bytes=partial(free_bytes, self.path),
            name=f"shardkv-commit:{os.path.basename(self.path)}",
            metrics=self._metrics,
        )
        self._committer.start()

    def _close(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env = None
        self._records = None
        self._hints = None
        self._meta = None
        self._dir.release()

    # reads: inline, one short read transaction each

    def _read_env(self) -> tuple[lmdb.Environment, lmdb._Database]:
        if self._env is None or self._records is None:
            raise StorageError("the storage engine is not running")
        return self._env, self._records

    def get(self, key: str) -> Record | None:
        kb = key.encode("utf-8")
        if not kb:
            return None
        env, db = self._read_env()
        dbk = db_key(kb)
        with env.begin(db=db) as txn:
            raw = txn.get(dbk)
        if raw is None:
            return None
        stored_key, encoded = unpack_stored(dbk, raw)
        if stored_key != kb:
            raise CorruptRecord("a different key is stored under this key's digest")
        return decode(encoded)

    def latest(self, key: str) -> Record | None:
        pending = self._pending.get(key)
        if not pending:
            return self.get(key)
        newest = max(pending, key=lambda r: r.version)
        try:
            stored = self.get(key)
        except CorruptRecord:
            return newest
        if stored is not None and stored.version >= newest.version:
            return stored
        return newest

    def scan(self, start: str = "", limit: int = 1000) -> Iterator[tuple[str, Record]]:
        """Records in LMDB key order from ``start``'s position (L{shardkv.storage.lmdb.layout})."""
        env, db = self._read_env()
        seek = db_key(start.encode("utf-8"))
        out: list[tuple[str, Record]] = []
        if limit <= 0:
            return iter(out)
        with env.begin(db=db) as txn:
            cursor = txn.cursor()
            found = cursor.set_range(seek) if seek else cursor.first()
            while found and len(out) < limit:
                dbk, raw = cursor.item()
                with contextlib.suppress(CorruptRecord, UnicodeDecodeError):
                    kb, encoded = unpack_stored(dbk, raw)
                    out.append((kb.decode("utf-8"), decode(encoded)))
                found = cursor.next()
        return iter(out)

    # writes: through the committer thread

    def put(self, key: str, record: Record) -> Deferred[bool]:
        kb = self._check_key(key)
        if isinstance(kb, Deferred):
            return kb
        value = pack_stored(kb, encode(record))
        dbk = db_key(kb)
        op: WriteOp[bool] = WriteOp(
            RECORDS_DB, partial(apply_put, dbk, value, record.version), len(dbk) + len(value)
        )
        pending = self._pending.setdefault(key, [])
        pending.append(record)
        d = self._submit(op)
        d.addBoth(self._settled, key, record)
        return d

    def put_many(self, items: Sequence[tuple[str, Record]]) -> Deferred[list[bool]]:
        """One write op for every item: a stream batch costs one Deferred, not one per record."""
        keys = [self._check_key(key) for key, _ in items]
        bad = [kb for kb in keys if isinstance(kb, Deferred)]
        if bad:
            for refusal in bad:
                refusal.addErrback(lambda _: None)
            return fail(StorageError(f"{len(bad)} of the keys cannot be stored"))
        changes = []
        size = 0
        for kb, (key, record) in zip(keys, items, strict=True):
            assert isinstance(kb, bytes)
            value = pack_stored(kb, encode(record))
            dbk = db_key(kb)
            changes.append((dbk, value, record.version))
            size += len(dbk) + len(value)
            self._pending.setdefault(key, []).append(record)

        def apply(txn: lmdb.Transaction[bytes], db: lmdb._Database) -> list[bool]:
            return [apply_put(dbk, value, version, txn, db) for dbk, value, version in changes]

        op: WriteOp[list[bool]] = WriteOp(RECORDS_DB, apply, size)
        d = self._submit(op)

        def settled(result: object) -> object:
            for key, record in items:
                self._settled(None, key, record)
            return result

        return d.addBoth(settled)

    def remove_tombstone(self, key: str, record: Record) -> Deferred[bool]:
        return self._discard(key, record, tombstone_only=True)

    def discard(self, key: str, record: Record) -> Deferred[bool]:
        return self._discard(key, record, tombstone_only=False)

    def _discard(self, key: str, record: Record, tombstone_only: bool) -> Deferred[bool]:
        kb = self._check_key(key)
        if isinstance(kb, Deferred):
            return kb
        dbk = db_key(kb)
        apply = partial(apply_discard, dbk, record.version, tombstone_only)
        op: WriteOp[bool] = WriteOp(RECORDS_DB, apply, len(dbk))
        return self._submit(op)

    def _check_key(self, key: str) -> bytes | Deferred[bool]:
        kb = key.encode("utf-8")
        if not kb:
            return fail(StorageError("the empty key cannot be stored"))
        if len(kb) > MAX_STORED_KEY_BYTES:
            return fail(StorageError(f"the key is {len(kb)} bytes, too long to store"))
        return kb

    def _submit(self, op: WriteOp[_T]) -> Deferred[_T]:
        if self._committer is None or self._env is None:
            return fail(StorageError("the storage engine is not running"))
        return self._committer.submit(op)

    def _settled(self, result: object, key: str, record: Record) -> object:
        pending = self._pending.get(key)
        if pending is not None:
            for i, r in enumerate(pending):
                if r is record:
                    del pending[i]
                    break
            if not pending:
                del self._pending[key]
        return result

    # hints: records kept for a node that was down

    def put_hint(self, target: str, key: str, record: Record) -> Deferred[bool]:
        hk = self._hint_key(target, key)
        if isinstance(hk, Deferred):
            return hk
        value = pack_hint(key.encode("utf-8"), encode(record))
        op: WriteOp[tuple[bool, int]] = WriteOp(
            HINTS_DB, partial(apply_put_hint, hk, value, record.version), len(hk) + len(value)
        )
        return self._submit(op).addCallback(self._counted, target)

    def remove_hint(self, target: str, key: str, record: Record) -> Deferred[bool]:
        hk = self._hint_key(target, key)
        if isinstance(hk, Deferred):
            return hk
        op: WriteOp[tuple[bool, int]] = WriteOp(
            HINTS_DB, partial(apply_remove_hint, hk, record.version), len(hk)
        )
        return self._submit(op).addCallback(self._counted, target)

    def drop_hints(self, target: str) -> Deferred[int]:
        tb = target.encode("utf-8")
        if is_bad_target(tb):
            return succeed(0)
        d: Deferred[int] = Deferred.fromCoroutine(self._drop_hints(target, tb))
        return d

    async def _drop_hints(self, target: str, tb: bytes) -> int:
        total = 0
        while True:
            op: WriteOp[int] = WriteOp(HINTS_DB, partial(apply_drop_hints, tb, DROP_HINTS_STEP))
            deleted = await self._submit(op)
            total += deleted
            self._counted((deleted > 0, -deleted), target)
            if deleted < DROP_HINTS_STEP:
                return total

    def hints(self, target: str, limit: int = 100) -> list[tuple[str, Record]]:
        env, _ = self._read_env()
        tb = target.encode("utf-8")
        out: list[tuple[str, Record]] = []
        if self._hints is None or limit <= 0 or is_bad_target(tb):
            return out
        with env.begin(db=self._hints) as txn:
            cursor = txn.cursor()
            found = cursor.set_range(first_hint_key(tb))
            while found and len(out) < limit:
                hk, raw = cursor.item()
                if not is_hint_of(hk, tb):
                    break
                with contextlib.suppress(CorruptRecord, UnicodeDecodeError):
                    out.append(decode_hint(raw))
                found = cursor.next()
        return out

    def hint_counts(self) -> dict[str, int]:
        return {t: n for t, n in self._hint_counts.items() if n > 0}

    def _hint_key(self, target: str, key: str) -> bytes | Deferred[bool]:
        tb, kb = target.encode("utf-8"), key.encode("utf-8")
        if is_bad_target(tb):
            return fail(InvalidHintTarget(f"not a valid hint target: {target!r}"))
        if not kb:
            return fail(StorageError("the empty key cannot be stored"))
        return hint_key(tb, kb)

    def _counted(self, result: tuple[bool, int], target: str) -> bool:
        applied, delta = result
        if delta:
            count = self._hint_counts.get(target, 0) + delta
            if count > 0:
                self._hint_counts[target] = count
            else:
                self._hint_counts.pop(target, None)
        return applied

    # metadata: the node's own small documents, beside the storage format

    def get_meta(self, name: str) -> bytes | None:
        mk = meta_key(name)
        env, _ = self._read_env()
        if self._meta is None:
            raise StorageError("the storage engine is not running")
        with env.begin(db=self._meta) as txn:
            return txn.get(mk)

    def put_meta(self, name: str, value: bytes) -> Deferred[None]:
        try:
            mk = meta_key(name)
        except ValueError as e:
            return fail(StorageError(str(e)))
        op: WriteOp[None] = WriteOp(
            META_DB, partial(apply_put_meta, mk, bytes(value)), len(mk) + len(value)
        )
        return self._submit(op)

    # capacity and health

    @property
    def map_size(self) -> int:
        env, _ = self._read_env()
        return env.info()["map_size"]

    def set_max_map_size(self, size: int) -> None:
        """Raise (or lower) the cap the map may grow to; takes effect on the next write."""
        self._max_map_size = size
        if self._committer is not None:
            self._committer.max_map_size = size

    @property
    def commit_stats(self) -> dict[str, float]:
        st = self._committer.stats if self._committer is not None else None
        if st is None:
            return {}
        return {
            "commits": st.commits,
            "committed_writes": st.committed_ops,
            "commit_calls": st.commit_calls,
            "failed_commits": st.failed_commits,
            "average_batch": round(st.average_batch, 2),
            "largest_batch": st.largest_batch,
            "last_commit_ms": round(st.last_commit_ms, 3),
            "syncs": st.syncs,
            "map_grows": st.map_grows,
        }

    def _free_bytes(self) -> int | None:
        try:
            return free_bytes(self.path)
        except OSError:
            return None

    def health(self) -> EngineHealth:
        details: dict[str, object] = {
            "engine": self.name,
            "path": self.path,
            "durability": self.durability,
            "max_map_size": self._max_map_size,
        }
        committer, env = self._committer, self._env
        if committer is None or env is None or self._records is None:
            return EngineHealth(False, False, "the storage engine is not running", details)
        info = env.info()
        with env.begin(db=self._records) as txn:
            stat = txn.stat(self._records)
        details.update(
            map_size=info["map_size"],
            used_bytes=(info["last_pgno"] + 1) * stat["psize"],
            free_bytes=self._free_bytes(),
            entries=stat["entries"],
            queue_depth=committer.queue_depth,
            pending_keys=len(self._pending),
            **self.commit_stats,
        )
        active = self.failpoints.active()
        if active:
            details["failpoints"] = active
        if committer.failed is not None:
            return EngineHealth(False, False, committer.failed, details)
        if committer.full is not None:
            return EngineHealth(True, False, committer.full, details)
        return EngineHealth(True, True, "", details)
