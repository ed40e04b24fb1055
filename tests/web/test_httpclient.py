"""
Tests of L{HTTPClientService}, the pooled treq client that the proxy and
nodes own as a service.

Requests go through the real treq client, Agent and connection pool onto a
L{MemoryReactorClock}: each connection the pool asks for is recorded there,
and the test completes it by hand over a L{StringTransport}, writes an HTTP
response into it, and sees whether the pool keeps the connection, drops it
or closes it later. Idle timeouts run on the reactor's clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from treq.client import HTTPClient
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from shardkv.web.httpclient import HTTPClientService

NODE = b"http://127.0.0.1:9101"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Connection:
    """One connection the pool opened, completed over a string transport."""

    protocol: IProtocol
    transport: StringTransport

    def answer(self) -> None:
        """The server's whole response; the connection is then idle."""
        self.protocol.dataReceived(OK)

    def closed_by_server(self) -> None:
        """The far end acknowledges a close the client asked for."""
        self.protocol.connectionLost(Failure(ConnectionDone()))


def connect_all(reactor: MemoryReactorClock) -> list[Connection]:
    """Complete every connection attempt the reactor has recorded so far."""
    connections = []
    for host, port, factory, _, _ in reactor.tcpClients:
        address = IPv4Address("TCP", host, port)
        protocol = factory.buildProtocol(address)
        assert protocol is not None
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        connections.append(Connection(protocol, transport))
    return connections


class HTTPClientServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def started(self, max_per_host: int = 4, idle_timeout: float = 30.0) -> HTTPClientService:
        service = HTTPClientService(self.reactor, max_per_host, idle_timeout)
        service.startService()
        return service

    def test_request_before_start_raises(self) -> None:
        """
        If a request is made before the service has started, then it raises
        L{RuntimeError} and opens no connection: the pool exists only while
        the service runs, so nothing can leak a connection past its stop.
        """
        service = HTTPClientService(self.reactor)
        with pytest.raises(RuntimeError, match="not running"):
            service.request("GET", NODE + b"/health")
        assert service.http is None
        assert self.reactor.tcpClients == []

    def test_request_goes_through_treq_on_the_reactor(self) -> None:
        """
        If the service is running, then a request is treq's: sent on a
        connection that the reactor given at construction opens, and answered
        with treq's response.
        """
        service = self.started()
        assert isinstance(service.http, HTTPClient)
        d = service.request("GET", NODE + b"/health", headers={b"X-Probe": [b"1"]})
        assert [(h, p) for h, p, *_ in self.reactor.tcpClients] == [("127.0.0.1", 9101)]
        (connection,) = connect_all(self.reactor)
        sent = connection.transport.value()
        assert sent.startswith(b"GET /health HTTP/1.1\r\n")
        assert b"X-Probe: 1\r\n" in sent
        connection.answer()
        response = self.successResultOf(d)
        assert response.code == 200
        assert self.successResultOf(response.content()) == b"ok"

    def test_idle_connections_are_kept_and_reused(self) -> None:
        """
        If a request has been answered, then its connection stays open in the
        pool and the next request to that node goes out on it: one TCP
        connection, not one per request.
        """
        service = self.started()
        first = service.request("GET", NODE + b"/a")
        (connection,) = connect_all(self.reactor)
        connection.answer()
        self.successResultOf(first)
        assert not connection.transport.disconnecting
        connection.transport.clear()
        second = service.request("GET", NODE + b"/b")
        assert len(self.reactor.tcpClients) == 1
        assert connection.transport.value().startswith(b"GET /b HTTP/1.1\r\n")
        connection.answer()
        self.successResultOf(second)

    def test_pool_keeps_at_most_max_per_host(self) -> None:
        """
        If more requests to one node finish at once than C{max_per_host},
        then the pool keeps that many connections open and closes the rest.
        """
        for max_per_host, closed in [(1, 2), (2, 1), (3, 0)]:
            reactor = self.reactor = MemoryReactorClock()
            service = self.started(max_per_host=max_per_host)
            requests = [service.request("GET", NODE + b"/%d" % i) for i in range(3)]
            connections = connect_all(reactor)
            assert len(connections) == 3  # the limit is on idle connections, not on requests
            for connection in connections:
                connection.answer()
            for d in requests:
                self.successResultOf(d)
            dropped = [c for c in connections if c.transport.disconnecting]
            assert len(dropped) == closed, max_per_host

    def test_idle_connection_closes_after_the_idle_timeout(self) -> None:
        """
        If a kept connection is idle for C{idle_timeout} seconds of reactor
        time, then the pool closes it: before twisted.web's 60 s server
        timeout would close it under a request the client just sent.
        """
        self.assert_idle_close(self.started(idle_timeout=12.5), 12.5)

    def test_default_idle_timeout_is_below_the_server_timeout(self) -> None:
        """
        If no idle timeout is given, then a kept connection closes after 30 s,
        half twisted.web's 60 s server timeout.
        """
        service = HTTPClientService(self.reactor)
        service.startService()
        self.assert_idle_close(service, 30.0)

    def assert_idle_close(self, service: HTTPClientService, seconds: float) -> None:
        """One answered request leaves a kept connection that closes after ``seconds`` idle."""
        d = service.request("GET", NODE + b"/a")
        (connection,) = connect_all(self.reactor)
        connection.answer()
        self.successResultOf(d)
        self.reactor.advance(seconds - 0.1)
        assert not connection.transport.disconnecting
        self.reactor.advance(0.2)
        assert connection.transport.disconnecting

    def test_stop_closes_cached_connections_and_the_client(self) -> None:
        """
        If the service stops, then it closes every kept connection, its stop
        fires once they are closed, and later requests raise as before start:
        a stopped proxy or node leaves no socket open.
        """
        service = self.started()
        d = service.request("GET", NODE + b"/a")
        (connection,) = connect_all(self.reactor)
        connection.answer()
        self.successResultOf(d)
        stopped = service.stopService()
        assert connection.transport.disconnecting
        self.assertNoResult(stopped)
        connection.closed_by_server()
        assert self.successResultOf(stopped) is None
        assert not service.running
        assert service.http is None
        with pytest.raises(RuntimeError, match="not running"):
            service.request("GET", NODE + b"/a")
        assert self.reactor.getDelayedCalls() == []  # the idle timer went with the pool

    def test_stop_before_start_fires_at_once(self) -> None:
        """
        If a service that never started is stopped, then the stop fires at
        once: a tree whose start failed part-way still stops cleanly.
        """
        service = HTTPClientService(self.reactor)
        assert self.successResultOf(service.stopService()) is None

    def test_restart_opens_a_new_pool(self) -> None:
        """
        If the service is started again after a stop, then requests work
        again on fresh connections.
        """
        service = self.started()
        self.successResultOf(service.stopService())
        service.startService()
        d = service.request("GET", NODE + b"/a")
        (connection,) = connect_all(self.reactor)
        connection.answer()
        assert self.successResultOf(d).code == 200
