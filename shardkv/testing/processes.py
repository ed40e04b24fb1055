"""Real ``twistd`` processes: start on free ports, poll, kill, restart.

Shared by the tests and the benchmark (bench/run.py), so neither carries its
own copy of free ports, process sets and readiness waits. Everything here is
synchronous (``subprocess``, and L{shardkv.client.blocking} for HTTP, which
runs on a private reactor thread), so it works from plain pytest functions,
trial's SynchronousTestCase and scripts. In a pytest-twisted test a blocking
call stalls the global reactor; that is harmless when every server is its
own process, otherwise wrap the call in ``deferToThread``. No pytest here:
the tests' fixture glue (``process_set``) lives in tests/system/procs.py.

Typical use, with the tests' fixture helper that always cleans up::

    @pytest.fixture
    def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessSet]:
        yield from process_set(request, tmp_path)

    def test_something(procs: ProcessSet, tmp_path: Path) -> None:
        node = procs.start_node(None, tmp_path / "n1")          # free port, waits healthy
        proxy = procs.start_proxy(None, [node])
        assert request("GET", proxy.url + "/health").status == 200  # shardkv.client.blocking
        node.kill()                                            # SIGKILL, waits for exit
        node.restart()                                         # same argv, waits healthy

Every process is started in its own session, logs to ``<root>/<name>.log``
(twistd's ``--logfile``) and ``<root>/<name>.out`` (stdout and stderr, where
usage errors and early tracebacks go), and is stopped by pid when the set is
closed. When a test fails, the tail of every log is printed with the failure.
No helper ever sleeps to synchronise: waits poll a condition until a deadline.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shardkv.client.api import Reply
from shardkv.client.blocking import request
from shardkv.testing.polling import HOST, ProcessError, free_port, poll_until, wait_healthy

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
"""The venv's twistd: the same interpreter and installed plugins as the tests."""

STARTUP_DEADLINE = 15.0
"""Seconds a server gets to answer its health check (generous: CI boxes are slow)."""
STOP_DEADLINE = 5.0
"""Seconds a server gets to exit after SIGTERM before it is killed."""
TAIL_LINES = 40


# -- processes -------------------------------------------------------------------

_live: weakref.WeakSet[Proc] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    """Last resort if a test run is interrupted before its finalizers ran."""
    for proc in list(_live):
        proc.kill(signal.SIGKILL, wait=False)


