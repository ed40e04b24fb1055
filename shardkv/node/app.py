"""The node's Klein app: routes only. The data API and the replica routes
parse and render here; what they do is the node's store (L{shardkv.node.store}).

Serve L{NodeApp.resource}: it puts the guard (L{shardkv.web.auth}) in front of
every route, so only ``/health`` answers without the cluster token (or, in
protected mode, to anyone not on loopback).

The map routes (``/replica/map``, prepare, accept, learn) only parse and
render; the acceptor and the fence are L{shardkv.node.mapstore}. Every
replica data route checks the epoch header first, in the same reactor turn
that queues its writes. The move routes are L{shardkv.node.moveroutes}."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from shardkv.core.clustermap import ClusterMap
from shardkv.core.consensus import Promise, ballot_json
from shardkv.core.versions import VersionError
from shardkv.errors import InvalidMap, InvalidRequest
from shardkv.metrics import NodeMetrics
from shardkv.node.mapstore import parse_ballot
from shardkv.node.mover import Mover
from shardkv.node.moveroutes import install_move_routes
from shardkv.node.results import batch_results
from shardkv.node.store import NodeStore, Outcome
from shardkv.replica import codec
from shardkv.replica.protocol import (
    BATCH_PATH,
    EPOCH_HEADER,
    HEALTH_PATH,
    HINT_FOR,
    MAP_ACCEPT_PATH,
    MAP_EPOCH_HEADER,
    MAP_LEARN_PATH,
    MAP_PATH,
    MAP_PREPARE_PATH,
    MEMBERS_PATH,
    REPLICA_KV_PREFIX,
    TOMBSTONE_HEADER,
    VERSION_HEADER,
    InvalidContentType,
    parse_members,
    record_from_headers,
    record_headers,
)
from shardkv.web.auth import Guard, GuardedResource, node_policy
from shardkv.web.dataroutes import install_data_routes, json_object, path_key
from shardkv.web.errors import install_error_handlers, json_body
from shardkv.web.metricsroutes import RoutedKlein, install_metrics_routes
from shardkv.web.openapi import install_openapi_routes

_PREFIX = REPLICA_KV_PREFIX.encode()


class NodeApp:
    app = RoutedKlein()
    install_metrics_routes(app)
    install_data_routes(app)
    install_error_handlers(app)
    install_move_routes(app)
    install_openapi_routes(app)

    def __init__(
        self,
        store: NodeStore,
        guard: Guard | None = None,
        mover: Mover | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        """Without a ``guard`` the node is in protected mode (no token, loopback peers only).
        ``mover`` streams and cleans up for moves (L{shardkv.node.moveroutes});
        without one the move routes answer as for a node with nothing to do.
        ``metrics``: what ``/metrics`` serves (None: it answers 404)."""
        self.store = store
        self.mover = mover
        self.metrics = metrics
        self.max_value_bytes = store.max_value_bytes
        self.guard = guard if guard is not None else Guard()

    def resource(self) -> Resource:
        """The app behind its guard: what a node serves."""
        return GuardedResource(self.app.resource(), self.guard, node_policy)

    def backend(self, request: IRequest) -> NodeStore:
        """A node serves its own copy: quorum settings do not apply here."""
        return self.store

    def check_epoch(self, request: IRequest) -> bool:
        """Refuse a replica call planned at an older epoch (L{MapStore.check_epoch});
        one it still takes, within the grace, is answered with the node's epoch,
        and True says its writes must be noted (L{MapStore.note_grace_write})."""
        mapstore = self.store.mapstore
        header = request.getHeader(EPOCH_HEADER)
        in_grace = mapstore.check_epoch(header)
        if in_grace:
            request.setHeader(MAP_EPOCH_HEADER, b"%d" % mapstore.fence_epoch)
        return in_grace

    @app.route(REPLICA_KV_PREFIX + "<key:_key>", methods=["GET"])
    def replica_get(self, request: IRequest, _key: str) -> bytes:
        self.check_epoch(request)
        record = self.store.replica_record(path_key(request, _PREFIX))
        for name, value in record_headers(record).items():
            request.setHeader(name, value)
        return record.value

    @app.route(REPLICA_KV_PREFIX + "<key:_key>", methods=["PUT"])
    def replica_put(self, request: IRequest, _key: str) -> Deferred[bytes]:
        in_grace = self.check_epoch(request)
        key = path_key(request, _PREFIX)
        try:
            record = record_from_headers(
                request.getHeader(VERSION_HEADER),
                request.getHeader(TOMBSTONE_HEADER),
                request.getHeader(b"content-type"),
                request.content.read(),
                strict=True,
            )
        except VersionError as e:
            raise InvalidRequest(f"{VERSION_HEADER.decode()}: {e}", "invalid_version") from None
        except InvalidContentType as e:
            raise InvalidRequest(str(e)) from None
        self.store.check_incoming(key, record.version)
        hint_for = request.args.get(HINT_FOR.encode(), [b""])[0].decode("utf-8", "replace")
        if in_grace and not hint_for:
            self.store.mapstore.note_grace_write(key)
        d = self.store.replica_put_answer(key, record, hint_for or None)
        return d.addCallback(lambda answer: json_body(request, 200, answer))

    @app.route(BATCH_PATH, methods=["POST"])
    def replica_batch(self, request: IRequest) -> Deferred[bytes]:
        """Many replica reads and writes in one exchange (see L{shardkv.replica.codec}).

        A stale epoch refuses the batch whole: every operation in it was
        planned at that epoch."""
        in_grace = self.check_epoch(request)
        try:
            ops = codec.decode_request(request.content.read())
        except codec.BatchError as e:
            raise InvalidRequest(str(e), "invalid_batch") from None
        if in_grace:
            for op in ops:
                if isinstance(op, codec.PutOp) and op.hint_for is None:
                    self.store.mapstore.note_grace_write(op.key)

        def answer(outcomes: Sequence[Outcome]) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            return codec.encode_response(batch_results(outcomes))

        return self.store.run_batch(ops).addCallback(answer)

    @app.route(MEMBERS_PATH, methods=["PUT"])
    def replica_members(self, request: IRequest) -> bytes:
        """The proxy's member list, replacing ours unless we follow a learned map
        (see L{shardkv.node.members}); the answer is the list in force."""
        members = self.store.members
        members.replace(parse_members(request.content.read()))
        return json_body(request, 200, {"members": members.as_json()})

    # the cluster map: this node as a CASPaxos acceptor and learner

    @app.route(MAP_PATH, methods=["GET"])
    def replica_map(self, request: IRequest) -> bytes:
        return json_body(request, 200, self.store.mapstore.as_json())

    @app.route(MAP_PREPARE_PATH, methods=["POST"])
    def replica_map_prepare(self, request: IRequest) -> Deferred[bytes]:
        body = _json_object(request, {"ballot"})
        ballot = parse_ballot(body["ballot"])

        def answer(promise: Promise) -> bytes:
            return json_body(
                request,
                200,
                {
                    "promised": promise.promised,
                    "promised_ballot": ballot_json(promise.promised_ballot),
                    "accepted_ballot": ballot_json(promise.accepted_ballot),
                    "accepted": promise.accepted,
                },
            )

        return self.store.mapstore.prepare(ballot).addCallback(answer)

    @app.route(MAP_ACCEPT_PATH, methods=["POST"])
    def replica_map_accept(self, request: IRequest) -> Deferred[bytes]:
        body = _json_object(request, {"ballot", "map"})
        ballot = parse_ballot(body["ballot"])
        value = ClusterMap.from_json(body["map"]).to_json()
        mapstore = self.store.mapstore

        def answer(accepted: bool) -> bytes:
            promised = ballot_json(mapstore.state.promised)
            return json_body(request, 200, {"accepted": accepted, "promised_ballot": promised})

        return mapstore.accept(ballot, value).addCallback(answer)

    @app.route(MAP_LEARN_PATH, methods=["POST"])
    def replica_map_learn(self, request: IRequest) -> Deferred[bytes]:
        body = _json_object(request, {"map"})
        m = ClusterMap.from_json(body["map"])
        d = self.store.mapstore.learn(m)
        return d.addCallback(lambda epoch: json_body(request, 200, {"epoch": epoch}))

    @app.route(HEALTH_PATH, methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        store = self.store
        h = store.engine.health()
        learned, cluster_id = store.mapstore.learned, store.mapstore.cluster_id
        payload = {
            "status": "ok" if h.ok else "failing",
            "role": "node",
            "node": store.node_id,
            "storage": {"engine": store.engine.name, "writable": h.writable, **h.details},
            "hints": store.engine.hint_counts(),
            "members": store.members.as_json(),
            "map": {"epoch": learned.epoch if learned else None, "cluster_id": cluster_id},
        }
        if h.reason:
            payload["reason"] = h.reason
        return json_body(request, 200 if h.ok else 503, payload)


def _json_object(request: IRequest, fields: set[str]) -> dict[str, Any]:
    """The request's JSON object body, holding at least ``fields``.

    L{InvalidRequest} (400) for anything else; a map in it is checked by
    L{ClusterMap.from_json} (L{InvalidMap}, 400)."""
    body = json_object(request)
    missing = sorted(fields - body.keys())
    if missing:
        if missing == ["map"]:
            raise InvalidMap('the body must hold the cluster map as "map"')
        raise InvalidRequest(f"the body is missing {', '.join(missing)}", "invalid_json")
    return body
