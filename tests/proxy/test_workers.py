"""``--workers``: the option, the supervisor's bookkeeping, merged metrics, a worker's routes.

The supervisor runs against a memory reactor that records each
C{spawnProcess} (no process starts); a worker's routes are served through
StubTreq with fake siblings; adopting a parent's socket uses real sockets.
The real processes are in tests/system/test_workers.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.error import ConnectionRefusedError, ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request

from shardkv import tap
from shardkv.metrics import ProxyMetrics
from shardkv.proxy.app import ProxyApp
from shardkv.proxy.service import ProxyService
from shardkv.proxy.workers import (
    BOOT_FAILURES,
    CONTROL_FD,
    FIRST_LISTEN_FD,
    SECRET_ENV,
    STOP_DEADLINE,
    Supervisor,
    SupervisorReloadService,
    Worker,
    WorkerRoutes,
    _AdoptingReactor,
    _PrivateResource,
    _Slot,
    _Tagged,
    label_sample,
    merge_metrics,
    relayed_event,
    restart_delay,
)

# -- the option -------------------------------------------------------------------


def proxy_options(*argv: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(["proxy", *argv])
    return options


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "--workers must be between 1 and 64, not 0"),
        ("65", "--workers must be between 1 and 64, not 65"),
        ("two", "--workers must be a whole number, not 'two'"),
    ],
)
def test_workers_must_be_a_sensible_number(value: str, message: str) -> None:
    """
    If --workers is not a whole number from 1 to 64, then parsing stops with one
    line naming the option.
    """
    with pytest.raises(usage.UsageError) as raised:
        proxy_options("--workers", value)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    "endpoint", ["unix:/tmp/shardkv-test.sock", "systemd:domain=INET:index=0", "pipe:x"]
)
def test_workers_refuse_a_listener_they_cannot_share(endpoint: str, tmp_path: Path) -> None:
    """
    If --workers is above 1 and a listener is not tcp, tcp6 or ssl, then parsing
    stops with one line that names the listener and the way out.
    """
    token = tmp_path / "token"
    token.write_text("t0ken-for-the-test\n")
    with pytest.raises(usage.UsageError) as raised:
        proxy_options("--workers", "2", "--token-file", str(token), "--listen", endpoint)
    message = str(raised.value)
    assert "\n" not in message
    assert f"--listen {endpoint}" in message
    assert "tcp, tcp6, ssl" in message and "--workers 1" in message


def test_one_worker_takes_any_listener() -> None:
    """
    If --workers is 1 (the default), then a unix listener is accepted as before.
    """
    options = proxy_options("--listen", "unix:/tmp/shardkv-test.sock", "--proxy-id", "p")
    assert options.subOptions["workers"] == 1


def test_workers_from_the_config_file(tmp_path: Path) -> None:
    """
    If the config file says workers = 3, then the proxy runs three workers.
    """
    config = tmp_path / "proxy.toml"
    config.write_text("workers = 3\n")
    assert proxy_options("--config", str(config)).subOptions["workers"] == 3


def test_default_is_the_single_process_proxy() -> None:
    """
    If --workers is not given, then makeService builds the same proxy as before:
    no supervisor anywhere in the tree.
    """
    service = tap.makeService(proxy_options("--port", "0"), MemoryReactorClock())
    assert isinstance(service, ProxyService)
    assert not isinstance(service, Supervisor)


def test_workers_build_a_supervisor_with_the_listeners() -> None:
    """
    If --workers is 2, then makeService builds a supervisor holding one listener
    per endpoint (the parent listens) and a reload service that reaches the workers.
    """
    options = proxy_options(
        "--workers", "2", "--port", "9090", "--listen", "tcp:9091:interface=127.0.0.1"
    )
    service = tap.makeService(options, MemoryReactorClock())
    assert isinstance(service, Supervisor)
    assert service.workers == 2
    assert [listener.description for listener in service.listeners] == [
        "tcp:9091:interface=127.0.0.1",
        "tcp:9090:interface=127.0.0.1:backlog=1024",
    ]
    assert any(isinstance(s, SupervisorReloadService) for s in service)
    assert "--workers" in service.argv


# -- the supervisor ----------------------------------------------------------------


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []
        self.written: list[bytes] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def writeToChild(self, fd: int, data: bytes) -> None:
        assert fd == 0
        self.written.append(data)

    def messages(self) -> list[Any]:
        return [json.loads(line) for line in b"".join(self.written).splitlines()]


class SpawningReactor(MemoryReactorClock):
    """A memory reactor that records spawnProcess calls."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []
        self.running = True

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], **kw: Any) -> Any:
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append(dict(protocol=protocol, args=args, process=process, **kw))
        protocol.makeConnection(process)
        return process


