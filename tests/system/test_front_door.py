"""The connection cap and the open-file limit, with a real ``twistd`` node.

The node starts the way a stock Linux box starts it, with a soft
``RLIMIT_NOFILE`` of 1024, and with its default ``--max-connections`` of
1024. The test (whose own limit is raised to hold the sockets) opens 1,100
idle connections. Before the cap, the node hit EMFILE at about 1,009
descriptors and stopped accepting anyone: the connections past that sat in
the kernel's backlog unanswered. Now the node raises its soft limit to fit
the cap plus headroom, closes the 76 past the cap at once, and serves a new
client as soon as old ones hang up.
"""

from __future__ import annotations

import contextlib
import resource
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardkv.testing.polling import HOST, poll_until
from shardkv.testing.processes import ProcessSet
from tests.system.procs import process_set

pytestmark = pytest.mark.slow

NODE_SOFT_LIMIT = 1024
CLIENTS = 1100
DEFAULT_CAP = 1024


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessSet]:
    yield from process_set(request, tmp_path)


@contextlib.contextmanager
def soft_file_limit(soft: int) -> Iterator[None]:
    """Run the block with this process's soft open-file limit at ``soft`` (children inherit it)."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def file_limits(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc/PID/limits")


def fresh_health(port: int, timeout: float = 2.0) -> int | None:
    """C{GET /health} on a new connection: its status, or None if closed unanswered.

    Raises TimeoutError if nothing at all happens within ``timeout`` (the
    connection waits in the backlog of a process that cannot accept).
    """
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        try:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        except OSError:
            return None
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        return int(data.split()[1]) if data else None


def test_default_cap_keeps_the_node_out_of_emfile(procs: ProcessSet) -> None:
    """
    If a node started with a soft open-file limit of 1024 gets 1,100 idle
    connections, then it has raised its limit above its cap plus headroom,
    it holds 1,024 of them and closes the rest at once, a new client is
    closed at once too (not left hanging in the backlog), a new client is
    served once 100 of the idle ones hang up, and the log has no EMFILE.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = CLIENTS + 256
    if hard != resource.RLIM_INFINITY and hard < max(wanted, DEFAULT_CAP + 512):
        pytest.skip(f"the hard open-file limit ({hard}) is too low for this test")
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    sockets: list[socket.socket] = []
    try:
        with soft_file_limit(NODE_SOFT_LIMIT):
            node = procs.start_node(
                None, None, "--storage", "memory", "--header-timeout", "120", wait=False
            )
        port = node.port
        assert port is not None
        node.wait_healthy()
        node_soft, _ = file_limits(node.pid)
        assert node_soft >= DEFAULT_CAP + 64, f"the node's soft limit stayed at {node_soft}"

        for _ in range(CLIENTS):
            sockets.append(socket.create_connection((HOST, port), timeout=5))

        poller = select.poll()
        by_fd = {s.fileno(): i for i, s in enumerate(sockets)}
        for s in sockets:
            poller.register(s, select.POLLIN)
        closed: list[int] = []
        answered: list[bytes] = []

        def extra_closed() -> list[int] | None:
            for fd, _ in poller.poll(200):
                poller.unregister(fd)
                s = sockets[by_fd[fd]]
                with contextlib.suppress(ConnectionResetError):
                    if data := s.recv(100):
                        answered.append(data)
                closed.append(by_fd[fd])
            return closed if len(closed) >= CLIENTS - DEFAULT_CAP else None

        poll_until(extra_closed, 10.0, "the connections past the cap closed")
        assert answered == [], "a turned-away connection was sent something"
        # The health checks' own kept-alive connection may hold one place.
        assert CLIENTS - DEFAULT_CAP <= len(closed) <= CLIENTS - DEFAULT_CAP + 1, len(closed)
        assert min(closed) >= DEFAULT_CAP - 1, closed[:10]

        started = time.monotonic()
        assert fresh_health(port) is None
        assert time.monotonic() - started < 1.0

        for s in sockets[:100]:
            s.close()
        status = poll_until(lambda: fresh_health(port), 5.0, "a fresh /health answered")
        assert status == 200
        log = node.log_path.read_text()
        assert "Too many open files" not in log and "EMFILE" not in log
    finally:
        for s in sockets:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
