"""``twistd -n shardkv proxy --workers 2`` as real processes against real nodes.

Each test starts memory nodes and a proxy with two workers on free ports,
finds the workers as the parent's child processes (``/proc``), and tells them
apart by the ``X-Shardkv-Worker`` header of their answers. Many connections
are opened at once so that the kernel hands some to each worker; every wait
polls with a deadline.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardkv.testing.polling import HOST, free_port, poll_until
from shardkv.testing.processes import Proc, ProcessSet
from tests.system.procs import process_set
from tests.tlscerts import CA

pytestmark = pytest.mark.slow

DEADLINE = 20.0
CONNECTIONS = 8


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessSet]:
    yield from process_set(request, tmp_path)


@pytest.fixture
def reaper() -> Iterator[set[int]]:
    """Pids of workers seen by a test; any still alive at the end is killed."""
    pids: set[int] = set()
    yield pids
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


# -- processes ------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a parent to reap it)."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and fields[1] == str(pid) and fields[0] not in ("Z", "X"):
                found.add(int(entry))
    return found


def workers_of(proxy: Proc, reaper: set[int], count: int = 2) -> set[int]:
    """The pids of the proxy's ``count`` workers, once that many run."""

    def check() -> set[int] | None:
        found = children(proxy.pid)
        assert len(found) == count, found
        return found

    pids = poll_until(check, DEADLINE, f"{count} workers", alive=proxy.check_running)
    reaper.update(pids)
    return pids


def start(procs: ProcessSet, *extra: str, nodes: int = 1) -> Proc:
    started = [procs.start_node(None, None, "--storage", "memory") for _ in range(nodes)]
    return procs.start_proxy(
        None, started, "--workers", "2", "--replicas", "1", "--r", "1", "--w", "1", *extra
    )


# -- requests, each on a connection of its own ------------------------------------------


def _connection(port: int, context: ssl.SSLContext | None) -> http.client.HTTPConnection:
    if context is None:
        return http.client.HTTPConnection(HOST, port, timeout=5)
    return http.client.HTTPSConnection(HOST, port, timeout=5, context=context)


def answers(
    port: int,
    method: str = "GET",
    path: str = "/health",
    body: bytes | None = None,
    context: ssl.SSLContext | None = None,
    connections: int = CONNECTIONS,
) -> list[tuple[str, int, bytes]]:
    """(worker, status, body) of one request on each of ``connections`` connections,
    all connected before any request is sent, so that both workers get some."""
    opened = [_connection(port, context) for _ in range(connections)]
    try:
        for conn in opened:
            conn.connect()
        for conn in opened:
            conn.request(method, path, body=body)
        result = []
        for conn in opened:
            response = conn.getresponse()
            result.append(
                (response.getheader("X-Shardkv-Worker", ""), response.status, response.read())
            )
        return result
    finally:
        for conn in opened:
            conn.close()


def every_worker_answers(
    port: int | None,
    path: str = "/health",
    *,
    context: ssl.SSLContext | None = None,
    connections: int = CONNECTIONS,
) -> dict[str, list[tuple[int, bytes]]]:
    """Poll until both workers have answered GET ``path``; what each answered."""
    assert port is not None
    want = {"0", "1"}
    seen: dict[str, list[tuple[int, bytes]]] = {}

    def check() -> bool:
        for worker, status, body in answers(
            port, path=path, context=context, connections=connections
        ):
            seen.setdefault(worker, []).append((status, body))
        assert set(seen) >= want, sorted(seen)
        return True

    poll_until(check, DEADLINE, f"answers from workers {sorted(want)}")
    return seen


def metrics_epochs(port: int) -> dict[str, float]:
    """shardkv_map_epoch by worker, from one /metrics answer (whichever worker gives it)."""
    ((_, status, body),) = answers(port, path="/metrics", connections=1)
    assert status == 200
    epochs = {}
    for line in body.decode().splitlines():
        if line.startswith("shardkv_map_epoch{"):
            labels, value = line.split(" ")
            epochs[labels.split('worker="')[1].split('"')[0]] = float(value)
    return epochs


def refused(port: int | None) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# -- the tests ------------------------------------------------------------------------------


def test_every_worker_serves_the_same_map_and_data(procs: ProcessSet, reaper: set[int]) -> None:
    """
    If the proxy runs two workers, then both answer on its one port, each
    naming itself; a value written through one is read through both; and
    /metrics, from whichever worker answers, shows both at the same map epoch.
    """
    proxy = start(procs)
    workers_of(proxy, reaper)
    port = proxy.port
    assert port is not None
    every_worker_answers(port)
    ((_, status, _),) = answers(port, "PUT", "/kv/shared", b"one value", connections=1)
    assert status == 201
    reads = every_worker_answers(port, path="/kv/shared")
    assert all(answer == (200, b"one value") for got in reads.values() for answer in got)

    def same_epoch() -> bool:
        epochs = metrics_epochs(port)
        assert set(epochs) == {"0", "1"}, epochs
        assert epochs["0"] == epochs["1"] >= 1, epochs
        return True

    poll_until(same_epoch, DEADLINE, "both workers at the same epoch in /metrics")