@pytest.fixture
def spawning() -> SpawningReactor:
    return SpawningReactor()


def started(clock: SpawningReactor, workers: int = 2) -> Supervisor:
    supervisor = Supervisor(
        clock, workers, ["--port", "9090", "--workers", str(workers)], ["tcp:9090"], cwd="/"
    )
    supervisor.sockets = [(17, socket.AF_INET)]  # what privilegedStartService finds
    supervisor.startService()
    return supervisor


def ready(supervisor: Supervisor, slot: _Slot, port: int) -> None:
    supervisor.line(slot, CONTROL_FD, json.dumps({"ready": {"port": port}}).encode())


def die(supervisor: Supervisor, slot: _Slot, sig: int | None = signal.SIGKILL) -> None:
    reason = ProcessTerminated(signal=sig) if sig else ProcessDone(0)
    supervisor.ended(slot, Failure(reason))


def test_each_worker_gets_the_sockets_and_its_spec(spawning: SpawningReactor) -> None:
    """
    If the supervisor starts, then it spawns one process per worker with this
    interpreter: the pipes on fds 0-3, each listening socket from fd 4, the
    secret in the environment only, and its number and the options in its spec.
    """
    supervisor = started(spawning)
    assert len(spawning.spawned) == 2
    for index, call in enumerate(spawning.spawned):
        assert call["childFDs"] == {0: "w", 1: "r", 2: "r", CONTROL_FD: "r", FIRST_LISTEN_FD: 17}
        assert call["args"][1:3] == ["-m", "shardkv.proxy.workers"]
        assert call["env"][SECRET_ENV] == supervisor.secret
        assert supervisor.secret not in " ".join(call["args"])
        spec = json.loads(call["args"][3])
        assert spec["worker"] == index and spec["workers"] == 2
        assert spec["argv"] == supervisor.argv
        assert spec["listen"] == [["tcp:9090", FIRST_LISTEN_FD, socket.AF_INET]]
        assert call["path"] == "/"


def test_ready_workers_learn_each_others_ports(spawning: SpawningReactor) -> None:
    """
    If a worker says it serves, then every live worker is told the private port
    of every worker that serves; a worker that dies is dropped from that list.
    """
    supervisor = started(spawning)
    first, second = (call["process"] for call in spawning.spawned)
    ready(supervisor, supervisor.slots[0], 5000)
    ready(supervisor, supervisor.slots[1], 5001)
    assert first.messages()[-1] == {"siblings": {"0": 5000, "1": 5001}}
    assert second.messages()[-1] == {"siblings": {"0": 5000, "1": 5001}}
    die(supervisor, supervisor.slots[1])
    assert first.messages()[-1] == {"siblings": {"0": 5000}}


def test_a_dead_worker_starts_again_after_a_backoff(spawning: SpawningReactor) -> None:
    """
    If a serving worker dies, then it is started again after 0.5 s, and after
    twice as long each time it dies again soon after starting.
    """
    supervisor = started(spawning)
    slot = supervisor.slots[1]
    for delay in (0.5, 1.0, 2.0):
        ready(supervisor, slot, 5001)
        before = len(spawning.spawned)
        die(supervisor, slot)
        spawning.advance(delay - 0.01)
        assert len(spawning.spawned) == before
        spawning.advance(0.01)
        assert len(spawning.spawned) == before + 1
        assert json.loads(spawning.spawned[-1]["args"][3])["worker"] == 1


