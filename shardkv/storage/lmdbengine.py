"""The LMDB storage engine: records that survive restarts, crashes and power loss.

Why LMDB: a copy-on-write B+tree with no recovery step, so a killed process
never leaves a half-written database, and a point read from the memory map
takes a few microseconds (about 3 us here, plus ~10 us to decode the record).
That is why reads run inline on the reactor thread (one short read
transaction each; a thread hop would cost far more),
while every write goes through one group-commit writer thread
(L{shardkv.storage.writer}). LMDB has no page checksums, so every record
carries a CRC (L{shardkv.core.records}) and a bad one is reported, never served.

Durability (``durability=``, modelled on Redis ``appendfsync``). "Acknowledged"
means the Deferred from L{LMDBEngine.put} fired with a result.

``always`` (default; the only mode whose acks may count toward a quorum W)
    LMDB ``sync=True, metasync=True``: every group commit is fsynced before
    any write in it is acknowledged. Process crash (kill -9): loses nothing
    acknowledged. Power loss or kernel crash: loses nothing acknowledged
    (provided the disk honours fsync).

``batch``
    ``sync=False``; the writer calls ``env.sync(True)`` at least every
    ``batch_interval`` seconds (default 1 s) while there are unsynced commits.
    Writes are acknowledged after commit, before the sync. Process crash:
    loses nothing acknowledged (committed pages are in the OS page cache).
    Power loss or kernel crash: may lose the writes acknowledged since the
    last sync, about ``batch_interval`` (~1 s) of them. LMDB documents that
    without sync the database stays intact only if the file system preserves
    write order; otherwise such a crash can also corrupt the file. A failed
    ``env.sync`` fail-stops the engine like a failed commit.

``os``
    ``sync=False`` and never an explicit sync while running (one at a clean
    stop): the kernel writes dirty pages back when it likes (about 30 s on
    Linux, ``vm.dirty_expire_centisecs``). Process crash: loses nothing
    acknowledged. Power loss or kernel crash: may lose ~30 s of acknowledged
    writes, with the same corruption caveat as ``batch``; write-back errors
    are never seen by this process.

Full and failed storage: the map grows by doubling up to ``max_map_size``;
at the cap, or on ENOSPC, writes fail with L{StorageFull} (HTTP 507) while
reads go on, and writes succeed again as soon as there is room, without a
restart (``health()`` says ``writable=False`` meanwhile, but every write is
still tried). LMDB reports a write cut short by a full disk as EIO, so an EIO
while the file system has (almost) no free space counts as full too; checked
on a full tmpfs. Any other write failure (EIO from fsync, a read-only remount)
makes the engine fail-stop: read-only, unhealthy, and it never retries the
commit.

Keys: any key the API accepts (up to 1 KiB of UTF-8,
L{shardkv.core.keys.MAX_KEY_BYTES}) is stored, although LMDB's compiled-in key
limit is 511 bytes. A key of at most 511 bytes is its own LMDB key. A longer
one is stored under ``key[:478] + 0xFF + sha256(key)`` (511 bytes), and its
record's value starts with the real key (2-byte length, then the UTF-8), so
L{LMDBEngine.scan} can return it. 0xFF never occurs in UTF-8, so such an LMDB
key cannot be a short key; reading one back checks the sha256 against the key
it holds, which covers the embedded key as the CRC covers the record. Scan
order is the LMDB key order: byte order of the UTF-8, except that a long key
sorts after every shorter key that shares its first 478 bytes, and long keys
sharing those bytes sort by digest. ``scan(start=<last key returned>)`` seeks
to that key's own position, so paginating by the last key returned visits
every record once.

Reads must come from the reactor thread: the map is resized there, between
callbacks, when no read is in progress.

Files in the data directory: LMDB's ``data.mdb`` and ``lock.mdb``, and
``shardkv.lock``, which holds our pid under an exclusive ``flock``. LMDB itself
lets several processes share an environment, and two nodes writing one
directory would each trust data the other changed underneath it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import struct
from collections.abc import Iterator
from functools import partial
from typing import TypeVar

import lmdb
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads

from shardkv.core.records import CorruptRecord, Record, decode, encode
from shardkv.core.versions import Version
from shardkv.storage.engine import (
    EngineHealth,
    StorageError,
    StorageFailed,
    StorageStartupError,
)
from shardkv.storage.writer import (
    DURABILITY_MODES,
    Failpoints,
    GroupCommitWriter,
    WriteOp,
)

_T = TypeVar("_T")

MiB = 1024 * 1024
DEFAULT_INITIAL_MAP_SIZE = 64 * MiB
DEFAULT_MAX_MAP_SIZE = 1024 * 1024 * MiB
RECORDS_DB = "records"
HINTS_DB = "hints"
META_DB = "meta"
MAX_DBS = 16
LOCK_FILE = "shardkv.lock"
FORMAT = b"1"


class InvalidHintTarget(StorageError):
    """A hint target (node name) that cannot be a key prefix."""

    status = 400
    code = "invalid_hint_target"


_KEY_HEAD = struct.Struct(">H")
_DIRECT, _HASHED = b"\x00", b"\x01"
MAX_TARGET_BYTES = 256

LMDB_MAX_KEY = 511
"""The longest LMDB key (LMDB's compiled-in ``MDB_MAXKEYSIZE`` default); the
layout of long keys depends on it, so an LMDB built with less is refused."""
_LONG_MARK = 0xFF
_DIGEST_BYTES = hashlib.sha256().digest_size
LONG_KEY_PREFIX = LMDB_MAX_KEY - 1 - _DIGEST_BYTES
"""How many leading bytes of a long key its LMDB key keeps (478)."""
_KEY_HEAD_MAX = 2**16 - 1


def db_key(kb: bytes) -> bytes:
    """The LMDB key of the record for UTF-8 key ``kb`` (see the module docstring)."""
    if len(kb) <= LMDB_MAX_KEY:
        return kb
    return kb[:LONG_KEY_PREFIX] + bytes([_LONG_MARK]) + hashlib.sha256(kb).digest()


def _is_long(dbk: bytes) -> bool:
    return len(dbk) == LMDB_MAX_KEY and dbk[LONG_KEY_PREFIX] == _LONG_MARK


def _unpack_stored(dbk: bytes, raw: bytes) -> tuple[bytes, bytes]:
    """The UTF-8 key and the encoded record kept under LMDB key ``dbk``."""
    if not _is_long(dbk):
        return dbk, raw
    if len(raw) < _KEY_HEAD.size:
        raise CorruptRecord("long-key record too short")
    (n,) = _KEY_HEAD.unpack_from(raw)
    kb = raw[_KEY_HEAD.size : _KEY_HEAD.size + n]
    if len(kb) != n or db_key(kb) != dbk:
        raise CorruptRecord("the key stored with a long-key record does not match its digest")
    return kb, raw[_KEY_HEAD.size + n :]


def _pack_stored(kb: bytes, encoded: bytes) -> bytes:
    if len(kb) <= LMDB_MAX_KEY:
        return encoded
    return _KEY_HEAD.pack(len(kb)) + kb + encoded


def _decode_stored(dbk: bytes, raw: bytes) -> Record:
    return decode(_unpack_stored(dbk, raw)[1])


class LMDBEngine:
    """Records in sub-database ``records``; hints for down nodes in ``hints``.

    A record is stored under L{db_key} of its key (the key itself unless it is
    longer than 511 bytes). A hint is stored under ``target + 0x00 + key`` so
    that one target's hints are contiguous and in key order. When that is
    longer than LMDB's key limit (511 bytes) it is ``target + 0x01 +
    sha256(key)`` instead; such hints come after the target's others. The
    hint's value holds the real key either way.
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
        max_batch: int = 1000,
    ) -> None:
        if durability not in DURABILITY_MODES:
            raise ValueError(
                f"unknown durability {durability!r}; use one of {', '.join(DURABILITY_MODES)}"
            )
        if initial_map_size <= 0 or max_map_size < initial_map_size:
            raise ValueError("need 0 < initial_map_size <= max_map_size")
        if batch_interval <= 0:
            raise ValueError("batch_interval must be positive")
        self.path = os.path.abspath(path)
        self.durability = durability
        self._reactor = reactor
        self._initial_map_size = initial_map_size
        self._max_map_size = max_map_size
        self._batch_interval = batch_interval
        self._max_batch = max_batch
        self.failpoints = failpoints if failpoints is not None else Failpoints.from_env()
        self._env: lmdb.Environment | None = None
        self._records: lmdb._Database | None = None
        self._writer: GroupCommitWriter | None = None
        self._lock_fd: int | None = None
        self._pending: dict[str, list[Record]] = {}
        self._hints: lmdb._Database | None = None
        self._hint_counts: dict[str, int] = {}

    # lifecycle

    def start(self) -> None:
        if self._env is not None:
            raise RuntimeError("the engine is already started")
        self._prepare_dir()
        self._lock_fd = self._take_lock()
        try:
            self._open()
        except BaseException:
            self._release_lock()
            raise

    def stop(self) -> Deferred[None]:
        writer = self._writer
        if writer is None:
            self._close()
            return succeed(None)
        d = writer.stop()
        d.addCallback(lambda _: self._close())
        return d

    def _prepare_dir(self) -> None:
        path = self.path
        if os.path.lexists(path) and not os.path.isdir(path):
            raise StorageStartupError(f"data directory {path} exists and is not a directory")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise StorageStartupError(
                f"cannot create data directory {path}: {e.strerror}"
                + (" (a parent path is not a directory)" if e.errno == errno.ENOTDIR else "")
            ) from None
        with contextlib.suppress(OSError):
            if os.statvfs(path).f_flag & os.ST_RDONLY:
                raise StorageStartupError(f"data directory {path} is on a read-only file system")
        if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
            raise StorageStartupError(
                f"data directory {path} is not readable and writable "
                f"by this user (uid {os.getuid()})"
            )

    def _take_lock(self) -> int:
        lock_path = os.path.join(self.path, LOCK_FILE)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageStartupError(
                f"data directory {self.path}: cannot open lock file {lock_path}: {e.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StorageStartupError(
                    f"data directory {self.path} is in use by another process (pid {holder})"
                ) from None
            raise StorageStartupError(
                f"data directory {self.path}: cannot lock {lock_path}: {e.strerror}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _open(self) -> None:
        data_file = os.path.join(self.path, "data.mdb")
        existing = os.path.getsize(data_file) if os.path.exists(data_file) else 0
        map_size = max(self._initial_map_size, existing)
        sync = self.durability == "always"
        try:
            env = lmdb.open(
                self.path,
                map_size=map_size,
                max_dbs=MAX_DBS,
                sync=sync,
                metasync=sync,
                mode=0o600,
            )
        except lmdb.Error as e:
            # py-lmdb's message starts with the path again ("PATH: MDB_INVALID: ...").
            text = str(e).removeprefix(f"{self.path}: ")
            raise StorageStartupError(
                f"cannot open the LMDB database in data directory {self.path}: {text}"
            ) from None
        if env.max_key_size() < LMDB_MAX_KEY:
            limit = env.max_key_size()
            env.close()
            raise StorageStartupError(
                f"cannot use data directory {self.path}: this LMDB build stores keys of "
                f"at most {limit} bytes, shardkv needs {LMDB_MAX_KEY}"
            )
        try:
            records = env.open_db(RECORDS_DB.encode())
            hints = env.open_db(HINTS_DB.encode())
            meta = env.open_db(META_DB.encode())
            with env.begin(write=True, db=meta) as txn:
                found = txn.get(b"format")
                if found is None:
                    txn.put(b"format", FORMAT)
                elif found != FORMAT:
                    raise StorageStartupError(
                        f"data directory {self.path} holds storage format {found!r}, "
                        f"this version reads {FORMAT!r}"
                    )
        except lmdb.Error as e:
            env.close()
            raise StorageStartupError(
                f"cannot initialise the LMDB database in data directory {self.path}: {e}"
            ) from None
        except BaseException:
            env.close()
            raise
        self._env = env
        self._records = records
        self._hints = hints
        self._hint_counts = _count_hints(env, hints)
        self._writer = GroupCommitWriter(
            env,
            {RECORDS_DB: records, HINTS_DB: hints, META_DB: meta},
            self._reactor,
            max_map_size=max(self._max_map_size, env.info()["map_size"]),
            durability=self.durability,
            batch_interval=self._batch_interval,
            failpoints=self.failpoints,
            max_batch=self._max_batch,
            bump_db=META_DB,
            free_bytes=partial(free_bytes, self.path),
            name=f"shardkv-writer:{os.path.basename(self.path)}",
        )
        self._writer.start()

    def _close(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env = None
        self._records = None
        self._hints = None
        self._release_lock()

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
        stored_key, encoded = _unpack_stored(dbk, raw)
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
        """Records in LMDB key order (see the module docstring) from ``start``'s position."""
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
                    kb, encoded = _unpack_stored(dbk, raw)
                    out.append((kb.decode("utf-8"), decode(encoded)))
                found = cursor.next()
        return iter(out)

    # writes: through the writer thread

    def put(self, key: str, record: Record) -> Deferred[bool]:
        kb = self._check_key(key)
        if isinstance(kb, Deferred):
            return kb
        value = _pack_stored(kb, encode(record))
        dbk = db_key(kb)
        op: WriteOp[bool] = WriteOp(
            RECORDS_DB, partial(_apply_put, dbk, value, record.version), len(dbk) + len(value)
        )
        pending = self._pending.setdefault(key, [])
        pending.append(record)
        d = self._submit(op)
        d.addBoth(self._settled, key, record)
        return d

    def remove_tombstone(self, key: str, record: Record) -> Deferred[bool]:
        kb = self._check_key(key)
        if isinstance(kb, Deferred):
            return kb
        dbk = db_key(kb)
        op: WriteOp[bool] = WriteOp(
            RECORDS_DB, partial(_apply_remove_tombstone, dbk, record.version), len(dbk)
        )
        return self._submit(op)

    def _check_key(self, key: str) -> bytes | Deferred[bool]:
        kb = key.encode("utf-8")
        if not kb:
            return fail(StorageError("the empty key cannot be stored"))
        if len(kb) > _KEY_HEAD_MAX:
            return fail(StorageError(f"the key is {len(kb)} bytes, too long to store"))
        return kb

    def _submit(self, op: WriteOp[_T]) -> Deferred[_T]:
        if self._writer is None or self._env is None:
            return fail(StorageError("the storage engine is not running"))
        return self._writer.submit(op)

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
        kb = key.encode("utf-8")
        value = _KEY_HEAD.pack(len(kb)) + kb + encode(record)
        op: WriteOp[tuple[bool, int]] = WriteOp(
            HINTS_DB, partial(_apply_put_hint, hk, value, record.version), len(hk) + len(value)
        )
        return self._submit(op).addCallback(self._counted, target)

    def remove_hint(self, target: str, key: str, record: Record) -> Deferred[bool]:
        hk = self._hint_key(target, key)
        if isinstance(hk, Deferred):
            return hk
        op: WriteOp[tuple[bool, int]] = WriteOp(
            HINTS_DB, partial(_apply_remove_hint, hk, record.version), len(hk)
        )
        return self._submit(op).addCallback(self._counted, target)

    def hints(self, target: str, limit: int = 100) -> list[tuple[str, Record]]:
        env, _ = self._read_env()
        tb = target.encode("utf-8")
        out: list[tuple[str, Record]] = []
        if self._hints is None or limit <= 0 or self._bad_target(tb):
            return out
        with env.begin(db=self._hints) as txn:
            cursor = txn.cursor()
            found = cursor.set_range(tb + _DIRECT)
            while found and len(out) < limit:
                hk, raw = cursor.item()
                if hk[: len(tb)] != tb or hk[len(tb) : len(tb) + 1] not in (_DIRECT, _HASHED):
                    break
                with contextlib.suppress(CorruptRecord, UnicodeDecodeError):
                    out.append(_decode_hint(raw))
                found = cursor.next()
        return out

    def hint_counts(self) -> dict[str, int]:
        return {t: n for t, n in self._hint_counts.items() if n > 0}

    def _hint_key(self, target: str, key: str) -> bytes | Deferred[bool]:
        tb, kb = target.encode("utf-8"), key.encode("utf-8")
        if self._bad_target(tb):
            return fail(InvalidHintTarget(f"not a valid hint target: {target!r}"))
        if not kb:
            return fail(StorageError("the empty key cannot be stored"))
        direct = tb + _DIRECT + kb
        if len(direct) <= LMDB_MAX_KEY:
            return direct
        return tb + _HASHED + hashlib.sha256(kb).digest()

    @staticmethod
    def _bad_target(tb: bytes) -> bool:
        return not tb or len(tb) > MAX_TARGET_BYTES or b"\x00" in tb or b"\x01" in tb

    def _counted(self, result: tuple[bool, int], target: str) -> bool:
        applied, delta = result
        if delta:
            count = self._hint_counts.get(target, 0) + delta
            if count > 0:
                self._hint_counts[target] = count
            else:
                self._hint_counts.pop(target, None)
        return applied

    # capacity and health

    @property
    def map_size(self) -> int:
        env, _ = self._read_env()
        return env.info()["map_size"]

    @property
    def max_map_size(self) -> int:
        return self._max_map_size

    def set_max_map_size(self, size: int) -> None:
        """Raise (or lower) the cap the map may grow to; takes effect on the next write."""
        self._max_map_size = size
        if self._writer is not None:
            self._writer.max_map_size = size

    @property
    def writer_stats(self) -> dict[str, float]:
        st = self._writer.stats if self._writer is not None else None
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

    def health(self) -> EngineHealth:
        details: dict[str, object] = {
            "engine": self.name,
            "path": self.path,
            "durability": self.durability,
            "max_map_size": self._max_map_size,
        }
        writer, env = self._writer, self._env
        if writer is None or env is None or self._records is None:
            return EngineHealth(False, False, "the storage engine is not running", details)
        info = env.info()
        with env.begin(db=self._records) as txn:
            stat = txn.stat(self._records)
        details.update(
            map_size=info["map_size"],
            used_bytes=(info["last_pgno"] + 1) * stat["psize"],
            entries=stat["entries"],
            queue_depth=writer.queue_depth,
            pending_keys=len(self._pending),
            **self.writer_stats,
        )
        active = self.failpoints.active()
        if active:
            details["failpoints"] = active
        if writer.failed is not None:
            return EngineHealth(False, False, writer.failed, details)
        if writer.full is not None:
            return EngineHealth(True, False, writer.full, details)
        return EngineHealth(True, True, "", details)


def free_bytes(path: str) -> int:
    """Bytes this process may still write on the file system holding ``path``."""
    st = os.statvfs(path)
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize


def _apply_put(
    dbk: bytes, value: bytes, version: Version, txn: lmdb.Transaction[bytes], db: lmdb._Database
) -> bool:
    current = txn.get(dbk, db=db)
    if current is not None:
        try:
            if _decode_stored(dbk, current).version >= version:
                return False
        except CorruptRecord:
            pass
    txn.put(dbk, value, db=db)
    return True


def _apply_put_hint(
    hk: bytes, value: bytes, version: Version, txn: lmdb.Transaction[bytes], db: lmdb._Database
) -> tuple[bool, int]:
    current = txn.get(hk, db=db)
    if current is not None:
        try:
            if _decode_hint(current)[1].version >= version:
                return False, 0
        except (CorruptRecord, UnicodeDecodeError):
            pass
    txn.put(hk, value, db=db)
    return True, 0 if current is not None else 1


def _apply_remove_hint(
    hk: bytes, version: Version, txn: lmdb.Transaction[bytes], db: lmdb._Database
) -> tuple[bool, int]:
    current = txn.get(hk, db=db)
    if current is None:
        return False, 0
    try:
        if _decode_hint(current)[1].version != version:
            return False, 0
    except (CorruptRecord, UnicodeDecodeError):
        return False, 0
    txn.delete(hk, db=db)
    return True, -1


def _decode_hint(raw: bytes) -> tuple[str, Record]:
    if len(raw) < _KEY_HEAD.size:
        raise CorruptRecord("hint too short")
    (n,) = _KEY_HEAD.unpack_from(raw)
    start = _KEY_HEAD.size
    return raw[start : start + n].decode("utf-8"), decode(raw[start + n :])


def _count_hints(env: lmdb.Environment, db: lmdb._Database) -> dict[str, int]:
    counts: dict[str, int] = {}
    with env.begin(db=db) as txn:
        for hk in txn.cursor().iternext(values=False):
            cut = min((i for i in (hk.find(_DIRECT), hk.find(_HASHED)) if i > 0), default=-1)
            if cut > 0:
                target = hk[:cut].decode("utf-8", "replace")
                counts[target] = counts.get(target, 0) + 1
    return counts


def _apply_remove_tombstone(
    dbk: bytes, version: Version, txn: lmdb.Transaction[bytes], db: lmdb._Database
) -> bool:
    current = txn.get(dbk, db=db)
    if current is None:
        return False
    try:
        stored = _decode_stored(dbk, current)
    except CorruptRecord:
        return False
    if not (stored.tombstone and stored.version == version):
        return False
    return txn.delete(dbk, db=db)


__all__ = [
    "DEFAULT_INITIAL_MAP_SIZE",
    "DEFAULT_MAX_MAP_SIZE",
    "LMDB_MAX_KEY",
    "LMDBEngine",
    "StorageFailed",
    "StorageStartupError",
    "db_key",
]
