"""The node's move routes: its progress, its share of a plan, and the stream it receives.

``GET /replica/move``
    The stream and cleanup of the node's learned epoch (L{Mover.status}).
``POST /replica/plan`` ``{"map": MAP}``
    The copies this node would send as primary source under a ``copying``
    map, per destination (L{Mover.plan}). The orchestrator adds up every
    node's answer into the plan an operator sees.
``POST /replica/plan/keys`` ``{"map": MAP, "to": ID, "cursor": "", "limit": 100}``
    One page of the keys of one pair (L{Mover.plan_keys}).
``POST /replica/stream``
    Another node's copies: the batch codec's body holding only puts, up to
    L{codec.MAX_STREAM_OPS}, answered as ``/replica/batch`` answers. Each
    record is stored if newer, like any replicated write, so a copy sent
    twice, or racing a client's newer write, changes nothing.

The handlers become methods of L{shardkv.node.app.NodeApp} (L{MoveService}):
they use its C{mover} and C{store}, as L{shardkv.web.dataroutes} does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from klein import Klein
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.web.iweb import IRequest

from shardkv.core.clustermap import ClusterMap
from shardkv.errors import InvalidMap, InvalidRequest
from shardkv.node.mover import CleanupProgress, Mover, StreamProgress
from shardkv.node.results import batch_results
from shardkv.node.store import NodeStore
from shardkv.replica import codec
from shardkv.replica.protocol import MOVE_PATH, PLAN_KEYS_PATH, PLAN_PATH, STREAM_PATH
from shardkv.web.dataroutes import json_object
from shardkv.web.errors import json_body

DEFAULT_PLAN_KEYS = 100


class MoveService(Protocol):
    """What the move routes need of the app they are installed on."""

    store: NodeStore
    mover: Mover | None

    def check_epoch(self, request: IRequest) -> None: ...


def install_move_routes(app: Klein) -> None:
    """Register the move routes on ``app``; its instances must be L{MoveService}s."""

    @app.route(MOVE_PATH, methods=["GET"])
    def replica_move(self: MoveService, request: IRequest) -> bytes:
        if self.mover is not None:
            return json_body(request, 200, self.mover.status())
        learned = self.store.mapstore.learned
        return json_body(
            request,
            200,
            {
                "node": self.store.node_id,
                "epoch": None if learned is None else learned.epoch,
                "phase": None if learned is None or learned.move is None else learned.move.phase,
                "stream": StreamProgress().status(),
                "cleanup": CleanupProgress().status(),
            },
        )

    @app.route(PLAN_PATH, methods=["POST"])
    def replica_plan(self: MoveService, request: IRequest) -> Deferred[bytes]:
        m = _map(json_object(request))
        mover = _mover(self)
        d: Deferred[dict[str, Any]] = ensureDeferred(mover.plan(m))
        return d.addCallback(lambda plan: json_body(request, 200, plan))

    @app.route(PLAN_KEYS_PATH, methods=["POST"])
    def replica_plan_keys(self: MoveService, request: IRequest) -> Deferred[bytes]:
        body = json_object(request)
        m = _map(body)
        to, cursor = body.get("to"), body.get("cursor") or ""
        limit = body.get("limit", DEFAULT_PLAN_KEYS)
        if not isinstance(to, str) or not to:
            raise InvalidRequest('"to" must name the destination node', "invalid_json")
        if not isinstance(cursor, str):
            raise InvalidRequest('"cursor" must be a key or empty', "invalid_json")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidRequest('"limit" must be a positive whole number', "invalid_json")
        mover = _mover(self)
        d: Deferred[dict[str, Any]] = ensureDeferred(mover.plan_keys(m, to, cursor, limit))
        return d.addCallback(lambda page: json_body(request, 200, page))

    @app.route(STREAM_PATH, methods=["POST"])
    def replica_stream(self: MoveService, request: IRequest) -> Deferred[bytes]:
        """A batch of another node's copies (see the module docstring)."""
        self.check_epoch(request)
        try:
            ops = codec.decode_request(request.content.read(), max_ops=codec.MAX_STREAM_OPS)
        except codec.BatchError as e:
            raise InvalidRequest(str(e), "invalid_batch") from None
        for op in ops:
            if not isinstance(op, codec.PutOp) or op.hint_for is not None:
                raise InvalidRequest("a stream holds only puts, without hint_for", "invalid_batch")

        def answer(outcomes: Sequence[Any]) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            return codec.encode_response(batch_results(outcomes))

        puts = [op for op in ops if isinstance(op, codec.PutOp)]
        return self.store.store_many(puts).addCallback(answer)


def _mover(service: MoveService) -> Mover:
    if service.mover is None:
        raise InvalidRequest("this node does not take part in moves", "no_mover")
    return service.mover


def _map(body: dict[str, Any]) -> ClusterMap:
    if "map" not in body:
        raise InvalidMap('the body must hold the cluster map as "map"')
    return ClusterMap.from_json(body["map"])
