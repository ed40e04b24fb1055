"""L{shardkv.testing.polling}: waits with deadlines, and free ports.

Every real-process test synchronises through L{poll_until} and
L{wait_healthy}; if they returned early, swallowed the wrong errors or never
gave up, those tests would flake or hang instead of failing with a reason.
L{wait_healthy} is tried against a small real HTTP server started here.
"""

from __future__ import annotations

import http.server
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shardkv.client.api import Reply
from shardkv.testing import polling
from shardkv.testing.polling import (
    HOST,
    RESERVED_PORTS,
    ProcessError,
    free_port,
    poll_until,
    wait_healthy,
)

FAST = 0.001
"""A poll interval that keeps these tests quick."""


class Script:
    """A ``check`` that plays a list of outcomes (exceptions are raised), then repeats the last."""

    def __init__(self, *outcomes: object) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    def __call__(self) -> object:
        outcome = self.outcomes[min(self.calls, len(self.outcomes) - 1)]
        self.calls += 1
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


# -- poll_until ---------------------------------------------------------------------


def test_returns_the_first_truthy_value() -> None:
    """Falsy answers (None, 0, empty) mean "not yet"; the first real one is returned."""
    check = Script(None, 0, "", [], {"ready": True}, "later")
    assert poll_until(check, 10, "readiness", interval=FAST) == {"ready": True}
    assert check.calls == 5


@pytest.mark.parametrize(
    "error",
    [ConnectionRefusedError("refused"), AssertionError("not yet"), ValueError("bad JSON")],
    ids=["OSError", "AssertionError", "ValueError"],
)
def test_retries_through_the_errors_of_a_condition_that_does_not_hold_yet(
    error: Exception,
) -> None:
    check = Script(error, error, "done")
    assert poll_until(check, 10, "the thing", interval=FAST) == "done"
    assert check.calls == 3


def test_any_other_error_is_a_bug_and_stops_at_once() -> None:
    """A KeyError or TypeError will not go away by waiting."""
    check = Script(KeyError("oops"), "done")
    with pytest.raises(KeyError, match="oops"):
        poll_until(check, 10, "the thing", interval=FAST)
    assert check.calls == 1


def test_times_out_naming_what_it_waited_for_and_the_last_error() -> None:
    check = Script(OSError("first"), ValueError("unreadable: last"))
    began = time.monotonic()
    with pytest.raises(ProcessError) as caught:
        poll_until(check, 0.2, "node 7 to come up", interval=0.01)
    assert time.monotonic() - began >= 0.2
    message = str(caught.value)
    assert "timed out after 0.2 s waiting for node 7 to come up" in message
    assert "ValueError('unreadable: last')" in message
    assert check.calls > 2


def test_times_out_reporting_the_last_falsy_answer() -> None:
    with pytest.raises(ProcessError, match=r"last: \[\]$"):
        poll_until(Script([]), 0.05, "a non-empty list", interval=FAST)


def test_tries_once_even_with_no_time_left() -> None:
    check = Script(None)
    with pytest.raises(ProcessError):
        poll_until(check, 0, "anything", interval=FAST)
    assert check.calls == 1
    assert poll_until(Script("yes"), 0, "anything") == "yes"


def test_alive_raising_stops_at_once() -> None:
    """``alive`` is asked before each attempt: a process that exited ends the wait
    with its own error, long before the deadline."""
    check = Script(None)
    lives = Script(None, None, ProcessError("node exited with status 1"))

    def alive() -> None:
        lives()

    with pytest.raises(ProcessError, match="exited with status 1"):
        poll_until(check, 60, "the node", interval=FAST, alive=alive)
    assert (lives.calls, check.calls) == (3, 2)


# -- free_port --------------------------------------------------------------------------


class FakeSockets:
    """Stands in for the ``socket`` module: each bound socket gets the next scripted port."""

    AF_INET = socket.AF_INET
    SOCK_STREAM = socket.SOCK_STREAM

    def __init__(self, *ports: int) -> None:
        self.ports = iter(ports)

    def socket(self, *args: Any) -> Any:
        ports = self.ports

        class Bound:
            def __enter__(self) -> Bound:
                return self

            def __exit__(self, *exc: object) -> None:
                pass

            def bind(self, address: tuple[str, int]) -> None:
                assert address == (HOST, 0)

            def getsockname(self) -> tuple[str, int]:
                return (HOST, next(ports))

        return Bound()


