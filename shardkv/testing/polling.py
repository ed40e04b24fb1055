"""Waiting without sleeping to synchronise: free ports, and polling a condition until a deadline.

Shared by the process helpers (L{shardkv.testing.processes}), the tests and
the benchmark.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

from shardkv.client.api import Reply
from shardkv.client.blocking import request

T = TypeVar("T")

HOST = "127.0.0.1"
POLL_INTERVAL = 0.05


class ProcessError(AssertionError):
    """A process did not start, exited early, or a wait ran past its deadline."""


# -- ports ---------------------------------------------------------------------

_handed_out: set[int] = set()
RESERVED_PORTS = frozenset(range(8080, 8084))
"""``make run``'s cluster: never collide with one a developer has running."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    The port is released before it is returned, so another program could take
    it first; L{ProcessSet} retries with a new port when a server it placed on
    an automatic port fails with "Address already in use". The same port is
    never handed out twice in one process, nor one of 8080-8083.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out and port not in RESERVED_PORTS:
            _handed_out.add(port)
            return port
    raise ProcessError("could not find a free port")


def poll_until(
    check: Callable[[], T | None],
    deadline: float,
    what: str,
    *,
    interval: float = POLL_INTERVAL,
    alive: Callable[[], None] | None = None,
) -> T:
    """Call ``check`` until it returns something truthy; return that.

    ``deadline`` is in seconds from now. ``check`` may raise ``OSError`` (no
    HTTP answer), ``ValueError`` (an unreadable one) or ``AssertionError``
    while the condition does not hold yet; the last one is reported if the
    deadline passes. ``alive`` is called before each attempt and may raise to
    stop waiting early (a process that exited).
    """
    end = time.monotonic() + deadline
    last: object = None
    while True:
        if alive is not None:
            alive()
        try:
            result = check()
        except (OSError, AssertionError, ValueError) as e:
            last = e
        else:
            if result:
                return result
            last = result
        if time.monotonic() >= end:
            raise ProcessError(f"timed out after {deadline:g} s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def wait_healthy(
    url: str,
    deadline: float,
    *,
    ready: Callable[[Reply], bool] | None = None,
    alive: Callable[[], None] | None = None,
) -> Reply:
    """Poll ``GET url`` until it answers 200 (and ``ready(reply)`` holds).

    ``deadline`` is in seconds from now. ``alive`` may raise to stop at once
    (the process that should answer has exited).
    """

    def check() -> Reply | None:
        reply = request("GET", url, timeout=min(2.0, deadline))
        if reply.status == 200 and (ready is None or ready(reply)):
            return reply
        raise AssertionError(f"not ready: {reply}")

    return poll_until(check, deadline, f"{url} to be healthy", alive=alive)
