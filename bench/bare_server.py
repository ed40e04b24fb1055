"""The ceiling for a node's GET: bare twisted.web answering ``GET /get?key=K`` from a dict.

    python bench/bare_server.py PORT DATA.json    # DATA.json: {"key": "value", ...}

One reactor, one leaf Resource, a Site with no access log: no Klein, no
routing, no storage engine. The answer has the node's shape for ``/get``
(``{"key": K, "value": V}`` as JSON, 404 JSON when missing) without its
``version`` field and ETag, so ``bench/run.py ceiling`` measures what the node
costs per request beyond the least this stack can do.
"""

import json
import sys
from typing import Any

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site


class Get(Resource):
    isLeaf = True

    def __init__(self, data: dict[str, str]) -> None:
        super().__init__()
        self.data = data

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        keys = request.args.get(b"key") if request.path == b"/get" else None
        key = keys[0].decode("utf-8", "replace") if keys else ""
        value = self.data.get(key) if keys else None
        if value is None:
            request.setResponseCode(404)
            payload = {"error": "not_found", "message": f"no key {key!r}"}
        else:
            payload = {"key": key, "value": value}
        return json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n"


class QuietSite(Site):
    def log(self, request: Any) -> None:
        """No access log (a shardkv node has none by default either)."""


if __name__ == "__main__":
    with open(sys.argv[2], encoding="utf-8") as f:
        site = QuietSite(Get(json.load(f)))
    the_reactor: Any = reactor  # the default (epoll) reactor, as twistd runs a node on
    the_reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1")
    the_reactor.run()
