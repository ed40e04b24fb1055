"""The asynchronous API client over StubTreq, against a whole cluster in memory.

No reactor and no sockets: the client's deadlines run on a C{Clock} that
only moves when a test moves it, and the cluster's StubTreqs are flushed
until each answer is in.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionRefusedError, TCPTimedOutError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from shardkv.client.api import APIError, Client, MaybeSent, NotSent, Reply, quote_key
from shardkv.testing.memory import MemoryCluster
from tests.helpers import flusher

PROXY = "http://127.0.0.1:8080"
NODES = [f"127.0.0.1:{p}" for p in range(8081, 8084)]
ODD_KEY = "a/b?c=1&d+e%f café 🙂"


class FailingHTTP:
    """An HTTP object whose every request fails (or hangs) the way it is told."""

    def __init__(self, result: Deferred[Any] | None) -> None:
        self.result = result
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        self.calls.append((method, url, kwargs))
        if self.result is None:
            return Deferred()  # never answers; cancellable
        return self.result


class ClientOverCluster(SynchronousTestCase):
    def setUp(self) -> None:
        self.cluster = MemoryCluster(NODES)
        self.clock = Clock()
        self.client = Client(self.cluster.proxy, PROXY, reactor=self.clock)
        self.pump = flusher(self.cluster.node_http, self.cluster.proxy)

    def answer(self, d: Deferred[Reply]) -> Reply:
        self.pump(d)
        return self.successResultOf(d)

    def test_seed_api_round_trip(self) -> None:
        written = self.answer(self.client.set(ODD_KEY, "alice"))
        self.assertEqual(written.status, 200)
        version = written.json()["version"]
        got = self.answer(self.client.get(ODD_KEY)).expect(200).json()
        self.assertEqual(got, {"key": ODD_KEY, "value": "alice", "version": version})
        self.assertEqual(self.answer(self.client.set(ODD_KEY, "bob", version="1-0-x")).status, 412)
        self.assertEqual(self.answer(self.client.remove(ODD_KEY)).status, 200)
        self.assertEqual(self.answer(self.client.get(ODD_KEY)).status, 404)

    def test_rest_round_trip_with_conditions(self) -> None:
        created = self.answer(self.client.put(ODD_KEY, b"\x00v1", content_type="image/png"))
        self.assertEqual(created.status, 201)
        etag = created.header("etag")
        self.assertIsNotNone(etag)
        got = self.answer(self.client.read(ODD_KEY))
        self.assertEqual(
            (got.status, got.body, got.header("Content-Type")), (200, b"\x00v1", "image/png")
        )
        self.assertEqual(got.headers["etag"], etag)
        assert etag is not None
        replaced = self.answer(self.client.put(ODD_KEY, "v2", if_match=etag))
        self.assertEqual(replaced.status, 200)
        stale = self.answer(self.client.put(ODD_KEY, "v3", if_match=etag))
        self.assertEqual(stale.error(), (412, stale.json()["error"]))
        self.assertEqual(self.answer(self.client.read(ODD_KEY)).text, "v2")
        self.assertEqual(self.answer(self.client.put(ODD_KEY, "x", if_none_match="*")).status, 412)
        self.assertEqual(self.answer(self.client.delete(ODD_KEY)).status, 200)
        self.assertEqual(self.answer(self.client.read(ODD_KEY)).status, 404)

    def test_keys_are_encoded_once(self) -> None:
        self.assertEqual(quote_key("a/b%2F c"), "a%2Fb%252F%20c")
        self.answer(self.client.put("100%", "v"))
        replicas = self.answer(self.client.explain("100%")).expect().json()
        self.assertEqual(replicas["key"], "100%")

    def test_operations(self) -> None:
        self.assertEqual(self.answer(self.client.health()).json()["status"], "ok")
        nodes = {n["node"] for n in self.answer(self.client.cluster()).expect(200).json()["nodes"]}
        self.assertEqual(nodes, set(NODES))

    def test_expect_raises_with_the_error(self) -> None:
        missing = self.answer(self.client.read("absent"))
        with self.assertRaises(APIError) as caught:
            missing.expect()
        self.assertEqual(caught.exception.status, 404)
        self.assertIn("not_found", str(caught.exception))
        self.assertIs(missing.expect(404), missing)

    def test_at_aims_the_same_client_elsewhere(self) -> None:
        first = Client(self.cluster.node_http, "http://" + NODES[0], reactor=self.clock)
        second = first.at("http://" + NODES[1], timeout=1.0)
        self.assertEqual(
            (second.http, second.reactor, second.timeout), (first.http, self.clock, 1.0)
        )
        self.assertEqual(self.answer(second.health()).json()["node"], NODES[1])
        self.assertEqual(self.answer(first.health()).json()["node"], NODES[0])


def test_reply_header_refuses_to_pick_one_of_several() -> None:
    reply = Reply(200, {"x": "2"}, b"", {"x": ("1", "2")})
    with pytest.raises(ValueError, match="given 2 times"):
        reply.header("X")
    assert reply.header("missing") is None
    with pytest.raises(ValueError, match="not a shardkv error"):
        Reply(500, {}, b'{"oops": 1}').error()


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (ConnectionRefusedError(), NotSent),
        (TCPTimedOutError(), NotSent),
        (ResponseNeverReceived([Failure(CancelledError())]), MaybeSent),
        (ResponseFailed([Failure(ConnectionRefusedError())]), MaybeSent),
    ],
)
def test_no_answer_says_whether_it_was_sent(failure: Exception, expected: type) -> None:
    client = Client(FailingHTTP(fail(failure)), PROXY, reactor=Clock())
    d = client.get("k")
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert len(failures) == 1 and failures[0].check(expected), failures
    assert isinstance(failures[0].value, OSError)


def test_every_request_has_a_deadline() -> None:
    clock = Clock()
    http = FailingHTTP(None)
    client = Client(http, PROXY, reactor=clock, timeout=3.0)
    d = client.set("k", "v")
    (method, url, kwargs) = http.calls[0]
    assert (method, url) == ("POST", PROXY + "/set")
    assert (kwargs["timeout"], kwargs["reactor"], kwargs["allow_redirects"]) == (3.0, clock, False)
    failures: list[Failure] = []
    d.addErrback(failures.append)
    clock.advance(2.9)
    assert not failures
    clock.advance(0.2)
    assert len(failures) == 1 and failures[0].check(MaybeSent), failures
