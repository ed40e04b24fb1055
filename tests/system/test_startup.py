"""Start-up mistakes, with real ``twistd`` processes: a port that is already taken.

A plain socket of the test holds a port of 127.0.0.1, and ``twistd -n shardkv
node | proxy | cluster`` is started on it, as a user would type it (the log on
the terminal) and with ``--logfile``. Each must exit non-zero within
L{EXIT_DEADLINE} with exactly one line naming the port on its terminal output
and no traceback. A cluster with one taken node port must start nothing: no
data directory created (so none locked), no port after the taken one asked
for, every other port free once it has exited, and no connection ever made to
whatever holds the taken port.
"""

from __future__ import annotations

import re
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shardkv.testing.polling import HOST, ProcessError, free_port
from shardkv.testing.processes import twistd_args

pytestmark = pytest.mark.slow

EXIT_DEADLINE = 10.0
"""Seconds a process on a taken port gets to exit (it imports Twisted first; CI is slow)."""


@dataclass(frozen=True)
class Exited:
    code: int
    seconds: float
    terminal: str
    """stdout and stderr together: what the operator saw."""
    log: str
    """The twistd log file, when there was one."""


def run_to_exit(tmp_path: Path, subcommand: str, *args: str, log_file: bool) -> Exited:
    """Run ``twistd -n shardkv <subcommand> <args>`` that is expected to exit by itself.

    With ``log_file`` false the command is the README's (no ``--logfile``), so
    twistd logs to the terminal too.
    """
    log_path = tmp_path / f"{subcommand}.log"
    argv = twistd_args(subcommand, *args, log_path=log_path)
    if not log_file:
        argv = [a for a in argv if not a.startswith("--logfile=")]
    started = time.monotonic()
    try:
        done = subprocess.run(
            argv, cwd=tmp_path, capture_output=True, text=True, timeout=EXIT_DEADLINE
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise ProcessError(
            f"{subcommand} still ran after {EXIT_DEADLINE} s on a taken port:\n{out}"
        ) from None
    seconds = time.monotonic() - started
    log = log_path.read_text("utf-8", "replace") if log_path.exists() else ""
    return Exited(done.returncode, seconds, done.stdout + done.stderr, log)


@pytest.fixture
def held() -> Iterator[tuple[int, socket.socket]]:
    """A port of 127.0.0.1 that a plain listening socket of the test holds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, free_port()))
        s.listen()
        yield int(s.getsockname()[1]), s


def naming(text: str, port: int) -> list[str]:
    return [line for line in text.splitlines() if re.search(rf"\b{port}\b", line)]


def is_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port now (a server could bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            s.listen()
        except OSError:
            return False
        return True


def no_connection_reached(holder: socket.socket) -> bool:
    """Nobody connected to the holder's socket (its accept queue is empty)."""
    readable, _, _ = select.select([holder], [], [], 0)
    return not readable


def check_refused(exited: Exited, port: int, log_file: bool) -> str:
    """The one line naming ``port``; asserts the exit, the count, and no traceback."""
    everything = exited.terminal + exited.log
    assert exited.code != 0, everything
    assert exited.seconds < EXIT_DEADLINE
    assert "Traceback" not in everything and "Unhandled" not in everything, everything
    lines = naming(exited.terminal, port)
    assert len(lines) == 1, f"expected one line naming {port} on the terminal:\n{everything}"
    expected = (
        f"cannot listen on port {port} of 127.0.0.1 (tcp:{port}:interface=127.0.0.1:backlog=1024)"
    )
    assert expected in lines[0] and "Address already in use" in lines[0], lines
    if log_file:
        assert [expected in line for line in naming(exited.log, port)] == [True], exited.log
    return lines[0]


MODES = [pytest.param(False, id="log-on-terminal"), pytest.param(True, id="log-file")]


@pytest.mark.parametrize("log_file", MODES)
def test_node_on_a_taken_port_exits_with_one_line(
    tmp_path: Path, held: tuple[int, socket.socket], log_file: bool
) -> None:
    port, holder = held
    exited = run_to_exit(
        tmp_path, "node", "--port", str(port), "--data-dir", "data", log_file=log_file
    )
    line = check_refused(exited, port, log_file)
    assert line.lstrip().endswith(
        "shardkv: cannot start the node: "
        f"cannot listen on port {port} of 127.0.0.1 (tcp:{port}:interface=127.0.0.1:backlog=1024): "
        "Address already in use (another process holds it)"
    )
    assert not (tmp_path / "data").exists(), "the node opened no data directory"
    assert no_connection_reached(holder)
    print(f"\nnode: exit {exited.code} after {exited.seconds:.2f} s: {line.strip()}")


@pytest.mark.parametrize("log_file", MODES)
def test_proxy_on_a_taken_port_exits_with_one_line(
    tmp_path: Path, held: tuple[int, socket.socket], log_file: bool
) -> None:
    port, holder = held
    exited = run_to_exit(tmp_path, "proxy", "--port", str(port), log_file=log_file)
    line = check_refused(exited, port, log_file)
    assert "shardkv: cannot start the proxy: " in line
    assert no_connection_reached(holder)
    print(f"\nproxy: exit {exited.code} after {exited.seconds:.2f} s: {line.strip()}")


@pytest.mark.parametrize("log_file", MODES)
def test_cluster_with_a_taken_node_port_starts_nothing(
    tmp_path: Path, held: tuple[int, socket.socket], log_file: bool
) -> None:
    taken, holder = held
    first, last, proxy = free_port(), free_port(), free_port()
    exited = run_to_exit(
        tmp_path,
        "cluster",
        "--port",
        str(proxy),
        "--node-ports",
        f"{first},{taken},{last}",
        log_file=log_file,
    )
    line = check_refused(exited, taken, log_file)
    assert "shardkv: cannot start the node: " in line
    everything = exited.terminal + exited.log
    assert not naming(everything, last) and not naming(everything, proxy), (
        "the ports after the taken one were never asked for"
    )
    assert all(is_free(p) for p in (first, last, proxy)), "nothing is left listening"
    assert not (tmp_path / "shardkv-data").exists(), "no node created or locked its data"
    assert no_connection_reached(holder), "nothing was sent to whatever holds the port"
    print(f"\ncluster: exit {exited.code} after {exited.seconds:.2f} s: {line.strip()}")
