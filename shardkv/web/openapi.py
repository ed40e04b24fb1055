"""The OpenAPI 3.1 description of every HTTP route, served at ``GET /openapi.json``.

Built from Python structures rather than kept as a JSON file, so that the
pieces every operation shares (the error body, the key, the statuses of
L{shardkv.web.errors.STATUS}) are written once, and a test
(tests/web/test_openapi.py) can hold the document to the code: every Klein
route of the proxy and of the node is described with the same methods, and
every error code the status table knows is named.

One document describes both kinds of process. Each operation says which
serve it (``x-served-by``: ``proxy``, ``node`` or both) and is tagged by what
it is for (data, operations, admin, replica, meta). What a process serves at
``/openapi.json`` is that document cut down to the routes of its own Klein
app, so a node's copy lists the replica routes and no admin route, and a
proxy's the reverse; on a proxy, the quorum parameters ``r`` and ``w`` are
bounded by its own replication factor.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from shardkv.core.keys import MAX_KEY_BYTES
from shardkv.core.quorum import Consistency
from shardkv.dashboard.arcs import LIMIT_SEGMENTS
from shardkv.proxy.changes import MAX_WEIGHT
from shardkv.web.errors import json_body

PROXY = "proxy"
NODE = "node"
BOTH = (PROXY, NODE)

OPENAPI_PATH = "/openapi.json"

Schema = dict[str, Any]

# -- errors ------------------------------------------------------------------------

ERRORS: dict[int, tuple[str, tuple[str, ...]]] = {
    400: (
        "Malformed input: no retry can fix it. `error` names what was wrong.",
        (
            "bad_request",
            "invalid_json",
            "invalid_key",
            "invalid_value",
            "invalid_version",
            "invalid_precondition",
            "invalid_quorum",
            "invalid_query",
            "invalid_batch",
            "invalid_members",
            "invalid_hint_target",
            "invalid_epoch",
            "invalid_map",
            "invalid_change",
            "invalid_config",
            "no_mover",
        ),
    ),
    401: (
        "No usable `Authorization: Bearer` header where a token is needed "
        "(`WWW-Authenticate: Bearer` is set).",
        ("unauthorized",),
    ),
    403: (
        "The wrong token; or, in protected mode (no `--token-file`), a peer not on loopback.",
        ("forbidden",),
    ),
    404: (
        "No live value for the key, no usable replica record, an unknown member, "
        "or a route this process does not serve.",
        ("not_found", "unknown_member", "no_route"),
    ),
    405: (
        "The method is not served on this path; `Allow` lists the ones that are.",
        ("method_not_allowed",),
    ),
    408: ("The request head did not arrive within `--header-timeout`.", ("request_timeout",)),
    409: (
        "The cluster map is not in the state the request assumed: another change won, a move "
        "is running or is not, or a replica call was planned at an older epoch (`stale_epoch` "
        "carries the node's `epoch` and `map`).",
        (
            "map_conflict",
            "move_in_progress",
            "too_few_members",
            "no_move",
            "too_late_to_abort",
            "no_plan",
            "foreign_cluster",
            "member_unreachable",
            "stale_epoch",
        ),
    ),
    412: (
        "`If-Match`, `If-None-Match: *` or the body's `version` did not hold.",
        ("precondition_failed",),
    ),
    413: (
        "The body (or the value in it) is over the limit; refused from `Content-Length` or as "
        "soon as a streamed body passes it.",
        ("payload_too_large",),
    ),
    414: (
        f"A key over {MAX_KEY_BYTES} bytes of UTF-8, or a request line over 16 KiB.",
        ("key_too_long", "uri_too_long"),
    ),
    431: ("A request head over 32 KiB or 500 header lines.", ("headers_too_large",)),
    502: (
        "A node answered the proxy with an error of its own or with something that breaks the "
        "replica protocol; `error` may be the node's own code.",
        ("node_failed", "node_unreachable", "node_timeout", "node_busy", "bad_gateway"),
    ),
    503: (
        "Not now: too few replicas answered (`insufficient_replicas`, with how many and, for a "
        "write, its `outcome`), too much in flight (`overloaded`, with `Retry-After`), a node's "
        "storage failed or is stopping, a record failed its checksum, or no majority could "
        "change the map.",
        (
            "insufficient_replicas",
            "overloaded",
            "storage_unavailable",
            "storage_failed",
            "corrupt_record",
            "map_unavailable",
        ),
    ),
    504: (
        'Replicas did not answer in time; for a write `"outcome": "unknown"`: it may have '
        "been applied.",
        ("replica_timeout",),
    ),
    507: ("The node's disk or map is full; reads still work.", ("insufficient_storage",)),
}
"""Every status an error body comes with, what it means, and the codes it carries."""

COMMON_ERRORS = (400, 401, 403, 408, 413, 414, 431, 503)
"""What any route may answer before its handler runs: the front door's limits
(L{shardkv.web.channel}, L{shardkv.web.site}) and the guard (L{shardkv.web.auth})."""


def error_codes() -> set[str]:
    """Every error code the document names."""
    return {code for _, codes in ERRORS.values() for code in codes}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema, description: str, headers: Schema | None = None) -> Schema:
    response: Schema = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        response["headers"] = headers
    return response


def _responses(ok: Mapping[str, Schema], *errors: int) -> Schema:
    out: Schema = dict(ok)
    for status in sorted(set(COMMON_ERRORS) | set(errors)):
        out[str(status)] = {"$ref": f"#/components/responses/Error{status}"}
    return out


_ETAG = {
    "ETag": {"description": "The version as a strong entity tag", "schema": {"type": "string"}}
}

# -- parameters and bodies ------------------------------------------------------------

KEY_SCHEMA: Schema = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_KEY_BYTES,
    "description": (
        f"UTF-8, 1 to {MAX_KEY_BYTES} bytes (the limit is in bytes: a longer key in multibyte "
        "characters is 414 `key_too_long`)."
    ),
}
_QUOTED_TAG = r'(W/)?"[\x21\x23-\x7e\x80-\xff]*"'
_HEADER_TAG = r'(W/)?"[\x21\x23-\x7e]*"'
ETAG_LIST_PATTERN = rf"^[ \t]*(\*|{_HEADER_TAG}([ \t]*,[ \t]*{_HEADER_TAG})*)[ \t]*$"
"""``*`` or a list of quoted entity tags (a bare version works too, but is not HTTP)."""
BODY_TAG_PATTERN = rf"^{_QUOTED_TAG}$|^(?!W/)[\x21\x23-\x2b\x2d-\x7e\x80-\x84\x86-\x9f\xa1-\xff]+$"
"""The seed API's ``"version"``: an entity tag, quoted or bare (as the API writes it)."""