def test_a_worker_that_ran_a_while_restarts_quickly(spawning: SpawningReactor) -> None:
    """
    If a worker dies after running 30 s or more, then the backoff starts over.
    """
    supervisor = started(spawning)
    slot = supervisor.slots[0]
    ready(supervisor, slot, 5000)
    die(supervisor, slot)
    spawning.advance(0.5)
    ready(supervisor, slot, 5000)
    spawning.advance(30)
    die(supervisor, slot)
    assert slot.restart is not None
    assert slot.restart.getTime() == pytest.approx(spawning.seconds() + 0.5)


def test_restart_delay_is_capped() -> None:
    """
    If a worker keeps dying, then the wait grows by doubling up to 30 s.
    """
    assert [restart_delay(n) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_workers_that_never_serve_stop_the_proxy(spawning: SpawningReactor) -> None:
    """
    If a worker exits before serving five times in a row, then the supervisor
    stops the reactor (the proxy) instead of restarting it again.
    """
    supervisor = started(spawning)
    slot = supervisor.slots[0]
    for _ in range(BOOT_FAILURES - 1):
        die(supervisor, slot, None)
        assert not spawning.hasStopped
        spawning.advance(60)
    die(supervisor, slot, None)
    assert spawning.hasStopped
    assert slot.restart is None


def test_stop_terms_then_kills_and_closes_last(spawning: SpawningReactor) -> None:
    """
    If the supervisor stops, then every worker gets SIGTERM; one still running
    10 s later gets SIGKILL; the stop completes once every worker has exited,
    and no worker is started again.
    """
    supervisor = started(spawning)
    first, second = (call["process"] for call in spawning.spawned)
    done: list[object] = []
    supervisor.stopService().addCallback(done.append)
    assert first.signals == ["TERM"] and second.signals == ["TERM"]
    die(supervisor, supervisor.slots[0], signal.SIGTERM)
    spawning.advance(STOP_DEADLINE - 0.1)
    assert second.signals == ["TERM"] and done == []
    spawning.advance(0.1)
    assert second.signals == ["TERM", "KILL"]
    die(supervisor, supervisor.slots[1])
    assert done == [None]
    spawning.advance(60)
    assert len(spawning.spawned) == 2


def test_stop_cancels_a_pending_restart(spawning: SpawningReactor) -> None:
    """
    If the supervisor stops while a dead worker waits to start again, then it
    does not start.
    """
    supervisor = started(spawning)
    die(supervisor, supervisor.slots[0])
    supervisor.stopService()
    die(supervisor, supervisor.slots[1])
    spawning.advance(60)
    assert len(spawning.spawned) == 2


def test_a_reload_reaches_the_parent_and_the_other_workers(spawning: SpawningReactor) -> None:
    """
    If a worker says it reloaded (POST /admin/reload), then the parent reloads
    its own settings and sends SIGHUP to every other worker; a reload of the
    parent itself (SIGHUP) reaches every worker.
    """
    supervisor = started(spawning, 3)
    reloads: list[bool] = []
    supervisor.reload_parent = lambda: reloads.append(True)
    processes = [call["process"] for call in spawning.spawned]
    supervisor.line(supervisor.slots[1], CONTROL_FD, b'{"reload": true}')
    assert reloads == [True]
    assert [p.signals for p in processes] == [["HUP"], [], ["HUP"]]
    supervisor.reload_all()
    assert [p.signals for p in processes] == [["HUP", "HUP"], ["HUP"], ["HUP", "HUP"]]


def test_worker_lines_are_split_and_relayed(spawning: SpawningReactor) -> None:
    """
    If a worker writes its log in pieces, then each whole line becomes one event
    in the parent's log, and the last piece is flushed when the worker ends.
    """
    from twisted.logger import globalLogPublisher

    seen: list[dict[str, Any]] = []
    observer = cast(ILogObserver, seen.append)
    globalLogPublisher.addObserver(observer)
    try:
        supervisor = started(spawning, 1)
        protocol = spawning.spawned[0]["protocol"]
        protocol.childDataReceived(2, b"first li")
        protocol.childDataReceived(2, b"ne\nsecond")
        assert [e["line"] for e in seen if "line" in e and e.get("worker") == 0] == ["first line"]
        protocol.processEnded(Failure(ProcessDone(0)))
        assert [e["line"] for e in seen if "line" in e and e.get("worker") == 0] == [
            "first line",
            "second",
        ]
    finally:
        globalLogPublisher.removeObserver(observer)
    assert supervisor.slots[0].process is None


# -- the log of a worker ------------------------------------------------------------


def test_a_worker_event_keeps_its_text_level_and_time() -> None:
    """
    If a worker logs an event (as Twisted's JSON, one line), then the parent's
    event has the same text, level, namespace and time, plus the worker's number
    in a field and in its system (twistd's text lines show it in brackets).
    """
    from twisted.logger import eventAsJSON

    events: list[dict[str, Any]] = []
    Logger(namespace="shardkv.proxy.health", observer=cast(ILogObserver, events.append)).warn(
        "node {node} is down", node="127.0.0.1:8082"
    )
    line = eventAsJSON(events[0]).encode()
    event = relayed_event(line, 1)
    assert formatEvent(event) == "node 127.0.0.1:8082 is down"
    assert event["log_level"].name == "warn"
    assert event["log_namespace"] == "shardkv.proxy.health"
    assert event["log_time"] == events[0]["log_time"]
    assert event["worker"] == 1
    assert event["log_system"] == "worker 1 shardkv.proxy.health#warn"


@pytest.mark.parametrize(("stream", "level"), [("stdout", "info"), ("stderr", "warn")])
def test_other_worker_output_is_logged_as_it_is(stream: str, level: str) -> None:
    """
    If a worker writes a line that is not an event (a print, a traceback on
    stderr), then the parent logs the line as it is, at warn for stderr.
    """
    event = relayed_event(b"Traceback (most recent call last): {x}", 0, stream)
    assert formatEvent(event) == "Traceback (most recent call last): {x}"
    assert event["log_level"].name == level
    assert event["worker"] == 0


# -- /metrics of the whole proxy ---------------------------------------------------


@pytest.mark.parametrize(
    ("line", "labelled"),
    [
        ("up 1.0", 'up{worker="2"} 1.0'),
        ('up{node="a:1"} 1.0', 'up{worker="2",node="a:1"} 1.0'),
        ("up{} 1.0", 'up{worker="2"} 1.0'),
        (
            'x_bucket{le="+Inf",route="/kv/<key>"} 3.0',
            'x_bucket{worker="2",le="+Inf",route="/kv/<key>"} 3.0',
        ),
        ('odd{v="a b} c"} 1.0', 'odd{worker="2",v="a b} c"} 1.0'),
    ],
)
def test_label_sample(line: str, labelled: str) -> None:
    """
    If a sample is labelled for a worker, then the worker label comes first,
    whatever labels and values it already has.
    """
    assert label_sample(line, 'worker="2"') == labelled


def text_of(metrics: ProxyMetrics) -> str:
    from shardkv.metrics import render

    return render(metrics.registry).decode()


def test_merge_writes_each_family_once_with_every_worker() -> None:
    """
    If two workers' expositions are merged, then each family's HELP and TYPE
    appear once, followed by both workers' samples labelled by worker, and the
    worker gauges say how many run and how many are missing.
    """
    a = ProxyMetrics(CollectorRegistry())
    b = ProxyMetrics(CollectorRegistry())
    a.watch(up=lambda: [("n1", True)], hints_waiting=list, epoch=lambda: 4, rebalance=None)
    b.watch(up=lambda: [("n1", False)], hints_waiting=list, epoch=lambda: 4, rebalance=None)
    merged = merge_metrics({1: text_of(b), 0: text_of(a)}, 3).decode()
    lines = merged.splitlines()
    assert lines.count("# TYPE shardkv_map_epoch gauge") == 1
    epoch = lines.index("# TYPE shardkv_map_epoch gauge")
    assert lines[epoch + 1 : epoch + 3] == [
        'shardkv_map_epoch{worker="0"} 4.0',
        'shardkv_map_epoch{worker="1"} 4.0',
    ]
    assert 'shardkv_node_up{worker="0",node="n1"} 1.0' in lines
    assert 'shardkv_node_up{worker="1",node="n1"} 0.0' in lines
    assert "shardkv_workers 3.0" in lines
    assert "shardkv_workers_unreachable 1.0" in lines
    heads = [line for line in lines if line.startswith("# TYPE ")]
    assert len(heads) == len(set(heads))
    assert all(line.startswith("#") or 'worker="' in line for line in lines[:-6])


def test_merge_parses_as_prometheus_text() -> None:
    """
    If the merged exposition is read by prometheus_client's own parser, then
    every sample has its worker label and the families are intact.
    """
    from prometheus_client.parser import text_string_to_metric_families

    a = ProxyMetrics(CollectorRegistry())
    a.http.observe("/kv/<key>", b"GET", 200, 0.002)
    merged = merge_metrics({0: text_of(a), 1: text_of(a)}, 2).decode()
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    duration = families["shardkv_http_request_duration_seconds"]
    assert duration.type == "histogram"
    workers = {s.labels.get("worker") for s in duration.samples}
    assert workers == {"0", "1"}
    assert families["shardkv_workers_unreachable"].samples[0].value == 0


# -- a worker's routes ---------------------------------------------------------------


class FakeResponse:
    def __init__(self, code: int, body: bytes, headers: dict[bytes, list[bytes]] | None = None):
        self.code = code
        self._body = body
        self.headers = Headers(headers or {})

    def content(self) -> Deferred[bytes]:
        return succeed(self._body)


class FakeSiblings:
    """The worker's HTTP client: canned answers by port, and what was asked."""

    def __init__(self, answers: dict[int, Any]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, bytes, dict[str, Any]]] = []

    def request(self, method: str, url: bytes, **kwargs: Any) -> Deferred[Any]:
        self.calls.append((method, url, kwargs))
        port = int(url.split(b":")[2].split(b"/")[0])
        answer = self.answers[port]
        if isinstance(answer, Exception):
            return fail(answer)
        if isinstance(answer, Deferred):
            return answer
        return succeed(answer)


