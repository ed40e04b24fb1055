"""The floor on the user's stack: bench/floor_proxy.py's work, routed by Klein, forwarded by treq.

    python bench/stack_floor.py PORT NODE_PORT NODE_PORT

Issue 10 fixes two pieces of any proxy it judges: Klein serves the routes and
treq makes the forwarding calls. This proxy does what ``bench/floor_proxy.py``
does, and nothing more (the same ``GET /get?key=K`` or ``POST /set`` to both
nodes, the first reply once both replied; a failed call answers 502), with
exactly those two pieces, each in the cheapest form shardkv has:

- the routes are declared on L{shardkv.web.router.RoutedKlein}, Klein's own
  matching with the per-request work the shardkv servers cut;
- each call goes through L{shardkv.web.httpclient.HTTPClientService}: treq's
  C{HTTPClient} over the lean persistent agent, with no cookies, with the
  options the replica client uses (no redirects, unbuffered), and with each
  URL prepared once (L{URLS_KEPT}: more than the benchmark's keys).

It is served by a plain twisted.web Site, as the floor is. So ``bench/run.py
floor`` measures, beside a direct node, the least any proxy costs that sends
two replica requests through Klein and treq on this machine, before placement,
versions, quorum rules, timeouts, health, limits or metrics; and the
difference from the floor is what Klein and treq themselves cost.
"""

import sys
from typing import Any

import treq
from floor_proxy import QuietSite, first_of
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from shardkv.web.httpclient import HTTPClientService, PreparedURLs
from shardkv.web.router import RoutedKlein

the_reactor: Any = reactor
JSON = {b"Content-Type": [b"application/json"]}
URLS_KEPT = 1 << 20
"""Prepared URLs kept (one per key and node): more than a benchmark's keys, so the
cache never empties mid-run as the service's own (1,024 URLs) would."""


class StackForward:
    """Sends a client's request as it is to every node through treq."""

    def __init__(self, http: HTTPClientService, ports: list[int]) -> None:
        self.http = http
        self.bases = [b"http://127.0.0.1:%d" % port for port in ports]
        self.urls = PreparedURLs(size=URLS_KEPT)

    def forward(self, request: Any, body: bytes | None) -> Deferred[bytes]:
        done: Deferred[bytes] = Deferred()

        def answer(status: int, data: bytes) -> None:
            request.setResponseCode(status)
            request.setHeader(b"content-type", b"application/json")
            done.callback(data)

        one = first_of(len(self.bases), answer)

        def read(response: Any) -> Deferred[None]:
            return treq.content(response).addCallback(lambda data: one(response.code, data))

        def failed(_: Failure) -> None:
            one(502, b"")

        method = request.method.decode("ascii")
        for base in self.bases:
            d = self.http.request(
                method,
                self.urls.get(base + request.uri),
                data=body,
                headers=None if body is None else JSON,
                allow_redirects=False,
                unbuffered=True,
            )
            d.addCallback(read).addErrback(failed)
        return done


def make_app(forward: StackForward) -> RoutedKlein:
    app = RoutedKlein()

    @app.route("/get", methods=["GET"])
    def get(request: Any) -> Deferred[bytes]:
        return forward.forward(request, None)

    @app.route("/set", methods=["POST"])
    def set_(request: Any) -> Deferred[bytes]:
        return forward.forward(request, request.content.read())

    return app


if __name__ == "__main__":
    http = HTTPClientService(the_reactor)
    http.startService()
    app = make_app(StackForward(http, [int(p) for p in sys.argv[2:]]))
    the_reactor.listenTCP(int(sys.argv[1]), QuietSite(app.resource()), interface="127.0.0.1")
    the_reactor.run()