VERSION_SCHEMA: Schema = {
    "type": "string",
    "pattern": r"^[0-9]{1,20}-[0-9]{1,20}-[A-Za-z0-9_.:\-]{1,128}$",
    "description": "counter-clock_ms-writer; the value of an ETag without its quotes.",
}


def _path_key(description: str) -> Schema:
    return {
        "name": "key",
        "in": "path",
        "required": True,
        "description": description + " Percent-encoded: `/kv/a%2Fb` is the key `a/b`.",
        "schema": KEY_SCHEMA,
    }


_QUERY_KEY: Schema = {
    "name": "key",
    "in": "query",
    "required": True,
    "schema": KEY_SCHEMA,
}


def _quorum_parameters(n: int | None) -> list[Schema]:
    """``?r=``, ``?w=``, ``?sloppy=``: the proxy's per-request quorum (also as
    ``X-Shardkv-R``, ``X-Shardkv-W``, ``X-Shardkv-Sloppy`` headers)."""
    bounded: Schema = {"type": "integer", "minimum": 1}
    if n is not None:
        bounded["maximum"] = n
    number: Schema = {"anyOf": [bounded, {"const": ""}], "description": "empty: the default"}
    where = "this proxy's" if n is not None else "the"
    return [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": f"{what} for this request (also the `X-Shardkv-{name.upper()}` "
            f"header); at most {where} replication factor N, else 400 `invalid_quorum`.",
            "schema": number,
        }
        for name, what in (("r", "Replicas that must answer a read"), ("w", "Write acks"))
    ] + [
        {
            "name": "sloppy",
            "in": "query",
            "required": False,
            "description": "`1`, `true` or `yes`: a sloppy quorum, counting hinted handoffs.",
            "schema": {"type": "string"},
        }
    ]


def _body(schema: Schema, required: bool = True, media: str = "application/json") -> Schema:
    return {"required": required, "content": {media: {"schema": schema}}}


_IF_MATCH: Schema = {
    "name": "If-Match",
    "in": "header",
    "required": False,
    "description": "Write only if the key is at one of these versions (`*`: if it exists).",
    "example": "*",
    "schema": {"type": "string", "pattern": ETAG_LIST_PATTERN},
}
_IF_NONE_MATCH_WRITE: Schema = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "description": "Only `*` (create only) is supported on writes.",
    "schema": {"type": "string", "enum": ["*"]},
}
_EPOCH: Schema = {
    "name": "X-Shardkv-Epoch",
    "in": "header",
    "required": False,
    "description": "The map epoch the call was planned at; older than the node's is 409 "
    "`stale_epoch`.",
    "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
}