@dataclass(eq=False)
class Proc:
    """One server process: its command line, its logs and, once started, its pid.

    ``url`` is ``http://127.0.0.1:<port>`` for servers on a known port; it is
    what L{wait_healthy} and L{restart} poll (``<url>/health``).
    """

    name: str
    args: list[str]
    log_path: Path
    out_path: Path
    cwd: Path
    port: int | None = None
    env: Mapping[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    starts: int = 0

    @property
    def url(self) -> str:
        if self.port is None:
            raise ValueError(f"{self.name} has no known port")
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise ProcessError(f"{self.name} was never started")
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> Proc:
        """Start the process (again, after it exited). Does not wait for it."""
        if self.running:
            raise ProcessError(f"{self.name} is already running as pid {self.pid}")
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with self.out_path.open("ab") as out:
            out.write(f"--- start #{self.starts + 1}: {' '.join(self.args)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.args,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        _live.add(self)
        return self

    def check_running(self) -> None:
        """Raise L{ProcessError} with the log tail if the process has exited."""
        code = self.returncode
        if code is not None:
            raise ProcessError(f"{self.name} exited with status {code}\n{self.tail()}")

    def wait_healthy(
        self, deadline: float = STARTUP_DEADLINE, ready: Callable[[Reply], bool] | None = None
    ) -> Reply:
        """Poll ``<url>/health`` until it answers 200; fail early if the process exits."""
        return wait_healthy(self.url + "/health", deadline, ready=ready, alive=self.check_running)

    def wait_sees_up(self, nodes: Iterable[Proc | str | int], deadline: float = 10.0) -> None:
        """For a proxy: poll its ``/cluster`` until it shows every one of ``nodes`` up.

        A proxy started beside its nodes may have checked a node before that
        node listened, and marked it down until its next check; a test that
        sends data right after ``wait_healthy`` would then get 503s.
        """
        want = {_node_address(n) for n in nodes}

        def all_up() -> bool:
            reply = request("GET", self.url + "/cluster")
            if reply.status != 200:
                return False
            up = {n["node"] for n in reply.json()["nodes"] if n["health"]["status"] == "up"}
            return want <= up

        poll_until(
            all_up, deadline, f"{self.name} to see {sorted(want)} up", alive=self.check_running
        )

    def wait(self, deadline: float = STOP_DEADLINE) -> int:
        """Wait for the process to exit; its status (negative: killed by that signal)."""
        if self.popen is None:
            raise ProcessError(f"{self.name} was never started")
        try:
            return self.popen.wait(deadline)
        except subprocess.TimeoutExpired:
            raise ProcessError(
                f"{self.name} (pid {self.pid}) did not exit within {deadline:g} s\n{self.tail()}"
            ) from None

    def kill(self, sig: int = signal.SIGKILL, wait: bool = True) -> None:
        """Send ``sig`` to this process (by pid); for SIGKILL, SIGTERM and SIGINT,
        wait until it has exited unless ``wait`` is False. Does nothing if it is
        not running. SIGSTOP / SIGCONT pause and resume it.
        """
        if not self.running:
            return
        assert self.popen is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, sig)
        if wait and sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            self.wait(STOP_DEADLINE if sig != signal.SIGKILL else 10.0)
        if sig == signal.SIGKILL and not self.running:
            _live.discard(self)

    def stop(self, deadline: float = STOP_DEADLINE) -> int | None:
        """Stop gracefully (SIGTERM), or kill it if it has not exited by ``deadline``."""
        if self.popen is None:
            return None
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGCONT)  # in case a test paused it
                os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(deadline)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
        _live.discard(self)
        return self.popen.poll()

    def restart(self, deadline: float = STARTUP_DEADLINE, wait: bool = True) -> Proc:
        """Stop the process if it still runs, start it with the same arguments and,
        when it has a port, wait until it is healthy again.
        """
        self.stop()
        self.start()
        if wait and self.port is not None:
            self.wait_healthy(deadline)
        return self

    def tail(self, lines: int = TAIL_LINES) -> str:
        """The last lines of this process's twistd log and of its stdout/stderr."""
        parts = []
        for path in (self.log_path, self.out_path):
            try:
                text = path.read_text("utf-8", "replace")
            except FileNotFoundError:
                continue
            last = text.splitlines()[-lines:]
            parts.append(f"---- {path} (last {len(last)} lines) ----\n" + "\n".join(last))
        return "\n".join(parts) or f"(no logs for {self.name})"


def twistd_args(subcommand: str, *args: str, log_path: Path, pidfile: str | None = "") -> list[str]:
    """``twistd -n [--pidfile=] --logfile=<log> shardkv <subcommand> <args>``.

    ``pidfile=None`` leaves twistd's pidfile option out entirely (as a user
    typing ``twistd -n shardkv node`` would).
    """
    argv = [TWISTD, "-n"]
    if pidfile is not None:
        argv.append(f"--pidfile={pidfile}")
    argv.append(f"--logfile={log_path}")
    return [*argv, "shardkv", subcommand, *args]


def _node_address(node: Proc | str | int) -> str:
    if isinstance(node, Proc):
        if node.port is None:
            raise ValueError(f"{node.name} has no known port")
        return f"{HOST}:{node.port}"
    if isinstance(node, int):
        return f"{HOST}:{node}"
    return node


