"""
Tests of L{HTTPClientService}, the pooled treq client that the proxy and
nodes own as a service.

Requests go through the real treq client, Agent and connection pool onto a
L{MemoryReactorClock}: each connection the pool asks for is recorded there,
and the test completes it by hand over a L{StringTransport}, writes an HTTP
response into it, and sees whether the pool keeps the connection, drops it
or closes it later. Idle timeouts run on the reactor's clock.

The token is checked on the wire the same way. Certificate checks need a real
TLS handshake, so those tests run a tiny HTTPS server on 127.0.0.1 port 0 with
certificates from a throwaway CA (L{tests.tlscerts}), on the global reactor.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from hyperlink import EncodedURL
from OpenSSL import SSL
from service_identity import VerificationError
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort, IProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from shardkv.web.httpclient import (
    HTTPClientService,
    PreparedURL,
    PreparedURLs,
    load_ca_certificates,
)
from tests.tlscerts import CA, Leaf

reactor = cast(Any, _reactor)

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

    def test_stop_waits_for_a_call_in_flight(self) -> None:
        """
        If the service stops while a call is in flight, then the call still
        gets its answer, its connection then closes instead of being kept,
        and the stop fires only once it is gone.
        """
        service = self.started()
        d = service.request("GET", NODE + b"/a")
        (connection,) = connect_all(self.reactor)
        stopped = service.stopService()
        self.assertNoResult(stopped)
        connection.answer()
        assert self.successResultOf(d).code == 200
        assert connection.transport.disconnecting
        self.assertNoResult(stopped)
        connection.closed_by_server()
        assert self.successResultOf(stopped) is None

    def test_the_body_goes_out_with_the_head(self) -> None:
        """
        If a call has a body of bytes, then head and body leave in one write,
        with a Content-Length, and no cookie header.
        """
        service = self.started()
        d = service.request("POST", NODE + b"/replica/batch", data=b'{"ops":[]}')
        (connection,) = connect_all(self.reactor)
        sent = connection.transport.value()
        assert sent.startswith(b"POST /replica/batch HTTP/1.1\r\n")
        assert sent.endswith(b'\r\nContent-Length: 10\r\n\r\n{"ops":[]}')
        assert b"cookie" not in sent.lower()
        connection.answer()
        self.successResultOf(d)

    def test_cookies_are_never_kept_nor_sent(self) -> None:
        """
        If a node answers with Set-Cookie, then the next call carries no
        cookie; a caller passing cookies is refused with L{TypeError}.
        """
        service = self.started()
        d = service.request("GET", NODE + b"/a")
        (connection,) = connect_all(self.reactor)
        connection.protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a=b; Path=/\r\nContent-Length: 2\r\n\r\nok"
        )
        self.successResultOf(d)
        connection.transport.clear()
        d = service.request("GET", NODE + b"/a")
        assert b"cookie" not in connection.transport.value().lower()
        connection.answer()
        self.successResultOf(d)
        with pytest.raises(TypeError, match="cookies"):
            service.request("GET", NODE + b"/a", cookies={"a": "b"})

    def test_a_host_no_url_can_name_raises_at_once(self) -> None:
        """
        If the URL's host cannot be IDNA-encoded, then C{request} raises
        L{ValueError} before anything is sent (the replica client's "not a
        usable address"), as treq itself would.
        """
        service = self.started()
        with pytest.raises(ValueError):
            service.request("GET", b"http://a..b:9101/x")
        assert self.reactor.tcpClients == []


class PreparedURLTests(SynchronousTestCase):
    """L{PreparedURL}: treq sends it exactly as it would have sent the bytes."""

    def test_the_wire_form_is_what_treq_makes(self) -> None:
        """
        If a URL is prepared, then C{to_uri().to_text()} (what treq sends)
        gives the same text as treq's own parse of the bytes, for IP hosts,
        names, IDNA names, escapes and queries.
        """
        for url in [
            b"http://127.0.0.1:9101/replica/batch",
            b"https://node-1.example:8443/replica/kv/a%20b?x=1&y",
            b"http://xn--bcher-kva.example/k",
        ]:
            expected = EncodedURL.from_text(url.decode()).to_uri().to_text()
            prepared = PreparedURL.prepare(url)
            assert prepared.to_uri().to_text() == expected
            assert prepared.to_uri() is prepared

    def test_a_changed_copy_is_a_plain_url(self) -> None:
        """
        If treq changes a prepared URL (C{params=} replaces its query), then
        the copy is encoded afresh and carries the new query.
        """
        prepared = PreparedURL.prepare(b"http://127.0.0.1:9101/a?x=1")
        changed = prepared.replace(query=(*prepared.query, ("y", "2")))
        assert changed.to_uri().to_text() == "http://127.0.0.1:9101/a?x=1&y=2"

    def test_the_cache_is_bounded(self) -> None:
        """
        If more distinct URLs are prepared than the cache holds, then it
        starts again rather than growing; a URL seen again is the same object.
        """
        urls = PreparedURLs(size=3)
        first = urls.get(b"http://h:1/0")
        assert urls.get(b"http://h:1/0") is first
        for i in range(1, 4):
            urls.get(b"http://h:1/%d" % i)
        assert len(urls._urls) == 1
        assert urls.get(b"http://h:1/0") is not first

    def test_params_through_the_service(self) -> None:
        """
        If a caller passes C{params}, then they go out in the query (treq's
        own path, on a copy of the prepared URL).
        """
        reactor = MemoryReactorClock()
        service = HTTPClientService(reactor)
        service.startService()
        service.request("GET", NODE + b"/a?x=1", params={"y": "2"})
        (connection,) = connect_all(reactor)
        assert connection.transport.value().startswith(b"GET /a?x=1&y=2 HTTP/1.1\r\n")


TOKEN = "s3cret-cluster-token"


class TokenTests(SynchronousTestCase):
    """C{token}: every request the service sends carries the cluster token."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.connections: list[Connection] = []

    def sent(self, service: HTTPClientService, **kwargs: Any) -> bytes:
        """What goes on the wire for one GET sent with ``kwargs`` (on a kept connection)."""
        if self.connections:
            self.connections[-1].transport.clear()
        d = service.request("GET", NODE + b"/replica/kv/k", **kwargs)
        if not self.connections:
            self.connections = connect_all(self.reactor)
        assert len(self.reactor.tcpClients) == 1
        connection = self.connections[-1]
        data: bytes = connection.transport.value()
        connection.answer()
        self.successResultOf(d)
        return data

    def test_every_request_carries_the_bearer_token(self) -> None:
        """
        If the service has a token, then each request carries
        C{Authorization: Bearer <token>} exactly once, whatever form the
        caller's headers take (none, a dict, L{Headers}), the caller's own
        headers still go out, and the caller's objects are not changed.
        """
        service = HTTPClientService(self.reactor, token=TOKEN)
        service.startService()
        as_dict: dict[bytes, list[bytes]] = {b"X-Probe": [b"1"]}
        as_headers = Headers({b"X-Probe": [b"2"]})
        cases: list[tuple[dict[str, Any], bytes | None]] = [
            ({}, None),
            ({"headers": None}, None),
            ({"headers": as_dict}, b"X-Probe: 1\r\n"),
            ({"headers": {"X-Probe": "3"}}, b"X-Probe: 3\r\n"),
            ({"headers": as_headers}, b"X-Probe: 2\r\n"),
        ]
        for kwargs, probe in cases:
            sent = self.sent(service, **kwargs)
            head = sent.split(b"\r\n\r\n")[0]
            assert head.lower().count(b"\r\nauthorization:") == 1, kwargs
            assert b"\r\nAuthorization: Bearer s3cret-cluster-token\r\n" in sent, kwargs
            if probe is not None:
                assert probe in sent
        assert as_dict == {b"X-Probe": [b"1"]}
        assert list(as_headers.getAllRawHeaders()) == [(b"X-Probe", [b"2"])]

    def test_the_token_replaces_an_authorization_header_from_the_caller(self) -> None:
        """
        If a caller passes its own Authorization header, then the service's
        token wins and only one Authorization header goes out.
        """
        service = HTTPClientService(self.reactor, token=TOKEN)
        service.startService()
        for headers in [{b"authorization": [b"Bearer other"]}, Headers({"Authorization": ["x"]})]:
            sent = self.sent(service, headers=headers)
            assert sent.lower().count(b"authorization:") == 1
            assert b"Authorization: Bearer s3cret-cluster-token\r\n" in sent

    def test_no_token_sends_no_authorization(self) -> None:
        """
        If the service has no token, then its requests carry no
        Authorization header: a cluster without a token works as before.
        """
        service = HTTPClientService(self.reactor)
        service.startService()
        assert b"authorization" not in self.sent(service).lower()

    def test_a_token_that_cannot_be_a_header_is_refused_without_echoing_it(self) -> None:
        """
        If the token is empty or holds whitespace or control characters, then
        construction raises L{ValueError}, and the message never contains the
        token itself.
        """
        for bad in ["", "   ", "two words", "line\r\nX-Evil: 1", "tab\there", "caf\u00e9"]:
            with pytest.raises(ValueError) as raised:
                HTTPClientService(self.reactor, token=bad)
            if bad.strip():
                assert bad not in str(raised.value)

    def test_the_token_is_not_in_the_repr(self) -> None:
        """
        If the service is printed or logged, then the token is not shown.
        """
        service = HTTPClientService(self.reactor, token=TOKEN)
        service.startService()
        assert TOKEN not in repr(service)
        assert TOKEN not in str(service)


class CAFileTests(SynchronousTestCase):
    """C{ca_file}: which certificates the service trusts, checked at construction."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.dir = Path(tempfile.mkdtemp(prefix="shardkv-ca-"))
        self.addCleanup(shutil.rmtree, self.dir)

    def test_a_missing_file_is_refused_in_one_line(self) -> None:
        """
        If the CA file does not exist, then construction raises L{ValueError}
        with one line naming the file, so the process refuses to start.
        """
        missing = self.dir / "nope.pem"
        with pytest.raises(ValueError, match=r"nope\.pem") as raised:
            HTTPClientService(self.reactor, ca_file=str(missing))
        assert "\n" not in str(raised.value)

    def test_a_file_without_a_certificate_is_refused(self) -> None:
        """
        If the CA file holds no PEM certificate (garbage, a key, a broken
        certificate), then construction raises L{ValueError} in one line.
        """
        ca = CA.create(self.dir / "ca")
        leaf = ca.issue("node")
        broken = ca.pem.read_text().replace("A", "B", 40)
        for name, text in [
            ("empty.pem", ""),
            ("garbage.pem", "not a certificate\n"),
            ("key.pem", leaf.key.read_text()),
            ("broken.pem", broken),
        ]:
            path = self.dir / name
            path.write_text(text)
            with pytest.raises(ValueError, match=re.escape(name)) as raised:
                HTTPClientService(self.reactor, ca_file=str(path))
            assert "\n" not in str(raised.value), name

    def test_trust_root_reads_every_certificate_of_a_bundle(self) -> None:
        """
        If the CA file is a bundle of several certificates, then all of them
        are trusted, not only the first.
        """
        first, second = CA.create(self.dir / "a", "first"), CA.create(self.dir / "b", "second")
        bundle = self.dir / "bundle.pem"
        bundle.write_bytes(first.pem.read_bytes() + second.pem.read_bytes())
        assert [c.getSubject().commonName for c in load_ca_certificates(str(bundle))] == [
            b"first",
            b"second",
        ]


# -- TLS over real sockets --------------------------------------------------------


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"hello"


@dataclass
class TLSServer:
    """A tiny HTTPS server on 127.0.0.1 port 0, serving one certificate."""

    port: IListeningPort

    @property
    def number(self) -> int:
        address = self.port.getHost()
        assert isinstance(address, IPv4Address)
        return address.port


async def tls_server(leaf: Leaf) -> TLSServer:
    endpoint = serverFromString(
        reactor, f"ssl:0:interface=127.0.0.1:privateKey={leaf.key}:certKey={leaf.cert}"
    )
    return TLSServer(await endpoint.listen(Site(_Hello())))


async def fetch(service: HTTPClientService, url: str) -> bytes:
    response = await service.request("GET", url.encode("ascii"))
    body = await response.content()
    assert isinstance(body, bytes)
    return body


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("pki")
    ours, theirs = CA.create(root / "ours", "ours"), CA.create(root / "theirs", "theirs")
    return {
        "ca": ours,
        "good": ours.issue("good"),
        "foreign": theirs.issue("foreign"),
        "wrong-host": ours.issue("wrong", ("node.example", "10.9.9.9")),
    }


async def _attempt(pki: dict[str, Any], leaf: str, host: str, **kwargs: Any) -> bytes | Failure:
    server = await tls_server(pki[leaf])
    service = HTTPClientService(reactor, **kwargs)
    service.startService()
    try:
        return await fetch(service, f"https://{host}:{server.number}/")
    except Exception:
        return Failure()
    finally:
        await service.stopService()
        await maybeDeferred(server.port.stopListening)


@pytest_twisted.ensureDeferred
async def test_ca_file_verifies_the_server(pki: dict[str, Any]) -> None:
    """
    If the service has a CA file, then an https request to a server whose
    certificate that CA issued for the host in the URL (an IP address or a
    name) succeeds.
    """
    for host in ("127.0.0.1", "localhost"):
        assert await _attempt(pki, "good", host, ca_file=str(pki["ca"].pem)) == b"hello"


@pytest_twisted.ensureDeferred
async def test_ca_file_refuses_another_ca_and_another_host(pki: dict[str, Any]) -> None:
    """
    If the server's certificate comes from another CA, or was issued by the
    trusted CA for another host, then the request fails before any HTTP is
    exchanged; without a CA file the system trust store (which does not
    know the test CA) refuses even the good certificate.
    """
    ca = str(pki["ca"].pem)
    for leaf, kwargs in [
        ("foreign", {"ca_file": ca}),
        ("wrong-host", {"ca_file": ca}),
        ("good", {}),
    ]:
        result = await _attempt(pki, leaf, "127.0.0.1", **kwargs)
        assert isinstance(result, Failure), (leaf, kwargs)
        assert result.check(ResponseNeverReceived), (leaf, result)
        reasons = cast(ResponseNeverReceived, result.value).reasons
        assert any(r.check(SSL.Error, VerificationError) for r in reasons), leaf
