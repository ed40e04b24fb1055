"""The node's Klein app: routes only. The data API and the replica routes
parse and render here; what they do is the node's store (L{shardkv.node.store}).

Serve L{NodeApp.resource}: it puts the guard (L{shardkv.web.auth}) in front of
every route, so only ``/health`` answers without the cluster token (or, in
protected mode, to anyone not on loopback)."""

from __future__ import annotations

from collections.abc import Sequence

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from shardkv.core.records import Record
from shardkv.core.versions import VersionError
from shardkv.errors import InvalidRequest, ShardkvError
from shardkv.node.store import NodeStore, Outcome
from shardkv.replica import codec
from shardkv.replica.protocol import (
    BATCH_PATH,
    HEALTH_PATH,
    HINT_FOR,
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
from shardkv.web.dataroutes import install_data_routes, path_key
from shardkv.web.errors import install_error_handlers, json_body, status_for

_PREFIX = REPLICA_KV_PREFIX.encode()


class NodeApp:
    app = Klein()
    install_data_routes(app)
    install_error_handlers(app)

    def __init__(self, store: NodeStore, guard: Guard | None = None) -> None:
        """Without a ``guard`` the node is in protected mode (no token, loopback peers only)."""
        self.store = store
        self.max_value_bytes = store.max_value_bytes
        self.guard = guard if guard is not None else Guard()

    def resource(self) -> Resource:
        """The app behind its guard: what a node serves."""
        return GuardedResource(self.app.resource(), self.guard, node_policy)

    def backend(self, request: IRequest) -> NodeStore:
        """A node serves its own copy: quorum settings do not apply here."""
        return self.store

    @app.route(REPLICA_KV_PREFIX + "<key:_key>", methods=["GET"])
    def replica_get(self, request: IRequest, _key: str) -> bytes:
        record = self.store.replica_record(path_key(request, _PREFIX))
        for name, value in record_headers(record).items():
            request.setHeader(name, value)
        return record.value

    @app.route(REPLICA_KV_PREFIX + "<key:_key>", methods=["PUT"])
    def replica_put(self, request: IRequest, _key: str) -> Deferred[bytes]:
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
        d = self.store.accept(key, record, hint_for or None)
        return d.addCallback(lambda applied: json_body(request, 200, {"applied": applied}))

    @app.route(BATCH_PATH, methods=["POST"])
    def replica_batch(self, request: IRequest) -> Deferred[bytes]:
        """Many replica reads and writes in one exchange (see L{shardkv.replica.codec})."""
        try:
            ops = codec.decode_request(request.content.read())
        except codec.BatchError as e:
            raise InvalidRequest(str(e), "invalid_batch") from None

        def answer(outcomes: Sequence[Outcome]) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            return codec.encode_response(_results(outcomes))

        return self.store.run_batch(ops).addCallback(answer)

    @app.route(MEMBERS_PATH, methods=["PUT"])
    def replica_members(self, request: IRequest) -> bytes:
        """The proxy's member list, replacing ours (see L{shardkv.node.members})."""
        members = self.store.members
        members.replace(parse_members(request.content.read()))
        return json_body(request, 200, {"members": members.as_json()})

    @app.route(HEALTH_PATH, methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        store = self.store
        h = store.engine.health()
        payload = {
            "status": "ok" if h.ok else "failing",
            "role": "node",
            "node": store.node_id,
            "storage": {"engine": store.engine.name, "writable": h.writable, **h.details},
            "hints": store.engine.hint_counts(),
            "members": store.members.as_json(),
        }
        if h.reason:
            payload["reason"] = h.reason
        return json_body(request, 200 if h.ok else 503, payload)


def _results(outcomes: Sequence[Outcome]) -> list[codec.Result]:
    """The wire results, leaving out values once the response would pass
    L{codec.MAX_INLINE_TOTAL} (the proxy then fetches those keys alone)."""
    inline_left = codec.MAX_INLINE_TOTAL
    results = []
    for outcome in outcomes:
        if isinstance(outcome, ShardkvError):
            status = status_for(outcome)
            results.append(codec.Result(status, error=outcome.code, message=outcome.message))
        elif isinstance(outcome, Record):
            if not codec.fits(outcome) or len(outcome.value) > inline_left:
                results.append(codec.Result(200, inline=False))
            else:
                inline_left -= len(outcome.value)
                results.append(codec.Result(200, record=outcome))
        else:
            results.append(codec.Result(200, applied=outcome))
    return results