def test_a_membership_change_through_the_workers(
    procs: ProcessSet, reaper: set[int], tmp_path: Path
) -> None:
    """
    If a plan is staged through the proxy, then every worker shows it (worker 0
    keeps it); a commit through the proxy moves the data; and /admin/rebalance
    from both workers reaches idle at the new epoch, which both serve.
    """
    proxy = start(procs)
    workers_of(proxy, reaper)
    port = proxy.port
    assert port is not None
    every_worker_answers(port)
    for i in range(20):
        ((_, status, _),) = answers(port, "PUT", f"/kv/k{i}", b"v", connections=1)
        assert status == 201
    new = procs.start_node(None, None, "--storage", "memory")
    change = json.dumps({"add": [{"address": f"{HOST}:{new.port}"}]}).encode()
    ((_, status, body),) = answers(port, "POST", "/admin/plan", change, connections=1)
    assert status == 200, body
    base = json.loads(body)["base_epoch"]
    staged = every_worker_answers(port, path="/admin/plan")
    assert all(status == 200 for got in staged.values() for status, _ in got), staged
    ((_, status, body),) = answers(port, "POST", "/admin/commit", connections=1)
    assert status == 200, body

    def idle() -> bool:
        seen = every_worker_answers(port, path="/admin/rebalance", connections=4)
        for got in seen.values():
            for status, body in got:
                assert status == 200
                state = json.loads(body)
                assert state["state"] == "idle" and state["epoch"] > base, state
        return True

    poll_until(idle, 60.0, "the move to be idle through both workers")

    def new_epoch() -> bool:
        epochs = metrics_epochs(port)
        assert set(epochs) == {"0", "1"} and min(epochs.values()) > base, epochs
        return True

    poll_until(new_epoch, DEADLINE, "both workers at the new epoch")
    for i in range(20):
        ((_, status, body),) = answers(port, "GET", f"/kv/k{i}", connections=1)
        assert (status, body) == (200, b"v")


def test_sigterm_to_the_parent_stops_every_worker(procs: ProcessSet, reaper: set[int]) -> None:
    """
    If the parent gets SIGTERM, then it exits (by that signal, as twistd does)
    once every worker has exited, and the port is closed.
    """
    proxy = start(procs)
    pids = workers_of(proxy, reaper)
    every_worker_answers(proxy.port)
    proxy.kill(signal.SIGTERM)
    assert proxy.returncode == -signal.SIGTERM
    assert [pid for pid in pids if alive(pid)] == []
    assert refused(proxy.port)
    assert "stopping 2 proxy workers" in proxy.log_path.read_text()


def test_a_killed_worker_is_started_again(procs: ProcessSet, reaper: set[int]) -> None:
    """
    If a worker is killed with SIGKILL, then the parent logs it and starts a new
    worker in its place, and both workers serve again.
    """
    proxy = start(procs)
    pids = workers_of(proxy, reaper)
    port = proxy.port
    assert port is not None
    every_worker_answers(port)
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)

    def replaced() -> set[int]:
        now = children(proxy.pid)
        assert len(now) == 2 and victim not in now, now
        return now

    reaper.update(poll_until(replaced, DEADLINE, "a new worker", alive=proxy.check_running))
    every_worker_answers(port)
    log = proxy.log_path.read_text()
    assert f"(pid {victim}) exited unexpectedly (killed by SIGKILL)" in log


def test_workers_stop_when_the_parent_is_killed(procs: ProcessSet, reaper: set[int]) -> None:
    """
    If the parent is killed with SIGKILL, then the workers notice (their pipe
    from it closes) and exit by themselves, and the port is closed.
    """
    proxy = start(procs)
    pids = workers_of(proxy, reaper)
    every_worker_answers(proxy.port)
    proxy.kill(signal.SIGKILL)

    def gone() -> bool:
        assert [pid for pid in pids if alive(pid)] == []
        return True

    poll_until(gone, DEADLINE, "the orphaned workers to exit")
    assert refused(proxy.port)


def test_workers_share_a_tls_listener(procs: ProcessSet, reaper: set[int], tmp_path: Path) -> None:
    """
    If the proxy listens with TLS (--listen ssl:...) and runs two workers, then
    both workers answer over TLS on that port.
    """
    ca = CA.create(tmp_path / "pki")
    leaf = ca.issue("proxy")
    node = procs.start_node(None, None, "--storage", "memory")
    tls_port = free_port()
    proxy = procs.start_proxy(
        None,
        [node],
        "--workers",
        "2",
        "--replicas",
        "1",
        "--r",
        "1",
        "--w",
        "1",
        "--listen",
        leaf.listen(tls_port),
    )
    workers_of(proxy, reaper)
    context = ssl.create_default_context(cafile=str(ca.pem))
    seen = every_worker_answers(tls_port, context=context)
    assert all(status == 200 for got in seen.values() for status, _ in got)


def test_a_reload_reaches_every_worker(procs: ProcessSet, reaper: set[int], tmp_path: Path) -> None:
    """
    If the config file changes and POST /admin/reload reaches one worker, then
    both workers apply it (each logs its reload); SIGHUP to the parent does the
    same.
    """
    config = tmp_path / "proxy.toml"
    config.write_text("timeout = 2.0\n")
    proxy = start(procs, "--config", str(config))
    workers_of(proxy, reaper)
    every_worker_answers(proxy.port)
    assert proxy.port is not None

    def reloads(worker: int) -> int:
        return sum(
            f"[worker {worker} shardkv.reload#info] reloaded {config}: applied timeout" in line
            for line in proxy.log_path.read_text().splitlines()
        )

    def both(count: int) -> bool:
        assert [reloads(0), reloads(1)] == [count, count]
        return True

    config.write_text("timeout = 1.5\n")
    ((_, status, body),) = answers(proxy.port, "POST", "/admin/reload", connections=1)
    assert status == 200 and json.loads(body)["applied"] == ["timeout"], body
    poll_until(lambda: both(1), DEADLINE, "both workers to reload")
    config.write_text("timeout = 1.0\n")
    proxy.kill(signal.SIGHUP)
    poll_until(lambda: both(2), DEADLINE, "both workers to reload on SIGHUP")
