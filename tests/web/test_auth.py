"""
Tests of the access checks, L{shardkv.web.auth}: token files, bearer tokens,
protected mode and which endpoints count as loopback.

Requests go through C{StubTreq}, whose peer is 127.0.0.1; L{FromPeer} makes
a request look as if it came from elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from shardkv.web import auth
from shardkv.web.auth import Access, Guard, GuardedResource, TokenFileError, load_token
from tests.helpers import HTTP, Reply, flusher

TOKEN = "cluster-token-0123456789abcdef"
CLIENT_TOKEN = "client-token-0123456789abcdef"


class FromPeer(Resource):
    """Serves ``inner`` as if every request came from ``peer``."""

    isLeaf = True

    def __init__(self, inner: Resource, peer: object) -> None:
        super().__init__()
        self.inner = inner
        self.peer = peer

    def render(self, request: Any) -> Any:
        request.client = self.peer
        return self.inner.render(request)


class Hello(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"hello"


ROUTES = {b"/open": Access.OPEN, b"/data": Access.CLIENT, b"/view": Access.VIEW}


def policy(method: bytes, path: bytes) -> Access:
    return ROUTES.get(path, Access.CLUSTER)


# -- token files -------------------------------------------------------------------


def test_token_file_is_stripped(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"\n  {TOKEN}\r\n\t")
    assert load_token(str(path)) == TOKEN


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read"),
        (b"", "is empty"),
        (b" \n\t\n", "is empty"),
        (b"tiny-token", "shorter than 16"),
        (b"has a space inside it, so no", "printable ASCII"),
        ("t\u00f6ken-with-non-ascii-letters".encode(), "printable ASCII"),
        (b"x" * (64 * 1024 + 1), "larger than 64 KiB"),
    ],
)
def test_unusable_token_files_name_the_file(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    """
    A missing, empty, weak or odd token file is refused with one line that
    names the option and the file and says what is wrong, and never quotes
    the file's content.
    """
    path = tmp_path / "token"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TokenFileError) as caught:
        load_token(str(path), "--client-token-file")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("--client-token-file: ")
    assert str(path) in message
    assert expected in message
    secret = (content or b"").decode("utf-8").strip()
    if secret and len(secret) < 100:
        assert secret not in message


def test_unreadable_token_file(tmp_path: Path) -> None:
    """A directory stands in for an unreadable file (root reads any file)."""
    with pytest.raises(TokenFileError, match=f"cannot read {tmp_path}"):
        load_token(str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a mode-000 file")
def test_token_file_without_permission(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    path.chmod(0)
    with pytest.raises(TokenFileError, match="cannot read"):
        load_token(str(path))


# -- endpoints ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp:8081:interface=127.0.0.1", True),
        ("tcp:8081:interface=127.9.8.7", True),
        ("TCP:port=8081:interface=127.0.0.1", True),
        ("tcp:8081:127.0.0.1", True),
        (r"tcp6:8081:interface=\:\:1", True),
        (r"tcp6:8081:interface=\:\:ffff\:127.0.0.1", True),
        ("unix:/tmp/shardkv.sock", True),
        ("ssl:8443:privateKey=k.pem:certKey=c.pem:interface=127.0.0.1", True),
        ("tcp:0", False),
        ("tcp:8081", False),
        ("tcp:8081:interface=0.0.0.0", False),
        ("tcp:8081:interface=10.1.2.3", False),
        ("tcp:8081:interface=localhost", False),
        ("tcp6:8081", False),
        (r"tcp6:8081:interface=\:\:", False),
        ("ssl:8443:privateKey=k.pem", False),
        ("ssl:8443:k.pem:127.0.0.1", False),
        ("systemd:domain=INET:index=0", False),
    ],
)
def test_loopback_endpoint(endpoint: str, loopback: bool) -> None:
    """Only an endpoint that names a loopback interface (or a UNIX socket) counts as local."""
    assert auth.loopback_endpoint(endpoint) is loopback


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        (IPv4Address("TCP", "127.0.0.1", 1), True),
        (IPv4Address("TCP", "127.200.0.1", 1), True),
        (IPv6Address("TCP", "::1", 1), True),
        (IPv6Address("TCP", "::ffff:127.0.0.1", 1), True),
        (UNIXAddress(b"/tmp/s"), True),
        (IPv4Address("TCP", "10.0.0.1", 1), False),
        (IPv4Address("TCP", "0.0.0.0", 1), False),
        (IPv6Address("TCP", "::ffff:10.0.0.1", 1), False),
        (IPv6Address("TCP", "fe80::1%eth0", 1), False),
        (None, False),
    ],
)
def test_loopback_peer(peer: object, loopback: bool) -> None:
    assert auth.loopback_peer(peer) is loopback


# -- the guard ---------------------------------------------------------------------


class GuardTests(SynchronousTestCase):
    """The guard in front of a resource, with a route of each kind of access."""

    def serve(self, guard: Guard, peer: object = None) -> HTTP:
        inner: Resource = GuardedResource(Hello(), guard, policy)
        if peer is not None:
            inner = FromPeer(inner, peer)
        stub = StubTreq(inner)
        return HTTP(self, stub, "http://127.0.0.1:8081", flusher(stub))

    def assert_error(self, reply: Reply, status: int, code: str, *secrets: str) -> None:
        self.assertEqual(reply.error(), (status, code), reply.body)
        for secret in (TOKEN, CLIENT_TOKEN, *secrets):
            self.assertNotIn(secret.encode(), reply.body)
        self.assertEqual(
            reply.header("www-authenticate"), 'Bearer realm="shardkv"' if status == 401 else None
        )

    def test_cluster_routes_need_the_cluster_token(self) -> None:
        """
        With a cluster token, a cluster route answers 401 (and asks for a
        bearer token) when the request has no usable Authorization header,
        403 when the token is wrong, and passes the request on when it is
        right; the token never appears in an answer.
        """
        http = self.serve(Guard(TOKEN))
        self.assert_error(http.get("/replica/kv/k"), 401, "unauthorized")
        wrong = "not-the-cluster-token-at-all"
        for header in ["", "Bearer", "Bearer ", f"Basic {TOKEN}", TOKEN, f"Token {TOKEN}"]:
            reply = http.get("/replica/kv/k", {"Authorization": header})
            self.assert_error(reply, 401, "unauthorized")
        for token in [wrong, TOKEN[:-1], TOKEN + "x", CLIENT_TOKEN]:
            reply = http.get("/replica/kv/k", {"Authorization": f"Bearer {token}"})
            self.assert_error(reply, 403, "forbidden", token)
        for header in [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN} "]:
            reply = http.get("/replica/kv/k", {"Authorization": header})
            self.assertEqual((reply.code, reply.body), (200, b"hello"), header)
        self.assertEqual(http.get("/open").code, 200)

    def test_two_authorization_headers_are_refused(self) -> None:
        http = self.serve(Guard(TOKEN))
        stub = http.stub
        d = stub.get(
            "http://127.0.0.1:8081/x",
            headers={b"Authorization": [f"Bearer {TOKEN}".encode(), f"Bearer {TOKEN}".encode()]},
        )
        stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 401)

    def test_tokens_are_compared_in_constant_time(self) -> None:
        """Every comparison goes through C{hmac.compare_digest}, on equal-sized digests."""
        seen: list[tuple[bytes, bytes]] = []
        real = auth.hmac.compare_digest

        def spy(a: bytes, b: bytes) -> bool:
            seen.append((a, b))
            return real(a, b)

        self.patch(auth.hmac, "compare_digest", spy)
        http = self.serve(Guard(TOKEN, CLIENT_TOKEN))
        self.assertEqual(http.get("/x", {"Authorization": f"Bearer {TOKEN}"}).code, 200)
        self.assertEqual(http.get("/data", {"Authorization": "Bearer x"}).code, 403)
        self.assertEqual(len(seen), 3)  # one for the cluster route, both tokens for the data
        self.assertTrue(all(len(a) == len(b) == 32 for a, b in seen))

    def test_protected_mode_answers_loopback_peers_only(self) -> None:
        """
        With no cluster token, a cluster route answers loopback peers (and
        UNIX sockets) and refuses anyone else with a 403 that says how to fix
        it; open routes answer everyone.
        """
        peers: list[object] = [
            None,
            IPv4Address("TCP", "127.0.0.2", 5),
            IPv6Address("TCP", "::1", 5),
            UNIXAddress(b"/tmp/s"),
        ]
        for peer in peers:
            self.assertEqual(self.serve(Guard(), peer).get("/replica/kv/k").code, 200, peer)
        for peer in [IPv4Address("TCP", "10.0.0.1", 5), IPv6Address("TCP", "2001:db8::1", 5)]:
            http = self.serve(Guard(), peer)
            reply = http.get("/replica/kv/k", {"Authorization": f"Bearer {TOKEN}"})
            self.assert_error(reply, 403, "forbidden")
            self.assertIn("--token-file", reply.json()["message"])
            self.assertEqual(http.get("/open").code, 200)
            self.assertEqual(http.get("/data").code, 200)
            self.assertEqual(http.get("/view").code, 200)

    def test_a_token_holder_may_call_from_anywhere(self) -> None:
        http = self.serve(Guard(TOKEN), IPv4Address("TCP", "10.0.0.1", 5))
        self.assertEqual(http.get("/x", {"Authorization": f"Bearer {TOKEN}"}).code, 200)

    def test_client_routes(self) -> None:
        """
        The data routes are open unless a client token is set; then they take
        the client token (or the cluster token, which can do more anyway).
        """
        for guard in [Guard(), Guard(TOKEN)]:
            self.assertEqual(self.serve(guard).get("/data").code, 200)
        http = self.serve(Guard(TOKEN, CLIENT_TOKEN), IPv4Address("TCP", "10.0.0.1", 5))
        self.assert_error(http.get("/data"), 401, "unauthorized")
        self.assert_error(http.get("/data", {"Authorization": "Bearer nope"}), 403, "forbidden")
        for token in [CLIENT_TOKEN, TOKEN]:
            self.assertEqual(http.get("/data", {"Authorization": f"Bearer {token}"}).code, 200)
        self.assert_error(
            http.get("/x", {"Authorization": f"Bearer {CLIENT_TOKEN}"}), 403, "forbidden"
        )

    def test_views(self) -> None:
        """
        Views are open with no tokens, need the cluster token when only that
        is set, and the client token (or the cluster token) when one is set.
        """
        self.assertEqual(self.serve(Guard()).get("/view").code, 200)
        only_cluster = self.serve(Guard(TOKEN))
        self.assert_error(only_cluster.get("/view"), 401, "unauthorized")
        self.assertEqual(only_cluster.get("/view", {"Authorization": f"Bearer {TOKEN}"}).code, 200)
        client = self.serve(Guard(None, CLIENT_TOKEN))
        self.assert_error(client.get("/view"), 401, "unauthorized")
        reply = client.get("/view", {"Authorization": f"Bearer {CLIENT_TOKEN}"})
        self.assertEqual(reply.code, 200)

    def test_repr_shows_no_secret(self) -> None:
        text = repr(Guard(TOKEN, CLIENT_TOKEN)) + str(vars(Guard(TOKEN, CLIENT_TOKEN)))
        self.assertNotIn(TOKEN, text)
        self.assertNotIn(CLIENT_TOKEN, text)
        self.assertIn("cluster_token=set", repr(Guard(TOKEN)))

    def test_denials_are_json(self) -> None:
        reply = self.serve(Guard(TOKEN)).get("/x")
        body = json.loads(reply.body)
        self.assertEqual(set(body), {"error", "message"})
