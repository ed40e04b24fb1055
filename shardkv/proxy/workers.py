"""Several proxy processes on one port: ``twistd -n shardkv proxy --workers N``.

A Python process runs one reactor on one core, and the proxy is CPU-bound, so
it uses more cores the way gunicorn and uwsgi do: with more processes.

- **The parent** (the process twistd runs, L{Supervisor}) listens on every
  endpoint of the command line, so a taken port refuses to start exactly as
  without workers. It never accepts a connection: it stops reading its
  sockets and starts N workers with C{reactor.spawnProcess} (the same
  interpreter, running this module), passing each listening socket as a file
  descriptor (``childFDs``). It restarts a worker that dies, with a backoff,
  and stops them all when it stops.
- **Each worker** (L{worker_main}) is a whole proxy, built by
  L{shardkv.tap.proxy_service} from the same options: its own reactor, node
  client, health checks and L{shardkv.cluster.sync.MapSync}. It serves the
  parent's sockets with C{reactor.adoptStreamPort} (wrapped in TLS for an
  ``ssl:`` endpoint), so the kernel gives each new connection to whichever
  worker accepts it first. The cluster map lives on the nodes, so the
  workers share it by construction. Only socket endpoints can be passed on
  this way: L{shardkv.options} refuses ``--workers`` with any other.
- **Pipes tie them.** The parent writes to each worker's stdin, and reads
  its stdout (log events, as Twisted's JSON, which the parent publishes into
  its own log with the worker's number), its stderr, and fd 3 (control
  messages, one JSON object a line). End of file on stdin means the parent
  is gone, whatever killed it: the worker stops, so no orphan keeps serving.

What a worker answers differs from a lone proxy in three places
(L{WorkerApp}): every answer carries ``X-Shardkv-Worker: i``; ``/metrics``
answers for the whole proxy, every worker's series labelled ``worker="i"``
(each worker listens on a private loopback port that the others scrape, with
a secret the parent hands out); and ``/admin/*`` is served by worker 0,
which keeps the staged plans, since a plan lives in the memory of the process
that made it and the next request may reach another worker. ``POST
/admin/reload`` reloads every worker and the parent. The other views
(``/cluster``, ``/health``, ``/explain``, the dashboard) are those of the
worker that answers.

Messages (each one JSON object and a newline):

- worker -> parent, fd 3: ``{"ready": {"port": P, "pid": PID}}`` once it
  serves (P: its private port); ``{"reload": true}`` after ``POST
  /admin/reload``.
- parent -> worker, stdin: ``{"siblings": {"0": P0, "1": P1, ...}}``, the
  private ports of the workers that serve, whenever that changes.
"""

from __future__ import annotations

import hmac
import importlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectError, ProcessExitedAlready, ReactorNotRunning
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IProtocolFactory
from twisted.internet.protocol import Factory, ProcessProtocol, connectionDone
from twisted.internet.stdio import StandardIO
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    eventFromJSON,
    globalLogBeginner,
    globalLogPublisher,
    jsonFileLogObserver,
)
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.client import RequestNotSent
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

import shardkv
from shardkv.heap import freeze_startup_heap
from shardkv.logs import LEVEL_FILTER, set_level
from shardkv.metrics import CONTENT_TYPE, OTHER_ROUTE, render
from shardkv.proxy.app import ProxyApp
from shardkv.proxy.service import ProxyService, default_app
from shardkv.reload import Reloader, ReloadService
from shardkv.web.auth import GuardedResource, proxy_policy
from shardkv.web.errors import json_body
from shardkv.web.httpclient import HTTPClientService
from shardkv.web.listening import ListeningService, listening_service
from shardkv.web.metricsroutes import METRICS_PATH, route_label

log = Logger(namespace="shardkv.workers")

WORKER_HEADER = b"X-Shardkv-Worker"
"""The response header, in worker mode only, naming the worker that answered."""
ADMIN_WORKER = 0
"""The worker that serves ``/admin/*`` for all: it keeps the staged plans."""