# -- operations ---------------------------------------------------------------------------


def _op(
    served_by: Iterable[str],
    tag: str,
    summary: str,
    responses: Schema,
    **extra: Any,
) -> Schema:
    op: Schema = {
        "tags": [tag],
        "summary": summary,
        "x-served-by": list(served_by),
        "responses": responses,
    }
    op.update(extra)
    return op


def _operations() -> dict[str, dict[str, Schema]]:
    """Every (path, method) -> its OpenAPI operation object, in the full document."""
    write = _ref("WriteAnswer")
    deleted = _ref("DeleteAnswer")
    data_errors = (404, 412, 502, 504, 507)
    plain = {"text/plain": {"schema": {"type": "string"}}}
    html = {"text/html": {"schema": {"type": "string"}}}
    return {
        "/set": {
            "post": _op(
                BOTH,
                "data",
                "Store a UTF-8 value (the seed API)",
                _responses({"200": _json(write, "Stored.", _ETAG)}, 412, 502, 504, 507),
                operationId="set",
                requestBody=_body(_ref("SetBody")),
            )
        },
        "/get": {
            "get": _op(
                BOTH,
                "data",
                "Read a value as JSON (the seed API)",
                _responses({"200": _json(_ref("GetAnswer"), "The value.", _ETAG)}, *data_errors),
                operationId="get",
                parameters=[_QUERY_KEY],
            )
        },
        "/delete": {
            "post": _op(
                BOTH,
                "data",
                "Delete a key (the seed API)",
                _responses({"200": _json(deleted, "Deleted.")}, *data_errors),
                operationId="delete",
                requestBody=_body(_ref("DeleteBody")),
            )
        },
        "/kv/{key}": {
            "get": _op(
                BOTH,
                "data",
                "Read the value's bytes, with their Content-Type and ETag",
                _responses(
                    {
                        "200": {
                            "description": "The value, as stored.",
                            "headers": _ETAG,
                            "content": {"*/*": {}},
                        },
                        "304": {"description": "`If-None-Match` names this version."},
                    },
                    *data_errors,
                ),
                operationId="kvGet",
                parameters=[
                    _path_key("The key."),
                    {
                        "name": "If-None-Match",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                ],
            ),
            "head": _op(
                BOTH,
                "data",
                "As GET, without the body",
                _responses(
                    {
                        "200": {"description": "The key has a value.", "headers": _ETAG},
                        "304": {"description": "`If-None-Match` names this version."},
                    },
                    *data_errors,
                ),
                operationId="kvHead",
                parameters=[_path_key("The key.")],
            ),
            "put": _op(
                BOTH,
                "data",
                "Store the body's bytes as they are, with their Content-Type",
                _responses(
                    {
                        "200": _json(write, "Replaced.", _ETAG),
                        "201": _json(write, "Created.", _ETAG),
                    },
                    412,
                    502,
                    504,
                    507,
                ),
                operationId="kvPut",
                parameters=[_path_key("The key."), _IF_MATCH, _IF_NONE_MATCH_WRITE],
                requestBody=_body({}, required=False, media="*/*"),
            ),
            "delete": _op(
                BOTH,
                "data",
                "Delete a key",
                _responses({"200": _json(deleted, "Deleted.")}, *data_errors),
                operationId="kvDelete",
                parameters=[_path_key("The key."), _IF_MATCH],
            ),
        },
        "/health": {
            "get": _op(
                BOTH,
                "operations",
                "Is this process serving? Open to anyone, with no token",
                {
                    "200": _json(_ref("Health"), "Serving."),
                    "503": _json(_ref("Health"), "A node whose storage failed: the body says why."),
                },
                operationId="health",
                security=[],
            )
        },
        "/cluster": {
            "get": _op(
                [PROXY],
                "operations",
                "Every node: weight, vnodes, share, health, hints and pipelines",
                _responses({"200": _json(_ref("ClusterView"), "The proxy's view.")}),
                operationId="cluster",
            )
        },
        "/explain": {
            "get": _op(
                [PROXY],
                "operations",
                "Where a key lives and what each replica holds",
                _responses({"200": _json(_ref("Explain"), "The key's placement.")}),
                operationId="explain",
                parameters=[_QUERY_KEY],
            )
        },
        "/metrics": {
            "get": _op(
                BOTH,
                "operations",
                "Prometheus metrics of this process",
                _responses(
                    {"200": {"description": "Text exposition format.", "content": plain}}, 404
                ),
                operationId="metrics",
            )
        },
        "/dashboard": {
            "get": _op(
                [PROXY],
                "operations",
                "The live dashboard page",
                _responses({"200": {"description": "One HTML page.", "content": html}}),
                operationId="dashboard",
            )
        },
        "/dashboard/static/{name}": {
            "get": _op(
                [PROXY],
                "operations",
                "One of the dashboard's files (script, style sheet, image)",
                _responses({"200": {"description": "The file.", "content": {"*/*": {}}}}, 404),
                operationId="dashboardStatic",
                parameters=[
                    {
                        "name": "name",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^[^/]+$"},
                    }
                ],
            )
        },
        "/dashboard/ring.json": {
            "get": _op(
                [PROXY],
                "operations",
                "The ring as the dashboard draws it: each node's arcs",
                _responses({"200": _json({"type": "object"}, "The ring.")}),
                operationId="dashboardRing",
                parameters=[
                    {
                        "name": "segments",
                        "in": "query",
                        "required": False,
                        "description": "How many arcs to draw the ring with: at least one per "
                        f"node, at most {LIMIT_SEGMENTS}; else 400 `invalid_query`.",
                        "schema": {"type": "integer", "minimum": 1, "maximum": LIMIT_SEGMENTS},
                    }
                ],
            )
        },
        OPENAPI_PATH: {
            "get": _op(
                BOTH,
                "meta",
                "This document, cut down to the routes of the process that serves it",
                _responses({"200": _json({"type": "object"}, "OpenAPI 3.1.")}),
                operationId="openapi",
            )
        },
        **_admin_operations(),
        **_replica_operations(),
    }


def _admin_operations() -> dict[str, dict[str, Schema]]:
    change = (404, 409, 502, 504)
    return {
        "/admin/map": {
            "get": _op(
                [PROXY],
                "admin",
                "The cluster map this proxy routes by",
                _responses({"200": _json(_ref("ClusterMap"), "The map.")}, 404),
                operationId="adminMap",
            )
        },
        "/admin/plan": {
            "post": _op(
                [PROXY],
                "admin",
                "Stage a membership change and say what it would move",
                _responses({"200": _json(_ref("Plan"), "The staged plan.")}, *change),
                operationId="adminPlan",
                requestBody=_body(_ref("Change"), required=False),
            ),
            "get": _op(
                [PROXY],
                "admin",
                "The staged plan, as POST answered it (409 `no_plan` when none)",
                _responses({"200": _json(_ref("Plan"), "The staged plan.")}, 404, 409),
                operationId="adminStagedPlan",
            ),
        },
        "/admin/plan/keys": {
            "get": _op(
                [PROXY],
                "admin",
                "One page of the keys the staged plan moves from one node to another",
                _responses({"200": _json(_ref("KeysPage"), "A page.")}, *change),
                operationId="adminPlanKeys",
                parameters=[
                    {"name": "from", "in": "query", "required": True, "schema": {"type": "string"}},
                    {"name": "to", "in": "query", "required": True, "schema": {"type": "string"}},
                    {
                        "name": "cursor",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 999999},
                    },
                ],
            )
        },
        "/admin/commit": {
            "post": _op(
                [PROXY],
                "admin",
                "Install the staged map (epoch + 1); the move starts",
                _responses({"200": _json(_ref("Installed"), "Installed.")}, *change),
                operationId="adminCommit",
            )
        },
        "/admin/abort": {
            "post": _op(
                [PROXY],
                "admin",
                "Head back to the previous placement",
                _responses({"200": _json(_ref("Installed"), "Installed.")}, *change),
                operationId="adminAbort",
            )
        },
        "/admin/rebalance": {
            "get": _op(
                [PROXY],
                "admin",
                "The move's progress",
                _responses({"200": _json(_ref("Rebalance"), "Progress.")}, 404),
                operationId="adminRebalance",
            )
        },
        "/admin/reload": {
            "post": _op(
                [PROXY],
                "admin",
                "Re-read the --config file and apply what can change live (as SIGHUP does)",
                _responses({"200": _json(_ref("Reload"), "What changed.")}, 404, 409),
                operationId="adminReload",
            )
        },
    }


