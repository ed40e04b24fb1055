"""Listening, or refusing to start with one line: L{shardkv.web.listening}.

A port held by a plain socket of this test shows what a real bind failure
looks like; L{MemoryReactor} and hand-made endpoints cover the rest (a
listen that answers later, cancellation, stopping) without touching the
network. The real processes are in tests/system/test_startup.py.
"""

from __future__ import annotations

import errno
import io
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from zope.interface import implementer

from shardkv.web.listening import (
    ListeningService,
    address_name,
    echo_needed,
    listening_address,
    listening_service,
)

reactor = cast(Any, _reactor)
FACTORY = Factory.forProtocol(Protocol)


@implementer(ILogObserver)
class Terminal:
    """What was printed on the real stderr and what was logged at critical level."""

    def __init__(self) -> None:
        self.stderr = io.StringIO()
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def lines(self) -> list[str]:
        return [line for line in self.stderr.getvalue().splitlines() if line.strip()]

    def critical(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.critical]


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[Terminal]:
    seen = Terminal()
    monkeypatch.setattr(sys, "__stderr__", seen.stderr)
    globalLogPublisher.addObserver(seen)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(seen)


@pytest.fixture
def taken() -> Iterator[int]:
    """A port of 127.0.0.1 that a plain socket of this test listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def is_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port (what a server that binds it next would see)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
        return True


@implementer(IListeningPort)
class FakePort:
    def __init__(self) -> None:
        self.stopped = 0

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        self.stopped += 1

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 1)


@implementer(IStreamServerEndpoint)
class Endpoint:
    """An endpoint whose listen answers what the test says, when it says."""

    def __init__(self, answer: Deferred[IListeningPort] | None = None) -> None:
        self.calls = 0
        self.answer = answer if answer is not None else Deferred()

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        self.calls += 1
        return self.answer


class StopCounter:
    def __init__(self) -> None:
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1


def in_use(port: int) -> CannotListenError:
    cause = OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
    return CannotListenError("127.0.0.1", port, cause)


def service_on(endpoint: Any, reactor: Any = None, echo: bool = True) -> ListeningService:
    return ListeningService(
        endpoint,
        FACTORY,
        description="tcp:9001:interface=127.0.0.1",
        owner="node",
        reactor=reactor if reactor is not None else StopCounter(),
        echo=echo,
    )


# -- a port that is taken ------------------------------------------------------------


def test_taken_port_exits_with_one_line(terminal: Terminal, taken: int) -> None:
    """
    If the port is held by another socket, then privilegedStartService raises
    SystemExit(1) at once, and prints and logs one line naming the port and the
    endpoint, with no traceback.
    """
    description = f"tcp:{taken}:interface=127.0.0.1"
    service = listening_service(reactor, description, FACTORY, owner="node")
    with pytest.raises(SystemExit) as exited:
        service.privilegedStartService()
    assert exited.value.code == 1
    expected = (
        f"shardkv: cannot start the node: cannot listen on port {taken} of 127.0.0.1 "
        f"({description}): Address already in use (another process holds it)"
    )
    assert terminal.lines() == [expected]
    assert terminal.critical() == [expected]
    assert not any(e.get("log_failure") for e in terminal.events), "no traceback is logged"
    assert service.port is None


def test_taken_port_through_start_service_too(terminal: Terminal, taken: int) -> None:
    """
    If the service is started without privilegedStartService (a test tree, or
    a parent that skips it), then startService refuses in the same way.
    """
    service = listening_service(reactor, f"tcp:{taken}:interface=127.0.0.1", FACTORY, owner="proxy")
    with pytest.raises(SystemExit):
        service.startService()
    assert len(terminal.lines()) == 1
    assert f"cannot start the proxy: cannot listen on port {taken}" in terminal.lines()[0]


def test_echo_off_logs_the_line_only(terminal: Terminal) -> None:
    """
    If twistd's log is the terminal (echo off), then the line is logged and
    not printed again, so the operator reads it once.
    """
    service = service_on(Endpoint(fail(in_use(9001))), echo=False)
    with pytest.raises(SystemExit):
        service.privilegedStartService()
    assert terminal.lines() == []
    assert len(terminal.critical()) == 1
    assert "port 9001 of 127.0.0.1" in terminal.critical()[0]


def test_other_listen_errors_name_the_endpoint(terminal: Terminal) -> None:
    """
    If listening fails for another reason (no such interface, a unix path),
    then the line gives the reason; an error that is not a CannotListenError
    is reported by its message.
    """
    cause = OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))
    service = service_on(Endpoint(fail(CannotListenError("10.9.9.9", 9001, cause))))
    with pytest.raises(SystemExit):
        service.privilegedStartService()
    unix = ListeningService(
        Endpoint(fail(CannotListenError(None, "/nope/s.sock", OSError(2, "No such file")))),
        FACTORY,
        description="unix:/nope/s.sock",
        owner="node",
        reactor=StopCounter(),
    )
    with pytest.raises(SystemExit):
        unix.privilegedStartService()
    odd = service_on(Endpoint(fail(RuntimeError("the endpoint broke"))))
    with pytest.raises(SystemExit):
        odd.privilegedStartService()
    assert terminal.lines() == [
        "shardkv: cannot start the node: cannot listen on port 9001 of 10.9.9.9 "
        "(tcp:9001:interface=127.0.0.1): Cannot assign requested address",
        "shardkv: cannot start the node: cannot listen on /nope/s.sock (unix:/nope/s.sock): "
        "No such file",
        "shardkv: cannot start the node: cannot listen on tcp:9001:interface=127.0.0.1: "
        "the endpoint broke",
    ]


@pytest.mark.parametrize(
    "description",
    ["tcp:notaport", "nosuchtype:1", "ssl:8443:privateKey=/nonexistent/key.pem"],
)
def test_unusable_endpoint_string_exits_with_one_line(terminal: Terminal, description: str) -> None:
    """
    If Twisted cannot make an endpoint of the string (no port, an unknown
    type, a missing key file), then building the listener exits with one line
    naming the string (printed: twistd's log has not begun yet).
    """
    with pytest.raises(SystemExit) as exited:
        listening_service(MemoryReactor(), description, FACTORY, owner="node", echo=False)
    assert exited.value.code == 1
    lines = terminal.lines()
    assert len(lines) == 1
    assert lines[0].startswith(f"shardkv: cannot start the node: cannot listen on {description}: ")


# -- listening and stopping ----------------------------------------------------------


def test_listens_once_in_privileged_start() -> None:
    """
    If twistd calls privilegedStartService and then startService, then the
    endpoint is asked to listen exactly once, before startService.
    """
    memory = MemoryReactor()
    service = listening_service(memory, "tcp:9001:interface=127.0.0.1", FACTORY, owner="node")
    service.privilegedStartService()
    assert [(p, i) for p, _, _, i in memory.tcpServers] == [(9001, "127.0.0.1")]
    assert memory.tcpServers[0][1] is FACTORY
    service.startService()
    assert len(memory.tcpServers) == 1
    assert service.running and service.port is not None


def test_start_service_alone_listens() -> None:
    """
    If only startService is called, then it listens (once).
    """
    endpoint = Endpoint(succeed(cast(IListeningPort, FakePort())))
    service = service_on(endpoint)
    service.startService()
    assert endpoint.calls == 1 and service.port is not None


def test_stop_closes_the_port() -> None:
    """
    If the service stops, then it stops listening on its port and its
    Deferred fires when the port has closed; a second stop does nothing.
    """
    port = FakePort()
    service = service_on(Endpoint(succeed(cast(IListeningPort, port))))
    service.privilegedStartService()
    service.startService()
    done: list[object] = []
    service.stopService().addCallback(done.append)
    assert port.stopped == 1 and done == [None] and not service.running
    service.stopService()
    assert port.stopped == 1


def test_stop_waits_for_the_port_to_close() -> None:
    """
    If the port closes asynchronously, then stopService fires only once it
    has.
    """
    closing: Deferred[None] = Deferred()

    class SlowPort(FakePort):
        def stopListening(self) -> Deferred[None]:  # type: ignore[override]
            return closing

    service = service_on(Endpoint(succeed(cast(IListeningPort, SlowPort()))))
    service.startService()
    done: list[object] = []
    service.stopService().addCallback(done.append)
    assert done == []
    closing.callback(None)
    assert done == [None]


@pytest_twisted.ensureDeferred
async def test_real_port_is_released_on_stop() -> None:
    """
    If a listener on a real port stops, then the port is free again.
    """
    service = listening_service(reactor, "tcp:0:interface=127.0.0.1", FACTORY, owner="node")
    service.privilegedStartService()
    service.startService()
    assert service.port is not None
    address = service.port.getHost()
    assert isinstance(address, IPv4Address)
    assert not is_free(address.port)
    await service.stopService()
    assert is_free(address.port)


# -- a listen that answers later -----------------------------------------------------


def test_late_listen_success_is_kept_and_closed() -> None:
    """
    If the endpoint listens later, then start returns at once, the port is
    kept when it comes, and stop closes it.
    """
    endpoint = Endpoint()
    service = service_on(endpoint)
    service.privilegedStartService()
    service.startService()
    assert service.port is None
    port = FakePort()
    endpoint.answer.callback(cast(IListeningPort, port))
    assert service.port is port
    service.stopService()
    assert port.stopped == 1


def test_late_listen_failure_stops_the_reactor_with_one_line(terminal: Terminal) -> None:
    """
    If the endpoint fails later, then the same one line is printed and
    logged, and the reactor is stopped rather than left serving nothing.
    """
    endpoint = Endpoint()
    stopper = StopCounter()
    service = service_on(endpoint, reactor=stopper)
    service.privilegedStartService()
    service.startService()
    endpoint.answer.errback(in_use(9001))
    assert stopper.stops == 1
    assert len(terminal.lines()) == 1 and "port 9001 of 127.0.0.1" in terminal.lines()[0]
    assert len(terminal.critical()) == 1


def test_stop_before_a_late_listen_cancels_it(terminal: Terminal) -> None:
    """
    If the service stops while the endpoint has not answered, then the
    attempt is cancelled: no line, no reactor stop, and stop fires.
    """
    endpoint = Endpoint()
    stopper = StopCounter()
    service = service_on(endpoint, reactor=stopper)
    service.privilegedStartService()
    done: list[object] = []
    service.stopService().addCallback(done.append)
    assert done == [None]
    assert stopper.stops == 0 and terminal.lines() == [] and terminal.critical() == []


# -- who prints ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "echo"),
    [
        (None, True),
        ({"nodaemon": True, "logfile": None}, False),
        ({"nodaemon": True, "logfile": "-"}, False),
        ({"nodaemon": True, "logfile": "x.log"}, True),
        ({"nodaemon": True, "logfile": None, "syslog": True}, True),
        ({"nodaemon": False, "logfile": None}, True),
    ],
)
def test_echo_needed_unless_the_log_is_the_terminal(options: Any, echo: bool) -> None:
    """
    The line is printed besides being logged unless twistd -n logs to stdout.
    """
    assert echo_needed(options) is echo


# -- the address an endpoint listens on ----------------------------------------------


@pytest.mark.parametrize(
    ("description", "address"),
    [
        ("tcp:9001", ("", 9001)),
        ("tcp:9001:interface=10.0.0.5", ("10.0.0.5", 9001)),
        ("tcp:9001:interface=0.0.0.0", ("", 9001)),
        ("tcp:port=9001:interface=10.0.0.5", ("10.0.0.5", 9001)),
        ("tcp:9001:10.0.0.5", ("10.0.0.5", 9001)),
        ("TCP:9001:backlog=5:interface=127.0.0.2", ("127.0.0.2", 9001)),
        ("tcp6:9001:interface=\\:\\:1", ("::1", 9001)),
        ("tcp6:9001", ("", 9001)),
        ("ssl:8443:privateKey=k.pem:certKey=c.pem", ("", 8443)),
        ("ssl:8443:privateKey=a\\:b.pem:interface=10.0.0.6", ("10.0.0.6", 8443)),
        ("ssl:8443:k.pem:c.pem:SSLv23_METHOD:10.0.0.7", ("10.0.0.7", 8443)),
        ("tls:/etc/certs:interface=10.0.0.8", ("10.0.0.8", 443)),
        ("tls:/etc/certs:port=8443", ("", 8443)),
        ("unix:/tmp/node.sock", None),
        ("systemd:domain=INET:index=0", None),
        ("tcp:0:interface=127.0.0.1", None),
    ],
)
def test_listening_address(description: str, address: tuple[str, int] | None) -> None:
    """
    The (interface, port) of tcp, tcp6, ssl and tls strings, read as Twisted
    reads them (positional or named, escaped colons); "" for every interface;
    None where there is no fixed port.
    """
    assert listening_address(description) == address


@pytest.mark.parametrize("description", ["tcp:9001:interface=10.0.0.5", "tcp:0", "tcp6:1234"])
def test_listening_address_agrees_with_twisted(description: str) -> None:
    """
    The port and interface read here are the ones Twisted's own parser gives
    the reactor.
    """
    memory = MemoryReactor()
    serverFromString(memory, description).listen(FACTORY)
    port, _, _, interface = memory.tcpServers[0]
    expected = None if port == 0 else (interface if interface not in ("", "::") else "", port)
    assert listening_address(description) == expected


@pytest.mark.parametrize("description", ["tcp:abc", "ssl:x:privateKey=k.pem", "tcp:70000", "tcp"])
def test_listening_address_refuses_bad_ports(description: str) -> None:
    """
    A port that is no number (or no port at all) is a ValueError naming it.
    """
    with pytest.raises(ValueError, match="port"):
        listening_address(description)


def test_address_name_uses_the_host_name_for_every_interface() -> None:
    """
    A process on every interface is named after the machine; one bound to an
    interface after that interface.
    """
    assert address_name("tcp:9001", hostname=lambda: "db-3") == ("db-3", 9001)
    assert address_name("tcp:9001:interface=10.0.0.5", hostname=lambda: "db-3") == (
        "10.0.0.5",
        9001,
    )
    assert address_name("unix:/tmp/s") is None