class Inner(Resource):
    """The app behind the worker's routes: says it answered."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"inner " + request.method + b" " + request.path


class FakeApp:
    app = ProxyApp.app

    def __init__(self) -> None:
        self.metrics = ProxyMetrics(CollectorRegistry())
        self.metrics.watch(up=list, hints_waiting=list, epoch=lambda: 7, rebalance=None)


class FakeLink:
    """The worker's pipe to its parent: what it was told."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, message: Any) -> None:
        self.sent.append(message)


def routes(index: int, answers: dict[int, Any], siblings: dict[int, int]) -> Any:
    worker = Worker(index, 3, reactor, FakeSiblings(answers))
    worker.siblings = siblings
    link = FakeLink()
    worker.link = link  # type: ignore[assignment]
    told = link.sent
    resource = _Tagged(WorkerRoutes(Inner(), worker, FakeApp()), worker.header)  # type: ignore[arg-type]
    return StubTreq(resource), worker, told


def sibling_text(epoch: int) -> bytes:
    m = ProxyMetrics(CollectorRegistry())
    m.watch(up=list, hints_waiting=list, epoch=lambda: epoch, rebalance=None)
    from shardkv.metrics import render

    return render(m.registry)


def body_of(stub: StubTreq, response: Any) -> bytes:
    from treq import content

    result: list[bytes] = []
    content(response).addCallback(result.append)
    stub.flush()
    return result[0]