class ProcessSet:
    """Processes started for one test, all stopped by L{close}.

    Logs go to ``root``; processes run with ``root`` as their working directory
    unless told otherwise, so relative paths (twistd.pid, ./shardkv-data) land
    there and never in the repository.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[Proc] = []

    def _unique(self, name: str) -> str:
        taken = {p.name for p in self.procs}
        if name not in taken:
            return name
        n = 2
        while f"{name}-{n}" in taken:
            n += 1
        return f"{name}-{n}"

    def start(
        self,
        name: str,
        subcommand: str,
        *args: str,
        port: int | None = None,
        cwd: Path | None = None,
        pidfile: str | None = "",
        env: Mapping[str, str] | None = None,
        wait: bool = True,
        deadline: float = STARTUP_DEADLINE,
    ) -> Proc:
        """Start ``twistd -n shardkv <subcommand> <args>`` and (with a port) wait for health.

        Give the port in ``args`` yourself and pass it as ``port`` so that the
        process has a URL; the ``start_*`` helpers do both.
        """
        name = self._unique(name)
        log_path = self.root / f"{name}.log"
        proc = Proc(
            name=name,
            args=twistd_args(subcommand, *args, log_path=log_path, pidfile=pidfile),
            log_path=log_path,
            out_path=self.root / f"{name}.out",
            cwd=cwd or self.root,
            port=port,
            env=env,
        )
        self.procs.append(proc)
        proc.start()
        if wait and port is not None:
            proc.wait_healthy(deadline)
        return proc

    def _start_on_port(
        self,
        name: str,
        subcommand: str,
        port: int | None,
        build: Callable[[int], list[str]],
        wait: bool,
        deadline: float,
    ) -> Proc:
        """Start a server; on an automatic port, retry elsewhere if the port was taken."""
        attempts = 3 if port is None else 1
        for attempt in range(attempts):
            chosen = free_port() if port is None else port
            proc = self.start(
                name, subcommand, *build(chosen), port=chosen, wait=False, deadline=deadline
            )
            if not wait:
                return proc
            try:
                proc.wait_healthy(deadline)
            except ProcessError:
                if attempt + 1 < attempts and "Address already in use" in proc.tail():
                    proc.stop()
                    self.procs.remove(proc)
                    continue
                raise
            return proc
        raise AssertionError("unreachable")

    def start_node(
        self,
        port: int | None,
        data_dir: str | Path | None,
        *extra: str,
        name: str = "node",
        wait: bool = True,
        deadline: float = STARTUP_DEADLINE,
    ) -> Proc:
        """``twistd shardkv node --port PORT [--data-dir DIR] <extra>``.

        ``port=None`` picks a free port. ``data_dir=None`` leaves --data-dir out
        (pass ``"--storage", "memory"`` in ``extra`` for a node without disk).
        """

        def build(p: int) -> list[str]:
            argv = ["--port", str(p)]
            if data_dir is not None:
                argv += ["--data-dir", str(data_dir)]
            return [*argv, *extra]

        return self._start_on_port(name, "node", port, build, wait, deadline)

    def start_proxy(
        self,
        port: int | None,
        nodes: Iterable[Proc | str | int],
        *extra: str,
        name: str = "proxy",
        wait: bool = True,
        deadline: float = STARTUP_DEADLINE,
    ) -> Proc:
        """``twistd shardkv proxy --port PORT --nodes a,b,c <extra>``.

        ``nodes`` may be Procs, ``host:port[=weight]`` strings or bare ports.
        """
        node_list = ",".join(_node_address(n) for n in nodes)

        def build(p: int) -> list[str]:
            return ["--port", str(p), "--nodes", node_list, *extra]

        return self._start_on_port(name, "proxy", port, build, wait, deadline)

    def start_cluster(
        self,
        port: int | None,
        node_ports: Sequence[int],
        *extra: str,
        name: str = "cluster",
        wait: bool = True,
        deadline: float = STARTUP_DEADLINE,
    ) -> Proc:
        """``twistd shardkv cluster --port PORT --node-ports a,b,c <extra>`` (one process)."""
        ports = ",".join(map(str, node_ports))

        def build(p: int) -> list[str]:
            return ["--port", str(p), "--node-ports", ports, *extra]

        return self._start_on_port(name, "cluster", port, build, wait, deadline)

    def close(self, deadline: float = STOP_DEADLINE) -> None:
        """Stop every process this set started: SIGTERM to all of them at once, then
        SIGKILL to any still running ``deadline`` seconds later. Idempotent.
        """
        running = [p for p in reversed(self.procs) if p.running]
        for proc in running:
            assert proc.popen is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.popen.pid, signal.SIGCONT)  # in case a test paused it
                os.kill(proc.popen.pid, signal.SIGTERM)
        end = time.monotonic() + deadline
        for proc in running:
            proc.stop(max(0.1, end - time.monotonic()))
        for proc in self.procs:
            _live.discard(proc)

    def report(self, lines: int = TAIL_LINES) -> str:
        """The log tails of every process, for a failure report."""
        return "\n".join(
            f"==== {p.name} (pid {p.popen.pid if p.popen else '-'}, "
            f"status {p.returncode}) ====\n{p.tail(lines)}"
            for p in self.procs
        )