@pytest.fixture
def fresh_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty record of handed-out ports, so scripted ports are not taken already."""
    monkeypatch.setattr(polling, "_handed_out", set())


@pytest.mark.usefixtures("fresh_ports")
def test_free_port_skips_the_reserved_ports_and_ports_already_handed_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(polling, "socket", FakeSockets(8080, 8083, 40001, 40001, 8081, 40002))
    assert free_port() == 40001
    assert free_port() == 40002


@pytest.mark.usefixtures("fresh_ports")
def test_free_port_gives_up_when_the_kernel_offers_only_reserved_ports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(polling, "socket", FakeSockets(*[8080, 8081, 8082, 8083] * 25, 40001))
    with pytest.raises(ProcessError, match="could not find a free port"):
        free_port()


def test_free_ports_are_distinct_unreserved_and_free() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert not set(ports) & RESERVED_PORTS
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, ports[-1]))  # nothing listens there


# -- wait_healthy, against a real HTTP server --------------------------------------------


class Health(http.server.ThreadingHTTPServer):
    """Answers every GET with the next scripted status and JSON body (then repeats the last)."""

    def __init__(self) -> None:
        super().__init__((HOST, 0), HealthHandler)
        self.script: list[tuple[int, dict[str, Any]]] = [(200, {"status": "ok"})]
        self.hits: list[str] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/health"

    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.hits.append(path)
            return self.script[min(len(self.hits), len(self.script)) - 1]


class HealthHandler(http.server.BaseHTTPRequestHandler):
    server: Health

    def do_GET(self) -> None:
        status, payload = self.server.answer(self.path)
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Health]:
    health = Health()
    thread = threading.Thread(target=health.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    try:
        yield health
    finally:
        health.shutdown()
        health.server_close()
        thread.join()


def test_a_200_passes_at_once(server: Health) -> None:
    reply = wait_healthy(server.url, 5)
    assert isinstance(reply, Reply)
    assert (reply.status, reply.json()) == (200, {"status": "ok"})
    assert server.hits == ["/health"]


def test_a_503_keeps_polling_until_it_turns_200(server: Health) -> None:
    server.script = [(503, {"status": "failing"})] * 3 + [(200, {"status": "ok"})]
    assert wait_healthy(server.url, 10).status == 200
    assert len(server.hits) == 4


def test_a_503_keeps_polling_until_the_deadline(server: Health) -> None:
    server.script = [(503, {"status": "failing"})]
    began = time.monotonic()
    with pytest.raises(ProcessError) as caught:
        wait_healthy(server.url, 0.3)
    assert time.monotonic() - began >= 0.3
    assert f"waiting for {server.url} to be healthy" in str(caught.value)
    assert "not ready" in str(caught.value) and "503" in str(caught.value)
    assert len(server.hits) > 1


def test_ready_must_hold_as_well(server: Health) -> None:
    """A 200 is not enough while ``ready`` says no (a node still replaying, say)."""
    server.script = [(200, {"ready": False}), (200, {"ready": False}), (200, {"ready": True})]
    reply = wait_healthy(server.url, 10, ready=lambda r: bool(r.json()["ready"]))
    assert reply.json() == {"ready": True}
    assert len(server.hits) == 3


def test_alive_raising_stops_before_any_request(server: Health) -> None:
    def dead() -> None:
        raise ProcessError("node exited with status 2")

    with pytest.raises(ProcessError, match="exited with status 2"):
        wait_healthy(server.url, 60, alive=dead)
    assert server.hits == []


def test_nobody_listening_keeps_polling_until_the_deadline() -> None:
    """A refused connection (an OSError) means "not up yet", and is what is reported."""
    url = f"http://{HOST}:{free_port()}/health"
    with pytest.raises(
        ProcessError, match=re.escape(f"waiting for {url} to be healthy; last: NotSent")
    ):
        wait_healthy(url, 0.2)
