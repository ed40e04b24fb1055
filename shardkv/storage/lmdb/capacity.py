"""Running out of room: growing LMDB's map, and telling a full disk from a failing one.

The map grows by doubling up to the engine's ``max_map_size``. LMDB requires
that no transaction is active while ``set_mapsize`` runs, so the committer
thread asks the reactor thread to do it (the reactor holds no read
transaction between callbacks) and waits.

A full disk and a failing disk call for opposite reactions (retry the next
group, or fail-stop), so an error is taken for a full disk only on evidence:
ENOSPC or EDQUOT, or an EIO while the file system has (almost) no free space,
because LMDB reports a write cut short by a full disk as EIO (checked on a
full tmpfs).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import lmdb
from twisted.internet.interfaces import IReactorFromThreads

RESIZE_TIMEOUT = 30.0
SHORT_WRITE_SLACK = 1024 * 1024

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_PAGE = 4096


# -- the map ----------------------------------------------------------------------


def next_map_size(current: int, cap: int) -> int | None:
    """The size to grow a map of ``current`` bytes to (page-aligned), or None at ``cap``."""
    if current >= cap:
        return None
    target = min(current * 2, cap)
    return -(-target // _PAGE) * _PAGE


@dataclass
class _Resize:
    size: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    cancelled: bool = False
    error: Exception | None = None


def resize_from_thread(
    reactor: IReactorFromThreads,
    env: lmdb.Environment,
    size: int,
    timeout: float = RESIZE_TIMEOUT,
) -> str | None:
    """Have the reactor thread set ``env``'s map to ``size``; None once done, else why not.

    Call from a thread other than the reactor's, with no transaction open. A
    resize the reactor has not started within ``timeout`` is cancelled.
    """
    req = _Resize(size)
    reactor.callFromThread(_resize_on_reactor, env, req)
    if not req.done.wait(timeout):
        with req.lock:
            if not req.started:
                req.cancelled = True
                return "map resize timed out (reactor busy?)"
        req.done.wait()
    if req.error is not None:
        return f"could not grow the map to {size} bytes: {req.error}"
    return None


def _resize_on_reactor(env: lmdb.Environment, req: _Resize) -> None:
    with req.lock:
        if req.cancelled:
            return
        req.started = True
    try:
        env.set_mapsize(req.size)
    except Exception as e:
        req.error = e
    finally:
        req.done.set()


# -- the disk ---------------------------------------------------------------------


def error_errno(error: BaseException) -> int | None:
    """The OS errno behind an LMDB or OS error, if there is one."""
    if isinstance(error, OSError):
        return error.errno
    code = getattr(error, "code", None)
    if isinstance(code, int) and code > 0:
        return code
    for arg in error.args:
        if isinstance(arg, int) and arg > 0:
            return arg
    text = str(error)
    if "No space left on device" in text or "Disk quota exceeded" in text:
        return errno.ENOSPC
    return None


def disk_full_reason(
    error: Exception, group_bytes: int, free_bytes: Callable[[], int] | None
) -> str | None:
    """Why a commit of ``group_bytes`` that failed with ``error`` ran out of disk, or None.

    None means the failure is not a full disk, and the engine must fail-stop.
    """
    code = error_errno(error)
    if code in _FULL_ERRNOS:
        return f"disk full: {error}; writes resume once there is room"
    if code == errno.EIO and free_bytes is not None:
        # LMDB turns a write cut short by a full disk into EIO (mdb_page_flush).
        # Only with the file system out of space is that EIO taken for ENOSPC.
        try:
            free = free_bytes()
        except OSError:
            free = None
        if free is not None and free < max(SHORT_WRITE_SLACK, 2 * group_bytes):
            return (
                f"disk full: {error} with {free} bytes free on the file system "
                "(LMDB reports a write cut short by a full disk as EIO); "
                "writes resume once there is room"
            )
    return None