STOP_DEADLINE = 10.0
"""Seconds a worker gets to stop after SIGTERM (or after its parent is gone)
before it is killed (or exits at once)."""
RESTART_DELAY = 0.5
"""Seconds before a dead worker is started again; doubled for each death in a row."""
MAX_RESTART_DELAY = 30.0
STEADY_AFTER = 30.0
"""A worker that ran this long before dying starts again after L{RESTART_DELAY}."""
BOOT_FAILURES = 5
"""Workers dying before they serve, this many times in a row, stop the proxy:
the fault is in the configuration or the machine, and restarting would only spin."""
SIBLING_TIMEOUT = 2.0
"""Seconds ``/metrics`` waits for each sibling; one that does not answer is left out."""
ADMIN_TIMEOUT = 300.0
"""Seconds an admin request forwarded to worker 0 may take (a plan asks every node)."""

SECRET_ENV = "SHARDKV_WORKER_SECRET"
"""The environment variable that hands a worker the secret of the private ports
(the environment, unlike the command line, is not readable by other users)."""
CONTROL_FD = 3
FIRST_LISTEN_FD = 4
PRIVATE_ENDPOINT = "tcp:0:interface=127.0.0.1"
MAX_LINE = 1 << 20


def restart_delay(deaths_in_a_row: int) -> float:
    """Seconds to wait before starting a worker that died ``deaths_in_a_row`` times
    in a row (within L{STEADY_AFTER} of each start): 0.5, 1, 2, ... up to 30."""
    return float(min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** max(0, deaths_in_a_row - 1)))


# -- /metrics for the whole proxy ---------------------------------------------------


@dataclass
class _Family:
    name: str
    head: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)


def _families(text: str) -> list[_Family]:
    """A text exposition split into its families (HELP and TYPE lines, then samples)."""
    families: list[_Family] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            name = line.split(" ", 3)[2] if line.count(" ") >= 2 else ""
            if not families or families[-1].name != name or families[-1].samples:
                families.append(_Family(name))
            families[-1].head.append(line)
        elif line.startswith("#"):
            continue
        else:
            if not families:
                families.append(_Family(""))
            families[-1].samples.append(line)
    return families


def label_sample(line: str, label: str) -> str:
    """``name{a="1"} 2`` -> ``name{LABEL,a="1"} 2``; ``name 2`` -> ``name{LABEL} 2``."""
    brace, space = line.find("{"), line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        if line[brace + 1 : brace + 2] == "}":
            return f"{line[: brace + 1]}{label}{line[brace + 1 :]}"
        return f"{line[: brace + 1]}{label},{line[brace + 1 :]}"
    if space == -1:
        return line
    return f"{line[:space]}{{{label}}}{line[space:]}"