def answer(stub: StubTreq, method: str, url: str, **kwargs: Any) -> tuple[Any, bytes]:
    got: list[Any] = []
    getattr(stub, method.lower())(url, **kwargs).addCallback(got.append)
    stub.flush()
    assert got, "no answer"
    return got[0], body_of(stub, got[0])


def test_metrics_of_a_worker_cover_its_siblings() -> None:
    """
    If /metrics reaches worker 1, then it answers with its own series and worker
    0's, labelled, and counts worker 2 (no port known) as unreachable.
    """
    stub, worker, _ = routes(1, {5000: FakeResponse(200, sibling_text(7))}, {0: 5000, 1: 5001})
    response, body = answer(stub, "GET", "http://proxy/metrics")
    text = body.decode()
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    assert response.headers.getRawHeaders(b"x-shardkv-worker") == [b"1"]
    assert 'shardkv_map_epoch{worker="0"} 7.0' in text
    assert 'shardkv_map_epoch{worker="1"} 7.0' in text
    assert "shardkv_workers_unreachable 1.0" in text
    assert [c[1] for c in worker.http.calls] == [b"http://127.0.0.1:5000/metrics"]


@pytest.mark.parametrize(
    "sibling", [ConnectionRefusedError(), FakeResponse(403, b"no"), FakeResponse(200, b"\xff")]
)
def test_a_sibling_that_fails_is_left_out(sibling: Any) -> None:
    """
    If a sibling refuses, answers an error or garbage, then /metrics still
    answers, without that sibling's series, and counts it unreachable.
    """
    stub, _, _ = routes(0, {5001: sibling}, {1: 5001})
    response, body = answer(stub, "GET", "http://proxy/metrics")
    assert response.code == 200
    assert 'worker="1"' not in body.decode()
    assert "shardkv_workers_unreachable 2.0" in body.decode()