def _replica_operations() -> dict[str, dict[str, Schema]]:
    kv = _path_key("The key.")
    batch_answer = _json(_ref("BatchAnswer"), "One result per operation, in order.")
    return {
        "/replica/kv/{key}": {
            "get": _op(
                [NODE],
                "replica",
                "This node's record for a key, tombstones included",
                _responses(
                    {
                        "200": {
                            "description": "The value; the version and tombstone flag in headers.",
                            "headers": {
                                "X-Shardkv-Version": {"schema": VERSION_SCHEMA},
                                "X-Shardkv-Tombstone": {
                                    "schema": {"type": "string", "enum": ["0", "1"]}
                                },
                            },
                            "content": {"*/*": {}},
                        }
                    },
                    404,
                    409,
                ),
                operationId="replicaGet",
                parameters=[kv, _EPOCH],
            ),
            "put": _op(
                [NODE],
                "replica",
                "Store a record minted elsewhere if it is newer",
                _responses({"200": _json(_ref("Applied"), "Stored or not.")}, 409, 507),
                operationId="replicaPut",
                parameters=[
                    kv,
                    _EPOCH,
                    {
                        "name": "X-Shardkv-Version",
                        "in": "header",
                        "required": True,
                        "schema": VERSION_SCHEMA,
                    },
                    {
                        "name": "X-Shardkv-Tombstone",
                        "in": "header",
                        "required": False,
                        "description": "`1`: the record is a tombstone; anything else: a value.",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "hint_for",
                        "in": "query",
                        "required": False,
                        "description": "Keep it only as a hint for this node, which was down.",
                        "schema": {"type": "string"},
                    },
                ],
                requestBody=_body({}, required=False, media="*/*"),
            ),
        },
        "/replica/batch": {
            "post": _op(
                [NODE],
                "replica",
                "Many replica reads and writes in one exchange",
                _responses({"200": batch_answer}, 409, 507),
                operationId="replicaBatch",
                parameters=[_EPOCH],
                requestBody=_body(_ref("Batch")),
            )
        },
        "/replica/stream": {
            "post": _op(
                [NODE],
                "replica",
                "Another node's copies during a move (puts only)",
                _responses({"200": batch_answer}, 409, 507),
                operationId="replicaStream",
                parameters=[_EPOCH],
                requestBody=_body(_ref("Batch")),
            )
        },
        "/replica/members": {
            "put": _op(
                [NODE],
                "replica",
                "The proxy's member list; the answer is the list in force",
                _responses({"200": _json(_ref("Members"), "The members.")}),
                operationId="replicaMembers",
                requestBody=_body(_ref("Members")),
            )
        },
        "/replica/map": {
            "get": _op(
                [NODE],
                "replica",
                "This node's learned map and acceptor state",
                _responses({"200": _json(_ref("NodeMap"), "The node's map.")}),
                operationId="replicaMap",
            )
        },
        "/replica/map/prepare": {
            "post": _op(
                [NODE],
                "replica",
                "CASPaxos phase 1: promise a ballot",
                _responses({"200": _json(_ref("Promise"), "The promise.")}, 503),
                operationId="replicaMapPrepare",
                requestBody=_body(
                    {
                        "type": "object",
                        "required": ["ballot"],
                        "properties": {"ballot": _ref("Ballot")},
                    }
                ),
            )
        },
        "/replica/map/accept": {
            "post": _op(
                [NODE],
                "replica",
                "CASPaxos phase 2: accept a map at a ballot",
                _responses({"200": _json(_ref("Accepted"), "Accepted or not.")}, 503),
                operationId="replicaMapAccept",
                requestBody=_body(
                    {
                        "type": "object",
                        "required": ["ballot", "map"],
                        "properties": {"ballot": _ref("Ballot"), "map": _ref("ClusterMap")},
                    }
                ),
            )
        },
        "/replica/map/learn": {
            "post": _op(
                [NODE],
                "replica",
                "Learn a chosen map",
                _responses({"200": _json(_ref("Learned"), "The epoch now held.")}, 409, 503),
                operationId="replicaMapLearn",
                requestBody=_body(
                    {
                        "type": "object",
                        "required": ["map"],
                        "properties": {"map": _ref("ClusterMap")},
                    }
                ),
            )
        },
        "/replica/move": {
            "get": _op(
                [NODE],
                "replica",
                "The stream and cleanup of the node's learned epoch",
                _responses({"200": _json(_ref("MoveStatus"), "Progress.")}),
                operationId="replicaMove",
            )
        },
        "/replica/plan": {
            "post": _op(
                [NODE],
                "replica",
                "The copies this node would send as primary source under a copying map",
                _responses({"200": _json({"type": "object"}, "Per destination.")}, 409),
                operationId="replicaPlan",
                requestBody=_body(
                    {
                        "type": "object",
                        "required": ["map"],
                        "properties": {"map": _ref("ClusterMap")},
                    }
                ),
            )
        },
        "/replica/plan/keys": {
            "post": _op(
                [NODE],
                "replica",
                "One page of the keys of one (this node, destination) pair",
                _responses({"200": _json(_ref("KeysPage"), "A page.")}, 409),
                operationId="replicaPlanKeys",
                requestBody=_body(
                    {
                        "type": "object",
                        "required": ["map", "to"],
                        "properties": {
                            "map": _ref("ClusterMap"),
                            "to": {"type": "string", "minLength": 1},
                            "cursor": {"type": "string"},
                            "limit": {"type": "integer", "minimum": 1},
                        },
                    }
                ),
            )
        },
    }


