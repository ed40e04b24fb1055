"""L{shardkv.testing.processes}: real ``twistd`` servers, started, killed, restarted, stopped.

The system tests and the benchmark rely on these helpers to start a server
and wait until it answers, to kill it hard and bring it back on the same
port, to fail fast (with the log) when a server cannot start, and to leave
no process behind. Each test starts one or two memory nodes, a second or so
each.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardkv.client.blocking import NotSent, request
from shardkv.testing.polling import RESERVED_PORTS, ProcessError, free_port
from shardkv.testing.processes import TWISTD, Proc, ProcessSet, twistd_args
from tests.system.procs import process_set

pytestmark = pytest.mark.slow

MEMORY = ("--storage", "memory")


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessSet]:
    yield from process_set(request, tmp_path)


def health(proc: Proc) -> int:
    return request("GET", proc.url + "/health", timeout=5).status


def test_start_node_waits_until_it_answers_health(procs: ProcessSet, tmp_path: Path) -> None:
    """On the port given, with its logs and working directory under the set's root.
    (The other tests leave the port to the set, which picks a free one.)"""
    port = free_port()
    node = procs.start_node(port, None, *MEMORY)
    assert node.running
    assert node.port == port
    reply = request("GET", node.url + "/health")
    assert reply.status == 200, reply
    assert reply.json()["role"] == "node"
    assert node.args == twistd_args(
        "node", "--port", str(node.port), *MEMORY, log_path=tmp_path / "node.log"
    )
    assert (node.cwd, node.log_path.exists(), node.starts) == (tmp_path, True, 1)
    with pytest.raises(ProcessError, match="already running"):
        node.start()


def test_kill_leaves_it_stopped_and_restart_brings_it_back_on_the_same_port(
    procs: ProcessSet,
) -> None:
    node = procs.start_node(None, None, *MEMORY)
    port, pid = node.port, node.pid
    assert port is not None and port not in RESERVED_PORTS
    node.kill()
    assert not node.running
    assert node.returncode == -signal.SIGKILL
    with pytest.raises(NotSent):
        health(node)

    node.restart()
    assert node.running
    assert (node.port, node.starts) == (port, 2)
    assert node.pid != pid
    assert health(node) == 200


def test_a_server_that_exits_early_fails_at_once_with_its_log(procs: ProcessSet) -> None:
    """A usage error ends the wait as soon as twistd exits, not at the deadline,
    and the error names the process and shows what it printed."""
    with pytest.raises(ProcessError) as caught:
        procs.start_node(None, None, *MEMORY, "--no-such-option", deadline=60)
    message = str(caught.value)
    assert "node exited with status" in message
    assert "option --no-such-option not recognized" in message  # twistd's usage error
    assert "node.out" in message
    [node] = procs.procs
    assert not node.running and node.returncode != 0


def test_close_stops_every_process_and_can_run_again(procs: ProcessSet) -> None:
    first = procs.start_node(None, None, *MEMORY)
    second = procs.start_node(None, None, *MEMORY)
    assert (first.name, second.name) == ("node", "node-2")
    assert first.port != second.port
    procs.close()
    assert not first.running and not second.running
    for proc in (first, second):
        with pytest.raises(NotSent):
            health(proc)
    procs.close()


def test_twistd_args_shape(tmp_path: Path) -> None:
    log = tmp_path / "n.log"
    assert twistd_args("node", "--port", "1", log_path=log) == [
        TWISTD,
        "-n",
        "--pidfile=",
        f"--logfile={log}",
        "shardkv",
        "node",
        "--port",
        "1",
    ]
    assert twistd_args("proxy", log_path=log, pidfile=None) == [
        TWISTD,
        "-n",
        f"--logfile={log}",
        "shardkv",
        "proxy",
    ]
    assert twistd_args("node", log_path=log, pidfile="x.pid")[2] == "--pidfile=x.pid"
    assert Path(TWISTD).name == "twistd" and Path(TWISTD).exists()


def test_a_proc_never_started_has_no_pid_and_one_without_a_port_no_url(tmp_path: Path) -> None:
    proc = Proc("p", ["true"], tmp_path / "p.log", tmp_path / "p.out", tmp_path)
    with pytest.raises(ProcessError, match="never started"):
        proc.pid  # noqa: B018
    with pytest.raises(ValueError, match="no known port"):
        proc.url  # noqa: B018
    assert (proc.running, proc.returncode, proc.stop()) == (False, None, None)