def merge_metrics(texts: Mapping[int, str], workers: int) -> bytes:
    """One exposition for the whole proxy from each worker's (``texts``, by worker).

    Every sample gains ``worker="i"``; each family is written once, its HELP
    and TYPE first, then its samples worker by worker. Two gauges follow:
    ``shardkv_workers`` (how many the proxy runs) and
    ``shardkv_workers_unreachable`` (how many of those are missing here).
    """
    order: list[str] = []
    merged: dict[str, _Family] = {}
    for worker in sorted(texts):
        label = f'worker="{worker}"'
        for family in _families(texts[worker]):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = _Family(family.name, list(family.head))
                order.append(family.name)
            into.samples.extend(label_sample(s, label) for s in family.samples)
    lines: list[str] = []
    for name in order:
        lines.extend(merged[name].head)
        lines.extend(merged[name].samples)
    missing = max(0, workers - len(texts))
    lines += [
        "# HELP shardkv_workers Worker processes this proxy runs (--workers).",
        "# TYPE shardkv_workers gauge",
        f"shardkv_workers {float(workers)}",
        "# HELP shardkv_workers_unreachable Workers whose series this answer lacks: they "
        "did not answer in time.",
        "# TYPE shardkv_workers_unreachable gauge",
        f"shardkv_workers_unreachable {float(missing)}",
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


# -- the parent ---------------------------------------------------------------------


def relayed_event(line: bytes, worker: int, stream: str = "stdout") -> dict[str, Any]:
    """The log event a worker wrote as one line, ready for the parent's log.

    A line of Twisted's JSON (the worker's log) is the worker's event with
    ``worker`` added, and its system (what twistd's text lines show in
    brackets) prefixed with ``worker i``; any other line is logged as it is,
    at warn for stderr.
    """
    text = line.decode("utf-8", "replace").rstrip("\r")
    event: Any = None
    if stream == "stdout":
        with suppress(ValueError):
            event = eventFromJSON(text)
    if not isinstance(event, dict) or "log_time" not in event:
        event = {
            "log_format": "{line}",
            "line": text,
            "log_level": LogLevel.warn if stream == "stderr" else LogLevel.info,
            "log_namespace": "shardkv.workers",
            "log_time": time.time(),
            "stream": stream,
        }
    level = event.get("log_level")
    system = event.get("log_system") or (
        f"{event.get('log_namespace', '-')}#{getattr(level, 'name', 'info')}"
    )
    event["log_system"] = f"worker {worker} {system}"
    event["worker"] = worker
    relayed: dict[str, Any] = event
    return relayed


class _NoConnections(Factory):
    """The parent's listeners never accept (it stops reading them); if one did, the
    connection would be closed at once."""

    noisy = False

    def buildProtocol(self, addr: Any) -> None:
        return None


@dataclass(eq=False)
class _Slot:
    """One worker's place: the process in it now, and how it has fared."""

    index: int
    process: Any = None
    pid: int | None = None
    started: float = 0.0
    ready: bool = False
    port: int | None = None
    deaths: int = 0
    """Deaths in a row, each within L{STEADY_AFTER} of its start."""
    boot_failures: int = 0
    """Deaths in a row before serving."""
    restart: IDelayedCall | None = None
    ended: Deferred[None] | None = None


class _WorkerProcess(ProcessProtocol):
    """The parent's end of one worker's pipes."""

    def __init__(self, supervisor: Supervisor, slot: _Slot) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self._buffers: dict[int, bytes] = {}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._buffers.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > MAX_LINE:
            lines.append(rest)
            rest = b""
        self._buffers[childFD] = rest
        for line in lines:
            self.supervisor.line(self.slot, childFD, line)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in sorted(self._buffers.items()):
            if rest:
                self.supervisor.line(self.slot, fd, rest)
        self._buffers.clear()
        self.supervisor.ended(self.slot, reason)


def _why(reason: Failure) -> str:
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig:
        with suppress(ValueError):
            return f"killed by {signal.Signals(sig).name}"
        return f"killed by signal {sig}"
    return f"exit status {getattr(value, 'exitCode', None)}"


class Supervisor(MultiService):
    """The parent of ``--workers N``: the listening sockets and N worker processes.

    Its children are the parent's listeners (L{ListeningService}s over a
    factory that never serves); it stops reading them once they listen, and
    starts the workers when the reactor runs. On stop it sends each worker
    SIGTERM, kills with SIGKILL any still running after L{STOP_DEADLINE},
    and closes its sockets only once every worker has exited.
    """

    def __init__(
        self,
        reactor: Any,
        workers: int,
        argv: Sequence[str],
        listen: Sequence[str],
        *,
        echo: bool = True,
        cwd: str | None = None,
        executable: str = sys.executable,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.workers = workers
        self.argv = list(argv)
        self.listen = list(listen)
        self.cwd = os.getcwd() if cwd is None else cwd
        self.executable = executable
        self.slots = [_Slot(i) for i in range(workers)]
        self.listeners: list[ListeningService] = []
        for description in self.listen:
            listener = listening_service(
                reactor, description, _NoConnections(), owner="proxy", echo=echo
            )
            listener.setServiceParent(self)
            self.listeners.append(listener)
        self.sockets: list[tuple[int, int]] = []
        """(fd, address family) of each listener, once listening."""
        self.secret = secrets.token_urlsafe(32)
        self.stopping = False
        self.reload_parent: Callable[[], None] = lambda: None
        """The parent's own reload (its log level); set by L{SupervisorReloadService}."""

    # -- starting -----------------------------------------------------------------

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # the listeners listen, or the process exits
        self.sockets = []
        for listener in self.listeners:
            port = listener.port
            if port is None:
                raise RuntimeError(f"{listener.description} did not listen at once")
            port.stopReading()  # type: ignore[attr-defined]
            self.sockets.append((port.fileno(), port.addressFamily))  # type: ignore[attr-defined]

    def startService(self) -> None:
        super().startService()
        log.info(
            "starting {workers} proxy workers on {listen}",
            workers=self.workers,
            listen=", ".join(self.listen),
        )
        for slot in self.slots:
            self._spawn(slot)

    def spec(self, slot: _Slot) -> dict[str, Any]:
        """What the worker in ``slot`` is told on its command line."""
        return {
            "worker": slot.index,
            "workers": self.workers,
            "argv": self.argv,
            "listen": [
                [description, FIRST_LISTEN_FD + n, family]
                for n, (description, (_, family)) in enumerate(
                    zip(self.listen, self.sockets, strict=True)
                )
            ],
            "reactor": type(self.reactor).__module__,
        }

    def _spawn(self, slot: _Slot) -> None:
        slot.restart = None
        if self.stopping:
            return
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r", CONTROL_FD: "r"}
        for n, (fd, _) in enumerate(self.sockets):
            child_fds[FIRST_LISTEN_FD + n] = fd
        env = dict(os.environ)
        env[SECRET_ENV] = self.secret
        # The workers run the parent's shardkv, wherever it was imported from.
        source = str(Path(shardkv.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
        args = [self.executable, "-m", __name__, json.dumps(self.spec(slot))]
        slot.ended = Deferred()
        slot.ready, slot.port = False, None
        slot.started = self.reactor.seconds()
        slot.process = self.reactor.spawnProcess(
            _WorkerProcess(self, slot),
            self.executable,
            args,
            env=env,
            path=self.cwd,
            childFDs=child_fds,
        )
        slot.pid = slot.process.pid
        log.info("worker {worker} started: pid {pid}", worker=slot.index, pid=slot.pid)

    # -- what the workers say -------------------------------------------------------

    def line(self, slot: _Slot, fd: int, line: bytes) -> None:
        """One line a worker wrote on ``fd``."""
        if fd == CONTROL_FD:
            self._control(slot, line)
        elif line.strip():
            globalLogPublisher(relayed_event(line, slot.index, "stderr" if fd == 2 else "stdout"))

    def _control(self, slot: _Slot, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            log.warn("worker {worker} sent an unreadable message", worker=slot.index)
            return
        if not isinstance(message, dict):
            return
        ready = message.get("ready")
        if isinstance(ready, dict) and isinstance(ready.get("port"), int):
            slot.ready, slot.port, slot.boot_failures = True, ready["port"], 0
            log.info("worker {worker} (pid {pid}) is serving", worker=slot.index, pid=slot.pid)
            self._announce()
        if message.get("reload") is True:
            self.reload_all(but=slot)

    def _announce(self) -> None:
        """Tell every worker the private ports of the workers that serve."""
        ports = {str(s.index): s.port for s in self.slots if s.ready and s.port is not None}
        data = json.dumps({"siblings": ports}).encode("ascii") + b"\n"
        for slot in self.slots:
            if slot.process is not None:
                with suppress(Exception):  # a pipe closing under a dying worker
                    slot.process.writeToChild(0, data)

    def reload_all(self, but: _Slot | None = None) -> None:
        """Reload the parent's own settings and send SIGHUP to every worker (but one)."""
        self.reload_parent()
        for slot in self.slots:
            if slot is not but:
                self._signal(slot, "HUP")

    def _signal(self, slot: _Slot, name: str) -> None:
        if slot.process is not None:
            with suppress(ProcessExitedAlready, OSError):
                slot.process.signalProcess(name)

    # -- a worker ends --------------------------------------------------------------

    def ended(self, slot: _Slot, reason: Failure) -> None:
        """The worker in ``slot`` has exited: start another unless stopping."""
        pid, was_ready = slot.pid, slot.ready
        slot.process, slot.ready, slot.port = None, False, None
        ended, slot.ended = slot.ended, None
        if ended is not None:
            ended.callback(None)
        if self.stopping:
            return
        self._announce()
        if self.reactor.seconds() - slot.started >= STEADY_AFTER:
            slot.deaths = 0
        slot.deaths += 1
        slot.boot_failures = 0 if was_ready else slot.boot_failures + 1
        if slot.boot_failures >= BOOT_FAILURES:
            log.critical(
                "worker {worker} exited before serving {count} times in a row "
                "(last: pid {pid}, {why}); stopping the proxy: see the lines above",
                worker=slot.index,
                count=slot.boot_failures,
                pid=pid,
                why=_why(reason),
            )
            with suppress(ReactorNotRunning):
                self.reactor.stop()
            return
        delay = restart_delay(slot.deaths)
        log.warn(
            "worker {worker} (pid {pid}) exited unexpectedly ({why}); "
            "starting it again in {delay} s",
            worker=slot.index,
            pid=pid,
            why=_why(reason),
            delay=delay,
        )
        slot.restart = self.reactor.callLater(delay, self._spawn, slot)

    # -- stopping -------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """SIGTERM to every worker, SIGKILL after L{STOP_DEADLINE}; then close the sockets."""
        self.stopping = True
        for slot in self.slots:
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
            slot.restart = None
        live = [s for s in self.slots if s.process is not None and s.ended is not None]
        if live:
            log.info("stopping {count} proxy workers", count=len(live))
        for slot in live:
            self._signal(slot, "TERM")
        kill = self.reactor.callLater(STOP_DEADLINE, self._kill, live)
        exited: Deferred[Any] = gatherResults([s.ended for s in live if s.ended is not None])

        def close(_: object) -> Deferred[Any]:
            if kill.active():
                kill.cancel()
            closed: Deferred[Any] = MultiService.stopService(self)
            return closed.addCallback(lambda _: None)

        exited.addCallback(close)
        return exited

    def _kill(self, slots: Sequence[_Slot]) -> None:
        for slot in slots:
            if slot.process is not None:
                log.warn(
                    "worker {worker} (pid {pid}) did not stop within {deadline} s; killing it",
                    worker=slot.index,
                    pid=slot.pid,
                    deadline=STOP_DEADLINE,
                )
                self._signal(slot, "KILL")


class SupervisorReloadService(ReloadService):
    """SIGHUP to the parent reloads the parent's settings and every worker's."""

    def __init__(self, reloader: Reloader, reactor: Any, supervisor: Supervisor) -> None:
        super().__init__(reloader, reactor)
        self.supervisor = supervisor
        supervisor.reload_parent = super().reload

    def reload(self) -> None:
        self.supervisor.reload_all()


def make_supervisor(sub: Any, reactor: Any) -> Supervisor:
    """The parent of ``twistd shardkv proxy --workers N``, from its options."""
    return Supervisor(reactor, sub["workers"], sub.argv, sub.endpoints(), echo=sub.echo_errors())


# -- a worker -----------------------------------------------------------------------


class Worker:
    """What a worker knows of the others: their private ports, its parent's pipe,
    and the client it calls them with."""

    def __init__(self, index: int, count: int, reactor: Any, http: Any) -> None:
        self.index = index
        self.count = count
        self.reactor = reactor
        self.http = http
        """An L{HTTPClientService} that sends the private ports' secret."""
        self.header = str(index).encode("ascii")
        self.siblings: dict[int, int] = {}
        self.link: ParentLink | None = None

    def tell_parent(self, message: Mapping[str, Any]) -> None:
        if self.link is not None:
            self.link.send(message)

    def _url(self, port: int, path: bytes) -> bytes:
        return b"http://127.0.0.1:%d%s" % (port, path)

    async def _scrape(self, port: int) -> str:
        response = await self.http.request("GET", self._url(port, METRICS_PATH.encode()))
        body = await response.content()
        if response.code != 200:
            raise ValueError(f"status {response.code}")
        text: str = body.decode("utf-8")
        return text

    def _sibling(self, index: int) -> Deferred[tuple[int, str | None]]:
        port = self.siblings.get(index)
        if port is None:
            return succeed((index, None))
        scraped = Deferred.fromCoroutine(self._scrape(port))
        scraped.addTimeout(SIBLING_TIMEOUT, self.reactor)

        def left_out(failure: Failure) -> tuple[int, str | None]:
            log.debug("worker {sibling} gave no metrics: {why}", sibling=index, why=failure.value)
            return index, None

        return scraped.addCallbacks(lambda text: (index, text), left_out)

    async def metrics(self, local: bytes) -> bytes:
        """``/metrics`` for the whole proxy: this worker's ``local`` and each sibling's."""
        others = [i for i in range(self.count) if i != self.index]
        answers = await gatherResults([self._sibling(i) for i in others])
        texts = {i: text for i, text in answers if text is not None}
        texts[self.index] = local.decode("utf-8")
        return merge_metrics(texts, self.count)

    async def forward(self, request: IRequest, port: int) -> _Answer | None:
        """Ask the worker on ``port`` to answer ``request``; None if it was never sent."""
        request.content.seek(0)
        body = request.content.read()
        headers = {}
        content_type = request.getHeader(b"content-type")
        if content_type is not None:
            headers[b"content-type"] = [content_type]
        try:
            response = await self.http.request(
                request.method.decode("ascii"),
                self._url(port, request.uri),
                data=body if body else None,
                headers=headers,
                timeout=ADMIN_TIMEOUT,
            )
        except (ConnectError, RequestNotSent):
            return None
        content = await response.content()
        kept = [
            (name, values)
            for name, values in response.headers.getAllRawHeaders()
            if name.lower() not in _HOP_HEADERS
        ]
        return _Answer(response.code, kept, content)


_HOP_HEADERS = frozenset(
    {b"connection", b"content-length", b"date", b"server", b"transfer-encoding", b"keep-alive"}
)


@dataclass
class _Answer:
    status: int
    headers: list[tuple[bytes, list[bytes]]]
    body: bytes


def _render(resource: Resource, request: IRequest) -> None:
    """Render ``request`` with ``resource`` once the answer is due."""
    result = resource.render(request)
    if result is not NOT_DONE_YET:
        request.write(result)
        request.finish()


def _answer_later(request: Any, pending: Deferred[_Answer | None], fallback: Resource) -> int:
    """Answer ``request`` with what ``pending`` gives (None: ``fallback`` answers)."""
    gone: list[bool] = []

    def hung_up(_: object) -> None:
        gone.append(True)
        pending.cancel()

    request.notifyFinish().addErrback(hung_up)

    def answer(result: _Answer | None) -> None:
        if gone:
            return
        if result is None:
            _render(fallback, request)
            return
        request.setResponseCode(result.status)
        for name, values in result.headers:
            request.responseHeaders.setRawHeaders(name, values)
        request.write(result.body)
        request.finish()

    def failed(failure: Failure) -> None:
        if gone or failure.check(CancelledError):
            return
        log.failure("worker {worker} gave no answer", failure, worker=ADMIN_WORKER)
        body = json_body(
            request,
            503,
            {
                "error": "worker_unavailable",
                "message": f"worker {ADMIN_WORKER}, which serves /admin/* for this proxy, "
                "took the request and gave no answer: its outcome is unknown",
            },
        )
        request.write(body)
        request.finish()

    pending.addCallbacks(answer, failed)
    return NOT_DONE_YET


class _Tagged(Resource):
    """Names the worker on every answer (``X-Shardkv-Worker``)."""

    isLeaf = True

    def __init__(self, inner: Resource, worker: bytes) -> None:
        super().__init__()
        self._inner = inner
        self._worker = worker

    def render(self, request: IRequest) -> Any:
        request.setHeader(WORKER_HEADER, self._worker)
        return self._inner.render(request)


class WorkerRoutes(Resource):
    """Behind the guard, in front of the app: what a worker answers unlike a lone proxy.

    ``GET /metrics`` merges every worker's; ``/admin/*`` goes to worker 0
    (served here if worker 0 is not known to serve, or if the request could
    not be sent to it); ``POST /admin/reload`` also has the parent reload the
    other workers. Everything else is the app's.
    """

    isLeaf = True

    def __init__(self, inner: Resource, worker: Worker, app: ProxyApp) -> None:
        super().__init__()
        self._inner = inner
        self._worker = worker
        self._app = app

    def render(self, request: IRequest) -> Any:
        path, method = request.path, request.method
        worker = self._worker
        if path == METRICS_PATH.encode() and method == b"GET" and self._app.metrics is not None:
            request.route = METRICS_PATH  # type: ignore[attr-defined]
            local = render(self._app.metrics.registry)
            merged = Deferred.fromCoroutine(worker.metrics(local))
            return _answer_later(request, merged.addCallback(_metrics_answer), self._inner)
        if path == b"/admin/reload":
            if method == b"POST":
                worker.tell_parent({"reload": True})
        elif path.startswith(b"/admin/") and worker.index != ADMIN_WORKER:
            port = worker.siblings.get(ADMIN_WORKER)
            if port is not None:
                request.route = self._route(path, method)  # type: ignore[attr-defined]
                forwarded = Deferred.fromCoroutine(worker.forward(request, port))
                return _answer_later(request, forwarded, self._inner)
        return self._inner.render(request)

    def _route(self, path: bytes, method: bytes) -> str:
        """The route label the app would have counted this request under."""
        try:
            adapter = self._app.app.url_map.bind("localhost")
            rule, _ = adapter.match(
                path.decode("utf-8", "replace"), method=method.decode("ascii"), return_rule=True
            )
        except Exception:
            return OTHER_ROUTE
        return route_label(rule.rule)


def _metrics_answer(body: bytes) -> _Answer:
    return _Answer(200, [(b"content-type", [CONTENT_TYPE])], body)


class WorkerApp(ProxyApp):
    """The proxy's app in a worker: L{WorkerRoutes} behind the guard, tagged answers."""

    def __init__(self, *args: Any, worker: Worker, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.worker = worker

    def resource(self) -> Resource:
        routes = WorkerRoutes(self.app.resource(), self.worker, self)
        return _Tagged(GuardedResource(routes, self.guard, proxy_policy), self.worker.header)


class _PrivateResource(Resource):
    """A worker's private port: its own app, without the guard, for the bearer of the
    secret only (its siblings)."""

    isLeaf = True

    def __init__(self, inner: Resource, secret: str) -> None:
        super().__init__()
        self._inner = inner
        self._expected = b"Bearer " + secret.encode("ascii")

    def render(self, request: IRequest) -> Any:
        given = request.getHeader(b"authorization") or b""
        if not self._expected[7:] or not hmac.compare_digest(given, self._expected):
            return json_body(
                request, 403, {"error": "forbidden", "message": "a worker's private port"}
            )
        return self._inner.render(request)


class _PrivateSite(Site):
    """The private port's site: no access log, and nothing counted in the metrics
    (the worker that took the request counts it)."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


class _AdoptingReactor:
    """Stands in for the reactor in one endpoint, so that its C{listen} adopts the
    parent's socket ``fd`` instead of binding a new one. The endpoint types that
    can be shared (tcp, tcp6, ssl) listen through C{listenTCP} or C{listenSSL};
    everything else is the real reactor's."""

    def __init__(self, reactor: Any, fd: int, family: int) -> None:
        self._reactor = reactor
        self._fd = fd
        self._family = family

    def listenTCP(
        self, port: int, factory: IProtocolFactory, backlog: int = 50, interface: str = ""
    ) -> IListeningPort:
        return self._adopt(factory)

    def listenSSL(
        self,
        port: int,
        factory: IProtocolFactory,
        contextFactory: Any,
        backlog: int = 50,
        interface: str = "",
    ) -> IListeningPort:
        return self._adopt(TLSMemoryBIOFactory(contextFactory, False, factory))

    def _adopt(self, factory: IProtocolFactory) -> IListeningPort:
        port: IListeningPort = self._reactor.adoptStreamPort(self._fd, self._family, factory)
        os.close(self._fd)  # the port listens on its own copy
        return port

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def _adopted_listener(
    reactor: Any, sockets: Mapping[str, tuple[int, int]], owner: str
) -> Callable[[str, IProtocolFactory], ListeningService]:
    def listener(description: str, site: IProtocolFactory) -> ListeningService:
        fd, family = sockets[description]
        endpoint = serverFromString(_AdoptingReactor(reactor, fd, family), description)
        return ListeningService(
            endpoint, site, description=description, owner=owner, reactor=reactor, echo=False
        )

    return listener


class ParentLink(LineReceiver):
    """A worker's end of the pipes to its parent: stdin in, fd 3 out."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, worker: Worker, gone: Callable[[], None]) -> None:
        self.worker = worker
        self.gone = gone

    def lineReceived(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return
        siblings = message.get("siblings") if isinstance(message, dict) else None
        if isinstance(siblings, dict):
            self.worker.siblings = {int(i): int(p) for i, p in siblings.items() if str(i).isdigit()}

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone()

    def send(self, message: Mapping[str, Any]) -> None:
        if self.transport is not None:
            self.transport.write(json.dumps(message).encode("utf-8") + b"\n")


class WorkerLink(Service):
    """Opens the pipes to the parent once the worker serves, and says so; stops the
    worker when its parent is gone (end of file on stdin)."""

    def __init__(self, worker: Worker, private: ListeningService, reactor: Any) -> None:
        self.worker = worker
        self.private = private
        self.reactor = reactor
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        link = ParentLink(self.worker, self._parent_gone)
        # (typed after Windows' StandardIO, which has no stdin or stdout to choose)
        cast(Any, StandardIO)(link, stdin=0, stdout=CONTROL_FD, reactor=self.reactor)
        self.worker.link = link
        port = self.private.port
        assert port is not None
        link.send({"ready": {"port": port.getHost().port, "pid": os.getpid()}})  # type: ignore[attr-defined]

    def stopService(self) -> None:
        self._stopping = True
        super().stopService()

    def _parent_gone(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        log.warn("worker {worker}: the parent process is gone; stopping", worker=self.worker.index)
        self.reactor.callLater(STOP_DEADLINE, os._exit, 1)
        with suppress(ReactorNotRunning):
            self.reactor.stop()


def build_worker(
    sub: Any,
    reactor: Any,
    index: int,
    count: int,
    sockets: Mapping[str, tuple[int, int]],
    secret: str,
) -> ProxyService:
    """Worker ``index``'s proxy: the proxy of ``sub`` on the parent's ``sockets``
    (description -> (fd, family)), plus its private port and its parent link."""
    from shardkv import tap  # tap imports this module

    owner = f"proxy worker {index}"
    http = HTTPClientService(reactor, max_per_host=4, token=secret)
    worker = Worker(index, count, reactor, http)
    service = tap.proxy_service(
        sub,
        reactor,
        app_factory=partial(default_app, app_class=partial(WorkerApp, worker=worker)),
        listener=_adopted_listener(reactor, sockets, owner),
        echo_errors=False,
    )
    http.setServiceParent(service)
    private_site = _PrivateSite(_PrivateResource(service.app.app.resource(), secret))
    private = listening_service(reactor, PRIVATE_ENDPOINT, private_site, owner=owner, echo=False)
    private.setServiceParent(service)
    WorkerLink(worker, private, reactor).setServiceParent(service)
    tap.add_reload_service(sub, service, reactor)
    return service


def _install_reactor(module: str | None) -> None:
    """Install the parent's kind of reactor (``twistd -r``), if it can be."""
    if not module or "twisted.internet.reactor" in sys.modules:
        return
    with suppress(Exception):
        importlib.import_module(module).install()


def worker_main(argv: Sequence[str] | None = None) -> None:
    """A worker process: ``python -m shardkv.proxy.workers SPEC`` (L{Supervisor.spec})."""
    args = sys.argv[1:] if argv is None else list(argv)
    spec = json.loads(args[0])
    index, count = int(spec["worker"]), int(spec["workers"])
    secret = os.environ.pop(SECRET_ENV, "")
    _install_reactor(spec.get("reactor"))
    from twisted.internet import reactor

    from shardkv.options import ProxyOptions

    observer = FilteringLogObserver(jsonFileLogObserver(sys.stdout, ""), [LEVEL_FILTER])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    sub = ProxyOptions()
    try:
        sub.parseOptions(spec["argv"])
    except usage.UsageError as e:
        print(f"shardkv: worker {index}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    set_level(sub["log-level"])
    sockets = {d: (int(fd), int(family)) for d, fd, family in spec["listen"]}
    service = build_worker(sub, reactor, index, count, sockets, secret)
    service.privilegedStartService()
    reactor.callWhenRunning(service.startService)
    reactor.callWhenRunning(freeze_startup_heap)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


__all__ = [
    "ADMIN_WORKER",
    "WORKER_HEADER",
    "Supervisor",
    "SupervisorReloadService",
    "WorkerApp",
    "label_sample",
    "make_supervisor",
    "merge_metrics",
    "relayed_event",
    "restart_delay",
    "worker_main",
]

if __name__ == "__main__":
    from shardkv.proxy.workers import worker_main as main  # this module, imported once

    main()