def test_a_slow_sibling_is_left_out_after_the_timeout() -> None:
    """
    If a sibling does not answer within 2 s, then /metrics answers without it.
    """
    clock = MemoryReactorClock()
    hanging: Deferred[Any] = Deferred()
    worker = Worker(0, 2, clock, FakeSiblings({5001: hanging}))
    worker.siblings = {1: 5001}
    result: list[bytes] = []
    Deferred.fromCoroutine(worker.metrics(sibling_text(3))).addCallback(result.append)
    assert result == []
    clock.advance(2.0)
    assert b"shardkv_workers_unreachable 1.0" in result[0]


def test_admin_routes_go_to_worker_zero() -> None:
    """
    If an admin request reaches worker 1, then it is sent, with its method, query
    and body, to worker 0's private port, and worker 0's answer is the answer.
    """
    plan = FakeResponse(
        409, b'{"error": "no_plan"}', {b"content-type": [b"application/json"], b"date": [b"x"]}
    )
    stub, worker, _ = routes(1, {5000: plan}, {0: 5000, 1: 5001})
    response, body = answer(stub, "POST", "http://proxy/admin/plan?x=1", data=b'{"remove": ["a"]}')
    assert (response.code, body) == (409, b'{"error": "no_plan"}')
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert response.headers.getRawHeaders(b"x-shardkv-worker") == [b"1"]
    method, url, kwargs = worker.http.calls[0]
    assert (method, url) == ("POST", b"http://127.0.0.1:5000/admin/plan?x=1")
    assert kwargs["data"] == b'{"remove": ["a"]}'


def test_worker_zero_serves_admin_routes_itself() -> None:
    """
    If an admin request reaches worker 0, then its own app answers it.
    """
    stub, worker, _ = routes(0, {}, {0: 5000, 1: 5001})
    _, body = answer(stub, "GET", "http://proxy/admin/rebalance")
    assert body == b"inner GET /admin/rebalance"
    assert worker.http.calls == []


