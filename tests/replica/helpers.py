"""What the replica tests (and the node's batch-route tests) share: one node's
address and timeout, and builders for batch bodies that are wrong on purpose."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from shardkv.node.app import NodeApp
from shardkv.replica.client import ReplicaClient
from shardkv.replica.codec import Op, Result, decode_response, encode_request
from tests.core.helpers import V1, V2
from tests.helpers import HTTP, NetworkFaults, flusher

__all__ = [
    "GOOD_RECORD",
    "NODE_ID",
    "TIMEOUT",
    "V1",
    "V2",
    "OneNodeCase",
    "json_bytes",
    "ops_body",
]

NODE_ID = "127.0.0.1:8081"
TIMEOUT = 2.0

GOOD_RECORD: dict[str, Any] = {
    "version": "1-1-w",
    "tombstone": False,
    "content_type": "text/plain",
    "value": base64.b64encode(b"x").decode("ascii"),
}
"""A record as the batch format writes it; tests change one field to break it."""


def json_bytes(payload: object) -> bytes:
    return json.dumps(payload).encode("utf-8")


def ops_body(*items: object) -> bytes:
    """A request body whose ``ops`` are exactly ``items``, valid or not."""
    return json_bytes({"ops": list(items)})


class OneNodeCase(SynchronousTestCase):
    """One real node app behind a C{StubTreq}, called with batches directly or
    through a pipelining L{ReplicaClient}. Subclasses call L{serve} in setUp."""

    clock: MemoryReactorClock

    def serve(self, node: NodeApp) -> None:
        self.node = node
        self.stub = StubTreq(node.app.resource())
        self.http = HTTP(self, self.stub, "http://" + NODE_ID, flusher(self.stub))

    def send(self, batch: Sequence[Op], http: HTTP | None = None) -> list[Result]:
        reply = (http or self.http).post_raw("/replica/batch", encode_request(batch))
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual(reply.header("content-type"), "application/json")
        return decode_response(reply.body, len(batch))

    def client(self) -> tuple[ReplicaClient, NetworkFaults]:
        """A pipelining ReplicaClient for this node, and the log of what it sent."""
        calls = NetworkFaults(self.stub, self.clock)
        return ReplicaClient(calls, self.clock, TIMEOUT, pipeline_depth=1), calls

    def wait(self, d: Deferred[Any]) -> Any:
        flusher(self.stub)(d)
        return self.successResultOf(d)