# -- schemas -------------------------------------------------------------------------------

_NULLABLE_INT: Schema = {"type": ["integer", "null"]}
_WEIGHT: Schema = {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_WEIGHT}
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PORT = r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
ADDRESS_PATTERN = rf"^{_LABEL}(\.{_LABEL})*:{_PORT}$"
"""A node's ``host:port``: a DNS name or IPv4 address, and a port from 1 to 65535."""
_BODY_TAG: Schema = {
    "type": ["string", "null"],
    "pattern": BODY_TAG_PATTERN,
    "description": "Only if the key is still at this version (as If-Match); null: always.",
}


def _object(required: Iterable[str], **properties: Schema) -> Schema:
    return {"type": "object", "required": list(required), "properties": properties}


def _schemas() -> dict[str, Schema]:
    member = _object(
        ["id", "address", "weight", "state"],
        id={"type": "string"},
        address={"type": "string"},
        weight={"type": "number"},
        state={"type": "string"},
    )
    health_state = _object(
        ["status"],
        status={"type": "string"},
        since={"type": ["number", "null"]},
        last_check={"type": ["number", "null"]},
        error={"type": ["string", "null"]},
    )
    record = _object(
        ["version", "value"],
        version=VERSION_SCHEMA,
        tombstone={"type": "boolean"},
        content_type={"type": "string"},
        value={"type": "string", "contentEncoding": "base64"},
    )
    return {
        "Error": {
            "type": "object",
            "required": ["error", "message"],
            "properties": {
                "error": {"type": "string", "description": "A stable machine-readable code."},
                "message": {"type": "string", "description": "For people."},
            },
            "additionalProperties": True,
            "description": "Every error. Details that a client may act on (how many replicas "
            "answered, a write's `outcome`, a stale node's `epoch` and `map`) follow the two "
            "fields and never replace them.",
        },
        "SetBody": {
            "type": "object",
            "required": ["key", "value"],
            "properties": {
                "key": KEY_SCHEMA,
                "value": {"type": "string"},
                "version": _BODY_TAG,
            },
        },
        "DeleteBody": {
            "type": "object",
            "required": ["key"],
            "properties": {"key": KEY_SCHEMA, "version": _BODY_TAG},
        },
        "WriteAnswer": _object(["key", "version"], key={"type": "string"}, version=VERSION_SCHEMA),
        "DeleteAnswer": _object(
            ["key", "deleted", "version"],
            key={"type": "string"},
            deleted={"const": True},
            version=VERSION_SCHEMA,
        ),
        "GetAnswer": {
            "type": "object",
            "required": ["key", "version"],
            "properties": {
                "key": {"type": "string"},
                "value": {"type": "string"},
                "value_base64": {"type": "string", "contentEncoding": "base64"},
                "version": VERSION_SCHEMA,
            },
            "oneOf": [{"required": ["value"]}, {"required": ["value_base64"]}],
        },
        "Health": _object(
            ["status", "role"],
            status={"enum": ["ok", "failing"]},
            role={"enum": [PROXY, NODE]},
            reason={"type": "string"},
        ),
        "ClusterView": _object(
            ["replicas", "r", "w", "nodes"],
            replicas={"type": "integer"},
            r={"type": "integer"},
            w={"type": "integer"},
            undelivered={"type": "integer"},
            epoch={"type": "integer"},
            nodes={
                "type": "array",
                "items": _object(
                    ["node", "weight", "share", "health"],
                    node={"type": "string"},
                    weight={"type": "number"},
                    vnodes={"type": "integer"},
                    share={"type": "number"},
                    health=health_state,
                    hints_waiting={"type": "integer"},
                    pipelines={"type": "object"},
                ),
            },
            members={"type": "array", "items": {"type": "object"}},
        ),
        "Explain": _object(
            ["key", "hash", "owner", "replicas", "preference_list"],
            key={"type": "string"},
            hash={"type": "integer"},
            position={"type": "number"},
            owner={"type": "string"},
            replicas={"type": "array", "items": {"type": "object"}},
            preference_list={"type": "array", "items": {"type": "string"}},
        ),
        "ClusterMap": _object(
            ["cluster_id", "epoch", "members", "replication", "vnodes"],
            cluster_id={"type": "string", "minLength": 1},
            epoch={"type": "integer", "minimum": 0},
            members={"type": "array", "items": member},
            replication=_object(
                ["n", "r", "w"],
                n={"type": "integer", "minimum": 1},
                r={"type": "integer", "minimum": 1},
                w={"type": "integer", "minimum": 1},
            ),
            vnodes={"type": "integer", "minimum": 1},
            move={"type": ["object", "null"]},
        ),
        "Change": {
            "type": "object",
            "additionalProperties": False,
            "description": "At least one member to add or remove, or one weight to change.",
            "anyOf": [
                {"required": ["add"], "properties": {"add": {"minItems": 1}}},
                {"required": ["remove"], "properties": {"remove": {"minItems": 1}}},
                {"required": ["weights"], "properties": {"weights": {"minProperties": 1}}},
            ],
            "properties": {
                "add": {
                    "type": "array",
                    "uniqueItems": True,
                    "description": "Each address once.",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["address"],
                        "properties": {
                            "address": {
                                "type": "string",
                                "pattern": ADDRESS_PATTERN,
                                "maxLength": 120,
                                "description": "host:port, the new node's id",
                            },
                            "weight": _WEIGHT,
                        },
                    },
                },
                "remove": {
                    "type": "array",
                    "uniqueItems": True,
                    "items": {"type": "string", "minLength": 1},
                },
                "weights": {
                    "type": "object",
                    "propertyNames": {"minLength": 1},
                    "additionalProperties": _WEIGHT,
                },
                "rate": {"type": "integer", "minimum": 0},
            },
        },
        "Plan": _object(
            ["base_epoch", "map", "pairs", "keys_moving", "keys_total"],
            base_epoch={"type": "integer"},
            map=_ref("ClusterMap"),
            pairs={"type": "array", "items": {"type": "object"}},
            keys_moving={"type": "integer"},
            bytes_moving={"type": "integer"},
            keys_total={"type": "integer"},
            fraction={"type": "number"},
            ideal_fraction={"type": "number"},
            shares={"type": "object"},
            weights={"type": "object"},
        ),
        "KeysPage": _object(
            ["keys"],
            keys={"type": "array", "items": {"type": "string"}},
            cursor={"type": ["string", "null"]},
        ),
        "Installed": _object(["epoch", "map"], epoch={"type": "integer"}, map=_ref("ClusterMap")),
        "Rebalance": _object(["state"], state={"type": "string"}),
        "Reload": {"type": "object"},
        "Applied": _object(["applied"], applied={"type": "boolean"}),
        "Batch": _object(
            ["ops"],
            ops={
                "type": "array",
                "items": {
                    "oneOf": [
                        _object(["op", "key"], op={"const": "get"}, key=KEY_SCHEMA),
                        _object(
                            ["op", "key", "record"],
                            op={"const": "put"},
                            key=KEY_SCHEMA,
                            record=record,
                            hint_for={"type": ["string", "null"], "maxLength": MAX_KEY_BYTES},
                        ),
                    ]
                },
            },
        ),
        "BatchAnswer": _object(
            ["results"],
            results={
                "type": "array",
                "items": _object(
                    ["status"],
                    status={"type": "integer"},
                    error={"type": "string"},
                    message={"type": "string"},
                    record=record,
                    applied={"type": "boolean"},
                    inline={"type": "boolean"},
                ),
            },
        ),
        "Members": _object(
            ["members"],
            members={
                "type": "array",
                "maxItems": 1024,
                "items": {"type": "string", "pattern": "^[\\x20-\\x7e]{1,255}$"},
            },
        ),
        "NodeMap": _object(
            ["node", "learned", "cluster_id"],
            node={"type": "string"},
            learned={"oneOf": [_ref("ClusterMap"), {"type": "null"}]},
            accepted_epoch=_NULLABLE_INT,
            cluster_id={"type": ["string", "null"]},
        ),
        "Ballot": {
            "type": "array",
            "prefixItems": [{"type": "integer", "minimum": 0}, {"type": "string", "minLength": 1}],
            "minItems": 2,
            "maxItems": 2,
            "description": '[counter, "proposer"]',
        },
        "Promise": _object(
            ["promised"],
            promised={"type": "boolean"},
            promised_ballot={},
            accepted_ballot={},
            accepted={},
        ),
        "Accepted": _object(["accepted"], accepted={"type": "boolean"}, promised_ballot={}),
        "Learned": _object(["epoch"], epoch={"type": "integer"}),
        "MoveStatus": _object(
            ["node", "epoch", "phase", "stream", "cleanup"],
            node={"type": "string"},
            epoch=_NULLABLE_INT,
            phase={"type": ["string", "null"]},
            stream={"type": "object"},
            cleanup={"type": "object"},
        ),
    }