@pytest.mark.parametrize("siblings", [{}, {0: 5000}])
def test_admin_routes_stay_here_when_worker_zero_is_not_there(siblings: dict[int, int]) -> None:
    """
    If worker 0 is not known to serve, or the request cannot be sent to it,
    then the worker that took the request answers it itself.
    """
    stub, _, _ = routes(1, {5000: ConnectionRefusedError()}, siblings)
    _, body = answer(stub, "POST", "http://proxy/admin/commit")
    assert body == b"inner POST /admin/commit"


def test_admin_request_lost_in_worker_zero_is_an_unknown_outcome() -> None:
    """
    If worker 0 took an admin request and gave no answer, then the client gets
    503 worker_unavailable, and the request is not run a second time here.
    """
    from twisted.web._newclient import ResponseNeverReceived

    stub, _, _ = routes(1, {5000: ResponseNeverReceived([Failure(Exception("gone"))])}, {0: 5000})
    response, body = answer(stub, "POST", "http://proxy/admin/commit")
    assert response.code == 503
    assert json.loads(body)["error"] == "worker_unavailable"


def test_a_reload_through_a_worker_tells_the_parent() -> None:
    """
    If POST /admin/reload reaches a worker, then it reloads itself (its app
    answers) and asks the parent to reload the others.
    """
    stub, _, told = routes(1, {}, {0: 5000})
    _, body = answer(stub, "POST", "http://proxy/admin/reload")
    assert body == b"inner POST /admin/reload"
    assert told == [{"reload": True}]


def test_other_routes_are_the_apps_with_the_worker_named() -> None:
    """
    If a data request reaches a worker, then its app answers it, with the
    worker's number in X-Shardkv-Worker.
    """
    stub, worker, _ = routes(2, {}, {})
    response, body = answer(stub, "GET", "http://proxy/kv/a")
    assert body == b"inner GET /kv/a"
    assert response.headers.getRawHeaders(b"x-shardkv-worker") == [b"2"]
    assert worker.http.calls == []


def test_the_private_port_wants_the_secret() -> None:
    """
    If a request to a worker's private port lacks the secret, then it is refused
    with 403; with it, the app answers.
    """
    stub = StubTreq(_PrivateResource(Inner(), "s3cret"))
    for headers, code in [({}, 403), ({b"authorization": [b"Bearer nope"]}, 403)]:
        response, _ = answer(stub, "GET", "http://w/metrics", headers=headers)
        assert response.code == code
    response, body = answer(
        stub, "GET", "http://w/metrics", headers={b"authorization": [b"Bearer s3cret"]}
    )
    assert (response.code, body) == (200, b"inner GET /metrics")


# -- adopting the parent's socket -------------------------------------------------------


@pytest.fixture
def parent_socket() -> Iterator[socket.socket]:
    """A listening socket as the parent passes it: bound, listening, non-blocking."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


class Hello(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"hello")  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.done.callback(self.data)


@pytest_twisted.ensureDeferred
async def test_an_endpoint_adopts_the_parents_socket(parent_socket: socket.socket) -> None:
    """
    If a worker listens on the parent's tcp endpoint through the adopting
    reactor, then it serves the parent's socket (no new bind), and stopping it
    leaves the parent's socket listening.
    """
    fd = os.dup(parent_socket.fileno())
    port_number = parent_socket.getsockname()[1]
    endpoint = serverFromString(
        _AdoptingReactor(reactor, fd, socket.AF_INET), f"tcp:{port_number}:interface=127.0.0.1"
    )
    port = await endpoint.listen(Factory.forProtocol(Hello))
    try:
        with pytest.raises(OSError):
            os.fstat(fd)  # the inherited descriptor is closed: the port has its own
        collect = Collect()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port_number), collect)
        assert await collect.done == b"hello"
    finally:
        await port.stopListening()
    parent_socket.getsockname()  # still open
    client = socket.create_connection(("127.0.0.1", port_number), timeout=2)
    client.close()  # the kernel still queues connections for the parent's socket
