"""Failpoints: named faults that let fault tests reach the storage failure paths.

Set with ``SHARDKV_FAILPOINTS`` (L{FAILPOINTS_ENV}), they reach the group
committer's full-disk, failed-commit and failed-sync paths without a broken
disk; they cost one dict lookup per commit when unset.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Mapping

FAILPOINTS_ENV = "SHARDKV_FAILPOINTS"

_INJECTED_ERRNOS = {"eio": errno.EIO, "enospc": errno.ENOSPC, "erofs": errno.EROFS}

STORAGE_FAILPOINTS: dict[str, frozenset[str] | None] = {
    # name -> allowed actions (None: a number of milliseconds)
    "storage.commit": frozenset(_INJECTED_ERRNOS),
    "storage.sync": frozenset({"eio", "enospc"}),
    "storage.commit.sleep_ms": None,
    "storage.before_commit": frozenset({"exit"}),
    "storage.after_commit": frozenset({"exit"}),
}
"""Failpoints the committer knows. ``storage.after_commit=exit`` dies after a
commit and before its writes are acknowledged (the crash test's worst case)."""

FAILPOINT_EXIT_CODE = 137


class Failpoints:
    """Named faults, parsed from ``name=action`` pairs separated by ``,`` or ``;``.

    ``storage.commit=eio`` fires once, ``storage.commit=3*eio`` three times,
    ``storage.commit=*enospc`` on every call until cleared, ``...=off`` never.
    Numeric actions (``storage.commit.sleep_ms=200``) apply on every call.
    Names outside ``storage.`` are kept for other layers and not checked here.
    """

    def __init__(self, spec: str = "") -> None:
        self._lock = threading.Lock()
        self._points: dict[str, tuple[str, int | None]] = {}
        for part in spec.replace(";", ",").split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, action = part.partition("=")
            if not sep or not name.strip() or not action.strip():
                raise ValueError(f"failpoint {part!r} is not name=action")
            self.set(name.strip(), action.strip())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Failpoints:
        env = os.environ if environ is None else environ
        return cls(env.get(FAILPOINTS_ENV, ""))

    def set(self, name: str, action: str) -> None:
        count: int | None = 1
        times, star, rest = action.partition("*")
        if star:
            if times and not times.isdigit():
                raise ValueError(f"failpoint {name}: bad count in {action!r}")
            count, action = (int(times) if times else None), rest
        if action.isdigit():
            count = None
        _check(name, action)
        with self._lock:
            if action == "off" or count == 0:
                self._points.pop(name, None)
            else:
                self._points[name] = (action, count)

    def clear(self, name: str | None = None) -> None:
        with self._lock:
            if name is None:
                self._points.clear()
            else:
                self._points.pop(name, None)

    def take(self, name: str) -> str | None:
        """The action to perform now at ``name``, counting one firing, or None."""
        if not self._points:
            return None
        with self._lock:
            point = self._points.get(name)
            if point is None:
                return None
            action, count = point
            if count is not None:
                if count <= 1:
                    del self._points[name]
                else:
                    self._points[name] = (action, count - 1)
            return action

    def active(self) -> dict[str, str]:
        with self._lock:
            return {
                name: action if count is None else f"{count}*{action}"
                for name, (action, count) in self._points.items()
            }


def _check(name: str, action: str) -> None:
    if not name.startswith("storage.") or action == "off":
        return
    if name not in STORAGE_FAILPOINTS:
        raise ValueError(f"unknown failpoint {name!r}; known: {', '.join(STORAGE_FAILPOINTS)}")
    allowed = STORAGE_FAILPOINTS[name]
    ok = action.isdigit() if allowed is None else action in allowed
    if not ok:
        want = "a number" if allowed is None else " | ".join(sorted(allowed))
        raise ValueError(f"failpoint {name}: action {action!r} is not {want}")


def injected_error(action: str, name: str) -> OSError:
    """The OSError that failpoint ``name`` raises for ``action`` (``eio``, ...)."""
    code = _INJECTED_ERRNOS[action]
    return OSError(code, f"{os.strerror(code)} (failpoint {name})")


def maybe_exit(failpoints: Failpoints, name: str) -> None:
    """End the process at once, as a crash would, if ``name`` is set to ``exit``."""
    if failpoints.take(name) == "exit":
        os._exit(FAILPOINT_EXIT_CODE)
