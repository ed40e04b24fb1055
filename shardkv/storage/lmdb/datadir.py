"""The data directory: created if missing, held under a lock, and the LMDB database in it.

Files in the data directory: LMDB's ``data.mdb`` and ``lock.mdb``, and
``shardkv.lock``, which holds our pid under an exclusive ``flock``. LMDB itself
lets several processes share an environment, and two nodes writing one
directory would each trust data the other changed underneath it.

Every way the directory can be unusable (not a directory, not writable, held
by another process, not an LMDB database, another storage format) raises
L{StorageStartupError} with one line naming the directory and the reason.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from dataclasses import dataclass

import lmdb

from shardkv.errors import StorageStartupError
from shardkv.storage.lmdb.layout import FORMAT, HINTS_DB, LMDB_MAX_KEY, META_DB, RECORDS_DB

LOCK_FILE = "shardkv.lock"
MAX_DBS = 16


class DataDir:
    """A data directory that this process holds while it is acquired."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._lock_fd: int | None = None

    def acquire(self) -> None:
        """Create the directory if needed, check it is usable, and lock it."""
        self._prepare()
        self._lock_fd = self._take_lock()

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _prepare(self) -> None:
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


def free_bytes(path: str) -> int:
    """Bytes this process may still write on the file system holding ``path``."""
    st = os.statvfs(path)
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize


@dataclass(frozen=True)
class OpenDatabase:
    """An open LMDB environment and its sub-databases."""

    env: lmdb.Environment
    records: lmdb._Database
    hints: lmdb._Database
    meta: lmdb._Database


def open_database(path: str, initial_map_size: int, sync: bool) -> OpenDatabase:
    """Open (or create) the LMDB database in data directory ``path`` and check its format.

    The map starts at ``initial_map_size``, or at the data file's size if that
    is larger. ``sync`` sets LMDB's ``sync`` and ``metasync`` (see
    L{shardkv.storage.durability}).
    """
    data_file = os.path.join(path, "data.mdb")
    existing = os.path.getsize(data_file) if os.path.exists(data_file) else 0
    map_size = max(initial_map_size, existing)
    try:
        env = lmdb.open(
            path,
            map_size=map_size,
            max_dbs=MAX_DBS,
            sync=sync,
            metasync=sync,
            mode=0o600,
        )
    except lmdb.Error as e:
        # py-lmdb's message starts with the path again ("PATH: MDB_INVALID: ...").
        text = str(e).removeprefix(f"{path}: ")
        raise StorageStartupError(
            f"cannot open the LMDB database in data directory {path}: {text}"
        ) from None
    if env.max_key_size() < LMDB_MAX_KEY:
        limit = env.max_key_size()
        env.close()
        raise StorageStartupError(
            f"cannot use data directory {path}: this LMDB build stores keys of "
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
                    f"data directory {path} holds storage format {found!r}, "
                    f"this version reads {FORMAT!r}"
                )
    except lmdb.Error as e:
        env.close()
        raise StorageStartupError(
            f"cannot initialise the LMDB database in data directory {path}: {e}"
        ) from None
    except BaseException:
        env.close()
        raise
    return OpenDatabase(env, records, hints, meta)
