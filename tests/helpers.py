"""
Small helpers for the in-memory HTTP tests: no reactor, no sockets.

L{HTTP} drives a C{StubTreq} synchronously and hands back a L{Reply} whose
body has already been read, so a test reads as a list of requests and the
exact answers expected.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import treq
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

Pump = Callable[[Deferred[Any]], None]
"""Moves in-memory HTTP along until the given Deferred fires (or nothing moves)."""

@dataclass(frozen=True)
class Reply:
    code: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        """The single value of header C{name}, or None; fails if it repeats."""
        values = self.headers.getRawHeaders(name)
        if values is None:
            return None
        assert len(values) == 1, f"{name} given {len(values)} times: {values!r}"
        return values[0]

    def json(self) -> Any:
        """The body as JSON; fails unless the reply says it is JSON."""
        assert self.header("content-type") == "application/json", (
            f"HTTP {self.code} is {self.header('content-type')!r}, not JSON: {self.body[:200]!r}"
        )
        return json.loads(self.body.decode("utf-8"))

    def error(self) -> tuple[int, str]:
        """(status, error code) of a JSON error reply, checking its shape."""
        payload = self.json()
        assert isinstance(payload, dict), payload
        assert isinstance(payload.get("message"), str) and payload["message"], payload
        return self.code, payload["error"]


def flusher(*stubs: StubTreq) -> Pump:
    """
    A L{Pump} that flushes C{stubs} until the Deferred has a result.

    C{Deferred.called} is not the test: a Deferred waiting on a Deferred its
    callback returned is already "called" but has no result yet (treq's
    response Deferreds are like that), so a result is recorded instead.
    """

    def pump(d: Deferred[Any]) -> None:
        done: list[bool] = []

        def seen(result: object) -> object:
            done.append(True)
            return result

        d.addBoth(seen)
        for _ in range(50):
            if done:
                return
            for stub in stubs:
                stub.flush()

    return pump


HeaderValues = Mapping[str, str | bytes]


class HTTP:
    """Synchronous requests to an in-memory HTTP server."""

    def __init__(self, case: SynchronousTestCase, stub: StubTreq, base: str, pump: Pump) -> None:
        self.case = case
        self.stub: Any = stub  # StubTreq builds its request methods at runtime
        self.base = base
        self.pump = pump

    def start(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: HeaderValues | None = None,
    ) -> Deferred[Reply]:
        """Send a request; the Deferred fires with the whole L{Reply}."""
        raw = {
            name.encode("ascii"): [v if isinstance(v, bytes) else v.encode("latin-1")]
            for name, v in (headers or {}).items()
        }
        d: Deferred[Any] = self.stub.request(method, self.base + path, data=body, headers=raw)

        def read(response: Any) -> Deferred[Reply]:
            content: Deferred[bytes] = treq.content(response)
            return content.addCallback(lambda data: Reply(response.code, response.headers, data))

        return d.addCallback(read)

    def finish(self, d: Deferred[Reply]) -> Reply:
        """Pump until C{d} fires and return its reply."""
        self.pump(d)
        return self.case.successResultOf(d)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: HeaderValues | None = None,
    ) -> Reply:
        return self.finish(self.start(method, path, body, headers))

    def get(self, path: str, headers: HeaderValues | None = None) -> Reply:
        return self.request("GET", path, headers=headers)

    def head(self, path: str, headers: HeaderValues | None = None) -> Reply:
        return self.request("HEAD", path, headers=headers)

    def put(self, path: str, body: bytes, headers: HeaderValues | None = None) -> Reply:
        return self.request("PUT", path, body, headers)

    def delete(self, path: str, headers: HeaderValues | None = None) -> Reply:
        return self.request("DELETE", path, headers=headers)

    def post_json(self, path: str, payload: object) -> Reply:
        body = json.dumps(payload).encode("utf-8")
        return self.request("POST", path, body, {"Content-Type": "application/json"})

    def post_raw(self, path: str, body: bytes) -> Reply:
        return self.request("POST", path, body, {"Content-Type": "application/json"})