def _error_responses() -> dict[str, Schema]:
    out: dict[str, Schema] = {}
    for status, (description, codes) in ERRORS.items():
        listed = ", ".join(f"`{c}`" for c in codes)
        out[f"Error{status}"] = {
            "description": f"{description} Codes: {listed}.",
            "x-error-codes": list(codes),
            "content": {"application/json": {"schema": _ref("Error")}},
        }
    return out


def document() -> dict[str, Any]:
    """The whole API, proxy and node together (see the module docstring)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "shardkv",
            "version": "0.1.0",
            "description": "A sharded, replicated key-value store. The proxy and the nodes "
            "serve the same data routes; `x-served-by` on each operation says which "
            'processes serve it. Every error is JSON, `{"error": CODE, "message": TEXT}`, '
            "with details of its own after those two fields.",
        },
        "servers": [
            {"url": "http://127.0.0.1:8080", "description": "the proxy of `make run`"},
            {"url": "http://127.0.0.1:8081", "description": "a node of `make run`"},
        ],
        "tags": [
            {"name": "data", "description": "Keys and values (proxy and node)."},
            {"name": "operations", "description": "Health, views and metrics."},
            {"name": "admin", "description": "Membership changes (proxy; the cluster token)."},
            {"name": "replica", "description": "Between processes (node; the cluster token)."},
            {"name": "meta", "description": "This document."},
        ],
        "security": [{}, {"bearer": []}],
        "paths": _operations(),
        "components": {
            "schemas": _schemas(),
            "responses": _error_responses(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`--token-file` (the cluster token) for admin and replica "
                    "routes; `--client-token-file` for the proxy's data API. Without a "
                    "cluster token a process is in protected mode: loopback peers only.",
                }
            },
        },
    }


# -- serving --------------------------------------------------------------------------------

_CONVERTER = re.compile(r"<(?:[^:<>]+:)?_?([^<>]+)>")


def openapi_path(rule: str) -> str:
    """A Klein (werkzeug) rule as an OpenAPI path: ``/kv/<key:_key>`` is ``/kv/{key}``."""
    return _CONVERTER.sub(lambda m: "{" + m.group(1) + "}", rule)


def routes(app: Klein) -> dict[str, set[str]]:
    """Every OpenAPI path of ``app``'s rules -> its methods, lower case (HEAD included:
    werkzeug answers it for every GET rule)."""
    out: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        out.setdefault(openapi_path(rule.rule), set()).update(
            m.lower() for m in (rule.methods or ())
        )
    return out


def document_for(
    app: Klein, role: str, n: int | None = None, nodes: int | None = None
) -> dict[str, Any]:
    """The document cut down to the routes ``app`` serves (a HEAD only where
    described); ``n``: a proxy's replication factor, bounding ``r`` and ``w``;
    ``nodes``: how many it routes to, the fewest arcs its ring is drawn with."""
    doc = document()
    served = routes(app)
    paths: dict[str, Any] = {}
    for path, operations in doc["paths"].items():
        kept = {m: op for m, op in operations.items() if m in served.get(path, set())}
        for op in kept.values():
            if role == PROXY and op["tags"] == ["data"]:
                op["parameters"] = list(op.get("parameters", [])) + _quorum_parameters(n)
        if kept:
            paths[path] = kept
    ring = paths.get("/dashboard/ring.json", {}).get("get")
    if ring is not None and nodes:
        ring["parameters"][0]["schema"]["minimum"] = max(1, min(nodes, LIMIT_SEGMENTS))
    doc["paths"] = paths
    if role == NODE:
        doc["servers"] = [doc["servers"][1]]
    else:
        doc["servers"] = [doc["servers"][0]]
    return copy.deepcopy(doc)


def install_openapi_routes(app: Klein) -> None:
    """Register ``GET /openapi.json`` on ``app``: the document for its own routes.

    A proxy app has a C{coordinator} (its N bounds the quorum parameters); a
    node app has none.
    """

    @app.route(OPENAPI_PATH, methods=["GET"])
    def openapi(self: object, request: IRequest) -> bytes:
        coordinator = getattr(self, "coordinator", None)
        if coordinator is None:
            return json_body(request, 200, document_for(app, NODE))
        n = coordinator.quorum_sizes(Consistency()).n
        ring = getattr(coordinator, "ring", None)
        nodes = len(ring.nodes) if ring is not None else None
        return json_body(request, 200, document_for(app, PROXY, n, nodes))
